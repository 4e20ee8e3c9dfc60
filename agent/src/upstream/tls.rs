//! The rustls client configuration for one upstream: system roots plus an optional CA file,
//! with the workspace's single crypto provider (ring) passed explicitly.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::error::UpstreamError;

/// The system's trust anchors, read once per process (hundreds of files on a typical host).
fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for err in &loaded.errors {
            tracing::warn!(error = %err, "could not load some system root certificates");
        }
        loaded.certs
    })
}

/// Builds the client configuration. `ca_file` is a PEM file with one or more CA certificates
/// (the `certs.d/<host>/ca.crt` of the classic docker setup); they are trusted in addition to
/// the system roots. Never installs a process-wide provider.
pub(super) fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = RootCertStore::empty();
    let (_, ignored) = roots.add_parsable_certificates(native_roots().iter().cloned());
    if ignored > 0 {
        tracing::debug!(ignored, "skipped unparsable system root certificates");
    }
    if let Some(path) = ca_file {
        let shown = path.display();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| UpstreamError::Config(format!("cannot read CA file {shown}: {e}")))?;
        let mut added = 0usize;
        for cert in certs {
            let cert = cert
                .map_err(|e| UpstreamError::Config(format!("bad PEM in CA file {shown}: {e}")))?;
            roots.add(cert).map_err(|e| {
                UpstreamError::Config(format!("bad certificate in CA file {shown}: {e}"))
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(UpstreamError::Config(format!(
                "CA file {shown} holds no PEM certificate"
            )));
        }
    }
    if roots.is_empty() {
        tracing::warn!("no trusted root certificates: https upstreams will fail verification");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Config(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // reqwest takes the config as is, ALPN included; offer h2 as its own builder would.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_errors_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.crt");
        let err = client_config(Some(&missing)).unwrap_err();
        assert!(matches!(err, UpstreamError::Config(_)), "{err}");

        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "not a pem file\n").unwrap();
        let err = client_config(Some(&empty)).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");

        // Valid PEM framing around bytes that are not a certificate.
        let junk = dir.path().join("junk.crt");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = client_config(Some(&junk)).unwrap_err();
        assert!(err.to_string().contains("bad certificate"), "{err}");
    }

    #[test]
    fn builds_without_a_ca_file() {
        let cfg = client_config(None).unwrap();
        assert_eq!(cfg.alpn_protocols[0], b"h2");
    }
}
