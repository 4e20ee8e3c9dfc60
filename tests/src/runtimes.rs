//! Real container runtimes as clients of the agent: containerd (driven with `ctr`), podman and
//! dockerd, each with every piece of its state in a temp dir of its own.
//!
//! Nothing here reads or writes the host's runtime state:
//! - containerd gets a config whose root, state, temp dir, both sockets and `opt` plugin dir are
//!   under its temp dir, with the CRI plugin off.
//! - podman runs with its own storage (vfs), run and tmp dirs, network config dir, file locks
//!   (not `/dev/shm/libpod_lock`), `containers.conf`, `registries.conf`, `storage.conf`,
//!   signature policy and auth file, and the CNI network backend (netavark would create
//!   `/run/containers/networks` whatever the config says).
//! - dockerd gets its own data root, exec root, socket, pid file and config file (which moves
//!   the trust key out of `/etc/docker`), the vfs storage driver, and leaves the host's firewall
//!   and sysctls alone (`--bridge=none --iptables=false --ip-forward=false --ip-masq=false`).
//!   It bind-mounts its data root onto itself and undoes that when it exits cleanly; the
//!   harness unmounts it after a kill. It also always creates `/run/docker/plugins`, which the
//!   harness removes again when it was not there before.
//!
//! One piece of shared state remains, as with skopeo: podman 4.3 run as root keeps its blob-info
//! cache in `/var/lib/containers/cache` (no setting moves it). It only remembers where blobs
//! were seen; every store here is new, so it cannot make a pull skip the mirror.
//!
//! Every environment variable is set on the child process only. Daemons are stopped on drop
//! (SIGTERM, then SIGKILL; dockerd together with the containerd it starts) and their temp dirs
//! removed; [`processes_mentioning`] and [`mounts_under`] let a test check that nothing is left.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::net::{POLL_INTERVAL, poll_until};

/// The command that installs the three runtimes.
pub const RUNTIMES_INSTALL_HINT: &str = "apt-get install -y containerd podman docker.io";

pub const CONTAINERD_BIN: &str = "containerd";
pub const CTR_BIN: &str = "ctr";
pub const PODMAN_BIN: &str = "podman";
pub const DOCKERD_BIN: &str = "dockerd";
pub const DOCKER_BIN: &str = "docker";

/// Limit for one pull (or any other client command): generous for a few MiB on 2 busy cores.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a daemon may take to answer after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon may take to exit after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// The same when the handle is dropped (a test failed or forgot to stop it): shorter, because
/// drop blocks a thread.
const DROP_GRACE: Duration = Duration::from_secs(10);
/// Unix socket paths longer than this do not fit in `sockaddr_un` (108 bytes with the NUL;
/// containerd adds `.ttrpc` to its socket name).
const MAX_SOCKET_PATH: usize = 100;

/// Checks that each runtime program is on `PATH`, naming the missing ones and the install
/// command, so a test fails with the fix rather than with "No such file or directory".
pub fn require_runtimes(programs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|program| crate::find_in_path(program).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "container runtime(s) not found on PATH: {}; install them with \
             `{RUNTIMES_INSTALL_HINT}` (or run scripts/install-test-deps as root)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// What a client command printed, and how long it ran.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `command` to completion within `timeout`, failing with its output when it exits
/// non-zero or takes too long (it is killed then).
async fn run(mut command: Command, what: &str, timeout: Duration) -> Result<CommandOutput> {
    // Anonymous files rather than pipes: a command that hangs can still be reported with
    // everything it printed, and a chatty one can never block on a full pipe.
    let stdout = tempfile::tempfile().context("creating a stdout file")?;
    let stderr = tempfile::tempfile().context("creating a stderr file")?;
    command
        .stdin(Stdio::null())
        .stdout(stdout.try_clone()?)
        .stderr(stderr.try_clone()?)
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning {what}; install with `{RUNTIMES_INSTALL_HINT}`"))?;
    let status = tokio::time::timeout(timeout, child.wait()).await;
    let elapsed = started.elapsed();
    let output = CommandOutput {
        stdout: read_all(stdout),
        stderr: read_all(stderr),
        elapsed,
    };
    match status {
        Ok(status) => {
            let status = status.with_context(|| format!("waiting for {what}"))?;
            if !status.success() {
                bail!(
                    "{what} failed ({status}) after {elapsed:.1?}\nstdout:\n{}\nstderr:\n{}",
                    tail(&output.stdout),
                    tail(&output.stderr)
                );
            }
            Ok(output)
        }
        Err(_elapsed) => {
            let _ = child.kill().await;
            bail!(
                "{what} timed out after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                tail(&output.stdout),
                tail(&output.stderr)
            )
        }
    }
}

fn read_all(mut file: File) -> String {
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(0)).is_ok() {
        let _ = file.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The last few KiB of a command's output, for error messages.
fn tail(text: &str) -> &str {
    const MAX: usize = 6 * 1024;
    let mut start = text.len().saturating_sub(MAX);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))
}

/// A TOML basic string (JSON string escapes are valid TOML escapes).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a str always serializes")
}

fn runtime_tempdir(prefix: &str) -> Result<TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .with_context(|| format!("creating a {prefix}* temp dir"))?;
    // Daemons take the temp dir path in their sockets' names.
    ensure!(
        dir.path().as_os_str().len() + 40 <= MAX_SOCKET_PATH,
        "temp dir {} is too long for the unix sockets inside it; set TMPDIR to a short path",
        dir.path().display()
    );
    Ok(dir)
}

/// Processes whose command line mentions `path`, as `(pid, command line)`: what is left of a
/// runtime that was given `path` as its state dir. Reads `/proc`, like `pgrep -af PATH`.
pub fn processes_mentioning(path: &Path) -> Vec<(u32, String)> {
    let needle = path.as_os_str().as_encoded_bytes();
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        // Processes come and go while we read: a vanished one is simply not there.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push((pid, text.trim_end().to_owned()));
        }
    }
    found
}

/// Sends `signal` (`TERM`, `KILL`) to `pid` with the `kill` program, from sync code.
fn signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether process `pid` still exists and is not a zombie.
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A long-running runtime process started by the harness, logging to a file.
struct Daemon {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, mut command: Command, log: PathBuf) -> Result<Daemon> {
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {name}; install with `{RUNTIMES_INSTALL_HINT}`"))?;
        Ok(Daemon {
            name,
            child: Some(child),
            log,
        })
    }

    fn log_tail(&self) -> String {
        crate::file_tail(&self.log, 6 * 1024)
    }

    /// Polls `probe` until it succeeds, failing at once (with the log) if the process exits.
    async fn wait_ready<F, Fut>(&mut self, what: &str, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().context("daemon is not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!(
                    "{} exited with {status} before it was ready; log tail:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            // A probe that hangs is cut off at the deadline too.
            if let Ok(true) = tokio::time::timeout_at(deadline, probe()).await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "timed out after {READY_TIMEOUT:?} waiting until {what}; {} log tail:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// SIGTERM, then SIGKILL if the process has not exited after [`STOP_GRACE`].
    async fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            signal(pid, "TERM");
        }
        match tokio::time::timeout(STOP_GRACE, child.wait()).await {
            Ok(status) => {
                status.with_context(|| format!("waiting for {} to exit", self.name))?;
                Ok(())
            }
            Err(_) => {
                child.kill().await.ok();
                bail!(
                    "{} did not exit within {STOP_GRACE:?} of SIGTERM (killed); log tail:\n{}",
                    self.name,
                    self.log_tail()
                )
            }
        }
    }

    /// For drop: SIGTERM, a bounded wait, then SIGKILL. A daemon gets the chance to undo its
    /// mounts, and the temp dirs, removed right after, are not written to any more.
    fn stop_now(&mut self) {
        let Some(child) = &mut self.child else {
            return;
        };
        if let Some(pid) = child.id() {
            signal(pid, "TERM");
        }
        let deadline = Instant::now() + DROP_GRACE;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.start_kill();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.child = None;
    }
}

/// Mount points at or under `dir`, from `/proc/self/mountinfo`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        // The fifth field is the mount point.
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|point| point.starts_with(dir))
        .collect()
}

/// Unmounts everything at or under `dir`, deepest first: what a killed daemon leaves behind
/// (dockerd bind-mounts its data root onto itself; containerd mounts snapshots to unpack).
fn unmount_under(dir: &Path) {
    let mut points = mounts_under(dir);
    points.sort_by_key(|point| std::cmp::Reverse(point.as_os_str().len()));
    for point in points {
        let unmounted = |lazy: bool| {
            let mut command = std::process::Command::new("umount");
            if lazy {
                command.arg("-l");
            }
            command
                .arg(&point)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        };
        if !unmounted(false) && !unmounted(true) {
            tracing::warn!(point = %point.display(), "cannot unmount what a test runtime left");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------------

/// A `containerd` daemon of its own: root, state, temp and `opt` dirs and both sockets in a temp
/// dir; the CRI plugin (CNI, sandbox images) and the snapshotters that need special
/// filesystems are disabled. Driven with `ctr --address SOCK`.
pub struct Containerd {
    daemon: Daemon,
    socket: PathBuf,
    dir: TempDir,
}

impl Containerd {
    /// Starts containerd and waits until `ctr version` gets an answer from it.
    pub async fn start() -> Result<Containerd> {
        require_runtimes(&[CONTAINERD_BIN, CTR_BIN])?;
        let dir = runtime_tempdir("shoal-containerd-")?;
        let base = dir.path();
        let socket = base.join("containerd.sock");
        for sub in ["root", "state", "tmp", "opt"] {
            std::fs::create_dir(base.join(sub))?;
        }
        let path = |sub: &str| -> Result<String> { Ok(toml_str(utf8(&base.join(sub))?)) };
        let config = format!(
            "version = 2\n\
             root = {root}\nstate = {state}\ntemp = {tmp}\nplugin_dir = \"\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \
             \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
             \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\"]\n\
             [grpc]\n  address = {grpc}\n\
             [ttrpc]\n  address = {ttrpc}\n\
             [debug]\n  address = \"\"\n  level = \"info\"\n\
             [metrics]\n  address = \"\"\n\
             [plugins]\n  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = {opt}\n",
            root = path("root")?,
            state = path("state")?,
            tmp = path("tmp")?,
            opt = path("opt")?,
            grpc = toml_str(utf8(&socket)?),
            ttrpc = toml_str(&format!("{}.ttrpc", utf8(&socket)?)),
        );
        let config_path = base.join("config.toml");
        std::fs::write(&config_path, config)?;

        let mut command = Command::new(CONTAINERD_BIN);
        command.arg("--config").arg(&config_path);
        let daemon = Daemon::spawn("containerd", command, base.join("containerd.log"))?;
        let mut containerd = Containerd {
            daemon,
            socket,
            dir,
        };
        let socket = containerd.socket.clone();
        containerd
            .daemon
            .wait_ready("containerd answers `ctr version`", || {
                let mut probe = ctr_command(&socket);
                probe.arg("version");
                async move {
                    run(probe, "ctr version", Duration::from_secs(5))
                        .await
                        .is_ok()
                }
            })
            .await?;
        Ok(containerd)
    }

    /// The temp dir holding everything of this containerd (its command line names it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// containerd's own log.
    pub fn log_text(&self) -> String {
        self.daemon.log_tail()
    }

    /// Runs `ctr --address SOCK ARGS...`.
    pub async fn ctr(&self, args: &[&str], timeout: Duration) -> Result<CommandOutput> {
        let mut command = ctr_command(&self.socket);
        command.args(args);
        run(command, &format!("ctr {}", args.join(" ")), timeout).await
    }

    /// `ctr images pull --hosts-dir DIR REFERENCE` (which also unpacks the layers, checking
    /// each against the config's `diff_ids`).
    pub async fn pull(&self, reference: &str, hosts: &HostsDir) -> Result<CommandOutput> {
        let hosts_dir = utf8(hosts.path())?;
        self.ctr(
            &["images", "pull", "--hosts-dir", hosts_dir, reference],
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// The manifest digest `reference` points at in containerd's image store.
    pub async fn image_digest(&self, reference: &str) -> Result<String> {
        let out = self.ctr(&["images", "ls"], Duration::from_secs(30)).await?;
        // Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS.
        out.stdout
            .lines()
            .filter_map(|line| {
                let mut columns = line.split_whitespace();
                let name = columns.next()?;
                let digest = columns.nth(1)?;
                (name == reference).then(|| digest.to_owned())
            })
            .next()
            .ok_or_else(|| anyhow!("no image {reference} in `ctr images ls`:\n{}", out.stdout))
    }

    /// Digests of every blob in containerd's content store.
    pub async fn content_digests(&self) -> Result<Vec<String>> {
        let out = self
            .ctr(&["content", "ls", "--quiet"], Duration::from_secs(30))
            .await?;
        Ok(out.stdout.split_whitespace().map(str::to_owned).collect())
    }

    /// SIGTERM and wait for containerd to exit.
    pub async fn stop(mut self) -> Result<()> {
        self.daemon.terminate().await
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.daemon.stop_now();
        unmount_under(self.dir.path());
    }
}

fn ctr_command(socket: &Path) -> Command {
    let mut command = Command::new(CTR_BIN);
    command
        .arg("--address")
        .arg(socket)
        // ctr reads these; a stray one in the host environment would change the test.
        .env_remove("CONTAINERD_ADDRESS")
        .env_remove("CONTAINERD_NAMESPACE")
        .env_remove("CONTAINERD_SNAPSHOTTER");
    command
}

/// A containerd hosts directory (`ctr --hosts-dir`, or `config_path` of the CRI plugin): one
/// `HOST/hosts.toml` per registry host name.
pub struct HostsDir {
    dir: TempDir,
}

impl HostsDir {
    pub fn new() -> Result<HostsDir> {
        Ok(HostsDir {
            dir: tempfile::Builder::new()
                .prefix("shoal-hosts-")
                .tempdir()
                .context("creating a hosts dir")?,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Sends pulls of images named `registry/...` to `mirror_url` (`http://ip:port`, with the
    /// `pull` and `resolve` capabilities) first, and to `server` only when the mirror fails.
    pub fn add_mirror(&self, registry: &str, server: &str, mirror_url: &str) -> Result<PathBuf> {
        let dir = self.dir.path().join(registry);
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("hosts.toml");
        std::fs::write(
            &file,
            format!(
                "server = {}\n\n[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n",
                toml_str(server),
                toml_str(mirror_url)
            ),
        )?;
        Ok(file)
    }
}

// ---------------------------------------------------------------------------------------------
// podman
// ---------------------------------------------------------------------------------------------

/// A podman "installation" in a temp dir: every `podman` call of one value gets the same
/// storage (vfs, so no mounts), run dir, tmp dir, network config dir, file locks, config files,
/// policy, auth file and `HOME`, so two `Podman` values are two independent hosts.
pub struct Podman {
    dir: TempDir,
}

impl Podman {
    /// A podman whose `registries.conf` sends pulls of images under `prefix` (whose own
    /// registry is `location`) to the plain-HTTP mirror at `mirror` (`ip:port`) first.
    pub fn with_mirror(prefix: &str, location: &str, mirror: &str) -> Result<Podman> {
        require_runtimes(&[PODMAN_BIN])?;
        let dir = runtime_tempdir("shoal-podman-")?;
        let base = dir.path();
        for sub in ["root", "runroot", "tmp", "home", "networks", "volumes"] {
            std::fs::create_dir(base.join(sub))?;
        }
        let path = |sub: &str| -> Result<String> { Ok(toml_str(utf8(&base.join(sub))?)) };
        std::fs::write(
            base.join("registries.conf"),
            format!(
                "unqualified-search-registries = []\n\n\
                 [[registry]]\nprefix = {}\nlocation = {}\n\n\
                 [[registry.mirror]]\nlocation = {}\ninsecure = true\n",
                toml_str(prefix),
                toml_str(location),
                toml_str(mirror)
            ),
        )?;
        std::fs::write(
            base.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = {}\nrunroot = {}\n",
                path("root")?,
                path("runroot")?
            ),
        )?;
        std::fs::write(
            base.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = {events}\nlock_type = \"file\"\ntmp_dir = {tmp}\nimage_copy_tmp_dir = {tmp}\n\
                 volume_path = {volumes}\n\
                 [network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = {networks}\n",
                events = toml_str(utf8(&base.join("events.log"))?),
                tmp = path("tmp")?,
                volumes = path("volumes")?,
                networks = path("networks")?,
            ),
        )?;
        std::fs::write(
            base.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )?;
        std::fs::write(base.join("auth.json"), r#"{"auths":{}}"#)?;
        Ok(Podman { dir })
    }

    /// The temp dir holding everything of this podman.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self) -> Command {
        let base = self.dir.path();
        let mut command = Command::new(PODMAN_BIN);
        command
            .arg("--root")
            .arg(base.join("root"))
            .arg("--runroot")
            .arg(base.join("runroot"))
            .arg("--storage-driver")
            .arg("vfs")
            .arg("--tmpdir")
            .arg(base.join("tmp"))
            .arg("--cgroup-manager")
            .arg("cgroupfs")
            .arg("--events-backend")
            .arg("file")
            .arg("--network-config-dir")
            .arg(base.join("networks"))
            .arg("--volumepath")
            .arg(base.join("volumes"))
            .env("CONTAINERS_CONF", base.join("containers.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", base.join("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", base.join("storage.conf"))
            .env("REGISTRY_AUTH_FILE", base.join("auth.json"))
            .env("HOME", base.join("home"))
            .env("XDG_RUNTIME_DIR", base.join("tmp"))
            .env("XDG_CONFIG_HOME", base.join("home/.config"))
            .env("XDG_DATA_HOME", base.join("home/.local/share"))
            .env("TMPDIR", base.join("tmp"))
            .env_remove("CONTAINER_HOST")
            .env_remove("CONTAINER_CONNECTION")
            .env_remove("DOCKER_CONFIG");
        command
    }

    /// Runs `podman GLOBAL-FLAGS ARGS...`.
    pub async fn podman(&self, args: &[&str], timeout: Duration) -> Result<CommandOutput> {
        let mut command = self.command();
        command.args(args);
        run(command, &format!("podman {}", args.join(" ")), timeout).await
    }

    /// `podman pull REFERENCE`.
    pub async fn pull(&self, reference: &str) -> Result<CommandOutput> {
        let base = self.dir.path();
        let policy = base.join("policy.json");
        let auth = base.join("auth.json");
        self.podman(
            &[
                "pull",
                "--signature-policy",
                utf8(&policy)?,
                "--authfile",
                utf8(&auth)?,
                reference,
            ],
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// `podman image inspect REFERENCE`, the one image's JSON object.
    pub async fn inspect(&self, reference: &str) -> Result<Value> {
        let out = self
            .podman(&["image", "inspect", reference], Duration::from_secs(30))
            .await?;
        first_of_json_array(&out.stdout)
    }
}

fn first_of_json_array(text: &str) -> Result<Value> {
    let value: Value =
        serde_json::from_str(text).with_context(|| format!("parsing inspect output:\n{text}"))?;
    value
        .as_array()
        .and_then(|items| items.first())
        .cloned()
        .ok_or_else(|| anyhow!("inspect printed no object:\n{text}"))
}

// ---------------------------------------------------------------------------------------------
// dockerd
// ---------------------------------------------------------------------------------------------

/// A `dockerd` of its own with one registry mirror: data root, exec root (where it keeps the
/// containerd it starts), socket, pid file, trust key and `daemon.json` in a temp dir, the vfs
/// storage driver (no overlay mounts), and no bridge, iptables, IP forwarding or masquerading.
/// Driven with `docker --config DIR -H unix://SOCK`.
pub struct Dockerd {
    daemon: Daemon,
    socket: PathBuf,
    dir: TempDir,
    /// Whether starting this dockerd created [`RUN_DOCKER`].
    made_run_docker: bool,
}

/// The directory dockerd 20.10 creates for plugin sockets whatever its `--exec-root`.
const RUN_DOCKER: &str = "/run/docker";

impl Dockerd {
    /// Starts dockerd with `--registry-mirror registry_mirror` and waits until `GET /_ping`
    /// on its socket answers 200.
    pub async fn start(registry_mirror: &str) -> Result<Dockerd> {
        require_runtimes(&[DOCKERD_BIN, DOCKER_BIN])?;
        let dir = runtime_tempdir("shoal-dockerd-")?;
        let base = dir.path();
        // Short names: containerd's sockets live under the exec root.
        for sub in ["data", "x", "cli"] {
            std::fs::create_dir(base.join(sub))?;
        }
        // The trust key (daemon ID) would go to /etc/docker/key.json; this key, which has no
        // command line flag, moves it.
        let config = base.join("daemon.json");
        std::fs::write(
            &config,
            serde_json::json!({ "deprecated-key-path": utf8(&base.join("key.json"))? }).to_string(),
        )?;
        // dockerd 20.10 always makes /run/docker/plugins (its plugin exec root is fixed, to
        // keep socket paths short); remove it afterwards if it was not there before.
        let made_run_docker = !Path::new(RUN_DOCKER).exists();
        std::fs::write(base.join("cli/config.json"), "{}")?;
        let socket = base.join("docker.sock");
        let mut command = Command::new(DOCKERD_BIN);
        command
            .arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(base.join("data"))
            .arg("--exec-root")
            .arg(base.join("x"))
            .arg("--pidfile")
            .arg(base.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", utf8(&socket)?))
            .arg("--storage-driver")
            .arg("vfs")
            .arg("--bridge=none")
            .arg("--iptables=false")
            .arg("--ip6tables=false")
            .arg("--ip-forward=false")
            .arg("--ip-masq=false")
            .arg("--userland-proxy=false")
            .arg("--registry-mirror")
            .arg(registry_mirror)
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONFIG")
            .env_remove("DOCKER_TMPDIR");
        let daemon = Daemon::spawn("dockerd", command, base.join("dockerd.log"))?;
        let mut dockerd = Dockerd {
            daemon,
            socket,
            dir,
            made_run_docker,
        };
        let socket = dockerd.socket.clone();
        dockerd
            .daemon
            .wait_ready("dockerd answers GET /_ping", || {
                let socket = socket.clone();
                async move { ping(&socket).await.unwrap_or(false) }
            })
            .await?;
        Ok(dockerd)
    }

    /// The temp dir holding everything of this dockerd (its command line names it, and so
    /// does that of the containerd it starts).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// dockerd's own log.
    pub fn log_text(&self) -> String {
        self.daemon.log_tail()
    }

    /// Runs `docker --config DIR -H unix://SOCK ARGS...`.
    pub async fn docker(&self, args: &[&str], timeout: Duration) -> Result<CommandOutput> {
        let mut command = Command::new(DOCKER_BIN);
        command
            .arg("--config")
            .arg(self.dir.path().join("cli"))
            .arg("-H")
            .arg(format!("unix://{}", utf8(&self.socket)?))
            .args(args)
            .env("HOME", self.dir.path().join("cli"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_CONFIG");
        run(command, &format!("docker {}", args.join(" ")), timeout).await
    }

    /// `docker pull REFERENCE`.
    pub async fn pull(&self, reference: &str) -> Result<CommandOutput> {
        self.docker(&["pull", reference], COMMAND_TIMEOUT).await
    }

    /// `docker image inspect REFERENCE`, the one image's JSON object.
    pub async fn inspect(&self, reference: &str) -> Result<Value> {
        let out = self
            .docker(&["image", "inspect", reference], Duration::from_secs(30))
            .await?;
        first_of_json_array(&out.stdout)
    }

    /// SIGTERM, wait for dockerd to exit (it stops its containerd first), then check that no
    /// process naming this dockerd's temp dir is left.
    pub async fn stop(mut self) -> Result<()> {
        let stopped = self.daemon.terminate().await;
        let containerd = self.containerd_pid();
        // dockerd waits for its containerd on a clean shutdown; give a killed one a moment.
        let gone = poll_until(
            Duration::from_secs(10),
            "processes of the stopped dockerd have exited",
            || {
                let left = processes_mentioning(self.dir.path());
                let alive = containerd.is_some_and(is_alive);
                async move { (left.is_empty() && !alive).then_some(()) }
            },
        )
        .await;
        // A dockerd that exits cleanly undoes the bind mount of its data root itself.
        let mounts = mounts_under(self.dir.path());
        unmount_under(self.dir.path());
        self.remove_run_docker();
        stopped?;
        ensure!(
            mounts.is_empty(),
            "the stopped dockerd left mounts behind: {mounts:?}"
        );
        gone.with_context(|| format!("left running: {:?}", processes_mentioning(self.dir.path())))
    }

    /// Removes `/run/docker/plugins` and `/run/docker` if this dockerd created them and they
    /// are empty (`rmdir` refuses anything else, e.g. a host dockerd's sockets).
    fn remove_run_docker(&self) {
        if self.made_run_docker {
            let _ = std::fs::remove_dir(Path::new(RUN_DOCKER).join("plugins"));
            let _ = std::fs::remove_dir(RUN_DOCKER);
        }
    }

    /// The pid of the containerd this dockerd started, if it is running.
    fn containerd_pid(&self) -> Option<u32> {
        let file = self.dir.path().join("x/containerd/containerd.pid");
        let pid: u32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
        // A recycled pid would name some other program: only ours mentions our temp dir.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let needle = self.dir.path().as_os_str().as_encoded_bytes();
        cmdline
            .windows(needle.len())
            .any(|w| w == needle)
            .then_some(pid)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // Find the child containerd first: its pid file goes away with the temp dir. It was
        // started with a parent-death signal, but kill it by pid anyway rather than rely on it.
        let containerd = self.containerd_pid();
        self.daemon.stop_now();
        if let Some(pid) = containerd {
            signal(pid, "KILL");
            let deadline = Instant::now() + Duration::from_secs(5);
            while is_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        unmount_under(self.dir.path());
        self.remove_run_docker();
    }
}

/// `GET /_ping` over dockerd's unix socket: `Ok(true)` once it answers 200.
async fn ping(socket: &Path) -> Result<bool> {
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        stream
            .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| anyhow!("GET /_ping timed out"))??;
    let status_line = response.split(|&b| b == b'\n').next().unwrap_or_default();
    Ok(String::from_utf8_lossy(status_line).contains(" 200 "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_runtime_error_names_the_install_command() {
        let err = require_runtimes(&["shoal-no-such-runtime"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("shoal-no-such-runtime"), "{err}");
        assert!(
            err.contains("apt-get install -y containerd podman docker.io"),
            "{err}"
        );
    }

    #[test]
    fn hosts_toml_names_the_mirror_and_the_fallback_server() {
        let hosts = HostsDir::new().unwrap();
        let file = hosts
            .add_mirror(
                "registry.example:5000",
                "https://registry.example:5000",
                "http://127.0.0.1:4000",
            )
            .unwrap();
        assert_eq!(
            file,
            hosts
                .path()
                .join("registry.example:5000")
                .join("hosts.toml")
        );
        let parsed: toml::Value = toml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        assert_eq!(
            parsed["server"].as_str(),
            Some("https://registry.example:5000")
        );
        let caps = &parsed["host"]["http://127.0.0.1:4000"]["capabilities"];
        assert_eq!(caps.as_array().map(Vec::len), Some(2), "{parsed}");
    }

    #[test]
    fn finds_processes_and_mounts_by_path() {
        let dir = tempfile::tempdir().unwrap();
        assert!(processes_mentioning(dir.path()).is_empty());
        assert!(mounts_under(dir.path()).is_empty());
        assert!(!mounts_under(Path::new("/")).is_empty());
    }

    #[test]
    fn tail_cuts_on_a_char_boundary() {
        let text = format!("é{}", "x".repeat(6 * 1024 - 1));
        assert_eq!(tail(&text).len(), 6 * 1024 - 1);
        assert_eq!(tail("short"), "short");
    }
}
