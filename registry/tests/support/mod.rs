//! Real-registry test support: a Debian `docker-registry` on 127.0.0.1 with
//! a random port and a temporary storage directory (no auth, htpasswd, or
//! token auth with an in-process JWT issuer), plus in-test HTTP servers: a
//! fault-injecting proxy and helpers.
//!
//! Everything listens on 127.0.0.1 only and stops on drop. Missing tools
//! (`docker-registry`, `htpasswd`, `openssl`) make the tests fail, not skip.

#![allow(dead_code)]
// Test scaffolding: a failure to set up is a test failure, so panicking is right.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use skiff_registry::{RegistryConfig, RetryConfig};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A configuration for tests: no Docker config, no proxy env, fast retries.
pub fn test_config() -> RegistryConfig {
    RegistryConfig {
        use_docker_config: false,
        use_env_proxy: false,
        connect_timeout_ms: 2_000,
        read_timeout_ms: 5_000,
        retry: RetryConfig {
            max_attempts: 5,
            initial_backoff_ms: 10,
            max_backoff_ms: 200,
            deadline_ms: 20_000,
        },
        ..RegistryConfig::default()
    }
}

fn require(tool: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|f| f.is_file())
    });
    match found {
        Some(p) => p,
        None => panic!(
            "`{tool}` is not installed: these tests need a real registry; install it with `apt-get install {package}`"
        ),
    }
}

/// How the registry authenticates.
pub enum AuthMode {
    /// Anonymous access.
    None,
    /// htpasswd (bcrypt) with one user.
    Basic { user: String, password: String },
    /// Token auth against `issuer`.
    Token(Arc<TokenIssuer>),
}

/// A running `docker-registry serve`.
pub struct Registry {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry without auth.
    pub fn start() -> Registry {
        Registry::start_with(&AuthMode::None)
    }

    /// Starts a registry with `auth`.
    pub fn start_with(auth: &AuthMode) -> Registry {
        Registry::start_full(auth, false, None)
    }

    /// Starts a pull-through cache of the registry at `remote`
    /// (`host:port`, plain HTTP): docker-registry's proxy mode, with its
    /// access log on (see [`Registry::log`]).
    pub fn start_proxy(remote: &str) -> Registry {
        Registry::start_full(&AuthMode::None, false, Some(remote))
    }

    /// Starts a registry without auth serving HTTPS with a self-signed
    /// certificate for 127.0.0.1 (see [`Registry::tls_cert`]).
    pub fn start_tls() -> Registry {
        Registry::start_full(&AuthMode::None, true, None)
    }

    /// The CA certificate of a TLS registry.
    pub fn tls_cert(&self) -> Option<PathBuf> {
        Some(self.dir.path().join("ca.crt")).filter(|p| p.is_file())
    }

    fn start_full(auth: &AuthMode, tls: bool, proxy_of: Option<&str>) -> Registry {
        let bin = require("docker-registry", "docker-registry");
        let mut dir = tempfile::tempdir().expect("tempdir");
        let tls_yaml = if tls {
            require("openssl", "openssl");
            let p = |n: &str| dir.path().join(n);
            let (crt, key) = (p("tls.crt"), p("tls.key"));
            std::fs::write(p("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext file");
            let openssl = |args: &[&str]| {
                let st = Command::new("openssl")
                    .args(args)
                    .current_dir(dir.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .expect("run openssl");
                assert!(st.success(), "openssl {args:?} failed");
            };
            // A CA, and a server certificate for 127.0.0.1 signed by it.
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-subj",
                "/CN=skiff-test-ca",
            ]);
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "tls.key",
                "-out",
                "tls.csr",
                "-subj",
                "/CN=127.0.0.1",
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                "tls.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                "tls.crt",
                "-extfile",
                "ext.cnf",
            ]);
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                crt.display(),
                key.display()
            )
        } else {
            String::new()
        };
        let auth_yaml = match auth {
            AuthMode::None => String::new(),
            AuthMode::Basic { user, password } => {
                require("htpasswd", "apache2-utils");
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("run htpasswd");
                assert!(out.status.success(), "htpasswd failed");
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, &out.stdout).expect("write htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: skiff-test\n    path: {}\n",
                    file.display()
                )
            }
            AuthMode::Token(issuer) => format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                issuer.realm(),
                TokenIssuer::SERVICE,
                TokenIssuer::ISSUER,
                issuer.cert_path().display()
            ),
        };
        let (access_off, proxy_yaml) = match proxy_of {
            Some(remote) => (false, format!("proxy:\n  remoteurl: http://{remote}\n")),
            None => (true, String::new()),
        };
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: {access_off}\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: skiff-test-secret\n{tls_yaml}{auth_yaml}{proxy_yaml}",
                dir.path().join("data").display()
            );
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).expect("write registry config");
            let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
            let log2 = log.try_clone().expect("log file");
            let child = Command::new(&bin)
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .expect("start docker-registry");
            let mut reg = Registry { port, child, dir };
            match reg.wait_ready() {
                Ok(()) => return reg,
                Err(e) => {
                    last_err = e;
                    let _ = reg.child.kill();
                    let _ = reg.child.wait();
                    dir = std::mem::replace(&mut reg.dir, tempfile::tempdir().expect("tempdir"));
                }
            }
        }
        panic!("docker-registry did not start: {last_err}");
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}: {}", self.log()));
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let req = format!(
                    "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                    self.port
                );
                if s.write_all(req.as_bytes()).is_ok() {
                    let mut line = String::new();
                    if BufReader::new(s).read_line(&mut line).is_ok()
                        && (line.contains(" 200 ")
                            || line.contains(" 401 ")
                            // A TLS registry answers plain HTTP with 400.
                            || line.contains(" 400 "))
                    {
                        return Ok(());
                    }
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err(format!("not ready after 15 s: {}", self.log()))
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT/REPO[:TAG]` parsed as a docker reference.
    pub fn docker_ref(&self, repo_tag: &str) -> skiff_registry::DockerRef {
        format!("{}/{repo_tag}", self.host())
            .parse()
            .expect("docker reference")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- tokens

/// What the token issuer has seen.
#[derive(Default)]
pub struct IssuerCounts {
    pub get: AtomicU64,
    pub post: AtomicU64,
    pub refused: AtomicU64,
}

/// An in-process Docker token server: tiny_http on 127.0.0.1, RS256 JWTs
/// with an x5c header, signed with a throwaway key by the openssl CLI.
pub struct TokenIssuer {
    port: u16,
    dir: tempfile::TempDir,
    cert_der_b64: String,
    user: String,
    password: String,
    /// `expires_in` of the tokens issued.
    pub expires_in: AtomicU64,
    /// Answer 405 to POST (GET-only token servers).
    pub refuse_post: AtomicBool,
    /// Issue the next this-many tokens already expired (the registry then
    /// answers 401).
    pub expired_tokens: AtomicUsize,
    pub counts: IssuerCounts,
    stop: Arc<AtomicBool>,
    server: Arc<tiny_http::Server>,
}

impl TokenIssuer {
    pub const SERVICE: &'static str = "skiff-test-registry";
    pub const ISSUER: &'static str = "skiff-test-issuer";

    /// Starts an issuer accepting `user`/`password` (anonymous requests are
    /// refused).
    pub fn start(user: &str, password: &str) -> Arc<TokenIssuer> {
        require("openssl", "openssl");
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let st = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .args(["-subj", "/CN=skiff-test-issuer"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run openssl req");
        assert!(st.success(), "openssl req failed");
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .expect("run openssl x509");
        assert!(der.status.success(), "openssl x509 failed");
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("token server"));
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .expect("token server port");
        let issuer = Arc::new(TokenIssuer {
            port,
            dir,
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(der.stdout),
            user: user.to_owned(),
            password: password.to_owned(),
            expires_in: AtomicU64::new(300),
            refuse_post: AtomicBool::new(false),
            expired_tokens: AtomicUsize::new(0),
            counts: IssuerCounts::default(),
            stop: Arc::new(AtomicBool::new(false)),
            server: server.clone(),
        });
        let me = issuer.clone();
        thread::spawn(move || me.serve());
        issuer
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.server.unblock();
    }

    fn serve(self: Arc<Self>) {
        while !self.stop.load(Ordering::SeqCst) {
            let Ok(Some(mut req)) = self.server.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            let (status, body) = self.handle(&mut req);
            let resp = tiny_http::Response::from_string(body)
                .with_status_code(status)
                .with_header(
                    tiny_http::Header::from_bytes("Content-Type", "application/json")
                        .expect("header"),
                );
            let _ = req.respond(resp);
        }
    }

    fn handle(&self, req: &mut tiny_http::Request) -> (u16, String) {
        let (path, query) = match req.url().split_once('?') {
            Some((p, q)) => (p.to_owned(), q.to_owned()),
            None => (req.url().to_owned(), String::new()),
        };
        if path != "/token" {
            return (404, "{}".into());
        }
        let mut params: Vec<(String, String)>;
        let mut user = None;
        let mut password = None;
        if *req.method() == tiny_http::Method::Post {
            if self.refuse_post.load(Ordering::SeqCst) {
                return (405, "{}".into());
            }
            self.counts.post.fetch_add(1, Ordering::SeqCst);
            let mut body = String::new();
            let _ = req.as_reader().read_to_string(&mut body);
            params = parse_form(&body);
            let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            if get("grant_type").as_deref() == Some("password") {
                user = get("username");
                password = get("password");
            }
        } else {
            self.counts.get.fetch_add(1, Ordering::SeqCst);
            params = parse_form(&query);
            if let Some(h) = req
                .headers()
                .iter()
                .find(|h| h.field.equiv("Authorization"))
            {
                let v = h.value.as_str();
                if let Some(b) = v.strip_prefix("Basic ") {
                    let dec = base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .unwrap_or_default();
                    let s = String::from_utf8_lossy(&dec).to_string();
                    if let Some((u, p)) = s.split_once(':') {
                        user = Some(u.to_owned());
                        password = Some(p.to_owned());
                    }
                }
            }
        }
        if user.as_deref() != Some(self.user.as_str())
            || password.as_deref() != Some(self.password.as_str())
        {
            self.counts.refused.fetch_add(1, Ordering::SeqCst);
            return (401, r#"{"details":"bad credentials"}"#.into());
        }
        let scopes: Vec<String> = params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .collect();
        params.clear();
        let expired = self
            .expired_tokens
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let expires_in = self.expires_in.load(Ordering::SeqCst);
        match self.jwt(user.as_deref().unwrap_or(""), &scopes, expires_in, expired) {
            Ok(token) => (
                200,
                serde_json::json!({"token": token, "access_token": token, "expires_in": expires_in})
                    .to_string(),
            ),
            Err(e) => (500, serde_json::json!({ "error": e }).to_string()),
        }
    }

    fn jwt(
        &self,
        sub: &str,
        scopes: &[String],
        expires_in: u64,
        expired: bool,
    ) -> Result<String, String> {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs();
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (t, rest) = (parts.next()?, parts.next()?);
                let actions = parts.next()?;
                Some(serde_json::json!({
                    "type": t,
                    "name": rest,
                    "actions": actions.split(',').collect::<Vec<_>>(),
                }))
            })
            .collect();
        // The registry allows 60 s of clock skew: an "expired" token is
        // well past that.
        let exp = if expired { now - 600 } else { now + expires_in };
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [self.cert_der_b64]});
        let claims = serde_json::json!({
            "iss": Self::ISSUER,
            "sub": sub,
            "aud": Self::SERVICE,
            "exp": exp,
            "nbf": now - 700,
            "iat": now - 700,
            "jti": format!("{now}-{}", rand_id()),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(self.dir.path().join("key.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        child
            .stdin
            .take()
            .ok_or("no stdin")?
            .write_all(input.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err("openssl dgst failed".into());
        }
        Ok(format!("{input}.{}", b64(&out.stdout)))
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn rand_id() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(h, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------- faults

/// What the fault proxy does to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward unchanged.
    Pass,
    /// Close the connection without answering.
    Drop,
    /// Answer with this status (and `Retry-After` seconds, if given).
    Status(u16, Option<u64>),
    /// Forward, but send only half the body, then close.
    Truncate,
    /// Forward, with one body byte flipped (length unchanged).
    FlipByte,
    /// Say nothing for this long, then close.
    Stall(Duration),
}

/// One request as the proxy saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub request_line: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 proxy on 127.0.0.1 in front of a registry, one request per
/// connection, applying scripted faults to requests whose request line
/// contains `filter` (all by default).
pub struct FaultProxy {
    pub port: u16,
    script: Arc<Mutex<VecDeque<Fault>>>,
    filter: Arc<Mutex<String>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let filter = Arc::new(Mutex::new(String::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, f2, seen2, stop2) = (script.clone(), filter.clone(), seen.clone(), stop.clone());
        thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (s3, f3, seen3) = (s2.clone(), f2.clone(), seen2.clone());
                        thread::spawn(move || {
                            let _ = handle_conn(conn, upstream_port, &s3, &f3, &seen3);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultProxy {
            port,
            script,
            filter,
            seen,
            stop,
        }
    }

    /// Faults for the next matching requests, in order; then `Pass`.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        let mut s = self.script.lock().expect("lock");
        s.clear();
        s.extend(faults);
    }

    /// Only requests whose request line contains `s` get faults.
    pub fn filter(&self, s: &str) {
        *self.filter.lock().expect("lock") = s.to_owned();
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn docker_ref(&self, repo_tag: &str) -> skiff_registry::DockerRef {
        format!("{}/{repo_tag}", self.host())
            .parse()
            .expect("docker reference")
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads an HTTP head (through `\r\n\r\n`) and returns it with whatever
/// followed.
fn read_head(r: &mut impl Read) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok((buf, rest));
        }
        let n = r.read(&mut tmp)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "eof in head",
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn handle_conn(
    mut client: TcpStream,
    upstream_port: u16,
    script: &Mutex<VecDeque<Fault>>,
    filter: &Mutex<String>,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    // A TLS ClientHello (the client probing for HTTPS): this proxy speaks
    // plain HTTP only, so hang up at once, as a plain server would refuse.
    let mut first = [0u8; 1];
    if client.peek(&mut first)? == 1 && first[0] == 0x16 {
        return Ok(());
    }
    let (head, mut body) = read_head(&mut client)?;
    let text = String::from_utf8_lossy(&head).to_string();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let content_length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while body.len() < content_length {
        let mut tmp = vec![0u8; 65536];
        let n = client.read(&mut tmp)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    seen.lock().expect("lock").push(Seen {
        request_line: request_line.clone(),
        headers: headers.clone(),
    });
    let fault = {
        let f = filter.lock().expect("lock").clone();
        if request_line.contains(&f) {
            script
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or(Fault::Pass)
        } else {
            Fault::Pass
        }
    };
    match &fault {
        Fault::Drop => return Ok(()),
        Fault::Stall(d) => {
            thread::sleep(*d);
            return Ok(());
        }
        Fault::Status(code, after) => {
            let mut resp = format!(
                "HTTP/1.1 {code} Injected\r\nContent-Type: application/json\r\nConnection: close\r\n"
            );
            if let Some(a) = after {
                resp.push_str(&format!("Retry-After: {a}\r\n"));
            }
            let b = r#"{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}"#;
            resp.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
            client.write_all(resp.as_bytes())?;
            return Ok(());
        }
        _ => {}
    }
    // Forward with Connection: close, read the whole answer.
    let mut up = TcpStream::connect(("127.0.0.1", upstream_port))?;
    let mut fwd = format!("{request_line}\r\n");
    for (k, v) in &headers {
        if !k.eq_ignore_ascii_case("connection") {
            fwd.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    fwd.push_str("Connection: close\r\n\r\n");
    up.write_all(fwd.as_bytes())?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |i| i + 4);
    let (resp_head, resp_body) = answer.split_at(split);
    let is_head = request_line.starts_with("HEAD ");
    match fault {
        Fault::Truncate if !is_head && resp_body.len() > 1 => {
            client.write_all(resp_head)?;
            client.write_all(&resp_body[..resp_body.len() / 2])?;
            client.flush()?;
        }
        Fault::FlipByte if !is_head && !resp_body.is_empty() => {
            let mut b = resp_body.to_vec();
            let i = b.len() / 2;
            b[i] ^= 0x20;
            client.write_all(resp_head)?;
            client.write_all(&b)?;
        }
        _ => {
            client.write_all(&answer)?;
        }
    }
    Ok(())
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes `data` to a file in `dir` and returns its path (for debugging).
pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write");
    p
}
