"""Fault injection for the fault matrix (tests/faults, benchmarks/faults.py): named points in the code
that kill the process or raise an OS error when the environment asks for it.

``RAYEDIT_FAULT`` holds one or more comma-separated rules ``<point>:<n>[:<action>]``: the ``n``-th time
this process reaches ``fault_point(<point>)`` (counting from 1), the action runs:

- ``KILL`` (default): SIGKILL this process (a driver, or a Ray worker running a replica);
- ``PAUSE``: record that the point was reached, then block until someone kills the process (a test
  SIGKILLs the driver while a replica sits, say, between its delta and its marker). Bounded: after
  ``RAYEDIT_FAULT_PAUSE_S`` seconds (default 300) the process SIGKILLs itself, it never goes on;
- an errno name (``ENOSPC``, ``EDQUOT``, ``EIO``, ...): raise that ``OSError`` (disk full and friends).

``RAYEDIT_FAULT_DIR`` (optional) makes each rule fire once across all processes that share the folder
(a replica restarted by Ray inherits the same environment and must not die again) and records every
firing as ``<dir>/<point>.fired`` (JSON: point, n, action, pid, detail) for the test to read.

Named points: ``editing`` (inside a step, before its commit), ``delta-upload`` (a step's delta is
written, its marker not yet), ``marker-write`` (just before a commit marker's conditional put),
``step-committed`` (a step's marker is written, its report not yet returned to the driver),
``eval-shard`` (inside an evaluation shard), ``report`` (while the final report is written),
``local-write`` (half-way through writing a local store object).

With ``RAYEDIT_FAULT`` unset, ``fault_point`` is one global lookup and a return: the rules are parsed
once, at import. This module imports nothing heavy (it is imported by the store and the runtime).
"""

from __future__ import annotations

import errno as _errno
import json
import os
import signal
import time
from dataclasses import dataclass

FAULT_ENV = "RAYEDIT_FAULT"
FAULT_DIR_ENV = "RAYEDIT_FAULT_DIR"
PAUSE_ENV = "RAYEDIT_FAULT_PAUSE_S"
POINTS = ("editing", "delta-upload", "marker-write", "step-committed", "eval-shard", "report", "local-write")
KILL, PAUSE = "KILL", "PAUSE"


class FaultSpecError(ValueError):
    """``RAYEDIT_FAULT`` does not parse (a typo must not silently disable a fault test)."""


@dataclass(frozen=True)
class FaultRule:
    point: str
    n: int
    action: str = KILL  # KILL, PAUSE or an errno name


def parse_faults(text: str | None) -> dict[str, FaultRule]:
    """Rules by point from a ``RAYEDIT_FAULT`` value; empty for None/''."""
    rules: dict[str, FaultRule] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise FaultSpecError(f"{FAULT_ENV}: {item!r} is not <point>:<n>[:<action>]")
        point, n_text = parts[0], parts[1]
        action = parts[2].upper() if len(parts) == 3 else KILL
        if point not in POINTS:
            raise FaultSpecError(f"{FAULT_ENV}: unknown point {point!r} (known: {', '.join(POINTS)})")
        if not n_text.isdigit() or int(n_text) < 1:
            raise FaultSpecError(f"{FAULT_ENV}: {item!r}: n must be an integer >= 1")
        if action not in (KILL, PAUSE) and not isinstance(getattr(_errno, action, None), int):
            raise FaultSpecError(f"{FAULT_ENV}: {item!r}: action must be KILL, PAUSE or an errno name like ENOSPC")
        if point in rules:
            raise FaultSpecError(f"{FAULT_ENV}: point {point!r} given twice")
        rules[point] = FaultRule(point, int(n_text), action)
    return rules


_RULES: dict[str, FaultRule] | None = None
_COUNTS: dict[str, int] = {}


def configure(text: str | None = None) -> None:
    """(Re)read the rules from ``text`` or, if None, from the environment; resets the counters."""
    global _RULES
    rules = parse_faults(os.environ.get(FAULT_ENV) if text is None else text)
    _RULES = rules or None
    _COUNTS.clear()


def fault_point(name: str, detail: str = "") -> None:
    """A named point where a configured fault fires (see the module docstring); a no-op otherwise."""
    if _RULES is None:
        return
    rule = _RULES.get(name)
    if rule is None:
        return
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if _COUNTS[name] != rule.n or not _claim(rule, detail):
        return
    if rule.action == KILL:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is asynchronous only in theory; never return into the caller
    elif rule.action == PAUSE:
        deadline = time.monotonic() + float(os.environ.get(PAUSE_ENV, "300") or 300)
        while time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    code = getattr(_errno, rule.action)
    raise OSError(code, f"{os.strerror(code)} (injected at fault point {name!r})", detail or None)


def _claim(rule: FaultRule, detail: str) -> bool:
    """With ``RAYEDIT_FAULT_DIR``: the first process to get here claims the fault (once) and records it."""
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        return True
    path = os.path.join(folder, f"{rule.point}.fired")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    record = {"point": rule.point, "n": rule.n, "action": rule.action, "pid": os.getpid(), "detail": detail,
              "time": time.time()}
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())  # the record must survive the SIGKILL that follows
    return True


def fired(folder: str | os.PathLike[str], point: str) -> dict | None:
    """The record of a fired point in ``folder`` (None if it has not fired, or is being written)."""
    try:
        with open(os.path.join(os.fspath(folder), f"{point}.fired")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


configure()
