//! OCI referrers: manifests that name another manifest as their `subject`
//! (signatures, SBOMs, and Skiff images attached to the image they were
//! converted from).
//!
//! Two ways to list them, as the OCI distribution spec has it:
//! - the referrers API, `GET /v2/<name>/referrers/<digest>`, which answers
//!   an image index of descriptors (with `artifactType` and annotations);
//! - where a registry has no such API (it answers 404, 400 or 406, or
//!   something that is not an index), the *fallback tag* `sha256-<hex>` of
//!   the subject's digest, an image index that the clients pushing
//!   referrers maintain themselves.
//!
//! Attaching a referrer ([`RegistryWriter::attach_referrer`]) pushes the
//! manifest by digest; when the registry's answer carries no `OCI-Subject`
//! header (it did not index the subject), the fallback index is read,
//! changed and written back: other referrers (signatures, ...) are kept,
//! earlier referrers of the same `artifactType` are replaced. The write is
//! not atomic (no registry offers a compare-and-swap on tags): two
//! clients attaching to the same subject at the same moment may lose one
//! entry, which the spec accepts.

use std::collections::BTreeMap;

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};
use skiff_format::Digest;

use crate::client::{error_detail, Call, Failure, RegistryClient};
use crate::layout::MAX_MANIFEST_SIZE;
use crate::media;
use crate::push::RegistryWriter;
use crate::RegistryError;

/// One referrer of a manifest, as a referrers list describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Referrer {
    /// Digest of the referring manifest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
    /// Its artifact type (the manifest's `artifactType`, else its config's
    /// media type), if the list gives one.
    pub artifact_type: Option<String>,
    /// The descriptor's annotations.
    pub annotations: BTreeMap<String, String>,
}

/// How a referrers list was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReferrersVia {
    /// The registry's referrers API.
    Api,
    /// The fallback tag `sha256-<hex>`.
    FallbackTag,
}

impl std::fmt::Display for ReferrersVia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReferrersVia::Api => "the referrers API",
            ReferrersVia::FallbackTag => "the fallback tag",
        })
    }
}

/// The fallback tag of `subject`: `sha256-<hex>`.
pub fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.to_hex())
}

/// The descriptors of a referrers index (the API's answer or a fallback
/// tag's index). Entries that are not well-formed descriptors are skipped.
pub fn parse_referrers(bytes: &[u8], what: &str) -> Result<Vec<Referrer>, RegistryError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| RegistryError::Invalid(format!("{what}: not JSON: {e}")))?;
    let Some(list) = v.get("manifests").and_then(Value::as_array) else {
        return Err(RegistryError::Invalid(format!(
            "{what}: not an image index (no manifests array)"
        )));
    };
    Ok(list.iter().filter_map(referrer_of).collect())
}

fn referrer_of(d: &Value) -> Option<Referrer> {
    let digest: Digest = d.get("digest")?.as_str()?.parse().ok()?;
    let annotations = d
        .get("annotations")
        .and_then(Value::as_object)
        .map(|a| {
            a.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    Some(Referrer {
        digest,
        size: d.get("size")?.as_u64()?,
        media_type: d
            .get("mediaType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        artifact_type: d
            .get("artifactType")
            .and_then(Value::as_str)
            .map(str::to_owned),
        annotations,
    })
}

impl RegistryClient {
    /// Lists the referrers of manifest `subject` in this repository: by the
    /// referrers API when the registry has it, else by the fallback tag
    /// (no tag: no referrers).
    pub fn referrers(
        &self,
        subject: &Digest,
    ) -> Result<(Vec<Referrer>, ReferrersVia), RegistryError> {
        if let Some(list) = self.referrers_api(subject)? {
            return Ok((list, ReferrersVia::Api));
        }
        let tag = fallback_tag(subject);
        match self.fetch_manifest(&tag, None) {
            Ok(m) => {
                let what = format!(
                    "registry {}, repository {}: fallback tag {tag}",
                    self.registry(),
                    self.repository()
                );
                Ok((parse_referrers(&m.bytes, &what)?, ReferrersVia::FallbackTag))
            }
            Err(RegistryError::NotFound(_)) => Ok((Vec::new(), ReferrersVia::FallbackTag)),
            Err(e) => Err(e),
        }
    }

    /// The referrers API's list, or `None` when the registry has no such API.
    fn referrers_api(&self, subject: &Digest) -> Result<Option<Vec<Referrer>>, RegistryError> {
        let what = format!("GET referrers of {subject}");
        let origin = self.origin();
        let r = self.retrying(origin, &what, u32::MAX, || {
            let url = self
                .url(origin, &format!("referrers/{}", subject.oci()))
                .map_err(Failure::fatal)?;
            let call = Call::new(Method::GET, url, self.pull_scope(), &what)
                .header(ACCEPT, media::OCI_INDEX);
            let resp = self.send_once(origin, &call)?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST | StatusCode::NOT_ACCEPTABLE => {
                    return Ok(None)
                }
                s => {
                    let detail = error_detail(resp);
                    return Err(Failure::fatal(self.http_error(&what, s, detail)));
                }
            }
            let content_type = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
                .unwrap_or_default();
            if content_type != media::OCI_INDEX {
                // Something else answered (a catch-all route): no API.
                return Ok(None);
            }
            let mut body = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(resp, MAX_MANIFEST_SIZE + 1),
                &mut body,
            )
            .map_err(|e| {
                Failure::retry(RegistryError::Network {
                    registry: self.registry().to_owned(),
                    what: what.clone(),
                    attempts: 1,
                    detail: format!("reading the referrers list: {e}"),
                })
            })?;
            Ok(Some(body))
        });
        let Some(body) = self.count(r)? else {
            return Ok(None);
        };
        let what = format!(
            "registry {}, repository {}: referrers of {subject}",
            self.registry(),
            self.repository()
        );
        parse_referrers(&body, &what).map(Some)
    }
}

impl RegistryWriter {
    /// Pushes `manifest` (whose `subject` must be `subject`) by digest and
    /// makes it findable as a referrer of `subject`: nothing more when the
    /// registry indexed it (it answered `OCI-Subject`), else through the
    /// fallback tag, keeping the referrers listed there except earlier ones
    /// of the same `artifact_type`. The blobs the manifest names must be in
    /// the repository already.
    pub fn attach_referrer(
        &self,
        subject: &Digest,
        manifest: &[u8],
        media_type: &str,
        artifact_type: &str,
    ) -> Result<ReferrersVia, RegistryError> {
        let digest = Digest::of(manifest);
        let (_, indexed) = self.put_manifest_subject(&digest.oci(), manifest, media_type)?;
        if indexed.as_deref() == Some(subject.oci().as_str()) {
            return Ok(ReferrersVia::Api);
        }
        let c = self.client();
        let tag = fallback_tag(subject);
        let mut entries: Vec<Value> = match c.fetch_manifest(&tag, None) {
            Ok(m) => {
                let v: Value = serde_json::from_slice(&m.bytes).map_err(|e| {
                    RegistryError::Invalid(format!("fallback tag {tag}: not JSON: {e}"))
                })?;
                match v.get("manifests").and_then(Value::as_array) {
                    Some(list) => list.clone(),
                    None => {
                        return Err(RegistryError::Invalid(format!(
                            "fallback tag {tag} of {} is not an image index: not overwriting it",
                            c.repository()
                        )))
                    }
                }
            }
            Err(RegistryError::NotFound(_)) => Vec::new(),
            Err(e) => return Err(e),
        };
        entries.retain(|e| {
            let same_digest = e.get("digest").and_then(Value::as_str) == Some(&digest.oci());
            let same_type = e.get("artifactType").and_then(Value::as_str) == Some(artifact_type);
            !same_digest && !same_type
        });
        let annotations = serde_json::from_slice::<Value>(manifest)
            .ok()
            .and_then(|v| v.get("annotations").cloned())
            .filter(Value::is_object);
        let mut entry = Map::new();
        entry.insert("mediaType".into(), json!(media_type));
        entry.insert("digest".into(), json!(digest.oci()));
        entry.insert("size".into(), json!(manifest.len()));
        entry.insert("artifactType".into(), json!(artifact_type));
        if let Some(a) = annotations {
            entry.insert("annotations".into(), a);
        }
        entries.push(Value::Object(entry));
        let index = json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_INDEX,
            "manifests": entries,
        });
        let bytes = serde_json::to_vec(&index)
            .map_err(|e| RegistryError::Invalid(format!("fallback index {tag}: {e}")))?;
        self.put_manifest(&tag, &bytes, media::OCI_INDEX)?;
        Ok(ReferrersVia::FallbackTag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tag_and_parsing() -> Result<(), RegistryError> {
        let d = Digest::of(b"x");
        assert_eq!(fallback_tag(&d), format!("sha256-{}", d.to_hex()));
        let index = json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": media::OCI_MANIFEST, "digest": d.oci(), "size": 7,
                 "artifactType": "application/vnd.example.sig",
                 "annotations": {"a": "b", "n": 1}},
                {"digest": "sha256:nothex", "size": 1},
                {"digest": d.oci()}
            ]
        });
        let list = parse_referrers(index.to_string().as_bytes(), "test")?;
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].size, 7);
        assert_eq!(
            list[0].artifact_type.as_deref(),
            Some("application/vnd.example.sig")
        );
        assert_eq!(list[0].annotations.len(), 1);
        assert!(parse_referrers(b"{}", "test").is_err());
        assert!(parse_referrers(b"[", "test").is_err());
        Ok(())
    }
}
