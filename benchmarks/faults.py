"""The fault matrix in its full form: N trials per cell, each at a different random point, then a table of
trials survived / run, rows lost and rows duplicated per cell (both must be 0).

    python benchmarks/faults.py --trials 5 [--cells s3-5xx,local-enospc] [--seed 0] [--json out.json]

Each trial runs a small campaign (tiny:llama, memit + alphaedit, 2 streams × 3 steps, evaluation after
every step) as a ``rayedit`` CLI driver on one local Ray cluster started here, with an S3 server (moto)
and a fault-injecting proxy on loopback, injects its fault, runs ``rayedit resume``, and compares every
committed result with one uninterrupted reference run (tests/faults/faultmatrix.py has the cells).
Trials run two at a time by default (``--lanes``); S3 cells take turns on the proxy.
Exit status 1 if any trial did not survive.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "faults"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faultmatrix as fm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5, help="trials per cell (default 5)")
    ap.add_argument("--cells", default="", help=f"comma-separated subset of: {', '.join(fm.CELLS)}")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random fault points")
    ap.add_argument("--json", type=Path, default=None, help="also write every trial as JSON here")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--lanes", type=int, default=2, help="trials run at the same time (default 2)")
    args = ap.parse_args(argv)
    cells = [c for c in args.cells.split(",") if c] or list(fm.CELLS)
    unknown = [c for c in cells if c not in fm.CELLS]
    if unknown:
        ap.error(f"unknown cell(s) {', '.join(unknown)}; known: {', '.join(fm.CELLS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="rayedit-faults-"))
    t0 = time.perf_counter()
    harness = fm.start_harness(work)
    print(f"cluster, S3 server, proxy and reference run ready in {time.perf_counter() - t0:.0f} s ({work})",
          flush=True)

    def report(t: fm.Trial) -> None:
        status = "survived" if t.survived else "FAILED"
        print(f"[{time.perf_counter() - t0:6.0f}s] {t.cell:26s} trial {t.trial}: {status} "
              f"(lost {t.rows_lost}, dup {t.rows_dup}, {t.seconds:.0f} s) {t.fault}", flush=True)
        if t.message:
            print(f"{'':10s}message: {t.message[:200]}", flush=True)
        for p in t.problems:
            print(f"{'':10s}problem: {p[:600]}", flush=True)

    try:
        trials = fm.run_matrix(harness.ctx, cells, args.trials, args.seed, args.lanes, on_trial=report)
    finally:
        harness.stop()
    print()
    print(f"{'cell':26s} {'survived/run':>12s} {'rows lost':>10s} {'rows dup':>9s} {'median s':>9s}")
    ok = True
    for cell in cells:
        ts = [t for t in trials if t.cell == cell]
        if not ts:
            continue
        survived = sum(t.survived for t in ts)
        lost, dup = sum(t.rows_lost for t in ts), sum(t.rows_dup for t in ts)
        secs = sorted(t.seconds for t in ts)[len(ts) // 2]
        ok &= survived == len(ts) and lost == 0 and dup == 0
        print(f"{cell:26s} {f'{survived}/{len(ts)}':>12s} {lost:>10d} {dup:>9d} {secs:>9.0f}")
    total = sum(t.survived for t in trials)
    print(f"\n{total}/{len(trials)} trials survived in {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in asdict(t).items() if not k.startswith("_")}
                                         for t in trials], indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
