"""``general/v1``: zero-shot general-capability tasks (methods.md §5.5; ``rayedit/data/general/README.md``).

The task files are packaged with rayedit (``rayedit/data/general/*.parquet``, identical copies of the
project's shared data) and read from the installed package at run time. User files in the same schema
are accepted per task layout (:class:`GeneralFile`).

Each item is scored twice, as the reference evaluators do:

1. *generated answer*: greedy continuation of ``max_new_tokens`` tokens, searched case-insensitively by
   plain substring for the task's answer words in a fixed order, in the text after the last answer cue
   (mmlu / dialogue: a letter followed by a line break in the new text only); no match = invalid;
2. *likelihood*: the mean log-probability of each candidate word (``" " + word``, ids built at the id
   level after the prompt's ids) — the best candidate is the prediction; an exact binary tie goes to the
   task's class-0 word (negative / No / False), a tie for the 4-way maximum is invalid.

Prompts longer than the model's positions (e.g. mmlu on a 128-position toy model) are cut from the
left, keeping the BOS and the answer cue, and the row says ``truncated``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..scoring import PromptEncoder, TokenScorer, model_max_positions, plan_batches
from .protocols import GENERAL
from .sampling import decode_batch
from .settings import GENERAL_TASKS, GeneralFile, GeneralSettings

PACKAGED_DIR = Path(__file__).resolve().parents[2] / "data" / "general"
N_FEWSHOT_POOL = 10  # rows 0-9 of every file are the reference's few-shot pool, never test items
SA_INSTRUCTION = ("For each snippet of text,label the sentiment of the text as positive or negative.The answer "
                  "should be exact 'positive' or 'negative'. text:")


@dataclass(frozen=True)
class TaskSpec:
    """Prompt layout, candidate words and answer parsing of one task (data README, 'Prompt layouts')."""

    prompt: Callable[[dict[str, Any]], str]
    candidates: tuple[str, ...]  # likelihood candidates; for binary tasks [1] is the class-0 (tie) word
    parse_order: tuple[str, ...]  # words searched in this order (generated answer)
    cue: str | None  # search after the last cue in prompt+generation; None: letters in the new text only
    tie_word: str | None  # binary tie → this word; None: a tie for the maximum is invalid


def _letters(rows: Sequence[str]) -> str:
    return "".join(f"\n({'ABCD'[i]}) {c}" for i, c in enumerate(rows))


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(lambda r: f"Review :{r['sentence']}\nSentiment :", ("positive", "negative"),
                     ("positive", "negative"), "Sentiment :", "negative"),
    "mrpc": TaskSpec(lambda r: ("Are the sentences paraphrases of each other.\nSentence 1: "
                                f"{r['sentence1']}\nSentence 2: {r['sentence2']}\nAnswer:"),
                     ("Yes", "No"), ("yes", "no"), "Answer:", "No"),
    "cola": TaskSpec(lambda r: f"Is this sentence linguistically acceptable?\nSentence: {r['sentence']}\nAnswer: ",
                     ("Yes", "No"), ("yes", "no"), "Answer:", "No"),
    "rte": TaskSpec(lambda r: f"{r['sentence1']}\nquestion: {r['sentence2']} True or False?\nanswer:",
                    ("True", "False"), ("false", "true"), "answer:", "False"),
    "mmlu": TaskSpec(lambda r: f"Question: {r['question']}{_letters(r['choices'])}\nAnswer:",
                     ("A", "B", "C", "D"), ("a\n", "b\n", "c\n", "d\n"), None, None),
    "nli": TaskSpec(lambda r: f"{r['sentence1']} entails the {r['sentence2']} True or False? Answer:",
                    ("True", "False"), ("true", "false"), "True or False? Answer:", "False"),
    "dialogue": TaskSpec(lambda r: ("Q: Given the following: " + r["article"] + "\nWhich choice is correct?"
                                    + "".join(f"\n({'ABCD'[i]}){o}" for i, o in enumerate(r["options"]))
                                    + "\nAnswer:"),
                         ("A", "B", "C", "D"), ("a\n", "b\n", "c\n", "d\n"), None, None),
    "sentiment_analysis": TaskSpec(lambda r: f"{SA_INSTRUCTION} {r['sentence']} answer:", ("positive", "negative"),
                                   ("positive", "negative"), "answer:", "negative"),
}
assert set(TASKS) == set(GENERAL_TASKS)


@dataclass(frozen=True)
class GeneralItem:
    """One test item: what the suite iterates over (shardable by position in the item list)."""

    task: str  # prompt layout (one of TASKS)
    name: str  # task name in the rows (file stem for user files)
    row: int  # the row's ``row`` column (position in the upstream file)
    prompt: str
    gold: str  # the correct candidate word
    source: str  # file the item came from


def packaged_file(task: str) -> Path:
    path = PACKAGED_DIR / f"{task}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: packaged general-capability file missing (reinstall rayedit)")
    return path


def read_task_file(task: str, path: str | Path, *, name: str | None = None, split: str = "test",
                   limit: int | None = None, compat_reference: bool = False) -> list[GeneralItem]:
    """The items of one task file (``split``: ``test`` = rows >= 10; first ``limit`` in file order)."""
    import pyarrow.parquet as pq

    spec = TASKS[task]
    path = Path(path)
    table = pq.read_table(path)
    need = {"row", "answer"}
    if compat_reference and task == "rte":
        need.add("ref_eval_answer")
    missing = need - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))} of the {task} schema")
    out: list[GeneralItem] = []
    for rec in table.to_pylist():
        if split == "test" and int(rec["row"]) < N_FEWSHOT_POOL:
            continue
        gold = rec["ref_eval_answer"] if compat_reference and task == "rte" else rec["answer"]
        if gold not in spec.candidates:
            raise ValueError(f"{path}: row {rec['row']}: answer {gold!r} is not one of {spec.candidates}")
        try:
            prompt = spec.prompt(rec)
        except KeyError as exc:
            raise ValueError(f"{path}: row {rec['row']}: missing field {exc} of the {task} schema") from None
        out.append(GeneralItem(task, name or path.stem, int(rec["row"]), prompt, gold, str(path)))
        if limit is not None and len(out) >= limit:
            break
    return out


def general_items(settings: GeneralSettings, files: Sequence[GeneralFile] = ()) -> list[GeneralItem]:
    """Packaged tasks (``settings.tasks``) then user files (``settings.files`` + ``files``), in that order."""
    opts = dict(split=settings.split, limit=settings.limit, compat_reference=settings.compat_reference)
    items: list[GeneralItem] = []
    for task in settings.tasks:
        items += read_task_file(task, packaged_file(task), **opts)
    for f in [*settings.files, *files]:
        items += read_task_file(f.task, f.path, name=f.name, **opts)
    return items


# -- parsing ----------------------------------------------------------------------------------------
def parse_generated(task: str, prompt: str, generated: str) -> str | None:
    """The predicted candidate word, or None (invalid), as the reference parses generations."""
    spec = TASKS[task]
    # mmlu/dialogue: a letter + line break, searched in the new text only
    segment = generated.lower() if spec.cue is None else (prompt + generated).rsplit(spec.cue, 1)[-1].lower()
    for word in spec.parse_order:
        if word in segment:
            canon = word.strip()
            return next(c for c in spec.candidates if c.lower() == canon)
    return None


def likelihood_choice(task: str, mean_logprobs: Sequence[float]) -> str | None:
    spec = TASKS[task]
    best = max(mean_logprobs)
    winners = [c for c, v in zip(spec.candidates, mean_logprobs, strict=True) if v == best]
    if len(winners) == 1:
        return winners[0]
    return spec.tie_word  # binary: the class-0 word; 4-way: None (invalid)


# -- set-level metrics ------------------------------------------------------------------------------
INVALID = "<invalid>"


def confusion(gold: Sequence[str], pred: Sequence[str | None]) -> tuple[list[str], np.ndarray]:
    labels = sorted(set(gold)) + sorted({p or INVALID for p in pred} - set(gold))
    index = {k: i for i, k in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for g, p in zip(gold, pred, strict=True):
        cm[index[g], index[p or INVALID]] += 1
    return labels, cm


def weighted_f1(gold: Sequence[str], pred: Sequence[str | None]) -> float:
    """F1 per gold class weighted by its support; invalid answers are an extra (always wrong) class."""
    if not gold:
        return float("nan")
    _, cm = confusion(gold, pred)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    f1 = 0.0
    for k in range(cm.shape[0]):
        if support[k] == 0:
            continue
        tp = cm[k, k]
        prec = tp / predicted[k] if predicted[k] else 0.0
        rec = tp / support[k]
        f1 += support[k] * (2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return float(f1 / support.sum())


def mcc(gold: Sequence[str], pred: Sequence[str | None]) -> float:
    """Multi-class Matthews correlation (invalid = an extra class); 0 when undefined, as sklearn."""
    if not gold:
        return float("nan")
    _, cm = confusion(gold, pred)
    t, p = cm.sum(axis=1).astype(float), cm.sum(axis=0).astype(float)
    c, s = float(np.trace(cm)), float(cm.sum())
    den = np.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return float((c * s - (p * t).sum()) / den) if den else 0.0


# -- the suite --------------------------------------------------------------------------------------
def _fit(ids: list[int], budget: int, bos: int | None) -> tuple[list[int], bool]:
    """Cut a prompt from the left to ``budget`` ids, keeping a leading BOS (the answer cue is at the end)."""
    if len(ids) <= budget:
        return ids, False
    if bos is not None and ids and ids[0] == bos:
        return [ids[0], *ids[len(ids) - budget + 1:]], True
    return ids[len(ids) - budget:], True


def general_rows(model: Any, tokenizer: Any, items: Sequence[tuple[int, GeneralItem]], settings: GeneralSettings,
                 keep_raw: bool = True) -> list[dict[str, Any]]:
    """Rows for ``items`` = ``[(record_index, GeneralItem)]``: one generation pass + one scoring pass."""
    if not items:
        return []
    scorer = TokenScorer(model, tokenizer, token_budget=settings.token_budget, padding_side="right")
    encoder: PromptEncoder = scorer.encoder
    limit = model_max_positions(model)
    bos = getattr(tokenizer, "bos_token_id", None)
    pairs = [(it.prompt, " " + c) for _, it in items for c in TASKS[it.task].candidates]
    encoded = encoder.encode_pairs(pairs)
    prompts: list[list[int]] = []
    cand_ids: list[list[list[int]]] = []
    truncated: list[bool] = []
    k = 0
    for _, it in items:
        n_c = len(TASKS[it.task].candidates)
        cands = [c for _, c in encoded[k:k + n_c]]
        p_ids = encoded[k][0]
        k += n_c
        budget = None if limit is None else limit - max(settings.max_new_tokens, max(len(c) for c in cands))
        if budget is not None and budget < 2:
            raise ValueError(f"the model's {limit} positions leave no room for a prompt")
        fitted, cut = (p_ids, False) if budget is None else _fit(p_ids, budget, bos)
        prompts.append(fitted)
        cand_ids.append(cands)
        truncated.append(cut)

    # 1. greedy generations, length-sorted, token-budgeted batches
    generated: list[str] = [""] * len(items)
    lengths = [len(p) + settings.max_new_tokens for p in prompts]
    for batch in plan_batches(lengths, settings.token_budget, settings.max_batch_size):
        outs = decode_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens=settings.max_new_tokens)
        for i, o in zip(batch, outs, strict=True):
            generated[i] = o.text

    # 2. candidate likelihoods in one scorer pass (deduplicated, length-sorted)
    flat = [(prompts[i], c) for i in range(len(items)) for c in cand_ids[i]]
    scores = scorer.score_encoded(flat)

    rows: list[dict[str, Any]] = []
    k = 0
    for i, (index, it) in enumerate(items):
        spec = TASKS[it.task]
        lps = [sum(s.logprobs) / len(s.logprobs) for s in scores[k:k + len(spec.candidates)]]
        k += len(spec.candidates)
        gen_pred = parse_generated(it.task, it.prompt, generated[i])
        lik_pred = likelihood_choice(it.task, lps)
        row: dict[str, Any] = {
            "protocol": GENERAL.id, "record_index": index, "task": it.name, "layout": it.task, "row": it.row,
            "gold": it.gold, "gen_pred": gen_pred or "", "gen_valid": float(gen_pred is not None),
            "gen_correct": float(gen_pred == it.gold), "lik_pred": lik_pred or "",
            "lik_correct": float(lik_pred == it.gold), "truncated": truncated[i],
            "n_prompt_tokens": len(prompts[i]), "compat_reference": settings.compat_reference,
            "max_new_tokens": settings.max_new_tokens,
        }
        if keep_raw:
            row["generated"] = generated[i]
            row["candidate_logprobs"] = lps
        rows.append(row)
    return rows


def general_summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per task: n, accuracy / F1 / MCC of the generated answers, invalid rate, and the same for likelihood."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    out: dict[str, dict[str, float]] = {}
    for task, group in by_task.items():
        gold = [r["gold"] for r in group]
        gen = [r["gen_pred"] or None for r in group]
        lik = [r["lik_pred"] or None for r in group]
        n = len(group)
        out[task] = {
            "n": n,
            "accuracy": sum(r["gen_correct"] for r in group) / n,
            "f1": weighted_f1(gold, gen),
            "mcc": mcc(gold, gen),
            "invalid_rate": 1.0 - sum(r["gen_valid"] for r in group) / n,
            "accuracy_lik": sum(r["lik_correct"] for r in group) / n,
            "f1_new": weighted_f1(gold, lik),
            "mcc_new": mcc(gold, lik),
            "truncated_rate": sum(bool(r.get("truncated")) for r in group) / n,
        }
    return out
