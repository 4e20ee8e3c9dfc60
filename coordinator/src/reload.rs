//! Reloading the files that change while the coordinator runs: the TLS certificate and key,
//! the htpasswd file, the access rules (from the config file; its other settings need a
//! restart), and the access log (reopened for logrotate). On SIGHUP everything is reloaded;
//! between signals the files are polled for changes (size, mtime, inode), which is cheap and
//! catches `cert init --force`, `user add` or an edited rule without a signal.
//!
//! A file that fails to load leaves the previous one in force (that logic lives in
//! [`ReloadingCertResolver::reload`] and [`Authenticator::reload`]); its new signature is
//! remembered anyway, so a broken file is reported once, not at every poll.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::auth::Authenticator;
use crate::config::{Config, ConfigSource};
use crate::gateway::accesslog::AccessLog;
use crate::metrics::Metrics;
use crate::tls::ReloadingCertResolver;

/// What identifies a version of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Signature {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn signature(path: &Path) -> Option<Signature> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Signature {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode: meta.ino(),
    })
}

/// Everything that can be reloaded, with the file signatures last seen.
pub struct Reloader {
    resolver: Arc<ReloadingCertResolver>,
    cert_files: [PathBuf; 2],
    auth: Option<(Arc<Authenticator>, PathBuf)>,
    /// The config file the access rules are read from again.
    config: Option<ConfigSource>,
    access_log: AccessLog,
    metrics: Metrics,
    cert_sig: [Option<Signature>; 2],
    auth_sig: Option<Signature>,
    config_sig: Option<Signature>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("cert_files", &self.cert_files)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    pub fn new(
        resolver: Arc<ReloadingCertResolver>,
        cert: PathBuf,
        key: PathBuf,
        auth: Option<(Arc<Authenticator>, PathBuf)>,
        config: Option<ConfigSource>,
        access_log: AccessLog,
        metrics: Metrics,
    ) -> Reloader {
        let cert_sig = [signature(&cert), signature(&key)];
        let auth_sig = auth.as_ref().and_then(|(_, p)| signature(p));
        let config_sig = config.as_ref().and_then(|c| signature(&c.path));
        Reloader {
            resolver,
            cert_files: [cert, key],
            auth,
            config,
            access_log,
            metrics,
            cert_sig,
            auth_sig,
            config_sig,
        }
    }

    /// SIGHUP: reload everything, changed or not.
    pub fn reload_all(&mut self) {
        tracing::info!(
            "reloading the certificate, the htpasswd file, the access rules and the access log"
        );
        self.reload_cert();
        self.reload_auth();
        self.reload_rules();
        self.access_log.reopen();
    }

    /// Reloads whatever changed since it was last loaded.
    pub fn poll(&mut self) {
        let cert_sig = [
            signature(&self.cert_files[0]),
            signature(&self.cert_files[1]),
        ];
        if cert_sig != self.cert_sig {
            self.reload_cert();
        }
        if let Some((_, path)) = &self.auth
            && signature(path) != self.auth_sig
        {
            self.reload_auth();
        }
        if let Some(c) = &self.config
            && signature(&c.path) != self.config_sig
        {
            self.reload_rules();
        }
    }

    /// Reads the config file again and puts its access rules in force. A file that does not
    /// load (or that turns authentication off, which needs a restart) leaves the rules as
    /// they were.
    fn reload_rules(&mut self) {
        let (Some((auth, _)), Some(source)) = (&self.auth, &self.config) else {
            return;
        };
        self.config_sig = signature(&source.path);
        let ok = match Config::load(&source.path, &source.overrides) {
            Ok(Config {
                auth: Some(settings),
                ..
            }) => {
                let count = settings.rules.count();
                auth.set_rules(settings.rules);
                tracing::info!(path = %source.path.display(), rules = count, "access rules reloaded");
                true
            }
            Ok(_) => {
                tracing::warn!(path = %source.path.display(), "the config file turns authentication off, which needs a restart; access rules unchanged");
                false
            }
            Err(error) => {
                tracing::warn!(path = %source.path.display(), %error, "config file does not load; access rules unchanged");
                false
            }
        };
        self.metrics.reload("access_rules", ok);
    }

    fn reload_cert(&mut self) {
        self.cert_sig = [
            signature(&self.cert_files[0]),
            signature(&self.cert_files[1]),
        ];
        let ok = self.resolver.reload().is_ok();
        self.metrics.reload("certificate", ok);
    }

    fn reload_auth(&mut self) {
        if let Some((auth, path)) = &self.auth {
            self.auth_sig = signature(path);
            let ok = auth.reload(path).is_ok();
            self.metrics.reload("htpasswd", ok);
        }
    }
}
