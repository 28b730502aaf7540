//! Token-bucket rate limits per action, each counted against the request's account (or what
//! an attempt is aimed at) and against its client address, so that neither many accounts from
//! one address nor one account from many addresses gets around a limit.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::Instant,
};

use crate::{
    config::{RateLimit, RateLimitsConfig},
    error::{Error, Result},
    network::Network,
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

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter {
    config: RateLimitsConfig,
    buckets: Mutex<HashMap<(Action, Key), Bucket>>,
}

impl RateLimiter {
    pub fn new(config: &RateLimitsConfig) -> Self {
        Self { config: config.clone(), buckets: Mutex::default() }
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
        self.check_at(action, keys, Instant::now())
    }

    /// Gives back the token an attempt took, for actions where only failures count: taking
    /// before the attempt and refunding success keeps concurrent guesses within the limit.
    pub fn refund(&self, action: Action, keys: &RateKeys) {
        if !self.config.enabled {
            return;
        }
        let burst = f64::from(self.limit(action).burst);
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        for key in keys.keys() {
            if let Some(bucket) = buckets.get_mut(&(action, key)) {
                bucket.tokens = (bucket.tokens + 1.0).min(burst);
            }
        }
    }

    fn check_at(&self, action: Action, keys: &RateKeys, now: Instant) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let limit = self.limit(action);
        let keys = keys.keys();
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() > 100_000 {
            // Forget idle buckets rather than grow without bound; full ones are the default.
            buckets.retain(|(action, _), b| {
                let limit = self.limit(*action);
                now.duration_since(b.updated).as_secs_f64() * limit.per_second < f64::from(limit.burst)
            });
        }
        let mut retry_after_ms = 0;
        for key in &keys {
            let bucket = buckets
                .entry((action, key.clone()))
                .or_insert(Bucket { tokens: f64::from(limit.burst), updated: now });
            let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
            bucket.updated = now;
            if bucket.tokens < 1.0 {
                retry_after_ms = retry_after_ms.max(((1.0 - bucket.tokens) / limit.per_second * 1000.0).ceil() as u64);
            }
        }
        if retry_after_ms > 0 {
            return Err(Error::LimitExceeded { retry_after_ms });
        }
        for key in keys {
            if let Some(bucket) = buckets.get_mut(&(action, key)) {
                bucket.tokens -= 1.0;
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
    use std::time::Duration;

    use super::*;

    fn by(subject: &str, address: &str) -> RateKeys {
        RateKeys { subject: Some(subject.to_owned()), address: Some(address.parse().unwrap()) }
    }

    #[test]
    fn burst_then_refill() {
        let mut config = RateLimitsConfig::default();
        config.login = RateLimit { per_second: 1.0, burst: 2 };
        let limiter = RateLimiter::new(&config);
        let t0 = Instant::now();
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
        assert!(limiter.check_at(Action::Login, &ip, t0 + Duration::from_millis(1100)).is_ok());
    }

    #[test]
    fn account_and_address_are_both_limited() {
        let mut config = RateLimitsConfig::default();
        config.message = RateLimit { per_second: 0.001, burst: 2 };
        let limiter = RateLimiter::new(&config);
        let t0 = Instant::now();
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
