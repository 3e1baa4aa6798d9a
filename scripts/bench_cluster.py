#!/usr/bin/env python3
"""The measuring half of scripts/bench-cluster (which starts the origin
registry, the delay proxy and the shaping, publishes the Skiff image, then
runs this): N "nodes" start the same image at once through a pull-through
mirror in front of the origin, for each mirror set-up; then the report.

A node is a `skiff mount` daemon (keeper + worker) with its own chunk cache,
state directory and registry configuration (SKIFF_REGISTRY_CONFIG naming
the mirror for the origin's host), and the python import in a chroot of its
mount. Mirrors:

  registry-proxy  Debian's docker-registry with `proxy: remoteurl:` (the
                  pull-through cache of the distribution project);
  nginx-slice-S   nginx with the slice module (slices of S bytes fetched
                  from the origin with aligned Range requests and cached
                  one by one), proxy_cache and proxy_cache_lock (concurrent
                  misses of one slice wait for one upstream request).

Bytes served are counted from the access logs (origin: docker-registry's;
mirror: its own), so every response counts, manifests included.
Every daemon, mount and mirror it starts is stopped on exit, SIGTERM too.
"""
import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import drop_caches, process_tree  # scripts/bench.py
from bench_node import BenchError, Daemon, machine, proc_memory, run_import, stop_all  # scripts/bench_node.py
from bench_report import splice_cluster  # scripts/bench_report.py

MiB = 1 << 20
# "GET /v2/... HTTP/1.1" STATUS BYTES: the common/combined log format that
# docker-registry writes and the nginx log format below follows.
ACCESS = re.compile(r'"(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)')
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"bench-cluster: {msg}", file=sys.stderr, flush=True)


def wait_port(port, proc, what, logf):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited {proc.returncode}: {Path(logf).read_text()[-2000:]}")
        r = subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}/v2/"])
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise BenchError(f"{what} does not answer on 127.0.0.1:{port}")


def cpu_seconds(pid):
    """utime + stime of pid and its descendants, in seconds."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / CLK_TCK


class AccessLog:
    """Bytes and requests of an access log, from a position on."""

    def __init__(self, path):
        self.path = Path(path)
        self.start = self.path.stat().st_size if self.path.exists() else 0

    def totals(self):
        out = {"requests": 0, "bytes": 0, "blob_bytes": 0, "statuses": {}}
        if not self.path.exists():
            return out
        with open(self.path, "rb") as f:
            f.seek(self.start)
            for line in f.read().decode(errors="replace").splitlines():
                m = ACCESS.search(line)
                if not m or m.group(1) not in ("GET", "HEAD"):
                    continue
                n = 0 if m.group(4) == "-" else int(m.group(4))
                out["requests"] += 1
                out["bytes"] += n
                if "/blobs/" in m.group(2):
                    out["blob_bytes"] += n
                out["statuses"][m.group(3)] = out["statuses"].get(m.group(3), 0) + 1
        return out


class Mirror:
    """A mirror process (its tree: nginx's master and workers), its access
    log, and a sampler of its memory."""

    live = []

    def __init__(self, name, cmd, port, logf, access):
        self.name, self.port, self.logf = name, port, logf
        with open(logf, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        Mirror.live.append(self)
        wait_port(port, self.proc, name, logf)
        self.access = AccessLog(access)
        self.peak_rss = 0
        self.cpu = 0.0
        self.killed_at = None
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self):
        while not self._stop.wait(0.2):
            rss = sum((proc_memory(p) or (0,))[0] for p in process_tree(self.proc.pid))
            self.peak_rss = max(self.peak_rss, rss)
            self.cpu = max(self.cpu, cpu_seconds(self.proc.pid))

    def kill(self):
        """kill -9 of every process of the mirror (mid-run failure). The
        master goes first: nginx's master replaces a worker that dies, and
        such a worker, orphaned, would keep the port open and wait on the
        cache locks the killed workers held."""
        for p in process_tree(self.proc.pid):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait()
        self.killed_at = time.monotonic()

    def stop(self):
        self._stop.set()
        if self in Mirror.live:
            Mirror.live.remove(self)
        if self.proc.poll() is None:
            self.cpu = max(self.cpu, cpu_seconds(self.proc.pid))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._sampler.is_alive():
            self._sampler.join()


def nginx_mirror(d, port, upstream, slice_size):
    """nginx as a range-caching, miss-coalescing pull-through cache: by
    slices of slice_size, or (None) keyed by the exact Range header."""
    (d / "cache").mkdir(parents=True, exist_ok=True)
    (d / "tmp").mkdir(exist_ok=True)
    conf = d / "nginx.conf"
    cache_by = SLICED.format(slice=slice_size) if slice_size else RANGE_KEYED
    conf.write_text(NGINX_CONF.format(dir=d, port=port, upstream=upstream, cache_by=cache_by))
    return Mirror(f"nginx-slice-{slice_size}" if slice_size else "nginx-range-keyed",
                  ["nginx", "-p", str(d), "-c", str(conf), "-g", "daemon off;"],
                  port, d / "stdout.log", d / "access.log")


# How blob responses are cached: by aligned slices (the set-up that meets
# the goal), or by the client's exact Range header (an entry per distinct
# range: it saves origin bytes only as far as the nodes ask the same ranges).
SLICED = """\
      slice {slice};
      proxy_cache_key $uri$slice_range;
      proxy_set_header Range $slice_range;"""
RANGE_KEYED = """\
      proxy_cache_key $uri$http_range;
      proxy_set_header Range $http_range;"""

# The mirror configuration the benchmark measures, written for operators:
# docs/kubernetes.md shows the same. Blob GETs are cut into aligned slices
# (the slice module sends `Range: bytes=S-E` upstream, each slice a cache
# entry of its own, keyed by the blob's path and the slice); a client's range
# is served from the slices it covers; proxy_cache_lock makes concurrent
# misses of one slice wait for the one request that fills it. Its timeouts:
# a slice whose fetch has not ended in 10 s (a worker killed mid-fetch)
# gets another fetch, and a waiter goes upstream itself after 20 s, within
# the nodes' read budget (30 s); both far above a slice's fetch time here.
# proxy_set_header is inherited only by a block that sets none itself: the
# blob location repeats `Connection ""` (keep-alive to the origin).
# Everything else (the /v2/ ping, manifests, tags) passes through uncached.
NGINX_CONF = """\
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  log_format mirror '$remote_addr - - [$time_local] "$request" $status $body_bytes_sent '
                    '"$upstream_cache_status" "$http_range" $request_time';
  access_log {dir}/access.log mirror;
  client_body_temp_path {dir}/tmp;
  proxy_temp_path {dir}/tmp;
  proxy_cache_path {dir}/cache levels=1:2 keys_zone=blobs:16m max_size=20g inactive=7d use_temp_path=off;
  upstream origin {{ server {upstream}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    location ~ "^/v2/.+/blobs/sha256:[0-9a-f]{{64}}$" {{
{cache_by}
      proxy_set_header Connection "";
      proxy_cache blobs;
      proxy_cache_valid 200 206 7d;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 20s;
      proxy_cache_lock_age 10s;
      proxy_pass http://origin;
    }}
    location / {{
      proxy_pass http://origin;
    }}
  }}
}}
"""


def registry_mirror(d, port, upstream):
    """Debian's docker-registry as a pull-through cache (proxy mode)."""
    (d / "storage").mkdir(parents=True, exist_ok=True)
    conf = d / "registry.yml"
    conf.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {d / 'storage'}\n"
                    f"http:\n  addr: 127.0.0.1:{port}\nproxy:\n  remoteurl: http://{upstream}\n")
    logf = d / "registry.log"
    return Mirror("registry-proxy", ["docker-registry", "serve", str(conf)], port, logf, logf)


def summary(logf):
    """The counters of a mount's exit summary line."""
    text = Path(logf).read_text(errors="replace")
    m = None
    for m in re.finditer(r"skiff: unmounted .*", text):
        pass
    out = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(0))} if m else {}
    out["fallbacks"] = text.count("trying the next source")
    return out


def p99(xs):
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


class Bench:
    def __init__(self, a):
        self.a = a
        self.work = Path(a.work)
        self.rounds = []

    def registry_config(self, d, mirror_port):
        """A node's registry configuration: the mirror (if any) for the
        origin's host; nothing else from the machine."""
        text = "use_docker_config = false\nuse_env_proxy = false\n"
        if mirror_port:
            text += f'[[mirrors."{self.a.origin}"]]\nurl = "http://127.0.0.1:{mirror_port}"\n'
        p = d / "registry.toml"
        p.write_text(text)
        return p

    def node(self, i, d, cfg, barrier, res):
        nd = d / f"node-{i}"
        nd.mkdir(parents=True)
        cmd = ["env", f"SKIFF_REGISTRY_CONFIG={cfg}", self.a.skiff, "mount", "--cache-dir", str(nd / "cache"),
               "--state-dir", str(nd / "state"), f"docker://{self.a.origin}/{self.a.repo}", str(nd / "mnt")]
        r = {"node": i, "ok": False}
        res[i] = r
        barrier.wait()
        t0 = time.perf_counter()
        try:
            dm = Daemon("skiff", cmd, nd / "mnt", nd / "mount.log", ready="skiff: mounted")
            r["daemon"] = dm
            r["mount_s"] = dm.mount_s
            r["import_s"] = run_import(dm)
            r["done_s"] = time.perf_counter() - t0
            r["ok"] = True
            r["hwm"] = dm.memory()["hwm_pair"]
            r["cpu_s"] = cpu_seconds(dm.proc.pid)
        except BenchError as e:
            r["error"] = str(e)[-500:]
            log(f"node {i}: {r['error']}")

    def round(self, name, label, n, mirror_fn=None, fresh_mirror=True, kill_after=None):
        """n nodes at once, each from an empty cache and cold page cache."""
        if self.a.only and name not in self.a.only.split(","):
            return None
        d = self.work / name
        subprocess.run(["rm", "-rf", str(d)], check=True)
        d.mkdir(parents=True)
        mirror = None
        if mirror_fn:
            mirror = mirror_fn(fresh_mirror)
        cfg = self.registry_config(d, mirror.port if mirror else None)
        origin = AccessLog(self.a.origin_log)
        drop_caches()
        log(f"{label}: {n} node(s)" + (f", the mirror killed after {kill_after} s" if kill_after else ""))
        barrier = threading.Barrier(n + 1)
        res = [None] * n
        threads = [threading.Thread(target=self.node, args=(i, d, cfg, barrier, res)) for i in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.monotonic()
        killer = None
        if kill_after and mirror:
            killer = threading.Timer(kill_after, mirror.kill)
            killer.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        if killer:
            killer.cancel()
        daemons = [r["daemon"] for r in res if r and "daemon" in r]
        stop_all(daemons)
        out = {"name": name, "label": label, "nodes": n, "wall_s": wall, "kill_after": kill_after,
               "origin": origin.totals(), "per_node": []}
        for r in res:
            dm = r.pop("daemon", None)
            if dm:
                r["summary"] = summary(dm.logf)
            out["per_node"].append(r)
        if mirror:
            out["mirror"] = mirror.access.totals()
            out["mirror_killed"] = mirror.killed_at is not None
            mirror.stop()
            out["mirror_peak_rss"] = mirror.peak_rss
            out["mirror_cpu_s"] = mirror.cpu
        done = [r["done_s"] for r in out["per_node"] if r.get("ok")]
        log(f"  done: {len(done)}/{n}; p50 {statistics.median(done) if done else 0:.1f} s; "
            f"origin {out['origin']['bytes'] / 1e6:.1f} MB"
            + (f"; mirror {out['mirror']['bytes'] / 1e6:.1f} MB" if mirror else ""))
        self.rounds.append(out)
        (self.work / "results.json").write_text(json.dumps(self.rounds, indent=1))
        return out

    def run(self):
        a = self.a
        mdir = self.work / "mirrors"

        def nginx(slice_size, tag):
            def start(fresh):
                d = mdir / tag
                if fresh:
                    subprocess.run(["rm", "-rf", str(d)], check=True)
                d.mkdir(parents=True, exist_ok=True)
                return nginx_mirror(d, a.mirror_port, a.upstream, slice_size)
            return start

        def registry(fresh):
            d = mdir / "registry-proxy"
            if fresh:
                subprocess.run(["rm", "-rf", str(d)], check=True)
            d.mkdir(parents=True, exist_ok=True)
            return registry_mirror(d, a.mirror_port, a.upstream)

        n = a.nodes
        self.round("alone", "one node alone, straight to the origin", 1)
        slices = a.slices.split(",")
        if not a.quick:
            self.round("registry-proxy", "docker-registry proxy mode (cold)", n, registry)
        for s in slices:
            self.round(f"nginx-{s}", f"nginx slice {s} + proxy_cache_lock (cold)", n, nginx(s, f"nginx-{s}"))
        if not a.quick:
            self.round("nginx-range-keyed", "nginx keyed by the Range header, no slice (cold)", n,
                       nginx(None, "nginx-range-keyed"))
        main = slices[0]
        self.round(f"nginx-{main}-warm", f"nginx slice {main}, the mirror warm (nodes cold)", n,
                   nginx(main, f"nginx-{main}"), fresh_mirror=False)
        self.round(f"nginx-{main}-killed", f"nginx slice {main} (cold), kill -9 of the mirror mid-run", n,
                   nginx(main, f"nginx-{main}"), kill_after=a.kill_after)


# ---------------------------------------------------------------- report --

def mb(b):
    return f"{b / 1e6:,.1f} MB"


def report(a, rounds, m0):
    m1 = machine()
    image = a.image_bytes
    L = []
    p = L.append
    p("# Many nodes through a mirror\n")
    p(f"Made by `scripts/bench-cluster{' --quick' if a.quick else ''}` on {m1['date']} at commit `{m1['commit']}` "
      f"({m1['cores']} cores, {m1['memory']}; load average {' '.join(m0['load'])} at the start, "
      f"{' '.join(m1['load'])} at the end: the machine is shared with other builds, and all nodes share its "
      f"{m1['cores']} cores). One run per set-up; times move with the machine's load, bytes do not.\n")
    p(f"- **Origin**: Debian's docker-registry on 127.0.0.1 holding the fixture `python` converted by `skiff convert` "
      f"(**{mb(image)}**: bootstrap layer and data blobs); what it sends is shaped to {a.mbit} Mbit/s (tc htb on lo) "
      f"and a delay proxy (scripts/delay-proxy.py) adds {a.rtt} ms per request: the link to a remote registry.")
    p(f"- **Nodes**: each a `skiff mount docker://ORIGIN/{a.repo}` (keeper + worker) with its own `--cache-dir` "
      "(empty), `--state-dir` and registry configuration (`SKIFF_REGISTRY_CONFIG`: "
      "`[[mirrors.\"ORIGIN\"]] url = \"http://MIRROR\"`, Skiff's mirror list: mirror first, two attempts, then "
      "the origin), all started at once; each runs `chroot MNT python3 -c 'import numpy, pandas'`. "
      "Page cache dropped before each set-up. *Done* = from starting the mount to the end of the import.")
    p("- **Mirrors** (unshaped, on the nodes' side of the link): Debian's docker-registry with `proxy: remoteurl:`; "
      "nginx 1.22 (Debian) with `slice`, `proxy_cache` keyed by blob path and slice, `proxy_cache_lock` "
      "(configuration in scripts/bench_cluster.py and docs/kubernetes.md); and nginx with `proxy_cache` keyed by "
      "the request's own `Range` header, no slices (an entry per distinct range: it saves origin bytes only as "
      "far as the nodes send the same ranges).")
    p("- **Bytes** from the access logs: every response body the origin sent (blobs, manifests, over the shaped "
      "link, to the mirror and to nodes that fell back) and the mirror sent to nodes.\n")
    p("| set-up | nodes | done p50 (s) | done p99 (s) | ok | read errors | origin sent | origin / image | "
      "mirror sent | node daemon peak (median) | node CPU s (median) | mirror peak RSS | mirror CPU s |")
    p("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    alone = None
    for r in rounds:
        ok = [x for x in r["per_node"] if x.get("ok")]
        done = [x["done_s"] for x in ok]
        errs = sum(x.get("summary", {}).get("read_errors", 0) for x in r["per_node"])
        if r["name"] == "alone" and done:
            alone = done[0]
        o = r["origin"]["bytes"]
        mir = r.get("mirror")
        cells = [r["label"], str(r["nodes"])]
        cells += [f"{statistics.median(done):.1f}", f"{p99(done):.1f}"] if done else ["–", "–"]
        cells += [f"{len(ok)}/{r['nodes']}", str(errs), mb(o), f"**{o / image:.2f}x**", mb(mir["bytes"]) if mir else "–"]
        cells += ([f"{statistics.median(x['hwm'] for x in ok) / MiB:.1f} MiB",
                   f"{statistics.median(x['cpu_s'] for x in ok):.2f}"] if ok else ["–", "–"])
        cells += [f"{r['mirror_peak_rss'] / MiB:.1f} MiB", f"{r['mirror_cpu_s']:.2f}"] if mir else ["–", "–"]
        p("| " + " | ".join(cells) + " |")
    p("")
    fetched = {r["name"]: statistics.median(x.get("summary", {}).get("bytes_fetched", 0) for x in r["per_node"])
               for r in rounds}
    p(f"A node fetches {mb(fetched.get('alone', 0))} of chunk data for the import "
      f"({100 * fetched.get('alone', 0) / image:.0f}% of the image); one node alone is done in "
      f"{alone:.1f} s." if alone else "")
    p("")
    for r in rounds:
        if r.get("kill_after") and not r.get("mirror_killed"):
            p(f"**Mirror not killed**: every node was done before {r['kill_after']} s; run again with a smaller "
              "`--kill-after`.\n")
        elif r.get("kill_after"):
            ok = sum(1 for x in r["per_node"] if x.get("ok"))
            errs = sum(x.get("summary", {}).get("read_errors", 0) for x in r["per_node"])
            fb = sum(x.get("summary", {}).get("fallbacks", 0) for x in r["per_node"])
            p(f"**Mirror killed** (`kill -9` of nginx's master and workers {r['kill_after']} s after the start): "
              f"{ok} of {r['nodes']} workloads done, {errs} failed reads; {fb} requests fell back from the mirror "
              f"to the origin (each after two refused attempts at the mirror); the origin sent {mb(r['origin']['bytes'])} "
              f"({r['origin']['bytes'] / image:.2f}x the image) in that run.\n")
    goal = [r for r in rounds if r.get("mirror") and not r.get("kill_after")]
    met = [r["label"] for r in goal if r["origin"]["bytes"] <= image]
    p("**Goal** (the origin sends at most one image, whatever N): "
      + (f"met by {', '.join(met)}." if met else "not met by any set-up measured.")
      + " Raw figures per node: results.json in the work dir.")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skiff", required=True)
    ap.add_argument("--origin", required=True, help="HOST:PORT the nodes name (the delay proxy)")
    ap.add_argument("--upstream", required=True, help="HOST:PORT the mirrors fetch from (the delay proxy)")
    ap.add_argument("--origin-log", required=True, help="the origin registry's log (access log included)")
    ap.add_argument("--repo", required=True, help="REPOSITORY:TAG of the Skiff image")
    ap.add_argument("--mirror-port", type=int, required=True)
    ap.add_argument("--image-bytes", type=int, required=True)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--slices", default="1m,256k")
    ap.add_argument("--kill-after", type=float, default=3.0)
    ap.add_argument("--mbit", default="100")
    ap.add_argument("--rtt", default="10")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", help="comma-separated round names (alone, registry-proxy, nginx-SLICE, "
                    "nginx-range-keyed, nginx-SLICE-warm, nginx-SLICE-killed)")
    ap.add_argument("--report", help="a bench report (bench/report.md) to put the section into")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    m0 = machine()
    b = Bench(a)
    try:
        b.run()
    except BenchError as e:
        log(f"error: {e}")
        return 1
    finally:
        stop_all(list(Daemon.live))
        for m in list(Mirror.live):
            m.stop()
    Path(a.out).write_text(report(a, b.rounds, m0))
    log(f"wrote {a.out}")
    if a.report and Path(a.report).exists():
        splice_cluster(Path(a.report), Path(a.out).read_text())
        log(f"updated {a.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
