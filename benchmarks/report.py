"""Render time and size of `rayedit report` (issue 7 target: the quickstart report in under 10 s).

Measures a fresh process running ``rayedit report`` end to end (imports included), ``--repeats`` times,
and prints the wall time per run, the in-process phase timings and the size of report.html.

Run (after ``rayedit run jobs/quickstart.yaml --store /tmp/report-dev-store``):
    .venv/bin/python benchmarks/report.py --store /tmp/report-dev-store quickstart [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DRIVER = """
import sys, time, json
t0 = time.perf_counter()
from rayedit.report import make_report
rep, where = make_report(sys.argv[1], sys.argv[3:], sys.argv[2])
print(json.dumps({"build": rep.seconds, **rep.timings, "total_in_process": time.perf_counter() - t0,
                  "figures": len(rep.figures)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("campaigns", nargs="+")
    ap.add_argument("--store", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    walls: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / f"r{i}"
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", DRIVER, args.store, str(out), *args.campaigns],
                                  capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - t0)
            size = (out / "report.html").stat().st_size
            total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            print(f"run {i}: {walls[-1]:.2f} s wall (fresh process) {proc.stdout.strip()} "
                  f"report.html {size / 1024:.0f} KiB, all files {total / 1024:.0f} KiB")
    print(f"median {statistics.median(walls):.2f} s, max {max(walls):.2f} s (target < 10 s)")


if __name__ == "__main__":
    main()
