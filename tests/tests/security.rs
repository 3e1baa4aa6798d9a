//! Security defaults, checked on the real thing:
//! - a mount is `ro`, `nosuid`, `nodev`, without `allow_other`, unless the
//!   caller asks (`--suid`, `--dev`, `--allow-other`, what the snapshotter
//!   asks for a container's root filesystem);
//! - the metrics socket and the snapshotter's socket are created 0600;
//! - TLS is verified by default: a registry with a certificate nobody
//!   vouches for is refused, the same one with its CA configured works;
//! - no secret reaches a log or the metrics, even at `RUST_LOG=trace`:
//!   neither a password (Basic auth) nor a bearer token or refresh token.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use skiff_tests::faultproxy::{
    fixture_registry_storage, wait_until, FaultProxy, FaultyRegistry, FIXTURE_REPO,
};
use skiff_tests::harness::{
    remove_all, run_unchecked, scratch_root, skiff_bin, skiff_cmd, test_certs,
};
use skiff_tests::services::{scrape_metrics, stop_child, Registry, SkiffMount};

fn work_dir(name: &str) -> PathBuf {
    let dir = scratch_root().join(format!("security-{name}"));
    remove_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// The mount options and super options of the mount at `mnt`.
fn mount_options(mnt: &Path) -> (Vec<String>, Vec<String>) {
    let want = mnt.to_string_lossy().replace(' ', "\\040");
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .unwrap_or_else(|| panic!("{} is not mounted", mnt.display()));
    let fields: Vec<&str> = line.split(' ').collect();
    let opts = fields[5].split(',').map(str::to_owned).collect();
    let sep = fields
        .iter()
        .position(|f| *f == "-")
        .unwrap_or_else(|| panic!("bad mountinfo line: {line}"));
    let sup = fields
        .get(sep + 3)
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    (opts, sup)
}

fn has(v: &[String], o: &str) -> bool {
    v.iter().any(|x| x == o)
}

#[test]
fn mounts_are_nosuid_nodev_and_private_unless_asked() {
    let dir = work_dir("mount-options");
    let registry = Registry::start_on(&dir.join("registry"), &fixture_registry_storage());
    let image = format!("docker://{}/{FIXTURE_REPO}", registry.host());
    {
        let m = SkiffMount::start(&image, &dir.join("default"), &["--no-prefetch"]);
        let (opts, sup) = mount_options(&m.mnt);
        for o in ["ro", "nosuid", "nodev", "noatime"] {
            assert!(has(&opts, o), "default mount lacks {o}: {opts:?}");
        }
        assert!(
            !has(&sup, "allow_other"),
            "allow_other without being asked: {sup:?}"
        );
        assert!(has(&sup, "default_permissions"), "{sup:?}");
        // The image's setuid bits are shown, and ignored by the kernel.
        let su = fs::metadata(m.p("usr/bin/su")).expect("usr/bin/su in the image");
        assert!(su.mode() & 0o4000 != 0, "the setuid bit of su is lost");
    }
    {
        let m = SkiffMount::start(
            &image,
            &dir.join("asked"),
            &["--no-prefetch", "--suid", "--dev", "--allow-other"],
        );
        let (opts, sup) = mount_options(&m.mnt);
        assert!(
            !has(&opts, "nosuid") && !has(&opts, "nodev") && has(&opts, "ro"),
            "--suid --dev: {opts:?}"
        );
        assert!(has(&sup, "allow_other"), "--allow-other: {sup:?}");
    }
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn sockets_are_created_0600() {
    let dir = work_dir("sockets");
    let registry = Registry::start_on(&dir.join("registry"), &fixture_registry_storage());
    let image = format!("docker://{}/{FIXTURE_REPO}", registry.host());
    // Whatever the umask of whoever starts it.
    let sock = dir.join("m.sock");
    let arg = sock.display().to_string();
    {
        let _m = SkiffMount::start(
            &image,
            &dir.join("mount"),
            &["--no-prefetch", "--metrics-socket", &arg],
        );
        assert_eq!(mode_of(&sock), 0o600, "metrics socket mode");
        scrape_metrics(&sock);
    }
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(".s"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "private bind directories left: {leftovers:?}"
    );

    // The snapshotter: its socket 0600, its root 0711, the registry
    // configuration it writes for its mounts (credentials!) 0600.
    let root = dir.join("sn");
    let address = dir.join("sn.sock");
    let config = dir.join("sn.toml");
    fs::write(
        &config,
        "[registry.auths.\"r.example:5000\"]\nusername = \"u\"\npassword = \"p\"\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let log = fs::File::create(dir.join("sn.log")).unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(skiff_bin())
        .arg("snapshotter")
        .arg("--config")
        .arg(&config)
        .arg("--root")
        .arg(&root)
        .arg("--address")
        .arg(&address)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start skiff snapshotter: {e}"));
    let up = wait_until(Duration::from_secs(60), || {
        std::os::unix::net::UnixStream::connect(&address).is_ok()
    });
    let modes = (
        fs::metadata(&address).map(|_| mode_of(&address)),
        mode_of(&root),
        mode_of(&root.join("registry.toml")),
    );
    stop_child(&mut child, "skiff snapshotter");
    assert!(up, "the snapshotter did not serve");
    assert_eq!(modes.0.ok(), Some(0o600), "snapshotter socket mode");
    assert_eq!(modes.1, 0o711, "snapshotter root mode");
    assert_eq!(modes.2, 0o600, "registry.toml mode");
}

#[test]
fn tls_is_verified_by_default() {
    let dir = work_dir("tls");
    let registry = Registry::start_on(&dir.join("registry"), &fixture_registry_storage());
    // A CA of our own and a server certificate it signs for 127.0.0.1.
    let (ca, cert, key) = test_certs(&dir, "skiff test CA");
    let proxy = FaultProxy::start_tls(&registry.host(), &dir.join("proxy"), &cert, &key);
    let image = format!("docker://{}/{FIXTURE_REPO}", proxy.host());
    let plain = dir.join("plain.toml");
    fs::write(&plain, "use_docker_config = false\n").unwrap_or_else(|e| panic!("{e}"));
    let out = run_unchecked(skiff_cmd(["inspect", &image]).env("SKIFF_REGISTRY_CONFIG", &plain));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.to_lowercase().contains("certificate"),
        "a self-signed registry was not refused: {}\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("after 1 attempt"),
        "an untrusted certificate is not worth retrying: {stderr}"
    );
    // Loopback may fall back to plain HTTP, but not after a certificate
    // error: nothing reached the registry.
    let manifests = || {
        fs::read_to_string(&registry.log)
            .unwrap_or_default()
            .matches("/manifests/")
            .count()
    };
    assert_eq!(manifests(), 0, "a request got through: {stderr}");

    let trusted = dir.join("trusted.toml");
    fs::write(
        &trusted,
        format!(
            "use_docker_config = false\nca_file = \"{}\"\n",
            ca.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = run_unchecked(skiff_cmd(["inspect", &image]).env("SKIFF_REGISTRY_CONFIG", &trusted));
    assert!(
        out.status.success(),
        "with its CA configured: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(manifests() > 0, "nothing reached the registry through TLS");
}

/// Everything a run wrote: the daemon's log, its exit summary, the metrics.
fn everything_written(m: &SkiffMount, metrics: &str) -> String {
    let summary = fs::read_to_string(m.log.with_extension("stdout")).unwrap_or_default();
    format!("{}\n{summary}\n{metrics}", m.logs())
}

fn assert_no_secret(text: &str, secrets: &[String], what: &str) {
    for s in secrets {
        assert!(
            !text.contains(s.as_str()),
            "{what}: a secret ({} characters, starting {:?}) appears in the logs or metrics",
            s.len(),
            &s[..4.min(s.len())]
        );
    }
}

fn base64(s: &str) -> String {
    // Standard alphabet with padding, as in an Authorization header.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn no_secret_in_logs_or_metrics() {
    let user = "skiff-ci";
    let password = "pw-Zq8vR2kLm4Xt9Ws1";
    let mut secrets = vec![password.to_owned(), base64(&format!("{user}:{password}"))];
    for (mode, auth) in [
        (
            "basic",
            format!(r#"{{"mode":"basic","username":"{user}","password":"{password}"}}"#),
        ),
        (
            "bearer",
            format!(
                r#"{{"mode":"bearer","ttl_seconds":2,"max_uses":3,"username":"{user}","password":"{password}"}}"#
            ),
        ),
    ] {
        let dir = work_dir(&format!("secrets-{mode}"));
        let net = FaultyRegistry::start(&dir);
        net.proxy.set_auth(&auth);
        let sock = dir.join("m.sock");
        let sock_arg = sock.display().to_string();
        let env = [
            ("RUST_LOG", "trace"),
            ("SKIFF_REGISTRY_USERNAME", user),
            ("SKIFF_REGISTRY_PASSWORD", password),
        ];
        let mut m = SkiffMount::start_env(
            &net.image(),
            &dir.join("mount"),
            &["--no-prefetch", "--metrics-socket", &sock_arg],
            &env,
        );
        // Enough reads for tokens to expire and be renewed.
        for (i, f) in [
            "etc/os-release",
            "usr/bin/python3.11",
            "usr/lib/os-release",
            "bin/bash",
        ]
        .iter()
        .enumerate()
        {
            let got = fs::read(m.p(f)).unwrap_or_else(|e| panic!("{mode}: reading {f}: {e}"));
            assert!(!got.is_empty(), "{f}");
            if i == 1 {
                std::thread::sleep(Duration::from_millis(2100));
            }
        }
        let metrics = scrape_metrics(&sock);
        m.terminate();
        let stats = net.proxy.stats();
        if let Some(issued) = stats["issued"].as_array() {
            secrets.extend(issued.iter().filter_map(|t| t.as_str().map(str::to_owned)));
        }
        if mode == "bearer" {
            assert!(
                stats["tokens_issued"].as_u64().unwrap_or(0) > 1,
                "tokens were not renewed: {stats}"
            );
        }
        assert!(
            net.proxy.stat("unauthorized") > 0,
            "{mode}: the registry never asked for credentials"
        );
        let text = everything_written(&m, &metrics);
        assert!(
            text.len() > 10_000,
            "{mode}: trace logging wrote only {} bytes",
            text.len()
        );
        assert_no_secret(&text, &secrets, &format!("skiff mount ({mode} auth)"));

        // The one-shot commands too, with their errors.
        let out = run_unchecked(
            skiff_cmd(["inspect", &net.image()])
                .env("RUST_LOG", "trace")
                .env("SKIFF_REGISTRY_USERNAME", user)
                .env("SKIFF_REGISTRY_PASSWORD", password),
        );
        assert!(out.status.success(), "{mode}: inspect failed");
        let bad = run_unchecked(
            skiff_cmd(["inspect", &net.image()])
                .env("RUST_LOG", "trace")
                .env("SKIFF_REGISTRY_USERNAME", user)
                .env("SKIFF_REGISTRY_PASSWORD", format!("{password}-wrong")),
        );
        assert!(
            !bad.status.success(),
            "{mode}: a wrong password was accepted"
        );
        if let Some(issued) = net.proxy.stats()["issued"].as_array() {
            secrets.extend(issued.iter().filter_map(|t| t.as_str().map(str::to_owned)));
        }
        secrets.push(format!("{password}-wrong"));
        let text = format!(
            "{}{}{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&bad.stdout),
            String::from_utf8_lossy(&bad.stderr)
        );
        assert_no_secret(&text, &secrets, &format!("skiff inspect ({mode} auth)"));
        eprintln!(
            "{mode}: {} secrets checked against {} bytes of trace logs and metrics",
            secrets.len(),
            text.len()
        );
    }
}
