//! Enrollment over HTTPS: `POST /shoal/v1/enroll` on a coordinator's front door with the
//! bootstrap token and a CSR, authenticating the front door by a CA file, a pin, or the system
//! roots ([`FrontDoorTrust`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::CryptoProvider;
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest as _, Sha256};
use shoal_proto::enroll::{
    BootstrapToken, ENROLL_PATH, EnrollError, EnrollErrorCode, EnrollRequest, EnrollResponse,
};

use super::ClusterError;
use super::config::{ClusterConfig, CoordinatorAddr, FrontDoorTrust};
use super::identity::{Loaded, NewKey};
use super::tls::provider;

/// Largest enrollment answer read.
const MAX_RESPONSE: usize = 256 * 1024;

/// SHA-256 of a certificate's SubjectPublicKeyInfo (DER), as `ca_pin` names it.
pub fn spki_pin(cert: &CertificateDer<'_>) -> Result<[u8; 32], TlsError> {
    let parsed = ParsedCertificate::try_from(cert)?;
    Ok(Sha256::digest(parsed.subject_public_key_info().as_ref()).into())
}

/// Accepts a front door whose chain verifies up to a certificate with the pinned key.
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for PinVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinVerifier(sha256:{})", hex::encode(self.pin))
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let anchor = intermediates
            .iter()
            .find(|c| spki_pin(c).is_ok_and(|p| p == self.pin))
            .ok_or(TlsError::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))?;
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        verify_server_name(&parsed, server_name)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The HTTPS client for enrollment.
pub(crate) fn client(trust: &FrontDoorTrust) -> Result<reqwest::Client, ClusterError> {
    let provider = provider();
    let cfg_err = |e: String| ClusterError::Config(format!("front door TLS: {e}"));
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| cfg_err(e.to_string()))?;
    let mut config = match trust {
        FrontDoorTrust::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| cfg_err(format!("cannot read {}: {e}", path.display())))?;
            for c in certs {
                let c = c.map_err(|e| cfg_err(format!("{}: {e}", path.display())))?;
                roots
                    .add(c)
                    .map_err(|e| cfg_err(format!("{}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(cfg_err(format!("{} holds no certificate", path.display())));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        FrontDoorTrust::Pin(pin) => builder
            .dangerous() // a verifier of our own that checks the chain and the name
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: *pin,
                provider: provider.clone(),
            }))
            .with_no_client_auth(),
        FrontDoorTrust::System => {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .build()
        .map_err(|e| cfg_err(e.to_string()))
}

/// One enrollment attempt at `coordinator`. Returns the identity to install; refusals carry
/// the coordinator's error code (401/403 are permanent).
pub(crate) async fn enroll_at(
    http: &reqwest::Client,
    cfg: &ClusterConfig,
    token: &BootstrapToken,
    coordinator: &CoordinatorAddr,
    key: &NewKey,
) -> Result<Loaded, ClusterError> {
    let transient = |reason: String| ClusterError::Enroll {
        coordinator: coordinator.name.to_string(),
        reason,
    };
    let req = EnrollRequest {
        token: token.clone(),
        node: cfg.node.clone(),
        zone: cfg.zone.clone(),
        addrs: vec![cfg.advertise.ip()],
        csr_pem: key.csr_pem.clone(),
    };
    let url = format!("{}{ENROLL_PATH}", coordinator.enroll_url);
    let body = serde_json::to_vec(&req).map_err(|e| transient(e.to_string()))?;
    let resp = http
        .post(&url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        // reqwest's error names the URL (no secrets in it) and the cause.
        .map_err(|e| transient(format!("{e}")))?;
    let status = resp.status();
    let body = read_limited(resp)
        .await
        .map_err(|e| transient(format!("reading the answer: {e}")))?;
    if !status.is_success() {
        let (code, message) = match serde_json::from_slice::<EnrollError>(&body) {
            Ok(e) => (e.error, e.message),
            Err(_) => (
                if status.is_server_error() {
                    EnrollErrorCode::Internal
                } else {
                    EnrollErrorCode::BadRequest
                },
                format!("HTTP {status}"),
            ),
        };
        return Err(ClusterError::EnrollRefused {
            coordinator: coordinator.name.to_string(),
            code,
            message: message.chars().take(300).collect(),
        });
    }
    let answer: EnrollResponse =
        serde_json::from_slice(&body).map_err(|e| transient(format!("malformed answer: {e}")))?;
    let leaf = CertificateDer::from_pem_slice(answer.cert_pem.as_bytes())
        .map_err(|e| transient(format!("certificate in the answer: {e}")))?;
    let ca = CertificateDer::from_pem_slice(answer.ca_pem.as_bytes())
        .map_err(|e| transient(format!("CA in the answer: {e}")))?;
    Loaded::from_new(&cfg.node, key, leaf, ca, &provider())
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_RESPONSE {
            return Err(format!("answer larger than {MAX_RESPONSE} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
