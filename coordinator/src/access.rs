//! Per-repository access rules: which users and groups may pull, push or delete where.
//!
//! Configuration (TOML, the `[groups]` table and `[[access]]` array of the coordinator config):
//!
//! ```toml
//! [groups]
//! devs = ["alice", "bob"]
//! ci = ["robot"]
//!
//! [[access]]                       # devs and carol read and write their team's images
//! groups = ["devs"]
//! users = ["carol"]
//! repositories = ["team/**"]
//! actions = ["pull", "push"]
//!
//! [[access]]                       # every authenticated user may pull base images
//! users = ["*"]
//! repositories = ["library/*", "base"]
//! actions = ["pull"]
//! ```
//!
//! Semantics:
//! - No `[[access]]` entry at all: rules are off and every authenticated user may do
//!   everything, like nginx `auth_basic` in the classic setup.
//! - Otherwise default deny: an action is allowed when at least one rule names the user
//!   (directly, through a group, or with `"*"` for any authenticated user), has a repository
//!   pattern matching the name, and lists the action.
//! - Patterns: `*` matches within one path component (no `/`), `**` matches anything
//!   including `/`, `?` matches one character other than `/`; everything else is literal.
//!   `team/**` matches `team/app` and `team/a/b` but not `team` itself.
//! - Actions are `pull`, `push` and `delete`, independent of each other. `docker push` also
//!   reads (it checks which blobs exist), so pushers need `pull` too.
//! - A rule naming an undefined group is a configuration error (it is almost always a typo).
//!   Users are not checked against the htpasswd file, which may change on its own.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Deserialize;
use shoal_proto::reference::RepoName;

/// Longest pattern accepted.
pub const MAX_PATTERN_BYTES: usize = 255;

/// What a request wants to do to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        })
    }
}

/// The access part of the coordinator configuration, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub access: Vec<RuleConfig>,
}

/// One `[[access]]` entry, as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub repositories: Vec<String>,
    pub actions: Vec<Action>,
}

/// Why access rules are rejected. `rule` is the 1-based index of the `[[access]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("invalid access rules: {0}")]
    Toml(String),
    #[error("group name is empty")]
    EmptyGroupName,
    #[error("access rule {rule}: names no user and no group")]
    NoSubjects { rule: usize },
    #[error("access rule {rule}: no repositories")]
    NoRepositories { rule: usize },
    #[error("access rule {rule}: no actions")]
    NoActions { rule: usize },
    #[error("access rule {rule}: group {group:?} is not defined under [groups]")]
    UnknownGroup { rule: usize, group: String },
    #[error("access rule {rule}: empty user name")]
    EmptyUser { rule: usize },
    #[error(
        "access rule {rule}: repository pattern {pattern:?} is invalid (lower-case letters, digits, '.', '_', '-', '/', and the wildcards '*', '**', '?')"
    )]
    BadPattern { rule: usize, pattern: String },
}

/// Validated access rules.
#[derive(Clone, Debug, Default)]
pub struct AccessRules {
    /// Empty means rules are off: everything is allowed.
    rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
struct Rule {
    any_user: bool,
    /// Users named directly or through groups, expanded at load.
    users: HashSet<String>,
    repositories: Vec<Pattern>,
    actions: Vec<Action>,
}

impl AccessRules {
    /// No rules: every authenticated user may do everything.
    pub fn allow_all() -> AccessRules {
        AccessRules::default()
    }

    /// Parses a TOML document holding `[groups]` and `[[access]]`.
    pub fn from_toml_str(text: &str) -> Result<AccessRules, AccessError> {
        let config: AccessConfig =
            toml::from_str(text).map_err(|e| AccessError::Toml(e.to_string()))?;
        AccessRules::from_config(&config)
    }

    pub fn from_config(config: &AccessConfig) -> Result<AccessRules, AccessError> {
        if config.groups.keys().any(|g| g.is_empty()) {
            return Err(AccessError::EmptyGroupName);
        }
        let mut rules = Vec::with_capacity(config.access.len());
        for (index, rc) in config.access.iter().enumerate() {
            let rule = index + 1;
            if rc.users.is_empty() && rc.groups.is_empty() {
                return Err(AccessError::NoSubjects { rule });
            }
            if rc.repositories.is_empty() {
                return Err(AccessError::NoRepositories { rule });
            }
            if rc.actions.is_empty() {
                return Err(AccessError::NoActions { rule });
            }
            let mut users = HashSet::new();
            let mut any_user = false;
            for user in &rc.users {
                match user.as_str() {
                    "" => return Err(AccessError::EmptyUser { rule }),
                    "*" => any_user = true,
                    _ => {
                        users.insert(user.clone());
                    }
                }
            }
            for group in &rc.groups {
                let members =
                    config
                        .groups
                        .get(group)
                        .ok_or_else(|| AccessError::UnknownGroup {
                            rule,
                            group: group.clone(),
                        })?;
                users.extend(members.iter().cloned());
            }
            let repositories = rc
                .repositories
                .iter()
                .map(|p| {
                    Pattern::parse(p).ok_or_else(|| AccessError::BadPattern {
                        rule,
                        pattern: p.chars().take(64).collect(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            rules.push(Rule {
                any_user,
                users,
                repositories,
                actions: rc.actions.clone(),
            });
        }
        Ok(AccessRules { rules })
    }

    /// How many rules there are (0 when rules are off).
    pub fn count(&self) -> usize {
        self.rules.len()
    }

    /// Whether rules are configured at all.
    pub fn is_enabled(&self) -> bool {
        !self.rules.is_empty()
    }

    /// Whether the authenticated `user` may perform `action` on `repo`.
    pub fn authorize(&self, user: &str, repo: &RepoName, action: Action) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        self.rules.iter().any(|rule| {
            (rule.any_user || rule.users.contains(user))
                && rule.actions.contains(&action)
                && rule.repositories.iter().any(|p| p.matches(repo.as_str()))
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Literal(u8),
    /// `?`
    One,
    /// `*`
    Segment,
    /// `**`
    Any,
}

/// A compiled repository glob.
#[derive(Clone, Debug)]
struct Pattern(Vec<Token>);

impl Pattern {
    fn parse(text: &str) -> Option<Pattern> {
        if text.is_empty() || text.len() > MAX_PATTERN_BYTES || text.contains("***") {
            return None;
        }
        let bytes = text.as_bytes();
        let mut tokens = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let token = match bytes[i] {
                b'*' if bytes.get(i + 1) == Some(&b'*') => {
                    i += 1;
                    Token::Any
                }
                b'*' => Token::Segment,
                b'?' => Token::One,
                b @ (b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' | b'/') => Token::Literal(b),
                _ => return None,
            };
            i += 1;
            tokens.push(token);
        }
        Some(Pattern(tokens))
    }

    /// Runs the pattern as a set-of-positions automaton: O(pattern × name), no backtracking.
    fn matches(&self, name: &str) -> bool {
        let name = name.as_bytes();
        let n = name.len();
        let mut cur = vec![false; n + 1];
        cur[0] = true;
        let mut next = vec![false; n + 1];
        for token in &self.0 {
            next.iter_mut().for_each(|x| *x = false);
            match *token {
                Token::Literal(c) => {
                    for j in 0..n {
                        next[j + 1] = cur[j] && name[j] == c;
                    }
                }
                Token::One => {
                    for j in 0..n {
                        next[j + 1] = cur[j] && name[j] != b'/';
                    }
                }
                Token::Segment => {
                    next[0] = cur[0];
                    for k in 1..=n {
                        next[k] = cur[k] || (next[k - 1] && name[k - 1] != b'/');
                    }
                }
                Token::Any => {
                    next[0] = cur[0];
                    for k in 1..=n {
                        next[k] = cur[k] || next[k - 1];
                    }
                }
            }
            std::mem::swap(&mut cur, &mut next);
            if !cur.contains(&true) {
                return false;
            }
        }
        cur[n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    fn matches(pattern: &str, name: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(name)
    }

    #[test]
    fn glob_semantics() {
        assert!(matches("team/*", "team/app"));
        assert!(!matches("team/*", "team/a/b"));
        assert!(!matches("team/*", "team"));
        assert!(matches("team/**", "team/a/b"));
        assert!(!matches("team/**", "team"));
        assert!(!matches("team/**", "teams/a"));
        assert!(matches("**", "a/b/c"));
        assert!(matches("*", "ubuntu"));
        assert!(!matches("*", "library/ubuntu"));
        assert!(matches("lib?ary/*-dev", "library/app-dev"));
        assert!(!matches("lib?ary/*", "lib/ary/x"));
        assert!(matches("**/cache", "a/b/cache"));
        assert!(matches("a/**/z", "a/b/c/z"));
        assert!(matches("exact/name", "exact/name"));
        assert!(!matches("exact/name", "exact/name2"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY/c"));
    }

    #[test]
    fn bad_patterns_are_rejected() {
        for p in ["", "Team/*", "team/***", "a b", "team/%", &"a".repeat(256)] {
            assert!(Pattern::parse(p).is_none(), "{p:?}");
        }
    }

    const EXAMPLE: &str = r#"
        [groups]
        devs = ["alice", "bob"]

        [[access]]
        groups = ["devs"]
        users = ["carol"]
        repositories = ["team/**"]
        actions = ["pull", "push"]

        [[access]]
        users = ["*"]
        repositories = ["library/*"]
        actions = ["pull"]

        [[access]]
        users = ["reader"]
        repositories = ["team/app"]
        actions = ["pull"]
    "#;

    #[test]
    fn rules_grant_by_user_group_and_wildcard() {
        let rules = AccessRules::from_toml_str(EXAMPLE).unwrap();
        assert!(rules.is_enabled());
        let app = repo("team/app");
        assert!(rules.authorize("alice", &app, Action::Push));
        assert!(rules.authorize("carol", &app, Action::Pull));
        assert!(!rules.authorize("alice", &app, Action::Delete));
        // Pull-only user: pull allowed, push denied.
        assert!(rules.authorize("reader", &app, Action::Pull));
        assert!(!rules.authorize("reader", &app, Action::Push));
        assert!(rules.authorize("nobody", &repo("library/ubuntu"), Action::Pull));
        assert!(!rules.authorize("nobody", &repo("library/ubuntu"), Action::Push));
        assert!(!rules.authorize("nobody", &app, Action::Pull));
    }

    #[test]
    fn no_rules_allow_everything() {
        let rules = AccessRules::from_toml_str("[groups]\ndevs = [\"a\"]\n").unwrap();
        assert!(!rules.is_enabled());
        assert!(rules.authorize("anyone", &repo("x"), Action::Delete));
    }

    #[test]
    fn config_errors_are_specific() {
        let err = |s: &str| AccessRules::from_toml_str(s).unwrap_err();
        assert_eq!(
            err("[[access]]\ngroups = [\"ops\"]\nrepositories = [\"*\"]\nactions = [\"pull\"]"),
            AccessError::UnknownGroup {
                rule: 1,
                group: "ops".into()
            }
        );
        assert_eq!(
            err("[[access]]\nrepositories = [\"*\"]\nactions = [\"pull\"]"),
            AccessError::NoSubjects { rule: 1 }
        );
        assert!(matches!(
            err("[[access]]\nusers = [\"a\"]\nrepositories = [\"*\"]\nactions = [\"write\"]"),
            AccessError::Toml(_)
        ));
        assert!(matches!(
            err("[[access]]\nuser = [\"a\"]\nrepositories = [\"*\"]\nactions = [\"pull\"]"),
            AccessError::Toml(_)
        ));
        assert!(matches!(
            err("[[access]]\nusers = [\"a\"]\nrepositories = [\"Team\"]\nactions = [\"pull\"]"),
            AccessError::BadPattern { rule: 1, .. }
        ));
    }
}
