//! Test harness for Shoal: real registries, generated images, skopeo, and a fault-injecting proxy.
//!
//! Everything here runs real components (Debian's `docker-registry`, i.e. CNCF Distribution
//! 2.8, and `skopeo`) on loopback ports chosen at run time, with state in temp dirs that are
//! removed on drop. Processes are killed on drop. Nothing touches the process environment.
//!
//! A typical end-to-end test:
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use shoal_tests::{ImageSpec, Proxy, Registry, Skopeo, CopyOptions, TestImage, verify_layout};
//! let registry = Registry::start().await?;
//! let image = TestImage::generate(&ImageSpec::new(vec![1 << 20, 2 << 20], 7), "v1")?;
//! let dest = format!("{}/demo/app:v1", registry.host_port());
//! Skopeo::push(image.dir(), image.tag(), &dest, &CopyOptions::default()).await?;
//! let proxy = Proxy::start(&registry.url()).await?;
//! let out = tempfile::tempdir()?;
//! let src = format!("{}/demo/app:v1", proxy.host_port());
//! Skopeo::pull(&src, &out.path().join("oci"), &CopyOptions::default()).await?;
//! verify_layout(&out.path().join("oci"), &image)?;
//! # Ok(()) }
//! ```

pub mod agent;
pub mod bad_peer;
pub mod cluster;
pub mod coordinator;
pub mod garage;
pub mod http;
pub mod image;
pub mod net;
pub mod proxy;
pub mod registry;
pub mod runtimes;
pub mod skopeo;
pub mod tls;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

pub use agent::{AgentOptions, AgentProcess, TestAgent, UPSTREAM_HOST, metric_value};
pub use image::{BlobInfo, ImageSpec, TestImage, verify_layout};
pub use net::{free_port, free_port_on, http_get, poll_until, wait_until};
pub use proxy::{Fault, Proxy, RequestLog};
pub use registry::{AccessLogEntry, Registry, RegistryBuilder};
pub use skopeo::{CopyOptions, CopyOutput, ManifestFormat, Skopeo};

/// The command that installs every external tool the harness runs.
pub const INSTALL_HINT: &str = "apt-get install -y docker-registry skopeo";

/// The registry binary shipped by Debian's `docker-registry` package.
pub const REGISTRY_BIN: &str = "docker-registry";
/// The skopeo binary.
pub const SKOPEO_BIN: &str = "skopeo";

/// Sends `tracing` output of the code under test to the test's captured output (once per
/// process; later calls do nothing). `RUST_LOG` filters it, `info` by default.
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Checks that `docker-registry` and `skopeo` are installed, so a test fails with the fix
/// in its message rather than with a bare "No such file or directory".
pub fn require_tools() -> Result<()> {
    require(&[REGISTRY_BIN, SKOPEO_BIN])
}

/// Checks that each named program is on `PATH`, naming the missing ones and the install command.
pub(crate) fn require(programs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|program| find_in_path(program).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "required test tool(s) not found on PATH: {}; install them with `{INSTALL_HINT}` \
             (or run scripts/install-test-deps as root)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Finds an executable file named `program` in `PATH`, like `command -v`.
fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Returns the last `max` bytes of a text file, for error messages about failed processes.
pub(crate) fn file_tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            let tail = String::from_utf8_lossy(&bytes[start..]).into_owned();
            if tail.trim().is_empty() {
                "<empty>".to_owned()
            } else {
                tail
            }
        }
        Err(err) => format!("<cannot read {}: {err}>", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_error_names_the_install_command() {
        let err = require(&["shoal-no-such-tool"]).unwrap_err().to_string();
        assert!(err.contains("shoal-no-such-tool"), "{err}");
        assert!(
            err.contains("apt-get install -y docker-registry skopeo"),
            "{err}"
        );
    }
}
