//! Connection quality (LiveKit's `connection_quality`): how well each participant's media gets
//! through, from their connections' packet loss and round-trip time, told to everyone in the
//! call every few seconds.

use super::*;

/// How often everyone is told everyone's connection quality.
pub(crate) const QUALITY_INTERVAL: Duration = Duration::from_secs(5);
/// How often a connection's statistics are gathered.
pub(crate) const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// The latest figures of a participant's two connections.
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// The fraction of the media they send that does not reach us (publisher connection).
    pub(crate) loss_in: f32,
    /// The fraction of the media we send them that does not reach them (subscriber connection):
    /// by transport-wide feedback when str0m has it, else the worst of their receiver reports
    /// (RTCP, per stream) in the last statistics interval.
    pub(crate) loss_out: f32,
    pub(crate) rtt: Option<Duration>,
}

impl Link {
    /// A connection's statistics: of the one they publish on (`receives`), the one we send
    /// them media on (`sends`), or of their single connection, both.
    pub(crate) fn update(&mut self, receives: bool, sends: bool, stats: &str0m::stats::PeerStats) {
        if receives {
            self.loss_in = stats.ingress_loss_fraction.unwrap_or(self.loss_in);
        }
        if sends {
            // A new interval: the streams' reports for it follow (str0m emits a connection's
            // statistics before its streams', in one tick).
            self.loss_out = stats.egress_loss_fraction.unwrap_or(0.0);
        }
        self.rtt = stats.rtt.or(self.rtt);
    }

    /// A stream of the subscriber connection: the fraction lost its receiver reports gave in
    /// this statistics interval, if they came.
    pub(crate) fn reported_by_subscriber(&mut self, loss: Option<f32>) {
        if let Some(loss) = loss {
            self.loss_out = self.loss_out.max(loss);
        }
    }

    /// A mean opinion score from 1 (bad) to 4.5 (the best a call gets), by the E-model
    /// (ITU-T G.107) as VoIP monitors simplify it: delay and loss impair the rating R.
    pub(crate) fn score(&self) -> f32 {
        let loss = self.loss_in.max(self.loss_out).clamp(0.0, 1.0) * 100.0;
        // One-way delay, with 10 ms for the codec.
        let latency = self.rtt.map_or(0.0, |rtt| rtt.as_secs_f32() * 1000.0 / 2.0) + 10.0;
        let delay_impairment = if latency < 160.0 { latency / 40.0 } else { (latency - 120.0) / 10.0 };
        let r = (93.2 - delay_impairment - 2.5 * loss).clamp(0.0, 100.0);
        (1.0 + 0.035 * r + 0.000_007 * r * (r - 60.0) * (100.0 - r)).clamp(1.0, 4.5)
    }
}

/// LiveKit's rating of a score: excellent from 4.1, good from 3.6, else poor (with a short
/// round trip: under about 4 % lost, under about 8 %, more).
pub(crate) fn rating(score: f32) -> lk::ConnectionQuality {
    if score >= 4.1 {
        lk::ConnectionQuality::Excellent
    } else if score >= 3.6 {
        lk::ConnectionQuality::Good
    } else {
        lk::ConnectionQuality::Poor
    }
}

impl Sfu {
    /// Tells everyone in each SFU room the connection quality of everyone there they can see
    /// (themselves included); a participant out of reach is lost, to themselves only.
    pub(crate) fn announce_quality(&mut self) {
        let mut rooms: HashMap<&str, Vec<lk::ConnectionQualityInfo>> = HashMap::new();
        for participant in self.participants.values().filter(|p| p.unreachable_since.is_none()) {
            let score = participant.link.score();
            let info = lk::ConnectionQualityInfo { participant_sid: participant.info.sid.clone(), quality: rating(score) as i32, score };
            rooms.entry(participant.room.as_str()).or_default().push(info);
        }
        let mut messages = Vec::new();
        for (id, participant) in &self.participants {
            let updates = match participant.unreachable_since {
                None => rooms.get(participant.room.as_str()).cloned().unwrap_or_default(),
                Some(_) => vec![lk::ConnectionQualityInfo { participant_sid: participant.info.sid.clone(), quality: lk::ConnectionQuality::Lost as i32, score: 0.0 }],
            };
            messages.push((*id, response(lk::signal_response::Message::ConnectionQuality(lk::ConnectionQualityUpdate { updates }))));
        }
        self.signals.extend(messages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(loss: f32, rtt_ms: u64) -> Link {
        Link { loss_in: 0.0, loss_out: loss, rtt: Some(Duration::from_millis(rtt_ms)) }
    }

    #[test]
    fn loss_and_delay_lower_the_rating() {
        assert_eq!(rating(Link::default().score()), lk::ConnectionQuality::Excellent);
        assert_eq!(rating(link(0.005, 80).score()), lk::ConnectionQuality::Excellent);
        assert_eq!(rating(link(0.05, 80).score()), lk::ConnectionQuality::Good);
        assert_eq!(rating(link(0.10, 80).score()), lk::ConnectionQuality::Poor);
        assert_eq!(rating(link(0.0, 800).score()), lk::ConnectionQuality::Poor, "a 400 ms one-way delay");
        let incoming = Link { loss_in: 0.2, ..Link::default() };
        assert_eq!(rating(incoming.score()), lk::ConnectionQuality::Poor, "what they send counts as much");
        assert!(link(1.0, 5000).score() >= 1.0 && Link::default().score() <= 4.5);
    }
}
