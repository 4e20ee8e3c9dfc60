//! The `shoal-coordinator` binary: `user add|remove|list` checked by the real `htpasswd -vb`,
//! and `cert init`.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{BOB, htpasswd_accepts};

/// Runs the binary with `args`, feeding `stdin`.
fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal-coordinator"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    // The child may exit before reading everything (usage errors); that is fine.
    let _ = child.stdin.take().expect("piped").write_all(stdin);
    child.wait_with_output().expect("binary finishes")
}

fn ok(args: &[&str], stdin: &[u8]) -> String {
    let out = run(args, stdin);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn user_add_list_remove_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("htpasswd");
    let f = path_str(&file);

    let add = |user: &str, pw: &str| {
        ok(
            &[
                "user",
                "add",
                "--file",
                f,
                "--cost",
                "5",
                "--password-stdin",
                user,
            ],
            format!("{pw}\n").as_bytes(),
        )
    };
    assert!(add("alice", "s3cret pw").contains("added user alice"));
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Existing lines of other formats are kept as they are.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str(&format!("# legacy\n{BOB}\n"));
    std::fs::write(&file, &text).unwrap();
    add("dave", "pw:with:colons");

    // The real tool accepts what we wrote.
    assert!(htpasswd_accepts(&file, "alice", "s3cret pw"));
    assert!(htpasswd_accepts(&file, "dave", "pw:with:colons"));
    assert!(htpasswd_accepts(&file, "bob", "md5pass"));
    assert!(!htpasswd_accepts(&file, "alice", "wrong"));

    let list = ok(&["user", "list", "--file", f], b"");
    assert_eq!(
        list.lines()
            .map(|l| l.split('\t').take(2).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>(),
        vec![
            "alice bcrypt (cost 5)",
            "bob apr1-md5",
            "dave bcrypt (cost 5)"
        ]
    );

    // Replacing a password.
    assert!(add("alice", "n3w").contains("replaced"));
    assert!(htpasswd_accepts(&file, "alice", "n3w"));
    assert!(!htpasswd_accepts(&file, "alice", "s3cret pw"));

    assert!(ok(&["user", "remove", "--file", f, "alice"], b"").contains("removed user alice"));
    assert!(!htpasswd_accepts(&file, "alice", "n3w"));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(&format!("# legacy\n{BOB}\n")), "{text}");

    let out = run(&["user", "remove", "--file", f, "alice"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in"));
}

#[test]
fn user_add_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("htpasswd");
    let f = path_str(&file);

    // No terminal and no --password-stdin: refuse rather than read an echoed password.
    let out = run(&["user", "add", "--file", f, "alice"], b"pw\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--password-stdin"));

    let out = run(
        &["user", "add", "--file", f, "--password-stdin", "alice"],
        b"\n",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty password"));

    let out = run(
        &["user", "add", "--file", f, "--password-stdin", "a:b"],
        b"pw\n",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("':'"));

    let out = run(
        &[
            "user",
            "add",
            "--file",
            f,
            "--password-stdin",
            "--cost",
            "31",
            "alice",
        ],
        b"pw\n",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cost 31"));
    assert!(!file.exists());

    // Usage errors are clap's exit code 2.
    assert_eq!(run(&["user", "add"], b"").status.code(), Some(2));

    let out = run(&["user", "list", "--file", f], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn cert_init_prints_client_instructions() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("tls");
    let o = path_str(&out_dir);
    let args = [
        "cert",
        "init",
        "--host",
        "docker.example.com",
        "--ip",
        "192.0.2.10",
        "--out",
        o,
        "--port",
        "5443",
    ];
    let text = ok(&args, b"");
    for needle in [
        "/etc/docker/certs.d/docker.example.com:5443/ca.crt",
        "/etc/docker/certs.d/192.0.2.10:5443/ca.crt",
        "/etc/containerd/certs.d/docker.example.com:5443/hosts.toml",
        "ca = \"/etc/containerd/certs.d/docker.example.com:5443/ca.crt\"",
        "/etc/containers/certs.d/docker.example.com:5443/ca.crt",
        "--src-cert-dir",
        "/usr/local/share/ca-certificates/shoal-ca.crt",
        "update-ca-certificates",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    for f in ["ca.crt", "ca.key", "server.crt", "server.key"] {
        assert!(out_dir.join(f).is_file(), "{f}");
    }

    // Second run: refused, nothing touched.
    let before = std::fs::read(out_dir.join("ca.key")).unwrap();
    let out = run(&args, b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(out_dir.join("ca.key")).unwrap(), before);

    // Default port: the directory is the bare host name.
    let text = ok(
        &[
            "cert",
            "init",
            "--host",
            "docker.example.com",
            "--out",
            o,
            "--force",
        ],
        b"",
    );
    assert!(
        text.contains("/etc/docker/certs.d/docker.example.com/ca.crt"),
        "{text}"
    );
    assert_ne!(std::fs::read(out_dir.join("ca.key")).unwrap(), before);

    let out = run(&["cert", "init", "--out", o, "--force"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no --host or --ip"));
}
