"""A corpus of malformed and hostile inputs. Each must end with one clear error line naming the problem,
exit code 2, no traceback, and nothing written (validation happens before any model or store work)."""

from __future__ import annotations

import json
import os
import pickle  # noqa: S403  (used only to *write* a hostile file; rayedit must refuse to read it)
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rayedit.cli import app

GOOD_REQ = {"case_id": "1", "prompt": "The best thing about {}", "subject": "Alice Smith", "target_new": "film",
            "target_true": "war"}


def spec_text(**over: object) -> str:
    import yaml

    spec = {
        "name": "bad-input-case",
        "mode": "sequential_batches",
        "models": [{"name": "tiny:gpt2"}],
        "methods": [{"name": "memit", "hparams": {}}],
        "datasets": [{"kind": "requests", "path": "data.jsonl"}],
        "seeds": [0],
        "edits_per_stream": 2,
        "batch_size": 1,
        "checkpoint_every": 1,
        "store": "store",
    }
    for k, v in over.items():
        if v is None:
            spec.pop(k, None)
        else:
            spec[k] = v
    return yaml.safe_dump(spec)


def records(*recs: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in recs)


def req(**over: object) -> dict:
    r = dict(GOOD_REQ)
    for k, v in over.items():
        if v is None:
            r.pop(k)
        else:
            r[k] = v
    return r


TWO_GOOD = records(req(case_id="1"), req(case_id="2", subject="Bob Jones"))

# (case id, spec YAML text, data JSONL text, regex the error must match)
SPEC_CASES = [
    ("unknown-top-key", spec_text(colour="blue"), TWO_GOOD, r"colour"),
    ("unknown-model-key", spec_text(models=[{"name": "tiny:gpt2", "gpu": 1}]), TWO_GOOD, r"models\.0.*gpu"),
    ("bad-mode", spec_text(mode="parallel"), TWO_GOOD, r"mode"),
    ("missing-models", spec_text(models=None), TWO_GOOD, r"models"),
    ("empty-methods", spec_text(methods=[]), TWO_GOOD, r"methods"),
    ("zero-batch", spec_text(batch_size=0), TWO_GOOD, r"batch_size"),
    ("negative-edits", spec_text(edits_per_stream=-5), TWO_GOOD, r"edits_per_stream"),
    ("string-edits", spec_text(edits_per_stream="many"), TWO_GOOD, r"edits_per_stream"),
    ("unknown-method", spec_text(methods=[{"name": "magic"}]), TWO_GOOD, r"magic"),
    ("nan-lr", spec_text(methods=[{"name": "memit", "hparams": {"v_lr": float("nan")}}]), TWO_GOOD, r"v_lr"),
    ("negative-lr", spec_text(methods=[{"name": "memit", "hparams": {"v_lr": -1}}]), TWO_GOOD, r"v_lr"),
    ("inf-clamp", spec_text(methods=[{"name": "rome", "hparams": {"clamp_norm_factor": float("inf")}}]), TWO_GOOD,
     r"clamp_norm_factor"),
    ("layer-out-of-range", spec_text(methods=[{"name": "memit", "hparams": {"layers": [1, 40]}}]), TWO_GOOD,
     r"layers.*range|out of range"),
    ("negative-layer", spec_text(methods=[{"name": "memit", "hparams": {"layers": [-1]}}]), TWO_GOOD, r"layer"),
    ("unknown-hparam", spec_text(methods=[{"name": "alphaedit", "hparams": {"nullspace_treshold": 0.1}}]),
     TWO_GOOD, r"nullspace_treshold"),
    ("bad-threshold-type", spec_text(methods=[{"name": "alphaedit", "hparams": {"nullspace_threshold": "x"}}]),
     TWO_GOOD, r"nullspace_threshold"),
    ("rome-two-layers", spec_text(methods=[{"name": "rome", "hparams": {"layers": [1, 2]}}]), TWO_GOOD,
     r"one layer|exactly one"),
    ("unknown-tiny-family", spec_text(models=[{"name": "tiny:bloom"}]), TWO_GOOD, r"bloom"),
    ("missing-model-path", spec_text(models=[{"name": "/nonexistent/model/dir"}]), TWO_GOOD,
     r"nonexistent|cannot load|not found"),
    ("missing-data-file", spec_text(datasets=[{"kind": "requests", "path": "nope.jsonl"}]), TWO_GOOD, r"nope\.jsonl"),
    ("unknown-dataset-kind", spec_text(datasets=[{"kind": "mystery", "path": "data.jsonl"}]), TWO_GOOD, r"kind"),
    ("record-missing-prompt", spec_text(), records(req(prompt=None)), r"prompt"),
    ("record-empty-target", spec_text(), records(req(target_new="  ")), r"target_new"),
    ("record-no-slot", spec_text(), records(req(prompt="no slot here")), r"prompt"),
    ("record-two-slots", spec_text(), records(req(prompt="{} and {}")), r"prompt"),
    ("record-subject-empty", spec_text(), records(req(subject="")), r"subject"),
    ("record-duplicate-id", spec_text(), records(req(), req(subject="Bob")), r"duplicate|case_id"),
    ("record-wrong-type", spec_text(), records(req(target_new=7)), r"target_new"),
    ("record-not-object", spec_text(), "[1, 2, 3]\n", r"record 0|object|mapping|dict"),
    ("record-bad-json", spec_text(), '{"case_id": "1", "prompt": \n', r"JSON|json|line 1|record 0"),
    ("too-few-records", spec_text(edits_per_stream=50), TWO_GOOD, r"edits_per_stream|records|only"),
    ("yaml-syntax", "name: [unclosed\n", TWO_GOOD, r"YAML|yaml|parse"),
    ("yaml-not-mapping", "- just\n- a list\n", TWO_GOOD, r"mapping|object|dict"),
    ("empty-spec", "", TWO_GOOD, r"empty|mapping|required|name"),
    ("traversal-name", spec_text(name="../../etc/passwd"), TWO_GOOD, r"name"),
    ("bad-store-scheme", spec_text(store="ftp://host/x"), TWO_GOOD, r"ftp|scheme|store"),
    ("short-bucket", spec_text(store="s3://ab/prefix"), TWO_GOOD, r"bucket|ab"),
    ("store-traversal", spec_text(store="s3://bucket/../x"), TWO_GOOD, r"\.\.|store"),
    ("negative-seed-list", spec_text(seeds=[]), TWO_GOOD, r"seeds"),
    ("float-replicas", spec_text(models=[{"name": "tiny:gpt2", "replicas": 0}]), TWO_GOOD, r"replicas"),
]


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize(("case", "spec", "data", "pattern"), SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_spec_or_data_is_one_clear_error(case, spec, data, pattern, tmp_path, runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(spec)
    (tmp_path / "data.jsonl").write_text(data)
    before = snapshot(tmp_path)
    res = runner.invoke(app, ["validate", "spec.yaml"])
    out = res.output
    assert res.exit_code == 2, f"{case}: exit {res.exit_code}\n{out}"
    assert "Traceback" not in out, out
    assert __import__("re").search(pattern, out), f"{case}: message does not name the problem:\n{out}"
    assert snapshot(tmp_path) == before, f"{case}: validation wrote files"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if case in MULTILINE:
        if len(lines) == 1:
            pytest.fail(f"{case} now ends with one line: take it out of MULTILINE")
        pytest.xfail(f"{case}: {len(lines)} lines; needs {MULTILINE[case]}")
    assert len(lines) == 1, f"{case}: one clear error line expected, got {len(lines)}:\n{res.stderr}"


# Cases whose message is right but spans several lines (a fix outside this corpus is needed).
MULTILINE: dict[str, str] = {}  # case -> the fix it needs; none left


def test_huge_file_with_one_bad_record_at_the_end(tmp_path, runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = [json.dumps(req(case_id=str(i), subject=f"Person {i}")) for i in range(100_000)]
    lines[-1] = json.dumps(req(case_id="last", prompt="no slot"))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "spec.yaml").write_text(spec_text(edits_per_stream=10))
    before = snapshot(tmp_path)
    res = runner.invoke(app, ["validate", "spec.yaml"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "99999" in res.output and "prompt" in res.output, res.output
    assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1, res.stderr
    assert snapshot(tmp_path) == before


EDIT_CASES = [
    ("edit-empty-target", ["--target-new", " "], r"target"),
    ("edit-no-slot", ["--prompt", "no slot"], r"exactly one"),
    ("edit-two-slots", ["--prompt", "{} and {}"], r"exactly one"),
    ("edit-subject-absent", ["--subject", ""], r"subject"),
    ("edit-layer-range", ["--layers", "1,99"], r"out of range"),
    ("edit-unknown-method", ["--method", "magic"], r"unknown method"),
    ("edit-bad-set", ["--set", "novalue"], r"KEY=VALUE"),
    ("edit-unknown-hparam", ["--set", "v_lrr=0.1"], r"v_lrr"),
    ("edit-nan-hparam", ["--set", "v_lr=NaN"], r"v_lr"),
    ("edit-missing-corpus", ["--stats-corpus", "/no/such/corpus.txt"], r"corpus"),
    ("edit-missing-model", ["--model", "/no/such/model"], r"cannot load model"),
]


@pytest.mark.parametrize(("case", "args", "pattern"), EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
def test_bad_edit_arguments(case, args, pattern, tmp_path, runner, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"--model": str(tiny_model_dir), "--prompt": "The best thing about {}", "--subject": "Alice Smith",
            "--target-new": "film", "--method": "memit"}
    extra: list[str] = []
    it = iter(args)
    for a in it:
        if a in base:
            base[a] = next(it)
        else:
            extra += [a, next(it)]
    argv = ["edit"] + [x for kv in base.items() for x in kv] + extra
    before = snapshot(tmp_path)
    res = runner.invoke(app, argv)
    assert res.exit_code == 2, f"{case}: exit {res.exit_code}\n{res.output}"
    assert __import__("re").search(pattern, res.output), res.output
    assert "Traceback" not in res.output
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rayedit.models import save_tiny_model

    return save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny") / "gpt2")


def test_unsupported_architecture_is_named(tmp_path, runner):
    from transformers import BloomConfig, BloomForCausalLM

    from rayedit.models import tiny_tokenizer

    d = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=1024, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    res = runner.invoke(app, ["edit", "--model", str(d), "--prompt", "{} x", "--subject", "A", "--target-new", "y"])
    assert res.exit_code == 2 and "bloom" in res.output and "adapter" in res.output, res.output


def test_pickle_offered_as_tensors_is_refused(tmp_path):
    from rayedit.store import open_store
    from rayedit.store.errors import StoreError

    store = open_store(str(tmp_path / "store"))
    payload = pickle.dumps({"weight": [1.0, 2.0]})
    store.put_bytes("campaigns/x/streams/y/steps/000000/delta.safetensors", payload)
    with pytest.raises(StoreError):
        store.read_tensors("campaigns/x/streams/y/steps/000000/delta.safetensors")


def test_pickle_offered_as_editor_state_is_refused(tmp_path):
    from rayedit.editing import Editor
    from rayedit.models import build_tiny_model

    bad = tmp_path / "state.safetensors"
    bad.write_bytes(pickle.dumps({"cache_c.1": [0.0]}))
    ed = Editor(build_tiny_model("gpt2"), "memit")
    with pytest.raises(Exception) as info:
        ed.load_state(bad)
    assert "pickle" not in type(info.value).__name__.lower()


def test_symlink_escaping_a_local_store_is_refused(tmp_path):
    from rayedit.store import open_store
    from rayedit.store.errors import StoreError

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("x")
    root = tmp_path / "store"
    store = open_store(str(root))
    os.symlink(outside, root / "campaigns")
    with pytest.raises(StoreError):
        store.get_bytes("campaigns/secret.txt")
    with pytest.raises(StoreError):
        store.put_bytes("campaigns/new.txt", b"y")
    assert not (outside / "new.txt").exists()


@pytest.mark.parametrize("key", ["../escape", "/abs/path", "a//b", "a\\b", "a/./b", "a/\x00b"])
def test_unsafe_store_keys_are_refused(key, tmp_path):
    from rayedit.store import open_store
    from rayedit.store.errors import StoreError

    store = open_store(str(tmp_path / "store"))
    with pytest.raises(StoreError):
        store.put_bytes(key, b"x")
    assert not (tmp_path / "escape").exists()
