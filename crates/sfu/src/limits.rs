//! What one participant may use of the SFU, and the token bucket that meters it.

use super::*;

/// What one participant may use of the SFU: a call's participants, and each one's tracks, data
/// channels and data packets.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub participants_per_call: usize,
    pub tracks_per_participant: usize,
    pub data_channels: usize,
    pub data_packet_bytes: usize,
    /// In bytes, each packet counting at least `data_packet_min_cost`.
    pub data_rate: Rate,
    /// What a data packet counts for at least: relaying a packet costs about as much whatever
    /// its size, so tiny ones must not come by the thousand.
    pub data_packet_min_cost: usize,
}

/// A sustained rate per second, and the burst allowed above it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

/// A token bucket: `per_second` tokens a second, holding at most `burst`.
pub struct Bucket {
    limit: Rate,
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    pub fn new(limit: Rate, now: Instant) -> Self {
        Self { limit, tokens: f64::from(limit.burst), updated: now }
    }

    /// Takes `cost` tokens, if there are that many.
    pub fn take(&mut self, cost: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.per_second).min(f64::from(self.limit.burst));
        self.updated = now;
        if self.tokens < cost {
            return false;
        }
        self.tokens -= cost;
        true
    }
}
