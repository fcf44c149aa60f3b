"""The statistics stage: every (model, layer, corpus, settings) covariance a campaign needs, computed once.

Before any stream edits, the driver asks a replica of each model which statistics are missing from
the store's cache, splits the corpus subset into fixed document ranges (the split depends only on
the document count, never on the number of replicas, so the result is the same on any cluster),
fans the ranges out over the model's replicas and reduces them in range order on one replica. Each
range's partial sum is written to the store before it counts as done, so an interrupted stage resumes
with the ranges it still lacks. Streams then find everything in the cache (``rayedit stats SPEC``
runs only this stage, e.g. ahead of a large campaign).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from rayedit.store import Store

log = logging.getLogger(__name__)

PARTIALS = "cache/stats-partials"
DOCS_PER_SHARD = 1000


@dataclass(frozen=True)
class StatsGroup:
    """One set of statistics settings on one model: the layers that share a corpus pass."""

    model_index: int
    method: str
    hparams: dict[str, Any]
    stats_corpus: str
    layers: tuple[int, ...]
    n_docs: int
    ident: str  # fingerprint + settings digest: names the partial sums in the store

    def ranges(self, per_shard: int = DOCS_PER_SHARD) -> list[tuple[int, int, int]]:
        return [(i, a, min(a + per_shard, self.n_docs)) for i, a in enumerate(range(0, self.n_docs, per_shard))]


def _editor(runner: Any, method: str, hparams: dict[str, Any], stats_corpus: str):
    from rayedit.editing import Editor

    runner._restore_base()  # statistics belong to the base weights
    return Editor(runner.lm, method, hparams, stats_cache=runner.cache, stats_corpus=stats_corpus)


def _covariance_stats(runner: Any, method: str, hparams: dict[str, Any], stats_corpus: str):
    """The CovarianceStats a stream of (method, hparams) would use on this replica's (unedited) model."""
    editor = _editor(runner, method, hparams, stats_corpus)
    return editor, editor.stats


def plan_on_replica(runner: Any, mi: int, method: str, hparams: dict[str, Any],
                    stats_corpus: str) -> StatsGroup | None:
    """Missing statistics of one method variant on this replica's model (None: nothing to compute)."""
    editor = _editor(runner, method, hparams, stats_corpus)
    # a method without second moments (MOSE-OFT, or a handed-in covariance) has no statistics settings at all
    if not editor.solver.needs_stats or getattr(editor.hp, "covariance_file", None):
        return None
    stats = editor.stats
    missing = stats.missing_layers(list(editor.hp.layers))
    if not missing:
        return None
    s = stats.settings
    digest = hashlib.sha256(json.dumps([stats.corpus.identity, s.n_samples, s.seed, s.dtype, s.max_len,
                                        s.max_tokens, s.exclude_bos], sort_keys=True, default=str).encode())
    return StatsGroup(mi, method, dict(hparams), stats_corpus, tuple(sorted(missing)), stats.document_count(),
                      f"{stats.fingerprint}-{digest.hexdigest()[:16]}")


def _partial_key(group: StatsGroup, shard: int) -> str:
    return f"{PARTIALS}/{group.ident}/{'-'.join(map(str, group.layers))}/shard-{shard:05d}.safetensors"


def shard_on_replica(runner: Any, group: StatsGroup, shard: int, start: int, stop: int) -> bool:
    """Compute one document range's partial sums and store them; False if they were already stored."""
    from rayedit.store.formats import encode_tensors

    key = _partial_key(group, shard)
    if runner.store.exists(key):
        return False
    _editor, stats = _covariance_stats(runner, group.method, group.hparams, group.stats_corpus)
    sums, count, docs = stats.compute_shard(list(group.layers), start, stop)
    runner.store.put_bytes(key, encode_tensors({str(layer): t for layer, t in sums.items()},
                                               {"count": str(count), "documents": str(docs)}))
    return True


def reduce_on_replica(runner: Any, group: StatsGroup) -> None:
    """Sum the partials in range order into the statistics cache, then drop the partials."""
    from rayedit.store.formats import decode_tensors

    _editor, stats = _covariance_stats(runner, group.method, group.hparams, group.stats_corpus)
    if not stats.missing_layers(list(group.layers)):  # a retried call (the replica died after reducing)
        return
    shards = []
    for shard, _a, _b in group.ranges():
        key = _partial_key(group, shard)
        tensors, meta = decode_tensors(runner.store.get_bytes(key), key=key)
        shards.append(({int(k): v for k, v in tensors.items()}, int(meta["count"]), int(meta["documents"])))
    stats.store_reduced(list(group.layers), shards)
    for shard, _a, _b in group.ranges():
        runner.store.delete(_partial_key(group, shard))


def run_stage(spec: Any, store: Store, actors: list[tuple[int, Any]], note: Any = None) -> int:
    """Drive the stage over ``actors`` (model index, replica handle); returns the statistics computed."""
    import ray

    from rayedit.runtime.spec import streams

    variants: dict[tuple[int, str, str], tuple[int, str, dict[str, Any]]] = {}
    for s in streams(spec):
        variants.setdefault((s.model_index, s.method, json.dumps(s.hparams, sort_keys=True)),
                            (s.model_index, s.method, s.hparams))
    by_model: dict[int, list[Any]] = {}
    for mi, a in actors:
        by_model.setdefault(mi, []).append(a)
    plans = [by_model[mi][0].stats_plan.remote(mi, method, hp, spec.stats_corpus_for(mi))
             for mi, method, hp in variants.values() if mi in by_model]
    groups: dict[tuple[int, str, tuple[int, ...]], StatsGroup] = {}
    for g in ray.get(plans):
        if g is not None:
            groups.setdefault((g.model_index, g.ident, g.layers), g)
    if not groups:
        return 0
    total = sum(len(g.ranges()) for g in groups.values())
    if note:
        note(f"statistics: {len(groups)} group(s), {total} document range(s) to compute")
    queue = {mi: [(g, sh, a, b) for g in groups.values() if g.model_index == mi for sh, a, b in g.ranges()]
             for mi in by_model}
    pending: dict[Any, tuple[int, Any]] = {}

    def feed(mi: int, actor: Any) -> None:
        if queue[mi]:
            g, sh, a, b = queue[mi].pop(0)
            pending[actor.stats_shard.remote(g, sh, a, b)] = (mi, actor)

    for mi, replicas in by_model.items():
        for actor in replicas:
            feed(mi, actor)
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        mi, actor = pending.pop(ready[0])
        _computed, node = ray.get(ready[0])
        done += 1
        if note:
            note(f"statistics: range {done}/{total} done on node {node}")
        feed(mi, actor)
    ray.get([by_model[g.model_index][0].stats_reduce.remote(g) for g in groups.values()])
    return sum(len(g.layers) for g in groups.values())
