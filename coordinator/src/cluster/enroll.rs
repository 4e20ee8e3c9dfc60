//! `POST /shoal/v1/enroll` on the front door: bootstrap token in, node certificate out.
//!
//! The token is checked against the token file in constant time and never logged; the CSR's
//! signature must verify; the certificate names only the node and addresses of the request;
//! revoked node names are refused. Ten failures from one address within a minute earn 429s
//! for the rest of that minute.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use shoal_proto::enroll::{
    EnrollError, EnrollErrorCode, EnrollRequest, EnrollResponse, MAX_ENROLL_BODY,
};
use tracing::{info, warn};

use super::ca::{ClusterCa, IssueError};
use super::revoke::Revocations;
use super::tokens;
use crate::certs::pem_of;
use crate::gateway::client::{Body, full};
use crate::metrics::Metrics;

/// Failures from one address tolerated per window.
const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Answers enrollment requests.
pub struct Enroller {
    ca: Arc<ClusterCa>,
    tokens_file: PathBuf,
    revocations: Arc<Revocations>,
    lifetime: Duration,
    metrics: Metrics,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl std::fmt::Debug for Enroller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enroller")
            .field("tokens_file", &self.tokens_file)
            .finish_non_exhaustive()
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn error(code: EnrollErrorCode, message: impl Into<String>) -> Response<Body> {
    let body = EnrollError {
        error: code,
        message: message.into(),
    };
    // Serialising a plain struct of strings cannot fail.
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, bytes)
}

impl Enroller {
    pub fn new(
        ca: Arc<ClusterCa>,
        tokens_file: PathBuf,
        revocations: Arc<Revocations>,
        lifetime: Duration,
        metrics: Metrics,
    ) -> Enroller {
        Enroller {
            ca,
            tokens_file,
            revocations,
            lifetime,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn limited(&self, ip: IpAddr) -> bool {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        f.retain(|_, (_, since)| now.duration_since(*since) < FAILURE_WINDOW);
        f.get(&ip).is_some_and(|(n, _)| *n >= MAX_FAILURES)
    }

    fn failed(&self, ip: IpAddr) {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        f.entry(ip).or_insert((0, Instant::now())).0 += 1;
    }

    /// Answers one request (any method on the enrollment path).
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let resp = self.answer(req, peer).await;
        let result = match resp.status().as_u16() {
            200 => "issued",
            401 => "bad_token",
            403 => "revoked",
            429 => "rate_limited",
            400 | 405 | 413 => "bad_request",
            _ => "error",
        };
        self.metrics.enrollment(result);
        if resp.status() != StatusCode::OK && resp.status() != StatusCode::TOO_MANY_REQUESTS {
            self.failed(peer.ip());
        }
        resp
    }

    async fn answer(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        if req.method() != Method::POST {
            let mut r = error(EnrollErrorCode::BadRequest, "enrollment takes POST");
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            return r;
        }
        if self.limited(peer.ip()) {
            return error(
                EnrollErrorCode::TooManyRequests,
                "too many failed enrollments from this address; try again in a minute",
            );
        }
        let body = match Limited::new(req.into_body(), MAX_ENROLL_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return error(
                    EnrollErrorCode::BadRequest,
                    format!("the body is unreadable or larger than {MAX_ENROLL_BODY} bytes"),
                );
            }
        };
        let request = match EnrollRequest::from_json(&body) {
            Ok(r) => r,
            Err(e) => return error(EnrollErrorCode::BadRequest, e.to_string()),
        };
        let tokens_file = self.tokens_file.clone();
        let token = request.token.clone();
        let ok = tokio::task::spawn_blocking(move || tokens::check(&tokens_file, &token)).await;
        match ok {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                warn!(peer = %peer, node = %request.node, "enrollment with an unknown bootstrap token");
                return error(EnrollErrorCode::Unauthorized, "no valid bootstrap token");
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot check bootstrap tokens");
                return error(EnrollErrorCode::Internal, "cannot check bootstrap tokens");
            }
            Err(_) => return error(EnrollErrorCode::Internal, "internal error"),
        }
        let revoked = self.revocations.current();
        if revoked.nodes.contains(&request.node) {
            warn!(peer = %peer, node = %request.node, "enrollment of a revoked node refused");
            return error(
                EnrollErrorCode::Revoked,
                format!("node {} is revoked", request.node),
            );
        }
        let csr = match CertificateSigningRequestDer::from_pem_slice(request.csr_pem.as_bytes()) {
            Ok(c) => c,
            Err(_) => return error(EnrollErrorCode::BadRequest, "csr_pem is not a PEM CSR"),
        };
        let issued =
            match self
                .ca
                .issue_node(csr.as_ref(), &request.node, &request.addrs, self.lifetime)
            {
                Ok(i) => i,
                Err(e @ (IssueError::BadCsr | IssueError::KeyType)) => {
                    return error(EnrollErrorCode::BadRequest, e.to_string());
                }
                Err(e) => {
                    warn!(error = %e, "issuing a node certificate failed");
                    return error(EnrollErrorCode::Internal, "cannot issue the certificate");
                }
            };
        info!(
            peer = %peer,
            node = %request.node,
            zone = %request.zone.as_str(),
            addrs = ?request.addrs,
            serial = %issued.serial,
            "node enrolled"
        );
        let answer = EnrollResponse {
            node: request.node,
            cert_pem: pem_of(&issued.der),
            ca_pem: self.ca.cert_pem().to_owned(),
            not_after: issued
                .not_after
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        };
        let bytes = serde_json::to_vec(&answer).unwrap_or_default();
        json_response(StatusCode::OK, bytes)
    }
}
