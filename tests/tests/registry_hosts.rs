//! containerd's registry host configuration (`hosts.toml` under its
//! `config_path`) read by `skiff mount`, with real parts only: two
//! docker-registry instances serving the converted fixture, each behind
//! `scripts/fault-proxy.py`, whose counters say which one served the lazy
//! Range reads and with which `ns` query parameter.
//!
//! - A mirror listed in `hosts.toml` serves every Range request, each with
//!   `ns=<the image's registry>` as containerd sends it; the origin serves
//!   none. When the mirror goes away, reads fall back to the origin and none
//!   fails.
//! - A TLS mirror named in `_default/hosts.toml` is trusted through the `ca`
//!   file the same `hosts.toml` names (relative to it); without that `ca`
//!   its certificate is refused and reads go to the origin, again without a
//!   failed read.
//! - A TLS registry whose CA is among the system's (`SSL_CERT_FILE`, or a
//!   file in `SSL_CERT_DIR`) is trusted; with neither naming it, the mount
//!   is refused with a certificate error and never falls back to HTTP.
//!
//! Every byte read is compared with the fixture's reference tree.

use std::fs;
use std::path::{Path, PathBuf};

use skiff_tests::faultproxy::{fixture_registry_storage, FaultProxy, FaultyRegistry, FIXTURE_REPO};
use skiff_tests::harness::{reference_files, remove_all, scratch_root, test_certs, umoci_rootfs};
use skiff_tests::services::{MountFailure, Registry, SkiffMount};

/// Short timeouts: a dead mirror must not slow the test down.
const REGISTRY_CONFIG: &str = "use_docker_config = false
use_env_proxy = false
connect_timeout_ms = 2000
read_timeout_ms = 5000

[retry]
max_attempts = 4
initial_backoff_ms = 100
max_backoff_ms = 1000
deadline_ms = 20000
";

fn work_dir(name: &str) -> PathBuf {
    let dir = scratch_root().join(format!("registry-hosts-{name}"));
    remove_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

fn write(path: &Path, text: &str) {
    if let Some(d) = path.parent() {
        fs::create_dir_all(d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    }
    fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Regular files of the reference tree of 64 KiB to 1 MiB, spread over the
/// tree (relative paths).
fn sample_files(n: usize) -> Vec<String> {
    let all = reference_files(64 << 10, 1 << 20);
    assert!(all.len() >= n * 3, "too few reference files: {}", all.len());
    (0..n)
        .map(|i| all[(i * 7919) % all.len()].clone())
        .collect()
}

/// Reads `rel` through the mount and compares it with the reference: a
/// failed read or a wrong byte fails the test.
fn read_and_check(mount: &SkiffMount, rel: &str) {
    let got = fs::read(mount.p(rel))
        .unwrap_or_else(|e| panic!("reading {rel} through the mount failed: {e}"));
    let want = fs::read(umoci_rootfs().join(rel))
        .unwrap_or_else(|e| panic!("reading the reference of {rel}: {e}"));
    assert!(got == want, "WRONG BYTES in {rel}");
}

/// Mounts the fixture from `origin` (`host:port` of its proxy) with the
/// hosts directory `hosts`: no prefetch and no readahead, so that every
/// read makes its own Range requests.
fn mount(origin: &str, hosts: &Path, dir: &Path) -> SkiffMount {
    try_mount(origin, hosts, dir, &[]).unwrap_or_else(|f| {
        panic!(
            "skiff mount did not become ready ({}):\n{}",
            f.reason, f.log
        )
    })
}

/// [`mount`], with more environment for the daemon, for a mount that may
/// be refused.
fn try_mount(
    origin: &str,
    hosts: &Path,
    dir: &Path,
    env: &[(&str, &str)],
) -> Result<SkiffMount, MountFailure> {
    let config = dir.join("registry.toml");
    write(&config, REGISTRY_CONFIG);
    let config = config.display().to_string();
    let hosts = hosts.display().to_string();
    let mut env = env.to_vec();
    env.push(("SKIFF_REGISTRY_CONFIG", &config));
    env.push(("SKIFF_REGISTRY_HOSTS_DIR", &hosts));
    SkiffMount::try_start_env(
        &format!("docker://{origin}/{FIXTURE_REPO}"),
        &dir.join("mount"),
        &["--no-prefetch", "--chunk-readahead-kb", "0"],
        &env,
    )
}

/// From a registry's access log: range GETs of blobs answered 206, and
/// how many of them carried `ns=<ns>` (URL-encoded as containerd does).
/// (The control endpoints of a TLS proxy are not reachable over plain TCP:
/// the registry behind it keeps the count.)
fn access_log_ranges(registry: &Registry, ns: &str) -> (usize, usize) {
    let log = fs::read_to_string(&registry.log).unwrap_or_default();
    let encoded = format!("ns={}", ns.replace(':', "%3A"));
    let ranges: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/") && l.contains("\" 206 "))
        .collect();
    let with_ns = ranges.iter().filter(|l| l.contains(&encoded)).count();
    (ranges.len(), with_ns)
}

/// How many range requests `proxy` saw with `ns=<ns>`.
fn range_ns(proxy: &FaultProxy, ns: &str) -> u64 {
    proxy.stats()["range_ns"][ns].as_u64().unwrap_or(0)
}

#[test]
fn mirror_in_hosts_toml_serves_ranges_with_ns_and_falls_back_to_the_origin() {
    let dir = work_dir("mirror");
    let origin = FaultyRegistry::start(&dir.join("origin"));
    let mirror = FaultyRegistry::start(&dir.join("mirror"));
    let ns = origin.proxy.host();
    let m = mirror.proxy.host();
    // containerd's lookup order: `host_port_` comes before `host:port`.
    let hosts = dir.join("certs.d");
    write(
        &hosts
            .join(format!("127.0.0.1_{}_", origin.proxy.port))
            .join("hosts.toml"),
        &format!(
            "server = \"http://{ns}\"\n\n[host.\"http://{m}\"]\n  capabilities = [\"pull\"]\n  [host.\"http://{m}\".header]\n    x-skiff-test = \"mirror\"\n"
        ),
    );
    // A `_default` that must not be used: this registry has its own directory.
    write(
        &hosts.join("_default").join("hosts.toml"),
        "server = \"http://127.0.0.1:9\"\n",
    );
    let mnt = mount(&ns, &hosts, &dir);
    let files = sample_files(6);

    for f in &files[..3] {
        read_and_check(&mnt, f);
    }
    let served = mirror.proxy.stat("range_requests");
    assert!(served > 0, "the mirror served no range request");
    assert_eq!(
        range_ns(&mirror.proxy, &ns),
        served,
        "range requests to the mirror without ns={ns}: {}",
        mirror.proxy.stats()
    );
    assert_eq!(
        origin.proxy.stat("range_requests"),
        0,
        "the origin served range requests while the mirror was up"
    );
    // The tag was resolved at the origin (the mirror may only pull), and
    // requests to the origin itself carry no ns.
    assert!(origin.proxy.stats()["ns"][""].as_u64().unwrap_or(0) > 0);
    assert_eq!(
        origin.proxy.stats()["ns"].as_object().map(|o| o.len()),
        Some(1)
    );
    eprintln!(
        "mirror up: {served} range requests to the mirror, all with ns={ns}; 0 to the origin"
    );

    // The mirror goes away: reads fall back to the origin, none fails.
    drop(mirror);
    for f in &files[3..] {
        read_and_check(&mnt, f);
    }
    let fallback = origin.proxy.stat("range_requests");
    assert!(fallback > 0, "no range request reached the origin");
    eprintln!("mirror down: {fallback} range requests to the origin, no failed read");
}

#[test]
fn tls_mirror_in_default_hosts_toml_is_trusted_through_its_ca() {
    let dir = work_dir("tls");
    let origin = FaultyRegistry::start(&dir.join("origin"));
    let (ca, cert, key) = test_certs(&dir.join("pki"), "skiff hosts.toml test CA");
    let registry = Registry::start_on(&dir.join("mirror"), &fixture_registry_storage());
    let mirror = FaultProxy::start_tls(&registry.host(), &dir.join("mirror-proxy"), &cert, &key);
    let ns = origin.proxy.host();
    let m = mirror.host();
    let files = sample_files(4);

    // `_default` applies to every registry; the CA path is relative to the
    // hosts.toml. The mirror may resolve tags too: the origin sees nothing.
    let trusted = dir.join("trusted");
    let default = trusted.join("_default");
    fs::create_dir_all(&default).unwrap_or_else(|e| panic!("{e}"));
    fs::copy(&ca, default.join("mirror-ca.pem")).unwrap_or_else(|e| panic!("{e}"));
    write(
        &default.join("hosts.toml"),
        &format!(
            "[host.\"https://{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"mirror-ca.pem\"\n"
        ),
    );
    {
        let mnt = mount(&ns, &trusted, &dir.join("trusted-mount"));
        for f in &files[..2] {
            read_and_check(&mnt, f);
        }
    }
    let (served, with_ns) = access_log_ranges(&registry, &ns);
    assert!(served > 0, "the TLS mirror served no range request");
    assert_eq!(
        with_ns, served,
        "range requests to the mirror without ns={ns}"
    );
    assert_eq!(
        origin.proxy.stat("requests"),
        0,
        "the origin was asked although the mirror resolves and pulls"
    );
    eprintln!(
        "TLS mirror trusted through hosts.toml's ca: {served} range requests, all with ns={ns}"
    );

    // Without the CA the mirror's certificate is refused: every read goes
    // to the origin and none fails.
    let untrusted = dir.join("untrusted");
    write(
        &untrusted.join("_default").join("hosts.toml"),
        &format!("[host.\"https://{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    );
    {
        let mnt = mount(&ns, &untrusted, &dir.join("untrusted-mount"));
        for f in &files[2..] {
            read_and_check(&mnt, f);
        }
    }
    assert_eq!(
        access_log_ranges(&registry, &ns).0,
        served,
        "an untrusted mirror was read"
    );
    assert!(origin.proxy.stat("range_requests") > 0);
}

/// Mounts the fixture from the TLS registry `host` with the system CAs
/// read from `file` and `certs` (`SSL_CERT_FILE`, `SSL_CERT_DIR`).
fn mount_with_system_cas(
    host: &str,
    dir: &Path,
    file: &Path,
    certs: &Path,
) -> Result<SkiffMount, MountFailure> {
    let (file, certs) = (file.display().to_string(), certs.display().to_string());
    try_mount(
        host,
        &dir.join("no-hosts"),
        dir,
        &[("SSL_CERT_FILE", &file), ("SSL_CERT_DIR", &certs)],
    )
}

#[test]
fn a_tls_registry_is_trusted_through_the_system_cas_of_ssl_cert_file_or_dir() {
    let dir = work_dir("system-cas");
    let (ca, cert, key) = test_certs(&dir.join("pki"), "skiff system CA test");
    let registry = Registry::start_on(&dir.join("registry"), &fixture_registry_storage());
    let tls = FaultProxy::start_tls(&registry.host(), &dir.join("tls-proxy"), &cert, &key);
    let host = tls.host();
    let files = sample_files(3);
    let empty = dir.join("empty");
    fs::create_dir_all(&empty).unwrap_or_else(|e| panic!("{e}"));
    let none = dir.join("none.pem");
    write(&none, "");
    // The CA as SSL_CERT_FILE (the directory holds nothing).
    {
        let mnt = mount_with_system_cas(&host, &dir.join("file"), &ca, &empty)
            .unwrap_or_else(|f| panic!("SSL_CERT_FILE's CA not trusted: {}\n{}", f.reason, f.log));
        read_and_check(&mnt, &files[0]);
    }
    // The CA as a file of SSL_CERT_DIR (SSL_CERT_FILE holds nothing).
    let certs = dir.join("certs");
    fs::create_dir_all(&certs).unwrap_or_else(|e| panic!("{e}"));
    fs::copy(&ca, certs.join("skiff-test-ca.pem")).unwrap_or_else(|e| panic!("{e}"));
    write(&certs.join("README"), "not a certificate\n");
    {
        let mnt = mount_with_system_cas(&host, &dir.join("dir"), &none, &certs)
            .unwrap_or_else(|f| panic!("SSL_CERT_DIR's CA not trusted: {}\n{}", f.reason, f.log));
        read_and_check(&mnt, &files[1]);
    }
    let served = access_log_ranges(&registry, "").0;
    assert!(served > 0, "the TLS registry served no range request");
    // Neither names the CA: refused, with the certificate error, and the
    // registry served nothing.
    let before = fs::read_to_string(&registry.log)
        .unwrap_or_default()
        .lines()
        .count();
    match mount_with_system_cas(&host, &dir.join("untrusted"), &none, &empty) {
        Ok(_) => panic!("a registry signed by an unknown CA was trusted"),
        Err(f) => {
            let log = f.log.to_lowercase();
            assert!(
                log.contains("certificate") || log.contains("unknownissuer"),
                "the refusal does not name the certificate:\n{}",
                f.log
            );
            assert!(f.status.is_some_and(|s| !s.success()), "{:?}", f.status);
        }
    }
    let after = fs::read_to_string(&registry.log)
        .unwrap_or_default()
        .lines()
        .count();
    assert_eq!(after, before, "a request of the untrusted mount was served");
}
