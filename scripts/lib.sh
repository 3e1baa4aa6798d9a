# shellcheck shell=bash
# Shared helpers for Skiff's scripts. Source it from a script that runs under
# `set -euo pipefail`:
#
#   . "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
#
# Provides: logging (log, info, warn, die, step), repo_root, have, need_root,
# ensure_apt PKG..., ensure_rust, human_bytes, file_size; for benchmarks:
# free_port, registry_start, shape_sport, unshape.

# Guard against being sourced twice.
if [ -n "${SKIFF_LIB_SH:-}" ]; then
  return 0
fi
SKIFF_LIB_SH=1

# ---------------------------------------------------------------- logging --

if [ -t 2 ] && [ -z "${NO_COLOR:-}" ]; then
  _skiff_c_step=$'\033[1;34m' _skiff_c_warn=$'\033[1;33m' _skiff_c_err=$'\033[1;31m' _skiff_c_off=$'\033[0m'
else
  _skiff_c_step='' _skiff_c_warn='' _skiff_c_err='' _skiff_c_off=''
fi

# The name that prefixes every message: the calling script's file name.
SKIFF_SCRIPT_NAME=${SKIFF_SCRIPT_NAME:-$(basename "$0")}

# log MSG...: a plain progress line on stderr.
log() { printf '%s: %s\n' "$SKIFF_SCRIPT_NAME" "$*" >&2; }

# info MSG...: an alias of log, for readability at call sites.
info() { log "$@"; }

# warn MSG...: a highlighted warning on stderr.
warn() { printf '%s%s: warning: %s%s\n' "$_skiff_c_warn" "$SKIFF_SCRIPT_NAME" "$*" "$_skiff_c_off" >&2; }

# die MSG...: an error on stderr, then exit 1.
die() {
  printf '%s%s: error: %s%s\n' "$_skiff_c_err" "$SKIFF_SCRIPT_NAME" "$*" "$_skiff_c_off" >&2
  exit 1
}

# step MSG...: a section header on stderr.
step() { printf '\n%s==> %s%s\n' "$_skiff_c_step" "$*" "$_skiff_c_off" >&2; }

# ----------------------------------------------------------------- basics --

# repo_root: prints the absolute path of the repository (the parent of scripts/).
repo_root() { (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); }

# have CMD: true when CMD is on PATH.
have() { command -v "$1" >/dev/null 2>&1; }

# need_root WHAT: dies unless running as root.
need_root() {
  [ "$(id -u)" -eq 0 ] || die "$1 needs root (run this script as root, e.g. with sudo)"
}

# human_bytes N: prints N bytes as a short human-readable size (MB with one decimal).
human_bytes() { awk -v b="$1" 'BEGIN { if (b < 1e6) printf "%.1f kB", b / 1e3; else printf "%.1f MB", b / 1e6 }'; }

# file_size FILE: prints the size of FILE in bytes.
file_size() { stat -c %s "$1"; }

# now: seconds since the epoch, with nanoseconds.
now() { date +%s.%N; }

# elapsed START: seconds since START (from `now`), one decimal.
elapsed() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

# ------------------------------------------------------------ benchmarks --

# free_port: prints a TCP port of 127.0.0.1 that is free now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

REGISTRY_PID=

# registry_start DIR PORT: Debian's docker-registry on 127.0.0.1:PORT with
# its storage in DIR/registry (emptied first), config DIR/registry.yml and
# log DIR/registry.log (errors, and the access log: one line per request
# with the bytes sent).
# Sets REGISTRY_PID; returns once it answers /v2/.
registry_start() {
  local dir=$1 port=$2 _
  rm -rf "$dir/registry"
  mkdir -p "$dir/registry"
  printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$dir/registry" "$port" >"$dir/registry.yml"
  docker-registry serve "$dir/registry.yml" >"$dir/registry.log" 2>&1 &
  REGISTRY_PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && return 0
    kill -0 "$REGISTRY_PID" 2>/dev/null || break
    sleep 0.1
  done
  die "the registry did not start on 127.0.0.1:$port: $(tail -5 "$dir/registry.log")"
}

# shape_sport PORT MBIT: what is sent from 127.0.0.1:PORT on lo goes at
# MBIT Mbit/s (tc htb; this kernel has no netem: add latency with
# scripts/delay-proxy.py), everything else unshaped. Replaces lo's root qdisc.
shape_sport() {
  local port=$1 mbit=$2
  tc qdisc del dev lo root 2>/dev/null || true
  tc qdisc add dev lo root handle 1: htb default 10 r2q 100000
  tc class add dev lo parent 1: classid 1:10 htb rate 40gbit
  tc class add dev lo parent 1: classid 1:20 htb rate "${mbit}mbit" ceil "${mbit}mbit"
  tc filter add dev lo protocol ip parent 1: prio 1 u32 match ip sport "$port" 0xffff flowid 1:20
}

# unshape: removes what shape_sport set up.
unshape() { tc qdisc del dev lo root 2>/dev/null || true; }

# scratch_disk DIR GIB: mounts at DIR a fresh ext4 file system with a
# journal, GIB GiB in a sparse image file DIR.img beside it (a loop device
# with direct I/O, so that its pages are cached once), replacing the one an
# earlier run left there (it stays mounted after a run, for its logs).
# Benchmarks that create and delete many files run on it as a node's disk:
# ext4 without a journal (this machine's root file system) skips inodes
# deleted in the last 30 s one by one on every create
# (ext4 find_inode_bit/recently_deleted), and a run that followed another
# spent 3-4 s of system time there (256 MiB cached as 8,500 files after
# the last run deleted as many), which is this machine, not Skiff.
scratch_disk() {
  local dir=$1 gib=$2 img=$1.img dev
  if mountpoint -q "$dir"; then
    dev=$(findmnt -no SOURCE "$dir")
    umount "$dir" 2>/dev/null || umount -l "$dir"
    case $dev in /dev/loop*) losetup -d "$dev" 2>/dev/null || true ;; esac
  fi
  rm -rf "$dir" "$img"
  mkdir -p "$dir"
  truncate -s "${gib}G" "$img"
  mkfs.ext4 -q -F "$img" || return 1
  dev=$(losetup -f --show --direct-io=on "$img") || return 1
  mount "$dev" "$dir" || { losetup -d "$dev"; return 1; }
  # Detach now: on a mounted device this only marks it to go when the file
  # system does. Otherwise a later run that has to unmount lazily (a process
  # still inside) could not detach it, and the deleted image would keep its
  # disk space until reboot (measured: 45 GB held by seven such devices).
  losetup -d "$dev" 2>/dev/null || true
}

# -------------------------------------------------------------------- apt --

_skiff_apt_updated=0

# apt_installed PKG: true when the Debian package PKG is installed.
apt_installed() {
  dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed
}

# ensure_apt PKG...: installs the Debian packages that are not installed yet.
# Runs `apt-get update` once per process, and only when something is missing.
ensure_apt() {
  local missing=() p
  have dpkg-query || die "ensure_apt: dpkg-query not found: this needs a Debian or Ubuntu system"
  for p in "$@"; do
    apt_installed "$p" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  need_root "installing ${missing[*]}"
  local apt_opts=(-q -o DPkg::Lock::Timeout=600)
  local apt_log=${TMPDIR:-/tmp}/skiff-apt.log
  if [ "$_skiff_apt_updated" -eq 0 ]; then
    log "apt-get update (to install: ${missing[*]})"
    DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" update >"$apt_log" 2>&1 \
      || { tail -n 30 "$apt_log" >&2; die "apt-get update failed (log: $apt_log)"; }
    _skiff_apt_updated=1
  fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y --no-install-recommends \
    "${missing[@]}" >"$apt_log" 2>&1 \
    || { tail -n 30 "$apt_log" >&2; die "apt-get install ${missing[*]} failed (log: $apt_log)"; }
  for p in "${missing[@]}"; do
    apt_installed "$p" || die "package $p is still not installed after apt-get install (log: $apt_log)"
  done
}

# ------------------------------------------------------------------- rust --

# ensure_rust: makes cargo (with rustfmt and clippy) available on PATH.
# Uses an existing toolchain (also ~/.cargo/bin), else tries Debian's `rustup`
# package, else the rustup installer from sh.rustup.rs. Best effort: dies with
# a clear message when no toolchain can be had.
ensure_rust() {
  if ! have cargo && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  fi
  if ! have cargo; then
    warn "cargo not found: trying to install a Rust toolchain with rustup"
    if ! have rustup; then
      # Debian 13+ packages rustup; Debian 12 does not (ignore the failure).
      if apt-cache show rustup >/dev/null 2>&1; then
        ensure_apt rustup || true
      fi
    fi
    if ! have rustup && have curl; then
      curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
        | sh -s -- -y --profile minimal --component rustfmt,clippy >&2 || true
      export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    fi
    if have rustup && ! have cargo; then
      rustup default stable >&2 || true
    fi
    have cargo || die "no Rust toolchain: install one (https://rustup.rs, Rust >= 1.85 with rustfmt and clippy) and re-run"
  fi
  if have rustup; then
    local c
    for c in rustfmt clippy; do
      if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
        log "rustup component add $c"
        rustup component add "$c" >&2 || warn "could not add the rustup component $c"
      fi
    done
  fi
}

# -------------------------------------------------------------- containerd --

CONTAINERD_PID=
SNAPSHOTTER_PID=

# containerd_start DIR SKIFF [SNAPSHOTTER_CONFIG]: a private containerd (root,
# state and socket under DIR, CRI off) with `SKIFF snapshotter` (root
# DIR/skiff) as its proxy plugin "skiff". Sets CONTAINERD_PID and
# SNAPSHOTTER_PID and returns once containerd reaches the plugin.
# containerd 1.6 keeps shim sockets in /run/containerd/s whatever its config.
containerd_start() {
  local dir=$1 skiff=$2 sncfg=${3:-} _
  mkdir -p "$dir/fifo" "$dir/runc" /run/containerd/s
  printf 'version = 2\nroot = "%s"\nstate = "%s"\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "%s"\n[ttrpc]\n  address = "%s"\n[proxy_plugins.skiff]\n  type = "snapshot"\n  address = "%s"\n' \
    "$dir/root" "$dir/state" "$dir/containerd.sock" "$dir/containerd.sock.ttrpc" "$dir/skiff.sock" >"$dir/config.toml"
  "$skiff" snapshotter ${sncfg:+--config "$sncfg"} --root "$dir/skiff" --address "$dir/skiff.sock" >"$dir/snapshotter.log" 2>&1 &
  SNAPSHOTTER_PID=$!
  containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
  CONTAINERD_PID=$!
  for _ in $(seq 150); do
    ctr --address "$dir/containerd.sock" snapshots --snapshotter skiff ls >/dev/null 2>&1 && return 0
    kill -0 "$CONTAINERD_PID" 2>/dev/null || die "containerd did not start: $(tail -5 "$dir/containerd.log")"
    kill -0 "$SNAPSHOTTER_PID" 2>/dev/null || die "skiff snapshotter did not start: $(tail -5 "$dir/snapshotter.log")"
    sleep 0.2
  done
  die "containerd does not reach the skiff snapshotter: $(tail -5 "$dir/containerd.log")"
}

# containerd_stop DIR: stops what containerd_start started and unmounts what
# is left below DIR, image mounts included (their daemons outlive the
# snapshotter on purpose; they exit when unmounted).
containerd_stop() {
  local dir=$1 mnt pid
  for pid in "$CONTAINERD_PID" "$SNAPSHOTTER_PID"; do
    [ -n "$pid" ] || continue
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  CONTAINERD_PID=''
  SNAPSHOTTER_PID=''
  [ -n "$dir" ] || return 0
  while read -r mnt; do
    fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  done < <(awk -v d="$(realpath -m "$dir")" 'index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r)
}
