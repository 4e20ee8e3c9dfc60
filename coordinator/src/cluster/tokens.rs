//! Bootstrap tokens: a file with one token per line (blank lines and `#` comments ignored),
//! read at each enrollment so edits apply at once. Compared in constant time: both sides are
//! hashed with SHA-256 first (equal lengths) and every configured token is compared, with no
//! early exit. Tokens never appear in logs or errors.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use shoal_proto::enroll::BootstrapToken;
use subtle::ConstantTimeEq;

/// Largest token file read.
const MAX_TOKENS_BYTES: u64 = 1 << 20;

/// Why the token file could not be read (the contents are never quoted).
#[derive(Debug, thiserror::Error)]
#[error("bootstrap token file {}: {reason}", path.display())]
pub struct TokenFileError {
    pub path: PathBuf,
    pub reason: String,
}

/// The hashes of the tokens in `path`.
fn load(path: &Path) -> Result<Vec<[u8; 32]>, TokenFileError> {
    let err = |reason: String| TokenFileError {
        path: path.to_owned(),
        reason,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKENS_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| err(e.to_string()))?;
    if text.len() as u64 > MAX_TOKENS_BYTES {
        return Err(err(format!("larger than {MAX_TOKENS_BYTES} bytes")));
    }
    let mut hashes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if BootstrapToken::new(line).is_err() {
            return Err(err(format!(
                "line {}: not a valid token (16 to 512 printable characters)",
                i + 1
            )));
        }
        hashes.push(Sha256::digest(line.as_bytes()).into());
    }
    Ok(hashes)
}

/// Whether `token` is one of the tokens in `path`.
pub fn check(path: &Path, token: &BootstrapToken) -> Result<bool, TokenFileError> {
    let known = load(path)?;
    let given: [u8; 32] = Sha256::digest(token.expose().as_bytes()).into();
    let mut found = subtle::Choice::from(0);
    for k in &known {
        found |= k.ct_eq(&given);
    }
    Ok(bool::from(found))
}

/// A new random token (32 bytes, hex).
pub fn generate() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> BootstrapToken {
        BootstrapToken::new(s).unwrap()
    }

    #[test]
    fn tokens_match_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(
            &f,
            "# bootstrap tokens\n\n  aaaaaaaaaaaaaaaa-one  \nbbbbbbbbbbbbbbbb-two\n",
        )
        .unwrap();
        assert!(check(&f, &token("aaaaaaaaaaaaaaaa-one")).unwrap());
        assert!(check(&f, &token("bbbbbbbbbbbbbbbb-two")).unwrap());
        for wrong in [
            "aaaaaaaaaaaaaaaa-on",
            "aaaaaaaaaaaaaaaa-one-",
            "AAAAAAAAAAAAAAAA-ONE",
            "#-bootstrap-tokens",
        ] {
            assert!(!check(&f, &token(wrong)).unwrap(), "{wrong}");
        }
        // Edits apply at once.
        std::fs::write(&f, "cccccccccccccccc-new\n").unwrap();
        assert!(!check(&f, &token("aaaaaaaaaaaaaaaa-one")).unwrap());
        assert!(check(&f, &token("cccccccccccccccc-new")).unwrap());
        // An empty file accepts nothing.
        std::fs::write(&f, "").unwrap();
        assert!(!check(&f, &token("cccccccccccccccc-new")).unwrap());
    }

    #[test]
    fn bad_files_are_errors_that_quote_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, "ok-token-ok-token\nshort-secret\n").unwrap();
        let err = check(&f, &token("ok-token-ok-token"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(
            !err.contains("short-secret") && !err.contains("ok-token"),
            "{err}"
        );
        assert!(check(&dir.path().join("missing"), &token("ok-token-ok-token")).is_err());
        assert_eq!(generate().len(), 64);
        assert_ne!(generate(), generate());
    }
}
