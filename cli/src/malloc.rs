//! glibc malloc settings of the mount daemon, set with `mallopt` when
//! `skiff mount` starts.
//!
//! Measured on the fixture image read whole from a registry (VmHWM):
//! 59 MiB with glibc's defaults, 27-30 MiB with these. Two arenas instead
//! of eight per core: each arena keeps the memory its threads freed, and
//! the pools' threads would each end up with one. A fixed mmap threshold of
//! 64 KiB: chunk buffers (32 KiB to 512 KiB) are then mapped and unmapped,
//! their memory returned at once, where glibc's dynamic threshold rises to
//! 32 MiB after the first free and then keeps freed buffers in the heap. A
//! trim threshold of 128 KiB returns the top of the heap beyond it.
//!
//! `mallopt` rather than `GLIBC_TUNABLES`: tunables are read only when a
//! process starts, so they would cost the mount one more execution of this
//! binary (tens of milliseconds while its pages are not in memory), and the
//! keeper's first worker, forked rather than executed, would not get them.
//! An operator's own `GLIBC_TUNABLES` with malloc settings wins: nothing is
//! changed then.

/// The settings: `mallopt` parameter, value, and its tunable's name.
const SETTINGS: [(libc::c_int, libc::c_int, &str); 3] = [
    (libc::M_ARENA_MAX, 2, "glibc.malloc.arena_max"),
    (
        libc::M_MMAP_THRESHOLD,
        64 << 10,
        "glibc.malloc.mmap_threshold",
    ),
    (
        libc::M_TRIM_THRESHOLD,
        128 << 10,
        "glibc.malloc.trim_threshold",
    ),
];

/// Whether `GLIBC_TUNABLES` (the operator's) names malloc settings.
fn operator_set_malloc() -> bool {
    std::env::var("GLIBC_TUNABLES").is_ok_and(|v| v.contains("glibc.malloc."))
}

/// Applies [`SETTINGS`] to this process (and to the children it forks),
/// unless the operator's `GLIBC_TUNABLES` sets malloc parameters. Call it
/// before any thread starts: arenas made before it keep glibc's limits.
pub fn apply() {
    if operator_set_malloc() {
        return;
    }
    for (param, value, name) in SETTINGS {
        // SAFETY: `mallopt` only sets glibc's malloc parameters, under
        // glibc's own lock; it reads and writes no memory of ours.
        #[allow(unsafe_code)]
        let ok = unsafe { libc::mallopt(param, value) };
        if ok != 1 {
            tracing::warn!("glibc refused malloc setting {name}={value}: defaults use more memory");
        }
    }
}
