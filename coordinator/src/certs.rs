//! `cert init`: a certificate authority and a server certificate for the front door, made
//! with rcgen (no openssl), plus the instructions each kind of client needs to trust it.
//!
//! Output directory (created with mode 0700 if missing):
//! - `ca.crt` (0644): the CA certificate, to install on every client;
//! - `ca.key` (0600): the CA key, needed only to issue server certificates again;
//! - `server.crt` (0644): the server certificate followed by the CA certificate;
//! - `server.key` (0600): the server key.
//!
//! Keys are ECDSA P-256. The CA may sign end-entity certificates only (path length 0); the
//! server certificate carries every `--host` as a DNS name and every `--ip` as an IP address
//! SAN, with the serverAuth extended key usage. Existing files are never overwritten without
//! `force`; with `reuse_ca`, the existing CA signs a new server certificate, so clients need
//! nothing new when a server certificate is renewed or gains a name.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::fsutil::{Existing, write_atomic};

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_CERT_FILE: &str = "server.crt";
pub const SERVER_KEY_FILE: &str = "server.key";
/// Server certificate lifetime by default: the longest that Apple platforms accept.
pub const DEFAULT_SERVER_DAYS: u32 = 825;
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Longest lifetime accepted for either certificate.
pub const MAX_DAYS: u32 = 36_500;

const PUBLIC_MODE: u32 = 0o644;
const SECRET_MODE: u32 = 0o600;

/// Why `cert init` failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no --host or --ip given: the certificate needs at least one name")]
    NoNames,
    #[error(
        "invalid host name {0:?}: DNS labels of letters, digits and '-', optionally '*.' first"
    )]
    InvalidHost(String),
    #[error("validity of {0} days is outside 1..={MAX_DAYS}")]
    InvalidDays(u32),
    #[error("refusing to overwrite {} (use --force)", list_paths(.0))]
    Exists(Vec<PathBuf>),
    #[error("--reuse-ca needs {}", list_paths(.0))]
    MissingCa(Vec<PathBuf>),
    #[error("cannot read the CA from {}: {reason}", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("cannot write {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

fn list_paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CertInitOptions {
    pub hosts: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub out_dir: PathBuf,
    pub server_days: u32,
    pub ca_days: u32,
    /// Overwrite existing files.
    pub force: bool,
    /// Sign with the CA already in `out_dir` instead of creating one.
    pub reuse_ca: bool,
}

/// What was created.
#[derive(Clone, Debug)]
pub struct CertInitReport {
    pub out_dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub ca_reused: bool,
    /// DNS names then IP addresses, as in the certificate.
    pub names: Vec<String>,
    pub server_not_after: OffsetDateTime,
}

/// A CA able to sign certificates.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Issuer's Debug already elides the key.
        f.debug_struct("CertAuthority")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// A server certificate and its key, PEM-encoded.
pub struct IssuedCert {
    /// Leaf certificate followed by the CA certificate.
    pub chain_pem: String,
    pub leaf_der: CertificateDer<'static>,
    pub key_pem: String,
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Creates a CA named after `label` (usually the first host name).
    pub fn generate(label: &str, days: u32) -> Result<CertAuthority, CertError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Shoal");
        dn.push(DnType::CommonName, format!("Shoal CA for {label}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, days)?;
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(CertAuthority {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA certificate and key from PEM files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<CertAuthority, CertError> {
        let bad = |path: &Path, reason: String| CertError::BadCa {
            path: path.to_owned(),
            reason,
        };
        let cert_der =
            CertificateDer::from_pem_file(cert_path).map_err(|e| bad(cert_path, e.to_string()))?;
        let key_pem = fs::read_to_string(key_path).map_err(|e| bad(key_path, e.to_string()))?;
        // The rcgen error does not quote the key.
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(key_path, e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| bad(cert_path, e.to_string()))?;
        let cert_pem = pem_of(&cert_der);
        Ok(CertAuthority {
            issuer,
            cert_der,
            cert_pem,
        })
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The signer, for certificates this module does not shape itself (the cluster CA's).
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// PEM of the CA key (PKCS#8).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a server certificate for `hosts` (DNS names, validated) and `ips`.
    pub fn issue_server_cert(
        &self,
        hosts: &[String],
        ips: &[IpAddr],
        days: u32,
    ) -> Result<IssuedCert, CertError> {
        let hosts = hosts
            .iter()
            .map(|h| normalize_host(h))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(first) = hosts
            .first()
            .cloned()
            .or_else(|| ips.first().map(|ip| ip.to_string()))
        else {
            return Err(CertError::NoNames);
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, first);
        params.distinguished_name = dn;
        for host in hosts {
            params
                .subject_alt_names
                .push(SanType::DnsName(host.try_into()?));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        set_validity(&mut params, days)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            leaf_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            not_after: params.not_after,
        })
    }
}

pub(crate) fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, so the DER integer is exactly 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn set_validity(params: &mut CertificateParams, days: u32) -> Result<(), CertError> {
    if days == 0 || days > MAX_DAYS {
        return Err(CertError::InvalidDays(days));
    }
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clients whose clocks run a little behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    Ok(())
}

/// Lower-cases and checks a DNS name (a leading `*.` wildcard label is allowed).
pub fn normalize_host(host: &str) -> Result<String, CertError> {
    let invalid = || CertError::InvalidHost(host.chars().take(64).collect());
    let lower = host.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let rest = name.strip_prefix("*.").unwrap_or(name);
    if rest.is_empty() || name.len() > 253 || rest.parse::<IpAddr>().is_ok() {
        return Err(invalid());
    }
    for label in rest.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(invalid());
        }
    }
    Ok(name.to_owned())
}

/// Creates the CA (unless reused) and the server certificate in `opts.out_dir`.
pub fn cert_init(opts: &CertInitOptions) -> Result<CertInitReport, CertError> {
    let hosts = opts
        .hosts
        .iter()
        .map(|h| normalize_host(h))
        .collect::<Result<Vec<_>, _>>()?;
    if hosts.is_empty() && opts.ips.is_empty() {
        return Err(CertError::NoNames);
    }
    for days in [opts.server_days, opts.ca_days] {
        if days == 0 || days > MAX_DAYS {
            return Err(CertError::InvalidDays(days));
        }
    }
    let dir = &opts.out_dir;
    let ca_cert = dir.join(CA_CERT_FILE);
    let ca_key = dir.join(CA_KEY_FILE);
    let server_cert = dir.join(SERVER_CERT_FILE);
    let server_key = dir.join(SERVER_KEY_FILE);

    let to_write: Vec<&PathBuf> = if opts.reuse_ca {
        vec![&server_cert, &server_key]
    } else {
        vec![&ca_cert, &ca_key, &server_cert, &server_key]
    };
    if !opts.force {
        let existing: Vec<PathBuf> = to_write
            .iter()
            .filter(|p| p.exists())
            .map(|p| (*p).clone())
            .collect();
        if !existing.is_empty() {
            return Err(CertError::Exists(existing));
        }
    }

    let ca = if opts.reuse_ca {
        let missing: Vec<PathBuf> = [&ca_cert, &ca_key]
            .into_iter()
            .filter(|p| !p.exists())
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(CertError::MissingCa(missing));
        }
        CertAuthority::load(&ca_cert, &ca_key)?
    } else {
        let label = hosts
            .first()
            .cloned()
            .or_else(|| opts.ips.first().map(|ip| ip.to_string()))
            .unwrap_or_default();
        CertAuthority::generate(&label, opts.ca_days)?
    };
    let issued = ca.issue_server_cert(&hosts, &opts.ips, opts.server_days)?;

    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CertError::Io {
                path: dir.clone(),
                source,
            })?;
    }
    let existing = if opts.force {
        Existing::Replace
    } else {
        Existing::Refuse
    };
    let write = |path: &Path, contents: &str, mode: u32| {
        write_atomic(path, contents.as_bytes(), mode, existing).map_err(|source| CertError::Io {
            path: path.to_owned(),
            source,
        })
    };
    if !opts.reuse_ca {
        write(&ca_key, &ca.key_pem(), SECRET_MODE)?;
        write(&ca_cert, ca.cert_pem(), PUBLIC_MODE)?;
    }
    // Key first: a coordinator reloading in between sees a key that does not match the old
    // certificate, refuses the pair and keeps serving the old one.
    write(&server_key, &issued.key_pem, SECRET_MODE)?;
    write(&server_cert, &issued.chain_pem, PUBLIC_MODE)?;

    let mut names = hosts;
    names.extend(opts.ips.iter().map(|ip| ip.to_string()));
    Ok(CertInitReport {
        out_dir: dir.clone(),
        ca_cert,
        ca_key,
        server_cert,
        server_key,
        ca_reused: opts.reuse_ca,
        names,
        server_not_after: issued.not_after,
    })
}

/// How clients name the registry: `host` on 443, `host:port` otherwise, IPv6 in brackets.
pub fn registry_address(name: &str, port: u16) -> String {
    let host = match name.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => name.to_owned(),
    };
    if port == 443 {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// The text `cert init` prints: what was made and what each client needs.
pub fn client_instructions(report: &CertInitReport, port: u16) -> String {
    let mut s = String::new();
    let ca = report.ca_cert.display();
    let date = report.server_not_after.date();
    // Writing to a String cannot fail.
    let _ = writeln!(s, "Created in {}:", report.out_dir.display());
    if report.ca_reused {
        let _ = writeln!(
            s,
            "  {CA_CERT_FILE}      (existing CA, reused: clients need nothing new)"
        );
    } else {
        let _ = writeln!(
            s,
            "  {CA_CERT_FILE}      CA certificate: install it on every client (public)"
        );
        let _ = writeln!(
            s,
            "  {CA_KEY_FILE}      CA private key (mode 0600): keep it safe, offline if you can; it is only needed\n                to issue server certificates again (cert init --reuse-ca)"
        );
    }
    let _ = writeln!(
        s,
        "  {SERVER_CERT_FILE}  server certificate for {}, followed by the CA; valid until {date}",
        report.names.join(", ")
    );
    let _ = writeln!(s, "  {SERVER_KEY_FILE}  server private key (mode 0600)");
    let _ = writeln!(
        s,
        "\nThe coordinator serves {} with {}; after replacing them, send it SIGHUP.",
        report.server_cert.display(),
        report.server_key.display()
    );
    let _ = writeln!(
        s,
        "\nClients must trust {ca}. Docker, containerd and podman look the certificate up by the\n\
         registry address exactly as written in image names: the host alone when the registry\n\
         listens on 443, host:port otherwise (this text assumes port {port}; see --port).\n\
         Repeat the per-address steps for every name clients use."
    );
    let addrs: Vec<String> = report
        .names
        .iter()
        .map(|n| registry_address(n, port))
        .collect();
    let first = addrs.first().cloned().unwrap_or_default();

    let _ = writeln!(s, "\nDocker (no daemon restart needed):");
    for a in &addrs {
        let _ = writeln!(
            s,
            "  sudo mkdir -p /etc/docker/certs.d/{a} && sudo cp {ca} /etc/docker/certs.d/{a}/ca.crt"
        );
    }
    let _ = writeln!(
        s,
        "\ncontainerd (CRI, nerdctl; ctr with --hosts-dir /etc/containerd/certs.d):\n\
         \x20 sudo mkdir -p /etc/containerd/certs.d/{first} && sudo cp {ca} /etc/containerd/certs.d/{first}/ca.crt\n\
         \x20 /etc/containerd/certs.d/{first}/hosts.toml:\n\
         \x20   server = \"https://{first}\"\n\
         \x20   [host.\"https://{first}\"]\n\
         \x20     capabilities = [\"pull\", \"resolve\", \"push\"]\n\
         \x20     ca = \"/etc/containerd/certs.d/{first}/ca.crt\"\n\
         \x20 and in /etc/containerd/config.toml, then restart containerd:\n\
         \x20   [plugins.\"io.containerd.grpc.v1.cri\".registry]\n\
         \x20     config_path = \"/etc/containerd/certs.d\""
    );
    let _ = writeln!(s, "\npodman, buildah, CRI-O and skopeo:");
    for a in &addrs {
        let _ = writeln!(
            s,
            "  sudo mkdir -p /etc/containers/certs.d/{a} && sudo cp {ca} /etc/containers/certs.d/{a}/ca.crt"
        );
    }
    let _ = writeln!(
        s,
        "  or, for one skopeo command: --src-cert-dir DIR / --dest-cert-dir DIR (DIR holding ca.crt)"
    );
    let _ = writeln!(
        s,
        "\nSystem trust store (curl, Go and most other programs; Docker needs a daemon restart to see it):\n\
         \x20 Debian/Ubuntu: sudo cp {ca} /usr/local/share/ca-certificates/shoal-ca.crt && sudo update-ca-certificates\n\
         \x20 RHEL/Fedora:   sudo cp {ca} /etc/pki/ca-trust/source/anchors/shoal-ca.crt && sudo update-ca-trust"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_checked() {
        assert_eq!(
            normalize_host("Docker.Example.COM.").unwrap(),
            "docker.example.com"
        );
        assert_eq!(normalize_host("*.example.com").unwrap(), "*.example.com");
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a_b",
            "192.0.2.1",
            "a b",
            "*",
            "*.",
            "x.*.y",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn registry_addresses() {
        assert_eq!(registry_address("h.example", 443), "h.example");
        assert_eq!(registry_address("h.example", 5443), "h.example:5443");
        assert_eq!(registry_address("2001:db8::1", 5443), "[2001:db8::1]:5443");
    }

    #[test]
    fn refuses_to_overwrite_and_reuses_ca() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tls");
        let opts = CertInitOptions {
            hosts: vec!["reg.example".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            out_dir: out.clone(),
            server_days: 30,
            ca_days: 60,
            force: false,
            reuse_ca: false,
        };
        let report = cert_init(&opts).unwrap();
        let ca_before = fs::read(&report.ca_cert).unwrap();
        let server_before = fs::read(&report.server_cert).unwrap();
        assert!(matches!(cert_init(&opts), Err(CertError::Exists(p)) if p.len() == 4));

        let reuse = CertInitOptions {
            reuse_ca: true,
            force: true,
            ..opts.clone()
        };
        let report = cert_init(&reuse).unwrap();
        assert_eq!(fs::read(&report.ca_cert).unwrap(), ca_before);
        assert_ne!(fs::read(&report.server_cert).unwrap(), server_before);

        let text = client_instructions(&report, 5443);
        assert!(
            text.contains("/etc/docker/certs.d/reg.example:5443/ca.crt"),
            "{text}"
        );
        assert!(
            text.contains("/etc/docker/certs.d/127.0.0.1:5443/ca.crt"),
            "{text}"
        );
        assert!(
            text.contains("/etc/containers/certs.d/reg.example:5443/ca.crt"),
            "{text}"
        );
        assert!(text.contains("update-ca-certificates"), "{text}");
    }
}
