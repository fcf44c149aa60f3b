"""What is in a store: frozen specs, campaigns, per-stream progress and summaries (no Ray needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rayedit.runtime.spec import CampaignSpec, SpecError, spec_diff, spec_from_yaml
from rayedit.store import Store, committed_steps
from rayedit.store.layout import list_campaigns, list_streams, spec_key, step_dataset, stream_prefix


class SpecMismatch(RuntimeError):
    """A run/resume whose spec differs from the one frozen in the store."""


def freeze_spec(store: Store, spec: CampaignSpec) -> bool:
    """Write the spec at the first run; refuse (with a unified diff) a different spec later.

    Returns True if this call froze it. ``put_if_absent`` makes two concurrent first runs agree.
    """
    text = spec.frozen_yaml()
    key = spec_key(spec.campaign_id)
    if store.put_if_absent(key, text.encode()):
        return True
    frozen = store.get_bytes(key).decode()
    if frozen != text and _canonical(frozen) != text:
        raise SpecMismatch(f"campaign {spec.campaign_id!r} was started with a different spec; refusing to "
                           f"mix results. Use a new campaign name, or resume with the frozen spec.\n"
                           f"{spec_diff(frozen, text)}")
    return False


def _canonical(frozen: str) -> str | None:
    """The frozen spec re-parsed with today's defaults: a spec frozen before a new optional key existed
    (e.g. ``evaluation``) still matches the same spec today. None if it no longer parses."""
    try:
        return spec_from_yaml(frozen).frozen_yaml()
    except SpecError:
        return None


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


def campaign_summaries(store: Store, cid: str) -> list[StreamSummary]:
    return [stream_summary(store, cid, sid) for sid in list_streams(store, cid)]


# --- run state: what the driver is doing (informational; never part of the commit protocol) -------------
def run_state_key(cid: str) -> str:
    from rayedit.store.layout import campaign_prefix

    return f"{campaign_prefix(cid)}/run.json"


class RunStateWriter:
    """The driver's heartbeat in the store: running / finished / failed / stopped, with planned totals.

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
