//! The authenticator: dummy hashing for unknown users, the success cache, rate limiting,
//! reload, redaction, access rules and Basic header parsing.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ALICE, BOB, CAROL};
use shoal_coordinator::access::{AccessRules, Action};
use shoal_coordinator::auth::{
    ADDRESS_FAILURE_FACTOR, AuthConfig, AuthFailure, Authenticator, BasicAuthError,
    BasicCredentials, Password, parse_basic_authorization,
};
use shoal_coordinator::htpasswd::{Htpasswd, PasswordHash, Scheme};
use shoal_proto::reference::RepoName;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn testbed() -> Htpasswd {
    Htpasswd::parse(format!("{ALICE}\n{BOB}\n{CAROL}\n").as_bytes()).unwrap()
}

fn authenticator(users: Htpasswd, config: AuthConfig) -> Authenticator {
    Authenticator::new(users, AccessRules::allow_all(), config)
}

#[test]
fn all_three_formats_authenticate() {
    let auth = authenticator(testbed(), AuthConfig::default());
    let now = Instant::now();
    let client = ip("192.0.2.1");
    assert_eq!(auth.verify(client, "alice", b"s3cret", now), Ok(()));
    assert_eq!(auth.verify(client, "bob", b"md5pass", now), Ok(()));
    assert_eq!(auth.verify(client, "carol", b"shapass", now), Ok(()));
    assert_eq!(
        auth.verify(client, "carol", b"md5pass", now),
        Err(AuthFailure::BadCredentials)
    );
}

#[test]
fn unknown_users_cost_a_real_hash() {
    let cost = 10;
    let line = format!(
        "known:{}",
        PasswordHash::bcrypt(b"right", cost).unwrap().as_field()
    );
    let users = Htpasswd::parse(line.as_bytes()).unwrap();
    assert_eq!(users.typical_scheme(), Some(Scheme::Bcrypt { cost }));
    let auth = authenticator(users, AuthConfig::default());

    // Different addresses, so the rate limiter stays out of the way.
    let mut known = Duration::MAX;
    let mut unknown = Duration::MAX;
    for i in 0..3 {
        let start = Instant::now();
        let r = auth.verify(ip(&format!("192.0.2.{i}")), "known", b"wrong", start);
        known = known.min(start.elapsed());
        assert_eq!(r, Err(AuthFailure::BadCredentials));

        let start = Instant::now();
        let r = auth.verify(ip(&format!("198.51.100.{i}")), "nobody", b"wrong", start);
        unknown = unknown.min(start.elapsed());
        assert_eq!(r, Err(AuthFailure::BadCredentials));
    }
    let stats = auth.stats();
    assert_eq!(stats.hash_verifications, 6);
    assert_eq!(stats.dummy_verifications, 3);
    assert!(
        unknown >= known / 2,
        "unknown user took {unknown:?}, known user {known:?}"
    );
}

#[test]
fn dummy_follows_the_files_typical_scheme() {
    // An APR1-only file: the dummy is APR1 too, so unknown users are not slower either.
    let users = Htpasswd::parse(format!("{BOB}\n").as_bytes()).unwrap();
    let auth = authenticator(users, AuthConfig::default());
    let start = Instant::now();
    assert!(auth.verify(ip("192.0.2.1"), "nobody", b"x", start).is_err());
    assert!(start.elapsed() < Duration::from_millis(500));
    assert_eq!(auth.stats().dummy_verifications, 1);
}

#[test]
fn successes_are_cached_briefly_and_failures_never() {
    let config = AuthConfig {
        cache_ttl: Duration::from_secs(60),
        ..AuthConfig::default()
    };
    let auth = authenticator(testbed(), config);
    let client = ip("192.0.2.1");
    let t0 = Instant::now();

    auth.verify(client, "alice", b"s3cret", t0).unwrap();
    assert_eq!(auth.stats().hash_verifications, 1);
    auth.verify(client, "alice", b"s3cret", t0 + Duration::from_secs(30))
        .unwrap();
    let stats = auth.stats();
    assert_eq!(stats.hash_verifications, 1, "cache hit must skip bcrypt");
    assert_eq!(stats.cache_hits, 1);

    // Another password for the same user is not a hit.
    assert!(auth.verify(client, "alice", b"S3cret", t0).is_err());
    assert!(auth.verify(client, "alice", b"S3cret", t0).is_err());
    assert_eq!(auth.stats().hash_verifications, 3);

    // Expired.
    auth.verify(client, "alice", b"s3cret", t0 + Duration::from_secs(61))
        .unwrap();
    assert_eq!(auth.stats().hash_verifications, 4);
}

#[test]
fn rate_limit_kicks_in_and_recovers() {
    let config = AuthConfig {
        max_failures: 3,
        failure_window: Duration::from_secs(10),
        ..AuthConfig::default()
    };
    let auth = authenticator(testbed(), config);
    let attacker = ip("203.0.113.7");
    let t0 = Instant::now();
    for i in 0..3 {
        let at = t0 + Duration::from_secs(i);
        assert_eq!(
            auth.verify(attacker, "bob", b"guess", at),
            Err(AuthFailure::BadCredentials)
        );
    }
    let hashes = auth.stats().hash_verifications;
    // Limited now, even with the right password, and without running a hash.
    let r = auth.verify(attacker, "bob", b"md5pass", t0 + Duration::from_secs(4));
    assert_eq!(
        r,
        Err(AuthFailure::RateLimited {
            retry_after: Duration::from_secs(6)
        })
    );
    assert_eq!(auth.stats().hash_verifications, hashes);
    assert_eq!(auth.stats().rate_limited, 1);

    // Other clients are unaffected; an IPv4-mapped IPv6 address is the same client.
    assert_eq!(
        auth.verify(ip("203.0.113.8"), "bob", b"md5pass", t0),
        Ok(())
    );
    // Other users behind the same address (a NAT) are unaffected too.
    assert_eq!(auth.verify(attacker, "alice", b"s3cret", t0), Ok(()));
    assert!(matches!(
        auth.verify(ip("::ffff:203.0.113.7"), "bob", b"md5pass", t0),
        Err(AuthFailure::RateLimited { .. })
    ));

    // The window ends: back to normal.
    assert_eq!(
        auth.verify(attacker, "bob", b"md5pass", t0 + Duration::from_secs(10)),
        Ok(())
    );
}

#[test]
fn guessing_across_user_names_limits_the_whole_address() {
    let config = AuthConfig {
        max_failures: 2,
        ..AuthConfig::default()
    };
    let auth = authenticator(testbed(), config);
    let sprayer = ip("198.51.100.9");
    let t0 = Instant::now();
    let bound = 2 * ADDRESS_FAILURE_FACTOR;
    // One failure per made-up user name: no single user reaches its bound...
    for i in 0..bound {
        assert_eq!(
            auth.verify(sprayer, &format!("user{i}"), b"guess", t0),
            Err(AuthFailure::BadCredentials),
            "attempt {i}"
        );
    }
    // ...but the address did: even a right password of a real user is refused from it.
    assert!(matches!(
        auth.verify(sprayer, "alice", b"s3cret", t0),
        Err(AuthFailure::RateLimited { .. })
    ));
    assert_eq!(
        auth.verify(ip("198.51.100.10"), "alice", b"s3cret", t0),
        Ok(())
    );
}

#[test]
fn ipv6_clients_are_limited_per_64() {
    let config = AuthConfig {
        max_failures: 2,
        ..AuthConfig::default()
    };
    let auth = authenticator(testbed(), config);
    let t0 = Instant::now();
    assert!(auth.verify(ip("2001:db8:1:2::1"), "bob", b"x", t0).is_err());
    assert!(auth.verify(ip("2001:db8:1:2::2"), "bob", b"x", t0).is_err());
    assert!(matches!(
        auth.verify(ip("2001:db8:1:2:ffff::9"), "bob", b"md5pass", t0),
        Err(AuthFailure::RateLimited { .. })
    ));
    assert_eq!(
        auth.verify(ip("2001:db8:1:3::1"), "bob", b"md5pass", t0),
        Ok(())
    );
}

#[test]
fn reload_swaps_the_file_and_keeps_it_when_broken() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("htpasswd");
    std::fs::write(&path, format!("{BOB}\n")).unwrap();
    let auth = Authenticator::load(&path, AccessRules::allow_all(), AuthConfig::default()).unwrap();
    let client = ip("192.0.2.1");
    let now = Instant::now();
    auth.verify(client, "bob", b"md5pass", now).unwrap();
    assert!(auth.verify(client, "carol", b"shapass", now).is_err());

    // Bob removed, carol added: the cached success for bob must not survive.
    std::fs::write(&path, format!("{CAROL}\n")).unwrap();
    assert_eq!(auth.reload(&path).unwrap(), 1);
    assert!(auth.verify(client, "bob", b"md5pass", now).is_err());
    auth.verify(client, "carol", b"shapass", now).unwrap();

    std::fs::write(&path, "carol:hunter2xyz\n").unwrap();
    let err = auth.reload(&path).unwrap_err().to_string();
    assert!(err.contains("line 1"), "{err}");
    assert!(!err.contains("hunter2xyz"), "{err}");
    auth.verify(client, "carol", b"shapass", now).unwrap();
    assert_eq!(auth.user_count(), 1);
}

#[test]
fn debug_output_never_shows_secrets() {
    let creds = parse_basic_authorization(b"Basic YWxpY2U6czNjcmV0").unwrap();
    assert_eq!(creds.user, "alice");
    assert_eq!(creds.password.as_bytes(), b"s3cret");
    let shown = format!("{creds:?} {:?}", creds.password);
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("alice"), "{shown}");

    let auth = authenticator(testbed(), AuthConfig::default());
    auth.verify(ip("192.0.2.1"), "alice", b"s3cret", Instant::now())
        .unwrap();
    let shown = format!("{auth:?} {:?}", testbed());
    for secret in ["s3cret", "f4z0o4pQ", "ux2HN8kg", "z0jT3Tdv"] {
        assert!(!shown.contains(secret), "{shown}");
    }
}

#[test]
fn pull_only_user_is_denied_push() {
    let rules = AccessRules::from_toml_str(
        r#"
        [groups]
        devs = ["alice"]

        [[access]]
        groups = ["devs"]
        repositories = ["team/**"]
        actions = ["pull", "push"]

        [[access]]
        users = ["bob"]
        repositories = ["team/*"]
        actions = ["pull"]
        "#,
    )
    .unwrap();
    let auth = Authenticator::new(testbed(), rules, AuthConfig::default());
    let repo = RepoName::parse("team/app").unwrap();
    assert!(auth.authorize("alice", &repo, Action::Push));
    assert!(auth.authorize("bob", &repo, Action::Pull));
    assert!(!auth.authorize("bob", &repo, Action::Push));
    assert!(!auth.authorize("carol", &repo, Action::Pull));

    auth.set_rules(AccessRules::allow_all());
    assert!(auth.authorize("carol", &repo, Action::Push));
}

#[tokio::test]
async fn verify_async_uses_cache_and_blocking_pool() {
    let auth = Arc::new(authenticator(testbed(), AuthConfig::default()));
    let creds = BasicCredentials {
        user: "alice".into(),
        password: Password::new("s3cret"),
    };
    let client = ip("192.0.2.1");
    let run = |c: BasicCredentials| {
        let auth = auth.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), auth.verify_async(client, &c))
                .await
                .expect("verification finishes")
        }
    };
    assert_eq!(run(creds.clone()).await, Ok(()));
    assert_eq!(run(creds.clone()).await, Ok(()));
    assert_eq!(auth.stats().hash_verifications, 1);
    let wrong = BasicCredentials {
        password: Password::new("nope"),
        ..creds
    };
    assert_eq!(run(wrong).await, Err(AuthFailure::BadCredentials));
}

#[test]
fn basic_header_parsing_is_strict() {
    use base64::Engine as _;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);

    let ok = |v: &str| parse_basic_authorization(v.as_bytes());
    let creds = ok(&format!("basic   {}", b64(b"u:p:with:colons"))).unwrap();
    assert_eq!(creds.user, "u");
    assert_eq!(creds.password.as_bytes(), b"p:with:colons");
    let creds = ok(&format!("BASIC {}", b64(b"u:"))).unwrap();
    assert_eq!(creds.password.as_bytes(), b"");

    let err = |v: &[u8]| parse_basic_authorization(v).unwrap_err();
    assert_eq!(err(b"Bearer abc"), BasicAuthError::NotBasic);
    assert_eq!(err(b"Basic"), BasicAuthError::NotBasic);
    assert_eq!(err(b"Basicx dTpw"), BasicAuthError::NotBasic);
    assert_eq!(err(b"Basic dTpw!"), BasicAuthError::BadBase64);
    assert_eq!(err(b"Basic dTpw "), BasicAuthError::BadBase64);
    assert_eq!(err(b"Basic dTp"), BasicAuthError::BadBase64); // missing padding
    assert_eq!(
        err(format!("Basic {}", b64(b"nocolon")).as_bytes()),
        BasicAuthError::NoColon
    );
    assert_eq!(
        err(format!("Basic {}", b64(b":pw")).as_bytes()),
        BasicAuthError::EmptyUser
    );
    assert_eq!(
        err(format!("Basic {}", b64(b"u:p\x00w")).as_bytes()),
        BasicAuthError::ControlChar
    );
    assert_eq!(
        err(format!("Basic {}", b64(b"u\n:pw")).as_bytes()),
        BasicAuthError::ControlChar
    );
    assert_eq!(
        err(format!("Basic {}", b64(b"\xff:pw")).as_bytes()),
        BasicAuthError::UserNotUtf8
    );
    let long_user = format!("{}:pw", "u".repeat(300));
    assert_eq!(
        err(format!("Basic {}", b64(long_user.as_bytes())).as_bytes()),
        BasicAuthError::UserTooLong
    );
    assert_eq!(err(&vec![b'A'; 5000]), BasicAuthError::TooLong);
}
