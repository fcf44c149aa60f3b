"""A fault-injecting HTTP proxy on loopback in front of an S3 server (moto), for the fault matrix.

Clients (boto3 in the driver and in Ray workers, pyarrow's S3 client) use the proxy's URL as their
endpoint; the proxy forwards each request to the upstream server unless a rule fires. Rules:

- ``delay``: forward the request (it lands), then hold the reply ``delay_s`` seconds (a slow server;
  longer than the client's read timeout = a lost reply, which makes the client retry a request that
  already succeeded);
- ``status``: answer ``status`` (500/503) with an S3 XML error, without forwarding;
- ``reset_before``: reset the TCP connection (RST) without forwarding;
- ``reset_after``: forward (the request lands), then reset the connection instead of replying.

Each rule matches an S3 operation (``PutObject``, ``UploadPart``, ``GetObject``, ... or ``*``) with a
probability, drawn from a seeded RNG. Bounded: at most ``max_faults`` firings per rule, at most
``max_consecutive`` faults in a row for one request (method + path + query), so a client with
botocore's 5 attempts always gets through unless a rule is ``sticky`` (every attempt of the first
request it hits, after ``skip`` others, fails: a failing multipart upload). Delays are capped at
``MAX_DELAY_S``; the proxy binds 127.0.0.1 and forwards to loopback only; its threads are daemons
and ``stop()`` is bounded.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_DELAY_S = 5.0
UPSTREAM_TIMEOUT_S = 30.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
KINDS = ("delay", "status", "reset_before", "reset_after")


@dataclass
class Rule:
    kind: str
    op: str = "*"  # S3 operation name (see ``operation``) or '*'
    prob: float = 1.0
    max_faults: int = 10
    max_consecutive: int = 2
    status: int = 503
    delay_s: tuple[float, float] = (0.5, 1.5)
    sticky: bool = False  # fail every attempt of the first request hit (up to max_faults)
    skip: int = 0  # sticky: let this many distinct matching requests through first
    fired: int = 0
    _sticky_id: str | None = None
    _skipped: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rule kind {self.kind!r} is not one of {KINDS}")
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError("prob must be in [0, 1]")
        if self.delay_s[1] > MAX_DELAY_S:
            raise ValueError(f"delays are capped at {MAX_DELAY_S} s")


def operation(method: str, path: str, query: str) -> str:
    """The S3 operation of a path-style request (enough of it for fault rules)."""
    q = parse_qs(query, keep_blank_values=True)
    parts = [p for p in path.split("/") if p]
    on_object = len(parts) >= 2
    if method == "PUT":
        if "partNumber" in q and "uploadId" in q:
            return "UploadPart"
        return "PutObject" if on_object else "CreateBucket"
    if method == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "uploadId" in q:
            return "CompleteMultipartUpload"
        return "DeleteObjects" if "delete" in q else "Post"
    if method == "DELETE":
        if "uploadId" in q:
            return "AbortMultipartUpload"
        return "DeleteObject" if on_object else "DeleteBucket"
    if method == "HEAD":
        return "HeadObject" if on_object else "HeadBucket"
    if method == "GET":
        if "uploads" in q:
            return "ListMultipartUploads"
        return "GetObject" if on_object else "ListObjects"
    return method


@dataclass
class Stats:
    requests: int = 0
    faults: Counter = field(default_factory=Counter)  # (kind, op) -> count
    ops: Counter = field(default_factory=Counter)

    def total_faults(self) -> int:
        return sum(self.faults.values())


class FaultProxy:
    """``FaultProxy(upstream_host, upstream_port, seed)``; ``start()``, ``set_rules([...])``, ``stop()``."""

    def __init__(self, upstream_host: str, upstream_port: int, seed: int = 0) -> None:
        if upstream_host not in LOOPBACK:
            raise ValueError("the fault proxy only forwards to a server on loopback")
        self.upstream = (upstream_host, upstream_port)
        self.rng = random.Random(seed)
        self.rules: list[Rule] = []
        self.stats = Stats()
        self._consecutive: Counter = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- control ------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "start() the proxy first"
        return self._server.server_address[1]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_rules(self, rules: list[Rule], seed: int | None = None) -> None:
        with self._lock:
            self.rules = list(rules)
            self.stats = Stats()
            self._consecutive.clear()
            if seed is not None:
                self.rng = random.Random(seed)

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = _QuietServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._server is None:
            return
        stopper = threading.Thread(target=self._server.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout_s)
        self._server.server_close()
        self._server = None

    # --- decisions ----------------------------------------------------------------------------------
    def decide(self, op: str, ident: str) -> Rule | None:
        with self._lock:
            self.stats.requests += 1
            self.stats.ops[op] += 1
            for rule in self.rules:
                if rule.op not in ("*", op) or rule.fired >= rule.max_faults:
                    continue
                if rule.sticky:
                    if rule._sticky_id is None and ident not in rule._skipped and len(rule._skipped) < rule.skip:
                        rule._skipped.add(ident)
                    if rule._sticky_id is None and ident not in rule._skipped and self.rng.random() < rule.prob:
                        rule._sticky_id = ident
                    if rule._sticky_id != ident:
                        continue
                elif self._consecutive[ident] >= rule.max_consecutive or self.rng.random() >= rule.prob:
                    continue
                rule.fired += 1
                self._consecutive[ident] += 1
                self.stats.faults[(rule.kind, op)] += 1
                return rule
            self._consecutive.pop(ident, None)
            return None

    def delay_for(self, rule: Rule) -> float:
        with self._lock:
            return min(MAX_DELAY_S, self.rng.uniform(*rule.delay_s))


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # resets are our own doing: no tracebacks
        pass


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length", "0") or 0)
        return self.rfile.read(n) if n else b""

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed server or middlebox would."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=UPSTREAM_TIMEOUT_S)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    conn.putheader(k, v)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP], data
        finally:
            conn.close()

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response_only(status)
        has_length = False
        for k, v in headers:
            if k.lower() == "content-length":
                if self.command != "HEAD":
                    continue  # we send the real length below
                has_length = True
            self.send_header(k, v)
        if self.command != "HEAD" or not has_length:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)
        self.wfile.flush()

    def _handle(self) -> None:
        body = self._body()
        parts = urlsplit(self.path)
        op = operation(self.command, parts.path, parts.query)
        query = "&".join(sorted(q for q in parts.query.split("&") if q and not q.startswith("X-Amz-")))
        rule = self.owner.decide(op, f"{self.command} {parts.path}?{query}")
        if rule is not None and rule.kind == "reset_before":
            self._reset()
            return
        if rule is not None and rule.kind == "status":
            code = {500: "InternalError", 503: "SlowDown"}.get(rule.status, "InternalError")
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected by the '
                   f"fault proxy</Message><RequestId>fault</RequestId></Error>").encode()
            self._reply(rule.status, [("Content-Type", "application/xml")], xml)
            return
        try:
            status, headers, data = self._forward(body)
        except OSError:
            self._reset()  # upstream unreachable: the client sees a broken connection and retries
            return
        if rule is not None and rule.kind == "reset_after":
            self._reset()
            return
        if rule is not None and rule.kind == "delay":
            time.sleep(self.owner.delay_for(rule))
        try:
            self._reply(status, headers, data)
        except OSError:
            self.close_connection = True  # the client gave up (read timeout) and closed: fine

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
