//! The front door's rustls configuration, with a certificate that can be replaced while
//! serving.
//!
//! [`ReloadingCertResolver`] holds the current certificate and key; [`ReloadingCertResolver::reload`]
//! re-reads both files and swaps them in only if they parse and belong together, so a
//! half-finished renewal (new key, old certificate) leaves the old pair serving. New
//! handshakes get the new certificate; established connections keep theirs and are not
//! touched. The server calls `reload` on SIGHUP.
//!
//! The crypto provider is rustls' `ring`, passed explicitly: the workspace has one provider
//! and never relies on a process-wide default.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

/// ALPN protocols offered, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// Largest certificate or key file read.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why a certificate or key could not be loaded. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is larger than {MAX_PEM_BYTES} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("{}: malformed PEM: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no private key", path.display())]
    NoKey { path: PathBuf },
    #[error("certificate {} and key {} cannot be used together: {reason}", cert.display(), key.display())]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider of the whole workspace.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate that was loaded, as logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSummary {
    /// Hex SHA-256 of the leaf certificate's DER, as `openssl x509 -fingerprint -sha256` shows
    /// it (without colons).
    pub fingerprint: String,
    pub chain_len: usize,
}

/// Serves the certificate most recently loaded from a pair of PEM files.
pub struct ReloadingCertResolver {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<(Arc<CertifiedKey>, CertSummary)>,
}

impl fmt::Debug for ReloadingCertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCertResolver")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("current", &self.summary())
            .finish_non_exhaustive()
    }
}

impl ReloadingCertResolver {
    /// Loads the certificate chain (leaf first) and private key (PKCS#8, SEC1 or PKCS#1).
    pub fn load(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
        provider: Arc<CryptoProvider>,
    ) -> Result<ReloadingCertResolver, TlsError> {
        let cert_path = cert_path.into();
        let key_path = key_path.into();
        let loaded = load_pair(&cert_path, &key_path, &provider)?;
        info!(
            cert = %cert_path.display(),
            fingerprint = %loaded.1.fingerprint,
            "tls certificate loaded"
        );
        Ok(ReloadingCertResolver {
            cert_path,
            key_path,
            provider,
            current: RwLock::new(loaded),
        })
    }

    /// Re-reads the files. On success new handshakes use the new pair; on error the previous
    /// pair stays in use and the error is logged and returned.
    pub fn reload(&self) -> Result<CertSummary, TlsError> {
        match load_pair(&self.cert_path, &self.key_path, &self.provider) {
            Ok((key, summary)) => {
                info!(
                    cert = %self.cert_path.display(),
                    fingerprint = %summary.fingerprint,
                    "tls certificate reloaded"
                );
                *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                    (key, summary.clone());
                Ok(summary)
            }
            Err(error) => {
                warn!(%error, "tls certificate reload failed; keeping the previous certificate");
                Err(error)
            }
        }
    }

    /// The certificate in use.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    pub fn summary(&self) -> CertSummary {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .clone()
    }
}

impl ResolvesServerCert for ReloadingCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A server configuration (TLS 1.3 and 1.2, no client certificates, ALPN h2 and http/1.1)
/// whose certificate comes from `resolver`.
pub fn server_config(resolver: Arc<ReloadingCertResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = resolver.provider.clone();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn read_limited(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_err = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .map_err(read_err)?
        .take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

fn load_pair(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, CertSummary), TlsError> {
    let cert_pem = read_limited(cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_path.to_owned(),
            reason: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    };
    let summary = CertSummary {
        fingerprint: hex::encode(Sha256::digest(leaf.as_ref())),
        chain_len: chain.len(),
    };

    let key_pem = read_limited(key_path)?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey {
                path: key_path.to_owned(),
            });
        }
        // PEM errors name markers and positions, not the key's contents.
        Err(e) => {
            return Err(TlsError::Pem {
                path: key_path.to_owned(),
                reason: e.to_string(),
            });
        }
    };
    let certified =
        CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Unusable {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            reason: e.to_string(),
        })?;
    Ok((Arc::new(certified), summary))
}
