//! The cluster CA: created in the data directory at first start if absent (`ca.crt` 0644,
//! `ca.key` 0600), shared by every coordinator of the cluster (copy the directory), and the
//! only signer of node and coordinator certificates.
//!
//! A node certificate is bound to what the coordinator decides, never to what the CSR asks:
//! its names (CN, one DNS SAN and the `urn:shoal:node:NAME` URI SAN) and addresses (IP SANs)
//! are written here; the CSR contributes only its public key, after its signature proved that
//! the requester holds the private key.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use shoal_agent::cluster::tls::{CertSlot, certified_key};
use shoal_proto::enroll::{coordinator_uri, node_uri};
use shoal_proto::msg::NodeId;
use time::OffsetDateTime;

use crate::certs::{CA_CERT_FILE, CA_KEY_FILE, CertAuthority, CertError, random_serial};
use crate::fsutil::{Existing, write_atomic};

/// Lifetime of the CA created at first start.
pub const CA_DAYS: u32 = 3650;
/// Lifetime of a coordinator's control-channel certificate; it is re-issued at two thirds.
pub const COORDINATOR_CERT_LIFETIME: Duration = Duration::from_secs(7 * 86400);

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the CSR is malformed or its signature does not verify")]
    BadCsr,
    #[error("the CSR's key type is not accepted (ECDSA P-256 or P-384, or Ed25519)")]
    KeyType,
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// Why the CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cluster CA in {}: {source}", dir.display())]
    Io { dir: PathBuf, source: io::Error },
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// The cluster CA, able to sign.
pub struct ClusterCa {
    ca: CertAuthority,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

/// A certificate just issued.
#[derive(Clone, Debug)]
pub struct Issued {
    pub der: CertificateDer<'static>,
    pub serial: String,
    pub not_after: SystemTime,
}

fn to_system(t: OffsetDateTime) -> SystemTime {
    let secs = t.unix_timestamp().max(0) as u64;
    UNIX_EPOCH + Duration::from_secs(secs)
}

impl ClusterCa {
    /// Loads the CA of `dir`, creating it (and `dir`, mode 0700) first if absent. Two
    /// coordinators starting at once on a shared directory end up with the same CA: the file
    /// written first wins and the other loads it.
    pub fn load_or_create(dir: &Path) -> Result<ClusterCa, CaError> {
        use std::os::unix::fs::DirBuilderExt;
        let io_err = |source| CaError::Io {
            dir: dir.to_owned(),
            source,
        };
        let cert = dir.join(CA_CERT_FILE);
        let key = dir.join(CA_KEY_FILE);
        if !cert.exists() && !key.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err)?;
            let ca = CertAuthority::generate("cluster", CA_DAYS)?;
            // Key first: the certificate's presence says the pair is complete.
            match write_atomic(&key, ca.key_pem().as_bytes(), 0o600, Existing::Refuse) {
                Ok(()) => {
                    write_atomic(&cert, ca.cert_pem().as_bytes(), 0o644, Existing::Refuse)
                        .map_err(io_err)?;
                    tracing::info!(dir = %dir.display(), "cluster CA created");
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // Another coordinator is creating it; wait briefly for its certificate.
                    for _ in 0..50 {
                        if cert.exists() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        let ca = CertAuthority::load(&cert, &key)?;
        Ok(ClusterCa {
            ca,
            provider: shoal_agent::cluster::tls::provider(),
        })
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        self.ca.cert_der()
    }

    pub fn cert_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    fn params(
        cn: &str,
        lifetime: Duration,
        sans: Vec<SanType>,
        eku: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<CertificateParams, rcgen::Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Shoal");
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = eku;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        // Slack for clocks a little behind, small enough not to distort short lifetimes.
        let slack = (lifetime / 10).min(Duration::from_secs(300));
        params.not_before = now - slack;
        params.not_after = now + lifetime;
        Ok(params)
    }

    /// Issues a node certificate for the key of `csr_der` (a DER PKCS#10 request whose
    /// signature must verify), bound to `node` and `ips`, valid for `lifetime`.
    pub fn issue_node(
        &self,
        csr_der: &[u8],
        node: &NodeId,
        ips: &[IpAddr],
        lifetime: Duration,
    ) -> Result<Issued, IssueError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|_| IssueError::BadCsr)?;
        let alg = csr.public_key.algorithm();
        let accepted = [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ];
        if !accepted.contains(&alg) {
            return Err(IssueError::KeyType);
        }
        let mut sans = vec![
            SanType::DnsName(node.as_str().try_into()?),
            SanType::URI(node_uri(node).try_into()?),
        ];
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let params = Self::params(
            node.as_str(),
            lifetime,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        let cert = params.signed_by(&csr.public_key, self.ca.issuer())?;
        let der = cert.der().clone();
        Ok(Issued {
            serial: shoal_agent::cluster::tls::serial_hex(
                params
                    .serial_number
                    .as_ref()
                    .map(|s| s.as_ref())
                    .unwrap_or_default(),
            ),
            not_after: to_system(params.not_after),
            der,
        })
    }

    /// Issues this coordinator's control-channel certificate (a fresh key) and returns it
    /// ready to serve, with its chain (leaf, CA).
    pub fn issue_coordinator(
        &self,
        name: &NodeId,
    ) -> Result<(Arc<CertifiedKey>, SystemTime), IssueError> {
        let key = KeyPair::generate()?;
        let params = Self::params(
            name.as_str(),
            COORDINATOR_CERT_LIFETIME,
            vec![
                SanType::DnsName(name.as_str().try_into()?),
                SanType::URI(coordinator_uri(name).try_into()?),
            ],
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        )?;
        let cert = params.signed_by(&key, self.ca.issuer())?;
        let chain = vec![cert.der().clone(), self.cert_der().clone()];
        let key_der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| rcgen::Error::PemError(e.to_string()))?;
        let certified = certified_key(chain, key_der, &self.provider)
            .map_err(|e| rcgen::Error::PemError(e.to_string()))?;
        Ok((certified, to_system(params.not_after)))
    }

    /// Re-issues the coordinator certificate in `slot` (issued once by the caller) at two
    /// thirds of its life, until `cancel`.
    pub async fn keep_coordinator_cert(
        self: Arc<Self>,
        name: NodeId,
        slot: Arc<CertSlot>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let mut wait = COORDINATOR_CERT_LIFETIME * 2 / 3;
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return,
            }
            wait = match self.issue_coordinator(&name) {
                Ok((key, _)) => {
                    slot.set(key);
                    COORDINATOR_CERT_LIFETIME * 2 / 3
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot issue the control-channel certificate");
                    Duration::from_secs(60)
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{CertificateParams, KeyPair, SanType};
    use rustls::client::danger::ServerCertVerifier;
    use rustls::server::danger::ClientCertVerifier;
    use rustls_pki_types::{ServerName, UnixTime};
    use shoal_agent::cluster::tls::{
        ClusterServerVerifier, Expect, NodeClientVerifier, Refusals, RefuseNone, Trust, cert_info,
        provider,
    };
    use shoal_proto::enroll::Identity;

    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    /// A CSR that asks for names the CA must not grant.
    fn greedy_csr() -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::URI(
            coordinator_uri(&id("coord-a")).try_into().unwrap(),
        ));
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    struct Denied;
    impl Refusals for Denied {
        fn is_refused(&self, node: &NodeId, _serial: &str) -> bool {
            node.as_str() == "node-1"
        }
    }

    fn at(t: SystemTime) -> UnixTime {
        UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap())
    }

    #[test]
    fn node_certificates_carry_only_what_the_ca_decides() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(&dir.path().join("ca")).unwrap();
        let mode = std::fs::metadata(dir.path().join("ca/ca.key")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        // Loading again gives the same CA.
        let again = ClusterCa::load_or_create(&dir.path().join("ca")).unwrap();
        assert_eq!(again.cert_der(), ca.cert_der());

        let ips: Vec<IpAddr> = vec!["10.0.0.7".parse().unwrap()];
        let issued = ca
            .issue_node(
                &greedy_csr(),
                &id("node-1"),
                &ips,
                Duration::from_secs(3600),
            )
            .unwrap();
        let info = cert_info(&issued.der).unwrap();
        assert_eq!(info.identity, Some(Identity::Node(id("node-1"))));
        assert_eq!(info.ips, ips);
        assert_eq!(info.serial, issued.serial);
        let life = info.not_after.duration_since(info.not_before).unwrap();
        assert!(life >= Duration::from_secs(3600) && life <= Duration::from_secs(3600 + 301));
        let der = issued.der.as_ref();
        assert!(!der.windows(12).any(|w| w == b"evil.example"));
        assert!(!der.windows(11).any(|w| w == b"coordinator"));

        // A tampered CSR (signature no longer verifies) is refused.
        let mut bad = greedy_csr();
        let n = bad.len();
        bad[n - 5] ^= 0xff;
        assert!(matches!(
            ca.issue_node(&bad, &id("node-1"), &ips, Duration::from_secs(60)),
            Err(IssueError::BadCsr)
        ));
        assert!(matches!(
            ca.issue_node(b"junk", &id("node-1"), &ips, Duration::from_secs(60)),
            Err(IssueError::BadCsr)
        ));
    }

    #[test]
    fn verifiers_check_chain_expiry_identity_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(&dir.path().join("ca")).unwrap();
        let other = ClusterCa::load_or_create(&dir.path().join("other")).unwrap();
        let trust = Arc::new(Trust::new(provider(), ca.cert_der().clone()).unwrap());
        let ips: Vec<IpAddr> = vec!["10.0.0.7".parse().unwrap()];
        let leaf = ca
            .issue_node(&greedy_csr(), &id("node-2"), &ips, Duration::from_secs(60))
            .unwrap();
        let foreign = other
            .issue_node(&greedy_csr(), &id("node-2"), &ips, Duration::from_secs(60))
            .unwrap();
        let now = SystemTime::now();

        let clients = NodeClientVerifier::new(trust.clone(), Arc::new(RefuseNone));
        assert!(clients.verify_client_cert(&leaf.der, &[], at(now)).is_ok());
        assert!(
            clients
                .verify_client_cert(&foreign.der, &[], at(now))
                .is_err()
        );
        // Expired (and not yet valid).
        let later = leaf.not_after + Duration::from_secs(1);
        assert!(
            clients
                .verify_client_cert(&leaf.der, &[], at(later))
                .is_err()
        );
        let earlier = now - Duration::from_secs(3600);
        assert!(
            clients
                .verify_client_cert(&leaf.der, &[], at(earlier))
                .is_err()
        );
        // Revoked.
        let strict = NodeClientVerifier::new(trust.clone(), Arc::new(Denied));
        let revoked = ca
            .issue_node(&greedy_csr(), &id("node-1"), &ips, Duration::from_secs(60))
            .unwrap();
        assert!(strict.verify_client_cert(&leaf.der, &[], at(now)).is_ok());
        assert!(
            strict
                .verify_client_cert(&revoked.der, &[], at(now))
                .is_err()
        );

        // Servers: a peer by its exact node name; a coordinator by its name; never one for the
        // other.
        let peers = ClusterServerVerifier::new(trust.clone(), Expect::Node, Arc::new(RefuseNone));
        let name = |s: &'static str| ServerName::try_from(s).unwrap();
        assert!(
            peers
                .verify_server_cert(&leaf.der, &[], &name("node-2"), &[], at(now))
                .is_ok()
        );
        for wrong in ["node-1", "Node-2", "coord-a"] {
            assert!(
                peers
                    .verify_server_cert(&leaf.der, &[], &name(wrong), &[], at(now))
                    .is_err(),
                "{wrong}"
            );
        }
        assert!(
            peers
                .verify_server_cert(&foreign.der, &[], &name("node-2"), &[], at(now))
                .is_err()
        );
        let (coord, _) = ca.issue_coordinator(&id("coord-a")).unwrap();
        let coord_leaf = coord.cert[0].clone();
        let ctl =
            ClusterServerVerifier::new(trust.clone(), Expect::Coordinator, Arc::new(RefuseNone));
        assert!(
            ctl.verify_server_cert(&coord_leaf, &[], &name("coord-a"), &[], at(now))
                .is_ok()
        );
        assert!(
            ctl.verify_server_cert(&coord_leaf, &[], &name("coord-b"), &[], at(now))
                .is_err()
        );
        // A node certificate cannot pass for a coordinator, even under the same name.
        let impostor = ca
            .issue_node(&greedy_csr(), &id("coord-a"), &ips, Duration::from_secs(60))
            .unwrap();
        assert!(
            ctl.verify_server_cert(&impostor.der, &[], &name("coord-a"), &[], at(now))
                .is_err()
        );
        assert!(
            peers
                .verify_server_cert(&coord_leaf, &[], &name("coord-a"), &[], at(now))
                .is_err()
        );
        // A coordinator certificate is no client certificate.
        assert!(
            clients
                .verify_client_cert(&coord_leaf, &[], at(now))
                .is_err()
        );
        // Without a CA, nothing passes.
        let empty = Arc::new(Trust::empty(provider()));
        let blind = NodeClientVerifier::new(empty, Arc::new(RefuseNone));
        assert!(blind.verify_client_cert(&leaf.der, &[], at(now)).is_err());
    }
}
