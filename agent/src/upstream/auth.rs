//! Registry authentication state: the scheme learned from the last challenge, the configured
//! credentials, and bearer tokens cached per repository scope.

use std::collections::HashMap;
use std::sync::PoisonError;
use std::time::Duration;

use base64::Engine as _;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue, StatusCode};
use reqwest::Url;
use shoal_proto::RepoName;
use tokio::time::Instant;

use super::challenge::{self, AuthChallenge};
use super::client::{redact, status_error};
use super::error::UpstreamError;
use super::{Inner, Secret};

/// Largest token response accepted (Docker Hub's are a few KiB).
const MAX_TOKEN_RESPONSE: u64 = 64 * 1024;
/// `expires_in` when the token server gives none (Docker token spec).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Upper bound on how long a token is trusted, whatever the server says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Cached tokens beyond which the cache is pruned.
const MAX_CACHED_TOKENS: usize = 4096;

/// Username and password for Basic auth, to the registry or to its token server.
pub(super) struct Credentials {
    /// `Basic base64(user:pass)`, marked sensitive so http never prints it.
    header: HeaderValue,
}

impl Credentials {
    pub(super) fn new(username: String, password: Secret) -> Result<Credentials, UpstreamError> {
        if username.is_empty() || username.contains(':') || username.chars().any(char::is_control) {
            return Err(UpstreamError::Config(
                "username must be non-empty, without ':' or control characters".into(),
            ));
        }
        let raw = format!("{username}:{}", password.expose());
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        // Base64 output is always a valid header value.
        let mut header = HeaderValue::from_str(&format!("Basic {encoded}"))
            .map_err(|_| UpstreamError::Config("credentials cannot be encoded".into()))?;
        header.set_sensitive(true);
        Ok(Credentials { header })
    }

    fn header(&self) -> HeaderValue {
        self.header.clone()
    }
}

/// What the registry asked for last time, so later requests can authenticate up front.
#[derive(Clone, Debug)]
enum Learned {
    Basic,
    Bearer { realm: Url, service: Option<String> },
}

#[derive(Default)]
pub(super) struct AuthState {
    learned: Option<Learned>,
    /// Keyed by [`scope_for`]; values are ready `Bearer ...` headers (sensitive).
    tokens: HashMap<String, CachedToken>,
}

struct CachedToken {
    header: HeaderValue,
    refresh_at: Instant,
}

impl AuthState {
    fn cached(&self, scope: &str, now: Instant) -> Option<HeaderValue> {
        self.tokens
            .get(scope)
            .filter(|t| now < t.refresh_at)
            .map(|t| t.header.clone())
    }

    fn store(&mut self, scope: String, token: CachedToken, now: Instant) {
        if self.tokens.len() >= MAX_CACHED_TOKENS {
            self.tokens.retain(|_, t| now < t.refresh_at);
            if self.tokens.len() >= MAX_CACHED_TOKENS {
                self.tokens.clear();
            }
        }
        self.tokens.insert(scope, token);
    }
}

/// The pull scope of a repository, or `""` for registry-level requests (`/v2/`).
fn scope_for(repo: Option<&RepoName>) -> String {
    repo.map(|r| format!("repository:{r}:pull"))
        .unwrap_or_default()
}

impl Inner {
    fn auth_state(&self) -> std::sync::MutexGuard<'_, AuthState> {
        // The state stays consistent even if a holder panicked: every update is one insert.
        self.auth.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the scheme a challenge asked for (from `ping` or a 401).
    pub(super) fn learn(&self, ch: &AuthChallenge) {
        let learned = match ch {
            AuthChallenge::Basic => Learned::Basic,
            AuthChallenge::Bearer { realm, service, .. } => Learned::Bearer {
                realm: realm.clone(),
                service: service.clone(),
            },
        };
        self.auth_state().learned = Some(learned);
    }

    /// The `Authorization` header for a request to the registry's origin, if the registry
    /// has asked for one before. Fetches a token up front when the registry is known to
    /// want Bearer and none is cached for this repository.
    pub(super) async fn authorization(
        &self,
        repo: Option<&RepoName>,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let scope = scope_for(repo);
        let learned = {
            let st = self.auth_state();
            if let Some(h) = st.cached(&scope, Instant::now()) {
                return Ok(Some(h));
            }
            st.learned.clone()
        };
        match learned {
            None => Ok(None),
            Some(Learned::Basic) => Ok(self.creds.as_ref().map(Credentials::header)),
            Some(Learned::Bearer { .. }) if repo.is_none() => Ok(None),
            Some(Learned::Bearer { realm, service }) => {
                let token = self
                    .fetch_token(&realm, service.as_deref(), &[scope.as_str()])
                    .await?;
                let header = token.header.clone();
                self.auth_state().store(scope, token, Instant::now());
                Ok(Some(header))
            }
        }
    }

    /// Answers a 401 from the registry: parses its challenge and gets fresh credentials
    /// (a new token even if one is cached: the cached one was just refused).
    pub(super) async fn answer_challenge(
        &self,
        headers: &HeaderMap,
        repo: Option<&RepoName>,
        shown: &str,
    ) -> Result<(), UpstreamError> {
        let unauthorized = |reason: String| UpstreamError::Unauthorized {
            url: shown.to_owned(),
            reason,
        };
        let values = headers.get_all(http::header::WWW_AUTHENTICATE);
        let selected = challenge::parse_all(values.iter().map(|v| v.as_bytes()))
            .and_then(|c| challenge::select(&c, &self.base))
            .map_err(|e| {
                tracing::warn!(url = %shown, error = %e, "refusing upstream auth challenge");
                unauthorized(format!("unusable challenge: {e}"))
            })?;
        let Some(ch) = selected else {
            return Err(unauthorized(
                "no supported authentication scheme offered".into(),
            ));
        };
        match &ch {
            AuthChallenge::Basic => {
                if self.creds.is_none() {
                    return Err(unauthorized(
                        "registry asks for credentials and none are configured".into(),
                    ));
                }
            }
            AuthChallenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let ours = scope_for(repo);
                let scopes: Vec<&str> = match scope {
                    Some(s) => s.split_whitespace().collect(),
                    None if ours.is_empty() => Vec::new(),
                    None => vec![ours.as_str()],
                };
                let token = self.fetch_token(realm, service.as_deref(), &scopes).await?;
                self.auth_state().store(ours, token, Instant::now());
            }
        }
        self.learn(&ch);
        Ok(())
    }

    /// `GET realm?service=...&scope=...` with Basic credentials if configured. The realm was
    /// validated by [`challenge::check_realm`].
    async fn fetch_token(
        &self,
        realm: &Url,
        service: Option<&str>,
        scopes: &[&str],
    ) -> Result<CachedToken, UpstreamError> {
        let mut url = realm.clone();
        if service.is_some() || !scopes.is_empty() {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scopes {
                q.append_pair("scope", s);
            }
        }
        let (url, shown) = (&url, &redact(&url));
        tracing::debug!(realm = %shown, ?scopes, "fetching registry token");
        self.with_retries(|| async move {
            let mut rb = self.client.get(url.clone());
            if let Some(c) = &self.creds {
                rb = rb.header(AUTHORIZATION, c.header());
            }
            let resp = self.execute(rb, shown).await?;
            match resp.status() {
                s if s.is_success() => {}
                StatusCode::UNAUTHORIZED => {
                    return Err(UpstreamError::Unauthorized {
                        url: shown.to_owned(),
                        reason: "token server refused the credentials".into(),
                    });
                }
                _ => return Err(status_error(&resp, shown)),
            }
            let body = self.read_body(resp, MAX_TOKEN_RESPONSE, shown).await?;
            let (header, lifetime) = parse_token_response(&body, shown)?;
            Ok(CachedToken {
                header,
                // Refresh a little early so a token does not expire in flight.
                refresh_at: Instant::now() + lifetime.mul_f64(0.9),
            })
        })
        .await
    }
}

/// Reads `{"token"|"access_token": "...", "expires_in": N}` into a ready header and the
/// token's lifetime. `access_token` wins when both are present (OAuth2 form). The token
/// itself never appears in an error.
fn parse_token_response(
    body: &[u8],
    shown: &str,
) -> Result<(HeaderValue, Duration), UpstreamError> {
    let bad =
        |what: &str| UpstreamError::BadResponse(format!("token response from {shown}: {what}"));
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| bad("not valid JSON"))?;
    let obj = v.as_object().ok_or_else(|| bad("not a JSON object"))?;
    let pick = |k: &str| {
        obj.get(k)
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let token = pick("access_token")
        .or_else(|| pick("token"))
        .ok_or_else(|| bad("no token or access_token"))?;
    let lifetime = match obj.get("expires_in").and_then(serde_json::Value::as_f64) {
        Some(secs) if secs.is_finite() && secs >= 1.0 => {
            Duration::from_secs_f64(secs.min(MAX_TOKEN_LIFETIME.as_secs_f64()))
        }
        _ => DEFAULT_TOKEN_LIFETIME,
    };
    let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| bad("token has characters not allowed in a header"))?;
    header.set_sensitive(true);
    Ok((header, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_response_forms() {
        let (h, life) = parse_token_response(br#"{"token":"abc","expires_in":300}"#, "u").unwrap();
        assert_eq!(h, "Bearer abc");
        assert!(h.is_sensitive());
        assert_eq!(life, Duration::from_secs(300));
        let (h, life) = parse_token_response(br#"{"token":"t","access_token":"a"}"#, "u").unwrap();
        assert_eq!(h, "Bearer a");
        assert_eq!(life, DEFAULT_TOKEN_LIFETIME);
        let (h, _) = parse_token_response(br#"{"access_token":"a","token":""}"#, "u").unwrap();
        assert_eq!(h, "Bearer a");
        let (_, life) = parse_token_response(br#"{"token":"t","expires_in":0}"#, "u").unwrap();
        assert_eq!(life, DEFAULT_TOKEN_LIFETIME);
        let (_, life) = parse_token_response(br#"{"token":"t","expires_in":1e12}"#, "u").unwrap();
        assert_eq!(life, MAX_TOKEN_LIFETIME);
    }

    #[test]
    fn bad_token_responses_do_not_leak_the_token() {
        for body in [
            &br#"{"token":""}"#[..],
            br#"{}"#,
            br#"[]"#,
            br#"not json"#,
            br#"{"token":42}"#,
        ] {
            assert!(parse_token_response(body, "u").is_err());
        }
        let err = parse_token_response(b"{\"token\":\"sekrit\\r\\nX: y\"}", "u").unwrap_err();
        assert!(!err.to_string().contains("sekrit"), "{err}");
    }

    #[test]
    fn credentials_are_validated_and_hidden() {
        assert!(Credentials::new("a:b".into(), Secret::new("p")).is_err());
        assert!(Credentials::new(String::new(), Secret::new("p")).is_err());
        let c = Credentials::new("user".into(), Secret::new("pass")).unwrap();
        assert_eq!(c.header(), "Basic dXNlcjpwYXNz");
        assert!(c.header().is_sensitive());
        assert!(!format!("{:?}", c.header()).contains("dXNlcjpwYXNz"));
    }

    #[test]
    fn scopes() {
        let r = RepoName::parse("team/app").unwrap();
        assert_eq!(scope_for(Some(&r)), "repository:team/app:pull");
        assert_eq!(scope_for(None), "");
    }
}
