//! Helpers shared by the coordinator's integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The three vectors of `shared/TESTBED.md`, made by Debian's `htpasswd`.
pub const ALICE: &str = "alice:$2y$05$f4z0o4pQsCscEHjhu7mqoulxC48ysE2KcfQ5pCngbf1oWhHMgb0Li";
pub const BOB: &str = "bob:$apr1$Fc2HO0CK$ux2HN8kgJXvPNTdLyIh1c.";
pub const CAROL: &str = "carol:{SHA}z0jT3TdveclVlHs5WCpg5cPeIe8=";

/// Path of apache2-utils' `htpasswd`; fails the test with the install command if missing.
pub fn htpasswd_tool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("htpasswd"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("htpasswd (apache2-utils) is not installed: apt-get install -y apache2-utils")
    })
}

/// Runs `htpasswd` with `args`, returning its output whatever the exit status.
pub fn run_htpasswd(args: &[&str]) -> Output {
    Command::new(htpasswd_tool())
        .args(args)
        .output()
        .expect("htpasswd runs")
}

/// `htpasswd -nb<flags> user password` → the `user:hash` line it prints.
pub fn make_line(flags: &[&str], user: &str, password: &str) -> String {
    let mut args = vec!["-nb"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[user, password]);
    let out = run_htpasswd(&args);
    assert!(
        out.status.success(),
        "htpasswd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("htpasswd prints UTF-8");
    text.lines().next().expect("one line").to_owned()
}

/// `htpasswd -vb FILE user password` succeeds?
pub fn htpasswd_accepts(file: &Path, user: &str, password: &str) -> bool {
    let file = file.to_str().expect("UTF-8 temp path");
    run_htpasswd(&["-vb", file, user, password])
        .status
        .success()
}
