#!/usr/bin/env python3
"""The engine of scripts/bench: every benchmark, every system side by side.

Run it through scripts/bench (which installs the tools and builds skiff).
Standard library only. Each figure is measured for every system in the same
loop iteration (the order rotating from run to run), so that the machine's
noise cancels out in the ratios; figures are medians of RUNS with min..max.

Systems: native (the extracted tree on the host filesystem: the limit),
skiff (`skiff mount`), erofs (mkfs.erofs -zlz4hc, kernel erofs on the file),
squashfuse_ll and squashfuse (mksquashfs -comp zstd), and "today": a plain
extract of the OCI gzip layers (tar -xzf).

Raw samples go to WORK/results.json; the report is made from that file, so
`--report-only` rewrites the report without measuring again.
"""

import argparse
import gzip
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("SKIFF_FIXTURES", ROOT.parent / "shared" / "fixtures"))
SKIFF = Path(os.environ.get("SKIFF_BIN", ROOT / "target" / "release" / "skiff"))
# Where `skiff mount` (as root, without --cache-dir) keeps verified bootstraps.
SKIFF_BOOTSTRAPS = Path("/var/cache/skiff/bootstraps")
WORKLOAD = os.environ.get("SKIFF_WORKLOAD", "python3 -c 'import numpy, pandas'")
MTIME = 1_700_000_000
MiB = 1 << 20

# Report sections, in order; --quick fails if any is missing.
SECTIONS = [
    "Machine",
    "Goals",
    "Conversion",
    "Mount time",
    "Metadata walk",
    "Read throughput",
    "Python import workload",
    "Cold start over a shaped link",
    "Many nodes through a mirror",
    "Daemon memory",
    "Dedup across two image versions",
    "Plots",
]

FUSE_SYSTEMS = ("skiff", "squashfuse_ll", "squashfuse")
LABEL = {
    "native": "native tree (limit)",
    "skiff": "Skiff (FUSE)",
    "erofs": "erofs (kernel)",
    "squashfuse_ll": "squashfuse_ll",
    "squashfuse": "squashfuse",
    "today": "OCI: tar -xzf of the layers",
    "zcat": "zcat of the layers (floor)",
    "mksquashfs": "mksquashfs -comp zstd",
    "mkfs.erofs": "mkfs.erofs -zlz4hc",
    "skiff_convert": "skiff convert",
}


def log(*a):
    print("bench:", *a, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def run(cmd, **kw):
    """Runs cmd (a list), raising BenchError with its stderr on failure."""
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.PIPE)
    p = subprocess.run(cmd, **kw)
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace")[-2000:] if isinstance(p.stderr, bytes) else ""
        raise BenchError(f"{' '.join(map(str, cmd))} exited {p.returncode}: {err}")
    return p


def timed(cmd, **kw):
    t = time.perf_counter()
    run(cmd, **kw)
    return time.perf_counter() - t


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def warm_files(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(4 * MiB):
                pass


def warm_tree(tree):
    run(["sh", "-c", 'tar -C "$1" -cf - . | cat > /dev/null', "sh", str(tree)])


def rmtree(p):
    if os.path.lexists(p):
        run(["rm", "-rf", "--one-file-system", str(p)])


def du_files(paths):
    return sum(os.path.getsize(p) for p in paths)


# ------------------------------------------------------------- datasets --


class Dataset:
    def __init__(self, name, title, work):
        self.name = name
        self.title = title
        self.dir = work / name
        self.layers = []  # gzip layer tars, lowest first
        self.tree = self.dir / "tree"  # the extracted tree (native)
        self.source = None  # skiff convert source args (default: --layer ...)
        self.workload = False  # run the python import workload
        self.big_file = None  # relative path: random 4 KiB reads on it
        self.files = []  # relative paths of regular files, sorted
        self.file_bytes = 0
        self.tar_bytes = 0

    def finish(self):
        """Lists the regular files of the tree and writes the NUL lists."""
        files, total = [], 0
        for dirpath, dirnames, filenames in os.walk(self.tree):
            dirnames.sort()
            for n in sorted(filenames):
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                if (st.st_mode & 0o170000) == 0o100000:
                    files.append(os.path.relpath(p, self.tree))
                    total += st.st_size
        self.files, self.file_bytes = files, total
        (self.dir / "files.seq").write_bytes(b"".join(b"./" + f.encode() + b"\0" for f in files))
        shuffled = files[:]
        random.Random(7).shuffle(shuffled)
        (self.dir / "files.rand").write_bytes(b"".join(b"./" + f.encode() + b"\0" for f in shuffled))
        if not self.tar_bytes:
            self.tar_bytes = sum(tar_size(layer) for layer in self.layers)

    def info(self):
        return {
            "title": self.title,
            "files": len(self.files),
            "file_bytes": self.file_bytes,
            "tar_bytes": self.tar_bytes,
            "gzip_bytes": du_files(self.layers),
            "layers": len(self.layers),
        }


def tar_size(gz):
    n = 0
    with gzip.open(gz, "rb") as f:
        while True:
            b = f.read(4 * MiB)
            if not b:
                return n
            n += len(b)


def gzip_file(src, dst):
    """gzip -n -6 (what image builders write), pigz when present."""
    tool = ["pigz", "-n", "-6", "-c"] if shutil.which("pigz") else ["gzip", "-n", "-6", "-c"]
    with open(dst, "wb") as out:
        run(tool + [str(src)], stdout=out)


def tar_tree(tree, dst):
    run(["tar", "-C", str(tree), "--sort=name", "--owner=0", "--group=0", "--numeric-owner",
         f"--mtime=@{MTIME}", "--format=pax", "--pax-option=delete=atime,delete=ctime",
         "-cf", str(dst), "."])


def fixture_dataset(work):
    layout, tag = FIXTURES / "images", "python"
    ds = Dataset("python", "fixture image `python` (2 gzip layers)", work)
    index = json.loads((layout / "index.json").read_text())
    digest = next(m["digest"] for m in index["manifests"]
                  if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    blob = lambda d: layout / "blobs" / d.replace(":", "/")  # noqa: E731
    manifest = json.loads(blob(digest).read_text())
    ds.layers = [blob(layer["digest"]) for layer in manifest["layers"]]
    ds.source = [f"oci:{layout}:{tag}"]
    ds.workload = True
    marker = ds.dir / "tree.complete"
    if not marker.exists():
        log("extracting the fixture image with umoci (once)")
        rmtree(ds.dir)
        ds.dir.mkdir(parents=True)
        copy = ds.dir / "layout-copy"
        run(["cp", "-a", str(layout), str(copy)])
        run(["umoci", "unpack", "--image", f"{copy}:{tag}", str(ds.dir / "bundle")])
        os.rename(ds.dir / "bundle" / "rootfs", ds.tree)
        rmtree(ds.dir / "bundle")
        rmtree(copy)
        marker.write_text("ok\n")
    return ds


WORDS = ("import def return self value numpy pandas class lambda yield for in range if else "
         "elif while try except finally with as from None True False print len dict list "
         "tuple set str int float bytes open read write close path join os sys json").split()


def corpus(size, seed):
    rng = random.Random(seed)
    out, n = [], 0
    while n < size:
        w = rng.choice(WORDS) if rng.random() < 0.85 else str(rng.getrandbits(20))
        sep = "\n" if rng.random() < 0.1 else " "
        out.append(w + sep)
        n += len(w) + 1
    return "".join(out).encode()[:size]


def small_dataset(work, nfiles):
    """nfiles small files (lognormal sizes, median ~1.8 KB, at most 64 KiB) in
    directories of 100, two levels deep; text-like content (~3:1 with zstd)."""
    ds = Dataset(f"small-{nfiles}", f"synthetic: {nfiles:,} small files", work)
    layer = ds.dir / "layer.tar"
    ds.layers = [ds.dir / "layer.tar.gz"]
    marker = ds.dir / "tree.complete"
    if not marker.exists():
        log(f"generating {nfiles} small files (once)")
        rmtree(ds.dir)
        ds.tree.mkdir(parents=True)
        rng = random.Random(nfiles)
        text = corpus(8 * MiB, 1)
        for i in range(nfiles):
            d = ds.tree / f"d{i // 10000:02d}" / f"s{(i // 100) % 100:02d}"
            if i % 100 == 0:
                d.mkdir(parents=True, exist_ok=True)
            size = min(64 << 10, int(math.exp(rng.gauss(7.5, 1.3))))
            head = f"# file {i}\n".encode()
            off = rng.randrange(0, len(text) - (64 << 10))
            p = d / f"f{i:06d}.py"
            p.write_bytes((head + text[off:off + size])[:max(size, len(head))])
            os.utime(p, (MTIME, MTIME))
        run(["find", str(ds.tree), "-type", "d", "-exec", "touch", "-h", "-d", f"@{MTIME}", "{}", "+"])
        tar_tree(ds.tree, layer)
        gzip_file(layer, ds.layers[0])
        ds.tar_bytes = layer.stat().st_size
        layer.unlink()
        (ds.dir / "tar_bytes").write_text(str(ds.tar_bytes))
        marker.write_text("ok\n")
    ds.tar_bytes = int((ds.dir / "tar_bytes").read_text())
    return ds


def big_dataset(work, size):
    """One file of `size` bytes: each 64 KiB block is 32 KiB of random bytes
    and 32 KiB of text, so about 2:1 compressible and no block repeats."""
    label = f"{size // (1 << 30)} GiB" if size >= 1 << 30 else f"{size // MiB} MiB"
    ds = Dataset(f"big-{size // MiB}m", f"synthetic: one {label} file", work)
    ds.big_file = "data/big.bin"
    layer = ds.dir / "layer.tar"
    ds.layers = [ds.dir / "layer.tar.gz"]
    marker = ds.dir / "tree.complete"
    if not marker.exists():
        log(f"generating one {label} file (once)")
        rmtree(ds.dir)
        (ds.tree / "data").mkdir(parents=True)
        rng = random.Random(size)
        text = corpus(4 * MiB, 2)
        p = ds.tree / ds.big_file
        with open(p, "wb") as f:
            for b in range(size // (64 << 10)):
                off = (b * 40961) % (len(text) - (32 << 10))
                f.write(rng.randbytes(32 << 10) + text[off:off + (32 << 10)])
        os.utime(p, (MTIME, MTIME))
        run(["find", str(ds.tree), "-type", "d", "-exec", "touch", "-h", "-d", f"@{MTIME}", "{}", "+"])
        tar_tree(ds.tree, layer)
        gzip_file(layer, ds.layers[0])
        ds.tar_bytes = layer.stat().st_size
        layer.unlink()
        (ds.dir / "tar_bytes").write_text(str(ds.tar_bytes))
        marker.write_text("ok\n")
    ds.tar_bytes = int((ds.dir / "tar_bytes").read_text())
    return ds


# ---------------------------------------------------------------- mounts --


def process_tree(pid):
    """`pid` and its descendants (/proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


class Mount:
    """One mounted system; unmount() is idempotent."""

    live = []

    def __init__(self, system, ds, mnt, proc=None, stdout=None):
        self.system, self.ds, self.mnt, self.proc, self.stdout = system, ds, mnt, proc, stdout
        self.stats = {}
        Mount.live.append(self)

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def memory(self):
        """VmRSS and VmHWM of the daemon and its children, summed: a Skiff
        mount run as root is a keeper holding the FUSE connection and the
        worker serving it."""
        if not self.proc:
            return None
        out = {"VmRSS": 0, "VmHWM": 0}
        for pid in process_tree(self.proc.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                k, _, v = line.partition(":")
                if k in out:
                    out[k] += int(v.split()[0]) * 1024
        return out

    def cpu(self):
        """CPU seconds (user + system) the daemon and its children have
        used so far; None for systems without a daemon (kernel, native)."""
        if not self.proc:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in process_tree(self.proc.pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / tick

    def unmount(self):
        if self not in Mount.live:
            return
        Mount.live.remove(self)
        if self.system == "native":
            return
        if self.system == "erofs":
            run(["umount", str(self.mnt)])
            return
        if self.system == "skiff":
            self.proc.send_signal(signal.SIGTERM)
        else:
            for attempt in range(50):
                if subprocess.run(["fusermount3", "-u", str(self.mnt)],
                                  stderr=subprocess.DEVNULL).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                subprocess.run(["fusermount3", "-uz", str(self.mnt)])
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise BenchError(f"{self.system} daemon did not exit after unmount")
        if self.system == "skiff":
            text = Path(self.stdout).read_text()
            m = re.search(r"skiff: unmounted .*", text)
            if m:
                self.stats = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(0))}
            if self.proc.returncode != 0:
                raise BenchError(f"skiff mount exited {self.proc.returncode}: {text[-1000:]}")


def mount(system, ds, work):
    """Mounts ds on system; returns (Mount, seconds until the root answers)."""
    if system == "native":
        return Mount(system, ds, ds.tree), None
    mnt = work / "mnt" / system
    mnt.mkdir(parents=True, exist_ok=True)
    base = os.stat(mnt).st_dev
    if system == "erofs":
        t = timed(["mount", "-t", "erofs", "-o", "ro", str(ds.dir / "tree.erofs"), str(mnt)])
        return Mount(system, ds, mnt), t
    logf = work / f"mount-{system}.log"
    if system == "skiff":
        cmd = [str(SKIFF), "mount", f"oci:{ds.dir / 'skiff'}:img", str(mnt)]
    else:
        cmd = [system, "-f", str(ds.dir / "tree.sqfs"), str(mnt)]
    t0 = time.perf_counter()
    with open(logf, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    m = Mount(system, ds, mnt, proc, logf)
    while True:
        if proc.poll() is not None:
            Mount.live.remove(m)
            raise BenchError(f"{' '.join(cmd)} exited {proc.returncode}: {logf.read_text()[-2000:]}")
        if os.stat(mnt).st_dev != base:
            break
        if time.perf_counter() - t0 > 60:
            raise BenchError(f"{system}: not mounted after 60 s")
        time.sleep(0.0005)
    return m, time.perf_counter() - t0


def warm_program(system):
    """Loads `system`'s mount program (and its libraries) into the page
    cache by running it once, harmlessly; returns the seconds it took (None
    for a system without a program)."""
    cmd = {"skiff": [str(SKIFF), "--version"], "erofs": ["mount", "--version"],
           "squashfuse_ll": ["squashfuse_ll", "--help"], "squashfuse": ["squashfuse", "--help"]}.get(system)
    if not cmd:
        return None
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def unmount_all():
    for m in list(Mount.live):
        try:
            m.unmount()
        except Exception as e:  # noqa: BLE001 (clean-up goes on)
            log(f"unmounting {m.mnt}: {e}")
            if m.proc and m.proc.poll() is None:
                m.proc.kill()


# ------------------------------------------------------------ workloads --


def find_walk(mnt):
    return timed(["find", str(mnt)])


def stat_walk(mnt):
    # -printf with %s stats every entry, in one process.
    return timed(["find", str(mnt), "-printf", "%s %m %U %T@\n"])


def read_list(mnt, listfile):
    return timed(["xargs", "-0", "-a", str(listfile), "cat"], cwd=str(mnt))


def random_pread(path, count, seed=11, block=4096):
    size = os.path.getsize(path)
    rng = random.Random(seed)
    offsets = [rng.randrange(0, size // block) * block for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t = time.perf_counter()
        for off in offsets:
            if len(os.pread(fd, block, off)) != block:
                raise BenchError(f"short read at {off} of {path}")
        return time.perf_counter() - t
    finally:
        os.close(fd)


def workload(mnt):
    return timed(["chroot", str(mnt), "sh", "-c", WORKLOAD])


def cpu_floor(ds, work, R, size=256 * MiB):
    """This machine's floor for serving a GB: zstd decompression alone (the
    zstd CLI, one thread, level 4 frames), BLAKE3 alone (b3sum, one thread:
    the chunk hash of images since format 1.4) and SHA-256 alone (OpenSSL
    through hashlib: the chunk hash before), in CPU seconds per GB of data,
    on the data set's own bytes."""
    sample, packed = work / "floor.bin", work / "floor.bin.zst"
    with open(ds.layers[0], "rb") as f, open(sample, "wb") as out:
        z = subprocess.Popen(["zcat", "-f"], stdin=f, stdout=subprocess.PIPE)
        out.write(z.stdout.read(size))
        z.stdout.close()
        z.wait()
    data = sample.read_bytes()
    gb = len(data) / 1e9
    run(["zstd", "-q", "-f", "-4", "-T1", str(sample), "-o", str(packed)])
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run(["zstd", "-q", "-d", "-c", "-T1", str(packed)])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        R.add(f"{ds.name}/cpu_floor/zstd", (after.ru_utime + after.ru_stime
                                             - before.ru_utime - before.ru_stime) / gb)
        t = time.process_time()
        hashlib.sha256(data).digest()
        R.add(f"{ds.name}/cpu_floor/sha256", (time.process_time() - t) / gb)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run(["b3sum", "--num-threads", "1", "--no-names", str(sample)])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        R.add(f"{ds.name}/cpu_floor/blake3", (after.ru_utime + after.ru_stime
                                               - before.ru_utime - before.ru_stime) / gb)
    sample.unlink()
    packed.unlink()


# ------------------------------------------------------------ measuring --


class Results:
    def __init__(self, path):
        self.path = path
        self.data = {"samples": {}, "datasets": {}, "values": {}}

    def add(self, key, value):
        if value is not None:
            self.data["samples"].setdefault(key, []).append(value)

    def set(self, key, value):
        self.data["values"][key] = value

    def save(self):
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))


def rotate(seq, i):
    i %= len(seq)
    return seq[i:] + seq[:i]


def convert_json(src_args, d):
    with open(d / "convert.json", "wb") as out:
        return timed([str(SKIFF), "convert", "--no-progress", "--json", *src_args, f"oci:{d / 'skiff'}:img"],
                     stdout=out)


def bench_convert(ds, runs, R, work, quick):
    """Conversion (and the 'today' extract), each tool in the same iteration."""
    d = ds.dir
    inputs_gz = [str(p) for p in ds.layers]
    skiff_src = ds.source or [a for p in ds.layers for a in ("--layer", str(p))]

    def prepare():
        drop_caches()
        warm_files(ds.layers)
        warm_tree(ds.tree)

    tools = {
        "zcat": lambda: timed(["sh", "-c", 'for l; do zcat "$l"; done > /dev/null', "sh", *inputs_gz]),
        "today": lambda: timed(["sh", "-c", 'd=$1; shift; mkdir -p "$d" && cd "$d" && for l; do tar -xzf "$l"; done',
                                "sh", str(d / "extract"), *inputs_gz]),
        "skiff_convert": lambda: convert_json(skiff_src, d),
        "mksquashfs": lambda: timed(["mksquashfs", str(ds.tree), str(d / "tree.sqfs"), "-comp", "zstd",
                                     "-Xcompression-level", "3", "-noappend", "-no-progress", "-quiet"]),
        "mkfs.erofs": lambda: timed(["mkfs.erofs", "-zlz4hc", "--quiet", str(d / "tree.erofs"), str(ds.tree)]),
    }
    outputs = {"today": d / "extract", "skiff_convert": d / "skiff",
               "mksquashfs": d / "tree.sqfs", "mkfs.erofs": d / "tree.erofs"}
    for i in range(runs):
        log(f"{ds.name}: conversion run {i + 1}/{runs}")
        for name in rotate(list(tools), i):
            if name in outputs:
                rmtree(outputs[name])
            prepare()
            R.add(f"{ds.name}/convert/{name}", tools[name]())
    rmtree(d / "extract")
    conv = json.loads((d / "convert.json").read_text())
    R.set(f"{ds.name}/size/skiff", conv["bytes_out"])
    R.set(f"{ds.name}/size/skiff_json", conv)
    R.set(f"{ds.name}/size/squashfs", (d / "tree.sqfs").stat().st_size)
    R.set(f"{ds.name}/size/erofs", (d / "tree.erofs").stat().st_size)
    R.set(f"{ds.name}/size/oci", du_files(ds.layers))
    if ds.workload and not quick:
        # Size only: squashfs at its default zstd level (15), as the anchors quote.
        run(["mksquashfs", str(ds.tree), str(d / "tree15.sqfs"), "-comp", "zstd", "-noappend",
             "-no-progress", "-quiet"])
        R.set(f"{ds.name}/size/squashfs15", (d / "tree15.sqfs").stat().st_size)
        (d / "tree15.sqfs").unlink()


def bench_mounts(ds, systems, runs, R, work, quick):
    """Mount, walks, reads, workload, memory: every system in each iteration."""
    seq_list, rand_list = ds.dir / "files.seq", ds.dir / "files.rand"
    nrand = 512 if quick else 8192
    k = lambda *a: "/".join((ds.name,) + a)  # noqa: E731
    for i in range(runs):
        log(f"{ds.name}: mount/read run {i + 1}/{runs}")
        for s in rotate(list(systems), i):
            if s == "skiff":
                # A0: the first mount of the image on this node: no verified
                # bootstrap in the cache directory yet (fetched, decompressed,
                # hashed and stored). Later mounts map the stored one.
                shutil.rmtree(SKIFF_BOOTSTRAPS, ignore_errors=True)
                drop_caches()
                m, t = mount(s, ds, work)
                R.add(k("mount_first", s), t)
                m.unmount()
            # A: mount cold, find cold and warm, stat warm, mount warm.
            drop_caches()
            m, t = mount(s, ds, work)
            R.add(k("mount_cold", s), t)
            R.add(k("find_cold", s), find_walk(m.mnt))
            R.add(k("find_warm", s), find_walk(m.mnt))
            R.add(k("stat_warm", s), stat_walk(m.mnt))
            mem = m.memory()
            if mem:
                R.add(k("rss_walk", s), mem["VmRSS"])
                R.add(k("hwm_walk", s), mem["VmHWM"])
            m.unmount()
            m, t = mount(s, ds, work)
            R.add(k("mount_warm", s), t)
            m.unmount()
            # A2: the image cold, the programs warm: a node that starts
            # containers often has its daemon's binary in the page cache,
            # and only the image is new (each system's own binary warmed).
            # The program alone from a cold page cache: the part of a cold
            # mount that is loading it.
            drop_caches()
            t = warm_program(s)
            if t is not None:
                R.add(k("program_cold", s), t)
            m, t = mount(s, ds, work)
            R.add(k("mount_image_cold", s), t)
            m.unmount()
            # B: stat of every entry, cold.
            drop_caches()
            m, _ = mount(s, ds, work)
            R.add(k("stat_cold", s), stat_walk(m.mnt))
            m.unmount()
            # C: sequential read of every file, cold then warm; memory after.
            drop_caches()
            m, _ = mount(s, ds, work)
            cpu0 = m.cpu()
            R.add(k("seq_cold", s), read_list(m.mnt, seq_list))
            cpu1 = m.cpu()
            if cpu0 is not None and cpu1 is not None:
                # The daemon's CPU (decode + verify + FUSE) per GB served.
                R.add(k("cpu_seq_cold", s), (cpu1 - cpu0) / (ds.file_bytes / 1e9))
            R.add(k("seq_warm", s), read_list(m.mnt, seq_list))
            mem = m.memory()
            if mem:
                R.add(k("rss_read", s), mem["VmRSS"])
                R.add(k("hwm_read", s), mem["VmHWM"])
            m.unmount()
            # D: random reads, cold then warm.
            drop_caches()
            m, _ = mount(s, ds, work)
            if ds.big_file:
                path = os.path.join(m.mnt, ds.big_file)
                R.add(k("rand_cold", s), random_pread(path, nrand))
                R.add(k("rand_warm", s), random_pread(path, nrand))
            else:
                R.add(k("rand_cold", s), read_list(m.mnt, rand_list))
                R.add(k("rand_warm", s), read_list(m.mnt, rand_list))
            m.unmount()
            # E: the python import workload, cold then warm.
            if ds.workload:
                drop_caches()
                m, t = mount(s, ds, work)
                R.add(k("workload_mount", s), t)
                R.add(k("workload_cold", s), workload(m.mnt))
                R.add(k("workload_warm", s), workload(m.mnt))
                m.unmount()
                if s == "skiff":
                    for f in ("bytes_read", "bytes_fetched", "chunks_fetched", "reads"):
                        if f in m.stats:
                            R.add(k("workload_" + f, s), m.stats[f])
        R.save()
    R.set(k("rand_reads"), nrand if ds.big_file else None)


# ------------------------------------------------------------ dedup --


def build_v2_layer(l2_gz, out_tar, wheel, old_prefixes, prefix):
    """v2's app layer: v1's layer 2 with one Python package replaced by the
    wheel's files; every other entry copied as it is, in the same order."""
    with tarfile.open(l2_gz, "r|gz") as src, tarfile.open(out_tar, "w", format=tarfile.PAX_FORMAT) as dst:
        added = False
        for m in src:
            name = m.name[2:] if m.name.startswith("./") else m.name
            if any(name == p.rstrip("/") or name.startswith(p) for p in old_prefixes):
                if not added:
                    add_wheel(dst, wheel, prefix)
                    added = True
                continue
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        if not added:
            raise BenchError(f"none of {old_prefixes} found in {l2_gz}")


def add_wheel(dst, wheel, prefix):
    with zipfile.ZipFile(wheel) as z:
        dirs = set()
        for n in sorted(z.namelist()):
            parts = n.split("/")
            for j in range(1, len(parts)):
                d = "/".join(parts[:j])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(prefix + d)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
                    dst.addfile(ti)
            data = z.read(n)
            ti = tarfile.TarInfo(prefix + n)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            dst.addfile(ti, io.BytesIO(data))


def apply_layer(tree, layer_tar, remove):
    for r in remove:
        rmtree(tree / r)
    run(["tar", "-C", str(tree), "-xf", str(layer_tar)])


def layout_bytes(layout, tags):
    """Distinct blobs (manifest, config, layers) that the tags of an OCI
    layout reference: what a registry stores for them."""
    index = json.loads((layout / "index.json").read_text())
    seen = {}
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") not in tags:
            continue
        seen[m["digest"]] = m["size"]
        man = json.loads((layout / "blobs" / m["digest"].replace(":", "/")).read_text())
        for d in [man["config"]] + man["layers"]:
            seen[d["digest"]] = d["size"]
    return seen


def bench_dedup(work, R, quick, ds_small=None):
    d = work / "dedup"
    rmtree(d)
    d.mkdir(parents=True)
    if quick:
        # The same steps on the small synthetic tree: v2 adds a layer that
        # rewrites 1% of the files.
        v1_layers = list(ds_small.layers)
        v1_tree = ds_small.tree
        mod = d / "mod-tree"
        for f in ds_small.files[::100]:
            p = mod / f
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"# v2\n" + (v1_tree / f).read_bytes())
        tar_tree(mod, d / "l2v2.tar")
        remove = []
        change = f"{len(ds_small.files[::100])} of {len(ds_small.files)} files rewritten in a second layer"
    else:
        ds = fixture_dataset(work)
        v1_layers = list(ds.layers)
        v1_tree = ds.tree
        wheels = work / "wheels"
        wheels.mkdir(exist_ok=True)
        version = os.environ.get("SKIFF_BENCH_V2_REQUESTS", "2.32.3")
        wheel = wheels / f"requests-{version}-py3-none-any.whl"
        if not wheel.exists():
            log(f"downloading requests {version} from PyPI (once)")
            run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                 f"requests=={version}", "-d", str(wheels)])
        site = "usr/local/lib/python3.11/dist-packages/"
        old = sorted(p.name for p in (v1_tree / site).glob("requests*"))
        if not old:
            raise BenchError(f"no requests package under {site} of the fixture")
        remove = [site + o for o in old]
        build_v2_layer(ds.layers[-1], d / "l2v2.tar", wheel, [r + "/" for r in remove], site)
        change = f"`requests` {'/'.join(old)} replaced by {version} in layer 2 (layer 1 identical)"
    gzip_file(d / "l2v2.tar", d / "l2v2.tar.gz")
    v2_layers = (v1_layers + [d / "l2v2.tar.gz"]) if quick else (v1_layers[:-1] + [d / "l2v2.tar.gz"])
    v2_tree = d / "v2-tree"
    run(["cp", "-a", str(v1_tree), str(v2_tree)])
    apply_layer(v2_tree, d / "l2v2.tar", remove)

    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    oci_v1 = {sha(p): p.stat().st_size for p in v1_layers}
    oci_v2 = {sha(p): p.stat().st_size for p in v2_layers}
    res = {"change": change, "oci": {"v1": sum(oci_v1.values()), "v2": sum(oci_v2.values()),
                                     "pair": sum({**oci_v1, **oci_v2}.values())}}
    layer_args = lambda ls: [a for p in ls for a in ("--layer", str(p))]  # noqa: E731
    for name, dict_args in (("skiff", []), ("skiff_dict", ["--chunk-dict", f"oci:{d / 'skiff_dict'}:v1"])):
        lay = d / name
        run([str(SKIFF), "convert", "--no-progress", *layer_args(v1_layers), f"oci:{lay}:v1"])
        run([str(SKIFF), "convert", "--no-progress", *dict_args, *layer_args(v2_layers), f"oci:{lay}:v2"])
        b1, b2 = layout_bytes(lay, {"v1"}), layout_bytes(lay, {"v2"})
        res[name] = {"v1": sum(b1.values()), "v2": sum(b2.values()), "pair": sum({**b1, **b2}.values())}
    for name, cmd in (("squashfs", ["mksquashfs", "{src}", "{dst}", "-comp", "zstd", "-Xcompression-level", "3",
                                    "-noappend", "-no-progress", "-quiet"]),
                      ("erofs", ["mkfs.erofs", "-zlz4hc", "--quiet", "{dst}", "{src}"])):
        sizes = {}
        for v, tree in (("v1", v1_tree), ("v2", v2_tree)):
            dst = d / f"{v}.{name}"
            run([c.format(src=tree, dst=dst) for c in cmd])
            sizes[v] = dst.stat().st_size
        res[name] = {"v1": sizes["v1"], "v2": sizes["v2"], "pair": sizes["v1"] + sizes["v2"]}
    R.set("dedup", res)
    rmtree(d)


# ------------------------------------------------------------ coldstart --


def bench_coldstart(R, runs):
    """The shaped-link cold start (registry, tc htb, delay proxy) lives in
    scripts/bench-coldstart; run it and keep its table."""
    p = subprocess.run([str(ROOT / "scripts" / "bench-coldstart"), str(runs)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise BenchError(f"scripts/bench-coldstart exited {p.returncode}: {p.stderr.decode()[-2000:]}")
    R.set("coldstart_md", (ROOT / "bench" / "coldstart.md").read_text())


def bench_cluster(R):
    """N nodes through a pull-through mirror lives in scripts/bench-cluster;
    run it and keep its table."""
    p = subprocess.run([str(ROOT / "scripts" / "bench-cluster")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise BenchError(f"scripts/bench-cluster exited {p.returncode}: {p.stderr.decode()[-2000:]}")
    R.set("cluster_md", (ROOT / "bench" / "cluster.md").read_text())


# ------------------------------------------------------------ machine --


def machine():
    def first(path, key):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"
    mem = first("/proc/meminfo", "MemTotal")
    src = subprocess.run(["df", "--output=source,fstype,size", str(WORK)], stdout=subprocess.PIPE,
                         text=True).stdout.splitlines()[-1].split()
    dev = os.path.basename(src[0])
    rot = Path(f"/sys/block/{dev}/queue/rotational")
    kind = ("rotational" if rot.read_text().strip() == "1" else "non-rotational") if rot.exists() else "?"
    if dev.startswith("vd"):
        kind += ", virtio"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
    return {
        "cpu": first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "os": next((line.split("=", 1)[1].strip('"') for line in Path("/etc/os-release").read_text().splitlines()
                    if line.startswith("PRETTY_NAME=")), "?"),
        "memory": f"{int(mem.split()[0]) / (1 << 20):.1f} GiB" if mem != "?" else "?",
        "disk": f"{src[0]} ({src[1]}, {int(src[2]) / (1 << 20):.0f} GiB, {kind})",
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


# ------------------------------------------------------------ main --


def main():
    global WORK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-coldstart", action="store_true")
    ap.add_argument("--no-cluster", action="store_true")
    ap.add_argument("--datasets", help="comma-separated subset: python,small,big")
    ap.add_argument("--steps", help="comma-separated subset of coldstart,cluster,convert,mounts,dedup; "
                    "keeps the other figures of the last run")
    a = ap.parse_args()
    base = Path(os.environ.get("SKIFF_BENCH_WORK", "/var/tmp/skiff-bench"))
    WORK = base / ("harness-quick" if a.quick else "harness")
    WORK.mkdir(parents=True, exist_ok=True)
    out = a.out or ((WORK / "report") if a.quick else (ROOT / "bench"))
    R = Results(WORK / "results.json")
    import bench_report  # noqa: E402 (beside this file)

    steps = set((a.steps or "coldstart,cluster,convert,mounts,dedup").split(","))
    if a.report_only or (a.steps and R.path.exists()):
        R.data = json.loads(R.path.read_text())
    if not a.report_only:
        runs = a.runs or (1 if a.quick else 3)
        n_small = 2_000 if a.quick else 100_000
        big = 32 * MiB if a.quick else 2 << 30
        wanted = set((a.datasets or ("small,big" if a.quick else "python,small,big")).split(","))
        R.data["config"] = {"quick": a.quick, "runs": runs, "workload": WORKLOAD}
        R.data["machine"] = machine()
        R.data.setdefault("samples", {})
        R.data.setdefault("values", {})
        R.data.setdefault("datasets", {})
        systems = ["native", "skiff", "erofs", "squashfuse_ll", "squashfuse"]
        R.data["systems"] = systems
        datasets = []
        if "python" in wanted:
            datasets.append(fixture_dataset(WORK))
        if "small" in wanted:
            datasets.append(small_dataset(WORK, n_small))
        if "big" in wanted:
            datasets.append(big_dataset(WORK, big))
        for ds in datasets:
            ds.finish()
            R.data["datasets"][ds.name] = ds.info()
        if not a.steps:
            R.data["order"] = [ds.name for ds in datasets]
        if not a.quick and not a.no_coldstart and "coldstart" in steps:
            log("cold start over a shaped link (scripts/bench-coldstart)")
            bench_coldstart(R, runs)
        if not a.quick and not a.no_cluster and "cluster" in steps:
            log("many nodes through a mirror (scripts/bench-cluster)")
            bench_cluster(R)
        for ds in datasets:
            if "convert" in steps:
                for key in [k for k in R.data["samples"] if k.startswith(ds.name + "/convert/")]:
                    del R.data["samples"][key]
                bench_convert(ds, runs, R, WORK, a.quick)
                R.save()
            if "mounts" in steps:
                for key in [k for k in R.data["samples"] if k.startswith(ds.name + "/")
                            and not k.startswith(ds.name + "/convert/")]:
                    del R.data["samples"][key]
                bench_mounts(ds, systems, runs, R, WORK, a.quick)
                cpu_floor(ds, WORK, R, (16 if a.quick else 256) * MiB)
                R.save()
        if "dedup" in steps:
            log("dedup across two versions")
            small = next((ds for ds in datasets if ds.name.startswith("small")), None)
            bench_dedup(WORK, R, a.quick, small)
        R.data["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        R.save()
    report = bench_report.write(R.data, out, SECTIONS)
    missing = [s for s in SECTIONS if f"## {s}" not in report.read_text()]
    if missing:
        raise BenchError(f"report {report} lacks sections: {', '.join(missing)}")
    for png in bench_report.PLOTS:
        p = out / png
        if not p.exists() or p.stat().st_size < 1000:
            raise BenchError(f"plot {p} missing or empty")
    log(f"report: {report}")


WORK = Path("/var/tmp/skiff-bench/harness")

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        main()
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
    finally:
        unmount_all()
