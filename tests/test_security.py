"""Standing security and layering checks: no unpickling, no Ray/boto3 below the runtime, no leaked secrets."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "rayedit"
LOW_LAYERS = ("editing", "evaluate", "models", "data", "locate")


def _py_files(base: Path) -> list[Path]:
    return sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_unpickling_anywhere():
    bad = []
    for path in _py_files(PKG):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") for n in names):
                    bad.append(f"{path}:{node.lineno}: imports a pickle library")
            if isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if fn.endswith("torch.load") and kw.get("weights_only") != "True":
                    bad.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
                if fn.endswith(("np.load", "numpy.load")) and kw.get("allow_pickle") == "True":
                    bad.append(f"{path}:{node.lineno}: numpy.load with allow_pickle=True")
                if re.search(r"(^|\.)(pickle|dill|joblib)\.loads?$", fn):
                    bad.append(f"{path}:{node.lineno}: {fn}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", LOW_LAYERS)
def test_low_layers_never_import_ray_or_boto3(layer):
    bad = []
    for path in _py_files(PKG / layer):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                pkg = path.relative_to(ROOT).with_suffix("").parts[:-1]  # e.g. ('rayedit', 'editing')
                base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
                mods = [".".join([*base, node.module] if node.module else base)]
            for m in mods:
                if m.split(".")[0] in ("ray", "boto3", "botocore") or m.startswith(("rayedit.runtime",
                                                                                   "rayedit.store", "rayedit.cli")):
                    bad.append(f"{path}:{node.lineno}: imports {m}")
    assert not bad, "\n".join(bad)


SPEC = """
name: secret-check
mode: sequential_batches
models:
  - name: tiny:gpt2
    replicas: 1
methods:
  - name: memit
    hparams: {{mom2_update_weight: 100, mom2_n_samples: 300}}
datasets:
  - kind: requests
    path: {data}
seeds: [0]
edits_per_stream: 4
batch_size: 2
checkpoint_every: 1
store: {store}
stats_corpus: builtin:general
"""


def test_credentials_from_the_environment_never_reach_store_logs_or_spec(tmp_path):
    secret_id, secret_key, token = "AKIAFAKEFAKE1234ABCD", "fake/Secret+Key0123456789abcdefABCDEF", "FAKETOKENxyz987"
    data = tmp_path / "r.jsonl"
    data.write_text("".join(
        f'{{"case_id": "{i}", "prompt": "The best thing about {{}}", "subject": "Person {i}", '
        f'"target_new": "film", "target_true": "war"}}\n' for i in range(4)))
    store = tmp_path / "store"
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(data=data, store=store))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": secret_id, "AWS_SECRET_ACCESS_KEY": secret_key,
           "AWS_SESSION_TOKEN": token, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, "-m", "rayedit", "run", str(spec)], env=env, capture_output=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    written = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.name == "COMMITTED" for p in written)
    blobs = [("stdout", proc.stdout), ("stderr", proc.stderr)] + [(str(p), p.read_bytes()) for p in written]
    for name, blob in blobs:
        for s in (secret_id, secret_key, token):
            assert s.encode() not in blob, f"{s[:6]}... leaked into {name}"
