//! Pushes and pulls images with the real `skopeo` binary, isolated from the host's config.
//!
//! Each call gets its own temp dir holding a permissive policy, an empty `registries.conf`,
//! an empty auth file, `--registries.d`, `--tmpdir` and `HOME`, so nothing under `~/.config`,
//! `/etc/containers/registries.conf` or a leftover `auth.json` changes what a test does.
//! One piece of shared state remains: skopeo run as root keeps its blob-info cache in
//! `/var/lib/containers/cache` (skopeo 1.9.3 has no flag to move it). It only remembers where
//! blobs were seen, so at worst a push tries a cross-repository mount that the registry
//! refuses, then uploads normally.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::process::Command;

use crate::image::TestImage;
use crate::{SKOPEO_BIN, file_tail, require};

/// Default limit for one `skopeo copy`, generous for a 2-core machine pulling tens of MiB.
pub const DEFAULT_COPY_TIMEOUT: Duration = Duration::from_secs(120);

/// Manifest type to write at the destination (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    /// OCI image manifest (`--format oci`).
    Oci,
    /// Docker schema 2 (`--format v2s2`): Docker media types, so a new manifest digest.
    V2s2,
}

impl ManifestFormat {
    fn as_arg(self) -> &'static str {
        match self {
            ManifestFormat::Oci => "oci",
            ManifestFormat::V2s2 => "v2s2",
        }
    }
}

/// Options for one copy. They apply to the registry side of the copy: the source of a pull,
/// the destination of a push.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// `USER:PASS` for basic or token auth (`--src-creds` / `--dest-creds`).
    pub creds: Option<String>,
    /// Directory with `ca.crt` (and optionally a client cert) to trust for TLS
    /// (`--src-cert-dir` / `--dest-cert-dir`). Only used when `tls_verify` is true.
    pub cert_dir: Option<PathBuf>,
    /// Require HTTPS and verify certificates. When false (the default) skopeo first tries
    /// HTTPS without verification and falls back to plain HTTP, so a plain-HTTP server sees
    /// one TLS ClientHello it cannot parse before the real requests.
    pub tls_verify: bool,
    /// Manifest type at the destination; `None` keeps the source's.
    pub format: Option<ManifestFormat>,
    /// Kill skopeo and fail after this long.
    pub timeout: Duration,
    /// `--retry-times`: 0 (the default) makes failures show at once instead of after retries.
    pub retry_times: u32,
    /// Pass `--debug`, which logs every HTTP request to stderr (kept in [`CopyOutput`]).
    pub debug: bool,
    /// Extra arguments for `skopeo copy`, placed before the image names.
    pub extra_args: Vec<String>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            creds: None,
            cert_dir: None,
            tls_verify: false,
            format: None,
            timeout: DEFAULT_COPY_TIMEOUT,
            retry_times: 0,
            debug: false,
            extra_args: Vec::new(),
        }
    }
}

impl CopyOptions {
    pub fn creds(mut self, user_pass: impl Into<String>) -> Self {
        self.creds = Some(user_pass.into());
        self
    }

    /// Verifies TLS against the `ca.crt` in `dir`.
    pub fn tls(mut self, cert_dir: impl Into<PathBuf>) -> Self {
        self.tls_verify = true;
        self.cert_dir = Some(cert_dir.into());
        self
    }

    pub fn format(mut self, format: ManifestFormat) -> Self {
        self.format = Some(format);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn debug(mut self) -> Self {
        self.debug = true;
        self
    }
}

/// What a successful copy printed, and the manifest digest it wrote (`--digestfile`).
#[derive(Debug, Clone)]
pub struct CopyOutput {
    pub stdout: String,
    pub stderr: String,
    /// Digest of the manifest written at the destination.
    pub digest: Option<String>,
    pub elapsed: Duration,
}

/// Which side of the copy is a registry, i.e. which `--src-*` or `--dest-*` flags to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegistrySide {
    Src,
    Dest,
}

/// Namespace for skopeo invocations.
#[derive(Debug)]
pub struct Skopeo;

impl Skopeo {
    /// Pushes `oci:LAYOUT:TAG` to `docker://DEST`, where `dest` is `127.0.0.1:PORT/name:tag`.
    pub async fn push(
        layout: &Path,
        tag: &str,
        dest: &str,
        opts: &CopyOptions,
    ) -> Result<CopyOutput> {
        let src = format!("oci:{}:{tag}", path_str(layout)?);
        copy(&src, &docker_ref(dest), RegistrySide::Dest, opts).await
    }

    /// Pushes a generated image under its own tag.
    pub async fn push_image(
        image: &TestImage,
        dest: &str,
        opts: &CopyOptions,
    ) -> Result<CopyOutput> {
        Self::push(image.dir(), image.tag(), dest, opts).await
    }

    /// Pulls `docker://SRC` (`127.0.0.1:PORT/name:tag` or `127.0.0.1:PORT/name@sha256:...`)
    /// into an OCI layout at `out_dir`, which skopeo creates if needed.
    pub async fn pull(src: &str, out_dir: &Path, opts: &CopyOptions) -> Result<CopyOutput> {
        let dest = format!("oci:{}", path_str(out_dir)?);
        copy(&docker_ref(src), &dest, RegistrySide::Src, opts).await
    }

    /// Copies between two registries (`docker://` is added when no transport is given). The
    /// options apply to both sides.
    pub async fn copy_between(src: &str, dest: &str, opts: &CopyOptions) -> Result<CopyOutput> {
        copy_with_sides(
            &docker_ref(src),
            &docker_ref(dest),
            &[RegistrySide::Src, RegistrySide::Dest],
            opts,
        )
        .await
    }
}

/// Adds `docker://` unless the reference already names a transport.
fn docker_ref(reference: &str) -> String {
    if reference.starts_with("docker://") {
        reference.to_owned()
    } else {
        format!("docker://{reference}")
    }
}

fn path_str(path: &Path) -> Result<&str> {
    let s = path
        .to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))?;
    // The oci: transport splits "oci:PATH:REF" at the colon.
    if s.contains(':') {
        bail!("skopeo's oci: transport cannot take a path with ':' ({s})");
    }
    Ok(s)
}

async fn copy(src: &str, dest: &str, side: RegistrySide, opts: &CopyOptions) -> Result<CopyOutput> {
    copy_with_sides(src, dest, &[side], opts).await
}

async fn copy_with_sides(
    src: &str,
    dest: &str,
    sides: &[RegistrySide],
    opts: &CopyOptions,
) -> Result<CopyOutput> {
    require(&[SKOPEO_BIN])?;
    let sandbox = Sandbox::new()?;

    let mut command = Command::new(SKOPEO_BIN);
    command
        .arg("--policy")
        .arg(&sandbox.policy)
        .arg("--registries.d")
        .arg(&sandbox.registries_d)
        .arg("--tmpdir")
        .arg(&sandbox.tmp);
    if opts.debug {
        command.arg("--debug");
    }
    command
        .arg("copy")
        .arg(format!("--retry-times={}", opts.retry_times))
        .arg("--digestfile")
        .arg(&sandbox.digest_file);
    for side in sides {
        let prefix = match side {
            RegistrySide::Src => "--src",
            RegistrySide::Dest => "--dest",
        };
        command.arg(format!("{prefix}-tls-verify={}", opts.tls_verify));
        match &opts.creds {
            Some(creds) => command.arg(format!("{prefix}-creds={creds}")),
            None => command
                .arg(format!("{prefix}-authfile"))
                .arg(&sandbox.auth_file),
        };
        if let (true, Some(dir)) = (opts.tls_verify, &opts.cert_dir) {
            command.arg(format!("{prefix}-cert-dir")).arg(dir);
        }
    }
    if let Some(format) = opts.format {
        command.arg("--format").arg(format.as_arg());
    }
    command.args(&opts.extra_args).arg(src).arg(dest);

    command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&sandbox.stdout)?)
        .stderr(std::fs::File::create(&sandbox.stderr)?)
        .kill_on_drop(true)
        .env("HOME", &sandbox.home)
        .env("XDG_RUNTIME_DIR", &sandbox.home)
        .env("XDG_CONFIG_HOME", sandbox.home.join(".config"))
        .env("XDG_DATA_HOME", sandbox.home.join(".local/share"))
        .env("TMPDIR", &sandbox.tmp)
        // Both point at files in the sandbox: an empty registries.conf (no mirrors, no
        // short-name aliases, no blocked registries) and an empty auth file.
        .env("CONTAINERS_REGISTRIES_CONF", &sandbox.registries_conf)
        .env("REGISTRY_AUTH_FILE", &sandbox.auth_file)
        .env_remove("DOCKER_CONFIG")
        .env_remove("CONTAINERS_CONF");

    let started = Instant::now();
    let what = format!("skopeo copy {src} {dest}");
    tracing::debug!(%src, %dest, "running skopeo copy");
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning {what}; install with `{}`", crate::INSTALL_HINT))?;
    let status = match tokio::time::timeout(opts.timeout, child.wait()).await {
        Ok(status) => status.with_context(|| format!("waiting for {what}"))?,
        Err(_elapsed) => {
            let _ = child.kill().await;
            return Err(anyhow!(
                "{what} timed out after {:?}; stderr tail:\n{}",
                opts.timeout,
                file_tail(&sandbox.stderr, 4096)
            ));
        }
    };
    let elapsed = started.elapsed();
    if !status.success() {
        bail!(
            "{what} failed ({status}) after {elapsed:.1?}; stderr tail:\n{}",
            file_tail(&sandbox.stderr, 4096)
        );
    }
    let digest = std::fs::read_to_string(&sandbox.digest_file)
        .ok()
        .map(|digest| digest.trim().to_owned())
        .filter(|digest| !digest.is_empty());
    Ok(CopyOutput {
        stdout: std::fs::read_to_string(&sandbox.stdout).unwrap_or_default(),
        stderr: std::fs::read_to_string(&sandbox.stderr).unwrap_or_default(),
        digest,
        elapsed,
    })
}

/// The per-call files that keep skopeo away from host configuration.
struct Sandbox {
    _dir: tempfile::TempDir,
    policy: PathBuf,
    registries_conf: PathBuf,
    registries_d: PathBuf,
    auth_file: PathBuf,
    tmp: PathBuf,
    home: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    digest_file: PathBuf,
}

impl Sandbox {
    fn new() -> Result<Sandbox> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-skopeo-")
            .tempdir()
            .context("creating skopeo temp dir")?;
        let root = dir.path();
        let sandbox = Sandbox {
            policy: root.join("policy.json"),
            registries_conf: root.join("registries.conf"),
            registries_d: root.join("registries.d"),
            auth_file: root.join("auth.json"),
            tmp: root.join("tmp"),
            home: root.join("home"),
            stdout: root.join("stdout"),
            stderr: root.join("stderr"),
            digest_file: root.join("digest"),
            _dir: dir,
        };
        std::fs::write(
            &sandbox.policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )?;
        std::fs::write(&sandbox.registries_conf, "")?;
        std::fs::write(&sandbox.auth_file, r#"{"auths":{}}"#)?;
        std::fs::create_dir(&sandbox.registries_d)?;
        std::fs::create_dir(&sandbox.tmp)?;
        std::fs::create_dir(&sandbox.home)?;
        Ok(sandbox)
    }
}
