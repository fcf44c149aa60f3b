"""Batched edit evaluation (rayedit.evaluate) against a plain per-prompt reference written here.

The reference scores one (prefix, candidate) at a time, without padding, building ids naively:
``tok(prefix).input_ids + tok(candidate, add_special_tokens=False).input_ids``.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from rayedit.data.requests import EditRequest
from rayedit.data.schema import CounterFactRecord, ZsreRecord
from rayedit.evaluate import (
    COUNTERFACT_PROB,
    EASYEDIT,
    GENERATION,
    PROTOCOLS,
    ZSRE_TOKEN_ACC,
    AttributeSnippets,
    LocalityCache,
    PreEditCacheError,
    RecordError,
    ScoringError,
    TfidfModel,
    TokenScorer,
    evaluate_records,
    evaluate_step,
    harmonic_mean,
    ngram_entropy,
    plan_batches,
    prepare_locality_cache,
    summarize,
    summary_rows,
    text_fluency,
    to_long_rows,
)
from rayedit.models import build_tiny_model

TOL = 1e-5


def cf_record(i: int, subject: str, prompt: str, new: str, true: str, paraphrases: list[str],
              neighbours: list[str], generation: list[str] | None = None) -> CounterFactRecord:
    req = EditRequest(case_id=str(i), prompt=prompt, subject=subject, target_new=new, target_true=true)
    return CounterFactRecord(case_id=str(i), request=req, relation_id="P19", paraphrase_prompts=paraphrases,
                             neighborhood_prompts=neighbours, attribute_prompts=[],
                             generation_prompts=generation or [])


def zsre_record(i: int, subject: str, prompt: str, target: str, rephrase: str, loc: str,
                loc_ans: str) -> ZsreRecord:
    req = EditRequest(case_id=str(i), prompt=prompt, subject=subject, target_new=target)
    return ZsreRecord(case_id=str(i), request=req, rephrase=rephrase, loc=loc, loc_ans=loc_ans)


CF_RECORDS = [
    cf_record(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French",
              ["Danielle Darrieux spoke the language", "Where Danielle Darrieux grew up, people speak"],
              ["Michel Rocard's mother tongue is", "The native language of Jean Dupont is", "Paul speaks"],
              ["Danielle Darrieux is", "The life of Danielle Darrieux"]),
    cf_record(1, "Toko Yasuda", "{} plays the", "piano", "guitar",
              ["Toko Yasuda, the", "The instrument Toko Yasuda plays is the"],
              ["Jimi Hendrix plays the", "Eric Clapton, who plays the", "A musician who plays the"]),
    cf_record(2, "Autonomous University of Madrid", "{}, which is located in", "Sweden", "Spain",
              ["The Autonomous University of Madrid is in the country of"],
              ["Barcelona is located in the country of", "Sevilla, in", "Valencia is a city in",
               "Toledo is in"]),
    cf_record(3, "Apple A5", "{} was created by", "Google", "Apple",
              ["Apple A5 is a product of", "The maker of the Apple A5 is"], ["iPhone was created by"]),
]

ZSRE_RECORDS = [
    zsre_record(0, "Watts Humphrey", "What university did {} attend?", "Illinois Institute of Technology",
                "What university did Watts Humphrey take part in?",
                "nq question: who played desmond doss father in hacksaw ridge", "Hugo Weaving"),
    zsre_record(1, "Ramalinaceae", "Which family does {} belong to?", "Lecanorales",
                "What family are Ramalinaceae?", "nq question: types of skiing in the winter olympics 2018",
                "Downhill"),
    zsre_record(2, "Marl Young", "What is {}'s nationality?", " American",
                "Which country is Marl Young from?",
                "nq question: where is the tv show the curse of oak island filmed", "Oak Island"),
]


# -- the per-prompt reference ---------------------------------------------------------------------
@torch.no_grad()
def reference_score(model: nn.Module, tok, prefix: str, cand: str, add_special: bool = True):
    """(log-probs, argmax ids, target ids) of ``cand`` after ``prefix``, one unpadded forward."""
    p = tok(prefix, add_special_tokens=add_special)["input_ids"]
    c = tok(cand, add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([p + c])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    lps = [logp[len(p) - 1 + j, t].item() for j, t in enumerate(c)]
    am = [int(logits[len(p) - 1 + j].argmax()) for j in range(len(c))]
    return lps, am, c


def reference_counterfact(model, tok, rec) -> dict[str, float]:
    req = rec.request
    groups = {"efficacy": [req.text], "paraphrase": rec.paraphrase_prompts,
              "neighborhood": rec.neighborhood_prompts}
    out: dict[str, float] = {}
    for metric, prompts in groups.items():
        succ, diff, acc = [], [], []
        for x in prompts:
            lp_new, am_new, t_new = reference_score(model, tok, x, req.target_new)
            lp_true, am_true, t_true = reference_score(model, tok, x, req.target_true)
            nll_new, nll_true = -sum(lp_new) / len(lp_new), -sum(lp_true) / len(lp_true)
            if metric == "neighborhood":
                succ.append(float(nll_true < nll_new))
                diff.append(math.exp(-nll_true) - math.exp(-nll_new))
                acc.append(float(am_true == t_true))
            else:
                succ.append(float(nll_true > nll_new))
                diff.append(math.exp(-nll_new) - math.exp(-nll_true))
                acc.append(float(am_new == t_new))
        out[f"{metric}_success"] = sum(succ) / len(succ)
        out[f"{metric}_diff"] = sum(diff) / len(diff)
        out[f"{metric}_acc"] = sum(acc) / len(acc)
    return out


def reference_zsre(model, tok, rec) -> dict[str, float]:
    tests = {"efficacy": (rec.request.text, rec.request.target_new),
             "generalization": (rec.rephrase, rec.request.target_new),
             "specificity": (rec.loc + "?", " " + rec.loc_ans.lstrip())}
    out = {}
    for name, (prefix, cand) in tests.items():
        _, am, t = reference_score(model, tok, prefix, cand)
        out[name] = sum(a == b for a, b in zip(am, t, strict=True)) / len(t)
    return out


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request):
    return build_tiny_model(request.param, seed=3)


ALL_PAIRS = [(p, c) for rec in CF_RECORDS
             for p in [rec.request.text, *rec.paraphrase_prompts, *rec.neighborhood_prompts]
             for c in (rec.request.target_new, rec.request.target_true)]


# -- core scorer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_scorer_matches_per_prompt_reference(lm, padding_side):
    # a small budget forces many batches of mixed lengths
    scorer = TokenScorer(lm.model, lm.tokenizer, token_budget=64, padding_side=padding_side)
    scores = scorer.score(ALL_PAIRS)
    assert scorer.stats.forwards > 3
    for (prefix, cand), s in zip(ALL_PAIRS, scores, strict=True):
        lps, am, t = reference_score(lm.model, lm.tokenizer, prefix, cand)
        assert s.target_ids == t
        assert s.n_prefix == len(lm.tokenizer(prefix)["input_ids"])
        np.testing.assert_allclose(s.logprobs, lps, atol=TOL, rtol=0)
        assert s.argmax_ids == am
        assert abs(s.mean_nll - (-sum(lps) / len(lps))) < TOL


def test_bos_is_part_of_the_prefix_only_for_bos_tokenizers(lm):
    scorer = TokenScorer(lm.model, lm.tokenizer)
    (p, c), = scorer.encode([("The capital of France is", " Paris")])
    adds_bos = lm.adapter.model_type == "llama"
    assert (p[0] == lm.tokenizer.bos_token_id) == adds_bos
    assert lm.tokenizer.bos_token_id not in c
    assert c == lm.tokenizer(" Paris", add_special_tokens=False)["input_ids"]  # space not doubled


def test_right_and_left_padding_give_the_same_numbers(lm):
    right = TokenScorer(lm.model, lm.tokenizer, token_budget=200, padding_side="right").score(ALL_PAIRS)
    left = TokenScorer(lm.model, lm.tokenizer, token_budget=200, padding_side="left").score(ALL_PAIRS)
    for a, b in zip(right, left, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=TOL, rtol=0)
        assert a.argmax_ids == b.argmax_ids


def test_full_logits_path_equals_logits_to_keep_path(lm):
    a = TokenScorer(lm.model, lm.tokenizer, token_budget=128)
    b = TokenScorer(lm.model, lm.tokenizer, token_budget=128)
    b._keep_mode = "full"  # what older transformers versions get
    sa, sb = a.score(ALL_PAIRS), b.score(ALL_PAIRS)
    assert a._keep_mode == "mask"
    for x, y in zip(sa, sb, strict=True):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=TOL, rtol=0)


def test_unscorable_inputs_are_clear_errors():
    lm = build_tiny_model("gpt2")
    scorer = TokenScorer(lm.model, lm.tokenizer)
    with pytest.raises(ScoringError, match="no tokens"):
        scorer.score([("", " Paris")])  # GPT-2 adds no BOS: nothing would predict " Paris"
    with pytest.raises(ScoringError, match="positions"):
        scorer.score([("word " * 300, " Paris")])
    bos = build_tiny_model("llama")
    assert len(TokenScorer(bos.model, bos.tokenizer).score([("", " Paris")])[0].logprobs) == 3  # BOS predicts


def test_plan_batches_respects_token_budget():
    lengths = [5, 17, 3, 9, 9, 30, 1, 12]
    batches = plan_batches(lengths, token_budget=32)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 32
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert plan_batches([40], token_budget=8) == [[0]]  # too long for the budget: alone, not dropped


def test_suffix_rule_for_sentencepiece_like_tokenizers():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # a legacy Llama-2-like tokenizer: "▁" is prepended and replaces spaces, pieces start at "▁"
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    text = ["The capital of France is Paris.", "Paris is a city.", "The capital of Italy is Rome."] * 20
    raw.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>", "</s>", "<unk>"],
                                                      show_progress=False))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    direct = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert tok.decode(direct[:1]).strip() == ""  # the lone "▁" piece this rule exists for
    full = tok("The capital of France is Paris")["input_ids"]
    prefix = tok("The capital of France is")["input_ids"]
    model = nn.Linear(1, 1)  # never called
    model.config = SimpleNamespace(max_position_embeddings=64)
    auto = TokenScorer(model, tok)
    (p, c), = auto.encode([("The capital of France is", " Paris")])
    assert p == prefix and c == full[len(prefix):] and auto.encoder.suffix_rule_used == 1
    (_, c_direct), = TokenScorer(model, tok, continuation_rule="direct").encode([("The capital of France is",
                                                                                  " Paris")])
    assert c_direct == direct


# -- CounterFact ----------------------------------------------------------------------------------
def test_counterfact_rows_match_reference(lm):
    rows = evaluate_records(lm, CF_RECORDS, "counterfact", token_budget=96)
    assert [r["case_id"] for r in rows] == [r.case_id for r in CF_RECORDS]
    for row, rec in zip(rows, CF_RECORDS, strict=True):
        assert row["protocol"] == COUNTERFACT_PROB.id and row["chat_template"] is False
        ref = reference_counterfact(lm.model, lm.tokenizer, rec)
        for k, v in ref.items():
            assert abs(row[k] - v) < TOL, (k, row[k], v)
        # raw per-token scores are kept for inspection
        assert len(row["neighborhood_logprobs_true"]) == len(rec.neighborhood_prompts)
        expected = lm.tokenizer(rec.request.target_new, add_special_tokens=False)["input_ids"]
        assert row["target_new_ids"] == expected


def test_shards_concatenate_to_the_whole_range(lm):
    whole = evaluate_records(lm, CF_RECORDS, "counterfact", keep_raw=False)
    parts = [r for start, stop in [(0, 1), (1, 3), (3, 4)]
             for r in evaluate_records(lm, CF_RECORDS, "counterfact", start=start, stop=stop, keep_raw=False)]
    assert [r["record_index"] for r in parts] == [0, 1, 2, 3]
    for a, b in zip(whole, parts, strict=True):
        for k in COUNTERFACT_PROB.metrics:
            assert abs(a[k] - b[k]) < TOL
    assert evaluate_records(lm, CF_RECORDS, "counterfact", start=2, stop=2) == []
    with pytest.raises(ValueError, match="record range"):
        evaluate_records(lm, CF_RECORDS, "counterfact", start=3, stop=1)


class ControlledLM(nn.Module):
    """A fake causal LM with known outputs: after the marker token has been seen it prefers token A
    (logit 5) over B (logit 2); before, the other way round. Every other token has logit 0."""

    def __init__(self, vocab: int, marker: int, a: int, b: int) -> None:
        super().__init__()
        self.vocab, self.marker, self.a, self.b = vocab, marker, a, b
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(n_positions=128)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):  # no logits_to_keep
        seen = (input_ids == self.marker).long().cumsum(dim=1) > 0
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.a] = torch.where(seen, 5.0, 2.0)
        logits[..., self.b] = torch.where(seen, 2.0, 5.0)
        return SimpleNamespace(logits=logits)


def test_counterfact_known_metrics_and_harmonic_mean():
    tok = build_tiny_model("gpt2").tokenizer
    a, = tok(" the", add_special_tokens=False)["input_ids"]
    b, = tok(" of", add_special_tokens=False)["input_ids"]
    marker = tok("Zanzibar", add_special_tokens=False)["input_ids"][3]  # "ib", also in " Zanzibar"
    assert marker in tok(" Zanzibar", add_special_tokens=False)["input_ids"]
    neighbours = ["The dog is in", "My house is near"]
    assert all(marker not in tok(n)["input_ids"] for n in neighbours)
    recs = [cf_record(0, "Zanzibar", "The capital of {} is", "the", "of",
                      ["Zanzibar's capital is", "Where is Zanzibar"], neighbours),
            cf_record(1, "Zanzibar", "{} lies in", "the", "of", ["Zanzibar's capital is", "The dog is in"],
                      neighbours)]
    lm = SimpleNamespace(model=ControlledLM(len(tok), marker, a, b), tokenizer=tok)
    rows = evaluate_records(lm, recs, "counterfact")
    z = math.exp(5) + math.exp(2) + len(tok) - 2
    p_hi, p_lo = math.exp(5) / z, math.exp(2) / z
    assert rows[0]["efficacy_success"] == 1.0 and rows[0]["paraphrase_success"] == 1.0
    assert rows[1]["paraphrase_success"] == 0.5
    assert rows[0]["neighborhood_success"] == 1.0
    assert abs(rows[0]["efficacy_diff"] - (p_hi - p_lo)) < 1e-6
    assert abs(rows[0]["neighborhood_diff"] - (p_hi - p_lo)) < 1e-6
    assert abs(rows[1]["paraphrase_diff"] - 0.0) < 1e-6  # +(hi-lo) and -(hi-lo)
    assert rows[0]["efficacy_acc"] == 1.0 and rows[0]["neighborhood_acc"] == 1.0
    assert abs(rows[0]["rewrite_nll_new"][0] + math.log(p_hi)) < 1e-6
    summary = summarize(rows)[COUNTERFACT_PROB.id]
    m = summary["metrics"]
    assert m["efficacy_success"] == {"mean": 100.0, "n": 2}
    assert m["paraphrase_success"]["mean"] == 75.0
    assert abs(summary["score"] - 3 / (1 / 100 + 1 / 75 + 1 / 100)) < 1e-9
    assert abs(summary["score"] - 90.0) < 1e-9


def test_harmonic_mean_arithmetic():
    assert abs(harmonic_mean([100, 75, 100]) - 90.0) < 1e-12
    assert harmonic_mean([50, 0, 100]) == 0.0
    assert math.isnan(harmonic_mean([50, float("nan")]))
    assert abs(harmonic_mean([40, 60]) - 48.0) < 1e-12


def test_counterfact_record_without_target_true_is_a_clear_error(lm):
    # the schema refuses such records; the evaluator also says clearly what is missing (duck-typed input)
    req = EditRequest(case_id="9", prompt="{} is", subject="X", target_new="a")
    rec = SimpleNamespace(case_id="9", request=req, paraphrase_prompts=[], neighborhood_prompts=[])
    with pytest.raises(RecordError, match="'9'.*target_true"):
        evaluate_records(lm, [rec], "counterfact")


# -- ZsRE ----------------------------------------------------------------------------------------
def test_zsre_rows_match_reference(lm):
    rows = evaluate_records(lm, ZSRE_RECORDS, "zsre", token_budget=80)
    for row, rec in zip(rows, ZSRE_RECORDS, strict=True):
        assert row["protocol"] == ZSRE_TOKEN_ACC.id
        ref = reference_zsre(lm.model, lm.tokenizer, rec)
        for k, v in ref.items():
            assert abs(row[k] - v) < TOL, (k, row[k], v)
        expected = lm.tokenizer(" " + rec.loc_ans.lstrip(), add_special_tokens=False)["input_ids"]
        assert row["specificity_target_ids"] == [expected]


def test_zsre_known_accuracy_with_controlled_model():
    tok = build_tiny_model("gpt2").tokenizer
    a, = tok(" the", add_special_tokens=False)["input_ids"]
    b, = tok(" of", add_special_tokens=False)["input_ids"]
    marker = tok("Zanzibar", add_special_tokens=False)["input_ids"][3]
    lm = SimpleNamespace(model=ControlledLM(len(tok), marker, a, b), tokenizer=tok)
    # target " the of the": token-level argmax after the subject is always " the" → 2 of 3 correct
    rec = zsre_record(0, "Zanzibar", "Where is {}?", "the of the", "Which place is Zanzibar?",
                      "nq question: who is the dog", "of of")
    row, = evaluate_records(lm, [rec], "zsre")
    assert abs(row["efficacy"] - 2 / 3) < 1e-12 and abs(row["generalization"] - 2 / 3) < 1e-12
    assert row["specificity"] == 1.0  # no marker: " of" is the argmax everywhere
    assert row["efficacy_correct"] == [[True, False, True]]


# -- EasyEdit and the pre-edit locality cache ------------------------------------------------------
def _perturb(model: nn.Module, seed: int = 0, scale: float = 2.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp" in name and p.ndim == 2:
                p.add_(scale * torch.randn(p.shape, generator=gen) * p.std())


def test_locality_is_against_cached_pre_edit_predictions():
    lm = build_tiny_model("gpt2", seed=5)
    records = ZSRE_RECORDS + CF_RECORDS[:2]
    pre_argmax = []
    for rec in records:  # reference pre-edit argmax, computed in the test before the "edit"
        if hasattr(rec, "loc"):
            inputs = [(rec.loc, " " + rec.loc_ans.lstrip())]
        else:
            inputs = [(p, rec.request.target_true) for p in rec.neighborhood_prompts]
        pre_argmax.append([reference_score(lm.model, lm.tokenizer, p, c)[1] for p, c in inputs])
    cache = prepare_locality_cache(lm, records)
    assert cache.base_fingerprint and len(cache) == 1 + 1 + 1 + 3 + 3 == 9
    before = evaluate_records(lm, records, "easyedit", locality_cache=cache)
    assert all(r["locality"] == 1.0 and r["protocol"] == EASYEDIT.id for r in before)

    _perturb(lm.model)  # the "edit"
    with pytest.raises(PreEditCacheError, match="already edited"):
        prepare_locality_cache(lm, records, cache)  # predictions of an edited model never enter the cache
    rows = evaluate_records(lm, records, "easyedit", locality_cache=cache)
    localities = []
    for row, rec, pre_list in zip(rows, records, pre_argmax, strict=True):
        if hasattr(rec, "loc"):
            inputs = [(rec.loc, " " + rec.loc_ans.lstrip())]
        else:
            inputs = [(p, rec.request.target_true) for p in rec.neighborhood_prompts]
        values = []
        for (p, c), pre in zip(inputs, pre_list, strict=True):
            post = reference_score(lm.model, lm.tokenizer, p, c)[1]
            values.append(sum(x == y for x, y in zip(post, pre, strict=True)) / len(pre))
        assert abs(row["locality"] - sum(values) / len(values)) < TOL
        # reliability is plain token accuracy on the edited model
        _, am, t = reference_score(lm.model, lm.tokenizer, rec.request.text, rec.request.target_new)
        assert abs(row["reliability"] - sum(x == y for x, y in zip(am, t, strict=True)) / len(t)) < TOL
        assert row["locality_reference"] == cache.base_fingerprint
        localities.append(row["locality"])
    assert min(localities) < 1.0  # the perturbation changed predictions: not compared against itself

    # a JSON round trip keeps the cache usable; a missing entry is an error, never recomputed
    restored = LocalityCache.from_dict(json.loads(json.dumps(cache.to_dict())))
    again = evaluate_records(lm, records, "easyedit", locality_cache=restored)
    assert [r["locality"] for r in again] == localities
    with pytest.raises(PreEditCacheError, match="pre-edit"):
        evaluate_records(lm, records, "easyedit", locality_cache=LocalityCache("x"))
    with pytest.raises(PreEditCacheError):
        evaluate_records(lm, records, "easyedit")


# -- protocols, summaries, steps, chat template ---------------------------------------------------
def test_protocol_recorded_and_never_pooled(lm):
    cache = prepare_locality_cache(lm, ZSRE_RECORDS)
    rows = evaluate_records(lm, ZSRE_RECORDS, ["zsre", "easyedit"], locality_cache=cache)
    assert {r["protocol"] for r in rows} == {ZSRE_TOKEN_ACC.id, EASYEDIT.id}
    assert all(r["protocol"] in PROTOCOLS for r in rows)
    summary = summarize(rows)
    assert set(summary) == {ZSRE_TOKEN_ACC.id, EASYEDIT.id}
    # "generalization" exists in both protocols: each summary averages only its own rows
    for pid in summary:
        vals = [r["generalization"] for r in rows if r["protocol"] == pid]
        assert abs(summary[pid]["metrics"]["generalization"]["mean"] - 100 * sum(vals) / len(vals)) < 1e-9
        assert summary[pid]["n_records"] == len(ZSRE_RECORDS)
    long = to_long_rows(rows)
    assert len(long) == 2 * 3 * len(ZSRE_RECORDS)
    assert all({"protocol", "case_id", "metric", "value"} <= set(r) for r in long)
    tidy = summary_rows(rows)
    pairs = {(r["protocol"], r["metric"]) for r in tidy}
    assert pairs >= {(ZSRE_TOKEN_ACC.id, "efficacy"), (EASYEDIT.id, "locality")}


def test_evaluate_step_marks_retention_rows(lm):
    rows = evaluate_step(lm, CF_RECORDS[:3], step=7, suite="counterfact", start=1, keep_raw=False)
    assert [(r["record_index"], r["step"], r["n_edited"]) for r in rows] == [(1, 7, 3), (2, 7, 3)]
    tidy = summary_rows(rows, by=("step",))
    assert {r["step"] for r in tidy} == {7}
    assert any(r["metric"] == "score" for r in tidy)


def test_chat_template_switch_is_applied_and_recorded():
    lm = build_tiny_model("llama", seed=1)
    tok = lm.tokenizer
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}User: {{ m['content'] }}{% endfor %}"
                         "\nAssistant:")
    recs = CF_RECORDS[:2]
    raw = evaluate_records(lm, recs, "counterfact")
    chat = evaluate_records(lm, recs, "counterfact", chat_template=True)
    assert all(r["chat_template"] is True for r in chat) and all(r["chat_template"] is False for r in raw)
    for row, rec in zip(chat, recs, strict=True):
        templated = tok.apply_chat_template([{"role": "user", "content": rec.request.text}], tokenize=False,
                                            add_generation_prompt=True)
        assert templated.startswith("<|bos|>User: ")
        lps, _, _ = reference_score(lm.model, tok, templated, rec.request.target_new, add_special=False)
        assert abs(row["rewrite_nll_new"][0] - (-sum(lps) / len(lps))) < TOL
        assert templated.count("<|bos|>") == 1  # the BOS is not added twice
    with pytest.raises(ValueError, match="mix chat_template"):
        summarize(raw + chat)
    no_template = build_tiny_model("gpt2")
    with pytest.raises(ValueError, match="no chat template"):
        evaluate_records(no_template, recs, "counterfact", chat_template=True)


# -- generation tests ------------------------------------------------------------------------------
def test_ngram_entropy_and_fluency_known_values():
    words = ["a", "b", "a", "b"]
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert abs(ngram_entropy(words, 2) - h2) < 1e-12
    assert abs(ngram_entropy(words, 3) - 1.0) < 1e-12
    assert abs(text_fluency("a b a b") - (h2 / 3 + 2 / 3)) < 1e-12
    assert text_fluency("") == 0.0


def test_tfidf_cosine_matches_manual_numpy():
    vocab = {"paris": 0, "city": 1, "france": 2, "rome": 3}
    idf = np.array([1.5, 1.0, 2.0, 2.5])
    tf = TfidfModel(vocab, idf)
    a, b = "Paris is a city in France, Paris!", "ROME city"
    va = np.array([2, 1, 1, 0]) * idf
    vb = np.array([0, 1, 0, 1]) * idf
    expected = va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb))
    assert abs(tf.similarity(a, b) - expected) < 1e-12
    assert abs(tf.similarity(a, a) - 1.0) < 1e-12
    assert tf.similarity("a", "b") == 0.0  # no vocabulary words: zero vector, no NaN


def test_generation_is_seeded_sharding_independent_and_scored(tmp_path):
    lm = build_tiny_model("gpt2", seed=2)
    recs = CF_RECORDS[:2]
    snippets = [{"relation_id": "P19", "target_id": "English", "samples": [
        {"name": "Someone", "text": "English is spoken in England and the city"}]}]
    (tmp_path / "snips.json").write_text(json.dumps(snippets))
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0, 1.5]))
    (tmp_path / "vocab.json").write_text(json.dumps({"english": 0, "the": 1, "city": 2}))
    kw = dict(generation=True, snippets=AttributeSnippets.load(tmp_path / "snips.json"),
              tfidf=TfidfModel.load(tmp_path / "idf.npy", tmp_path / "vocab.json"), generation_seed=11)
    rows = [r for r in evaluate_records(lm, recs, "counterfact", **kw) if r["protocol"] == GENERATION.id]
    assert len(rows) == 2
    assert rows[1]["generations"] == [] and math.isnan(rows[1]["fluency"])  # no generation prompts
    assert summarize(rows)[GENERATION.id]["metrics"]["fluency"]["n"] == 1  # NaN is not averaged
    shard = [r for r in evaluate_records(lm, recs, "counterfact", start=0, stop=1, **kw)
             if r["protocol"] == GENERATION.id]
    assert rows[0]["generations"] == shard[0]["generations"]
    row = rows[0]
    assert len(row["generations"]) == 2 and row["word_tokenizer"] in ("nltk", "regex")
    for text, prompt in zip(row["generations"], recs[0].generation_prompts, strict=True):
        assert text.startswith(prompt)
    assert row["generation_n_tokens"] == [100, 100]  # 100 tokens in total, prompt included
    assert row["fluency"] > 0 and 0.0 <= row["consistency"] <= 1.0
    other_seed = evaluate_records(lm, recs[:1], "generation", generation_seed=12)
    assert other_seed[0]["generations"] != row["generations"]
    assert math.isnan(evaluate_records(lm, recs[:1], "generation", generation_seed=11)[0]["consistency"])
    every_other = evaluate_records(lm, CF_RECORDS, "generation", generation_test_interval=2, keep_raw=False)
    assert [r["record_index"] for r in every_other] == [0, 2]


def test_generation_batched_across_records_draws_each_records_own_text():
    """Several records in one sampling batch (different prompt lengths and counts, one without prompts) give
    every record exactly the text it gets alone, whatever its place in the batch."""
    lm = build_tiny_model("llama", seed=3)
    gens = [["Danielle Darrieux is", "The life of Danielle Darrieux, who was born in a small town"], [],
            ["Toko Yasuda"], ["A musician who plays the", "Paul", "Eric Clapton, who plays the guitar and"]]
    recs = [cf_record(i, "S", "{} is", "a", "b", [], [], g) for i, g in enumerate(gens)]
    kw = dict(generation_seed=5, keep_raw=True)
    alone = {r["case_id"]: r["generations"] for r in evaluate_records(lm, recs, "generation",
                                                                      generation_batch_size=1, **kw)}
    together = evaluate_records(lm, recs, "generation", generation_batch_size=64, **kw)
    reordered = evaluate_records(lm, recs[::-1], "generation", generation_batch_size=3, **kw)
    assert [r["case_id"] for r in together] == ["0", "1", "2", "3"]
    for rows in (together, reordered):
        assert {r["case_id"]: r["generations"] for r in rows} == alone
    assert alone["1"] == [] and len(alone["3"]) == 3
    for g, rec in zip(gens, recs, strict=True):  # each text continues its own prompt
        assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(alone[rec.case_id], g, strict=True))


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_bad_dataset_is_one_clear_line(tmp_path):
    from typer.testing import CliRunner

    from rayedit.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--model", "tiny:gpt2", "--dataset", str(tmp_path / "missing.json")])
    assert res.exit_code == 2
    assert "does not exist" in res.output and len(res.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = runner.invoke(app, ["eval", "--model", "tiny:gpt2", "--dataset", str(bad)])
    assert res.exit_code == 2 and "invalid JSON" in res.output and len(res.output.strip().splitlines()) == 1
    bad.write_text(json.dumps([{"case_id": 7, "requested_rewrite": {"prompt": "{} is", "subject": "X"}}]))
    res = runner.invoke(app, ["eval", "--model", "tiny:gpt2", "--dataset", str(bad)])
    assert res.exit_code == 2 and "case_id 7" in res.output and len(res.output.strip().splitlines()) == 1


def test_cli_eval_counterfact_json(tmp_path):
    pytest.importorskip("rayedit.data.loaders")
    from typer.testing import CliRunner

    from rayedit.cli import app

    data = [{"case_id": i, "requested_rewrite": {
        "prompt": "{} was born in", "subject": f"Person {i}", "relation_id": "P19",
        "target_new": {"str": "Paris", "id": "Q90"}, "target_true": {"str": "Rome", "id": "Q220"}},
        "paraphrase_prompts": [f"Person {i} is from", f"The birthplace of Person {i} is"],
        "neighborhood_prompts": ["Anna was born in", "Boris was born in"], "attribute_prompts": [],
        "generation_prompts": [f"Person {i} is"]} for i in range(3)]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(data))
    res = CliRunner().invoke(app, ["eval", "--model", "tiny:llama", "--dataset", str(path), "--limit", "2",
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    entry = out["summary"][COUNTERFACT_PROB.id]
    assert out["kind"] == "counterfact" and entry["n_records"] == 2
    assert set(entry["metrics"]) == set(COUNTERFACT_PROB.metrics) and "score" in entry
