//! Cluster TLS, shared by the agent and the coordinator: the certificate a side presents
//! ([`CertSlot`], swapped on renewal), the cluster CA it trusts ([`Trust`], set at enrollment),
//! the facts read from a cluster certificate ([`cert_info`]), and the verifiers of the
//! control and peer channels.
//!
//! Every verifier checks the chain against the cluster CA with webpki (signature, validity,
//! key usage) and then the identity: exactly one `urn:shoal:node:NAME` or
//! `urn:shoal:coordinator:NAME` URI SAN ([`shoal_proto::enroll::Identity`]), compared exactly
//! with the name expected, and not refused (revoked or quarantined). There is no way to turn
//! any of it off: a side without the cluster CA refuses every handshake.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use shoal_proto::enroll::Identity;
use shoal_proto::msg::NodeId;

/// The crypto provider of the whole workspace (rustls' `ring`), passed explicitly.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a certificate cannot be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("not a parsable X.509 certificate: {0}")]
    Parse(String),
    #[error("the certificate's validity period is not representable")]
    Validity,
    #[error("the private key is unusable: {0}")]
    Key(String),
    #[error("the cluster CA certificate is unusable: {0}")]
    Ca(String),
}

/// What a cluster certificate says, read without verifying it (verification is the
/// verifiers' job; this is for bookkeeping: renewal times, revocation by serial, logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The single Shoal identity among the URI SANs, if there is exactly one.
    pub identity: Option<Identity>,
    /// Serial number, lower-case hex without leading zero bytes.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// IP address SANs.
    pub ips: Vec<IpAddr>,
}

impl CertInfo {
    /// When a holder should ask for a new certificate: two thirds into its validity.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }

    /// Whether the certificate is valid at `now` (a margin of `slack` before the end).
    pub fn is_valid_at(&self, now: SystemTime, slack: Duration) -> bool {
        self.not_before <= now && now + slack < self.not_after
    }

    /// The node name, when this is a node certificate.
    pub fn node(&self) -> Option<&NodeId> {
        match &self.identity {
            Some(Identity::Node(n)) => Some(n),
            _ => None,
        }
    }
}

/// Resolves once the wall clock has passed `not_after`: when a connection authenticated by a
/// certificate that ends then must close. Sleeps in steps of at most a minute, so a wall clock
/// that jumps is noticed within one.
pub async fn expired(not_after: SystemTime) {
    loop {
        match not_after.duration_since(SystemTime::now()) {
            Ok(left) if !left.is_zero() => {
                tokio::time::sleep(left.min(Duration::from_secs(60))).await;
            }
            _ => return,
        }
    }
}

/// The facts of the certificate a QUIC connection's other side presented (verified during the
/// handshake by the connection's verifier). `None` before the handshake or without one.
pub fn peer_cert_info(conn: &quinn::Connection) -> Option<CertInfo> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    cert_info(chain.first()?).ok()
}

/// Serial bytes as the revocation list writes them: lower-case hex, no leading zero bytes.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    let hex = hex::encode(&raw[start..]);
    if hex.is_empty() { "0".into() } else { hex }
}

fn unix_time(secs: i64) -> Result<SystemTime, CertError> {
    let secs = u64::try_from(secs).map_err(|_| CertError::Validity)?;
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .ok_or(CertError::Validity)
}

/// Reads the facts of a certificate.
pub fn cert_info(der: &CertificateDer<'_>) -> Result<CertInfo, CertError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| CertError::Parse(e.to_string()))?;
    let mut uris = Vec::new();
    let mut ips = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Parse(e.to_string()))?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push(*u),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        identity: Identity::from_uris(uris),
        serial: serial_hex(cert.raw_serial()),
        not_before: unix_time(cert.validity().not_before.timestamp())?,
        not_after: unix_time(cert.validity().not_after.timestamp())?,
        ips,
    })
}

/// The node name of a verified peer: what the data plane calls the other side of a
/// `shoal-peer/1` connection. `None` when the chain is missing or not a node's.
pub fn node_of_chain(chain: &[CertificateDer<'_>]) -> Option<NodeId> {
    cert_info(chain.first()?).ok()?.node().cloned()
}

/// Builds the rustls key of a chain (leaf first) and its private key.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, CertError> {
    CertifiedKey::from_der(chain, key, provider)
        .map(Arc::new)
        .map_err(|e| CertError::Key(e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// What this side presents.

/// The certificate this side presents, replaced on renewal: new handshakes get the new one,
/// established connections keep theirs. Empty until the first certificate, and then every
/// handshake that needs it fails.
#[derive(Default)]
pub struct CertSlot {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSlot")
            .field("loaded", &self.get().is_some())
            .finish()
    }
}

impl CertSlot {
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(key);
    }

    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

// ---------------------------------------------------------------------------------------------
// What this side trusts.

struct Anchor {
    ca: CertificateDer<'static>,
    roots: Arc<RootCertStore>,
    clients: Arc<dyn ClientCertVerifier>,
}

/// The cluster CA, once known. Verifiers built on it stay valid when it is set or replaced.
pub struct Trust {
    provider: Arc<CryptoProvider>,
    anchor: RwLock<Option<Arc<Anchor>>>,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("ca_set", &self.anchor().is_some())
            .finish()
    }
}

impl Trust {
    /// No CA yet: every certificate is refused.
    pub fn empty(provider: Arc<CryptoProvider>) -> Trust {
        Trust {
            provider,
            anchor: RwLock::new(None),
        }
    }

    pub fn new(
        provider: Arc<CryptoProvider>,
        ca: CertificateDer<'static>,
    ) -> Result<Trust, CertError> {
        let t = Trust::empty(provider);
        t.set_ca(ca)?;
        Ok(t)
    }

    /// Trusts `ca` (and nothing else) from now on.
    pub fn set_ca(&self, ca: CertificateDer<'static>) -> Result<(), CertError> {
        if self.ca().as_ref() == Some(&ca) {
            return Ok(());
        }
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| CertError::Ca(e.to_string()))?;
        let roots = Arc::new(roots);
        let clients =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), self.provider.clone())
                .build()
                .map_err(|e| CertError::Ca(e.to_string()))?;
        *self.anchor.write().unwrap_or_else(PoisonError::into_inner) =
            Some(Arc::new(Anchor { ca, roots, clients }));
        Ok(())
    }

    pub fn ca(&self) -> Option<CertificateDer<'static>> {
        self.anchor().map(|a| a.ca.clone())
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    fn anchor(&self) -> Option<Arc<Anchor>> {
        self.anchor
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

fn no_ca() -> TlsError {
    TlsError::General("no cluster CA yet (not enrolled)".into())
}

fn bad_identity(what: String) -> TlsError {
    TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        IdentityError(what),
    ))))
}

#[derive(Debug)]
struct IdentityError(String);

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IdentityError {}

/// Whether a verified node must still be refused.
pub trait Refusals: Send + Sync {
    /// `serial` as [`serial_hex`] writes it.
    fn is_refused(&self, node: &NodeId, serial: &str) -> bool;
}

/// Refuses nobody.
#[derive(Debug, Default)]
pub struct RefuseNone;

impl Refusals for RefuseNone {
    fn is_refused(&self, _node: &NodeId, _serial: &str) -> bool {
        false
    }
}

fn check_node(
    end_entity: &CertificateDer<'_>,
    expected: Option<&NodeId>,
    refusals: &dyn Refusals,
) -> Result<NodeId, TlsError> {
    let info = cert_info(end_entity)
        .map_err(|_| TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
    let Some(Identity::Node(node)) = info.identity else {
        return Err(bad_identity("not a cluster node certificate".into()));
    };
    if let Some(want) = expected
        && *want != node
    {
        return Err(bad_identity(format!(
            "certificate of node {node}, expected {want}"
        )));
    }
    if refusals.is_refused(&node, &info.serial) {
        return Err(TlsError::InvalidCertificate(CertificateError::Revoked));
    }
    Ok(node)
}

/// Verifies the client certificates of a `shoal-ctl/1` or `shoal-peer/1` server: chained to the
/// cluster CA, valid now, client-auth usage, a node identity, not refused. Mandatory.
pub struct NodeClientVerifier {
    trust: Arc<Trust>,
    refusals: Arc<dyn Refusals>,
}

impl fmt::Debug for NodeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeClientVerifier")
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

impl NodeClientVerifier {
    pub fn new(trust: Arc<Trust>, refusals: Arc<dyn Refusals>) -> NodeClientVerifier {
        NodeClientVerifier { trust, refusals }
    }
}

impl ClientCertVerifier for NodeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; each side has exactly one certificate to offer anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let anchor = self.trust.anchor().ok_or_else(no_ca)?;
        anchor
            .clients
            .verify_client_cert(end_entity, intermediates, now)?;
        check_node(end_entity, None, self.refusals.as_ref())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.trust.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.trust.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algorithms().supported_schemes()
    }
}

/// Whose server certificate a client expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A peer agent (`shoal-peer/1`): the server name is its node name.
    Node,
    /// A coordinator's control endpoint (`shoal-ctl/1`): the server name is the coordinator's
    /// configured name.
    Coordinator,
}

/// Verifies a `shoal-ctl/1` or `shoal-peer/1` server: chained to the cluster CA, valid now,
/// server-auth usage, and the identity named by the server name the connection was opened
/// with (exactly, case included), not refused.
pub struct ClusterServerVerifier {
    trust: Arc<Trust>,
    expect: Expect,
    refusals: Arc<dyn Refusals>,
}

impl fmt::Debug for ClusterServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterServerVerifier")
            .field("expect", &self.expect)
            .finish_non_exhaustive()
    }
}

impl ClusterServerVerifier {
    pub fn new(
        trust: Arc<Trust>,
        expect: Expect,
        refusals: Arc<dyn Refusals>,
    ) -> ClusterServerVerifier {
        ClusterServerVerifier {
            trust,
            expect,
            refusals,
        }
    }
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let anchor = self.trust.anchor().ok_or_else(no_ca)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &anchor.roots,
            intermediates,
            now,
            self.trust.algorithms().all,
        )?;
        let name = match server_name {
            ServerName::DnsName(d) => d.as_ref().to_owned(),
            ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
            _ => return Err(bad_identity("unsupported server name".into())),
        };
        let want =
            NodeId::new(&name).map_err(|_| bad_identity(format!("bad server name {name:?}")))?;
        match self.expect {
            Expect::Node => {
                check_node(end_entity, Some(&want), self.refusals.as_ref())?;
            }
            Expect::Coordinator => {
                let info = cert_info(end_entity)
                    .map_err(|_| TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
                if info.identity != Some(Identity::Coordinator(want.clone())) {
                    return Err(bad_identity(format!(
                        "not the certificate of coordinator {want}"
                    )));
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.trust.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.trust.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algorithms().supported_schemes()
    }
}

/// A rustls server configuration for a cluster channel: TLS 1.3 only (QUIC), mandatory client
/// certificates checked by `verifier`, this side's certificate from `slot`, one ALPN, no
/// session resumption.
pub fn server_config(
    trust: &Trust,
    verifier: Arc<dyn ClientCertVerifier>,
    slot: Arc<CertSlot>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(trust.provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(slot);
    cfg.alpn_protocols = vec![alpn.to_vec()];
    // No resumption: a resumed session skips certificate verification, so a node revoked (or
    // expired) since its last handshake could come back in with a ticket.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A rustls client configuration for a cluster channel: TLS 1.3 only, the server checked by
/// `verifier`, this side's certificate from `slot`, one ALPN.
pub fn client_config(
    trust: &Trust,
    verifier: Arc<dyn ServerCertVerifier>,
    slot: Arc<CertSlot>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(trust.provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // only to install a custom verifier; it verifies everything (see above)
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(slot);
    cfg.alpn_protocols = vec![alpn.to_vec()];
    // Every connection is a full handshake, verified both ways (see `server_config`).
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}
