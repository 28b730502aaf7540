//! Dynacast: publishers are told which simulcast layers somebody watches (LiveKit's
//! `SubscribedQualityUpdate`), so that their SDKs stop encoding and sending the others; and
//! whether anybody watches a single-layer video at all.

use super::*;

/// How long a layer must have gone unwatched before its publisher is told to pause it, so that
/// a subscriber flicking between qualities (a tile resized, a page scrolled) does not make the
/// publisher's encoder stop and start. A layer wanted again is resumed at once.
pub(crate) const PAUSE_DELAY: Duration = Duration::from_secs(3);

/// What a simulcast track's publisher was last told to send, and since when fewer layers
/// would do.
#[derive(Debug)]
pub(crate) struct Dynacast {
    /// The best layer the publisher sends (`None`: none at all). Publishers start with all.
    sent: Option<i32>,
    fewer_since: Option<Instant>,
}

impl Default for Dynacast {
    fn default() -> Self {
        Self { sent: Some(lk::VideoQuality::High as i32), fewer_since: None }
    }
}

impl Dynacast {
    /// Given the best layer anyone watches now, the best layer the publisher is to be told to
    /// send, if that changes.
    pub(crate) fn steer(&mut self, now: Instant, needed: Option<i32>) -> Option<Option<i32>> {
        if needed >= self.sent {
            self.fewer_since = None;
            if needed == self.sent {
                return None;
            }
        } else if now.duration_since(*self.fewer_since.get_or_insert(now)) < PAUSE_DELAY {
            return None;
        }
        self.fewer_since = None;
        self.sent = needed;
        Some(needed)
    }
}

/// The update telling a publisher to send the layers up to `best`, for SDKs that read
/// per-codec qualities and for those that read the older list (deprecated, still read).
#[allow(deprecated)]
fn quality_update(track_sid: &str, best: Option<i32>) -> lk::SubscribedQualityUpdate {
    let qualities: Vec<lk::SubscribedQuality> = LAYERS.iter().map(|(_, quality, _)| lk::SubscribedQuality { quality: *quality, enabled: best.is_some_and(|best| *quality <= best) }).collect();
    lk::SubscribedQualityUpdate {
        track_sid: track_sid.to_owned(),
        subscribed_codecs: vec![lk::SubscribedCodec { codec: "vp8".to_owned(), qualities: qualities.clone() }],
        subscribed_qualities: qualities,
    }
}

impl Sfu {
    /// Works out, for each video track, the best layer anyone in its room watches (a
    /// recording watches the best), and tells its publisher when that changes. A video without
    /// simulcast is one layer, watched or not: SDKs take its single encoding (it has no `rid`)
    /// for the low layer, so the update enabling every layer sends it and the one enabling none
    /// pauses it.
    #[allow(deprecated)] // `TrackInfo.simulcast`: what clients announce and read.
    pub(crate) fn steer_publishers(&mut self, now: Instant) {
        let mut needed: HashMap<(ParticipantId, String), i32> = HashMap::new();
        for participant in self.participants.values() {
            for down in participant.down.iter().filter(|d| d.kind == MediaKind::Video && d.layers.wanted != lk::VideoQuality::Off as i32) {
                let best = needed.entry((down.publisher, down.track_sid.clone())).or_insert(down.layers.wanted);
                *best = (*best).max(down.layers.wanted);
            }
        }
        let mut updates = Vec::new();
        for (id, participant) in &mut self.participants {
            let recorded = self.recordings.contains_key(&participant.room);
            for track in participant.tracks.iter_mut().filter(|t| t.mid.is_some() && kind_of(&t.info) == MediaKind::Video) {
                let best = Some(lk::VideoQuality::High as i32);
                let watched = if recorded { best } else { needed.get(&(*id, track.info.sid.clone())).copied() };
                let watched = if track.info.simulcast { watched } else { watched.and(best) };
                if let Some(best) = track.dynacast.steer(now, watched) {
                    tracing::debug!(participant = id, track = %track.info.sid, ?best, "dynacast: the publisher's layers change");
                    updates.push((*id, quality_update(&track.info.sid, best)));
                }
            }
        }
        for (id, update) in updates {
            self.signals.push_back((id, response(lk::signal_response::Message::SubscribedQualityUpdate(update))));
        }
    }
}

#[cfg(test)]
#[allow(deprecated)]
mod tests {
    use super::*;

    const LOW: Option<i32> = Some(lk::VideoQuality::Low as i32);
    const HIGH: Option<i32> = Some(lk::VideoQuality::High as i32);

    #[test]
    fn fewer_layers_wait_for_the_pause_delay_and_more_come_at_once() {
        let start = Instant::now();
        let mut dynacast = Dynacast::default();
        assert_eq!(dynacast.steer(start, HIGH), None, "publishers start with every layer");
        assert_eq!(dynacast.steer(start, LOW), None);
        assert_eq!(dynacast.steer(start + PAUSE_DELAY / 2, LOW), None);
        assert_eq!(dynacast.steer(start + PAUSE_DELAY, LOW), Some(LOW));
        assert_eq!(dynacast.steer(start + PAUSE_DELAY, HIGH), Some(HIGH), "a layer wanted again comes back at once");
        // A brief dip restarts the delay.
        let later = start + PAUSE_DELAY * 2;
        assert_eq!(dynacast.steer(later, None), None);
        assert_eq!(dynacast.steer(later + PAUSE_DELAY / 2, HIGH), None);
        assert_eq!(dynacast.steer(later + PAUSE_DELAY, None), None, "the dip before does not count");
        assert_eq!(dynacast.steer(later + PAUSE_DELAY * 2, None), Some(None));
    }

    #[test]
    fn the_update_enables_the_layers_up_to_the_best_watched() {
        let update = quality_update("TR_x", Some(lk::VideoQuality::Medium as i32));
        let enabled: Vec<bool> = update.subscribed_qualities.iter().map(|q| q.enabled).collect();
        assert_eq!(enabled, [true, true, false]);
        assert_eq!(update.subscribed_codecs[0].qualities, update.subscribed_qualities);
        assert!(quality_update("TR_x", None).subscribed_qualities.iter().all(|q| !q.enabled));
    }
}
