//! Authentication of registry clients against an htpasswd file, and their authorisation by
//! access rules.
//!
//! - Unknown users are checked against a dummy hash of the file's most common scheme and cost,
//!   so probing for user names takes as long as a wrong password.
//! - A successful verification is cached for [`AuthConfig::cache_ttl`], keyed by a salted
//!   SHA-256 of user and password (the salt is random per process; the plaintext is never
//!   stored), so bcrypt does not run on every request of a `docker pull`.
//! - Failures are counted per client address (IPv6 by /64, since one host usually owns the
//!   whole prefix) and user name, in a fixed window. After [`AuthConfig::max_failures`]
//!   failures, every attempt for that user from that address, right or wrong, is refused with
//!   a retry-after until the window ends, and no hash runs for it. Refusing right passwords too
//!   matters: otherwise a cached password would be confirmed to a blocked guesser at no cost.
//!   Keying by user as well keeps one misconfigured client behind a NAT from locking out every
//!   other user behind the same address; guessing across many user names is caught by a
//!   per-address bound of [`ADDRESS_FAILURE_FACTOR`] times as many failures, which then refuses
//!   the whole address.
//! - [`Authenticator::reload`] swaps the file atomically; a file that fails to load leaves the
//!   previous one in place.
//!
//! Hash verification is CPU work (bcrypt cost 10 is tens of milliseconds): async callers use
//! [`Authenticator::verify_async`], which only leaves the runtime thread on a cache miss.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest as _, Sha256};
use shoal_proto::reference::RepoName;
use tracing::{info, warn};

use crate::access::{AccessRules, Action};
use crate::htpasswd::{Htpasswd, LoadError, MAX_USER_BYTES, PasswordHash, Scheme};

/// Cost of the dummy hash when the file has no entries to copy one from.
pub const DEFAULT_BCRYPT_COST: u32 = 10;
/// Longest `Authorization` header value accepted.
pub const MAX_AUTHORIZATION_BYTES: usize = 4096;

/// Failures one address may have in a window, over all user names, as a multiple of
/// [`AuthConfig::max_failures`] (the bound for one user name from one address).
pub const ADDRESS_FAILURE_FACTOR: u32 = 5;

/// Tuning of caching and rate limiting.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// How long a successful verification is remembered.
    pub cache_ttl: Duration,
    /// Bound on remembered verifications; the cache is emptied when it is full.
    pub cache_max_entries: usize,
    /// Failures for one user name from one client address in one window before that user is
    /// refused from there; the address as a whole is refused after
    /// [`ADDRESS_FAILURE_FACTOR`] times as many.
    pub max_failures: u32,
    /// Length of the failure-counting window.
    pub failure_window: Duration,
    /// Bound on tracked client addresses. When full (after dropping expired windows), new
    /// addresses are not tracked: failing open here beats refusing every new client.
    pub max_tracked_clients: usize,
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig {
            cache_ttl: Duration::from_secs(60),
            cache_max_entries: 10_000,
            max_failures: 10,
            failure_window: Duration::from_secs(60),
            max_tracked_clients: 100_000,
        }
    }
}

/// Why a client was not authenticated. Deliberately does not say whether the user exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("invalid user name or password")]
    BadCredentials,
    #[error("too many failed logins from this address; retry after {}s", retry_after.as_secs().max(1))]
    RateLimited { retry_after: Duration },
}

/// A password from a client. `Debug` is redacted and there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Vec<u8>);

impl Password {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Password {
        Password(bytes.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Credentials from an `Authorization: Basic` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BasicCredentials {
    pub user: String,
    pub password: Password,
}

/// Why an `Authorization` header is not acceptable Basic credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BasicAuthError {
    #[error("authorization header is longer than {MAX_AUTHORIZATION_BYTES} bytes")]
    TooLong,
    #[error("authorization scheme is not Basic")]
    NotBasic,
    #[error("basic credentials are not valid base64")]
    BadBase64,
    #[error("basic credentials have no ':' between user and password")]
    NoColon,
    #[error("basic credentials have an empty user name")]
    EmptyUser,
    #[error("basic credentials have a user name longer than {MAX_USER_BYTES} bytes")]
    UserTooLong,
    #[error("basic credentials user name is not UTF-8")]
    UserNotUtf8,
    #[error("basic credentials contain a control character")]
    ControlChar,
}

/// Parses an `Authorization` header value as RFC 7617 Basic credentials: the scheme
/// (case-insensitive), one or more spaces, padded standard base64 of `user:password`, split at
/// the first colon. Control characters are refused in both parts.
pub fn parse_basic_authorization(value: &[u8]) -> Result<BasicCredentials, BasicAuthError> {
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Err(BasicAuthError::TooLong);
    }
    let scheme_len = b"Basic".len();
    if value.len() <= scheme_len
        || !value[..scheme_len].eq_ignore_ascii_case(b"Basic")
        || value[scheme_len] != b' '
    {
        return Err(BasicAuthError::NotBasic);
    }
    let token = value[scheme_len..].trim_ascii_start();
    let decoded = BASE64
        .decode(token)
        .map_err(|_| BasicAuthError::BadBase64)?;
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or(BasicAuthError::NoColon)?;
    let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
    if user.is_empty() {
        return Err(BasicAuthError::EmptyUser);
    }
    if user.len() > MAX_USER_BYTES {
        return Err(BasicAuthError::UserTooLong);
    }
    if decoded.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(BasicAuthError::ControlChar);
    }
    let user = std::str::from_utf8(user).map_err(|_| BasicAuthError::UserNotUtf8)?;
    Ok(BasicCredentials {
        user: user.to_owned(),
        password: Password::new(password),
    })
}

/// Counters, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthStats {
    /// Password hashes run, dummy ones included.
    pub hash_verifications: u64,
    /// Of those, against the dummy hash (unknown user).
    pub dummy_verifications: u64,
    pub cache_hits: u64,
    pub successes: u64,
    pub failures: u64,
    /// Attempts refused without verification because of rate limiting.
    pub rate_limited: u64,
}

#[derive(Default)]
struct Counters {
    hash_verifications: AtomicU64,
    dummy_verifications: AtomicU64,
    cache_hits: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    rate_limited: AtomicU64,
}

/// The loaded file and rules; replaced whole, never mutated.
struct Snapshot {
    users: Htpasswd,
    dummy: PasswordHash,
    rules: Arc<AccessRules>,
    /// Cache entries from another generation are ignored, so a verification that raced with
    /// a reload cannot resurrect a removed user or an old password.
    generation: u64,
}

struct CacheEntry {
    expires: Instant,
    generation: u64,
}

/// Client address as counted by the rate limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(u32),
    /// The /64 prefix.
    V6(u64),
}

impl ClientKey {
    fn of(addr: IpAddr) -> ClientKey {
        match addr {
            IpAddr::V4(v4) => ClientKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.into()),
                None => ClientKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// What the rate limiter counts: an address, or one user name from an address (by a salted
/// hash: fixed size, and no user names kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct LimitKey {
    client: ClientKey,
    user: Option<[u8; 16]>,
}

struct Window {
    start: Instant,
    failures: u32,
}

/// Verifies credentials and decides access. Share it as `Arc<Authenticator>`.
pub struct Authenticator {
    config: AuthConfig,
    current: RwLock<Arc<Snapshot>>,
    cache: Mutex<HashMap<[u8; 32], CacheEntry>>,
    limiter: Mutex<HashMap<LimitKey, Window>>,
    /// Per-process random salt of cache keys.
    salt: [u8; 32],
    counters: Counters,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snapshot = self.snapshot();
        f.debug_struct("Authenticator")
            .field("users", &snapshot.users.len())
            .field("rules_enabled", &snapshot.rules.is_enabled())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent even if a holder panicked: every update is a single insert.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Authenticator {
    /// An authenticator over an already parsed file.
    pub fn new(users: Htpasswd, rules: AccessRules, config: AuthConfig) -> Authenticator {
        let snapshot = Snapshot {
            dummy: dummy_for(&users),
            users,
            rules: Arc::new(rules),
            generation: 0,
        };
        Authenticator {
            config,
            current: RwLock::new(Arc::new(snapshot)),
            cache: Mutex::new(HashMap::new()),
            limiter: Mutex::new(HashMap::new()),
            salt: rand::random(),
            counters: Counters::default(),
        }
    }

    /// Loads the htpasswd file at `path`.
    pub fn load(
        path: &Path,
        rules: AccessRules,
        config: AuthConfig,
    ) -> Result<Authenticator, LoadError> {
        Ok(Authenticator::new(Htpasswd::load(path)?, rules, config))
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, make: impl FnOnce(&Snapshot) -> Snapshot) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let next = make(&current);
        *current = Arc::new(next);
        lock(&self.cache).clear();
    }

    /// Re-reads the htpasswd file at `path` and swaps it in. On error the previous file stays
    /// in force, the error is logged and returned. Returns the number of users.
    pub fn reload(&self, path: &Path) -> Result<usize, LoadError> {
        let users = match Htpasswd::load(path) {
            Ok(users) => users,
            Err(error) => {
                warn!(%error, "htpasswd reload failed; keeping the previous file");
                return Err(error);
            }
        };
        // The dummy hash is computed outside the lock: at bcrypt cost it takes a while.
        let dummy = dummy_for(&users);
        let count = users.len();
        self.replace(|old| Snapshot {
            users,
            dummy,
            rules: old.rules.clone(),
            generation: old.generation + 1,
        });
        info!(path = %path.display(), users = count, "htpasswd reloaded");
        Ok(count)
    }

    /// Replaces the access rules.
    pub fn set_rules(&self, rules: AccessRules) {
        let rules = Arc::new(rules);
        // Rules do not affect authentication, but replace() also starts a new generation,
        // which is harmless and keeps one code path.
        self.replace(|old| Snapshot {
            users: old.users.clone(),
            dummy: old.dummy.clone(),
            rules,
            generation: old.generation + 1,
        });
    }

    /// Number of users in the file in force.
    pub fn user_count(&self) -> usize {
        self.snapshot().users.len()
    }

    /// Whether access rules are configured (otherwise every user may do everything).
    pub fn rules_enabled(&self) -> bool {
        self.snapshot().rules.is_enabled()
    }

    /// Whether `user` (already authenticated) may perform `action` on `repo`.
    pub fn authorize(&self, user: &str, repo: &RepoName, action: Action) -> bool {
        self.snapshot().rules.authorize(user, repo, action)
    }

    /// Checks credentials from `client` at time `now`. Runs a password hash on a cache miss:
    /// call from a blocking-capable thread, or use [`Authenticator::verify_async`].
    pub fn verify(
        &self,
        client: IpAddr,
        user: &str,
        password: &[u8],
        now: Instant,
    ) -> Result<(), AuthFailure> {
        let key = self.cache_key(user, password);
        match self.fast_path(client, user, &key, now) {
            Some(result) => result,
            None => self.slow_path(client, user, password, key, now),
        }
    }

    /// [`Authenticator::verify`] for async code: the rate-limit and cache checks run inline,
    /// the password hash on tokio's blocking pool.
    pub async fn verify_async(
        self: &Arc<Self>,
        client: IpAddr,
        credentials: &BasicCredentials,
    ) -> Result<(), AuthFailure> {
        let now = Instant::now();
        let key = self.cache_key(&credentials.user, credentials.password.as_bytes());
        if let Some(result) = self.fast_path(client, &credentials.user, &key, now) {
            return result;
        }
        let this = Arc::clone(self);
        let credentials = credentials.clone();
        tokio::task::spawn_blocking(move || {
            this.slow_path(
                client,
                &credentials.user,
                credentials.password.as_bytes(),
                key,
                Instant::now(),
            )
        })
        .await
        // Only a panic in the hash code gets here; refusing is the safe answer.
        .unwrap_or(Err(AuthFailure::BadCredentials))
    }

    /// Counters since start.
    pub fn stats(&self) -> AuthStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AuthStats {
            hash_verifications: get(&c.hash_verifications),
            dummy_verifications: get(&c.dummy_verifications),
            cache_hits: get(&c.cache_hits),
            successes: get(&c.successes),
            failures: get(&c.failures),
            rate_limited: get(&c.rate_limited),
        }
    }

    fn cache_key(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        // Length-prefixed so that ("ab", "c") and ("a", "bc") differ.
        h.update((user.len() as u64).to_be_bytes());
        h.update(user.as_bytes());
        h.update(password);
        h.finalize().into()
    }

    /// Rate limit, then cache. `None` means a hash must run.
    fn fast_path(
        &self,
        client: IpAddr,
        user: &str,
        key: &[u8; 32],
        now: Instant,
    ) -> Option<Result<(), AuthFailure>> {
        if let Some(retry_after) = self.limited(self.limit_keys(client, user), now) {
            self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Some(Err(AuthFailure::RateLimited { retry_after }));
        }
        let generation = self.snapshot().generation;
        let cache = lock(&self.cache);
        if let Some(entry) = cache.get(key)
            && entry.generation == generation
            && now < entry.expires
        {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            self.counters.successes.fetch_add(1, Ordering::Relaxed);
            return Some(Ok(()));
        }
        None
    }

    fn slow_path(
        &self,
        client: IpAddr,
        user: &str,
        password: &[u8],
        key: [u8; 32],
        now: Instant,
    ) -> Result<(), AuthFailure> {
        let snapshot = self.snapshot();
        let (hash, known) = match snapshot.users.get(user) {
            Some(hash) => (hash, true),
            None => {
                self.counters
                    .dummy_verifications
                    .fetch_add(1, Ordering::Relaxed);
                (&snapshot.dummy, false)
            }
        };
        self.counters
            .hash_verifications
            .fetch_add(1, Ordering::Relaxed);
        // Both sides always run: the dummy comparison takes as long as a real one.
        let matched = hash.verify(password);
        if matched && known {
            self.remember(key, snapshot.generation, now);
            self.counters.successes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        } else {
            for k in self.limit_keys(client, user) {
                self.record_failure(k, now);
            }
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            Err(AuthFailure::BadCredentials)
        }
    }

    fn remember(&self, key: [u8; 32], generation: u64, now: Instant) {
        let mut cache = lock(&self.cache);
        if cache.len() >= self.config.cache_max_entries {
            cache.retain(|_, e| now < e.expires);
            if cache.len() >= self.config.cache_max_entries {
                cache.clear();
            }
        }
        cache.insert(
            key,
            CacheEntry {
                expires: now + self.config.cache_ttl,
                generation,
            },
        );
    }

    /// The address's key and the (address, user) key.
    fn limit_keys(&self, client: IpAddr, user: &str) -> [LimitKey; 2] {
        let client = ClientKey::of(client);
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(b"rate-limit user\0");
        h.update(user.as_bytes());
        let digest: [u8; 32] = h.finalize().into();
        let mut user = [0; 16];
        user.copy_from_slice(&digest[..16]);
        [
            LimitKey { client, user: None },
            LimitKey {
                client,
                user: Some(user),
            },
        ]
    }

    /// `Some(retry_after)` if the address, or the user from that address, has used up its
    /// failures in the current window.
    fn limited(&self, keys: [LimitKey; 2], now: Instant) -> Option<Duration> {
        let limiter = lock(&self.limiter);
        keys.iter()
            .filter_map(|k| {
                let window = limiter.get(k)?;
                let bound = match k.user {
                    Some(_) => self.config.max_failures,
                    None => self
                        .config
                        .max_failures
                        .saturating_mul(ADDRESS_FAILURE_FACTOR),
                };
                let end = window.start + self.config.failure_window;
                (now < end && window.failures >= bound).then(|| end - now)
            })
            .max()
    }

    fn record_failure(&self, client: LimitKey, now: Instant) {
        let period = self.config.failure_window;
        let mut limiter = lock(&self.limiter);
        if !limiter.contains_key(&client) && limiter.len() >= self.config.max_tracked_clients {
            limiter.retain(|_, w| now < w.start + period);
            if limiter.len() >= self.config.max_tracked_clients {
                warn!("auth rate limiter is tracking too many clients; not tracking a new one");
                return;
            }
        }
        let window = limiter.entry(client).or_insert(Window {
            start: now,
            failures: 0,
        });
        if now >= window.start + period {
            *window = Window {
                start: now,
                failures: 0,
            };
        }
        window.failures = window.failures.saturating_add(1);
    }
}

fn dummy_for(users: &Htpasswd) -> PasswordHash {
    let scheme = users.typical_scheme().unwrap_or(Scheme::Bcrypt {
        cost: DEFAULT_BCRYPT_COST,
    });
    PasswordHash::dummy(scheme)
}
