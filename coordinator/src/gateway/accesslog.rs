//! The access log: one line per request in a stable format modelled on nginx's `main`, plus
//! the upstream replica and the request time:
//!
//! ```text
//! 10.1.2.3 - alice [29/Nov/2025:10:01:51 +0000] "GET /v2/team/app/manifests/v1 HTTP/1.1" 200 1234 "-" "skopeo/1.9.3" "http://10.0.0.11:5000" 0.004
//! ```
//!
//! Fields: client address, `-`, user (`-` when none), time (UTC), request line, status, body
//! bytes sent, referer, user agent, upstream replica (`-` when the coordinator answered
//! itself), seconds from the request head to the end of the response body. Quoted fields
//! escape `"`, `\` and bytes outside printable ASCII as `\xHH`, like nginx, so a client cannot
//! forge a line. Lines are written by a dedicated thread so a slow disk never blocks a request;
//! if it falls far behind, lines are dropped and counted rather than queued without bound.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;

use crate::config::AccessLogTarget;

/// Lines queued before new ones are dropped.
const QUEUE: usize = 16 * 1024;
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// One request, as logged.
#[derive(Debug, Clone)]
pub struct Entry {
    pub remote: IpAddr,
    pub user: Option<String>,
    pub time: SystemTime,
    pub method: String,
    /// Path and query as requested.
    pub uri: String,
    pub version: &'static str,
    pub status: u16,
    pub bytes: u64,
    pub referer: Option<String>,
    pub user_agent: Option<String>,
    pub upstream: Option<String>,
    pub request_time: Duration,
}

fn escape_into(out: &mut String, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'"' | b'\\' => {
                let _ = write!(out, "\\x{b:02X}");
            }
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\x{b:02X}");
            }
        }
    }
}

fn field(out: &mut String, v: Option<&str>) {
    match v {
        Some(s) if !s.is_empty() => escape_into(out, s),
        _ => out.push('-'),
    }
}

/// Formats an entry as one line (without the newline).
pub fn format(e: &Entry) -> String {
    let t = OffsetDateTime::from(e.time);
    let mut out = String::with_capacity(200);
    let _ = write!(out, "{} - ", e.remote);
    field(&mut out, e.user.as_deref());
    let _ = write!(
        out,
        " [{:02}/{}/{}:{:02}:{:02}:{:02} +0000] \"",
        t.day(),
        MONTHS[usize::from(u8::from(t.month())) - 1],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    );
    escape_into(&mut out, &e.method);
    out.push(' ');
    escape_into(&mut out, &e.uri);
    let _ = write!(out, " {}\" {} {} \"", e.version, e.status, e.bytes);
    field(&mut out, e.referer.as_deref());
    out.push_str("\" \"");
    field(&mut out, e.user_agent.as_deref());
    out.push_str("\" \"");
    field(&mut out, e.upstream.as_deref());
    let _ = write!(out, "\" {:.3}", e.request_time.as_secs_f64());
    out
}

enum Msg {
    Line(String),
    Reopen,
    Flush(std::sync::mpsc::Sender<()>),
}

/// Handle to the access log writer. Cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<Msg>>,
    dropped: Arc<AtomicU64>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.tx.is_some())
            .finish_non_exhaustive()
    }
}

enum Sink {
    Stdout,
    File { path: PathBuf, w: BufWriter<File> },
}

fn open_append(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl AccessLog {
    /// Starts the writer. A file that cannot be opened is an error at start; later reopen
    /// failures keep the old file and are logged.
    pub fn start(target: &AccessLogTarget) -> io::Result<AccessLog> {
        let sink = match target {
            AccessLogTarget::Off => {
                return Ok(AccessLog {
                    tx: None,
                    dropped: Arc::default(),
                    thread: Arc::default(),
                });
            }
            AccessLogTarget::Stdout => Sink::Stdout,
            AccessLogTarget::File(path) => Sink::File {
                w: BufWriter::new(open_append(path)?),
                path: path.clone(),
            },
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, sink))?;
        Ok(AccessLog {
            tx: Some(tx),
            dropped: Arc::default(),
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    pub fn log(&self, entry: &Entry) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Msg::Line(format(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!("access log writer is behind; dropping lines");
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Reopens the file (after logrotate moved it).
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Msg::Reopen);
        }
    }

    /// Waits until every line logged so far is written, for up to `timeout`.
    pub fn flush(&self, timeout: Duration) {
        if let Some(tx) = &self.tx {
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            if tx.send(Msg::Flush(done_tx)).is_ok() {
                let _ = done_rx.recv_timeout(timeout);
            }
        }
    }

    pub fn dropped_lines(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn writer(rx: Receiver<Msg>, mut sink: Sink) {
    let write_line = |sink: &mut Sink, line: &str| -> io::Result<()> {
        match sink {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")
            }
            Sink::File { w, .. } => {
                w.write_all(line.as_bytes())?;
                w.write_all(b"\n")
            }
        }
    };
    let flush = |sink: &mut Sink| match sink {
        Sink::Stdout => io::stdout().flush(),
        Sink::File { w, .. } => w.flush(),
    };
    let mut failing = false;
    loop {
        // Flush whenever the queue runs dry, so lines appear promptly without a write per line.
        let msg = match rx.try_recv() {
            Ok(m) => m,
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                let _ = flush(&mut sink);
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        match msg {
            Msg::Line(line) => match write_line(&mut sink, &line) {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot write the access log");
                }
                Err(_) => {}
            },
            Msg::Reopen => {
                if let Sink::File { path, w } = &mut sink {
                    let _ = w.flush();
                    match open_append(path) {
                        Ok(f) => {
                            *w = BufWriter::new(f);
                            tracing::info!(path = %path.display(), "access log reopened");
                        }
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "cannot reopen the access log; keeping the old file");
                        }
                    }
                }
            }
            Msg::Flush(done) => {
                let _ = flush(&mut sink);
                let _ = done.send(());
            }
        }
    }
    let _ = flush(&mut sink);
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // The last handle joins the writer so that every line is on disk when `run` returns.
        if Arc::strong_count(&self.thread) == 1 {
            self.tx.take();
            if let Some(handle) = self
                .thread
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
            {
                let _ = handle.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            remote: "10.1.2.3".parse().unwrap(),
            user: Some("alice".into()),
            // 2025-11-29 10:01:51 UTC
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_410_511),
            method: "GET".into(),
            uri: "/v2/team/app/manifests/v1".into(),
            version: "HTTP/1.1",
            status: 200,
            bytes: 1234,
            referer: None,
            user_agent: Some("skopeo/1.9.3".into()),
            upstream: Some("http://10.0.0.11:5000".into()),
            request_time: Duration::from_micros(4321),
        }
    }

    #[test]
    fn line_format_is_stable() {
        assert_eq!(
            format(&entry()),
            r#"10.1.2.3 - alice [29/Nov/2025:10:01:51 +0000] "GET /v2/team/app/manifests/v1 HTTP/1.1" 200 1234 "-" "skopeo/1.9.3" "http://10.0.0.11:5000" 0.004"#
        );
    }

    #[test]
    fn clients_cannot_forge_fields_or_lines() {
        let mut e = entry();
        e.user = None;
        e.user_agent = Some("evil\" 200 0 \"x\nnext line\u{7f}".into());
        e.uri = "/v2/a\"b".into();
        let line = format(&e);
        assert!(!line.contains('\n'));
        assert!(
            line.contains(r#"evil\x22 200 0 \x22x\x0Anext line\x7F"#),
            "{line}"
        );
        assert!(line.contains(r#""GET /v2/a\x22b HTTP/1.1""#), "{line}");
        assert!(line.contains(" - - ["), "{line}");
    }

    #[test]
    fn file_sink_writes_flushes_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(&AccessLogTarget::File(path.clone())).unwrap();
        log.log(&entry());
        log.flush(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.log(&entry());
        log.flush(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        drop(log);
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap().lines().count(),
            1
        );
    }
}
