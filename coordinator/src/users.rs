//! Edits htpasswd files: add or replace a user (bcrypt), remove one, list them.
//!
//! Edits keep every other line byte for byte (comments, blank lines, CRLF endings, other users'
//! hashes of any format), refuse to touch a file the coordinator would reject (so the error
//! points at the bad line instead of the edit hiding it), and replace the file atomically:
//! a reader such as a reloading coordinator sees the old file or the new one. A new file is
//! created with mode 0600; an existing file keeps its mode and owner.
//!
//! Two editors running at the same time on the same file can lose one of the edits; this is
//! a tool for an operator, not for concurrent automation.

use std::io;
use std::path::{Path, PathBuf};

use crate::fsutil::{Existing, write_atomic};
use crate::htpasswd::{self, HashError, Htpasswd, LoadError, MAX_USER_BYTES, PasswordHash, Scheme};

/// bcrypt cost of new entries (`htpasswd -B` uses 5, which is too cheap today).
pub const DEFAULT_COST: u32 = 10;
/// Mode of a newly created file.
pub const NEW_FILE_MODE: u32 = 0o600;

/// Why an edit failed.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("invalid user name: {0}")]
    InvalidUser(&'static str),
    #[error("empty password")]
    EmptyPassword,
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error("user {user:?} is not in {}", path.display())]
    UnknownUser { user: String, path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// What `add_user` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddOutcome {
    Added,
    /// The user existed; its hash was replaced (and its `:comment`, if any, kept).
    Replaced,
}

/// A user as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    pub user: String,
    pub scheme: Scheme,
    pub line: usize,
}

/// Checks a name for a new entry. Stricter than what loading accepts: no surrounding
/// whitespace (loading would trim it away) and no leading `#` (it would become a comment).
pub fn validate_user_name(user: &str) -> Result<(), UsersError> {
    let problem = if user.is_empty() {
        "empty"
    } else if user.len() > MAX_USER_BYTES {
        "longer than 255 bytes"
    } else if user.contains(':') {
        "contains ':'"
    } else if user.chars().any(char::is_control) {
        "contains a control character"
    } else if user.trim() != user {
        "starts or ends with whitespace"
    } else if user.starts_with('#') {
        "starts with '#'"
    } else {
        return Ok(());
    };
    Err(UsersError::InvalidUser(problem))
}

/// Adds `user` with a bcrypt hash of `password` at `cost`, or replaces its hash if the user
/// exists. Creates the file (mode 0600) if it does not exist.
pub fn add_user(
    path: &Path,
    user: &str,
    password: &[u8],
    cost: u32,
) -> Result<AddOutcome, UsersError> {
    validate_user_name(user)?;
    if password.is_empty() {
        return Err(UsersError::EmptyPassword);
    }
    let path = resolve(path);
    let contents = read_or_empty(&path)?;
    let file = parse(&path, &contents)?;
    let hash = PasswordHash::bcrypt(password, cost)?;

    let existing_line = file
        .entries()
        .iter()
        .find(|e| e.user == user)
        .map(|e| e.line);
    let mut out = Vec::with_capacity(contents.len() + 80);
    let outcome = match existing_line {
        Some(line) => {
            for (number, raw) in lines_with_endings(&contents) {
                if number == line {
                    out.extend_from_slice(&replacement_line(raw, user, &hash));
                } else {
                    out.extend_from_slice(raw);
                }
            }
            AddOutcome::Replaced
        }
        None => {
            out.extend_from_slice(&contents);
            let ending: &[u8] = if uses_crlf(&contents) { b"\r\n" } else { b"\n" };
            if !out.is_empty() && !out.ends_with(b"\n") {
                out.extend_from_slice(ending);
            }
            out.extend_from_slice(user.as_bytes());
            out.push(b':');
            out.extend_from_slice(hash.as_field().as_bytes());
            out.extend_from_slice(ending);
            AddOutcome::Added
        }
    };
    write(&path, &out)?;
    Ok(outcome)
}

/// Removes `user`'s line. Fails if the user is not in the file.
pub fn remove_user(path: &Path, user: &str) -> Result<(), UsersError> {
    let path = resolve(path);
    let contents = htpasswd::read_limited(&path)?;
    let file = parse(&path, &contents)?;
    let line = file
        .entries()
        .iter()
        .find(|e| e.user == user)
        .map(|e| e.line)
        .ok_or_else(|| UsersError::UnknownUser {
            user: user.to_owned(),
            path: path.clone(),
        })?;
    let mut out = Vec::with_capacity(contents.len());
    for (number, raw) in lines_with_endings(&contents) {
        if number != line {
            out.extend_from_slice(raw);
        } else if number == 1 && raw.starts_with(BOM) {
            out.extend_from_slice(BOM);
        }
    }
    write(&path, &out)
}

/// Users in file order.
pub fn list_users(path: &Path) -> Result<Vec<UserInfo>, UsersError> {
    let file = Htpasswd::load(path)?;
    Ok(file
        .entries()
        .iter()
        .map(|e| UserInfo {
            user: e.user.clone(),
            scheme: e.hash.scheme(),
            line: e.line,
        })
        .collect())
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Edits go to the file a symlink points at, not over the symlink.
fn resolve(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

fn read_or_empty(path: &Path) -> Result<Vec<u8>, UsersError> {
    match htpasswd::read_limited(path) {
        Ok(contents) => Ok(contents),
        Err(LoadError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Ok(Vec::new())
        }
        Err(e) => Err(e.into()),
    }
}

fn parse(path: &Path, contents: &[u8]) -> Result<Htpasswd, UsersError> {
    Htpasswd::parse(contents).map_err(|source| {
        UsersError::Load(LoadError::Parse {
            path: path.to_owned(),
            source,
        })
    })
}

fn write(path: &Path, contents: &[u8]) -> Result<(), UsersError> {
    write_atomic(path, contents, NEW_FILE_MODE, Existing::ReplaceKeepingMode).map_err(|source| {
        UsersError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

/// Lines with their endings, numbered from 1 like `htpasswd::raw_lines`.
fn lines_with_endings(contents: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    contents
        .split_inclusive(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line))
}

fn uses_crlf(contents: &[u8]) -> bool {
    contents
        .iter()
        .position(|&b| b == b'\n')
        .is_some_and(|i| i > 0 && contents[i - 1] == b'\r')
}

/// `user:newhash[:comment]` with the original line's ending (and BOM, on line 1).
fn replacement_line(raw: &[u8], user: &str, hash: &PasswordHash) -> Vec<u8> {
    let (body, ending): (&[u8], &[u8]) = if let Some(b) = raw.strip_suffix(b"\r\n") {
        (b, b"\r\n")
    } else if let Some(b) = raw.strip_suffix(b"\n") {
        (b, b"\n")
    } else {
        (raw, b"")
    };
    let mut out = Vec::new();
    if raw.starts_with(BOM) {
        out.extend_from_slice(BOM);
    }
    out.extend_from_slice(user.as_bytes());
    out.push(b':');
    out.extend_from_slice(hash.as_field().as_bytes());
    // The line parsed, so it is UTF-8 and has `user:hash`; a third field is a comment.
    let comment = std::str::from_utf8(body)
        .ok()
        .and_then(|text| text.trim().splitn(3, ':').nth(2));
    if let Some(comment) = comment {
        out.push(b':');
        out.extend_from_slice(comment.as_bytes());
    }
    out.extend_from_slice(ending);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    const BOB: &str = "bob:$apr1$Fc2HO0CK$ux2HN8kgJXvPNTdLyIh1c.";

    #[test]
    fn edits_keep_other_lines_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let original =
            format!("# team\r\n{BOB}\r\n\r\ncarol:{{SHA}}z0jT3TdveclVlHs5WCpg5cPeIe8=:ops\r\n");
        fs::write(&path, &original).unwrap();

        assert_eq!(
            add_user(&path, "dave", b"pw", 4).unwrap(),
            AddOutcome::Added
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&original), "{text}");
        assert!(text.ends_with("\r\n"), "CRLF file gets a CRLF line");

        assert_eq!(
            add_user(&path, "carol", b"new", 4).unwrap(),
            AddOutcome::Replaced
        );
        let file = Htpasswd::load(&path).unwrap();
        let carol = file.get("carol").unwrap();
        assert!(carol.verify(b"new"));
        assert_eq!(carol.scheme(), Scheme::Bcrypt { cost: 4 });
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(":ops\r\n"), "comment kept: {text}");
        assert!(text.contains(&format!("{BOB}\r\n")));

        remove_user(&path, "carol").unwrap();
        remove_user(&path, "dave").unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("# team\r\n{BOB}\r\n\r\n")
        );
        assert!(matches!(
            remove_user(&path, "dave"),
            Err(UsersError::UnknownUser { .. })
        ));
    }

    #[test]
    fn new_file_is_private_and_missing_final_newline_is_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new");
        add_user(&path, "a", b"pw", 4).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        fs::write(&path, BOB).unwrap();
        add_user(&path, "a", b"pw", 4).unwrap();
        let users = list_users(&path).unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users[1].user, "a");
        assert_eq!(users[1].line, 2);
    }

    #[test]
    fn refuses_bad_input_and_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for bad in ["", "a:b", " a", "#a", "a\tb"] {
            assert!(
                matches!(
                    add_user(&path, bad, b"pw", 4),
                    Err(UsersError::InvalidUser(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            add_user(&path, "a", b"", 4),
            Err(UsersError::EmptyPassword)
        ));
        assert!(matches!(
            add_user(&path, "a", &[b'x'; 72], 4),
            Err(UsersError::Hash(HashError::PasswordTooLong))
        ));
        assert!(!path.exists());

        fs::write(&path, "ok:{SHA}z0jT3TdveclVlHs5WCpg5cPeIe8=\nbroken\n").unwrap();
        let err = add_user(&path, "a", b"pw", 4).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
