#!/usr/bin/env python3
"""The measuring half of scripts/bench-node (which sets up the registry, the
Skiff image and the squashfs image, then runs this): mounts, workloads,
memory of every daemon, and the report. Every daemon it starts is unmounted
and stopped on exit, on SIGTERM and on SIGINT too.

Memory of a mount is summed over its process tree (a Skiff mount run as root
is a keeper holding the FUSE connection plus the worker serving it):
VmRSS and VmHWM from /proc/PID/status, PSS from /proc/PID/smaps_rollup.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import process_tree  # scripts/bench.py: a daemon and its descendants

MiB = 1 << 20
WORKLOAD = "python3 -c 'import numpy, pandas'"
PARALLEL = 2  # workloads at a time (the machine has 2 cores)


def log(msg):
    print(f"bench-node: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def proc_memory(pid):
    """(VmRSS, VmHWM, PSS, RssAnon) of one process, in bytes; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    f = {}
    for line in (status + rollup).splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "Pss", "RssAnon") and v.strip():
            f[k] = int(v.split()[0]) * 1024
    return f.get("VmRSS", 0), f.get("VmHWM", 0), f.get("Pss", 0), f.get("RssAnon", 0)


class Daemon:
    """One mount and the process serving it (for Skiff: the keeper, whose
    child is the worker)."""

    live = []

    def __init__(self, system, cmd, mnt, logf, ready=None):
        self.system, self.mnt, self.logf = system, mnt, logf
        mnt.mkdir(parents=True, exist_ok=True)
        base = os.stat(mnt).st_dev
        t0 = time.perf_counter()
        with open(logf, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        Daemon.live.append(self)
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{shlex.join(cmd)} exited {self.proc.returncode}: {logf.read_text()[-2000:]}")
            if os.stat(mnt).st_dev != base and (ready is None or ready in logf.read_text(errors="replace")):
                break
            if time.perf_counter() - t0 > 120:
                raise BenchError(f"{system}: not mounted at {mnt} after 120 s")
            time.sleep(0.001)
        self.mount_s = time.perf_counter() - t0

    def memory(self):
        """Summed over the process tree; keeper = the process started."""
        # hwm_pair: the peak of the pair counting the binary's pages once:
        # the worker's VmHWM plus the keeper's private (anonymous) memory;
        # the keeper's file pages are the binary's, which the worker maps too.
        m = {"rss": 0, "hwm": 0, "pss": 0, "hwm_pair": 0, "keeper_rss": 0, "keeper_pss": 0, "procs": 0}
        for pid in process_tree(self.proc.pid):
            v = proc_memory(pid)
            if v is None:
                continue
            m["rss"] += v[0]
            m["hwm"] += v[1]
            m["pss"] += v[2]
            m["procs"] += 1
            is_keeper = pid == self.proc.pid and self.system == "skiff"
            m["hwm_pair"] += v[3] if is_keeper else v[1]
            if pid == self.proc.pid:
                m["keeper_rss"], m["keeper_pss"] = v[0], v[2]
        return m

    def signal_stop(self):
        if self.proc.poll() is not None:
            return
        if self.system == "skiff":
            self.proc.send_signal(signal.SIGTERM)  # the keeper unmounts and stops its worker
        else:
            for _ in range(50):
                if subprocess.run(["fusermount3", "-u", str(self.mnt)], stderr=subprocess.DEVNULL).returncode == 0:
                    break
                time.sleep(0.1)

    def wait_stop(self):
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log(f"{self.system} at {self.mnt} did not stop: kill -9 and lazy unmount")
            for pid in reversed(process_tree(self.proc.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.proc.wait()
        subprocess.run(["umount", "-l", str(self.mnt)], stderr=subprocess.DEVNULL)
        if self in Daemon.live:
            Daemon.live.remove(self)


def stop_all(daemons):
    for d in daemons:
        d.signal_stop()
    for d in daemons:
        d.wait_stop()


def run_import(d):
    t0 = time.perf_counter()
    r = subprocess.run(["chroot", str(d.mnt), "sh", "-c", WORKLOAD], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise BenchError(f"the import failed on {d.mnt}: {r.stderr[-2000:]}")
    return time.perf_counter() - t0


def run_readall(d):
    """Reads every file of the mount (tar into a pipe: GNU tar does not read
    files when it writes to /dev/null itself)."""
    t0 = time.perf_counter()
    r = subprocess.run(["bash", "-c", 'set -o pipefail; tar -C "$1" -cf - . | cat >/dev/null', "bash", str(d.mnt)],
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise BenchError(f"reading every file of {d.mnt} failed: {r.stderr[-2000:]}")
    return time.perf_counter() - t0


def pool(fn, daemons):
    with ThreadPoolExecutor(max_workers=PARALLEL) as ex:
        return list(ex.map(fn, daemons))


class Bench:
    def __init__(self, a):
        self.a = a
        self.work = Path(a.work) / "runs"
        self.n_node = 2 if a.quick else 20
        self.configs = [("skiff", "`skiff mount` defaults", []),
                        ("skiff", "snapshotter's options", a.snap_opts.split()),
                        ("squashfuse_ll", "squashfuse_ll -f", None)]
        self.R = {"one": [], "four": [], "node": []}

    def mount_group(self, cfg, n, tag):
        """n mounts of the image; one disk cache for all of them (one per
        node, as the snapshotter has it), fresh for each group."""
        system, _, opts = cfg
        d = self.work / tag
        subprocess.run(["rm", "-rf", str(d)], check=True)
        d.mkdir(parents=True)
        out = []
        for i in range(n):
            mnt = d / "mnt" / str(i)
            if system == "skiff":
                cmd = [self.a.skiff, "mount", *opts, "--cache-dir", str(d / "cache"),
                       "--state-dir", str(d / "state" / str(i)), self.a.ref, str(mnt)]
                out.append(Daemon("skiff", cmd, mnt, d / f"mount-{i}.log", ready="skiff: mounted"))
            else:
                out.append(Daemon(system, ["squashfuse_ll", "-f", self.a.sqfs, str(mnt)], mnt, d / f"mount-{i}.log"))
        return out

    def one(self, k, cfg):
        log(f"one daemon: {cfg[1]}")
        [d] = self.mount_group(cfg, 1, f"one-{k}")
        try:
            r = {"cfg": cfg[1], "system": cfg[0], "mount_s": d.mount_s, "idle": d.memory()}
            if cfg[0] == "skiff":
                boot = d.mnt.parent.parent / "cache" / "bootstraps"
                r["bootstrap_bytes"] = sum(f.stat().st_size for f in boot.rglob("*") if f.is_file())
            r["import_s"] = run_import(d)
            r["import"] = d.memory()
            if not self.a.quick:
                r["readall_s"] = run_readall(d)
                r["readall"] = d.memory()
        finally:
            stop_all([d])
        self.R["one"].append(r)

    def four(self, k, cfg):
        log(f"four mounts, reading every file: {cfg[1]}")
        ds = self.mount_group(cfg, 4, f"four-{k}")
        try:
            secs = pool(run_readall, ds)
            mem = [d.memory() for d in ds]
        finally:
            stop_all(ds)
        self.R["four"].append({"cfg": cfg[1], "system": cfg[0], "mem": mem, "readall_s": secs})

    def node(self, k, cfg):
        n = self.n_node
        log(f"{n} mounts, the import on each ({PARALLEL} at a time): {cfg[1]}")
        ds = []
        try:
            ds = self.mount_group(cfg, n, f"node-{k}")
            idle = [d.memory() for d in ds]
            secs = pool(run_import, ds)
            mem = [d.memory() for d in ds]
            self.R["node"].append({"cfg": cfg[1], "system": cfg[0], "idle": idle, "mem": mem,
                                   "mount_s": [d.mount_s for d in ds], "import_s": secs})
        finally:
            stop_all(ds or list(Daemon.live))

    def run(self):
        for k, cfg in enumerate(self.configs):
            self.one(k, cfg)
        if not self.a.quick:
            for k, cfg in enumerate(self.configs):
                self.four(k, cfg)
        for k, cfg in enumerate(self.configs):
            self.node(k, cfg)
        (Path(self.a.work) / "results.json").write_text(json.dumps(self.R, indent=1))


# ---------------------------------------------------------------- report --

def mib(b):
    return f"{b / MiB:.1f}"


def med(xs):
    return statistics.median(xs)


def mount_defaults(skiff):
    """The defaults `skiff mount --help` shows for the memory-relevant flags."""
    text = subprocess.run([skiff, "mount", "--help"], capture_output=True, text=True).stdout
    out = {}
    for flag in ("threads", "cache-mb", "readahead-kb", "cache-size", "chunk-readahead-kb", "fetch-window-kb",
                 "max-request-kb"):
        m = re.search(rf"--{flag}\b.*?(?:\[default: ([^\]]+)\]|\n\s+-)", text, re.S)
        if m and m.group(1):
            out[flag] = m.group(1)
    return " ".join(f"--{k} {v}" for k, v in out.items())


def machine():
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), "log", "-1",
                             "--format=%h"], capture_output=True, text=True).stdout.strip()
    return {"cores": os.cpu_count(), "memory": f"{mem / (1 << 20):.1f} GiB", "kernel": platform.release(),
            "commit": commit, "load": open("/proc/loadavg").read().split()[:3],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def verdict(v, goal, aim=None):
    if v is None:
        return "not measured"
    if aim is not None and v <= aim:
        return "**met** (and the aim)"
    return "**met**" if v <= goal else "**not met**"


def report(a, R, m0):
    m1 = machine()
    conv = json.loads(Path(a.convert_json).read_text()) if a.convert_json else {}
    L = []
    p = L.append
    n = 2 if a.quick else 20
    p("# Memory on a node\n")
    p(f"Made by `scripts/bench-node{' --quick' if a.quick else ''}` on {m1['date']} at commit `{m1['commit']}` "
      f"({m1['cores']} cores, {m1['memory']}, kernel {m1['kernel']}; load average {' '.join(m0['load'])} at the "
      f"start, {' '.join(m1['load'])} at the end: the machine is shared with other builds). "
      "Figures from one run; times move with the machine's load.\n")
    p("- **Image**: the fixture `python` (Debian 12 + python3 + numpy/pandas, 2 layers, 17k entries), converted "
      f"with `skiff convert` into a Debian docker-registry on 127.0.0.1 (plain HTTP on loopback) and mounted "
      f"from there: `skiff mount docker://127.0.0.1:PORT/bench/python:skiff`"
      + (f" (Skiff image {conv['bytes_out'] / 1e6:.1f} MB)." if "bytes_out" in conv else "."))
    p(f"- **Skiff, `skiff mount` defaults** (as root: keeper + worker): `{mount_defaults(a.skiff)}`; "
      "plus `--cache-dir` (fresh per group of mounts, one for all mounts of a group: one per node) and `--state-dir` in the work dir.")
    p(f"- **Skiff, the snapshotter's options** (what `skiff snapshotter` passes to each image daemon, from "
      f"`MountConfig::default()` in snapshotter/src/config.rs): `{a.snap_opts}`.")
    p("- **squashfuse_ll**: `squashfuse_ll -f` on a `mksquashfs -comp zstd -Xcompression-level 3` image of the "
      "fixture's tree (`umoci unpack`), the same reads.")
    p(f"- **Workloads**, in each mount: the import `chroot MNT {WORKLOAD}`, and reading every file "
      "(`tar -C MNT -cf - . | cat >/dev/null`). Several mounts: the workloads run "
      f"{PARALLEL} at a time.")
    p("- **Memory**: VmRSS and VmHWM from /proc/PID/status and PSS from /proc/PID/smaps_rollup, summed over "
      "the daemon's process tree (Skiff: keeper + worker); MiB = 2^20 bytes. VmHWM summed over keeper and "
      "worker is an upper bound of the peak of the pair.\n")

    def one(system, cfg):
        return next((r for r in R["one"] if r["cfg"] == cfg), None)

    # ---- goals
    p("## Goals (issue 15, part 1)\n")
    p("| goal | configuration | measured | verdict |")
    p("|---|---|---|---|")
    for r in R["one"]:
        if r["system"] != "skiff":
            continue
        ra = r.get("readall", {})
        v = ra.get("hwm_pair")
        p(f"| one daemon <= 32 MiB VmHWM after reading every file (aim 16 MiB) | {r['cfg']} | "
          f"{mib(v) + ' MiB' if v else '–'} (keeper + worker summed: {mib(ra['hwm']) if ra else '–'} MiB) | "
          f"{verdict(v, 32 * MiB, 16 * MiB)} |")
    for r in R["four"]:
        if r["system"] != "skiff":
            continue
        v = sum(x["rss"] for x in r["mem"])
        p(f"| four mounts of the image, each after reading every file, <= 128 MiB VmRSS in all | {r['cfg']} | "
          f"{mib(v)} MiB | {verdict(v, 128 * MiB)} |")
    if not R["four"]:
        p("| four mounts <= 128 MiB VmRSS in all | – | not measured (--quick) | – |")
    p("\nOne daemon's VmHWM is the worker's VmHWM plus the keeper's private (anonymous) memory: the keeper's "
      "other resident pages are the binary's, which the worker maps as well, so summing both VmHWM counts "
      "them twice (shown in brackets, an upper bound).")
    sq1 = one("squashfuse_ll", "squashfuse_ll -f")
    if sq1 and "readall" in sq1:
        p(f"\nFor scale: squashfuse_ll after reading every file: VmHWM {mib(sq1['readall']['hwm'])} MiB.\n")
    else:
        p("")

    # ---- one daemon
    p("## 1. One daemon\n")
    p("After mounting (idle), after the import, after reading every file (the same mount, in that order). "
      "Keeper = the RSS of the keeper process alone, included in the sums.\n")
    p("| system | after | VmHWM MiB | VmRSS MiB | PSS MiB | keeper RSS MiB | processes | mount ms | workload s |")
    p("|---|---|---|---|---|---|---|---|---|")
    for r in R["one"]:
        sk = r["system"] == "skiff"
        for ph, label, t in (("idle", "mount", None), ("import", "import", "import_s"),
                             ("readall", "reading every file", "readall_s")):
            if ph not in r:
                continue
            x = r[ph]
            p(f"| {r['cfg']} | {label} | {mib(x['hwm'])} | {mib(x['rss'])} | {mib(x['pss'])} | "
              f"{mib(x['keeper_rss']) if sk else '–'} | {x['procs']} | "
              f"{r['mount_s'] * 1e3:.0f} | {f'{r[t]:.2f}' if t else '–'} |")
    p("")
    defaults = dict(re.findall(r"--([\w-]+) (\S+)", mount_defaults(a.skiff)))
    for r in R["one"]:
        if r["system"] != "skiff" or "readall" not in r:
            continue
        opts = dict(re.findall(r"--([\w-]+) (\S+)", a.snap_opts)) if r["cfg"] == "snapshotter's options" else defaults
        if "cache-mb" in opts:
            cmb = int(opts["cache-mb"])
            p(f"- {r['cfg']}: the memory chunk cache is bounded at {cmb} MiB (`--cache-mb`); after reading every "
              f"file of the image (more data than that bound) the pair's VmRSS is {mib(r['readall']['rss'] - cmb * MiB)} "
              f"MiB above it, if the cache is full ({mib(r['idle']['rss'])} MiB right after mounting).")
    p("")

    # ---- four
    if R["four"]:
        p("## 2. Four mounts of the image, each after reading every file\n")
        p("Four mounts of the same image, one disk cache for the four (the first reader fetches from the "
          "registry, the others read the node's disk cache).\n")
        p("| system | VmRSS in all MiB | PSS in all MiB | VmRSS per daemon MiB | largest VmHWM MiB | read every file s (each) |")
        p("|---|---|---|---|---|---|")
        for r in R["four"]:
            rs = [x["rss"] for x in r["mem"]]
            p(f"| {r['cfg']} | **{mib(sum(rs))}** | {mib(sum(x['pss'] for x in r['mem']))} | "
              f"{', '.join(mib(v) for v in rs)} | {mib(max(x['hwm'] for x in r['mem']))} | "
              f"{', '.join(f'{s:.1f}' for s in r['readall_s'])} |")
        p("")

    # ---- node
    boot = next((r["bootstrap_bytes"] for r in R["one"] if r.get("bootstrap_bytes")), 0)
    p(f"## 3. A node with {n} images mounted\n")
    p(f"{n} mounts of the same image at {n} mountpoints (one image stands for {n}: acceptable for the "
      "daemons' own memory, but PSS then splits the mapped bootstrap, the same file of the node's cache, "
      f"among the {n} daemons, as it does the binary's text; {n} different images would each map their own "
      "bootstrap" + (f", {boot / MiB:.1f} MiB for this image (the node cache's bootstraps directory)"
                     if boot else "") +
      "). One disk cache for all. Mounted one after the other (mount time: start of the command to the "
      f"mount answering), then the import in each, {PARALLEL} at a time. Idle = after mounting, before any "
      "workload.\n")
    p("| system | mount ms: first / median of the rest | idle: RSS / PSS in all MiB | after the import: "
      "RSS in all MiB | PSS in all MiB | per daemon RSS MiB, median (min–max) | per daemon PSS MiB, median | "
      "keeper RSS / PSS MiB, median | import s, median |")
    p("|---|---|---|---|---|---|---|---|---|")
    for r in R["node"]:
        sk = r["system"] == "skiff"
        ms = r["mount_s"]
        rs = [x["rss"] for x in r["mem"]]
        ps = [x["pss"] for x in r["mem"]]
        keeper = (f"{mib(med([x['keeper_rss'] for x in r['mem']]))} / {mib(med([x['keeper_pss'] for x in r['mem']]))}"
                  if sk else "–")
        p(f"| {r['cfg']} | {ms[0] * 1e3:.0f} / {med(ms[1:]) * 1e3:.0f} | "
          f"{mib(sum(x['rss'] for x in r['idle']))} / {mib(sum(x['pss'] for x in r['idle']))} | "
          f"**{mib(sum(rs))}** | **{mib(sum(ps))}** | {mib(med(rs))} ({mib(min(rs))}–{mib(max(rs))}) | "
          f"{mib(med(ps))} | {keeper} | {med(r['import_s']):.2f} |")
    p("")

    # ---- process per image vs one daemon
    snap = next((r for r in R["node"] if r["cfg"] == "snapshotter's options"), None)
    dflt = next((r for r in R["node"] if r["cfg"] == "`skiff mount` defaults"), None)
    sqn = next((r for r in R["node"] if r["system"] == "squashfuse_ll"), None)
    p("## Process per image or one daemon for all images\n")
    if snap and dflt:
        per = lambda r, k: med([x[k] for x in r["mem"]])  # noqa: E731
        idle_pss = med([x["pss"] for x in snap["idle"]])
        keeper_rss = med([x["keeper_rss"] for x in snap["mem"]])
        keeper_pss = med([x["keeper_pss"] for x in snap["mem"]])
        p(f"Skiff runs a process pair per image (keeper + worker). Measured here, each extra image costs, after "
          f"the import: {mib(per(snap, 'pss'))} MiB PSS ({mib(per(snap, 'rss'))} MiB RSS) with the snapshotter's "
          f"options and {mib(per(dflt, 'pss'))} MiB PSS ({mib(per(dflt, 'rss'))} MiB RSS) with the defaults of "
          f"`skiff mount`; an idle mount {mib(idle_pss)} MiB PSS, of which the keeper is {mib(keeper_pss)} MiB PSS "
          f"({mib(keeper_rss)} MiB RSS). What a process per image costs over one daemon for all images "
          f"(Nydus's shared mode, not measured here) is the fixed part: the keeper and the worker's runtime "
          f"(its idle PSS) per image; the chunk data each daemon holds would be held by a shared daemon too, "
          f"unless that daemon shares one memory cache between images. "
          + (f"squashfuse_ll, for scale: {mib(per(sqn, 'pss'))} MiB PSS per image. " if sqn else "")
          + f"Start-up: a mount takes {med(snap['mount_s'][1:]) * 1e3:.0f} ms (median of the mounts after the "
          f"first; the first, which fetches the bootstrap from the registry, {snap['mount_s'][0] * 1e3:.0f} ms): "
          "a process start, the keeper's fork and the worker's exec are part of it, where a shared daemon "
          "would only add a mount to a running process. What one crash takes down: with a process per image, "
          "one image at most, and with the keeper not even that: a worker that dies (kill -9, OOM, a panic) is "
          "replaced and the new one takes the live FUSE connection over, readers see a pause and no error "
          "(docs/operations.md, \"Failover and hot upgrade\"); a dead keeper leaves its worker serving, with "
          "nothing to replace it next. A shared daemon that crashes stalls or breaks every image of the node "
          "at once until it is recovered. The measured extra memory per image buys that isolation.\n")
    else:
        p("Not measured in this run.\n")
    p("Reproduce: `scripts/bench-node` (as root; `--quick` for a smoke run). Raw figures: "
      "`results.json` in the work dir.")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skiff", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--sqfs", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--snap-opts", required=True)
    ap.add_argument("--convert-json")
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
    Path(a.out).write_text(report(a, b.R, m0))
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
