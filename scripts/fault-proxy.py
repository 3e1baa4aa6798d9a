#!/usr/bin/env python3
"""An HTTP proxy in front of a real registry that injects faults on demand.

Every request is forwarded to the upstream registry, unless the fault in
force applies to it. Faults are switched at runtime through control
endpoints on the same port, so a test can turn one on, watch a read fail
and turn it off again:

    POST /_proxy/fault   {"kind": KIND, "match": "range"|"blobs"|"all",
                          "count": N|null, "status": 503, "retry_after": 1,
                          "stall_seconds": 3600}
    POST /_proxy/auth    {"mode": "none"|"basic"|"bearer", "ttl_seconds": N,
                          "max_uses": N, "username": U, "password": P}
    GET  /_proxy/stats   counters as JSON (with the `ns` query values seen)
    POST /_proxy/reset   zero the counters

KIND is one of
    none         forward everything
    reset        close the connection with a TCP reset, no response
    stall        answer nothing until the fault is switched off (or
                 stall_seconds pass), then close
    stall_body   send the headers and half the body, then stall likewise
    status       answer `status` (default 503) with an error body
    retry_after  answer 429 with `Retry-After: retry_after`
    truncate     send the headers (full Content-Length) and half the body,
                 then close
    flip         forward, with one byte in the middle of the body inverted

`match` picks the requests a fault applies to: "range" (blob GETs with a
Range header: the lazy reads of a mount), "blobs" (every blob request) or
"all" (every /v2/ request). With `count`, the fault applies to that many
matching requests and then switches itself off.

Auth mode "basic" demands `username`/`password` with Basic auth on every
/v2/ request. Auth mode "bearer" makes the proxy a token-protected registry: /v2/
requests without a valid token get 401 with
`WWW-Authenticate: Bearer realm="http://HOST/token",service="fault-proxy",scope=...`;
GET /token (Basic auth) and POST /token (OAuth2 password or refresh_token
grant) issue tokens that expire after `ttl_seconds` or `max_uses` requests.
When `username` is set, the token endpoint demands those credentials.

    fault-proxy.py --upstream 127.0.0.1:5000 [--port 0] [--tls-cert C --tls-key K]

Prints `listening on PORT` on stdout once it accepts connections. Python
standard library only.
"""
import argparse
import base64
import http.client
import json
import secrets
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 1 << 16


class State:
    """The fault and auth settings, and the counters, behind one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.fault = {"kind": "none"}
        self.auth = {"mode": "none"}
        self.tokens = {}  # token -> [expires_at, uses_left]
        self.generation = 0  # bumped by every fault control call (ends stalls)
        self.zero()

    def zero(self):
        self.stats = {
            "requests": 0,
            "range_requests": 0,
            "blob_requests": 0,
            "forwarded": 0,
            "faults_injected": 0,
            "by_kind": {},
            "unauthorized": 0,
            "tokens_issued": 0,
            "token_requests": 0,
            "token_refused": 0,
            "authorization_headers": [],
            "issued": [],
            # `ns` query values of /v2/ requests ("" when absent), and of
            # range requests: what containerd-style mirrors route by.
            "ns": {},
            "range_ns": {},
        }

    def count(self, key, n=1):
        with self.lock:
            self.stats[key] = self.stats.get(key, 0) + n

    def take_fault(self, match_kind):
        """The fault to apply to a request of `match_kind`s, consuming one of its count."""
        with self.lock:
            f = self.fault
            kind = f.get("kind", "none")
            if kind == "none" or f.get("match", "range") not in match_kind:
                return None
            count = f.get("count")
            if count is not None:
                if count <= 0:
                    return None
                f["count"] = count - 1
                if count - 1 == 0:
                    # Off for later requests; a stall in progress lasts until
                    # the next control call (or its stall_seconds).
                    self.fault = {"kind": "none"}
            self.stats["faults_injected"] += 1
            self.stats["by_kind"][kind] = self.stats["by_kind"].get(kind, 0) + 1
            return dict(f, kind=kind, generation=self.generation)


STATE = State()


def stall_until_cleared(f):
    """Waits until the next control call changes the fault (or stall_seconds pass)."""
    deadline = time.monotonic() + float(f.get("stall_seconds", 3600))
    while time.monotonic() < deadline:
        with STATE.lock:
            if STATE.generation != f["generation"]:
                return
        time.sleep(0.05)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fault-proxy"

    def log_message(self, fmt, *args):  # quiet: tests read the counters
        pass

    # ------------------------------------------------------------ plumbing --

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_json(self, status, value):
        self.reply(status, json.dumps(value).encode(), [("Content-Type", "application/json")])

    def reset_connection(self):
        # SO_LINGER 0: close() sends RST, as a crashed middlebox would.
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass

    # ------------------------------------------------------------- control --

    def control(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/_proxy/stats":
            with STATE.lock:
                snap = json.loads(json.dumps(STATE.stats))
                snap["fault"] = dict(STATE.fault)
                snap["auth_mode"] = STATE.auth.get("mode", "none")
            return self.reply_json(200, snap)
        if self.command != "POST":
            return self.reply_json(405, {"error": "POST"})
        try:
            arg = json.loads(self.body() or b"{}")
        except ValueError:
            return self.reply_json(400, {"error": "bad JSON"})
        if path == "/_proxy/fault":
            with STATE.lock:
                STATE.fault = arg if arg.get("kind") else {"kind": "none"}
                STATE.generation += 1
            return self.reply_json(200, {"ok": True})
        if path == "/_proxy/auth":
            with STATE.lock:
                STATE.auth = arg
                STATE.tokens.clear()
            return self.reply_json(200, {"ok": True})
        if path == "/_proxy/reset":
            with STATE.lock:
                STATE.zero()
            return self.reply_json(200, {"ok": True})
        return self.reply_json(404, {"error": "unknown control endpoint"})

    # ---------------------------------------------------------------- auth --

    def issue_token(self):
        STATE.count("token_requests")
        with STATE.lock:
            auth = dict(STATE.auth)
        if auth.get("mode") != "bearer":
            return self.reply_json(404, {"error": "no token auth"})
        form = {}
        if self.command == "POST":
            form = dict(urllib.parse.parse_qsl(self.body().decode("utf-8", "replace")))
        user = auth.get("username")
        if user is not None:
            ok = False
            h = self.headers.get("Authorization", "")
            if h.startswith("Basic "):
                try:
                    u, _, p = base64.b64decode(h[6:]).decode().partition(":")
                    ok = (u, p) == (user, auth.get("password"))
                except ValueError:
                    ok = False
            if form.get("grant_type") == "password":
                ok = (form.get("username"), form.get("password")) == (user, auth.get("password"))
            if form.get("grant_type") == "refresh_token":
                with STATE.lock:
                    ok = form.get("refresh_token") in STATE.tokens.get("__refresh__", {})
            if not ok:
                STATE.count("token_refused")
                return self.reply_json(401, {"error": "bad credentials"})
        token = "tok-" + secrets.token_hex(16)
        ttl = int(auth.get("ttl_seconds", 60))
        uses = auth.get("max_uses")
        answer = {
            "token": token,
            "expires_in": ttl,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with STATE.lock:
            STATE.tokens[token] = [time.monotonic() + ttl, uses]
            STATE.stats["tokens_issued"] += 1
            STATE.stats.setdefault("issued", []).append(token)
            if self.command == "POST" and user is not None:
                refresh = "refresh-" + secrets.token_hex(16)
                STATE.tokens.setdefault("__refresh__", {})[refresh] = True
                STATE.stats.setdefault("issued", []).append(refresh)
                answer["refresh_token"] = refresh
        return self.reply_json(200, answer)

    def authorized(self, repo):
        with STATE.lock:
            mode = STATE.auth.get("mode")
            if mode == "basic":
                h = self.headers.get("Authorization", "")
                want = "%s:%s" % (STATE.auth.get("username"), STATE.auth.get("password"))
                if h == "Basic " + base64.b64encode(want.encode()).decode():
                    return True
                STATE.stats["unauthorized"] += 1
        if mode == "basic":
            self.reply(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"login"}]}',
                       [("Content-Type", "application/json"), ("WWW-Authenticate", 'Basic realm="fault-proxy"')])
            return False
        with STATE.lock:
            if STATE.auth.get("mode") != "bearer":
                return True
            h = self.headers.get("Authorization", "")
            # Keep what clients sent (never the secret itself in a test
            # log: tests compare, they do not print).
            STATE.stats["authorization_headers"].append(h.split(" ", 1)[0])
            if h.startswith("Bearer "):
                t = STATE.tokens.get(h[7:])
                if t is not None and not isinstance(t, dict):
                    expires, uses = t
                    if time.monotonic() < expires and (uses is None or uses > 0):
                        if uses is not None:
                            t[1] = uses - 1
                        return True
            STATE.stats["unauthorized"] += 1
        host = self.headers.get("Host", "127.0.0.1")
        scheme = "https" if isinstance(self.connection, ssl.SSLSocket) else "http"
        scope = f',scope="repository:{repo}:pull"' if repo else ""
        body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}).encode()
        self.reply(
            401,
            body,
            [
                ("Content-Type", "application/json"),
                ("WWW-Authenticate", f'Bearer realm="{scheme}://{host}/token",service="fault-proxy"{scope}'),
            ],
        )
        return False

    # ------------------------------------------------------------- forward --

    def handle_any(self):
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/_proxy/"):
            return self.control()
        if path == "/token":
            return self.issue_token()
        STATE.count("requests")
        is_blob = "/blobs/" in path
        is_range = is_blob and self.command == "GET" and "Range" in self.headers
        if is_blob:
            STATE.count("blob_requests")
        if is_range:
            STATE.count("range_requests")
        if path.startswith("/v2/"):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            ns = query.get("ns", [""])[0]
            with STATE.lock:
                STATE.stats["ns"][ns] = STATE.stats["ns"].get(ns, 0) + 1
                if is_range:
                    STATE.stats["range_ns"][ns] = STATE.stats["range_ns"].get(ns, 0) + 1
        repo = None
        if path.startswith("/v2/") and ("/blobs/" in path or "/manifests/" in path):
            repo = path[4:].rsplit("/blobs/" if is_blob else "/manifests/", 1)[0]
        req_body = self.body()
        if not self.authorized(repo):
            return
        kinds = ["all"] + (["blobs"] if is_blob else []) + (["range"] if is_range else [])
        f = STATE.take_fault(kinds) if path.startswith("/v2/") else None
        kind = f["kind"] if f else "none"
        if kind == "reset":
            return self.reset_connection()
        if kind == "stall":
            stall_until_cleared(f)
            return self.reset_connection()
        if kind == "status":
            status = int(f.get("status", 503))
            body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "injected fault"}]}).encode()
            return self.reply(status, body, [("Content-Type", "application/json")])
        if kind == "retry_after":
            body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS", "message": "injected fault"}]}).encode()
            return self.reply(
                429,
                body,
                [("Content-Type", "application/json"), ("Retry-After", str(f.get("retry_after", 1)))],
            )
        self.forward(req_body, kind, f)

    def forward(self, req_body, kind, f):
        up = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive", "authorization")}
        try:
            up.request(self.command, self.path, body=req_body or None, headers=headers)
            resp = up.getresponse()
        except OSError:
            up.close()
            return self.reply_json(502, {"errors": [{"code": "UNAVAILABLE", "message": "upstream unreachable"}]})
        STATE.count("forwarded")
        length = resp.getheader("Content-Length")
        data = None
        if length is None and self.command != "HEAD":
            data = resp.read()
            length = str(len(data))
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                continue
            self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        if self.command == "HEAD":
            up.close()
            return
        total = int(length or 0)
        cut = total // 2 if kind in ("truncate", "stall_body") else None
        flip_at = total // 2 if kind == "flip" else None
        sent = 0
        try:
            while sent < total:
                if data is not None:
                    piece = data[sent : sent + CHUNK]
                else:
                    piece = resp.read(min(CHUNK, total - sent))
                if not piece:
                    break
                if cut is not None and sent + len(piece) > cut:
                    piece = piece[: cut - sent]
                if flip_at is not None and sent <= flip_at < sent + len(piece):
                    b = bytearray(piece)
                    b[flip_at - sent] ^= 0xFF
                    piece = bytes(b)
                if piece:
                    self.wfile.write(piece)
                sent += len(piece)
                if cut is not None and sent >= cut:
                    self.wfile.flush()
                    if kind == "stall_body":
                        stall_until_cleared(f)
                    self.close_connection = True
                    break
        except OSError:
            self.close_connection = True
        finally:
            up.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the registry")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    ap.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    ap.add_argument("--tls-key", help="the certificate's key (PEM)")
    a = ap.parse_args()
    host, _, port = a.upstream.rpartition(":")
    server = Server(("127.0.0.1", a.port), Handler)
    server.upstream_host, server.upstream_port = host, int(port)
    if a.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.tls_cert, a.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
