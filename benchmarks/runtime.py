"""Campaign runtime numbers (issue 4): checkpoint size, evaluation scaling over replicas, resume overhead.

1. delta checkpoint size / full model size: measured on the tiny model (a real committed step's
   ``delta.safetensors``), and computed without weights for a Llama-3-8B-shaped config with 5 edited
   layers (each stored tensor's shape mapped from the tiny model's d_model/d_ff to Llama's).
2. evaluation wall time with 2 replicas / with 1 replica on this machine: the same committed steps,
   evaluation parts deleted, then re-run (a resume that only has shards to do).
3. resume overhead: (open from the store + first step) on a fresh replica / a normal step, measured
   in-process on the code the replica actor runs (model load excluded; reported separately).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/runtime.py [--records 48] [--kill-trials N]
``--kill-trials N`` also runs the kill -9 / resume test N times (RAYEDIT_KILL_TRIALS).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = {"mom2_n_samples": 200, "v_num_grad_steps": 4}
# Llama-3-8B: hidden 4096, MLP 14336, 32 layers, vocab 128256, 8 KV heads of 128, bf16 weights
LLAMA = {"d_model": 4096, "d_ff": 14336, "n_layers": 32, "vocab": 128256, "kv_dim": 1024, "bytes": 2}


def counterfact_records(n: int) -> list[dict]:
    countries = ["France", "Italy", "Spain", "Japan", "China", "Norway", "Sweden", "Poland", "Germany", "Egypt"]
    out = []
    for i in range(n):
        true, new = countries[i % 10], countries[(i * 3 + 1) % 10]
        if new == true:
            new = countries[(i + 5) % 10]
        s = f"Town {i}"
        out.append({"case_id": i, "requested_rewrite": {"prompt": "{} is a city in", "subject": s,
                                                        "target_new": {"str": new}, "target_true": {"str": true}},
                    "paraphrase_prompts": [f"Everyone knows that {s} is in", f"The town of {s} lies in"],
                    "neighborhood_prompts": [f"Town {(i + 1) % n} is a city in", f"Town {(i + 2) % n} is in"],
                    "attribute_prompts": [f"People of {new} like"], "generation_prompts": [f"{s} is famous for"]})
    return out


def spec_dict(data: Path, name: str, replicas: int, n: int, evaluation: bool = True) -> dict:
    d = {"name": name, "mode": "sequential_batches",
         "models": [{"name": "tiny:llama", "replicas": replicas}],
         "methods": [{"name": "memit", "hparams": {**FAST, "mom2_update_weight": 100}}],
         "datasets": [{"kind": "counterfact", "path": str(data)}],
         "edits_per_stream": n, "batch_size": n // 2}
    if evaluation:
        # generation (sampling) makes shards compute-bound, as they are on real models
        d["evaluation"] = {"at": "every_step", "suites": ["counterfact", "generation"], "shard_size": max(1, n // 8)}
    return d


# --- 1. checkpoint size --------------------------------------------------------------------------------
def llama_full_bytes() -> int:
    d, f, v, kv = LLAMA["d_model"], LLAMA["d_ff"], LLAMA["vocab"], LLAMA["kv_dim"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
    return (2 * v * d + LLAMA["n_layers"] * per_layer + d) * LLAMA["bytes"]


def delta_sizes(work: Path) -> None:
    import torch

    from rayedit.data.loaders import load_counterfact
    from rayedit.models import build_tiny_model
    from rayedit.runtime.checkpoint import KEYS
    from rayedit.runtime.stream import STATE_PREFIX, StreamJob, StreamRunner
    from rayedit.store import open_store, read_committed_step
    from rayedit.store.formats import encode_tensors
    from rayedit.store.layout import DELTA

    lm = build_tiny_model("llama")
    cfg = lm.model.config
    tiny_d, tiny_f = cfg.hidden_size, cfg.intermediate_size
    full = len(encode_tensors(dict(lm.model.state_dict())))
    recs = load_counterfact(str(work / "cf.json"))
    for method in ("memit", "alphaedit"):
        store = open_store(str(work / f"size-{method}"))
        runner = StreamRunner(lm, store)
        hp = {**FAST, **({"mom2_update_weight": 100} if method == "memit" else {})}
        job = StreamJob("size", "s", "tiny:llama", method, method, hp, "cf", 0, "sequential_batches", 4, 1,
                        "builtin:general", [r.request.model_dump() for r in recs[:8]])
        runner.open(job)
        runner.step()
        runner.step()  # step 1: a steady-state step (constants were written with step 0)
        blob = store.get_bytes(f"campaigns/size/streams/s/steps/000001/{DELTA}")
        keys_key = f"campaigns/size/streams/s/steps/000001/{KEYS}"
        keys_bytes = len(store.get_bytes(keys_key)) if store.exists(keys_key) else 0
        once = sum(store.list_sizes("campaigns/size/streams/s/state").values())
        tensors, _ = read_committed_step(store, "size", "s", 1, [DELTA]).tensors(DELTA)
        w = {k: t for k, t in tensors.items() if not k.startswith(STATE_PREFIX)}
        st = {k: t for k, t in tensors.items() if k.startswith(STATE_PREFIX)}
        layers = len(w)
        print(f"[size] tiny llama ({method}, {layers} edited layers): per step delta.safetensors "
              f"{len(blob) / 1e3:.1f} kB + keys {keys_bytes / 1e3:.1f} kB / full model {full / 1e6:.2f} MB = "
              f"{(len(blob) + keys_bytes) / full:.4f}; once per stream (P, …) {once / 1e3:.1f} kB = {once / full:.4f}")

        def llama_numel(t: torch.Tensor) -> int:
            n = 1
            for dim in t.shape:  # map the tiny model's widths to Llama-3-8B's
                n *= LLAMA["d_ff"] if dim == tiny_f else LLAMA["d_model"] if dim == tiny_d else dim
            return n

        scale = 5 / max(1, layers)  # 5 edited layers
        wbytes = scale * sum(llama_numel(t) * LLAMA["bytes"] for t in w.values())
        sbytes = scale * sum(llama_numel(t) * t.element_size() for t in st.values())
        # C_p as keys: d_ff × batch fp32 per layer, for a batch of 100 edits (the 2,000-edit job's batch)
        kbytes = 5 * LLAMA["d_ff"] * 100 * 4 if keys_bytes else 0
        onebytes = 5 * LLAMA["d_ff"] ** 2 * 4 if once else 0  # P per layer, fp32, written once per stream
        lf = llama_full_bytes()
        print(f"[size] Llama-3-8B-shaped ({method}, 5 layers, bf16 weights): edited weights {wbytes / 1e9:.3f} GB "
              f"/ full {lf / 1e9:.2f} GB = {wbytes / lf:.4f}; per step with editor state (inline "
              f"{sbytes / 1e9:.3f} GB + keys {kbytes / 1e9:.3f} GB at batch 100) = "
              f"{(wbytes + sbytes + kbytes) / lf:.4f}"
              f"; once per stream {onebytes / 1e9:.2f} GB")
        lm = build_tiny_model("llama")  # fresh base for the next method


# --- 2. evaluation scaling --------------------------------------------------------------------------------
def eval_scaling(work: Path, n: int) -> None:
    import ray

    from rayedit.runtime.campaign import execute, init_ray
    from rayedit.runtime.spec import parse_spec
    from rayedit.store import open_store

    init_ray(num_cpus=2)
    times = {}
    for replicas in (1, 2):
        spec = parse_spec(spec_dict(work / "cf.json", f"evalscale{replicas}", replicas, n))
        uri = work / f"eval-{replicas}"
        execute(spec, open_store(str(uri)), base_dir=work, progress=False)  # edits + evaluations (warm-up)
        cid = spec.campaign_id
        for p in uri.glob(f"campaigns/{cid}/streams/*/eval"):
            shutil.rmtree(p)  # only the evaluation shards are missing now
        done: list[float] = []
        t0 = time.perf_counter()
        execute(spec, open_store(str(uri)), base_dir=work, progress=False,
                on_eval_done=lambda s, rows, d=done: d.append(time.perf_counter()))
        t1 = time.perf_counter()
        # steady state: from the first finished shard (every replica loaded and warm) to the last
        k = replicas  # the first shard of each replica pays its warm-up
        steady = (done[-1] - done[k - 1]) / (len(done) - k)
        times[replicas] = (t1 - t0, steady)
        print(f"[eval] {replicas} replica(s): {len(done)} shards of {spec.evaluation.shard_size} records; "
              f"total {t1 - t0:.1f}s (incl. replica start-up), steady state {steady:.2f}s per shard")
    ray.shutdown()
    r_all, r_eval = times[2][0] / times[1][0], times[2][1] / times[1][1]
    print(f"[eval] wall time 2 replicas / 1 replica = {r_eval:.2f} (steady-state evaluation), {r_all:.2f} "
          f"(whole run incl. replica start-up) on {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f})")


# --- 3. resume overhead -------------------------------------------------------------------------------------
def resume_overhead(work: Path) -> None:
    from rayedit.data.loaders import load_counterfact
    from rayedit.runtime.stream import StreamJob, StreamRunner, load_lm
    from rayedit.store import open_store

    recs = load_counterfact(str(work / "cf.json"))[:12]
    store = open_store(str(work / "resume"))
    job = StreamJob("resume", "s", "tiny:llama", "memit", "memit", {**FAST, "mom2_update_weight": 100}, "cf", 0,
                    "sequential_batches", 2, 1, "builtin:general", [r.request.model_dump() for r in recs])
    runner = StreamRunner(load_lm("tiny:llama"), store)
    runner.open(job)
    runner.step()  # step 0 computes the covariance statistics (cached in the store afterwards)
    normal = []
    for _ in range(3):
        t = time.perf_counter()
        runner.step()
        normal.append(time.perf_counter() - t)
    t = time.perf_counter()
    lm = load_lm("tiny:llama")  # what a restarted replica does first (not part of the overhead)
    load = time.perf_counter() - t
    fresh = StreamRunner(lm, store)
    t = time.perf_counter()
    nxt = fresh.open(job)
    opened = time.perf_counter() - t
    fresh.step()
    first = time.perf_counter() - t
    step = statistics.median(normal)
    print(f"[resume] normal step {step:.2f}s (median of 3); after resume (step {nxt}): open {opened:.2f}s + step "
          f"= {first:.2f}s; model load {load:.2f}s (excluded)")
    print(f"[resume] first step after resume / normal step = {first / step:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=48)
    ap.add_argument("--kill-trials", type=int, default=0)
    ap.add_argument("--only-sizes", action="store_true", help="just the checkpoint sizes (no Ray)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rayedit-bench-") as tmp:
        work = Path(tmp)
        (work / "cf.json").write_text(json.dumps(counterfact_records(args.records)))
        (work / "spec.yaml").write_text(yaml.safe_dump(spec_dict(work / "cf.json", "bench", 2, args.records)))
        delta_sizes(work)
        if args.only_sizes:
            return
        resume_overhead(work)
        eval_scaling(work, args.records)
    if args.kill_trials:
        env = dict(os.environ, RAYEDIT_KILL_TRIALS=str(args.kill_trials))
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
                        str(ROOT / "tests" / "test_runtime_eval.py"), "-k", "kill_driver"], env=env, check=False)


if __name__ == "__main__":
    main()
