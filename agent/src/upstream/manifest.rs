//! Manifest HEAD and GET: `Accept` pass-through, size limit, digest verification.

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method};
use shoal_proto::api::{CONTENT_DIGEST_HEADER, MANIFEST_MEDIA_TYPES};
use shoal_proto::{Digest, Hasher, ManifestRef, RepoName};

use super::client::{Request, content_length, status_error};
use super::{MAX_MANIFEST_SIZE, Upstream, UpstreamError};

/// What a manifest HEAD tells: enough to decide whether a cached copy is current.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestHead {
    /// `Docker-Content-Digest`; when the upstream omits it on a by-digest request, the
    /// requested digest.
    pub digest: Option<Digest>,
    /// `Content-Type` without parameters.
    pub media_type: String,
    pub size: Option<u64>,
}

/// A manifest as the upstream sent it, verified.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The digest of `bytes`: the requested digest on a by-digest request (verified), else
    /// sha256 of the bytes.
    pub digest: Digest,
    /// `Content-Type` without parameters, or the body's `mediaType` when the header is
    /// missing.
    pub media_type: String,
    /// Byte for byte what the upstream sent: manifest lists and indexes pass through
    /// unchanged, so their digest stays valid.
    pub bytes: Bytes,
}

fn accept_headers(accept: &[String]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let valid: Vec<HeaderValue> = accept
        .iter()
        .filter_map(|a| match HeaderValue::from_str(a) {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::debug!("dropping an Accept value that is not a valid header value");
                None
            }
        })
        .collect();
    if valid.is_empty() {
        for m in MANIFEST_MEDIA_TYPES {
            headers.append(ACCEPT, HeaderValue::from_static(m));
        }
    } else {
        for v in valid {
            headers.append(ACCEPT, v);
        }
    }
    headers
}

fn manifest_request(
    method: Method,
    name: &RepoName,
    r: &ManifestRef,
    accept: &[String],
) -> Request {
    Request {
        method,
        path: format!("/v2/{name}/manifests/{r}"),
        repo: Some(name.clone()),
        headers: accept_headers(accept),
    }
}

fn header_digest(headers: &HeaderMap, shown: &str) -> Result<Option<Digest>, UpstreamError> {
    let Some(v) = headers.get(CONTENT_DIGEST_HEADER) else {
        return Ok(None);
    };
    let s = v.to_str().ok().map(str::trim).unwrap_or("");
    Digest::parse(s).map(Some).map_err(|e| {
        UpstreamError::BadResponse(format!("invalid {CONTENT_DIGEST_HEADER} from {shown}: {e}"))
    })
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let base = v.split(';').next().unwrap_or("").trim();
    (!base.is_empty()).then(|| base.to_owned())
}

fn digest_with(like: &Digest, bytes: &[u8]) -> Digest {
    let mut h = Hasher::new(like.algorithm());
    h.update(bytes);
    h.finish()
}

impl Upstream {
    /// `HEAD /v2/<name>/manifests/<ref>`. `accept` is the client's `Accept` values, passed
    /// through; empty sends every manifest media type Shoal knows.
    #[tracing::instrument(level = "debug", skip_all, fields(upstream = %self.eps.host, repo = %name, reference = %r))]
    pub async fn head_manifest(
        &self,
        name: &RepoName,
        r: &ManifestRef,
        accept: &[String],
    ) -> Result<ManifestHead, UpstreamError> {
        let req = &manifest_request(Method::HEAD, name, r, accept);
        self.failover(|inner| async move {
            let inner = &inner;
            inner
                .with_retries(|| async move {
                    let (resp, shown) = inner.send_once(req).await?;
                    if !resp.status().is_success() {
                        return Err(status_error(&resp, &shown));
                    }
                    let h = resp.headers();
                    let digest = header_digest(h, &shown)?;
                    if let (Some(want), Some(got)) = (r.digest(), &digest)
                        && want != got
                    {
                        return Err(UpstreamError::BadResponse(format!(
                            "{shown} answered for digest {got}"
                        )));
                    }
                    let media_type = media_type(h).ok_or_else(|| {
                        UpstreamError::BadResponse(format!(
                            "manifest HEAD {shown} has no Content-Type"
                        ))
                    })?;
                    Ok(ManifestHead {
                        digest: digest.or_else(|| r.digest().cloned()),
                        media_type,
                        size: content_length(h),
                    })
                })
                .await
        })
        .await
    }

    /// `GET /v2/<name>/manifests/<ref>`, at most [`MAX_MANIFEST_SIZE`] bytes. The body must
    /// match the requested digest (by-digest requests) and the upstream's
    /// `Docker-Content-Digest` (when sent); anything else is an error, never a manifest.
    #[tracing::instrument(level = "debug", skip_all, fields(upstream = %self.eps.host, repo = %name, reference = %r))]
    pub async fn get_manifest(
        &self,
        name: &RepoName,
        r: &ManifestRef,
        accept: &[String],
    ) -> Result<Manifest, UpstreamError> {
        let req = &manifest_request(Method::GET, name, r, accept);
        self.failover(|inner| async move {
        let inner = &inner;
        inner
            .with_retries(|| async move {
                let (resp, shown) = inner.send_once(req).await?;
                if !resp.status().is_success() {
                    return Err(status_error(&resp, &shown));
                }
                let sent_digest = header_digest(resp.headers(), &shown)?;
                let content_type = media_type(resp.headers());
                let bytes = inner.read_body(resp, MAX_MANIFEST_SIZE, &shown).await?;
                if let Some(want) = r.digest() {
                    let got = digest_with(want, &bytes);
                    if &got != want {
                        return Err(UpstreamError::BadResponse(format!(
                            "manifest from {shown} hashes to {got}, not the requested digest"
                        )));
                    }
                }
                if let Some(sent) = &sent_digest {
                    let got = digest_with(sent, &bytes);
                    if &got != sent {
                        return Err(UpstreamError::BadResponse(format!(
                            "manifest from {shown} hashes to {got}, not its {CONTENT_DIGEST_HEADER} {sent}"
                        )));
                    }
                }
                let media_type = content_type
                    .or_else(|| body_media_type(&bytes))
                    .ok_or_else(|| {
                        UpstreamError::BadResponse(format!(
                            "manifest from {shown} has neither Content-Type nor mediaType"
                        ))
                    })?;
                let digest = r
                    .digest()
                    .cloned()
                    .unwrap_or_else(|| Digest::sha256_of(&bytes));
                tracing::debug!(digest = %digest, media_type, size = bytes.len(), "fetched manifest");
                Ok(Manifest {
                    digest,
                    media_type,
                    bytes,
                })
            })
            .await
        })
        .await
    }
}

/// The `mediaType` field of a JSON manifest, if it has one.
fn body_media_type(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let m = v.get("mediaType")?.as_str()?.trim();
    (!m.is_empty() && m.len() <= 255 && m.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| m.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_defaults_and_pass_through() {
        let h = accept_headers(&[]);
        let got: Vec<_> = h
            .get_all(ACCEPT)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(got, MANIFEST_MEDIA_TYPES);
        let h = accept_headers(&["application/x; q=0.5".into(), "bad\nvalue".into()]);
        let got: Vec<_> = h.get_all(ACCEPT).iter().collect();
        assert_eq!(got, ["application/x; q=0.5"]);
    }

    #[test]
    fn media_type_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(media_type(&h), None);
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/a+json; charset=utf-8"),
        );
        assert_eq!(media_type(&h).as_deref(), Some("application/a+json"));
        assert_eq!(
            body_media_type(br#"{"mediaType":"application/vnd.oci.image.index.v1+json"}"#)
                .as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
        assert_eq!(body_media_type(br#"{"schemaVersion":2}"#), None);
        assert_eq!(body_media_type(b"\xff"), None);
    }
}
