"""rayedit.store: every behaviour on a local folder and on a real S3 server (moto on loopback)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import struct
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import s3server
import torch
from s3server import S3Server

from rayedit.store import (
    BucketNotFound,
    CorruptStepError,
    InvalidTensorFile,
    KeyNotFound,
    LocalStore,
    StepNotCommitted,
    Store,
    StoreBlobCache,
    StoreError,
    StoreURIError,
    UnsafeKeyError,
    commit_eval_part,
    commit_step,
    committed_steps,
    eval_parts_done,
    layout,
    open_store,
    parse_store_uri,
    read_committed_step,
    safe_key,
    sanitize_id,
)
from rayedit.store.keys import TMP_PREFIX
from rayedit.store.s3 import S3Store
from rayedit.store.uri import redact_uri

# The moto fixtures, made visible to pytest in this module (tests/conftest.py could instead declare
# pytest_plugins = ["s3server"]).
s3_server = s3server.s3_server
s3_env = s3server.s3_env
s3_bucket = s3server.s3_bucket

CID, SID = "camp-1", "gpt2.rome.cf.s0"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same store API on both backends; the S3 store sits under a prefix to test scoping."""
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/runs/root")


def _table(step: int, n: int = 3) -> pa.Table:
    return pa.table(
        {
            "step": pa.array([step] * n, pa.int64()),
            "record": pa.array(list(range(n)), pa.int64()),
            "metric": pa.array([f"m{i}" for i in range(n)]),
            "value": pa.array([step + i / 10 for i in range(n)], pa.float64()),
        }
    )


# --- bytes, listing, scoping ----------------------------------------------------------------------
def test_bytes_roundtrip_overwrite_delete(store: Store) -> None:
    assert not store.exists("a/b.bin")
    with pytest.raises(KeyNotFound) as err:
        store.get_bytes("a/b.bin")
    assert isinstance(err.value, KeyError) and "a/b.bin" in str(err.value)
    with pytest.raises(KeyNotFound):
        store.size("a/b.bin")
    store.put_bytes("a/b.bin", b"\x00one")
    assert store.exists("a/b.bin") and store.get_bytes("a/b.bin") == b"\x00one" and store.size("a/b.bin") == 4
    store.put_bytes("a/b.bin", bytearray(b"two"))  # overwrite, bytes-like accepted
    assert store.get_bytes("a/b.bin") == b"two"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b"" and store.size("empty") == 0
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    store.delete("a/b.bin")  # idempotent, like S3
    assert not store.exists("a")  # a folder is not an object


def test_list_is_recursive_sorted_and_folder_scoped(store: Store) -> None:
    for key in ["x/2", "x/1", "x/sub/3", "xy/4", "top", "x/sub/deeper/5"]:
        store.put_bytes(key, key.encode())
    assert store.list() == sorted(["x/1", "x/2", "x/sub/3", "x/sub/deeper/5", "xy/4", "top"])
    assert store.list("x") == ["x/1", "x/2", "x/sub/3", "x/sub/deeper/5"]  # not "xy/4"
    assert store.list("x/") == store.list("x")
    assert store.list("x/sub") == ["x/sub/3", "x/sub/deeper/5"]
    assert store.list("nope") == [] and store.list("top") == []
    assert store.list_sizes("x/sub") == {"x/sub/3": 7, "x/sub/deeper/5": 14}
    assert store.list_children() == ["top", "x", "xy"]
    assert store.list_children("x") == ["1", "2", "sub"]
    assert store.list_children("missing") == []


def test_list_paginates_on_many_keys(store: Store) -> None:
    if isinstance(store, S3Store):  # force several pages without writing 1000+ objects
        store.client.meta.events.register(
            "before-parameter-build.s3.ListObjectsV2", lambda params, **_: params.update(MaxKeys=7)
        )
    keys = [f"many/{i:03d}" for i in range(30)]
    for k in keys:
        store.put_bytes(k, b"x")
    assert store.list("many") == keys
    assert store.list_children("many") == [k.split("/")[1] for k in keys]


def test_child_is_scoped(store: Store) -> None:
    child = store.child("campaigns/c1/")
    child.put_bytes("spec.yaml", b"a: 1")
    assert store.get_bytes("campaigns/c1/spec.yaml") == b"a: 1"
    assert child.list() == ["spec.yaml"]
    assert child.uri == store.uri.rstrip("/") + "/campaigns/c1"
    grandchild = child.child("deep")
    grandchild.put_bytes("k", b"v")
    assert store.list("campaigns") == ["campaigns/c1/deep/k", "campaigns/c1/spec.yaml"]
    assert type(child) is type(store) and store.child("") is store
    with pytest.raises(UnsafeKeyError):
        store.child("../escape")


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "a//b",
        "a/../b",
        "..",
        "./a",
        "a/.",
        "a\\b",
        "a/b/",
        "tab\there",
        "nul\x00",
        "del\x7f",
        TMP_PREFIX + "x",
        "a/" + "s" * 300,
        "k" * 1100,
    ],
)
def test_unsafe_keys_refused(store: Store, key: str) -> None:
    with pytest.raises(UnsafeKeyError):
        store.put_bytes(key, b"x")
    with pytest.raises(UnsafeKeyError):
        store.get_bytes(key)
    with pytest.raises(UnsafeKeyError):
        store.put_if_absent(key, b"x")
    assert store.list() == []


def test_safe_key_and_sanitize_id() -> None:
    assert safe_key("campaigns/c1/streams/s-1/steps/000001/delta.safetensors").endswith("delta.safetensors")
    with pytest.raises(UnsafeKeyError):
        safe_key(3)  # type: ignore[arg-type]
    assert sanitize_id("gpt2.rome.cf.s0") == "gpt2.rome.cf.s0"  # already safe: unchanged
    a, b = sanitize_id("Run A / v2"), sanitize_id("run-a-v2")
    assert a != b and a.startswith("run-a-v2-") and len(a) == len("run-a-v2-") + 8
    assert sanitize_id("Run A / v2") == a  # deterministic
    assert sanitize_id("Foo") != sanitize_id("foo")  # case-insensitive file systems cannot collide
    for weird in ["..", ".", "", "../../etc", "é", "a" * 200, "x\x00y", ".hidden", TMP_PREFIX]:
        sid = sanitize_id(weird)
        assert sanitize_id(sid) == sid and len(sid) <= 64
        safe_key(sid)
        assert "/" not in sid and not sid.startswith(".")


# --- put_if_absent ------------------------------------------------------------------------------
def test_put_if_absent(store: Store) -> None:
    assert store.put_if_absent("m/COMMITTED", b"first") is True
    assert store.put_if_absent("m/COMMITTED", b"second") is False
    assert store.get_bytes("m/COMMITTED") == b"first"


def test_put_if_absent_race_has_one_winner_per_key(store: Store) -> None:
    n_threads, n_keys = 8, 20
    wins: Counter[str] = Counter()
    winner_payload: dict[str, bytes] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            barrier.wait(timeout=30)
            for i in range(n_keys):
                key = f"race/k{i:02d}/COMMITTED"
                payload = f"thread-{t}-key-{i}".encode()
                if store.put_if_absent(key, payload):
                    with lock:
                        wins[key] += 1
                        winner_payload[key] = payload
        except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    assert len(wins) == n_keys and set(wins.values()) == {1}
    for key, payload in winner_payload.items():
        assert store.get_bytes(key) == payload
    assert len(store.list("race")) == n_keys  # and no temporary files are visible


# --- Parquet and pyarrow.dataset ----------------------------------------------------------------
def test_parquet_roundtrip(store: Store) -> None:
    tbl = _table(7).append_column("blob", pa.array([b"\x00\x01", None, b""], pa.binary()))
    store.write_parquet("t/x.parquet", tbl)
    back = store.read_parquet("t/x.parquet")
    assert back.equals(tbl)
    store.put_bytes("t/bad.parquet", b"not parquet at all")
    with pytest.raises(StoreError, match="not a valid Parquet"):
        store.read_parquet("t/bad.parquet")


def test_dataset_over_committed_steps(store: Store) -> None:
    for step in (1, 2, 3):
        assert commit_step(store, CID, SID, step, {layout.EDITS: _encode(_table(step))}, {"n": step})
    # a half-written step 4: data present, marker missing: must not be read
    store.write_parquet(layout.edits_key(CID, SID, 4), _table(4))
    dset = layout.step_dataset(store, CID, SID)
    got = dset.to_table().sort_by([("step", "ascending"), ("record", "ascending")])
    assert got.column("step").to_pylist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert got.schema.field("step").type == pa.int64()  # a data column, not a hive partition
    filtered = dset.to_table(filter=ds.field("step") == 2)
    assert filtered.num_rows == 3

    # The raw pyarrow interface that readers (DuckDB, pandas, Spark users) build on.
    fs, base = store.pyarrow_filesystem()
    paths = [f"{base}/{layout.edits_key(CID, SID, s)}" for s in committed_steps(store, CID, SID)]
    assert ds.dataset(paths, filesystem=fs, format="parquet").count_rows() == 9
    with fs.open_input_file(paths[0]) as f:  # random-access file (fast path on S3)
        assert f.read(4) == b"PAR1"


def _encode(tbl: pa.Table) -> bytes:
    from rayedit.store.formats import encode_parquet

    return encode_parquet(tbl)


# --- safetensors --------------------------------------------------------------------------------
def test_tensors_roundtrip_bitwise(store: Store) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    tensors = {
        "transformer.h.1.mlp.c_proj.weight": torch.randn(16, 8, generator=g),
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).half(),
        "i64": torch.arange(-5, 5, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0]),
        "transposed": base.t(),  # non-contiguous
        "view_a": base[:3],  # shares storage with view_b
        "view_b": base[3:],
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
    }
    meta = {"method": "rome", "step": "12", "json": json.dumps({"a": [1, 2]})}
    store.write_tensors("t/delta.safetensors", tensors, metadata=meta)
    back, back_meta = store.read_tensors("t/delta.safetensors")
    assert back_meta == meta
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        b = back[name]
        assert b.dtype == t.dtype and b.shape == t.shape, name
        # bitwise, including NaN payloads and -0.0
        assert b.contiguous().view(-1).view(torch.uint8).tolist() == t.contiguous().view(-1).view(torch.uint8).tolist()
    store.write_tensors("t/nometa.safetensors", {"x": torch.ones(2)})
    assert store.read_tensors("t/nometa.safetensors")[1] == {}
    with pytest.raises(TypeError):
        store.write_tensors("t/bad.safetensors", {"x": torch.ones(2)}, metadata={"n": 1})  # type: ignore[dict-item]


class _Boom:
    """Unpickling this would create a file: proof that nothing was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.path),))


def test_pickle_and_garbage_refused_as_tensors(store: Store, tmp_path: Path) -> None:
    canary = tmp_path / "unpickled-canary"
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)  # torch's zip+pickle format
    store.put_bytes("bad/torch.pt", buf.getvalue())
    store.put_bytes("bad/evil.pkl", pickle.dumps({"w": _Boom(str(canary))}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    store.put_bytes("bad/truncated.safetensors", struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    store.put_bytes("bad/huge_header.safetensors", struct.pack("<Q", 2**40) + b"{}")
    store.put_bytes("bad/short", b"\x01")
    store.put_bytes("bad/notjson.safetensors", struct.pack("<Q", 4) + b"\x80\x04K\x01")
    for key in store.list("bad"):
        with pytest.raises(InvalidTensorFile, match="safetensors"):
            store.read_tensors(key)
    assert not canary.exists()


# --- commit protocol ----------------------------------------------------------------------------
def _step_files(step: int, salt: str = "") -> dict[str, bytes]:
    from safetensors.torch import save

    w = torch.full((4, 4), float(step))
    return {
        layout.DELTA: save({"w": w}, metadata={"salt": salt}),
        layout.EDITS: _encode(_table(step)),
    }


def test_commit_step_protocol(store: Store) -> None:
    # data without a marker is invisible
    for name, data in _step_files(1, "crashed").items():
        store.put_bytes(layout.step_object_key(CID, SID, 1, name), data)
    assert committed_steps(store, CID, SID) == []
    with pytest.raises(StepNotCommitted):
        read_committed_step(store, CID, SID, 1)

    # the next writer overwrites the half-written step and commits it
    files = _step_files(1, "good")
    assert commit_step(store, CID, SID, 1, files, {"edits": 10}) is True
    assert committed_steps(store, CID, SID) == [1]
    step = read_committed_step(store, CID, SID, 1)
    assert step.files == files and step.meta == {"edits": 10}
    tensors, meta = step.tensors()
    assert meta == {"salt": "good"} and torch.equal(tensors["w"], torch.full((4, 4), 1.0))
    assert step.table().num_rows == 3
    marker = json.loads(store.get_bytes(layout.step_marker_key(CID, SID, 1)))
    assert marker["objects"][layout.DELTA]["sha256"] == hashlib.sha256(files[layout.DELTA]).hexdigest()
    assert marker["step"] == 1 and marker["campaign"] == CID and marker["stream"] == SID

    # marker present: commit returns False and committed data stays untouched
    before = {k: store.get_bytes(k) for k in store.list(layout.step_prefix(CID, SID, 1))}
    assert commit_step(store, CID, SID, 1, _step_files(1, "late zombie"), {"edits": 99}) is False
    assert {k: store.get_bytes(k) for k in store.list(layout.step_prefix(CID, SID, 1))} == before

    assert commit_step(store, CID, SID, 2, _step_files(2)) is True
    assert committed_steps(store, CID, SID) == [1, 2]
    assert layout.last_committed_step(store, CID, SID) == 2
    assert read_committed_step(store, CID, SID, 2, names=[layout.DELTA]).files.keys() == {layout.DELTA}


def test_concurrent_commits_of_one_step_have_one_winner(store: Store) -> None:
    files = _step_files(3)  # deterministic recomputation: a zombie writer produces the same bytes
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def writer() -> None:
        barrier.wait(timeout=30)
        results.append(commit_step(store, CID, SID, 3, files))

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [False, False, False, True]
    assert committed_steps(store, CID, SID, verify="sha256") == [3]


def test_committed_steps_verify_objects(store: Store) -> None:
    for s in (1, 2, 3):
        commit_step(store, CID, SID, s, _step_files(s))
    store.delete(layout.delta_key(CID, SID, 1))  # lost object
    good = store.get_bytes(layout.edits_key(CID, SID, 2))
    store.put_bytes(layout.edits_key(CID, SID, 2), good + b"x")  # wrong size
    delta3 = bytearray(store.get_bytes(layout.delta_key(CID, SID, 3)))
    delta3[-1] ^= 0xFF  # same size, different bytes
    store.put_bytes(layout.delta_key(CID, SID, 3), bytes(delta3))
    store.put_bytes(layout.step_marker_key(CID, SID, 4), b"{not json")  # garbage marker

    assert committed_steps(store, CID, SID, verify="none") == [1, 2, 3, 4]
    assert committed_steps(store, CID, SID, verify="exists") == [2, 3]
    assert committed_steps(store, CID, SID) == [3]  # size
    assert committed_steps(store, CID, SID, verify="sha256") == []
    assert layout.last_committed_step(store, CID, SID) == 3
    assert layout.last_committed_step(store, CID, SID, verify="sha256") is None
    assert layout.last_committed_step(store, CID, SID, verify="none") == 4
    with pytest.raises(CorruptStepError):
        read_committed_step(store, CID, SID, 3)
    assert read_committed_step(store, CID, SID, 3, verify=False).step == 3


def test_commit_step_validates_before_writing(store: Store) -> None:
    with pytest.raises(UnsafeKeyError):
        commit_step(store, CID, SID, 1, {"COMMITTED": b"x"})
    with pytest.raises(UnsafeKeyError):
        commit_step(store, CID, SID, 1, {"../x": b"x"})
    with pytest.raises(TypeError):
        commit_step(store, CID, SID, 1, {layout.DELTA: b"x"}, {"bad": object()})
    with pytest.raises(UnsafeKeyError):
        commit_step(store, "Not Safe", SID, 1, {layout.DELTA: b"x"})
    with pytest.raises(ValueError):
        commit_step(store, CID, SID, -1, {layout.DELTA: b"x"})
    assert store.list() == []


def test_eval_parts(store: Store) -> None:
    for shard in (0, 2, 1):
        assert commit_eval_part(store, CID, SID, 5, "counterfact", shard, _table(shard), {"records": 3})
    assert commit_eval_part(store, CID, SID, 5, "counterfact", 1, _table(99)) is False
    store.write_parquet(layout.eval_part_key(CID, SID, 5, "counterfact", 3), _table(3))  # no .done
    assert eval_parts_done(store, CID, SID, 5, "counterfact") == [0, 1, 2]
    assert eval_parts_done(store, CID, SID, 5, "zsre") == []
    tbl = layout.eval_dataset(store, CID, SID, 5, "counterfact").to_table()
    assert sorted(set(tbl.column("step").to_pylist())) == [0, 1, 2]


# --- blob cache ---------------------------------------------------------------------------------
def test_store_blob_cache(store: Store) -> None:
    cache = StoreBlobCache(store)
    key = layout.stats_cache_key("fp1234", 3, "corpusabc")
    assert cache.get(key) is None and key not in cache
    cache.put(key, b"cov-bytes")
    assert cache.get(key) == b"cov-bytes" and key in cache
    cache.put(key, b"other")  # first writer wins, no overwrite
    assert cache.get(key) == b"cov-bytes"
    assert store.list("cache") == [layout.stats_key("fp1234", 3, "corpusabc")]

    threads = [threading.Thread(target=cache.put, args=("same/k", b"same")) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert cache.get("same/k") == b"same"
    with pytest.raises(UnsafeKeyError):
        cache.get("../outside")


def test_layout_keys() -> None:
    assert layout.spec_key(CID) == "campaigns/camp-1/spec.yaml"
    assert layout.delta_key(CID, SID, 12) == f"campaigns/camp-1/streams/{SID}/steps/000012/delta.safetensors"
    assert layout.edits_key(CID, SID, 0) == f"campaigns/camp-1/streams/{SID}/steps/000000/edits.parquet"
    assert layout.step_marker_key(CID, SID, 3) == f"campaigns/camp-1/streams/{SID}/steps/000003/COMMITTED"
    assert (
        layout.eval_part_key(CID, SID, 3, "zsre", 7)
        == f"campaigns/camp-1/streams/{SID}/eval/000003/zsre/part-00007.parquet"
    )
    assert layout.eval_done_key(CID, SID, 3, "zsre", 7).endswith("/eval/000003/zsre/part-00007.done")
    assert layout.stats_key("abc123", "transformer.h.3.mlp.c_proj", "c0ffee") == (
        "cache/stats/abc123/transformer.h.3.mlp.c_proj/c0ffee/cov.safetensors"
    )
    with pytest.raises(UnsafeKeyError):
        layout.stats_key("a/b", 1, "c")
    with pytest.raises(UnsafeKeyError, match="sanitize_id"):
        layout.stream_prefix(CID, "Has Spaces")


def test_list_campaigns_and_streams(store: Store) -> None:
    commit_step(store, "c1", "s1", 0, {layout.EDITS: b"x"})
    commit_step(store, "c1", "s2", 0, {layout.EDITS: b"x"})
    store.put_bytes(layout.spec_key("c2"), b"x")
    assert layout.list_campaigns(store) == ["c1", "c2"]
    assert layout.list_streams(store, "c1") == ["s1", "s2"]


def test_store_pickles_as_its_open_arguments(store: Store) -> None:
    store.put_bytes("k", b"v")
    child = store.child("sub")
    child.put_bytes("c", b"w")
    again, again_child = pickle.loads(pickle.dumps((store, child)))
    assert type(again) is type(store) and again.uri == store.uri and again.get_bytes("k") == b"v"
    assert again_child.uri == child.uri and again_child.list() == ["c"]
    assert open_store(**store.open_args()).uri == store.uri


def test_store_layer_does_not_import_ray_or_torch() -> None:
    import subprocess
    import sys

    code = "import sys, rayedit.store; print(sorted(m for m in ('ray', 'torch', 'boto3') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"  # torch only when tensors are touched, boto3 only for s3://


# --- local-only behaviour -----------------------------------------------------------------------
def test_local_symlinks_cannot_escape_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    store = LocalStore(tmp_path / "store")
    root = tmp_path / "store"
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "linkfile").symlink_to(outside / "secret")
    (root / "inside").mkdir()
    (root / "inside" / "real").write_bytes(b"ok")
    (root / "alias").symlink_to(root / "inside" / "real")

    for key in ("linkdir/secret", "linkfile"):
        with pytest.raises(UnsafeKeyError, match="outside"):
            store.get_bytes(key)
        with pytest.raises(UnsafeKeyError):
            store.put_bytes(key, b"overwrite")
        with pytest.raises(UnsafeKeyError):
            store.put_if_absent(key, b"x")
    with pytest.raises(UnsafeKeyError):
        store.put_bytes("linkdir/new", b"x")
    with pytest.raises(UnsafeKeyError):
        store.list("linkdir")
    with pytest.raises(UnsafeKeyError):
        store.child("linkdir")
    assert (outside / "secret").read_bytes() == b"secret" and sorted(os.listdir(outside)) == ["secret"]
    assert store.get_bytes("alias") == b"ok"  # a symlink that stays inside is fine
    assert store.list() == ["alias", "inside/real"]


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_bytes("a/k", b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):  # StoreIOError is an OSError too
        store.put_bytes("a/k", b"new")
    monkeypatch.undo()
    assert store.get_bytes("a/k") == b"old"
    assert os.listdir(tmp_path / "s" / "a") == ["k"]  # temporary file cleaned up
    # a crashed writer's leftover temporary file is not an object
    (tmp_path / "s" / "a" / f"{TMP_PREFIX}deadbeef").write_bytes(b"partial")
    assert store.list() == ["a/k"] and store.list_children("a") == ["k"]
    assert store.put_if_absent("a/j", b"1") and sorted(os.listdir(tmp_path / "s" / "a")) == sorted(
        ["k", "j", f"{TMP_PREFIX}deadbeef"]
    )


def test_local_uri_forms(tmp_path: Path) -> None:
    a = open_store(str(tmp_path / "x"))
    b = open_store((tmp_path / "x").as_uri())
    assert isinstance(a, LocalStore) and a.uri == b.uri == (tmp_path / "x").resolve().as_uri()
    a.put_bytes("k", b"v")
    assert b.get_bytes("k") == b"v"
    fs, base = a.pyarrow_filesystem()
    assert fs.get_file_info(f"{base}/k").size == 1
    with pytest.raises(StoreError):
        open_store(str(tmp_path / "missing"), create=False)


# --- URIs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("gs://bucket/x", "unknown scheme"),
        ("http://host/x", "unknown scheme"),
        ("s3://", "empty bucket"),
        ("s3:///prefix", "empty bucket"),
        ("s3://ab/x", "3 to 63"),
        ("s3://Upper/x", "invalid"),
        ("s3://under_score", "invalid"),
        ("s3://-leading", "invalid"),
        ("s3://a..b", "invalid"),
        ("s3://192.168.1.1", "IP address"),
        ("s3://bucket/a/../b", "'..'"),
        ("s3://bucket/a//b", "empty segment"),
        ("s3://bucket/a?x=1", "query"),
        ("s3://bucket:9000/a", "port"),
        ("s3:bucket/x", "expected s3://"),
        ("file://host/x", "host"),
        ("file://relative", "host"),
        ("/data/../etc", "'..'"),
        ("store/..", "'..'"),
        ("a\nb", "control"),
    ],
)
def test_bad_uris(uri: str, problem: str) -> None:
    with pytest.raises(StoreURIError) as err:
        open_store(uri)
    msg = str(err.value)
    assert problem in msg and "\n" not in msg
    if uri.strip() and "\n" not in uri:
        assert repr(redact_uri(uri)) in msg  # names the URI (query strings are redacted)


def test_uri_credentials_are_refused_and_not_echoed() -> None:
    with pytest.raises(StoreURIError) as err:
        open_store("s3://AKIDSECRET:VERYSECRET@bucket/x")
    assert "VERYSECRET" not in str(err.value) and "AKIDSECRET" not in str(err.value)
    with pytest.raises(StoreURIError) as err:
        open_store("s3://bucket/x?secret_key=VERYSECRET")
    assert "VERYSECRET" not in str(err.value)
    with pytest.raises(StoreURIError) as err:
        open_store("s3://bucket/x", endpoint_url="http://user:VERYSECRET@127.0.0.1:9")
    assert "VERYSECRET" not in str(err.value)


def test_good_uris_parse() -> None:
    loc = parse_store_uri("s3://my-bucket.v2/runs/2024/")
    assert (loc.scheme, loc.bucket, loc.prefix) == ("s3", "my-bucket.v2", "runs/2024")
    assert parse_store_uri("S3://abc").prefix == ""
    assert parse_store_uri("file:///tmp/x%20y").path == "/tmp/x y"
    assert parse_store_uri("./results").path == "./results"


# --- S3-only behaviour --------------------------------------------------------------------------
def test_missing_bucket_is_clear_and_can_be_created(s3_env: S3Server) -> None:
    with pytest.raises(BucketNotFound, match="create_bucket=True"):
        open_store("s3://no-such-bucket-here/x")
    store = open_store("s3://created-by-store/x", create_bucket=True)
    store.put_bytes("k", b"v")
    assert open_store("s3://created-by-store/x").get_bytes("k") == b"v"
    open_store("s3://created-by-store", create_bucket=True)  # already there: fine


def test_unreachable_endpoint_is_a_store_error(s3_env: S3Server) -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreError, match="checking bucket"):
        open_store("s3://abc/x", endpoint_url=f"http://127.0.0.1:{port}", retries=1, connect_timeout=1)


def test_s3_retry_and_endpoint_configuration(s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(f"s3://{s3_bucket}/p", retries=7, retry_mode="adaptive", connect_timeout=3, read_timeout=9)
    assert isinstance(store, S3Store)
    cfg = store.client.meta.config
    assert cfg.retries == {"mode": "adaptive", "total_max_attempts": 7}
    assert (cfg.connect_timeout, cfg.read_timeout) == (3, 9)
    assert store.endpoint_url == s3_env.endpoint_url and store.region == "us-east-1"
    # S3-compatible endpoints: CRC trailers only when an API requires them (MinIO/Ceph compatibility)
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.s3 == {"addressing_style": "path"}

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    store = open_store(f"s3://{s3_bucket}/p")
    assert store.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 4}
    assert store.region == "eu-west-1" and store.client.meta.region_name == "eu-west-1"
    # AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL (AWS SDK rule); an argument wins over both.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint_url)
    assert open_store(f"s3://{s3_bucket}").endpoint_url == s3_env.endpoint_url
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert open_store(f"s3://{s3_bucket}", endpoint_url=s3_env.endpoint_url).endpoint_url == s3_env.endpoint_url
    with pytest.raises(StoreError, match="retry mode"):
        open_store(f"s3://{s3_bucket}", retry_mode="sometimes", endpoint_url=s3_env.endpoint_url)
    with pytest.raises(StoreError, match="profile"):
        open_store(f"s3://{s3_bucket}", profile="no-such-profile", endpoint_url=s3_env.endpoint_url)


def test_s3_multipart_upload(s3_env: S3Server, s3_bucket: str) -> None:
    mb = 1024 * 1024
    store = open_store(f"s3://{s3_bucket}/big", multipart_threshold=5 * mb, multipart_chunksize=5 * mb)
    data = os.urandom(11 * mb)
    store.put_bytes("blob.bin", data)
    head = s3_env.client().head_object(Bucket=s3_bucket, Key="big/blob.bin")
    assert head["ETag"].strip('"').endswith("-3")  # went through multipart
    assert store.get_bytes("blob.bin") == data and store.size("blob.bin") == len(data)


def test_credentials_never_written_or_shown(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    akid, secret, token = "AKIAFAKEFAKE0123XYZ", "sEcReT/fake+KEY/do-not-leak-0123456789", "TOKENfake987"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", akid)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    caplog.set_level(logging.DEBUG, logger="rayedit")
    store = open_store(f"s3://{s3_bucket}/c", create_bucket=True)
    commit_step(store, CID, SID, 1, _step_files(1), {"note": "hi"})
    commit_eval_part(store, CID, SID, 1, "zsre", 0, _table(1))
    StoreBlobCache(store).put("fp/1/h/cov.safetensors", b"c")
    layout.step_dataset(store, CID, SID).to_table()
    fs, base = store.pyarrow_filesystem()
    with pytest.raises(KeyNotFound) as missing:
        store.get_bytes("nope")
    travelling = pickle.dumps(store)  # how Ray would ship it to a worker
    assert pickle.loads(travelling).exists(layout.delta_key(CID, SID, 1))
    shown = [
        travelling.decode("latin-1"),
        repr(store),
        str(store),
        store.uri,
        repr(store.child("x")),
        repr(StoreBlobCache(store)),
        base,
        str(missing.value),
        repr(store._conn),
        caplog.text,
    ]  # noqa: SLF001
    for text in shown:
        for secret_part in (akid, secret, token):
            assert secret_part not in text, text
    client = s3_env.client()
    for obj in client.list_objects_v2(Bucket=s3_bucket)["Contents"]:
        body = client.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
        for secret_part in (akid, secret, token):
            assert secret_part.encode() not in body and secret_part not in obj["Key"]


def test_s3_settings_from_the_environment(s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Timeouts and multipart sizes have RAYEDIT_S3_* variables (workers inherit them); bad values are errors."""
    monkeypatch.setenv("RAYEDIT_S3_READ_TIMEOUT", "7.5")
    monkeypatch.setenv("RAYEDIT_S3_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("RAYEDIT_S3_MULTIPART_THRESHOLD", "1024")
    store = open_store(f"s3://{s3_bucket}/env")
    cfg = store.client.meta.config
    assert (cfg.connect_timeout, cfg.read_timeout) == (2.0, 7.5)
    assert store.open_args()["multipart_threshold"] == 1024  # travels to replicas with the store
    assert open_store(f"s3://{s3_bucket}/env", read_timeout=3).client.meta.config.read_timeout == 3  # argument wins
    store.put_bytes("k", b"z" * 2048)  # above the threshold: a multipart upload of one part
    assert store.get_bytes("k") == b"z" * 2048
    assert store.client.head_object(Bucket=s3_bucket, Key="env/k")["ETag"].strip('"').endswith("-1")
    monkeypatch.setenv("RAYEDIT_S3_READ_TIMEOUT", "soon")
    with pytest.raises(StoreError, match="RAYEDIT_S3_READ_TIMEOUT"):
        open_store(f"s3://{s3_bucket}/env")
    monkeypatch.delenv("RAYEDIT_S3_READ_TIMEOUT")
    with pytest.raises(StoreError, match="smallest part"):
        open_store(f"s3://{s3_bucket}/env", multipart_chunksize=1024)


def test_local_store_os_errors_are_plain_store_errors(tmp_path: Path) -> None:
    from rayedit.store.errors import StoreIOError

    (tmp_path / "file").write_text("in the way")
    with pytest.raises(StoreIOError, match="cannot create the local store folder"):
        LocalStore(tmp_path / "file" / "store")
