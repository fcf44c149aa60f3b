"""Locating and tuning for new models: causal tracing, layer scans, sweep ranking, presets.

A library layer (no Ray, no boto3, no store): ``trace`` and ``scan`` work on a loaded model and
records, ``sweep`` ranks the configurations of a finished campaign from its rows, ``presets`` reads and
writes preset files. The runtime (``rayedit.runtime.locate``) fans trace and scan shards out over Ray.

Submodules are imported on use: ``sweep`` and ``presets`` are needed by reports, which must not pay
for importing torch.
"""

__all__ = ["presets", "scan", "sweep", "trace"]
