#!/usr/bin/env python3
"""The report half of scripts/bench-coldstart: reads its samples (one JSON
object per line: link, workload, system, run, seconds, bytes and requests
over the link, CPU seconds, the bytes of the system's image) and its
meta.json (runs, links, images, workload commands), writes
OUT/coldstart.md (a table per link, the goals of issue 18 with verdicts)
and OUT/coldstart.png (time against the share of the image read; gnuplot,
as the other bench plots).

    bench_coldstart.py META.json SAMPLES.jsonl OUT_DIR [NAME]

NAME (default coldstart) names the two files: OUT/NAME.md and OUT/NAME.png.
"""
import json
import statistics as st
import subprocess
import sys
from pathlib import Path

SYSTEMS = [
    ("oci", "pull + extract (skopeo + umoci) + run"),
    ("ctr-overlayfs", "containerd pull + overlayfs (ctr)"),
    ("skiff", "skiff mount (lazy)"),
    ("skiff-prefetch", "skiff mount, prefetch list"),
    ("skiff-bg", "skiff mount, background fetch on"),
    ("ctr-skiff", "containerd + skiff snapshotter (prefetch list)"),
    ("nydus", "nydusd (registry backend, blobcache, prefetch off)"),
]
LABEL = dict(SYSTEMS)
WORKLOADS = {
    "W1": "python import (`import numpy, pandas`)",
    "W2": "read every file",
    "W3": "one 256 MiB incompressible file, sequential",
    "W4": "`python3 -c pass`",
    "W5": "random reads across 1,500 files",
}
SKIFF = ("skiff", "skiff-prefetch", "skiff-bg", "ctr-skiff")


def link_name(link):
    mbit, rtt = link.split(":")
    rate = f"{int(mbit) // 1000} Gbit/s" if int(mbit) >= 1000 else f"{mbit} Mbit/s"
    return f"{rate} + {rtt} ms RTT"


class Samples:
    def __init__(self, path):
        self.s = {}
        for line in Path(path).read_text().splitlines():
            if line.strip():
                x = json.loads(line)
                self.s.setdefault((x["link"], x["workload"], x["system"]), []).append(x)

    def has(self, link, wl, sys_):
        return (link, wl, sys_) in self.s

    def col(self, link, wl, sys_, k):
        return [x[k] for x in self.s.get((link, wl, sys_), [])]

    def med(self, link, wl, sys_, k):
        v = self.col(link, wl, sys_, k)
        return st.median(v) if v else None

    def image(self, link, wl, sys_):
        v = self.col(link, wl, sys_, "image_bytes")
        return v[0] if v else None


def fmt_time(v):
    return f"{st.median(v):.2f} ({min(v):.2f}..{max(v):.2f})"


def link_table(S, link, workloads, systems):
    rtt = float(link.split(":")[1])
    out = ["| workload | system | seconds, median (min..max) | vs pull + extract | bytes over the link | x its image "
           "| requests | bytes/request | requests x RTT / time | CPU s | CPU s/GB served |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for wl in workloads:
        base = S.med(link, wl, "oci", "seconds")
        for k in systems:
            if not S.has(link, wl, k):
                continue
            t = S.med(link, wl, k, "seconds")
            b = S.med(link, wl, k, "bytes")
            r = S.med(link, wl, k, "requests")
            cpu = S.med(link, wl, k, "cpu")
            img = S.image(link, wl, k)
            vs = "1.00x (baseline)" if k == "oci" else (f"**{base / t:.2f}x**" if base else "–")
            per_gb = f"{cpu / (b / 1e9):.2f}" if b else "–"
            out.append(f"| {wl} | {LABEL[k]} | {fmt_time(S.col(link, wl, k, 'seconds'))} | {vs} | {b / 1e6:.1f} MB "
                       f"| {b / img:.3f} | {r:.0f} | {b / r / 1024:.0f} KiB | {100 * r * rtt / 1000 / t:.0f}% "
                       f"| {cpu:.2f} | {per_gb} |")
    return "\n".join(out)


def goals(S, meta, links, workloads):
    rows = []

    def add(goal, figure, ok):
        rows.append(f"| {goal} | {figure} | {'met' if ok else '**not met**'} |")

    def ratio(link, wl, k):
        b, t = S.med(link, wl, "oci", "seconds"), S.med(link, wl, k, "seconds")
        return b / t if b and t else None

    def pairs(x, y):
        """(link, workload, x's median seconds, y's) where both were measured."""
        for link in links:
            for wl in workloads:
                a, b = S.med(link, wl, x, "seconds"), S.med(link, wl, y, "seconds")
                if a is not None and b is not None:
                    yield link, wl, a, b

    # Ahead of Nydus on every workload and link (Skiff without a prefetch list: Nydus runs with prefetch off).
    if meta.get("nydus"):
        cells, ok = [], True
        for link, wl, a, n in pairs("skiff", "nydus"):
            cells.append(f"{link_name(link)} {wl} {a:.2f} s vs {n:.2f} s")
            ok &= a < n
        add("Ahead of Nydus on every workload and link (skiff mount against nydusd, both without a prefetch list)",
            "; ".join(cells), ok)
    else:
        add("Ahead of Nydus on every workload and link", "Nydus not measured in this run", False)
    # Never slower than pull + extract.
    cells, ok = [], True
    for link in links:
        for wl in workloads:
            for k in SKIFF:
                r = ratio(link, wl, k)
                if r is None:
                    continue
                if r < 1:
                    cells.append(f"{link_name(link)} {wl} {k} {r:.2f}x")
                ok &= r >= 1
    add("Never slower than pull + extract on any workload and link (every Skiff system)",
        "every cell >= 1x" if ok else "slower: " + "; ".join(cells), ok)
    for link in links:
        r = ratio(link, "W2", "skiff")
        if r is not None:
            add(f"W2 >= 1.5x pull + extract, {link_name(link)}", f"{r:.2f}x", r >= 1.5)
    for link in links:
        t, b = S.med(link, "W3", "skiff", "seconds"), S.med(link, "W3", "skiff", "bytes")
        if t:
            mbit = float(link.split(":")[0])
            rate = b * 8 / t / 1e6
            add(f"W3 >= 90% of the link's rate, {link_name(link)} (bytes over the link / time, mount to end)",
                f"{rate:.0f} Mbit/s = {100 * rate / mbit:.0f}%", rate >= 0.9 * mbit)
    slow = [link for link in links if link.split(":")[1] == "20"] or links[:1]
    for link in slow:
        for k, goal in (("skiff-prefetch", 5.0), ("skiff", 3.5)):
            r = ratio(link, "W1", k)
            if r is not None:
                add(f"W1 >= {goal}x {'with' if k != 'skiff' else 'without'} the prefetch list, {link_name(link)}",
                    f"{r:.2f}x", r >= goal)
    cells, ok, worst = [], True, 0
    for link in links:
        for wl in workloads:
            for k in SKIFF:
                b, img = S.med(link, wl, k, "bytes"), S.image(link, wl, k)
                if b is None:
                    continue
                worst = max(worst, b / img)
                if b / img > 1.05:
                    cells.append(f"{link_name(link)} {wl} {k} {b / img:.3f}x")
                    ok = False
    add("Bytes over the link <= 1.05x the image, every workload (Skiff systems)",
        f"worst {worst:.3f}x" + ("" if ok else ": " + "; ".join(cells)), ok)
    # The background fetch's default: on only if it never slowed a workload.
    cells, slower = [], []
    for link, wl, a, g in pairs("skiff", "skiff-bg"):
        cells.append(f"{link_name(link)} {wl} {a:.2f} s -> {g:.2f} s")
        if g > a * 1.05:
            slower.append(f"{link_name(link)} {wl}")
    if cells:
        verdict = ("on: it slowed no workload by more than 5%" if not slower
                   else "off (the default): it slowed " + ", ".join(slower) + " by more than 5%")
        rows.append(f"| Background fetch of the rest on or off by default as measured "
                    f"(skiff mount without, then with `--background-fetch on`) | {'; '.join(cells)} | {verdict} |")
    cells, ok = [], True
    for link in links:
        rtt = float(link.split(":")[1])
        for wl in workloads:
            b, r, t = (S.med(link, wl, "skiff", k) for k in ("bytes", "requests", "seconds"))
            if b is None:
                continue
            share = r * rtt / 1000 / t
            cells.append(f"{link_name(link)} {wl} {b / r / 1024:.0f} KiB ({100 * share:.0f}%)")
            ok &= share <= 0.10
    add("Requests large enough that RTT costs little: skiff mount's bytes per request, and requests x RTT as a "
        "share of the time (the bench's bar: <= 10%, as if every request waited its round trip alone)",
        "; ".join(cells), ok)
    return "| goal | figure | verdict |\n|---|---|---|\n" + "\n".join(rows)


def plot(S, links, workloads, systems, png):
    """Time against the share of the image read (skiff mount's bytes over the
    link / its image, the workload's median), one panel per link."""
    d = png.with_suffix(".dat")
    blocks, names = [], []
    for li, link in enumerate(links):
        for k in systems:
            pts = []
            for wl in workloads:
                b, img = S.med(link, wl, "skiff", "bytes"), S.image(link, wl, "skiff")
                t = S.med(link, wl, k, "seconds")
                if b is None or t is None:
                    continue
                pts.append((100 * b / img, t, wl))
            if pts:
                blocks.append("\n".join(f"{x:.2f} {t:.3f} {wl}" for x, t, wl in sorted(pts)))
                names.append((li, k))
    if not blocks:
        # The x axis is skiff mount's share of the image: without it in
        # the run there is nothing to place the points by.
        print("bench_coldstart: no plot: the run has no skiff mount samples", file=sys.stderr)
        return
    d.write_text("\n\n\n".join(blocks) + "\n")
    s = [f'set terminal pngcairo size 1100,{380 * len(links) + 40} font "sans,10"', f'set output "{png}"',
         f"set multiplot layout {len(links)},1",
         'set xlabel "share of the image read (skiff mount: bytes over the link / image, %)"',
         'set ylabel "seconds to workload done"', "set key outside right", "set grid", "set logscale y",
         "set xrange [0:100]"]
    for li, link in enumerate(links):
        plots = []
        for bi, (lj, k) in enumerate(names):
            if lj != li:
                continue
            plots.append(f'"{d}" index {bi} using 1:2 with linespoints lw 2 title "{LABEL[k]}"')
            if k == "skiff":
                plots.append(f'"{d}" index {bi} using 1:2:3 with labels offset 0,1 notitle')
        if not plots:
            # A link without skiff samples (a partial run): no panel.
            continue
        s.append(f'set title "{link_name(link)}"')
        s.append("plot " + ", ".join(plots))
    s.append("unset multiplot")
    try:
        subprocess.run(["gnuplot"], input="\n".join(s).encode(), check=True)
    finally:
        d.unlink()


def main():
    meta = json.loads(Path(sys.argv[1]).read_text())
    S = Samples(sys.argv[2])
    out = Path(sys.argv[3])
    name = sys.argv[4] if len(sys.argv) > 4 else "coldstart"
    links = meta["links"].split()
    workloads = meta["workloads"].split(",")
    systems = [k for k, _ in SYSTEMS if any(S.has(link, wl, k) for link in links for wl in workloads)]
    md = ["# Cold start over a shaped link: five workloads, two links\n"]
    md.append(
        "Registry on 127.0.0.1 (Debian docker-registry); its replies shaped with tc htb on lo, and a delay proxy "
        "(scripts/delay-proxy.py) adding the round-trip time to every request. Each system starts from empty caches "
        "(page cache dropped, fresh chunk cache, fresh containerd root; all written to a fresh journaled ext4 on a loop "
        "device, as a node's disk) and the time runs from the first request to "
        f"the end of the workload. Medians of {meta['runs']} run(s) (min..max). Bytes and requests over the link are "
        "the registry access log's GETs and HEADs (manifests, configs, bootstraps included); `x its image` divides "
        "by the system's own image (gzip layers for the pulls, blobs + bootstrap layer for Skiff and Nydus). CPU s is "
        "user + system time of the daemon (skiff: keeper + worker; ctr-skiff: snapshotter + image daemons; nydusd) "
        "or of the pull (skopeo + umoci; containerd + ctr), per GB over the link. `requests x RTT / time`: the share "
        "of the time the requests' round trips would take if each waited alone. The skiff-prefetch and ctr-skiff "
        "images list what that workload read in a recording run (`skiff mount --record-access`, then `skiff convert "
        "--prefetch-list`); `skiff mount, background fetch on` mounts the image without a list with "
        "`--background-fetch on` (the rest of the image fetched beside the workload). "
        "Made by `scripts/bench-coldstart " + str(meta["runs"])
        + ("" if meta["links"] == "100:20 1000:1" else f" --links '{meta['links']}'") + "`"
        + (f" with NYDUSD and NYDUS_IMAGE set ({meta.get('nydus_version', 'Nydus')})" if meta.get("nydus") else "")
        + ".\n")
    if meta["runs"] == 1:
        md.append("> **One run**: no spread; good for finding where time goes, not for close calls.\n")
    if meta.get("nydus"):
        md.append(f"Nydus ({meta.get('nydus_version', 'nydusd')}, built from source outside this repository): each "
                  "layer converted with `nydus-image create --type tar-rafs --fs-version 6 --compressor zstd "
                  "--chunk-size 0x100000`, then `nydus-image merge`; blobs and the bootstrap layer (image/image.boot "
                  "in a tar.gz) pushed to the same registry. The bootstrap layer is fetched through the link before "
                  "nydusd starts (fusedev, registry backend through the same delay proxy, blobcache, fs_prefetch off, "
                  "amplify_io and digest_validate at their defaults: Nydus does not verify chunks, Skiff does).\n")
    if not meta.get("nydus"):
        md.append("> **Nydus not measured**: NYDUSD and NYDUS_IMAGE were not set to the binaries.\n")
    md.append("## Workloads and images\n")
    md.append("| workload | what | command | files in its prefetch list | entries (whole files or stretches) |\n"
              "|---|---|---|---|---|")
    for wl in workloads:
        cmd = meta["commands"][wl].strip().replace("\n", " ").replace("|", "\\|")
        if len(cmd) > 90:
            cmd = cmd[:87] + "..."
        listed = meta["commands"].get(wl + "-listed", 0)
        stretches = meta["commands"].get(wl + "-stretches", listed)
        md.append(f"| {wl} | {WORKLOADS[wl]} | `{cmd}` | {listed:,} | {stretches:,} |")
    md.append("\n| image | OCI gzip layers | Skiff (blobs + bootstrap layer) | Nydus (blobs + bootstrap layer) |"
              "\n|---|---|---|---|")
    for iname, im in meta["images"].items():
        ny = f"{im['nydus'] / 1e6:.1f} MB" if im.get("nydus") else "not measured"
        what = "the fixture (W1, W2, W4, W5)" if iname == "python" else "the fixture + /weights.bin (W3)"
        md.append(f"| {iname}: {what} | {im['oci'] / 1e6:.1f} MB | {im['skiff'] / 1e6:.1f} MB | {ny} |")
    md.append("")
    for link in links:
        md.append(f"## {link_name(link)}\n")
        md.append(link_table(S, link, workloads, systems) + "\n")
    md.append("## Goals (issue 18)\n")
    md.append(goals(S, meta, links, workloads) + "\n")
    md.append("## Plot\n\nTime against the share of the image the workload reads (x: skiff mount's bytes over the "
              "link divided by its image, the workload's median; W3 on its own image), log scale.\n\n"
              f"![{name}.png]({name}.png)\n")
    out.mkdir(parents=True, exist_ok=True)
    plot(S, links, workloads, systems, out / f"{name}.png")
    (out / f"{name}.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
