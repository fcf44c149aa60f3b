"""``rayedit doctor``: check the environment a campaign needs and say what is wrong in plain words.

Checks: library versions; thread settings (OMP_NUM_THREADS); GPU visibility (torch.cuda); Ray (a
cluster at an address is reachable, or a local Ray can be started); a store (write, read back,
conditional write, list, delete a probe object; S3 endpoint/region/credentials from the environment,
whose values are never printed). Every check yields ``ok``, ``warn``, ``fail`` or ``info``; the command
exits non-zero if any check failed.

Ray is probed in a subprocess with a timeout: a wrong address can make ``ray.init`` wait a long time,
and the probe must not leave Ray state (or a started cluster) in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"
PACKAGES = ("torch", "ray", "transformers", "pyarrow", "boto3", "botocore", "safetensors", "pydantic")
MIN_FREE_BYTES = 1 << 30  # below 1 GiB free, a local store is one checkpoint away from "disk full"
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | info
    message: str

    def line(self) -> str:
        return f"{self.status.upper() if self.status == FAIL else self.status:<5} {self.name}: {self.message}"


# --- versions and threads -------------------------------------------------------------------------------
def check_versions() -> list[Check]:
    v = sys.version_info
    out = [Check("python", OK if v >= (3, 10) else FAIL,
                 f"{v.major}.{v.minor}.{v.micro}" + ("" if v >= (3, 10) else " (rayedit needs Python 3.10 or newer)"))]
    found, missing = [], []
    for pkg in PACKAGES:
        try:
            found.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            missing.append(pkg)
    out.append(Check("versions", OK if not missing else FAIL, ", ".join(found) + (
        f"; not installed: {', '.join(missing)} (pip install -e '.[all]' installs them)" if missing else "")))
    return out


def check_threads() -> Check:
    cores = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS")
    if omp is None:
        return Check("threads", WARN, f"OMP_NUM_THREADS is not set: every process (each replica) may start {cores} "
                                      f"threads on {cores} cores; set OMP_NUM_THREADS=1 or cores/replicas")
    if not omp.strip().isdigit() or int(omp) < 1:
        return Check("threads", FAIL, f"OMP_NUM_THREADS={omp!r} is not a positive integer")
    n = int(omp)
    if n > cores:
        return Check("threads", WARN, f"OMP_NUM_THREADS={n} is more than the {cores} cores: threads will fight")
    return Check("threads", OK, f"OMP_NUM_THREADS={n} on {cores} cores")


def check_gpu(require: bool = False) -> Check:
    try:
        import torch
    except ImportError:
        return Check("gpu", FAIL, "torch is not installed")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    built = torch.version.cuda
    if not torch.cuda.is_available():
        why = "torch was built without CUDA (CPU wheel)" if not built else \
            "CUDA_VISIBLE_DEVICES hides every GPU" if visible is not None and not visible.strip() else \
            f"torch {torch.__version__} (CUDA {built}) sees no GPU: check the driver (nvidia-smi)"
        return Check("gpu", FAIL if require else INFO,
                     f"no GPU visible ({why}); CPU only: fine for tiny and toy models, "
                     "specs with gpus_per_replica > 0 will not be scheduled here")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return Check("gpu", OK, f"{len(names)} GPU(s) visible to torch (CUDA {built}): {', '.join(names)}")


# --- Ray ----------------------------------------------------------------------------------------------
_RAY_PROBE = """
import json, os, sys
for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
    os.environ.setdefault(k, v)
import ray
address = sys.argv[1] or None
kw = {"include_dashboard": False, "log_to_driver": False}
ray.init(address=address, **kw) if address else ray.init(num_cpus=1, **kw)
res = ray.cluster_resources()
print(json.dumps({"cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0), "nodes": len(ray.nodes()),
                  "version": ray.__version__}))
ray.shutdown()
"""


def _tcp_reachable(host: str, port: int, timeout: float = 3.0) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _ray_words(err: str, address: str | None) -> str:
    """The gist of a failed Ray probe in plain words."""
    last = next((ln.strip() for ln in reversed(err.splitlines()) if ln.strip()), "no output")
    if "Authentication" in err or "auth token" in err.lower():
        return ("the cluster requires an authentication token that this client does not have: set "
                "RAY_AUTH_TOKEN, or run head and clients with the same RAY_AUTH_MODE")
    if "version" in err.lower() and "mismatch" in err.lower():
        return f"Ray or Python versions differ between this client and the cluster ({last})"
    return f"{'cannot connect to ' + address if address else 'cannot start a local Ray'} ({last[:300]})"


def check_ray(address: str | None = None, timeout: float = 90.0) -> Check:
    """A Ray cluster at ``address`` (HOST:PORT, ``auto``, or a job server ``http://HOST:8265``) answers;
    without an address, a local Ray starts (and is stopped again)."""
    if address and address.startswith(("http://", "https://")):
        return _check_job_server(address, timeout)
    if address and address != "auto" and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        if not port.isdigit() or not host:
            return Check("ray", FAIL, f"address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379), 'auto' or "
                                      "http://HOST:8265")
        problem = _tcp_reachable(host, int(port))
        if problem:
            return Check("ray", FAIL, f"nothing answers at {address} ({problem}): is the head running "
                                      "(`ray start --head`), and is the port open from here?")
    env = dict(os.environ)
    if not address:  # "start a local Ray" must not silently connect to RAY_ADDRESS instead
        env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, "-c", _RAY_PROBE, address or ""], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        what = f"connecting to {address}" if address else "starting a local Ray"
        return Check("ray", FAIL, f"{what} took longer than {timeout:.0f} s")
    if proc.returncode != 0:
        return Check("ray", FAIL, _ray_words(proc.stderr + proc.stdout, address))
    info = _last_json(proc.stdout)
    if info is None:
        return Check("ray", FAIL, f"the Ray probe printed no result ({proc.stdout[-200:]!r})")
    where = f"cluster at {address}" if address else "a local Ray started and stopped"
    return Check("ray", OK, f"{where}: Ray {info['version']}, {info['nodes']} node(s), {info['cpus']:g} CPUs, "
                            f"{info['gpus']:g} GPUs")


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        try:
            out = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(out, dict):
            return out
    return None


def _check_job_server(address: str, timeout: float) -> Check:
    import urllib.error
    import urllib.request

    url = address.rstrip("/") + "/api/version"
    try:
        with urllib.request.urlopen(url, timeout=min(timeout, 15.0)) as resp:  # noqa: S310 - http(s) only
            info = json.loads(resp.read().decode() or "{}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Check("ray", FAIL, f"the Ray job server at {address} does not answer ({reason}): is the dashboard "
                                  "running on the head (port 8265), or a tunnel (`ray dashboard cluster.yaml`) open?")
    return Check("ray", OK, f"job server at {address}: Ray {info.get('ray_version', '?')} (rayedit submit works)")


# --- store ----------------------------------------------------------------------------------------------
def _credential_source() -> str:
    """Where S3 credentials would come from, never their values."""
    if all(os.environ.get(v) for v in CREDENTIAL_VARS[:2]):
        return "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the environment" + (
            " (+ session token)" if os.environ.get("AWS_SESSION_TOKEN") else "")
    if os.environ.get("AWS_PROFILE"):
        return f"profile {os.environ['AWS_PROFILE']!r}"
    if os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") or os.environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        return "a web identity / container role"
    return "boto3's default chain (config files or an instance role)"


def check_store(uri: str) -> list[Check]:
    """Write, read back, conditionally write, list and delete a probe object in the store at ``uri``."""
    from rayedit.store import StoreError, open_store, parse_store_uri
    from rayedit.store.uri import redact_uri

    shown = redact_uri(uri)
    name = f"store {shown}"
    try:
        loc = parse_store_uri(uri)
    except StoreError as exc:
        return [Check(name, FAIL, str(exc))]
    out: list[Check] = []
    created_root: str | None = None
    if loc.scheme == "s3":
        from rayedit.store.s3 import redact_url

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1 (default)"
        out.append(Check("s3 settings", INFO, f"endpoint {redact_url(endpoint) if endpoint else 'AWS'}, region "
                                              f"{region}, credentials: {_credential_source()}"))
    else:
        root = os.path.abspath(os.path.expanduser(loc.path))
        while not os.path.exists(root) and os.path.dirname(root) != root:
            created_root = root  # the topmost folder open_store will create: removed again afterwards
            root = os.path.dirname(root)
    try:
        store = open_store(uri)  # a local folder is created (and removed again below if we made it)
    except (StoreError, OSError) as exc:
        return [*out, Check(name, FAIL, f"cannot open: {exc}")]
    key = f"doctor/probe-{uuid.uuid4().hex[:12]}"
    payload = b"rayedit doctor probe " + uuid.uuid4().bytes
    step = "write"
    try:
        store.put_bytes(key, payload)
        step = "read back"
        if store.get_bytes(key) != payload:
            return [*out, Check(name, FAIL, "an object read back differs from what was written")]
        step = "list"
        if key not in store.list("doctor"):
            return [*out, Check(name, FAIL, "a written object does not appear in a listing")]
        step = "conditional write"
        marker = key + ".marker"
        first, second = store.put_if_absent(marker, b"1"), store.put_if_absent(marker, b"2")
        if not first or second:
            out.append(Check(name, FAIL, "conditional writes are not honoured (If-None-Match / exclusive create): "
                                         "two writers could both commit the same step"))
        step = "delete"
        store.delete(key)
        store.delete(marker)
        if store.exists(key) or store.exists(marker):
            return [*out, Check(name, FAIL, "a deleted object still exists")]
    except (StoreError, OSError) as exc:
        return [*out, Check(name, FAIL, f"{step} failed: {exc}")]
    finally:
        if created_root is not None:  # leave no trace of the probe in a folder we created
            shutil.rmtree(created_root, ignore_errors=True)
        elif loc.scheme == "file":
            _rmdir_empty(os.path.join(os.path.abspath(os.path.expanduser(loc.path)), "doctor"))
    if not any(c.status == FAIL for c in out):
        out.append(Check(name, OK, "writable, readable, listable, deletable; conditional writes honoured"))
    if loc.scheme == "file":
        probe_dir = created_root or os.path.abspath(os.path.expanduser(loc.path))
        free = shutil.disk_usage(_existing_parent(probe_dir)).free
        out.append(Check("disk space", OK if free >= MIN_FREE_BYTES else WARN,
                         f"{free / 2**30:.1f} GiB free under {probe_dir}" +
                         ("" if free >= MIN_FREE_BYTES else ": checkpoints may fail with 'the disk is full'")))
    return out


def _rmdir_empty(path: str) -> None:
    with contextlib.suppress(OSError):  # not empty (someone else's probe) or already gone
        os.rmdir(path)


def _existing_parent(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


# --- all together -------------------------------------------------------------------------------------
def run_checks(*, address: str | None = None, store: str | None = None, ray: bool = True,
               require_gpu: bool = False, timeout: float = 90.0) -> list[Check]:
    checks = [*check_versions(), check_threads(), check_gpu(require_gpu)]
    if ray:
        checks.append(check_ray(address, timeout))
    else:
        checks.append(Check("ray", INFO, "not checked (--no-ray)"))
    if store:
        checks += check_store(store)
    else:
        checks.append(Check("store", INFO, "not checked (give --store URI)"))
    return checks


def as_dicts(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
