"""What is in a store: frozen specs, campaigns, per-stream progress and summaries (no Ray needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rayedit.runtime.spec import CampaignSpec, SpecError, pin_files, spec_diff, spec_from_yaml
from rayedit.store import Store, committed_steps
from rayedit.store.layout import list_campaigns, list_streams, spec_key, step_dataset, stream_prefix


class SpecMismatch(RuntimeError):
    """A run/resume whose spec differs from the one frozen in the store."""


def freeze(store: Store, spec: CampaignSpec, base_dir: Path | None = None) -> tuple[CampaignSpec, bool]:
    """Write the spec at the first run; refuse (with a unified diff) a different spec later.

    The spec is frozen with its input files pinned (absolute paths, size and sha256: ``pin_files``) and its
    stream ids. Returns (the spec to run, whether this call froze it): a campaign keeps the stream ids it was
    frozen with, and a data file that moved but kept its content is the same campaign. A file whose content
    changed is one problem line naming its key path. ``put_if_absent`` makes two concurrent first runs agree.
    """
    pinned = pin_files(spec, base_dir)
    text = pinned.frozen_yaml()
    key = spec_key(spec.campaign_id)
    if store.put_if_absent(key, text.encode()):
        return pinned, True
    frozen_text = store.get_bytes(key).decode()
    if frozen_text == text:
        return pinned, False
    try:
        # written by older code: its input paths were relative (pinned here as this run finds them)
        frozen = spec_from_yaml(frozen_text)
        frozen = frozen if frozen.files is not None else pin_files(frozen, base_dir)
    except SpecError:
        frozen = None
    if frozen is not None:
        runnable, comparable, problems = _as_frozen(pinned, frozen)
        if problems:
            raise SpecError(problems)
        if comparable.frozen_yaml() == frozen.frozen_yaml():
            return runnable, False
    raise SpecMismatch(f"campaign {spec.campaign_id!r} was started with a different spec; refusing to "
                       f"mix results. Use a new campaign name, or resume with the frozen spec.\n"
                       f"{spec_diff(frozen_text, text)}")


def _as_frozen(spec: CampaignSpec, frozen: CampaignSpec) -> tuple[CampaignSpec, CampaignSpec, list[str]]:
    """(spec to run, spec to compare, problems). The spec to run keeps the frozen stream ids (same number of
    streams); the spec to compare also takes the recorded path and identity of each input file whose content is
    the same (a moved file). A file with another content is a problem."""
    from rayedit.runtime.spec import _get, _set, file_fields

    problems = []
    data = spec.model_dump(mode="json")
    fdata = frozen.model_dump(mode="json")
    if frozen.stream_ids is not None and spec.stream_ids is not None and len(frozen.stream_ids) == len(spec.stream_ids):
        data["stream_ids"] = list(frozen.stream_ids)
    runnable = CampaignSpec.model_validate(data)
    ours, theirs = dict(spec.files or {}), dict(frozen.files or {})
    for key, loc, _hashed in file_fields(data):
        a, b = ours.get(key), theirs.get(key)
        if a is None or b is None:
            continue
        if (a.sha256, a.size) != (b.sha256, b.size):
            problems.append(f"{key}: {a.path} is not the file the campaign was frozen with: {a.describe()} now, "
                            f"{b.describe()} then ({b.path}); restore it, or start a new campaign (another name)")
            continue
        try:
            _set(data, loc, _get(fdata, loc))
        except (KeyError, IndexError, TypeError):
            continue
        data["files"][key] = b.model_dump()
    return runnable, CampaignSpec.model_validate(data), problems


def freeze_spec(store: Store, spec: CampaignSpec, base_dir: Path | None = None) -> bool:
    """``freeze``: True if this call froze the spec."""
    return freeze(store, spec, base_dir)[1]


def read_frozen_spec(store: Store, cid: str) -> CampaignSpec:
    key = spec_key(cid)
    if not store.exists(key):
        raise SpecError([f"<root>: no campaign {cid!r} in {store.uri}"])
    return spec_from_yaml(store.get_bytes(key).decode(), f"{store.uri}/{key}")


def campaigns(store: Store) -> list[str]:
    return list_campaigns(store)


@dataclass
class StreamSummary:
    sid: str
    steps_committed: int
    last_step: int | None
    edits: int
    mean_target_nll: float | None
    seconds: float
    eval_parts: int = 0  # committed evaluation parts (all steps and suites)


def eval_parts_count(store: Store, cid: str, sid: str) -> int:
    """Committed evaluation parts of a stream: one listing, counting ``.done`` markers."""
    prefix = f"{stream_prefix(cid, sid)}/eval"
    return sum(1 for k in store.list_sizes(prefix) if k.endswith(".done"))


def stream_summary(store: Store, cid: str, sid: str) -> StreamSummary:
    steps = committed_steps(store, cid, sid)
    if not steps:
        return StreamSummary(sid, 0, None, 0, None, 0.0, eval_parts_count(store, cid, sid))
    tbl = step_dataset(store, cid, sid, steps=steps).to_table()
    nll = [x for x in tbl.column("target_nll").to_pylist() if x is not None] if "target_nll" in tbl.column_names \
        else []
    nll = [x for x in nll if not math.isnan(x)]
    # 'seconds' is per batch, repeated on each row of the batch: count each batch once
    secs = {}
    for b, s in zip(tbl.column("batch").to_pylist(), tbl.column("seconds").to_pylist(), strict=True):
        secs[b] = s
    return StreamSummary(sid, len(steps), steps[-1], tbl.num_rows, sum(nll) / len(nll) if nll else None,
                         float(sum(secs.values())), eval_parts_count(store, cid, sid))


def campaign_stream_ids(store: Store, cid: str) -> list[str]:
    """Every stream of a campaign: the frozen spec's, started or not, in spec order; then any other stream the
    store holds (the unedited model's audit streams, streams of a spec this code no longer parses)."""
    try:
        from rayedit.runtime.spec import streams

        ids = [s.sid for s in streams(read_frozen_spec(store, cid))]
    except (SpecError, ValueError) as exc:
        import logging

        logging.getLogger(__name__).debug("%s: streams not read from the frozen spec: %s", cid, exc)
        ids = []
    return ids + [sid for sid in list_streams(store, cid) if sid not in ids]


def campaign_summaries(store: Store, cid: str, sids: list[str] | None = None) -> list[StreamSummary]:
    """Per stream what is committed. ``sids`` (default: ``campaign_stream_ids``) lists streams first, started or
    not; streams the store also holds follow."""
    present = list_streams(store, cid)
    if sids is None:
        order = campaign_stream_ids(store, cid)
    else:
        order = list(sids) + [sid for sid in present if sid not in sids]
    have = set(present)
    return [stream_summary(store, cid, sid) if sid in have else StreamSummary(sid, 0, None, 0, None, 0.0)
            for sid in order]


def planned_totals(spec: CampaignSpec | None, state: dict | None) -> dict[str, dict[str, int]]:
    """Per stream: planned steps, edits and evaluation parts (the run state's, completed from the spec)."""
    out: dict[str, dict[str, int]] = {sid: dict(p) for sid, p in ((state or {}).get("planned") or {}).items()}
    if spec is not None:
        from rayedit.runtime.spec import streams

        try:
            sids = [s.sid for s in streams(spec)]
        except SpecError:
            sids = []
        for sid in sids:
            p = out.setdefault(sid, {})
            p.setdefault("steps", spec.steps_per_stream())
            p.setdefault("edits", spec.edits_per_stream)
    return out


def stream_state(row: StreamSummary, planned: dict[str, int] | None, run_state: str | None,
                 stopped_by_health: bool = False) -> str:
    """A stream's state for ``rayedit status``: finished, not started, stopped by its health policy, or (part
    done) what its campaign's driver last reported: running, interrupted, failed (else: incomplete)."""
    steps = (planned or {}).get("steps")
    if steps is not None and row.steps_committed >= steps:
        return "finished"
    if stopped_by_health:
        return "stopped (health)"
    if row.steps_committed == 0:
        return "waiting" if run_state == "running" else "not started"
    return {"running": "running", "interrupted": "interrupted", "stopped": "interrupted",
            "failed": "failed"}.get(run_state or "", "incomplete")


# --- run state: what the driver is doing (informational; never part of the commit protocol) -------------
def run_state_key(cid: str) -> str:
    from rayedit.store.layout import campaign_prefix

    return f"{campaign_prefix(cid)}/run.json"


class RunStateWriter:
    """The driver's heartbeat in the store: running / finished / failed / interrupted, with planned totals.

    ``rayedit status`` reads it to say whether a campaign is running, done or failed (and why) — the
    committed markers alone cannot tell a running campaign from a dead driver. Writes are throttled
    (one object overwrite per ``every_s`` at most) except state changes, which are written at once.
    """

    def __init__(self, store: Store, cid: str, planned: dict[str, dict[str, int]], every_s: float = 5.0) -> None:
        import os
        import socket
        import time

        self.store, self.cid, self.every_s = store, cid, every_s
        self.doc: dict = {"state": "running", "started": time.time(), "updated": time.time(),
                          "host": socket.gethostname(), "pid": os.getpid(), "planned": planned, "error": None,
                          "health": {}}
        self._last = 0.0
        self.write(force=True)

    def write(self, force: bool = False, **changes) -> None:
        import json
        import time

        self.doc.update(changes)
        now = time.time()
        if not force and now - self._last < self.every_s:
            return
        self.doc["updated"] = now
        try:
            self.store.put_bytes(run_state_key(self.cid), json.dumps(self.doc, sort_keys=True).encode())
            self._last = now
        except Exception as exc:  # a heartbeat must never fail the campaign
            import logging

            logging.getLogger(__name__).warning("run state not written: %s", exc)


def read_run_state(store: Store, cid: str) -> dict | None:
    import json

    key = run_state_key(cid)
    if not store.exists(key):
        return None
    try:
        return json.loads(store.get_bytes(key))
    except ValueError:
        return None
