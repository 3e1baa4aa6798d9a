//! Registry authentication: `WWW-Authenticate` challenges, Basic, and Bearer
//! tokens from a token server (the Docker token protocol, with the OAuth2
//! POST form when credentials are known).
//!
//! One [`AuthState`] per endpoint (registry or mirror) remembers the last
//! challenge and caches tokens per scope until shortly before they expire
//! (`expires_in`, counted from `issued_at` when that is not in the future).
//! A 401 with a cached token drops it, and the caller retries once with a
//! fresh one. Only one thread fetches a token at a time; the others wait and
//! reuse it.
//!
//! Secrets stay out of errors, logs and `Debug`: tokens and passwords are
//! never formatted.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::Value;

use crate::config::Credentials;
use crate::stats::Counters;
use crate::RegistryError;

/// Token lifetime assumed when the server does not say (the spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Largest token response read.
const MAX_TOKEN_RESPONSE: u64 = 1 << 20;
/// The client id sent to token servers.
const CLIENT_ID: &str = "skiff";

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// `Basic realm="..."`.
    Basic,
    /// `Bearer realm="...",service="...",scope="..."`.
    Bearer {
        /// The token server URL.
        realm: String,
        /// The service the token is for.
        service: Option<String>,
        /// The scope the registry asked for.
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header value (the first challenge of a
/// scheme Skiff knows).
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r),
        None => (header, ""),
    };
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        })
    } else {
        None
    }
}

/// `a="x,y", b=z` into pairs (quoted strings with `\` escapes).
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() || c == ',' {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() {
            return out;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            continue;
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_owned();
        }
        out.push((name, value));
    }
}

/// A bearer token and when to stop using it.
struct Token {
    value: String,
    refresh_at: Instant,
}

/// The authentication state of one endpoint.
pub(crate) struct AuthState {
    /// For messages: the registry or mirror.
    host: String,
    credentials: Option<Credentials>,
    challenge: Mutex<Option<Challenge>>,
    tokens: Mutex<HashMap<String, Token>>,
    refresh_token: Mutex<Option<String>>,
    fetch: Mutex<()>,
}

impl fmt::Debug for AuthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthState")
            .field("host", &self.host)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent, even on panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What to put in the `Authorization` header.
pub(crate) enum AuthHeader {
    /// Nothing (anonymous, or no challenge seen yet).
    None,
    /// This value.
    Value(String),
}

impl AuthState {
    pub(crate) fn new(host: String, credentials: Option<Credentials>) -> AuthState {
        AuthState {
            host,
            credentials,
            challenge: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            refresh_token: Mutex::new(None),
            fetch: Mutex::new(()),
        }
    }

    /// The user name, for messages.
    pub(crate) fn who(&self) -> String {
        match &self.credentials {
            Some(c) if c.is_identity_token() => "an identity token".to_owned(),
            Some(c) => format!("user '{}'", c.username),
            None => "anonymous access".to_owned(),
        }
    }

    fn basic(&self) -> Option<String> {
        let c = self.credentials.as_ref()?;
        let raw = format!("{}:{}", c.username, c.password);
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        ))
    }

    /// The header for a request needing `scope`, fetching a token if the
    /// endpoint asked for bearer auth and none is cached.
    pub(crate) fn header(
        &self,
        http: &Client,
        scope: &[String],
        counters: &Counters,
    ) -> Result<AuthHeader, RegistryError> {
        let challenge = lock(&self.challenge).clone();
        match challenge {
            None => Ok(AuthHeader::None),
            Some(Challenge::Basic) => Ok(self.basic().map_or(AuthHeader::None, AuthHeader::Value)),
            Some(Challenge::Bearer { realm, service, .. }) => {
                let key = scope.join(" ");
                if let Some(t) = self.cached(&key) {
                    return Ok(AuthHeader::Value(format!("Bearer {t}")));
                }
                let _one = lock(&self.fetch);
                if let Some(t) = self.cached(&key) {
                    return Ok(AuthHeader::Value(format!("Bearer {t}")));
                }
                let token = self.fetch_token(http, &realm, service.as_deref(), scope, counters)?;
                let value = format!("Bearer {}", token.value);
                lock(&self.tokens).insert(key, token);
                Ok(AuthHeader::Value(value))
            }
        }
    }

    fn cached(&self, key: &str) -> Option<String> {
        let tokens = lock(&self.tokens);
        let t = tokens.get(key)?;
        (Instant::now() < t.refresh_at).then(|| t.value.clone())
    }

    /// Records a 401: the new challenge, and drops the token used for
    /// `scope`. Returns whether re-sending can help (not when Basic
    /// credentials were just refused); an error when nothing can (a Basic
    /// challenge with no credentials, or an unknown scheme).
    pub(crate) fn on_unauthorized(
        &self,
        www_authenticate: Option<&str>,
        scope: &[String],
        sent_auth: bool,
    ) -> Result<bool, RegistryError> {
        let Some(challenge) = www_authenticate.and_then(parse_challenge) else {
            return Err(RegistryError::Auth {
                registry: self.host.clone(),
                detail: format!(
                    "HTTP 401 with no usable WWW-Authenticate challenge ({})",
                    www_authenticate.unwrap_or("none")
                ),
            });
        };
        if challenge == Challenge::Basic && self.credentials.is_none() {
            return Err(RegistryError::Auth {
                registry: self.host.clone(),
                detail: "the registry requires a login and no credentials were found \
                         (docker login, the Docker config file, SKIFF_REGISTRY_USERNAME/\
                         SKIFF_REGISTRY_PASSWORD or the registry configuration)"
                    .to_owned(),
            });
        }
        let basic = challenge == Challenge::Basic;
        *lock(&self.challenge) = Some(challenge);
        lock(&self.tokens).remove(&scope.join(" "));
        Ok(!(basic && sent_auth))
    }

    /// The error for a second 401 in a row.
    pub(crate) fn refused(&self, what: &str) -> RegistryError {
        RegistryError::Auth {
            registry: self.host.clone(),
            detail: format!("{what}: access denied (HTTP 401) for {}", self.who()),
        }
    }

    fn fetch_token(
        &self,
        http: &Client,
        realm: &str,
        service: Option<&str>,
        scope: &[String],
        counters: &Counters,
    ) -> Result<Token, RegistryError> {
        let auth_err = |detail: String| RegistryError::Auth {
            registry: self.host.clone(),
            detail,
        };
        let url = reqwest::Url::parse(realm)
            .map_err(|e| auth_err(format!("token realm '{realm}' is not a URL: {e}")))?;
        if url.scheme() != "https" && url.scheme() != "http" {
            return Err(auth_err(format!("token realm '{realm}' is not http(s)")));
        }
        let started = Instant::now();
        let refresh = lock(&self.refresh_token).clone();
        let resp = match (&self.credentials, refresh) {
            (Some(c), refresh) => {
                let mut form: Vec<(&str, String)> = Vec::new();
                match (c.is_identity_token(), refresh) {
                    (_, Some(rt)) => {
                        form.push(("grant_type", "refresh_token".to_owned()));
                        form.push(("refresh_token", rt));
                    }
                    (true, None) => {
                        form.push(("grant_type", "refresh_token".to_owned()));
                        form.push(("refresh_token", c.password.clone()));
                    }
                    (false, None) => {
                        form.push(("grant_type", "password".to_owned()));
                        form.push(("username", c.username.clone()));
                        form.push(("password", c.password.clone()));
                        form.push(("access_type", "offline".to_owned()));
                    }
                }
                form.push(("client_id", CLIENT_ID.to_owned()));
                if let Some(s) = service {
                    form.push(("service", s.to_owned()));
                }
                for s in scope {
                    form.push(("scope", s.clone()));
                }
                counters.token_fetch();
                let post = http.post(url.clone()).form(&form).send();
                match post {
                    Ok(r)
                        if r.status() == StatusCode::NOT_FOUND
                            || r.status() == StatusCode::METHOD_NOT_ALLOWED
                            || (r.status() == StatusCode::BAD_REQUEST && c.is_identity_token()) =>
                    {
                        // No OAuth2 POST support: the plain GET with Basic auth.
                        self.get_token(http, &url, service, scope, counters)
                    }
                    Ok(r)
                        if r.status() == StatusCode::UNAUTHORIZED
                            && lock(&self.refresh_token).is_some() =>
                    {
                        // The refresh token went stale: start over with the password.
                        *lock(&self.refresh_token) = None;
                        self.get_token(http, &url, service, scope, counters)
                    }
                    other => other.map_err(|e| {
                        auth_err(format!(
                            "token server {}: {}",
                            url_no_query(&url),
                            e.without_url()
                        ))
                    }),
                }
            }
            (None, _) => self.get_token(http, &url, service, scope, counters),
        }?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(auth_err(format!(
                "the token server {} refused {} (HTTP {})",
                url_no_query(&url),
                self.who(),
                status.as_u16()
            )));
        }
        if !status.is_success() {
            return Err(auth_err(format!(
                "the token server {} answered HTTP {}",
                url_no_query(&url),
                status.as_u16()
            )));
        }
        let mut body = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(resp, MAX_TOKEN_RESPONSE),
            &mut body,
        )
        .map_err(|e| auth_err(format!("token server {}: {e}", url_no_query(&url))))?;
        let v: Value = serde_json::from_slice(&body).map_err(|_| {
            auth_err(format!(
                "the token server {} did not answer with JSON",
                url_no_query(&url)
            ))
        })?;
        let value = v
            .get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .or_else(|| v.get("access_token").and_then(Value::as_str))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                auth_err(format!(
                    "the token server {} sent no token",
                    url_no_query(&url)
                ))
            })?
            .to_owned();
        if let Some(rt) = v.get("refresh_token").and_then(Value::as_str) {
            if !rt.is_empty() {
                *lock(&self.refresh_token) = Some(rt.to_owned());
            }
        }
        let lifetime = v
            .get("expires_in")
            .and_then(Value::as_u64)
            .filter(|&s| s > 0)
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        // Time already spent since issue (issued_at in the past), bounded by
        // what this request took plus clock skew we are willing to believe.
        let age = v
            .get("issued_at")
            .and_then(Value::as_str)
            .and_then(parse_rfc3339)
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or(Duration::ZERO)
            .min(lifetime);
        let remaining = lifetime.saturating_sub(age.max(started.elapsed()));
        // Refresh a little early: a fifth of the lifetime, at most 30 s.
        let margin = (lifetime / 5).min(Duration::from_secs(30));
        Ok(Token {
            value,
            refresh_at: started + remaining.saturating_sub(margin),
        })
    }

    fn get_token(
        &self,
        http: &Client,
        url: &reqwest::Url,
        service: Option<&str>,
        scope: &[String],
        counters: &Counters,
    ) -> Result<reqwest::blocking::Response, RegistryError> {
        let mut url = url.clone();
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scope {
                q.append_pair("scope", s);
            }
        }
        let mut req = http.get(url.clone());
        if let Some(h) = self.basic() {
            req = req.header(reqwest::header::AUTHORIZATION, h);
        }
        counters.token_fetch();
        req.send().map_err(|e| RegistryError::Auth {
            registry: self.host.clone(),
            detail: format!("token server {}: {}", url_no_query(&url), e.without_url()),
        })
    }
}

/// The URL without its query (which may name scopes; never secrets, but
/// long).
pub(crate) fn url_no_query(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' => 0,
        b'+' | b'-' => {
            let sign = if b[i] == b'+' { 1 } else { -1 };
            sign * (num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60)
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.io/token",service="registry.io",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.io/token".into(),
                service: Some("registry.io".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("basic"), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge(r#"Bearer realm=http://a/t , service = "s\"q""#),
            Some(Challenge::Bearer {
                realm: "http://a/t".into(),
                service: Some("s\"q".into()),
                scope: None,
            })
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }

    #[test]
    fn rfc3339() {
        let t = parse_rfc3339("1970-01-02T00:00:01Z");
        assert_eq!(t, Some(UNIX_EPOCH + Duration::from_secs(86_401)));
        let t = parse_rfc3339("2024-03-01T12:00:00.123456+01:00");
        assert_eq!(
            t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            Some(1_709_290_800)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
