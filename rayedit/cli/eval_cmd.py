"""``rayedit eval``: evaluate a model on a CounterFact or ZsRE file and print the summary metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from rayedit.cli.app import app

KINDS = ("counterfact", "zsre")
DEFAULT_SUITE = {"counterfact": "counterfact", "zsre": "zsre"}


class CliError(Exception):
    """An error shown to the user as one line."""


def _first_line(exc: BaseException) -> str:
    from rayedit.cli.campaign_cmd import error_line

    line = error_line(exc)
    problems = getattr(exc, "problems", None)  # dataset validation errors list every bad record
    if problems:
        line += f"; first problem: {problems[0]}"
    return line


def guess_kind(source: str) -> str:
    """CounterFact records have ``requested_rewrite``; ZsRE records have ``src``/``loc``."""
    from rayedit.data.loaders import iter_raw_records

    first = next(iter(iter_raw_records(source)), None)
    if isinstance(first, dict):
        if "requested_rewrite" in first:
            return "counterfact"
        if "src" in first or "loc" in first:
            return "zsre"
    raise CliError(f"cannot tell whether {source!r} is CounterFact or ZsRE: pass --kind counterfact|zsre")


def load_records(kind: str, source: str, limit: int | None, skip_invalid: bool, zsre_target: str | None,
                 ) -> list[Any]:
    from rayedit.data.loaders import load_dataset_records

    options = {"zsre_target": zsre_target} if kind == "zsre" and zsre_target else {}
    return list(load_dataset_records(kind, source, limit=limit, skip_invalid=skip_invalid, **options))


def load_lm(model: str, dtype: str, device: str | None) -> Any:
    if model.startswith("tiny:"):  # offline demo models: tiny:<family>
        from rayedit.models import build_tiny_model

        return build_tiny_model(model.split(":", 1)[1])
    from rayedit.models import load_model

    return load_model(model, dtype=dtype, device=device)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    lines = []
    for pid, entry in summary.items():
        lines.append(f"{pid}  ({entry['n_records']} records, chat_template={entry['chat_template']})")
        for name, m in entry["metrics"].items():
            lines.append(f"  {name:<24}{m['mean']:>9.2f}  (n={m['n']})")
        if "score" in entry:
            lines.append(f"  {'score':<24}{entry['score']:>9.2f}")
        if "word_tokenizer" in entry:
            lines.append(f"  word tokenizer: {', '.join(entry['word_tokenizer'])}")
    return "\n".join(lines)


@app.command("eval")
def eval_command(
    model: str = typer.Option(
        ..., "--model", "-m", help="Hub name, local model folder, .gguf file, smollm2-135m, or tiny:<family>."),
    dataset: str = typer.Option(..., "--dataset", "-d",
                                help="CounterFact or ZsRE file (JSON/JSONL) or hub name."),
    kind: str | None = typer.Option(None, "--kind",
                                    help="counterfact|zsre (default: guessed from the file)."),
    suite: str | None = typer.Option(None, "--suite", help="counterfact|zsre|easyedit (default: per kind)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate only the first N records."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid",
                                      help="Skip invalid records instead of failing."),
    zsre_target: str | None = typer.Option(None, "--zsre-target", help="ZsRE edit target: answers0|alt."),
    start: int = typer.Option(0, "--start", min=0, help="First record of the range (sharding)."),
    stop: int | None = typer.Option(None, "--stop", min=0, help="End of the record range (exclusive)."),
    generation: bool = typer.Option(False, "--generation", help="Also run CounterFact generation tests."),
    generation_test_interval: int = typer.Option(1, "--generation-test-interval", min=1),
    snippets: Path | None = typer.Option(None, "--snippets", help="Attribute snippets JSON (consistency)."),
    tfidf_idf: Path | None = typer.Option(None, "--tfidf-idf", help="IDF vector .npy (consistency)."),
    tfidf_vocab: Path | None = typer.Option(None, "--tfidf-vocab", help="TF-IDF vocabulary JSON."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Wrap prompts in the chat template."),
    token_budget: int = typer.Option(8192, "--token-budget", min=1, help="Padded tokens per forward batch."),
    dtype: str = typer.Option("float32", "--dtype"),
    device: str | None = typer.Option(None, "--device"),
    rows_out: Path | None = typer.Option(None, "--rows", help="Also write per-record rows as JSON lines."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Evaluate MODEL on DATASET and print summary metrics (means ×100, fluency in bits, with counts)."""
    from rayedit.evaluate import (
        AttributeSnippets,
        TfidfModel,
        evaluate_records,
        prepare_locality_cache,
        summarize,
    )

    try:
        if kind is None:
            if not Path(dataset).is_file():
                raise CliError(f"dataset file {dataset!r} does not exist (for a hub dataset pass --kind)")
            kind = guess_kind(dataset)
        if kind not in KINDS:
            raise CliError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
        suite_name = suite or DEFAULT_SUITE[kind]
        records = load_records(kind, dataset, limit, skip_invalid, zsre_target)
        if not records:
            raise CliError(f"dataset {dataset!r} has no records")
        consistency: dict[str, Any] = {}
        if snippets or tfidf_idf or tfidf_vocab:
            if not (snippets and tfidf_idf and tfidf_vocab):
                raise CliError("consistency needs all of --snippets, --tfidf-idf and --tfidf-vocab")
            consistency = {"snippets": AttributeSnippets.load(snippets),
                           "tfidf": TfidfModel.load(tfidf_idf, tfidf_vocab)}
        lm = load_lm(model, dtype, device)
        cache = None
        if suite_name == "easyedit":  # an unedited model here: it is its own pre-edit reference
            cache = prepare_locality_cache(lm, records[start:stop], chat_template=chat_template,
                                           token_budget=token_budget)
        rows = evaluate_records(lm, records, suite_name, start=start, stop=stop, chat_template=chat_template,
                                token_budget=token_budget, generation=generation,
                                generation_test_interval=generation_test_interval, locality_cache=cache,
                                **consistency)
        summary = summarize(rows)
    except (CliError, ValueError, OSError, RuntimeError, KeyError) as exc:
        typer.echo(f"error: {_first_line(exc)}", err=True)
        raise typer.Exit(code=2) from None
    if rows_out is not None:
        with rows_out.open("w") as f:
            for row in rows:
                f.write(json.dumps(_json_safe(row)) + "\n")
    if as_json:
        out = {"model": model, "dataset": dataset, "kind": kind, "suite": suite_name,
               "n_records": len(records), "start": start, "stop": stop, "summary": summary}
        typer.echo(json.dumps(_json_safe(out), indent=2))
    else:
        typer.echo(f"model: {model}  dataset: {dataset}  kind: {kind}  suite: {suite_name}")
        typer.echo(format_summary(summary))
