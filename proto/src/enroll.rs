//! Enrollment: how an agent gets its first cluster certificate, and how cluster certificates
//! name who they belong to.
//!
//! An agent posts an [`EnrollRequest`] (JSON) to [`ENROLL_PATH`] on a coordinator's HTTPS front
//! door, with a bootstrap token and a PKCS#10 CSR for a key it made and keeps. The coordinator
//! answers an [`EnrollResponse`]: a short-lived certificate signed by the cluster CA, bound to
//! the node name and addresses of the request (never to names inside the CSR), and the CA
//! certificate. Renewal later goes over the control channel (`AgentMsg::Renew`).
//!
//! Identities: every cluster certificate carries exactly one URI SAN saying what it is,
//! [`node_uri`] for agents and [`coordinator_uri`] for coordinators' control endpoints. Peers
//! and coordinators compare these exactly; a DNS SAN with the same name is there for ordinary
//! tools. Because the CA writes every SAN itself, an agent can never hold a coordinator's
//! identity, whatever it names itself.

use std::fmt;
use std::net::IpAddr;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use crate::msg::{NodeId, Zone};

/// Where agents enroll, on the coordinator's HTTPS front door (`POST`, JSON body).
pub const ENROLL_PATH: &str = "/shoal/v1/enroll";
/// Largest enrollment request body.
pub const MAX_ENROLL_BODY: usize = 64 * 1024;
/// Longest CSR accepted in PEM form.
pub const MAX_CSR_PEM: usize = 16 * 1024;
/// Most addresses one node may have in its certificate.
pub const MAX_NODE_ADDRS: usize = 16;
/// Bootstrap token length bounds, in bytes.
pub const MIN_TOKEN_LEN: usize = 16;
pub const MAX_TOKEN_LEN: usize = 512;

const NODE_URI_PREFIX: &str = "urn:shoal:node:";
const COORDINATOR_URI_PREFIX: &str = "urn:shoal:coordinator:";

/// The URI SAN of an agent's certificate.
pub fn node_uri(node: &NodeId) -> String {
    format!("{NODE_URI_PREFIX}{node}")
}

/// The URI SAN of a coordinator's control-channel certificate. Coordinator names follow the
/// node name grammar.
pub fn coordinator_uri(name: &NodeId) -> String {
    format!("{COORDINATOR_URI_PREFIX}{name}")
}

/// Who a cluster certificate belongs to, read from its URI SAN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Node(NodeId),
    Coordinator(NodeId),
}

impl Identity {
    /// Parses one URI SAN; `None` for anything that is not a Shoal identity.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        if let Some(name) = uri.strip_prefix(NODE_URI_PREFIX) {
            return NodeId::new(name).ok().map(Identity::Node);
        }
        if let Some(name) = uri.strip_prefix(COORDINATOR_URI_PREFIX) {
            return NodeId::new(name).ok().map(Identity::Coordinator);
        }
        None
    }

    /// The single identity among a certificate's URI SANs: `None` when there is none or more
    /// than one (the CA never issues such a certificate, so it is not ours).
    pub fn from_uris<'a>(uris: impl IntoIterator<Item = &'a str>) -> Option<Identity> {
        let mut found = None;
        for uri in uris {
            if let Some(id) = Identity::from_uri(uri) {
                if found.is_some() {
                    return None;
                }
                found = Some(id);
            }
        }
        found
    }
}

/// Whether `name` can be a certificate's DNS name and a TLS server name: labels of letters,
/// digits, `-` and `_`, not starting or ending with `-`, and not all digits and dots (which
/// would read as an IP address). Node and coordinator names must be; host names and
/// Kubernetes node names are.
pub fn is_dns_compatible(name: &str) -> bool {
    if name.is_empty() || name.len() > 253 || name.parse::<IpAddr>().is_ok() {
        return false;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }) && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// A bootstrap token: printable ASCII without spaces, [`MIN_TOKEN_LEN`] to [`MAX_TOKEN_LEN`]
/// bytes. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken(String);

/// Why a string is not a bootstrap token (the message never quotes it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "a bootstrap token is {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} printable ASCII characters without spaces"
)]
pub struct TokenError;

impl BootstrapToken {
    pub fn new(s: &str) -> Result<BootstrapToken, TokenError> {
        let ok = (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(BootstrapToken(s.to_owned()))
        } else {
            Err(TokenError)
        }
    }

    /// The token itself, for the comparison and for sending it. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BootstrapToken(***)")
    }
}

impl Serialize for BootstrapToken {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for BootstrapToken {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        BootstrapToken::new(&s).map_err(de::Error::custom)
    }
}

/// Why an enrollment request is malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnrollRequestError {
    #[error("the request body is not a valid enrollment request: {0}")]
    Json(String),
    #[error("node name {0:?} cannot be a DNS name (letters, digits, '-', '_' and dots)")]
    NodeName(String),
    #[error("{0} addresses, at most {MAX_NODE_ADDRS}")]
    TooManyAddrs(usize),
    #[error("address {0} cannot be a node's address")]
    BadAddr(IpAddr),
    #[error("csr_pem is not one PEM certificate request of at most {MAX_CSR_PEM} bytes")]
    Csr,
}

/// `POST /shoal/v1/enroll` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: BootstrapToken,
    pub node: NodeId,
    pub zone: Zone,
    /// The addresses peers reach the node at; each becomes an IP SAN. The coordinator accepts
    /// a control session only when the `Hello`'s peer address is one of them.
    pub addrs: Vec<IpAddr>,
    /// PKCS#10 request, PEM (`-----BEGIN CERTIFICATE REQUEST-----`), for the node's own key.
    pub csr_pem: String,
}

impl EnrollRequest {
    /// Parses and checks a request body.
    pub fn from_json(body: &[u8]) -> Result<EnrollRequest, EnrollRequestError> {
        if body.len() > MAX_ENROLL_BODY {
            return Err(EnrollRequestError::Json(format!(
                "body of {} bytes exceeds {MAX_ENROLL_BODY}",
                body.len()
            )));
        }
        // serde_json's messages name the field and position, not the values.
        let req: EnrollRequest =
            serde_json::from_slice(body).map_err(|e| EnrollRequestError::Json(e.to_string()))?;
        req.validate()?;
        Ok(req)
    }

    pub fn validate(&self) -> Result<(), EnrollRequestError> {
        if !is_dns_compatible(self.node.as_str()) {
            return Err(EnrollRequestError::NodeName(self.node.to_string()));
        }
        if self.addrs.len() > MAX_NODE_ADDRS {
            return Err(EnrollRequestError::TooManyAddrs(self.addrs.len()));
        }
        for a in &self.addrs {
            let bad = a.is_unspecified()
                || a.is_multicast()
                || matches!(a, IpAddr::V4(v4) if v4.is_broadcast());
            if bad {
                return Err(EnrollRequestError::BadAddr(*a));
            }
        }
        let pem = self.csr_pem.trim();
        let ok = pem.len() <= MAX_CSR_PEM
            && pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----")
            && pem.ends_with("-----END CERTIFICATE REQUEST-----")
            && pem.matches("-----BEGIN").count() == 1;
        if !ok {
            return Err(EnrollRequestError::Csr);
        }
        Ok(())
    }
}

/// Answer to a successful enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub node: NodeId,
    /// The node's certificate, PEM.
    pub cert_pem: String,
    /// The cluster CA certificate, PEM: what peers' and coordinators' certificates must chain to.
    pub ca_pem: String,
    /// End of the certificate's validity, seconds since the Unix epoch.
    pub not_after: u64,
}

/// What went wrong, as the `error` field of a failed enrollment's JSON body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollErrorCode {
    /// 400: the request is malformed (the message says how).
    BadRequest,
    /// 401: no valid bootstrap token.
    Unauthorized,
    /// 403: the node name is revoked.
    Revoked,
    /// 429: too many failed attempts from this address.
    TooManyRequests,
    /// 500.
    Internal,
}

impl EnrollErrorCode {
    pub fn status(self) -> u16 {
        match self {
            EnrollErrorCode::BadRequest => 400,
            EnrollErrorCode::Unauthorized => 401,
            EnrollErrorCode::Revoked => 403,
            EnrollErrorCode::TooManyRequests => 429,
            EnrollErrorCode::Internal => 500,
        }
    }

    /// Whether asking again (later, with the same request) may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            EnrollErrorCode::TooManyRequests | EnrollErrorCode::Internal
        )
    }
}

/// Body of a failed enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollError {
    pub error: EnrollErrorCode,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSR: &str =
        "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n";

    fn request() -> EnrollRequest {
        EnrollRequest {
            token: BootstrapToken::new("0123456789abcdef0123").unwrap(),
            node: NodeId::new("node-1").unwrap(),
            zone: Zone::new("dc1/rack2").unwrap(),
            addrs: vec!["10.0.0.5".parse().unwrap()],
            csr_pem: CSR.into(),
        }
    }

    #[test]
    fn identities_round_trip_and_are_exclusive() {
        let n = NodeId::new("node-1").unwrap();
        assert_eq!(
            Identity::from_uri(&node_uri(&n)),
            Some(Identity::Node(n.clone()))
        );
        assert_eq!(
            Identity::from_uri(&coordinator_uri(&n)),
            Some(Identity::Coordinator(n.clone()))
        );
        for bad in [
            "urn:shoal:node:",
            "urn:shoal:node:a b",
            "urn:shoal:other:x",
            "https://x",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
        let two = [node_uri(&n), coordinator_uri(&n)];
        assert_eq!(Identity::from_uris(two.iter().map(String::as_str)), None);
        let one = ["https://other".to_owned(), node_uri(&n)];
        assert_eq!(
            Identity::from_uris(one.iter().map(String::as_str)),
            Some(Identity::Node(n))
        );
    }

    #[test]
    fn dns_compatible_names() {
        for ok in [
            "node-1",
            "n1.example.com",
            "ip-10-0-0-1.ec2.internal",
            "a_b",
            "N",
        ] {
            assert!(is_dns_compatible(ok), "{ok}");
        }
        for bad in [
            "", "-a", "a-", "a..b", ".a", "10.0.0.1", "123", "1.2", "a b",
        ] {
            assert!(!is_dns_compatible(bad), "{bad}");
        }
    }

    #[test]
    fn tokens_are_bounded_and_never_shown() {
        assert!(BootstrapToken::new("short").is_err());
        assert!(BootstrapToken::new("has a space in the middle").is_err());
        assert!(BootstrapToken::new(&"x".repeat(MAX_TOKEN_LEN + 1)).is_err());
        let t = BootstrapToken::new("s3cret-s3cret-s3cret").unwrap();
        assert!(!format!("{t:?}").contains("s3cret"));
        let r = request();
        assert!(!format!("{r:?}").contains("0123456789abcdef0123"));
        // A bad token's error does not quote it.
        let body = serde_json::to_string(&r)
            .unwrap()
            .replace("0123456789abcdef0123", "tiny");
        let err = EnrollRequest::from_json(body.as_bytes()).unwrap_err();
        assert!(!err.to_string().contains("tiny"), "{err}");
    }

    #[test]
    fn requests_parse_and_are_checked() {
        let r = request();
        let body = serde_json::to_vec(&r).unwrap();
        assert_eq!(EnrollRequest::from_json(&body).unwrap(), r);

        let mut bad = request();
        bad.node = NodeId::new("-x").unwrap();
        assert!(matches!(
            bad.validate(),
            Err(EnrollRequestError::NodeName(_))
        ));
        let mut bad = request();
        bad.addrs = vec!["0.0.0.0".parse().unwrap()];
        assert!(matches!(
            bad.validate(),
            Err(EnrollRequestError::BadAddr(_))
        ));
        let mut bad = request();
        bad.addrs = vec!["10.0.0.1".parse().unwrap(); MAX_NODE_ADDRS + 1];
        assert!(matches!(
            bad.validate(),
            Err(EnrollRequestError::TooManyAddrs(_))
        ));
        let mut bad = request();
        bad.csr_pem = format!("{CSR}{CSR}");
        assert_eq!(bad.validate(), Err(EnrollRequestError::Csr));
        let mut bad = request();
        bad.csr_pem = "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----".into();
        assert_eq!(bad.validate(), Err(EnrollRequestError::Csr));

        for body in [
            &b"{}"[..],
            b"not json",
            b"{\"token\":\"0123456789abcdef0123\",\"node\":\"bad name\",\"zone\":\"\",\"addrs\":[],\"csr_pem\":\"\"}",
        ] {
            assert!(EnrollRequest::from_json(body).is_err());
        }
        let extra = String::from_utf8(body.clone())
            .unwrap()
            .replace('}', ",\"x\":1}");
        assert!(EnrollRequest::from_json(extra.as_bytes()).is_err());
        assert!(EnrollRequest::from_json(&vec![b' '; MAX_ENROLL_BODY + 1]).is_err());
    }

    #[test]
    fn error_codes() {
        let e = EnrollError {
            error: EnrollErrorCode::Unauthorized,
            message: "no valid bootstrap token".into(),
        };
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains("\"unauthorized\""), "{json}");
        assert_eq!(serde_json::from_str::<EnrollError>(&json).unwrap(), e);
        assert_eq!(EnrollErrorCode::Revoked.status(), 403);
        assert!(!EnrollErrorCode::Unauthorized.is_retryable());
    }
}
