//! The coordinator's own authentication to upstream replicas: Basic with the pool's
//! credentials, or the Bearer token dance against the realm the registry names, with tokens
//! cached per scope. Client credentials are never involved.
//!
//! Challenges are parsed and checked by the agent's strict parser
//! (`shoal_agent::upstream::challenge`), which also enforces where credentials may go: the
//! token realm must be https, or plain http on the registry's own host when the registry is
//! itself plain http.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use shoal_agent::upstream::challenge::{self, AuthChallenge};
use tokio::time::Instant;
use url::Url;

use super::client::{self, HttpClient};
use crate::config::Credentials;

/// Largest token response accepted.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// Token lifetime when the server states none (Docker token spec).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const MAX_CACHED_TOKENS: usize = 4096;

/// What a request needs from the token server: `repository:<name>:<actions>` entries, or
/// `registry:catalog:*`. Empty for `/v2/`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope(Vec<String>);

impl Scope {
    pub fn none() -> Scope {
        Scope(Vec::new())
    }

    pub fn new(entries: impl IntoIterator<Item = String>) -> Scope {
        let mut v: Vec<String> = entries.into_iter().collect();
        v.sort();
        v.dedup();
        Scope(v)
    }

    fn key(&self) -> String {
        self.0.join(" ")
    }
}

/// Why upstream authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamAuthError {
    #[error("unusable WWW-Authenticate from upstream: {0}")]
    Challenge(String),
    #[error("upstream asks for credentials and none are configured")]
    NoCredentials,
    #[error("token server {realm}: {reason}")]
    Token { realm: String, reason: String },
}

#[derive(Clone, Debug)]
enum Learned {
    Basic,
    Bearer { realm: Url, service: Option<String> },
}

#[derive(Default)]
struct State {
    learned: Option<Learned>,
    tokens: HashMap<String, (HeaderValue, Instant)>,
}

/// Authentication state of one pool.
pub struct UpstreamAuth {
    /// `Basic base64(user:pass)`, marked sensitive.
    basic: Option<HeaderValue>,
    state: Mutex<State>,
    timeout: Duration,
}

impl std::fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamAuth")
            .field("has_credentials", &self.basic.is_some())
            .finish_non_exhaustive()
    }
}

impl UpstreamAuth {
    pub fn new(credentials: Option<&Credentials>, timeout: Duration) -> UpstreamAuth {
        let basic = credentials.and_then(|c| {
            let raw = format!("{}:{}", c.username, c.password.expose());
            let mut h = HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            ))
            // Base64 output is always a valid header value.
            .ok()?;
            h.set_sensitive(true);
            Some(h)
        });
        UpstreamAuth {
            basic,
            state: Mutex::new(State::default()),
            timeout,
        }
    }

    pub fn has_credentials(&self) -> bool {
        self.basic.is_some()
    }

    /// Whether the scheme is known (from a health check or an earlier 401).
    pub fn has_learned(&self) -> bool {
        self.lock().learned.is_some()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Learns the scheme from a 401 of `GET /v2/` without fetching anything (health checks).
    pub fn learn(&self, headers: &HeaderMap, registry: &Url) -> Result<(), UpstreamAuthError> {
        if let Some(ch) = select(headers, registry)? {
            self.lock().learned = Some(learned_of(&ch));
        }
        Ok(())
    }

    /// The `Authorization` header for a request to a replica, fetching a token if the
    /// registry wants Bearer and none is cached for `scope`. `None` before anything was
    /// learned, or for Bearer registry-level requests.
    pub async fn header(
        &self,
        scope: &Scope,
        client: &HttpClient,
    ) -> Result<Option<HeaderValue>, UpstreamAuthError> {
        let key = scope.key();
        let learned = {
            let st = self.lock();
            if let Some((h, refresh_at)) = st.tokens.get(&key)
                && Instant::now() < *refresh_at
            {
                return Ok(Some(h.clone()));
            }
            st.learned.clone()
        };
        match learned {
            None => Ok(None),
            Some(Learned::Basic) => Ok(self.basic.clone()),
            Some(Learned::Bearer { .. }) if scope.0.is_empty() => Ok(None),
            Some(Learned::Bearer { realm, service }) => {
                let token = self
                    .fetch_token(client, &realm, service.as_deref(), &scope.0)
                    .await?;
                self.store(key, token.clone());
                Ok(Some(token.0))
            }
        }
    }

    /// Answers a 401 from a replica: learns its challenge and, for Bearer, fetches a fresh
    /// token for `scope` (the scope named by the challenge wins, as the registry asked for it).
    pub async fn answer(
        &self,
        headers: &HeaderMap,
        registry: &Url,
        scope: &Scope,
        client: &HttpClient,
    ) -> Result<(), UpstreamAuthError> {
        let Some(ch) = select(headers, registry)? else {
            return Err(UpstreamAuthError::Challenge(
                "no supported authentication scheme offered".into(),
            ));
        };
        match &ch {
            AuthChallenge::Basic if self.basic.is_none() => {
                return Err(UpstreamAuthError::NoCredentials);
            }
            AuthChallenge::Basic => {}
            AuthChallenge::Bearer {
                realm,
                service,
                scope: asked,
            } => {
                let scopes: Vec<String> = match asked {
                    Some(s) => s.split_whitespace().map(str::to_owned).collect(),
                    None => scope.0.clone(),
                };
                let token = self
                    .fetch_token(client, realm, service.as_deref(), &scopes)
                    .await?;
                self.store(scope.key(), token);
            }
        }
        self.lock().learned = Some(learned_of(&ch));
        Ok(())
    }

    fn store(&self, key: String, token: (HeaderValue, Instant)) {
        let mut st = self.lock();
        if st.tokens.len() >= MAX_CACHED_TOKENS {
            let now = Instant::now();
            st.tokens.retain(|_, (_, t)| now < *t);
            if st.tokens.len() >= MAX_CACHED_TOKENS {
                st.tokens.clear();
            }
        }
        st.tokens.insert(key, token);
    }

    /// `GET realm?service=..&scope=..` with the pool's credentials as Basic, if any.
    async fn fetch_token(
        &self,
        client: &HttpClient,
        realm: &Url,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<(HeaderValue, Instant), UpstreamAuthError> {
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
        let mut shown = realm.clone();
        shown.set_query(None);
        let shown = shown.to_string();
        let fail = |reason: String| UpstreamAuthError::Token {
            realm: shown.clone(),
            reason,
        };
        tracing::debug!(realm = %shown, ?scopes, "fetching upstream token");
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(url.as_str())
            .body(client::empty())
            .map_err(|e| fail(format!("cannot build the request: {e}")))?;
        if let Some(b) = &self.basic {
            req.headers_mut().insert(AUTHORIZATION, b.clone());
        }
        let exchange = async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| fail(format!("request failed: {e}")))?;
            match resp.status() {
                s if s.is_success() => {}
                StatusCode::UNAUTHORIZED => {
                    return Err(fail("refused the coordinator's credentials".into()));
                }
                s => return Err(fail(format!("answered {s}"))),
            }
            let body = http_body_util::Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE)
                .collect()
                .await
                .map_err(|e| fail(format!("cannot read the response: {e}")))?
                .to_bytes();
            Ok::<Bytes, UpstreamAuthError>(body)
        };
        let body = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| fail(format!("no answer within {:?}", self.timeout)))??;
        let (header, lifetime) = parse_token_response(&body).map_err(|r| fail(r.into()))?;
        // Refreshed a little early so a token does not expire in flight.
        Ok((header, Instant::now() + lifetime.mul_f64(0.9)))
    }
}

fn learned_of(ch: &AuthChallenge) -> Learned {
    match ch {
        AuthChallenge::Basic => Learned::Basic,
        AuthChallenge::Bearer { realm, service, .. } => Learned::Bearer {
            realm: realm.clone(),
            service: service.clone(),
        },
    }
}

fn select(headers: &HeaderMap, registry: &Url) -> Result<Option<AuthChallenge>, UpstreamAuthError> {
    let values = headers.get_all(WWW_AUTHENTICATE);
    if values.iter().next().is_none() {
        return Ok(None);
    }
    challenge::parse_all(values.iter().map(|v| v.as_bytes()))
        .and_then(|c| challenge::select(&c, registry))
        .map_err(|e| UpstreamAuthError::Challenge(e.to_string()))
}

/// Reads `{"token"|"access_token": "...", "expires_in": N}`. The token never appears in an
/// error.
fn parse_token_response(body: &[u8]) -> Result<(HeaderValue, Duration), &'static str> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| "not valid JSON")?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let pick = |k: &str| {
        obj.get(k)
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let token = pick("access_token")
        .or_else(|| pick("token"))
        .ok_or("no token or access_token")?;
    let lifetime = match obj.get("expires_in").and_then(serde_json::Value::as_f64) {
        Some(secs) if secs.is_finite() && secs >= 1.0 => {
            Duration::from_secs_f64(secs.min(MAX_TOKEN_LIFETIME.as_secs_f64()))
        }
        _ => DEFAULT_TOKEN_LIFETIME,
    };
    let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "token has characters not allowed in a header")?;
    header.set_sensitive(true);
    Ok((header, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_responses() {
        let (h, life) = parse_token_response(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!(h, "Bearer abc");
        assert!(h.is_sensitive());
        assert_eq!(life, Duration::from_secs(300));
        let (h, _) = parse_token_response(br#"{"token":"t","access_token":"a"}"#).unwrap();
        assert_eq!(h, "Bearer a");
        assert!(parse_token_response(br#"{"token":""}"#).is_err());
        assert!(parse_token_response(b"{\"token\":\"a\\r\\nb\"}").is_err());
    }

    #[test]
    fn scopes_are_canonical() {
        let a = Scope::new([
            "repository:b:pull".to_owned(),
            "repository:a:pull".to_owned(),
        ]);
        let b = Scope::new([
            "repository:a:pull".to_owned(),
            "repository:b:pull".to_owned(),
        ]);
        assert_eq!(a.key(), b.key());
        assert_eq!(Scope::none().key(), "");
    }

    #[test]
    fn learning_checks_the_realm() {
        let auth = UpstreamAuth::new(None, Duration::from_secs(1));
        let registry = Url::parse("https://registry.example").unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer realm="http://evil.example/token""#),
        );
        assert!(auth.learn(&h, &registry).is_err());
        assert!(!auth.has_learned());
        h.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Basic realm="r""#),
        );
        auth.learn(&h, &registry).unwrap();
        assert!(auth.has_learned());
    }
}
