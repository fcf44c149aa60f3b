"""Hostile inputs: campaign ids with ``../``, symlinks planted in a local store, pickles offered as
checkpoints, weights, state blobs and YAML, credentials in URIs, out-of-range and non-finite
hyperparameters, an alias bomb. Each case asserts that nothing was written outside the campaign's
prefix (nothing at all for refused commands), that no pickle payload ran, and that the command ends
with one clear error line naming the problem.

A case that still printed a traceback (or several lines) would be listed in ``KNOWN`` with the fix it
needs; for it the one-line assertion is a strict expected failure. None is left.
"""

from __future__ import annotations

import json
import os
import pickle  # noqa: S403  (used only to *write* hostile files; rayedit must refuse to read them)
import re
from pathlib import Path

import pytest
import yaml
from test_bad_inputs import TWO_GOOD, spec_text
from typer.testing import CliRunner

from rayedit.cli import app

CID = "bad-input-case"  # sanitize_id of the corpus spec's name
KNOWN: dict[str, str] = {}  # case -> the fix it needs (strict expected failures); none left


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root`` with its bytes (symlinks by target), to diff before/after."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def changed_outside(before: dict, after: dict, allowed_prefix: str | None) -> list[str]:
    """Paths created, changed or removed that are not under ``allowed_prefix`` (None: nothing allowed)."""
    diff = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    return sorted(k for k in diff if allowed_prefix is None or not k.startswith(allowed_prefix))


def error_lines(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.strip()]


def check_one_line(case: str, res, pattern: str) -> None:
    """Exactly one non-empty stderr line, matching ``pattern``, no traceback; or a KNOWN expected failure."""
    lines = error_lines(res)
    ok = (len(lines) == 1 and re.search(pattern, lines[0]) is not None and "Traceback" not in res.stderr
          and (res.exception is None or isinstance(res.exception, SystemExit)))
    if case in KNOWN:
        if ok:
            pytest.fail(f"{case} now ends with one clear line: take it out of KNOWN ({lines})")
        pytest.xfail(f"{case}: needs {KNOWN[case]}")
    assert ok, f"{case}: expected one error line matching {pattern!r}, got {lines or res.exception!r}"


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(spec_text())
    (tmp_path / "data.jsonl").write_text(TWO_GOOD)
    (tmp_path / "store").mkdir()
    return tmp_path


def sentinel_pickle(sentinel: Path) -> bytes:
    """A pickle that creates ``sentinel`` when (unsafely) unpickled."""

    class Boom:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    return pickle.dumps({"weight": Boom()})


# --- campaign ids with ../ ------------------------------------------------------------------------------
ID_CASES = [
    ("status-dotdot", ["status", "../../etc"], r"\.\./\.\./etc"),
    ("status-dot", ["status", ".."], r"'\.\.'"),
    ("report-dotdot", ["report", "../x"], r"\.\./x"),
    ("report-backslash", ["report", "..\\x"], r"x"),
    ("resume-dotdot", ["resume", "../../etc"], r"\.\./\.\./etc"),
    ("resume-slash", ["resume", "a/b"], r"a/b"),
]


@pytest.mark.parametrize(("case", "args", "pattern"), ID_CASES, ids=[c[0] for c in ID_CASES])
def test_campaign_ids_with_traversal(case: str, args: list[str], pattern: str, cwd: Path) -> None:
    before = tree(cwd.parent)
    res = CliRunner().invoke(app, [*args, "--store", "store"])
    assert res.exit_code != 0
    assert changed_outside(before, tree(cwd.parent), None) == [], "a refused campaign id wrote something"
    check_one_line(case, res, pattern)


# --- symlinks planted in a local store ----------------------------------------------------------------
SYMLINK_COMMANDS = {
    "run": ["run", "spec.yaml", "--store", "store"],
    "status": ["status", CID, "--store", "store"],
    "resume": ["resume", CID, "--store", "store"],
    "ls": ["ls", "--store", "store"],
    "report": ["report", CID, "--store", "store"],
}


@pytest.mark.parametrize("command", list(SYMLINK_COMMANDS))
def test_symlinked_campaigns_folder(command: str, cwd: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """``store/campaigns`` is a symlink to a folder outside the store: every command refuses it."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text("do not read")
    os.symlink(outside, cwd / "store" / "campaigns")
    before, before_out = tree(cwd), tree(outside)
    res = CliRunner().invoke(app, SYMLINK_COMMANDS[command])
    assert res.exit_code != 0
    assert tree(outside) == before_out, "something was written through the symlink"
    assert changed_outside(before, tree(cwd), None) == []
    assert "do not read" not in res.stdout + res.stderr
    check_one_line(f"symlinked-campaigns:{command}", res, r"symlink|outside the store")


@pytest.mark.parametrize("command", ["run", "status", "resume"])
def test_symlinked_campaign_folder(command: str, cwd: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """``store/campaigns/<cid>`` is a symlink out of the store (a planted campaign)."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "spec.yaml").write_text(spec_text())
    (cwd / "store" / "campaigns").mkdir()
    os.symlink(outside, cwd / "store" / "campaigns" / CID)
    before, before_out = tree(cwd), tree(outside)
    res = CliRunner().invoke(app, SYMLINK_COMMANDS[command])
    assert res.exit_code != 0
    assert tree(outside) == before_out and changed_outside(before, tree(cwd), None) == []
    check_one_line(f"symlinked-campaign-folder:{command}", res, r"symlink|outside the store")


def test_symlinked_step_object_is_not_committed(cwd: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A committed step whose delta is a symlink to a file outside: never read, never counted."""
    from rayedit.store import StoreError, commit_step, committed_steps, open_store, read_committed_step
    from rayedit.store.layout import delta_key

    store = open_store(str(cwd / "store"))
    assert commit_step(store, CID, "s", 0, {"delta.safetensors": b"x" * 64, "edits.parquet": b"y"})
    outside = tmp_path_factory.mktemp("outside") / "target.bin"
    outside.write_bytes(b"x" * 64)  # same size as the marker says: only the jail stops it
    path = cwd / "store" / delta_key(CID, "s", 0)
    path.unlink()
    os.symlink(outside, path)
    assert committed_steps(store, CID, "s") == []  # the step no longer verifies: resume redoes it
    with pytest.raises(StoreError, match="symlink"):
        read_committed_step(store, CID, "s", 0)


# --- pickles offered as checkpoints, weights, blobs, YAML --------------------------------------------------
def test_pickle_offered_as_a_committed_checkpoint(cwd: Path) -> None:
    """A committed step (marker and sha256 in order) whose delta is a pickle: resuming the stream refuses
    it as 'not a safetensors file' and the pickle never runs."""
    from rayedit.models import build_tiny_model
    from rayedit.runtime.stream import StreamJob, StreamRunner
    from rayedit.store import InvalidTensorFile, commit_step, open_store

    sentinel = cwd / "PWNED"
    store = open_store(str(cwd / "store"))
    req = {"case_id": "1", "prompt": "The best thing about {}", "subject": "Alice Smith", "target_new": " film"}
    job = StreamJob(cid=CID, sid="s", model="tiny:llama", method="memit", method_label="memit",
                    hparams={"layers": [1]}, dataset="d", seed=0, mode="sequential_batches", batch_size=1,
                    checkpoint_every=1, stats_corpus="builtin:general", requests=[req, {**req, "case_id": "2"}])
    before = tree(cwd)
    assert commit_step(store, CID, "s", 0, {"delta.safetensors": sentinel_pickle(sentinel), "edits.parquet": b"p"})
    runner = StreamRunner(build_tiny_model("llama"), store)
    with pytest.raises(InvalidTensorFile, match="safetensors") as info:
        runner.open(job)
    assert "\n" not in str(info.value) and "delta.safetensors" in str(info.value)
    assert not sentinel.exists()
    assert changed_outside(before, tree(cwd), f"store/campaigns/{CID}/") == []


def test_pickle_offered_as_a_state_blob(cwd: Path) -> None:
    import hashlib

    from rayedit.runtime.checkpoint import StateCodec
    from rayedit.store import InvalidTensorFile, open_store

    sentinel = cwd / "PWNED"
    store = open_store(str(cwd / "store"))
    data = sentinel_pickle(sentinel)
    sha = hashlib.sha256(data).hexdigest()
    codec = StateCodec(store, CID, "s")
    store.put_bytes(codec._blob_key(sha), data)  # content-addressed: the hash even matches
    with pytest.raises(InvalidTensorFile):
        codec.get_blob(sha)
    assert not sentinel.exists()


def test_pickle_only_model_folder(cwd: Path) -> None:
    """A model folder whose only weights are a pickle (pytorch_model.bin): refused, payload never runs."""
    from rayedit.models import save_tiny_model

    sentinel = cwd / "PWNED"
    folder = save_tiny_model("gpt2", cwd / "model")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(sentinel_pickle(sentinel))
    before = tree(cwd)
    res = CliRunner().invoke(app, ["edit", "--model", str(folder), "--prompt", "The best thing about {}",
                                   "--subject", "Alice", "--target-new", "film"])
    assert res.exit_code == 2 and not sentinel.exists()
    assert changed_outside(before, tree(cwd), None) == []
    check_one_line("pickle-model-weights", res, r"cannot load model.*safetensors")


def test_pickle_offered_as_npy_idf(cwd: Path) -> None:
    """An object-array .npy (a pickle inside) offered as the TF-IDF vector: numpy refuses to unpickle it."""
    import numpy as np

    from rayedit.evaluate.generation import TfidfModel

    sentinel = cwd / "PWNED"

    class Boom:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    arr = np.empty(1, dtype=object)
    arr[0] = Boom()
    np.save(cwd / "idf.npy", arr, allow_pickle=True)
    (cwd / "vocab.json").write_text('{"a": 0}')
    assert not sentinel.exists()
    with pytest.raises(ValueError, match="allow_pickle"):
        TfidfModel.load(cwd / "idf.npy", cwd / "vocab.json")
    assert not sentinel.exists()


YAML_TAG = "!!python/object/apply:builtins.open ['{path}', 'w']"


def test_python_tag_in_a_spec(cwd: Path) -> None:
    sentinel = cwd / "PWNED"
    (cwd / "spec.yaml").write_text(spec_text() + f"extra: {YAML_TAG.format(path=sentinel)}\n")
    before = tree(cwd)
    res = CliRunner().invoke(app, ["validate", "spec.yaml"])
    assert res.exit_code == 2 and not sentinel.exists()
    assert changed_outside(before, tree(cwd), None) == []
    check_one_line("yaml-python-tag", res, r"YAML")


def test_python_tag_in_an_hparams_file(cwd: Path) -> None:
    from rayedit.models import save_tiny_model

    sentinel = cwd / "PWNED"
    folder = save_tiny_model("gpt2", cwd / "model")
    (cwd / "hp.yaml").write_text(f"v_lr: {YAML_TAG.format(path=sentinel)}\n")
    before = tree(cwd)
    res = CliRunner().invoke(app, ["edit", "--model", str(folder), "--prompt", "The best thing about {}",
                                   "--subject", "Alice", "--target-new", "film", "--hparams", "hp.yaml"])
    assert res.exit_code == 2 and not sentinel.exists()
    assert changed_outside(before, tree(cwd), None) == []
    check_one_line("yaml-python-tag-hparams", res, r"hp\.yaml")


# --- URIs with credentials, hyperparameters, huge and nested inputs ------------------------------------
URI_CASES = [
    ("s3-userinfo", "s3://AKIAHOSTILE:hunter2secret@bucket/x", "hunter2secret", r"credentials"),
    ("s3-query-secret", "s3://bucket/x?aws_secret_access_key=hunter2secret", "hunter2secret", r"query"),
    ("file-host", "file://evil.example/x", "", r"host"),
    ("s3-port", "s3://bucket:9000/x", "", r"port"),
]


@pytest.mark.parametrize(("case", "uri", "secret", "pattern"), URI_CASES, ids=[c[0] for c in URI_CASES])
@pytest.mark.parametrize("where", ["spec", "flag"])
def test_store_uris_are_refused_without_echoing_secrets(case, uri, secret, pattern, where, cwd: Path) -> None:
    if where == "spec":
        (cwd / "spec.yaml").write_text(spec_text(store=uri))
        args = ["validate", "spec.yaml"]
    else:
        args = ["status", CID, "--store", uri]
    before = tree(cwd)
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0
    shown = res.stdout + res.stderr + (repr(res.exception) if not isinstance(res.exception, SystemExit) else "")
    assert not secret or secret not in shown
    assert changed_outside(before, tree(cwd), None) == []
    check_one_line(f"{case}:{where}", res, pattern)


HPARAM_CASES = [
    ("nullspace-energy-nan", "alphaedit", {"nullspace_energy": float("nan")}, r"nullspace_energy"),
    ("key-energy-nan", "same", {"key_energy": float("nan")}, r"key_energy"),
    ("duplicate-layers", "memit", {"layers": [1, 1]}, r"distinct"),
    ("empty-layers", "memit", {"layers": []}, r"layers"),
    ("fractional-layer", "memit", {"layers": [1.5]}, r"layers"),
    ("huge-layer", "memit", {"layers": [10**30]}, r"out of range"),
    ("negative-samples", "memit", {"mom2_n_samples": -5}, r"mom2_n_samples"),
    ("zero-grad-steps", "memit", {"v_num_grad_steps": 0}, r"v_num_grad_steps"),
    ("negative-l2", "alphaedit", {"L2": -1.0}, r"L2"),
    ("inf-update-weight", "memit", {"mom2_update_weight": float("inf")}, r"mom2_update_weight"),
    ("overflow-lr", "memit", {"v_lr": 1e400}, r"v_lr"),
    ("zero-mose-lambda", "mose", {"mose_lambda_rel": 0}, r"mose_lambda_rel"),
    ("negative-norm-constraint", "ft", {"norm_constraint": -0.1}, r"norm_constraint"),
    ("radius-factor-inf", "mose_oft", {"radius_factor": float("inf")}, r"radius_factor"),
    ("bool-layer", "memit", {"layers": [True]}, r"layers"),
]


@pytest.mark.parametrize(("case", "method", "hp", "pattern"), HPARAM_CASES, ids=[c[0] for c in HPARAM_CASES])
def test_out_of_range_hyperparameters(case, method, hp, pattern, cwd: Path) -> None:
    (cwd / "spec.yaml").write_text(spec_text(methods=[{"name": method, "hparams": hp}]))
    before = tree(cwd)
    res = CliRunner().invoke(app, ["validate", "spec.yaml"])
    assert changed_outside(before, tree(cwd), None) == []
    if case in KNOWN and res.exit_code == 0:
        pytest.xfail(f"{case} is accepted: needs {KNOWN[case]}")
    assert res.exit_code == 2, res.stdout
    check_one_line(case, res, pattern)


def _alias_bomb(levels: int) -> str:
    """Nested YAML aliases: ``levels`` levels of 9 references each (9**levels leaves from a few lines)."""
    def level(i: int) -> str:
        if i == 0:
            return "&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"
        return f"&a{i} [{level(i - 1)}, " + ", ".join([f"*a{i - 1}"] * 8) + "]"
    return level(levels - 1)


@pytest.mark.parametrize("where", ["layers", "grid"])
def test_alias_bomb_is_refused_with_a_short_message(where: str, cwd: Path) -> None:
    spec = yaml.safe_load(spec_text())
    spec.pop("methods")
    body = f"hparams: {{layers: {_alias_bomb(5)}}}" if where == "layers" else f"grid: {{v_lr: {_alias_bomb(5)}}}"
    (cwd / "spec.yaml").write_text(yaml.safe_dump(spec) + f"methods:\n  - name: memit\n    {body}\n")
    res = CliRunner().invoke(app, ["validate", "spec.yaml"])
    assert res.exit_code == 2
    case = "alias-bomb-in-grid" if where == "grid" else "alias-bomb-in-layers"
    if len(res.stderr) > 4000 or len(error_lines(res)) != 1:
        if case in KNOWN:
            pytest.xfail(f"{case}: {len(res.stderr)} bytes of error output; needs {KNOWN[case]}")
        pytest.fail(f"{case}: {len(res.stderr)} bytes, {len(error_lines(res))} lines of error output")
    if case in KNOWN:
        pytest.fail(f"{case} now ends with one short line: take it out of KNOWN")


def test_alias_bomb_in_an_hparams_file_is_refused(tmp_path: Path) -> None:
    from rayedit.editing.hparams import load_overrides

    f = tmp_path / "hp.yaml"
    f.write_text(f"layers: {_alias_bomb(6)}\n")  # 9**6 = 531441 values once expanded
    with pytest.raises(ValueError, match=r"hp.yaml: hyperparameters hold more than 10000 values") as err:
        load_overrides(f)
    assert len(str(err.value)) < 300
    f.write_text(f"layers: {_alias_bomb(2)}\n")  # 81 values: an ordinary file still loads
    assert len(load_overrides(f)["layers"]) == 9


def test_huge_file_one_bad_record_at_the_end_names_it_in_one_line(cwd: Path) -> None:
    lines = [json.dumps({"case_id": str(i), "prompt": "The best thing about {}", "subject": f"Person {i}",
                         "target_new": "film"}) for i in range(100_000)]
    lines[-1] = json.dumps({"case_id": "last", "prompt": "no slot", "subject": "X", "target_new": "film"})
    (cwd / "data.jsonl").write_text("\n".join(lines) + "\n")
    (cwd / "spec.yaml").write_text(spec_text(edits_per_stream=10))
    before = tree(cwd)
    res = CliRunner().invoke(app, ["validate", "spec.yaml"])
    assert res.exit_code == 2
    assert changed_outside(before, tree(cwd), None) == []
    check_one_line("huge-file", res, r"99999.*prompt|prompt.*99999")
