//! Token-bucket rate limits per user (or per IP when unauthenticated) and action.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::Instant,
};

use crate::{
    config::{RateLimit, RateLimitsConfig},
    error::{Error, Result},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Message,
    Registration,
    Login,
    CreateRoom,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter {
    config: RateLimitsConfig,
    buckets: Mutex<HashMap<(Action, String), Bucket>>,
}

impl RateLimiter {
    pub fn new(config: &RateLimitsConfig) -> Self {
        Self { config: config.clone(), buckets: Mutex::default() }
    }

    fn limit(&self, action: Action) -> RateLimit {
        match action {
            Action::Message => self.config.message,
            Action::Registration => self.config.registration,
            Action::Login => self.config.login,
            Action::CreateRoom => self.config.create_room,
        }
    }

    /// Takes one token for `who` (a user id or an IP), or answers M_LIMIT_EXCEEDED.
    pub fn check(&self, action: Action, who: &str) -> Result<()> {
        self.check_at(action, who, Instant::now())
    }

    fn check_at(&self, action: Action, who: &str, now: Instant) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let limit = self.limit(action);
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() > 100_000 {
            // Forget idle buckets rather than grow without bound; full ones are the default.
            buckets.retain(|_, b| now.duration_since(b.updated).as_secs_f64() * limit.per_second < f64::from(limit.burst));
        }
        let bucket = buckets
            .entry((action, who.to_owned()))
            .or_insert(Bucket { tokens: f64::from(limit.burst), updated: now });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let retry_after_ms = ((1.0 - bucket.tokens) / limit.per_second * 1000.0).ceil() as u64;
            Err(Error::LimitExceeded { retry_after_ms })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_refill() {
        let mut config = RateLimitsConfig::default();
        config.login = RateLimit { per_second: 1.0, burst: 2 };
        let limiter = RateLimiter::new(&config);
        let t0 = Instant::now();
        assert!(limiter.check_at(Action::Login, "1.2.3.4", t0).is_ok());
        assert!(limiter.check_at(Action::Login, "1.2.3.4", t0).is_ok());
        match limiter.check_at(Action::Login, "1.2.3.4", t0) {
            Err(Error::LimitExceeded { retry_after_ms }) => assert!(retry_after_ms > 0 && retry_after_ms <= 1000),
            other => panic!("expected a limit, got {other:?}"),
        }
        // Another key has its own bucket; time refills.
        assert!(limiter.check_at(Action::Login, "5.6.7.8", t0).is_ok());
        assert!(limiter.check_at(Action::Login, "1.2.3.4", t0 + Duration::from_millis(1100)).is_ok());
    }

    #[test]
    fn disabled_never_limits() {
        let mut config = RateLimitsConfig::default();
        config.enabled = false;
        let limiter = RateLimiter::new(&config);
        for _ in 0..1000 {
            assert!(limiter.check(Action::Registration, "x").is_ok());
        }
    }
}
