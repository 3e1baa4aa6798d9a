//! Which process a PID is: the `/proc` checks that tell a live `skiff mount`
//! (a keeper, a worker) from a dead one or from another program that got
//! its PID.
//!
//! A process in the middle of `execve` (a keeper that upgrades itself)
//! shows an empty `/proc/PID/cmdline` for a moment: the kernel has swapped
//! in the new program's memory and not yet written its arguments there. A
//! check that read that moment as "not a mount" made `skiff upgrade` report
//! a keeper that was upgrading as exited, and would make a health check
//! call a live mount dead. [`cmdline`] waits that moment out, and reads the
//! command line in one `read` (read in pieces, it can be torn by an
//! `execve` between two of them).

use std::io::Read as _;
use std::time::{Duration, Instant};

/// How long [`cmdline`] waits for a live process's empty command line to
/// fill in (a process in `execve`); a kernel thread's stays empty.
const EXEC_WINDOW: Duration = Duration::from_millis(500);

/// The longest command line read (a mount's is a few hundred bytes).
const READ_MAX: usize = 64 * 1024;

/// The process state letter of `pid` (`R`, `S`, `Z`, ...), from
/// `/proc/PID/stat`; `None` when there is no such process.
fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().next()?.chars().next()
}

/// Whether `pid` is a process that has not exited (neither gone nor a
/// zombie).
pub fn is_alive(pid: i32) -> bool {
    !matches!(state(pid), Some('Z' | 'X') | None)
}

/// The command line of live process `pid` (NUL-separated, as in
/// `/proc/PID/cmdline`, read whole in one `read`); `None` when it is gone,
/// a zombie, or has a command line longer than 64 KiB. A command line
/// that reads empty while the process lives is read again for up to half a
/// second: that is a process in `execve`, whose new arguments are about to
/// appear (a kernel thread's stays empty, and is returned so).
pub fn cmdline(pid: i32) -> Option<Vec<u8>> {
    let start = Instant::now();
    loop {
        if !is_alive(pid) {
            return None;
        }
        let line = read_whole(&format!("/proc/{pid}/cmdline"))?;
        if !line.is_empty() || start.elapsed() >= EXEC_WINDOW {
            return Some(line);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The contents of a `/proc` file in one `read`: the kernel answers each
/// `read` from one view of the process, where a file read in pieces can
/// join the start of one program's command line to the rest of the next
/// one's. `None` on an error or when the file does not fit [`READ_MAX`].
fn read_whole(path: &str) -> Option<Vec<u8>> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; READ_MAX];
    let n = file.read(&mut buf).ok()?;
    if n == buf.len() {
        return None;
    }
    buf.truncate(n);
    Some(buf)
}

/// Whether `pid` is a live `skiff mount` process (keeper or worker): alive
/// and with `mount` among its arguments.
pub fn is_live_mount_process(pid: i32) -> bool {
    cmdline(pid).is_some_and(|line| line.split(|b| *b == 0).any(|a| a == b"mount"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A process that re-executes itself many times, with `mount` among its
    /// arguments each time, is a live mount process at every check until
    /// it has exited: the moments inside `execve` are not read as an exit.
    #[test]
    fn a_process_in_execve_is_still_a_live_mount_process() {
        // $0 is the script itself, $1 the count.
        let script =
            "n=$1; if [ \"$n\" -lt 400 ]; then exec /bin/sh -c \"$0\" \"$0\" $((n + 1)) mount; fi";
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg(script)
            .arg("0")
            .arg("mount")
            .spawn()
            .expect("/bin/sh runs");
        let pid = child.id() as i32;
        let mut checks = 0u64;
        while is_live_mount_process(pid) {
            checks += 1;
        }
        // The first "no" must be the real end: the child has exited (a
        // zombie until reaped), not caught between two programs.
        let exited = !is_alive(pid);
        let status = child.wait().expect("the child is reaped");
        assert!(
            exited,
            "PID {pid} was reported not a live mount process while it ran (after {checks} checks)"
        );
        assert!(status.success(), "{status}");
        assert!(checks > 0, "the process was never seen alive");
    }

    #[test]
    fn no_such_process_is_not_alive() {
        // PIDs are at most 2^22 on Linux.
        assert!(!is_alive(i32::MAX));
        assert!(cmdline(i32::MAX).is_none());
        assert!(!is_live_mount_process(i32::MAX));
    }

    #[test]
    fn another_program_is_alive_and_not_a_mount_process() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("sleep runs");
        let pid = child.id() as i32;
        let alive = is_alive(pid);
        let line = cmdline(pid);
        let mount = is_live_mount_process(pid);
        let _ = child.kill();
        let _ = child.wait();
        assert!(alive);
        assert_eq!(line.as_deref(), Some(&b"sleep\x0030\x00"[..]));
        assert!(!mount);
    }
}
