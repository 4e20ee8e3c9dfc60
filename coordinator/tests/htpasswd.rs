//! htpasswd files: vectors from the real apache2-utils tool, and hostile input.

mod common;

use common::{ALICE, BOB, CAROL, make_line};
use shoal_coordinator::htpasswd::{HashError, Htpasswd, LineError, ParseError, Scheme};

fn parse_err(text: &[u8]) -> ParseError {
    Htpasswd::parse(text).expect_err("file must be rejected")
}

#[test]
fn testbed_vectors() {
    let file = Htpasswd::parse(format!("{ALICE}\n{BOB}\n{CAROL}\n").as_bytes()).unwrap();
    assert_eq!(file.len(), 3);
    let check = |user: &str, right: &str, scheme: Scheme| {
        let hash = file.get(user).unwrap();
        assert_eq!(hash.scheme(), scheme);
        assert!(hash.verify(right.as_bytes()), "{user}");
        assert!(!hash.verify(b"wrong"), "{user}");
        assert!(!hash.verify(format!("{right} ").as_bytes()), "{user}");
    };
    check("alice", "s3cret", Scheme::Bcrypt { cost: 5 });
    check("bob", "md5pass", Scheme::Apr1Md5);
    check("carol", "shapass", Scheme::Sha1);
    assert!(file.get("dave").is_none());
}

#[test]
fn fresh_vectors_from_the_real_tool() {
    let long71 = "p".repeat(71);
    let long200 = "q".repeat(200);
    let passwords = [
        "",
        "a",
        "exactly16bytes!!",
        "seventeen bytes!!",
        "with:colon and spaces",
        "pässwörd ünïcode",
        long71.as_str(),
        long200.as_str(),
    ];
    for flags in [&["-B", "-C", "4"][..], &["-m"][..], &["-s"][..]] {
        for password in passwords {
            if flags[0] == "-B" && password.len() > 72 {
                continue; // covered by bcrypt_truncates_like_apache
            }
            let line = make_line(flags, "user", password);
            let file = Htpasswd::parse(line.as_bytes())
                .unwrap_or_else(|e| panic!("{flags:?} {password:?}: {e}"));
            let hash = file.get("user").unwrap();
            assert!(hash.verify(password.as_bytes()), "{flags:?} {password:?}");
            let wrong = format!("{password}x");
            assert!(!hash.verify(wrong.as_bytes()), "{flags:?} {password:?}");
            if !password.is_empty() {
                assert!(!hash.verify(&password.as_bytes()[1..]), "{flags:?}");
            }
        }
    }
}

#[test]
fn bcrypt_truncates_like_apache() {
    // htpasswd -B hashes only the first 72 bytes; verification must agree with Apache.
    let password = "x".repeat(80);
    let line = make_line(&["-B", "-C", "4"], "u", &password);
    let file = Htpasswd::parse(line.as_bytes()).unwrap();
    let hash = file.get("u").unwrap();
    assert!(hash.verify(password.as_bytes()));
    assert!(hash.verify(&password.as_bytes()[..72]));
    assert!(!hash.verify(&password.as_bytes()[..71]));
}

#[test]
fn formats_the_tool_writes_but_we_reject() {
    for (flag, what) in [
        ("-d", "crypt(3) DES"),
        ("-p", "plaintext"),
        ("-2", "SHA-256-crypt"),
        ("-5", "SHA-512-crypt"),
    ] {
        let line = make_line(&[flag], "eve", "topsecretpw");
        let text = format!("# header\n{ALICE}\n{line}\n");
        let err = parse_err(text.as_bytes());
        assert_eq!(err.line, 3, "{flag}");
        let shown = err.to_string();
        assert!(shown.contains(what), "{flag}: {shown}");
        assert!(shown.starts_with("line 3: user \"eve\""), "{shown}");
        // The hash field (for -p, the password itself) is never echoed.
        let field = line.split_once(':').unwrap().1;
        assert!(!shown.contains(field), "{flag}: {shown}");
        assert!(!shown.contains("topsecretpw"), "{flag}: {shown}");
    }
}

#[test]
fn hostile_lines_get_line_numbers() {
    let cases: Vec<(Vec<u8>, usize, LineError)> = vec![
        (b"# c\n\nnocolon\n".to_vec(), 3, LineError::NoColon),
        (
            b":{SHA}z0jT3TdveclVlHs5WCpg5cPeIe8=\n".to_vec(),
            1,
            LineError::EmptyUser,
        ),
        (
            format!("{BOB}\nx:\n").into_bytes(),
            2,
            LineError::Hash {
                user: "x".into(),
                source: HashError::Empty,
            },
        ),
        (
            format!("{ALICE}\nbad:$2y$05$garbage\n").into_bytes(),
            2,
            LineError::Hash {
                user: "bad".into(),
                source: HashError::MalformedBcrypt("expected 60 characters"),
            },
        ),
        (
            // Right length, invalid characters in the salt.
            b"bad:$2y$05$!!!!!!!!!!!!!!!!!!!!!!KcfQ5pCngbf1oWhHMgb0Lixxxxxxxxxx\n"[..64].to_vec(),
            1,
            LineError::Hash {
                user: "bad".into(),
                source: HashError::MalformedBcrypt("bad cost, salt or hash encoding"),
            },
        ),
        (
            b"c:$2y$31$f4z0o4pQsCscEHjhu7mqoulxC48ysE2KcfQ5pCngbf1oWhHMgb0Li\n".to_vec(),
            1,
            LineError::Hash {
                user: "c".into(),
                source: HashError::BcryptCost(31),
            },
        ),
        (
            b"m:$apr1$toolongsalt$ux2HN8kgJXvPNTdLyIh1c.\n".to_vec(),
            1,
            LineError::Hash {
                user: "m".into(),
                source: HashError::MalformedApr1("salt must be 1 to 8 characters"),
            },
        ),
        (
            b"m:$apr1$Fc2HO0CK$short\n".to_vec(),
            1,
            LineError::Hash {
                user: "m".into(),
                source: HashError::MalformedApr1("hash must be 22 characters of ./0-9A-Za-z"),
            },
        ),
        (
            b"s:{SHA}notbase64!\n".to_vec(),
            1,
            LineError::Hash {
                user: "s".into(),
                source: HashError::MalformedSha1,
            },
        ),
        (
            b"s:{SHA}AAAA\n".to_vec(),
            1,
            LineError::Hash {
                user: "s".into(),
                source: HashError::MalformedSha1,
            },
        ),
        (format!("{BOB}\nu\0ser:x\n").into_bytes(), 2, LineError::Nul),
        (b"\xff\xfe:{SHA}x\n".to_vec(), 1, LineError::NotUtf8),
        (
            format!("{}:x\n", "u".repeat(300)).into_bytes(),
            1,
            LineError::UserTooLong,
        ),
        (
            format!("ok:{}\n", "A".repeat(5000)).into_bytes(),
            1,
            LineError::TooLong,
        ),
        (b"u\x07:x\n".to_vec(), 1, LineError::UserControlChar),
        (
            format!("{BOB}\n# comment\n{BOB}\n").into_bytes(),
            3,
            LineError::DuplicateUser {
                user: "bob".into(),
                first_line: 1,
            },
        ),
    ];
    for (text, line, kind) in cases {
        let err = parse_err(&text);
        assert_eq!(
            err,
            ParseError { line, kind },
            "{:?}",
            String::from_utf8_lossy(&text)
        );
        assert!(err.to_string().starts_with(&format!("line {line}: ")));
    }
}

#[test]
fn windows_line_endings_bom_comments_and_nginx_comment_field() {
    let text = format!(
        "\u{feff}# made on Windows\r\n\r\n  {ALICE}  \r\n{BOB}:bob's comment\r\n\t# indented comment\r\n{CAROL}"
    );
    let file = Htpasswd::parse(text.as_bytes()).unwrap();
    assert_eq!(file.len(), 3);
    assert!(file.get("alice").unwrap().verify(b"s3cret"));
    assert!(file.get("bob").unwrap().verify(b"md5pass"));
    assert!(file.get("carol").unwrap().verify(b"shapass"));
    let lines: Vec<usize> = file.entries().iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![3, 4, 6]);
}

#[test]
fn empty_and_comment_only_files_have_no_users() {
    assert!(Htpasswd::parse(b"").unwrap().is_empty());
    assert!(Htpasswd::parse(b"# nobody yet\n\n").unwrap().is_empty());
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("htpasswd");
    let err = Htpasswd::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("htpasswd") && err.contains("cannot read"),
        "{err}"
    );
    std::fs::write(&path, "a:b:c\n").unwrap();
    let err = Htpasswd::load(&path).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("line 1"), "{err}");
    assert!(!err.contains(":b"), "{err}");
}
