"""Editing methods on the toy world (seed 0): the numbers behind issues #3 (item 4) and #5 (items 1-3).

Sequential CounterFact-format edits in batches of 10 with each method's default hyperparameters for the toy
world (``preset:toyworld``), then efficacy / paraphrase / neighbourhood success (``counterfact-prob/v1``) on
every edit made so far, and the refusal rate on the world's held-out harmful requests (greedy continuation
contains the world's refusal sentence). Also: MEMIT with and without ``project: nullspace`` on one batch
(change of preserved-key outputs, √tr(ΔΣΔᵀ) over the statistics corpus).

    OMP_NUM_THREADS=1 python benchmarks/toyworld_methods.py [--n 200] [--json out.json]

One torch thread; about 6-10 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from rayedit.data import load_counterfact, load_malicious  # noqa: E402
from rayedit.data.toyworld import REFUSAL, ensure_toyworld, greedy_continuations  # noqa: E402
from rayedit.editing import Editor, LocalBlobCache  # noqa: E402
from rayedit.evaluate import evaluate_records, summarize  # noqa: E402
from rayedit.models import load_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
METRICS = {"efficacy_success": "eff", "paraphrase_success": "para", "neighborhood_success": "nbhd"}


class Bench:
    """The toy world model, its records and prompt sets, and a copy of the unedited weights."""

    def __init__(self, cache_dir: Path, stats_dir: Path) -> None:
        self.world = ensure_toyworld(seed=0, cache_dir=cache_dir)
        self.lm = load_model(str(self.world.model_dir))
        self.original = {k: v.clone() for k, v in self.lm.model.state_dict().items()}
        self.records = list(load_counterfact(self.world.counterfact))
        self.refusal_queries = [q.prompt for q in load_malicious(self.world.malicious)]
        self.safety = ([q.prompt for q in load_malicious(self.world.malicious_train)],
                       [q.prompt for q in load_malicious(self.world.benign)])
        self.stats_cache = LocalBlobCache(stats_dir)

    def reset(self) -> None:
        self.lm.model.load_state_dict(self.original)

    def editor(self, method: str, hparams: dict | None = None) -> Editor:
        return Editor(self.lm, method, hparams or {}, stats_cache=self.stats_cache,
                      stats_corpus=str(self.world.corpus),
                      safety_prompts=self.safety if method == "same" else None)

    def counterfact(self, n: int) -> dict[str, float]:
        rows = evaluate_records(self.lm, self.records[:n], "counterfact", keep_raw=False)
        means = summarize(rows)["counterfact-prob/v1"]["metrics"]
        return {short: means[name]["mean"] for name, short in METRICS.items()}

    def refusal_rate(self) -> float:
        n_new = len(self.lm.tokenizer(REFUSAL, add_special_tokens=False)["input_ids"]) + 2
        out = greedy_continuations(self.lm.model, self.lm.tokenizer, self.refusal_queries, n_new)
        return 100.0 * sum(REFUSAL in g for g in out) / len(out)

    def stream(self, method: str, checkpoints: list[int], batch: int = 10, hparams: dict | None = None,
               refusal: bool = True) -> dict[int, dict[str, Any]]:
        """Edit ``records[:max(checkpoints)]`` in order; metrics of all edits so far at every checkpoint."""
        self.reset()
        ed = self.editor(method, hparams)
        out: dict[int, dict[str, Any]] = {}
        seconds = 0.0
        for start in range(0, max(checkpoints), batch):
            t0 = time.perf_counter()
            ed.apply([r.request for r in self.records[start:start + batch]])
            seconds += time.perf_counter() - t0
            done = start + batch
            if done in checkpoints:
                row: dict[str, Any] = {"method": method, "n_edits": done, **self.counterfact(done),
                                       "edit_seconds": round(seconds, 1)}
                if refusal:
                    row["refusal"] = self.refusal_rate()
                row["layers"] = ed.hp.layers
                row["provenance"] = ed.hp.provenance
                out[done] = row
        self.reset()
        return out

    def plugin_ratio(self, n: int = 10, hparams: dict | None = None) -> dict[str, Any]:
        """MEMIT vs MEMIT + null-space projection on the same batch: √tr(ΔΣΔᵀ) summed over layers."""
        change, eff = {}, {}
        for project in ("none", "nullspace"):
            self.reset()
            ed = self.editor("memit", {**(hparams or {}), "project": project})
            res = ed.apply([r.request for r in self.records[:n]])
            ad = self.lm.adapter
            total = 0.0
            for layer in ed.hp.layers:
                delta = ad.to_math(res.deltas[ad.weight_name(layer)]).double()
                total += float((delta @ ed.covariance(layer).double() @ delta.T).trace().sqrt())
            change[project] = total
            eff[project] = self.counterfact(n)["eff"]
        self.reset()
        return {"change_none": change["none"], "change_nullspace": change["nullspace"],
                "ratio": change["none"] / change["nullspace"], "eff_none": eff["none"],
                "eff_nullspace": eff["nullspace"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="sequential edits for AlphaEdit and MEMIT")
    ap.add_argument("--n-same", type=int, default=100, help="sequential edits for SAME (and the #5 comparison)")
    ap.add_argument("--cache-dir", default=str(REPO / ".rayedit" / "toyworld-cache"))
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(Path(args.cache_dir), Path(tmp))
        rows: list[dict[str, Any]] = []
        base = {"method": "unedited", "n_edits": 0, **b.counterfact(args.n), "refusal": b.refusal_rate()}
        rows.append(base)
        checkpoints = sorted({args.n_same, args.n})
        for method in ("alphaedit", "memit"):
            rows.extend(b.stream(method, checkpoints).values())
        rows.extend(b.stream("same", [args.n_same]).values())
        for method in ("mose_oft", "mose"):
            rows.extend(b.stream(method, [10], refusal=False).values())
        plugin = b.plugin_ratio()
    print(f"toy world seed 0, batches of 10; unedited refusal rate {base['refusal']:.1f} %")
    print(f"{'method':10s} {'edits':>5s} {'eff':>6s} {'para':>6s} {'nbhd':>6s} {'refusal':>8s} {'edit s':>7s}  hparams")
    for r in rows:
        ref = f"{r['refusal']:8.1f}" if "refusal" in r else f"{'-':>8s}"
        secs = f"{r['edit_seconds']:7.1f}" if "edit_seconds" in r else f"{'-':>7s}"
        hp = f"layers {r['layers']} ({r['provenance']})" if "layers" in r else ""
        scores = f"{r['eff']:6.1f} {r['para']:6.1f} {r['nbhd']:6.1f}"
        print(f"{r['method']:10s} {r['n_edits']:5d} {scores} {ref} {secs}  {hp}")
    print(f"null-space plug-in (MEMIT, batch of 10): preserved-key change {plugin['change_none']:.3f} -> "
          f"{plugin['change_nullspace']:.3f} (ratio {plugin['ratio']:.2f}x); efficacy {plugin['eff_none']:.0f} -> "
          f"{plugin['eff_nullspace']:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "plugin": plugin}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
