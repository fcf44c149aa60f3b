"""The ``known`` filter stage: before any edit, which facts of a dataset each model already knows.

Computed once per (model weights, records) in a Ray task placed like a replica, cached in the store under
``cache/known/<weights-fingerprint>/<records-digest>.json`` (shared by every campaign on that store), and
frozen per campaign under ``campaigns/<cid>/known/`` so a resume never re-scores and never changes its edits.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from rayedit.runtime.spec import CampaignSpec, SpecError, read_records, streams
from rayedit.store import Store
from rayedit.store.layout import campaign_prefix

log = logging.getLogger(__name__)


def campaign_known_key(cid: str, model_index: int, dataset_index: int) -> str:
    return f"{campaign_prefix(cid)}/known/model{model_index}-dataset{dataset_index}.json"


def _known_task(model: str, dtype: str, store_args: dict[str, Any], records: list[dict[str, Any]],
                attn_implementation: str | None = None) -> dict[str, Any]:
    """On a worker: load the model, score (or reuse the store's cached scores), return the kept ids."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from rayedit.data.requests import EditRequest
    from rayedit.evaluate.known import CRITERION, known_case_ids, records_digest
    from rayedit.runtime.stream import load_lm
    from rayedit.store.uri import reopen_store

    store = reopen_store(store_args)
    reqs = [EditRequest(**r) for r in records]
    lm = load_lm(model, dtype, attn_implementation)
    key = f"cache/known/{lm.fingerprint}/{records_digest(reqs)}.json"
    if store.exists(key):
        return json.loads(store.get_bytes(key)) | {"cached": True}
    t0 = time.perf_counter()
    kept = known_case_ids(lm, reqs)
    out = {"model": model, "model_fingerprint": lm.fingerprint, "criterion": CRITERION, "n_records": len(reqs),
           "n_kept": len(kept), "kept": kept, "seconds": round(time.perf_counter() - t0, 2)}
    store.put_if_absent(key, json.dumps(out).encode())
    return out | {"cached": False}


def run_stage(spec: CampaignSpec, store: Store, base_dir: Path | None, ensure_ray: Any,
              note: Any = print) -> dict[tuple[int, int], set[str]]:
    """Kept case ids per (model index, dataset index) for every dataset with ``known: true``.

    ``ensure_ray`` starts or joins Ray only if something must be computed. A filter that keeps nothing is an
    error naming the dataset and the model, raised before any edit."""
    from rayedit.runtime.spec import request_of

    pairs = sorted({(s.model_index, s.dataset_index) for s in streams(spec) if spec.datasets[s.dataset_index].known})
    out: dict[tuple[int, int], set[str]] = {}
    todo: list[tuple[int, int, list[Any]]] = []
    for mi, di in pairs:
        key = campaign_known_key(spec.campaign_id, mi, di)
        if store.exists(key):
            out[(mi, di)] = set(json.loads(store.get_bytes(key))["kept"])
        else:
            todo.append((mi, di, read_records(spec.datasets[di], base_dir, spec.models[mi].name)))
    if todo:
        import ray

        ensure_ray()
        task = ray.remote(_known_task)
        refs = []
        for mi, _di, recs in todo:
            m = spec.models[mi]
            refs.append(task.options(num_cpus=m.cpus_per_replica, num_gpus=m.gpus_per_replica, max_retries=2)
                        .remote(m.name, m.dtype, store.open_args(), [request_of(r).model_dump() for r in recs],
                                m.attn_implementation))
        for (mi, di, _recs), res in zip(todo, ray.get(refs), strict=True):
            label = f"datasets.{di} ({spec.datasets[di].label}) on models.{mi} ({spec.models[mi].name})"
            if not res["kept"]:
                raise SpecError([f"{label}: known filter kept none of {res['n_records']} records "
                                 f"({res['criterion']}); the model knows none of these facts"])
            store.put_if_absent(campaign_known_key(spec.campaign_id, mi, di), json.dumps(res).encode())
            how = "cached" if res.get("cached") else f"scored in {res['seconds']:.0f}s"
            note(f"known filter: {label} kept {res['n_kept']} of {res['n_records']} records ({how})")
            out[(mi, di)] = set(res["kept"])
    return out


def known_records(model: str, dtype: str, store: Store, records: list[Any], *, label: str,
                  cpus: float = 0.5) -> tuple[list[Any], dict[str, Any]]:
    """The records the unedited model knows, for a locate job (trace/scan) on a ``known: true`` dataset: the
    campaigns' criterion and the store's cache, scored in one Ray task (Ray must be initialised)."""
    import ray

    from rayedit.runtime.spec import request_of

    res = ray.get(ray.remote(_known_task).options(num_cpus=cpus, max_retries=2).remote(
        model, dtype, store.open_args(), [request_of(r).model_dump() for r in records]))
    if not res["kept"]:
        raise SpecError([f"{label} on {model}: known filter kept none of {res['n_records']} records "
                         f"({res['criterion']}); the model knows none of these facts"])
    kept = set(res["kept"])
    return [r for r in records if str(request_of(r).case_id) in kept], res


def known_counts(store: Store, cid: str, model_index: int, dataset_index: int) -> tuple[int, int] | None:
    """(kept, scored) of a campaign's frozen known filter, or None."""
    key = campaign_known_key(cid, model_index, dataset_index)
    if not store.exists(key):
        return None
    res = json.loads(store.get_bytes(key))
    return res["n_kept"], res["n_records"]
