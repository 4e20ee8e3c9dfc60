//! The node's identity on disk and its keys: `identity.pem` in the state directory holds the
//! node certificate, the cluster CA certificate and the node's private key (PKCS#8), written
//! together atomically (mode 0600, directory 0700), so a crash never leaves a key that does
//! not match its certificate. Keys are ECDSA P-256, made here and never sent anywhere; the
//! coordinator only ever sees CSRs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use shoal_proto::msg::NodeId;

use super::ClusterError;
use super::tls::{CertError, CertInfo, cert_info, certified_key};

pub(crate) const IDENTITY_FILE: &str = "identity.pem";
/// Largest identity file read.
const MAX_IDENTITY_BYTES: u64 = 256 * 1024;

/// A key made for one enrollment or renewal, and its CSR.
pub(crate) struct NewKey {
    pub key: KeyPair,
    pub csr_pem: String,
    pub csr_der: Vec<u8>,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewKey(***)")
    }
}

/// Makes a key pair and a CSR naming `node` (the coordinator ignores the CSR's names and writes
/// its own; the CSR proves possession of the key).
pub(crate) fn new_key(node: &NodeId) -> Result<NewKey, ClusterError> {
    let internal = |e: rcgen::Error| ClusterError::Internal(format!("key generation: {e}"));
    let key = KeyPair::generate().map_err(internal)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node.as_str());
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(internal)?;
    Ok(NewKey {
        csr_pem: csr.pem().map_err(internal)?,
        csr_der: csr.der().to_vec(),
        key,
    })
}

/// A certificate with its key, ready to present.
#[derive(Clone)]
pub(crate) struct Loaded {
    pub leaf: CertificateDer<'static>,
    pub ca: CertificateDer<'static>,
    pub info: CertInfo,
    pub certified: Arc<CertifiedKey>,
    key_pem: String,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Loaded {
    /// Checks that `leaf` is a certificate of `node`, pairs it with `key`, and builds the
    /// rustls key (leaf and CA as the chain).
    pub fn new(
        node: &NodeId,
        leaf: CertificateDer<'static>,
        ca: CertificateDer<'static>,
        key_pem: String,
        provider: &CryptoProvider,
    ) -> Result<Loaded, ClusterError> {
        let info = cert_info(&leaf)?;
        if info.node() != Some(node) {
            return Err(ClusterError::Cert(CertError::Parse(format!(
                "the certificate is not for node {node} ({:?})",
                info.identity
            ))));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| CertError::Key(e.to_string()))?;
        let certified = certified_key(vec![leaf.clone(), ca.clone()], key, provider)?;
        Ok(Loaded {
            leaf,
            ca,
            info,
            certified,
            key_pem,
        })
    }

    /// From a fresh key and the certificate issued for it.
    pub fn from_new(
        node: &NodeId,
        key: &NewKey,
        leaf: CertificateDer<'static>,
        ca: CertificateDer<'static>,
        provider: &CryptoProvider,
    ) -> Result<Loaded, ClusterError> {
        Loaded::new(node, leaf, ca, key.key.serialize_pem(), provider)
    }
}

fn state_err(path: &Path) -> impl Fn(io::Error) -> ClusterError + '_ {
    move |source| ClusterError::State {
        path: path.to_owned(),
        source,
    }
}

/// Creates the state directory (0700) if needed.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), ClusterError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(state_err(dir))
}

/// Reads `identity.pem`: `Ok(None)` when it does not exist; an unreadable or mismatched file is
/// an error the caller may answer by enrolling again.
pub(crate) fn load(
    dir: &Path,
    node: &NodeId,
    provider: &CryptoProvider,
) -> Result<Option<Loaded>, ClusterError> {
    let path = dir.join(IDENTITY_FILE);
    let bytes = match fs::metadata(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_err(&path)(e)),
        Ok(m) if m.len() > MAX_IDENTITY_BYTES => {
            return Err(ClusterError::Cert(CertError::Parse(format!(
                "{} is larger than {MAX_IDENTITY_BYTES} bytes",
                path.display()
            ))));
        }
        Ok(_) => fs::read(&path).map_err(state_err(&path))?,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let [leaf, ca] = <[CertificateDer<'static>; 2]>::try_from(certs).map_err(|_| {
        CertError::Parse(format!(
            "{} must hold the node and CA certificates",
            path.display()
        ))
    })?;
    let key_pem = String::from_utf8(bytes)
        .map_err(|_| CertError::Parse("not UTF-8".into()))?
        .split("-----BEGIN PRIVATE KEY-----")
        .nth(1)
        .map(|rest| format!("-----BEGIN PRIVATE KEY-----{rest}"))
        .ok_or_else(|| CertError::Key("no PKCS#8 private key in the identity file".into()))?;
    Loaded::new(node, leaf, ca, key_pem, provider).map(Some)
}

fn pem_cert(der: &CertificateDer<'_>) -> String {
    pem_block("CERTIFICATE", der.as_ref())
}

pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes `identity.pem` atomically: a temporary file (0600) in the same directory, fsync,
/// rename, fsync of the directory.
pub(crate) fn save(dir: &Path, id: &Loaded) -> Result<PathBuf, ClusterError> {
    let path = dir.join(IDENTITY_FILE);
    let tmp = dir.join(format!(".{IDENTITY_FILE}.tmp"));
    let err = state_err(&path);
    let contents = format!("{}{}{}", pem_cert(&id.leaf), pem_cert(&id.ca), id.key_pem);
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(&err)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(&err)?;
    f.write_all(contents.as_bytes()).map_err(&err)?;
    f.sync_all().map_err(&err)?;
    drop(f);
    fs::rename(&tmp, &path).map_err(&err)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(&err)?;
    Ok(dir.join(IDENTITY_FILE))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use rcgen::SanType;

    use super::*;
    use crate::cluster::tls::provider;

    #[test]
    fn identity_is_stored_privately_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("cluster");
        ensure_dir(&state).unwrap();
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let node = NodeId::new("node-1").unwrap();
        assert!(load(&state, &node, &provider()).unwrap().is_none());

        // A self-signed stand-in for an issued certificate (the issuing side is tested in the
        // coordinator).
        let key = new_key(&node).unwrap();
        assert!(
            key.csr_pem
                .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
        );
        let mut params = CertificateParams::new(vec!["node-1".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::URI(
            shoal_proto::enroll::node_uri(&node).try_into().unwrap(),
        ));
        let cert = params.self_signed(&key.key).unwrap();
        let leaf = cert.der().clone();
        let id = Loaded::from_new(&node, &key, leaf.clone(), leaf.clone(), &provider()).unwrap();
        let path = save(&state, &id).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = load(&state, &node, &provider()).unwrap().unwrap();
        assert_eq!(back.info, id.info);
        assert_eq!(back.leaf, leaf);
        // Another node's name does not load it; a key that does not match is refused.
        let other = NodeId::new("node-2").unwrap();
        assert!(load(&state, &other, &provider()).is_err());
        let stranger = new_key(&node).unwrap();
        assert!(Loaded::from_new(&node, &stranger, leaf.clone(), leaf, &provider()).is_err());
        assert!(!format!("{stranger:?}").contains("PRIVATE"));
    }
}
