//! Token-bucket rate limits per action, each counted against the request's account (or what
//! an attempt is aimed at) and against its client address, so that neither many accounts from
//! one address nor one account from many addresses gets around a limit.
//!
//! One process keeps its buckets in memory. Nodes sharing a database keep them in it
//! ([`tables::RATE_BUCKETS`]), so that N nodes allow the rate once, not N times: a check reads
//! the buckets and writes what it took on condition that nobody else changed them meanwhile.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use crate::{
    config::{RateLimit, RateLimitsConfig},
    error::{Error, Result},
    network::Network,
    store::{Key as StoreKey, Store, StoreError, tables},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Message,
    Registration,
    Login,
    CreateRoom,
    /// `PUT /rooms/{id}/state/...`.
    StateEvent,
    /// `POST /search`.
    Search,
    /// Failed passwords in user-interactive auth (only failures take a token: see `refund`).
    Reauth,
    /// Failed knock or join passcodes of a session, per (user, room) and per address.
    KnockPasscode,
}

/// Who a request counts against. Each key has its own bucket, and a request needs a token
/// from every one.
#[derive(Clone, Debug, Default)]
pub struct RateKeys {
    /// The account, or what an attempt is aimed at (the account named at login, a user and a
    /// room for a passcode).
    pub subject: Option<String>,
    /// The client address, as [`client_address`] finds it.
    pub address: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Subject(String),
    Address(IpAddr),
}

impl Key {
    /// The bucket's key in the store.
    fn stored(&self, action: Action) -> Vec<u8> {
        let key = match self {
            Key::Subject(subject) => format!("s:{subject}"),
            Key::Address(address) => format!("a:{address}"),
        };
        StoreKey::new().str(&format!("{action:?}")).str(&key).into_vec()
    }
}

impl RateKeys {
    fn keys(&self) -> Vec<Key> {
        let mut keys: Vec<Key> = self.subject.iter().cloned().map(Key::Subject).chain(self.address.map(Key::Address)).collect();
        if keys.is_empty() {
            // No account and no address (a request without a peer): all such share one bucket.
            keys.push(Key::Subject(String::new()));
        }
        keys
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Bucket {
    tokens: f64,
    /// When it was last refilled, ms since the Unix epoch.
    updated_ms: u64,
}

impl Bucket {
    fn full(limit: RateLimit, now_ms: u64) -> Self {
        Self { tokens: f64::from(limit.burst), updated_ms: now_ms }
    }

    fn refill(&mut self, limit: RateLimit, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.updated_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        self.updated_ms = self.updated_ms.max(now_ms);
    }

    /// When it will be full again.
    fn full_at_ms(&self, limit: RateLimit) -> u64 {
        self.updated_ms.saturating_add(((f64::from(limit.burst) - self.tokens).max(0.0) / limit.per_second * 1000.0).ceil() as u64)
    }

    /// As stored: the tokens, when refilled and when full again (for pruning without the limit).
    fn encode(&self, limit: RateLimit) -> Vec<u8> {
        [self.tokens.to_be_bytes(), self.updated_ms.to_be_bytes(), self.full_at_ms(limit).to_be_bytes()].concat()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        Some(Self { tokens: f64::from_be_bytes(stored_field(bytes, 0)?), updated_ms: u64::from_be_bytes(stored_field(bytes, 1)?) })
    }

    /// When a stored bucket is full again, as [`Self::encode`] wrote it.
    fn stored_full_at_ms(bytes: &[u8]) -> u64 {
        stored_field(bytes, 2).map_or(0, u64::from_be_bytes)
    }
}

/// The `index`th 8-byte field of a stored bucket.
fn stored_field(bytes: &[u8], index: usize) -> Option<[u8; 8]> {
    bytes.get(index * 8..index * 8 + 8).and_then(|b| <[u8; 8]>::try_from(b).ok())
}

/// Takes one token from each bucket (refilled to `now_ms`), or none: then the wait in ms until
/// every one has a token.
fn take(buckets: &mut [Bucket], limit: RateLimit, now_ms: u64) -> std::result::Result<(), u64> {
    let mut retry_after_ms = 0;
    for bucket in buckets.iter_mut() {
        bucket.refill(limit, now_ms);
        if bucket.tokens < 1.0 {
            retry_after_ms = retry_after_ms.max(((1.0 - bucket.tokens) / limit.per_second * 1000.0).ceil() as u64);
        }
    }
    if retry_after_ms > 0 {
        return Err(retry_after_ms);
    }
    for bucket in buckets {
        bucket.tokens -= 1.0;
    }
    Ok(())
}

/// How often a check is tried again when other nodes changed its buckets meanwhile, and the
/// wait a request is told to take when they kept doing so (it is refused: a limit that gives
/// way under contention would give way to a flood).
const SHARED_ATTEMPTS: usize = 4;
const CONTENDED_RETRY_MS: u64 = 100;

enum Buckets {
    Local(Mutex<HashMap<(Action, Key), Bucket>>),
    Shared(Arc<Store>),
}

pub struct RateLimiter {
    config: RateLimitsConfig,
    buckets: Buckets,
}

impl RateLimiter {
    /// Buckets in this process's memory.
    pub fn new(config: &RateLimitsConfig) -> Self {
        Self { config: config.clone(), buckets: Buckets::Local(Mutex::default()) }
    }

    /// Buckets in the store when other nodes share it, else in memory.
    pub fn for_store(config: &RateLimitsConfig, store: &Arc<Store>) -> Self {
        if !store.is_shared() {
            return Self::new(config);
        }
        Self { config: config.clone(), buckets: Buckets::Shared(store.clone()) }
    }

    fn limit(&self, action: Action) -> RateLimit {
        let c = &self.config;
        match action {
            Action::Message => c.message,
            Action::Registration => c.registration,
            Action::Login => c.login,
            Action::CreateRoom => c.create_room,
            Action::StateEvent => c.state_event,
            Action::Search => c.search,
            Action::Reauth => c.reauth,
            Action::KnockPasscode => c.knock_passcode,
        }
    }

    /// Takes one token from each of `keys`' buckets, or none and answers M_LIMIT_EXCEEDED with
    /// the wait until every bucket has one.
    pub fn check(&self, action: Action, keys: &RateKeys) -> Result<()> {
        self.check_at(action, keys, limbic_core::now_ms())
    }

    /// Gives back the token an attempt took, for actions where only failures count: taking
    /// before the attempt and refunding success keeps concurrent guesses within the limit.
    pub fn refund(&self, action: Action, keys: &RateKeys) {
        if !self.config.enabled {
            return;
        }
        let limit = self.limit(action);
        let give_back = |bucket: &mut Bucket| bucket.tokens = (bucket.tokens + 1.0).min(f64::from(limit.burst));
        match &self.buckets {
            Buckets::Local(buckets) => {
                let mut buckets = buckets.lock().expect("rate limiter lock");
                for key in keys.keys() {
                    if let Some(bucket) = buckets.get_mut(&(action, key)) {
                        give_back(bucket);
                    }
                }
            }
            Buckets::Shared(store) => {
                // A refund lost to contention only makes the limit stricter.
                let _ = self.shared(store, action, keys, |buckets| {
                    buckets.iter_mut().for_each(give_back);
                    Ok::<(), ()>(())
                });
            }
        }
    }

    fn check_at(&self, action: Action, keys: &RateKeys, now_ms: u64) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let limit = self.limit(action);
        let limited = |retry_after_ms| Error::LimitExceeded { retry_after_ms };
        match &self.buckets {
            Buckets::Local(buckets) => {
                let mut buckets = buckets.lock().expect("rate limiter lock");
                if buckets.len() > 100_000 {
                    // Forget idle buckets rather than grow without bound; full ones are the default.
                    buckets.retain(|(action, _), b| b.full_at_ms(self.limit(*action)) > now_ms);
                }
                let keys = keys.keys();
                let mut taken: Vec<Bucket> = keys.iter().map(|key| buckets.get(&(action, key.clone())).copied().unwrap_or(Bucket::full(limit, now_ms))).collect();
                let outcome = take(&mut taken, limit, now_ms);
                for (key, bucket) in keys.into_iter().zip(taken) {
                    buckets.insert((action, key), bucket);
                }
                outcome.map_err(limited)
            }
            Buckets::Shared(store) => match self.shared(store, action, keys, |buckets| take(buckets, limit, now_ms)) {
                Ok(outcome) => outcome.map_err(limited),
                Err(Error::Store(StoreError::Conflict { .. } | StoreError::Contention)) => Err(limited(CONTENDED_RETRY_MS)),
                Err(error) => Err(error),
            },
        }
    }

    /// Reads `keys`' buckets of `action` from the store, lets `change` work on them, and writes
    /// them back if it succeeded, on condition that they are still as read (else from the
    /// start again).
    fn shared<T>(&self, store: &Store, action: Action, keys: &RateKeys, change: impl Fn(&mut [Bucket]) -> std::result::Result<(), T>) -> Result<std::result::Result<(), T>> {
        let limit = self.limit(action);
        let stored: Vec<Vec<u8>> = keys.keys().iter().map(|key| key.stored(action)).collect();
        let stored_keys: Vec<&[u8]> = stored.iter().map(Vec::as_slice).collect();
        for _ in 0..SHARED_ATTEMPTS {
            let now_ms = limbic_core::now_ms();
            let read = store.get_many(tables::RATE_BUCKETS, &stored_keys)?;
            let mut buckets: Vec<Bucket> = read.iter().map(|value| value.as_deref().and_then(Bucket::decode).unwrap_or(Bucket::full(limit, now_ms))).collect();
            if let Err(refused) = change(&mut buckets) {
                return Ok(Err(refused));
            }
            let mut batch = store.batch();
            for ((key, value), bucket) in stored.iter().zip(&read).zip(&buckets) {
                batch.expect(tables::RATE_BUCKETS, key, value.as_deref());
                batch.put(tables::RATE_BUCKETS, key, &bucket.encode(limit));
            }
            match store.write_relaxed(batch) {
                Ok(()) => return Ok(Ok(())),
                Err(StoreError::Conflict { .. } | StoreError::Contention) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(StoreError::Contention.into())
    }

    /// Forgets the buckets in the store that are full again (a full bucket is the default);
    /// one node does it for all.
    pub fn prune(&self) -> Result<()> {
        let Buckets::Shared(store) = &self.buckets else { return Ok(()) };
        let now_ms = limbic_core::now_ms();
        let mut batch = store.batch();
        for entry in store.scan_prefix(tables::RATE_BUCKETS, Vec::new(), false) {
            let (key, value) = entry?;
            if Bucket::stored_full_at_ms(&value) <= now_ms {
                // Not if it was used meanwhile.
                batch.expect(tables::RATE_BUCKETS, &key, Some(&value));
                batch.delete(tables::RATE_BUCKETS, &key);
                if let Err(error) = store.write_relaxed(std::mem::take(&mut batch)) {
                    if !matches!(error, StoreError::Conflict { .. } | StoreError::Contention) {
                        return Err(error.into());
                    }
                }
            }
        }
        Ok(())
    }
}

/// The client's address: the direct peer's, or, when the peer is one of the `trusted` proxies,
/// the rightmost `X-Forwarded-For` hop that is not itself a trusted proxy. Hops left of it are
/// the client's own say and never believed; an unreadable hop ends the walk at the proxy
/// that passed it on.
pub fn client_address(peer: Option<IpAddr>, headers: &http::HeaderMap, trusted: &[Network]) -> Option<IpAddr> {
    let mut client = peer?.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|network| network.contains(ip));
    let values: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
    'walk: for value in values.into_iter().rev() {
        let Ok(value) = value.to_str() else { break };
        for hop in value.split(',').rev() {
            if !is_trusted(client) {
                break 'walk;
            }
            match parse_hop(hop.trim()) {
                Some(ip) => client = ip.to_canonical(),
                None => break 'walk,
            }
        }
    }
    Some(client)
}

/// An `X-Forwarded-For` hop: an address, possibly with a port (`1.2.3.4:80`, `[::1]:80`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by(subject: &str, address: &str) -> RateKeys {
        RateKeys { subject: Some(subject.to_owned()), address: Some(address.parse().unwrap()) }
    }

    #[test]
    fn burst_then_refill() {
        let mut config = RateLimitsConfig::default();
        config.login = RateLimit { per_second: 1.0, burst: 2 };
        let limiter = RateLimiter::new(&config);
        let t0 = limbic_core::now_ms();
        let ip = RateKeys { subject: None, address: Some("1.2.3.4".parse().unwrap()) };
        assert!(limiter.check_at(Action::Login, &ip, t0).is_ok());
        assert!(limiter.check_at(Action::Login, &ip, t0).is_ok());
        match limiter.check_at(Action::Login, &ip, t0) {
            Err(Error::LimitExceeded { retry_after_ms }) => assert!(retry_after_ms > 0 && retry_after_ms <= 1000),
            other => panic!("expected a limit, got {other:?}"),
        }
        // Another key has its own bucket; time refills.
        let other = RateKeys { subject: None, address: Some("5.6.7.8".parse().unwrap()) };
        assert!(limiter.check_at(Action::Login, &other, t0).is_ok());
        assert!(limiter.check_at(Action::Login, &ip, t0 + 1100).is_ok());
    }

    #[test]
    fn account_and_address_are_both_limited() {
        let mut config = RateLimitsConfig::default();
        config.message = RateLimit { per_second: 0.001, burst: 2 };
        let limiter = RateLimiter::new(&config);
        let t0 = limbic_core::now_ms();
        // Two accounts from one address share the address's bucket.
        assert!(limiter.check_at(Action::Message, &by("@a:x", "10.0.0.1"), t0).is_ok());
        assert!(limiter.check_at(Action::Message, &by("@b:x", "10.0.0.1"), t0).is_ok());
        assert!(limiter.check_at(Action::Message, &by("@c:x", "10.0.0.1"), t0).is_err());
        // One account from many addresses shares the account's bucket; a refused request
        // takes nothing from the address it came from.
        assert!(limiter.check_at(Action::Message, &by("@a:x", "10.0.0.2"), t0).is_ok());
        assert!(limiter.check_at(Action::Message, &by("@a:x", "10.0.0.3"), t0).is_err());
        assert!(limiter.check_at(Action::Message, &by("@d:x", "10.0.0.3"), t0).is_ok());
        assert!(limiter.check_at(Action::Message, &by("@e:x", "10.0.0.3"), t0).is_ok());
    }

    #[test]
    fn refunds_make_only_failures_count() {
        let mut config = RateLimitsConfig::default();
        config.reauth = RateLimit { per_second: 0.001, burst: 1 };
        let limiter = RateLimiter::new(&config);
        let keys = by("@a:x", "10.0.0.1");
        for _ in 0..5 {
            limiter.check(Action::Reauth, &keys).unwrap();
            limiter.refund(Action::Reauth, &keys);
        }
        limiter.check(Action::Reauth, &keys).unwrap();
        assert!(limiter.check(Action::Reauth, &keys).is_err());
    }

    #[test]
    fn disabled_never_limits() {
        let mut config = RateLimitsConfig::default();
        config.enabled = false;
        let limiter = RateLimiter::new(&config);
        for _ in 0..1000 {
            assert!(limiter.check(Action::Registration, &RateKeys::default()).is_ok());
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<Network> = vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()];
        let headers = |values: &[&str]| {
            let mut map = http::HeaderMap::new();
            for value in values {
                map.append("x-forwarded-for", value.parse().unwrap());
            }
            map
        };
        let peer = |ip: &str| Some(ip.parse::<IpAddr>().unwrap());
        let ip = |ip: &str| Some(ip.parse::<IpAddr>().unwrap());
        // An untrusted peer's header is ignored.
        assert_eq!(client_address(peer("203.0.113.9"), &headers(&["1.1.1.1"]), &trusted), ip("203.0.113.9"));
        // From a trusted proxy: the rightmost hop that is not a trusted proxy, whatever the
        // client put to its left.
        assert_eq!(client_address(peer("10.0.0.1"), &headers(&["6.6.6.6, 198.51.100.7, 10.0.0.2"]), &trusted), ip("198.51.100.7"));
        assert_eq!(client_address(peer("10.0.0.1"), &headers(&["6.6.6.6", "198.51.100.7:4711"]), &trusted), ip("198.51.100.7"));
        assert_eq!(client_address(peer("::1"), &headers(&["[2001:db8::1]:80"]), &trusted), ip("2001:db8::1"));
        // A trusted proxy without the header, or with garbage in it, is the client.
        assert_eq!(client_address(peer("10.0.0.1"), &headers(&[]), &trusted), ip("10.0.0.1"));
        assert_eq!(client_address(peer("10.0.0.1"), &headers(&["1.1.1.1, nonsense"]), &trusted), ip("10.0.0.1"));
        // Nothing is trusted by default.
        assert_eq!(client_address(peer("127.0.0.1"), &headers(&["1.1.1.1"]), &[]), ip("127.0.0.1"));
        // IPv4-mapped IPv6 peers count as their IPv4 address.
        assert_eq!(client_address(peer("::ffff:10.0.0.1"), &headers(&["1.1.1.1"]), &trusted), ip("1.1.1.1"));
    }
}

#[cfg(test)]
mod shared_tests {
    use super::*;

    #[test]
    fn nodes_sharing_a_database_share_the_limits() {
        let url = limbic_test_postgres::TempPostgres::shared().new_database("rate_limits");
        let mut config = RateLimitsConfig::default();
        config.login = RateLimit { per_second: 0.001, burst: 6 };
        config.reauth = RateLimit { per_second: 0.001, burst: 1 };
        config.search = RateLimit { per_second: 1000.0, burst: 1 };
        let node = |name: &str| RateLimiter::for_store(&config, &Arc::new(Store::open_node(&url, 4, name, true).unwrap()));
        let (a, b) = (Arc::new(node("a")), Arc::new(node("b")));
        let keys = RateKeys { subject: Some("@ana:x".into()), address: Some("10.0.0.1".parse().unwrap()) };

        // Twelve attempts at once through two nodes: six get through, never more.
        let passed = std::thread::scope(|scope| {
            let attempts: Vec<_> = (0..12).map(|i| {
                let (limiter, keys) = (if i % 2 == 0 { a.clone() } else { b.clone() }, keys.clone());
                scope.spawn(move || {
                    // A check refused for contention is tried again, as a client told to wait would.
                    loop {
                        match limiter.check(Action::Login, &keys) {
                            Ok(()) => return true,
                            Err(Error::LimitExceeded { retry_after_ms }) if retry_after_ms == CONTENDED_RETRY_MS => continue,
                            Err(_) => return false,
                        }
                    }
                })
            }).collect();
            attempts.into_iter().map(|attempt| attempt.join().unwrap()).filter(|passed| *passed).count()
        });
        assert_eq!(passed, 6);
        assert!(matches!(b.check(Action::Login, &keys), Err(Error::LimitExceeded { .. })));

        // A refund through one node gives the token back for both.
        a.check(Action::Reauth, &keys).unwrap();
        b.refund(Action::Reauth, &keys);
        a.check(Action::Reauth, &keys).unwrap();
        assert!(b.check(Action::Reauth, &keys).is_err());

        // Pruning forgets the buckets that are full again, and only those.
        b.check(Action::Search, &keys).unwrap();
        let Buckets::Shared(store) = &a.buckets else { panic!("shared buckets") };
        let stored = || store.scan_prefix(tables::RATE_BUCKETS, Vec::new(), false).count();
        assert_eq!(stored(), 6, "login, reauth and search, each by account and by address");
        std::thread::sleep(std::time::Duration::from_millis(20));
        a.prune().unwrap();
        assert_eq!(stored(), 4, "the search buckets were full again");
        assert!(b.check(Action::Login, &keys).is_err());
    }
}
