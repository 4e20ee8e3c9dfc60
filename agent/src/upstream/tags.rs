//! `GET /v2/<name>/tags/list`, passed through for clients that list tags (`skopeo list-tags`,
//! `crane ls`): one page at a time, the body checked for shape and size, the `Link` to the
//! next page kept when it is a plain relative registry path.

use bytes::Bytes;
use http::header::{ACCEPT, LINK};
use http::{HeaderMap, HeaderValue, Method};
use shoal_proto::{RepoName, Tag};

use super::client::{Request, status_error};
use super::{Upstream, UpstreamError};

/// Largest tag list page accepted (Docker Hub pages are far smaller).
pub const MAX_TAGS_PAGE: u64 = 4 * 1024 * 1024;
/// Longest `Link` header passed on.
const MAX_LINK: usize = 2048;

/// One page of a repository's tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagsPage {
    /// The upstream's JSON, `{"name": ..., "tags": [...]}`, unchanged.
    pub body: Bytes,
    /// The upstream's `Link: </v2/...>; rel="next"`, when it sent one.
    pub next: Option<String>,
}

impl Upstream {
    /// `GET /v2/<name>/tags/list[?n=N][&last=TAG]`.
    #[tracing::instrument(level = "debug", skip_all, fields(upstream = %self.eps.host, repo = %name))]
    pub async fn tags_list(
        &self,
        name: &RepoName,
        n: Option<u32>,
        last: Option<&Tag>,
    ) -> Result<TagsPage, UpstreamError> {
        // Both parameters are validated values (digits, tag grammar): nothing to escape.
        let mut query = Vec::new();
        if let Some(n) = n {
            query.push(format!("n={n}"));
        }
        if let Some(last) = last {
            query.push(format!("last={last}"));
        }
        let mut path = format!("/v2/{name}/tags/list");
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let req = &Request {
            method: Method::GET,
            path,
            repo: Some(name.clone()),
            headers,
        };
        self.failover(|inner| async move {
            let inner = &inner;
            inner
                .with_retries(|| async move {
                    let (resp, shown) = inner.send_once(req).await?;
                    if !resp.status().is_success() {
                        return Err(status_error(&resp, &shown));
                    }
                    let next = next_link(resp.headers());
                    let body = inner.read_body(resp, MAX_TAGS_PAGE, &shown).await?;
                    check_shape(&body).map_err(|why| {
                        UpstreamError::BadResponse(format!("tag list from {shown}: {why}"))
                    })?;
                    Ok(TagsPage { body, next })
                })
                .await
        })
        .await
    }
}

/// The `Link` header when it is `</v2/...>; rel="next"` in printable ASCII.
fn next_link(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(LINK)?.to_str().ok()?.trim();
    let ok = v.len() <= MAX_LINK
        && v.starts_with("</v2/")
        && v.contains("rel=\"next\"")
        && v.bytes().all(|b| (0x20..0x7f).contains(&b));
    ok.then(|| v.to_owned())
}

/// `{"name": string, "tags": [string...] | null}`.
fn check_shape(body: &[u8]) -> Result<(), &'static str> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| "not JSON")?;
    if !v.get("name").is_some_and(serde_json::Value::is_string) {
        return Err("no name");
    }
    match v.get("tags") {
        Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::Array(tags)) if tags.iter().all(serde_json::Value::is_string) => {
            Ok(())
        }
        _ => Err("tags is not a list of strings"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_links() {
        assert!(check_shape(br#"{"name":"a/b","tags":["v1","v2"]}"#).is_ok());
        assert!(check_shape(br#"{"name":"a/b","tags":null}"#).is_ok());
        assert!(check_shape(br#"{"name":"a/b","tags":[1]}"#).is_err());
        assert!(check_shape(br#"{"tags":[]}"#).is_err());
        assert!(check_shape(b"<html>").is_err());
        let link = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(LINK, HeaderValue::from_str(v).unwrap());
            next_link(&h)
        };
        let good = r#"</v2/a/b/tags/list?last=v2&n=2>; rel="next""#;
        assert_eq!(link(good).as_deref(), Some(good));
        assert_eq!(link(r#"<https://evil.example/v2/x>; rel="next""#), None);
        assert_eq!(link(r#"</v2/a/b/tags/list?last=v2>; rel="prev""#), None);
    }
}
