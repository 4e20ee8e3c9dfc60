//! The real upstream: Debian's `docker-registry` (CNCF Distribution 2.8) on a free loopback
//! port with a temp storage dir and htpasswd (bcrypt) auth, plus just enough of the push API
//! to put content in it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::Url;
use shoal_proto::{Digest, RepoName};
use tempfile::TempDir;
use tokio::process::{Child, Command};

const INSTALL_HINT: &str = "apt-get install -y docker-registry";
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Registry {
    // Field order matters: the process is killed (on drop) before its directory goes.
    child: Child,
    url: String,
    user: String,
    password: String,
    http: reqwest::Client,
    dir: TempDir,
}

fn find_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("docker-registry"))
            .find(|c| c.is_file())
    });
    on_path
        .or_else(|| {
            let p = Path::new("/usr/bin/docker-registry");
            p.is_file().then(|| p.to_path_buf())
        })
        .unwrap_or_else(|| panic!("docker-registry is not installed: {INSTALL_HINT}"))
}

fn htpasswd_line(user: &str, password: &str) -> String {
    let out = std::process::Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .output()
        .unwrap_or_else(|e| panic!("cannot run htpasswd ({e}): apt-get install -y apache2-utils"));
    assert!(out.status.success(), "htpasswd failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned() + "\n"
}

impl Registry {
    pub async fn start(user: &str, password: &str) -> Registry {
        let binary = find_binary();
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, htpasswd_line(user, password)).unwrap();
        // The registry takes an address, not a listener: take a free port and release it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "version: 0.1\n\
             log: {{level: info}}\n\
             storage:\n  filesystem: {{rootdirectory: {data}}}\n  delete: {{enabled: true}}\n\
             http: {{addr: \"127.0.0.1:{port}\", secret: \"shoal-upstream-test\"}}\n\
             auth:\n  htpasswd: {{realm: shoal-test, path: {htpasswd}}}\n",
            data = dir.path().join("data").display(),
            htpasswd = htpasswd.display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config_path)
            // It panics at start when this points at a bundle it dislikes (TESTBED.md).
            .env_remove("AWS_CA_BUNDLE")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start docker-registry ({e}): {INSTALL_HINT}"));
        let mut reg = Registry {
            child,
            url: format!("http://127.0.0.1:{port}"),
            user: user.to_owned(),
            password: password.to_owned(),
            http: reqwest::Client::builder()
                .tls_backend_preconfigured(crate::upstream::tls::client_config(None).unwrap())
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            dir,
        };
        reg.wait_ready().await;
        reg
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("docker-registry exited with {status}: {}", self.log());
            }
            let probe = self
                .http
                .get(format!("{}/v2/", self.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if let Ok(resp) = probe
                && (resp.status() == 200 || resp.status() == 401)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "docker-registry not ready after {START_TIMEOUT:?}: {}",
                self.log()
            );
            // Polling a process we cannot get a readiness signal from.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        rb.basic_auth(&self.user, Some(&self.password))
    }

    /// Monolithic upload: `POST .../blobs/uploads/`, then `PUT <location>&digest=`.
    pub async fn push_blob(&self, name: &RepoName, data: &[u8]) -> Digest {
        let digest = Digest::sha256_of(data);
        let start = format!("{}/v2/{name}/blobs/uploads/", self.url);
        let resp = self.authed(self.http.post(&start)).send().await.unwrap();
        assert_eq!(resp.status(), 202, "start upload: {}", self.log());
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let mut put = Url::parse(&start).unwrap().join(&location).unwrap();
        put.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let resp = self
            .authed(self.http.put(put))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "finish upload: {}", self.log());
        digest
    }

    pub async fn push_manifest(&self, name: &RepoName, tag: &str, media_type: &str, body: &[u8]) {
        let url = format!("{}/v2/{name}/manifests/{tag}", self.url);
        let resp = self
            .authed(self.http.put(url))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, 201, "push manifest: {text}");
    }
}
