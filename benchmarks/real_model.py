"""Every method on a real pre-trained LM (SmolLM2-135M-Instruct), after sequential edits of known facts.

Runs ``jobs/smollm2-counterfact.yaml`` (or a trimmed copy: ``--edits``, ``--methods``, ``--no-audit``) as a real
campaign on local Ray, then prints one row per method at its last evaluated edit count, beside the unedited
model: CounterFact efficacy / paraphrase / neighbourhood success and magnitude, fluency (``--fluency``: the
generation suite), max over edited layers of ‖W_t‖_F/‖W_0‖_F and κ₂(W_t), and from the audit Δ_U and the refusal
rate (headline tables of each audit suite); then checks each of the papers' claims (issue 15) against those numbers
and prints *holds* / *does not hold* with the evidence. Measured on this machine: ~20 s of editing per fact on one
core.

``--fluency-facts N`` measures fluency after the fact on a campaign that did not run the generation suite: each
stream's last committed weights (and the unedited model) generate for the first N edited facts (~1.2 s per fact
and model on one core). ``--refusal-at 10,50,...`` re-runs the audit's safety suite on the committed weights after
those edit counts (~20 s per model), to see when a refusal loss builds up.

    .venv/bin/python benchmarks/real_model.py [--edits 200] [--batch 10] [--methods memit,alphaedit,...]
        [--store runs/bench-real] [--no-audit] [--fluency] [--stats-corpus enwiki-sample] [--stats-tokens N]
        [--report-only] [--fluency-facts N] [--refusal-at 10,50,100,200]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "smollm2-counterfact.yaml"


def build_spec(args: argparse.Namespace) -> dict:
    spec = yaml.safe_load(JOB.read_text())
    spec["name"] = args.name
    spec["edits_per_stream"] = args.edits
    spec["batch_size"] = args.batch
    spec["datasets"][0]["path"] = str((JOB.parent / spec["datasets"][0]["path"]).resolve())
    for m in spec["methods"]:
        if "safety_malicious" in m.get("hparams", {}):
            m["hparams"]["safety_malicious"] = str(JOB.parent / m["hparams"]["safety_malicious"])
    wanted = args.methods.split(",")
    spec["methods"] = [m for m in spec["methods"] if m["name"] in wanted
                       or (m["name"] == "memit" and "memit+nullspace" in wanted)]
    for m in spec["methods"]:
        if m["name"] == "memit":
            pairs = (("none", "memit"), ("nullspace", "memit+nullspace"))
            m["grid"] = {"project": [p for p, w in pairs if w in wanted]}
    at = sorted({c for c in (args.edits // 4, args.edits // 2, args.edits) if c and c % args.batch == 0})
    spec["evaluation"]["at"] = at
    if args.fluency:
        spec["evaluation"]["suites"] = ["counterfact", "generation"]
    if args.no_audit:
        spec.pop("audit", None)
    else:
        spec["audit"]["at"] = [args.edits]
        for s in spec["audit"]["suites"]:
            if s.get("source"):
                s["source"] = str(JOB.parent / s["source"])
    spec["stats_corpus"] = args.stats_corpus
    spec["stats_samples"] = args.stats_samples
    if args.stats_tokens:  # a token budget for the second moments (every method that uses statistics)
        for m in spec["methods"]:
            if m["name"] != "mose_oft":
                m.setdefault("hparams", {})["mom2_max_tokens"] = args.stats_tokens
    return spec


def edit_diagnostics(store, cid: str, sids: list[str]) -> pd.DataFrame:
    """Per stream, the last batch's max over edited layers of weight growth and κ₂ (per-layer list columns of
    the last committed step's edits.parquet: the report loader keeps scalar columns only)."""
    import io

    import pyarrow.parquet as pq

    from rayedit.store.layout import edits_key, last_committed_step

    rows = []
    for sid in sids:
        step = last_committed_step(store, cid, sid)
        if step is None:
            continue
        df = pq.read_table(io.BytesIO(store.get_bytes(edits_key(cid, sid, step)))).to_pandas()
        last = df[df["batch"] == df["batch"].max()].iloc[0]

        def col_max(col: str, last=last) -> float:
            v = last.get(col)
            return float("nan") if v is None else max((float(x) for x in v if x is not None), default=float("nan"))

        rows.append({"method": last["method_label"], "W_growth": col_max("weight_growth_by_layer"),
                     "kappa2": col_max("weight_cond_by_layer")})
    return pd.DataFrame(rows, columns=["method", "W_growth", "kappa2"])


def posthoc_fluency(store, cid: str, sids: list[str], records: list, lm) -> pd.DataFrame:
    """Generation fluency of each stream's last committed weights and of the unedited model on ``records``."""
    from rayedit.evaluate import evaluate_records
    from rayedit.runtime.stream import StreamRunner
    from rayedit.store.layout import last_committed_step

    runner = StreamRunner(lm, store)  # swaps a committed step's tensors in over the pristine ones
    rows = []
    for sid in [None, *sids]:
        step = None if sid is None else last_committed_step(store, cid, sid)
        if sid is not None and step is None:
            continue
        runner.checkout({} if sid is None else runner.step_weights(cid, sid, step))
        t0 = time.perf_counter()
        flu = pd.DataFrame(evaluate_records(lm, records, "generation", keep_raw=False))["fluency"].mean()
        label = "unedited" if sid is None else sid
        rows.append({"stream": label, "fluency_posthoc": flu, "seconds": time.perf_counter() - t0})
        print(f"fluency {label}: {flu:.3f} bits on {len(records)} facts ({rows[-1]['seconds']:.0f} s)", flush=True)
    runner.checkout({})
    return pd.DataFrame(rows)


def stability_change(store, cid: str, sids: list[str], lm) -> pd.DataFrame:
    """Per stream, the largest relative change of ‖W‖_F and κ₂ over the edited matrices of its last committed
    step against the unedited model (MOSE's claim is about these, so they are computed, not read from logs)."""
    from rayedit.editing.diagnostics import matrix_stability
    from rayedit.runtime.stream import StreamRunner
    from rayedit.store.layout import last_committed_step

    runner = StreamRunner(lm, store)
    params = dict(lm.model.named_parameters())
    rows = []
    for sid in sids:
        step = last_committed_step(store, cid, sid)
        if step is None:
            continue
        fro = cond = 0.0
        for name, w in runner.step_weights(cid, sid, step).items():
            before = matrix_stability(lm.adapter.to_math(params[name].detach()))
            after = matrix_stability(lm.adapter.to_math(w))
            fro = max(fro, abs(after["weight_fro"] / before["weight_fro"] - 1))
            cond = max(cond, abs(after["weight_cond"] / before["weight_cond"] - 1))
        rows.append({"stream": sid, "W_rel_change": fro, "kappa2_rel_change": cond})
    return pd.DataFrame(rows, columns=["stream", "W_rel_change", "kappa2_rel_change"])


def refusal_trajectory(store, cid: str, spec: dict, sids: list[str], counts: list[int], lm) -> pd.DataFrame:
    """Refusal rate (100 − URR) of each stream's committed weights after each of ``counts`` edits, with the
    campaign audit's safety settings, beside the unedited model: when a refusal loss builds up."""
    from rayedit.evaluate.audit import audit_records, run_audit_suite
    from rayedit.evaluate.audit.safety import safety_summary
    from rayedit.runtime.stream import StreamRunner
    from rayedit.store import committed_steps

    suite = next((s for s in (spec.get("audit") or {}).get("suites", []) if s["suite"] == "safety"), None)
    if suite is None:
        raise SystemExit("--refusal-at needs a campaign whose audit has the safety suite")
    settings = {k: v for k, v in suite.items() if k != "suite"}
    queries = audit_records("safety", settings)
    runner = StreamRunner(lm, store)
    batch = int(spec["batch_size"])

    def refusal(weights: dict) -> float:
        runner.checkout(weights)
        rows = run_audit_suite("safety", lm.model, lm.tokenizer, queries, settings, keep_raw=False)
        return 100.0 - safety_summary(rows)["all"]["urr"]

    out = [{"stream": "unedited", "edits": 0, "refusal": refusal({})}]
    for sid in sids:
        done = set(committed_steps(store, cid, sid))
        for n in counts:
            step = n // batch - 1  # the step after which n edits were made
            if n % batch or step not in done:
                continue
            out.append({"stream": sid, "edits": n, "refusal": refusal(runner.step_weights(cid, sid, step))})
            print(f"refusal {sid} after {n}: {out[-1]['refusal']:.0f}", flush=True)
    runner.checkout({})
    return pd.DataFrame(out)


def _label(labels, method: str, project: str | None = None) -> str | None:
    """The table label of a method (MEMIT's grid labels carry the projection: memit-project="none")."""
    for lab in labels:
        name = lab.split("-project=")[0]
        if name == method and (project is None or f'project="{project}"' in lab or
                               (project == "none" and "-project=" not in lab)):
            return lab
    return None


def print_claims(table: pd.DataFrame, tabs: dict[str, pd.DataFrame]) -> None:
    """Each claim of the papers (issue 15, item 4) checked against this run's numbers: holds / does not hold."""
    labels = [x for x in table.index if x != "unedited"]
    memit, plugin = _label(labels, "memit", "none"), _label(labels, "memit", "nullspace")
    alpha, same = _label(labels, "alphaedit"), _label(labels, "same")

    def say(claim: str, ok: bool | None, evidence: str) -> None:
        verdict = "not measured" if ok is None else ("HOLDS" if ok else "DOES NOT HOLD")
        print(f"- {claim}: {verdict} ({evidence})")

    print("\nclaims (papers → this run)")
    t = table
    if memit and alpha:
        d_eff = 100 * (t.loc[alpha, "efficacy_success"] - t.loc[memit, "efficacy_success"])
        d_nb = 100 * (t.loc[alpha, "neighborhood_success"] - t.loc[memit, "neighborhood_success"])
        say("AlphaEdit efficacy >= MEMIT + 10, neighbourhood not lower", d_eff >= 10 and d_nb >= 0,
            f"efficacy {d_eff:+.1f} points, neighbourhood {d_nb:+.1f}")
        say("MEMIT's ||W|| grows more than AlphaEdit's", t.loc[memit, "W_growth"] > t.loc[alpha, "W_growth"],
            f"{t.loc[memit, 'W_growth']:.3f} vs {t.loc[alpha, 'W_growth']:.3f}")
    for lab in (x for x in labels if x.startswith("mose")):
        if "W_rel_change" in t:
            fro, cond = t.loc[lab, "W_rel_change"], t.loc[lab, "kappa2_rel_change"]
            say(f"{lab} keeps ||W||_F and kappa2 to 1e-4 relative", bool(fro < 1e-4 and cond < 1e-4),
                f"{fro:.1e} / {cond:.1e}; efficacy {100 * t.loc[lab, 'efficacy_success']:.1f}")
    say("the null-space plug-in changes held-out preserved keys' outputs >= 10x less than MEMIT", None,
        "benchmarks/preserved_keys.py and benchmarks/nullspace_plugin.py measure it")
    unc = tabs.get("uncertainty")
    if unc is not None and "delta_u" in unc:
        edited = unc[~unc["baseline"]]
        last = edited[edited["n_edited"] == edited.groupby("method")["n_edited"].transform("max")]
        by = last.pivot_table(index="method", columns="role", values="delta_u")
        squares = [x for x in (memit, plugin, alpha, same) if x in by.index]
        if squares and "edit" in by:
            say("Delta_U > 0 after sequential edits for every least-squares method",
                bool((by.loc[squares] > 0).all().all()),
                "; ".join(f"{role}: " + " > ".join(f"{m} {v:.3f}" for m, v in by[role].sort_values(
                    ascending=False).items()) for role in by.columns))
    saf = tabs.get("safety")
    if saf is not None and same and memit and alpha:
        allq = saf[saf["category"] == "all"]
        base = allq[allq["baseline"]]["urr"].mean()
        edited = allq[~allq["baseline"]]
        last = edited[edited["n_edited"] == edited.groupby("method")["n_edited"].transform("max")]
        refusal = {m: 100 - u for m, u in zip(last["method"], last["urr"], strict=True)}
        base_ref = 100 - base
        if {same, memit, alpha} <= refusal.keys():
            loss = {m: base_ref - refusal[m] for m in (same, memit, alpha)}
            say("SAME keeps the refusal rate within 5 points of the unedited model where AlphaEdit and MEMIT lose more",
                abs(loss[same]) <= 5 and loss[memit] > 5 and loss[alpha] > 5,
                f"refusal unedited {base_ref:.0f}, " + ", ".join(f"{m} {refusal[m]:.0f}" for m in loss))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=200)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--methods", default="memit,memit+nullspace,alphaedit,mose,mose_oft,same,ft")
    ap.add_argument("--store", default=str(REPO / "runs" / "bench-real"))
    ap.add_argument("--name", default="bench-real")
    ap.add_argument("--stats-corpus", default="enwiki-sample")
    ap.add_argument("--stats-samples", type=int, default=100_000)
    ap.add_argument("--stats-tokens", type=int, default=None, help="token budget of the statistics (default: all)")
    ap.add_argument("--no-audit", action="store_true")
    ap.add_argument("--fluency", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="print the tables of the campaign already in --store (e.g. an interrupted or resumed one)")
    ap.add_argument("--refusal-at", default="",
                    help="comma-separated edit counts: the refusal rate of every stream's committed weights after "
                         "each (the audit's safety settings)")
    ap.add_argument("--fluency-facts", type=int, default=0,
                    help="fluency after the fact: generation on the first N edited facts with each stream's last "
                         "committed weights (for a campaign run without --fluency)")
    args = ap.parse_args()

    from rayedit.data.loaders import load_counterfact
    from rayedit.evaluate import evaluate_records
    from rayedit.models import load_model
    from rayedit.report.audit import audit_tables, headline_table, load_audit
    from rayedit.report.load import load_campaign
    from rayedit.runtime.campaign import run_campaign
    from rayedit.store import open_store

    wall = None
    if not args.report_only:
        spec = build_spec(args)
        spec_path = Path(args.store) / f"{args.name}.yaml"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        t0 = time.perf_counter()
        run_campaign(spec_path, args.store, progress=True, summary=False)
        wall = time.perf_counter() - t0
    store = open_store(args.store)
    camp = load_campaign(store, args.name)
    spec = camp.spec  # the frozen spec: what ran

    ev = camp.evals
    cf = ev[ev["suite"] == "counterfact"]
    last = cf[cf["n_edited"] == cf.groupby("stream")["n_edited"].transform("max")]
    metrics = ["efficacy_success", "paraphrase_success", "neighborhood_success", "efficacy_diff",
               "paraphrase_diff", "neighborhood_diff"]
    table = last.groupby("method_label")[metrics].mean()
    table["n_edited"] = last.groupby("method_label")["n_edited"].max()
    gen = ev[ev["suite"] == "generation"]
    if not gen.empty and "fluency" in gen:
        glast = gen[gen["n_edited"] == gen.groupby("stream")["n_edited"].transform("max")]
        table["fluency"] = glast.groupby("method_label")["fluency"].mean()
    diag = edit_diagnostics(store, args.name, sorted(camp.edits["stream"].unique())).set_index("method")
    table = table.join(diag)

    # the unedited model on the same facts (every stream edits the same known facts in the same order)
    ids = set(camp.edits["case_id"].astype(str))
    recs = [r for r in load_counterfact(spec["datasets"][0]["path"]) if r.case_id in ids]
    lm = load_model("smollm2-135m")
    base = pd.DataFrame(evaluate_records(lm, recs, "counterfact"))[metrics].mean()
    table.loc["unedited", metrics] = base.to_numpy()
    table.loc["unedited", ["W_growth", "kappa2"]] = [1.0, float("nan")]
    sids = sorted(camp.edits["stream"].unique())
    label_of = camp.edits.drop_duplicates("stream").set_index("stream")["method_label"].to_dict()
    if args.fluency_facts:
        one = camp.edits[camp.edits["stream"] == sids[0]].sort_values("batch", kind="stable")
        order = [str(c) for c in one["case_id"]]  # every stream edits the same facts in the same order
        by_id = {r.case_id: r for r in recs}
        flu = posthoc_fluency(store, args.name, sids, [by_id[c] for c in order[:args.fluency_facts]], lm)
        flu["method"] = flu["stream"].map(lambda s: label_of.get(s, s))
        table = table.join(flu.set_index("method")["fluency_posthoc"])
    trajectory = None
    if args.refusal_at:
        counts = [int(x) for x in args.refusal_at.split(",")]
        trajectory = refusal_trajectory(store, args.name, spec, sids, counts, lm)
        trajectory["method"] = trajectory["stream"].map(lambda s: label_of.get(s, s))
    stab = stability_change(store, args.name, sids, lm)
    stab["method"] = stab["stream"].map(label_of)
    table = table.join(stab.set_index("method")[["W_rel_change", "kappa2_rel_change"]])

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    took = f"campaign wall time {wall / 60:.1f} min" if wall is not None else "report of the stored campaign"
    print(f"\nSmolLM2-135M-Instruct (smollm2-135m), up to {spec['edits_per_stream']} sequential edits of known "
          f"CounterFact facts in batches of {spec['batch_size']}; stats {spec.get('stats_corpus')} "
          f"({spec.get('stats_samples')} docs); {dt.date.today()} report at commit {commit}; {took}")
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(table)
        tabs = audit_tables(load_audit(store, args.name)) if spec.get("audit") else {}
        for suite, t in tabs.items():
            print(f"\naudit: {suite}")
            print(headline_table(suite, t))
        if trajectory is not None:
            print("\nrefusal rate (%) after N edits")
            print(trajectory.pivot_table(index="method", columns="edits", values="refusal"))
    print_claims(table, tabs)


if __name__ == "__main__":
    main()
