//! A TiDB cluster as the double models it: the store, the accounts, global
//! variables and the session-token signing key that all its instances share.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use super::auth::{User, plugin};
use super::store::Store;
use super::token::{self, TokenError};

/// A wall clock: the simulation passes its own.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// How a cluster is built.
#[derive(Clone)]
pub struct ClusterOptions {
    /// Seed of the RNG behind salts and the signing key (`None`: from the
    /// time of day). The simulation sets it.
    pub seed: Option<u64>,
    /// Session-token signing key; `None` derives one from the RNG.
    pub signing_key: Option<Vec<u8>>,
    /// How long a session token is valid (TiDB: one minute).
    pub token_lifetime: Duration,
    /// Wall clock for token times and NOW(); `None` is the system clock.
    pub clock: Option<Clock>,
}

impl fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterOptions")
            .field("seed", &self.seed)
            .field("token_lifetime", &self.token_lifetime)
            .field("custom_clock", &self.clock.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            seed: None,
            signing_key: None,
            token_lifetime: Duration::from_secs(60),
            clock: None,
        }
    }
}

/// One cluster, shared (`Arc`) by its instances.
pub struct Cluster {
    store: Arc<Store>,
    users: RwLock<BTreeMap<String, User>>,
    globals: Mutex<BTreeMap<String, String>>,
    key: Vec<u8>,
    token_lifetime: Duration,
    clock: Option<Clock>,
    /// Added to the clock (`advance_clock`), in nanoseconds.
    skew_nanos: AtomicU64,
    rng: Mutex<StdRng>,
    next_conn_id: AtomicU64,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("token_lifetime", &self.token_lifetime)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A cluster with the `test` database and the accounts `root` (no
    /// password), `app` (`app-Pa55word`, mysql_native_password) and
    /// `sha2user` (`sha2-Pa55word`, caching_sha2_password).
    pub fn new(opts: ClusterOptions) -> Arc<Self> {
        let seed = opts.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let mut rng = StdRng::seed_from_u64(seed);
        let key = opts.signing_key.clone().unwrap_or_else(|| {
            let mut k = vec![0u8; 32];
            rng.fill_bytes(&mut k);
            k
        });
        let c = Self {
            store: Store::new(),
            users: RwLock::new(BTreeMap::new()),
            globals: Mutex::new(BTreeMap::new()),
            key,
            token_lifetime: opts.token_lifetime,
            clock: opts.clock,
            skew_nanos: AtomicU64::new(0),
            rng: Mutex::new(rng),
            // TiDB's connection ids are large; any start works for clients.
            next_conn_id: AtomicU64::new(1),
        };
        c.add_user("root", "", plugin::NATIVE_PASSWORD);
        c.add_user("app", "app-Pa55word", plugin::NATIVE_PASSWORD);
        c.add_user("sha2user", "sha2-Pa55word", plugin::CACHING_SHA2);
        Arc::new(c)
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Adds or replaces an account (host `%`).
    pub fn add_user(&self, name: &str, password: &str, plugin: &'static str) {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        users.insert(
            name.to_string(),
            User {
                name: name.to_string(),
                password: password.to_string(),
                plugin,
            },
        );
    }

    /// An account by name.
    pub fn user(&self, name: &str) -> Option<User> {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users.get(name).cloned()
    }

    /// The cluster's wall clock, including [`Cluster::advance_clock`].
    pub fn now(&self) -> SystemTime {
        let base = match &self.clock {
            Some(c) => c(),
            None => SystemTime::now(),
        };
        base + Duration::from_nanos(self.skew_nanos.load(Ordering::Relaxed))
    }

    /// Moves the cluster's clock forward (to expire tokens in tests).
    pub fn advance_clock(&self, by: Duration) {
        self.skew_nanos
            .fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
    }

    /// How long tokens are valid.
    pub fn token_lifetime(&self) -> Duration {
        self.token_lifetime
    }

    /// Signs a session token for `user`.
    pub fn sign_token(&self, user: &str) -> String {
        token::sign(&self.key, user, self.now(), self.token_lifetime)
    }

    /// Checks a session token presented by `user`.
    pub fn validate_token(&self, token: &[u8], user: &str) -> Result<(), TokenError> {
        token::validate(&self.key, token, user, self.now(), self.token_lifetime)
    }

    /// What `/config` shows as `security.session-token-signing-cert`: TiDB
    /// has a file path there; TiProxy only checks that it is set.
    pub fn signing_cert_path(&self) -> &'static str {
        "/tidb-double/session-token-signing.crt"
    }

    /// A 20-byte salt as TiDB makes one: bytes in 1..=127 other than `$`.
    pub fn salt(&self) -> [u8; 20] {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = [0u8; 20];
        rng.fill_bytes(&mut s);
        for b in &mut s {
            *b &= 0x7f;
            if *b == 0 || *b == b'$' {
                *b += 1;
            }
        }
        s
    }

    /// A new connection id, unique across the cluster's instances.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A global variable's value if `SET GLOBAL` changed it.
    pub fn global_var(&self, name: &str) -> Option<String> {
        let g = self.globals.lock().unwrap_or_else(|e| e.into_inner());
        g.get(name).cloned()
    }

    /// `SET GLOBAL name = value` (canonical value).
    pub fn set_global_var(&self, name: &str, value: String) {
        let mut g = self.globals.lock().unwrap_or_else(|e| e.into_inner());
        g.insert(name.to_string(), value);
    }
}
