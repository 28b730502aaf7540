//! Media between participants: simulcast layers chosen per subscriber by its wish and its
//! bandwidth estimate, RTP forwarded without transcoding, data packets and keyframe requests
//! relayed, active speakers announced.

use super::*;

/// LiveKit's simulcast layer names, lowest first, and the bitrate assumed for each when the
/// publisher did not say.
pub(crate) const LAYERS: [(&str, i32, u64); 3] = [("q", lk::VideoQuality::Low as i32, 150_000), ("h", lk::VideoQuality::Medium as i32, 500_000), ("f", lk::VideoQuality::High as i32, 1_500_000)];

/// A layer not seen for this long is taken to be paused by the publisher.
pub(crate) const LAYER_TIMEOUT: Duration = Duration::from_secs(1);

/// How long after a subscriber's estimate fell short of the layers it wants its connection
/// first probes for more, and how long at most between later tries.
pub(crate) const RETRY_FIRST: Duration = Duration::from_secs(10);
pub(crate) const RETRY_MOST: Duration = Duration::from_secs(60);

/// When a subscriber's connection next probes for the bitrate it wants, and how long after
/// that try the one after is.
#[derive(Debug)]
pub(crate) struct Retry {
    pub(crate) at: Option<Instant>,
    pub(crate) wait: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self { at: None, wait: RETRY_FIRST }
    }
}

impl Retry {
    /// Whether a try is due (the first, [`RETRY_FIRST`] after this is first asked); if it is,
    /// the next is twice as far off.
    pub(crate) fn due(&mut self, now: Instant) -> bool {
        let at = *self.at.get_or_insert(now + self.wait);
        if now < at {
            return false;
        }
        self.wait = (self.wait * 2).min(RETRY_MOST);
        self.at = Some(now + self.wait);
        true
    }
}

/// How long a subscriber's estimate must hold a better layer before it is switched up to it.
/// A probe through a shaped link can overestimate it for a moment (a token bucket's burst lets
/// the probe's packets through unharmed), and a switch up the link cannot carry stops the
/// picture until the switch back.
pub(crate) const HOLD: Duration = Duration::from_secs(2);

/// After a subscriber fell to a lower layer because its estimate no longer carried its own, the
/// estimate must hold a better layer twice as long before the next switch up, for each fall
/// within [`FALL_MEMORY`] of the one before, up to [`HOLD_MOST`]: an estimate that a probe
/// raised above what a shaped link carries can last longer than [`HOLD`], and each switch up
/// the link cannot carry stops the picture again.
const HOLD_MOST: Duration = Duration::from_secs(16);
const FALL_MEMORY: Duration = Duration::from_secs(30);

/// A subscriber connection's bandwidth estimates (TWCC, bits per second) over the time they
/// must hold ([`HOLD`], longer after falls): the latest to switch down by, the lowest in effect
/// in that time to switch up by.
#[derive(Debug, Default)]
pub(crate) struct Estimate {
    /// When each estimate came, oldest first; the first one was in effect when the window began.
    recent: VecDeque<(Instant, u64)>,
    /// Falls to a lower layer in a row (each within [`FALL_MEMORY`] of the last), and when the
    /// last one was.
    falls: u32,
    last_fall: Option<Instant>,
}

impl Estimate {
    /// Keeps the estimates of the time they must hold now (it is read for every packet
    /// forwarded: the shorter the better).
    pub(crate) fn update(&mut self, now: Instant, estimate: Bitrate) {
        self.recent.push_back((now, estimate.as_u64()));
        let hold = self.hold(now);
        while self.recent.get(1).is_some_and(|(at, _)| now.duration_since(*at) >= hold) {
            self.recent.pop_front();
        }
    }

    /// The subscriber fell to a lower layer for want of bandwidth.
    pub(crate) fn fell(&mut self, now: Instant) {
        if self.last_fall.is_none_or(|at| now.duration_since(at) >= FALL_MEMORY) {
            self.falls = 0;
        }
        self.falls += 1;
        self.last_fall = Some(now);
    }

    /// How long an estimate must have lasted to switch up by.
    fn hold(&self, now: Instant) -> Duration {
        match self.last_fall {
            Some(at) if now.duration_since(at) < FALL_MEMORY => (HOLD * 2u32.pow(self.falls.min(3))).min(HOLD_MOST),
            _ => HOLD,
        }
    }

    pub(crate) fn latest(&self) -> Option<u64> {
        self.recent.back().map(|(_, estimate)| *estimate)
    }

    /// The lowest estimate in effect at some moment of the time it must hold.
    pub(crate) fn held(&self, now: Instant) -> Option<u64> {
        let hold = self.hold(now);
        let replaced_at = self.recent.iter().skip(1).map(|(at, _)| Some(*at)).chain([None]);
        self.recent
            .iter()
            .zip(replaced_at)
            .filter(|(_, replaced)| replaced.is_none_or(|at| now.duration_since(at) < hold))
            .map(|((_, estimate), _)| *estimate)
            .min()
    }
}

/// How long a layer's bitrate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Bandwidth set aside for each audio track a subscriber gets before any goes to video: Opus
/// speech with its packets' headers. A link too thin for the lowest video layer must still
/// carry the voices.
pub(crate) const AUDIO_RESERVE: u64 = 64_000;

/// How long a subscriber's estimate must fall short of a video's lowest layer before the
/// video is paused: a moment's dip does not stop the picture.
pub(crate) const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// The fraction of what the SFU sends a subscriber that must be lost as well before a video is
/// paused. An estimate alone is no proof of a thin link: while the connection carries less than
/// it could (a low layer), the estimate drifts down towards what it carries, and on a link of
/// 400 kbit/s it fell below the lowest layer's 150 kbit/s with nothing lost.
pub(crate) const PAUSE_LOSS: f32 = 0.05;

/// Which of a subscriber's videos `budget` carries at their lowest layers, given their
/// bitrates in the order they are served: each in turn gets its bitrate from what is left, if
/// that is enough.
pub(crate) fn carried(lowest: &[u64], budget: u64) -> Vec<bool> {
    let mut left = budget;
    lowest
        .iter()
        .map(|rate| {
            let fits = *rate <= left;
            if fits {
                left -= rate;
            }
            fits
        })
        .collect()
}

/// A video a subscriber gets, as pausing sees it: its lowest layer's bitrate, whether it is
/// paused, and since when the estimate has fallen short of it.
#[derive(Clone, Copy)]
pub(crate) struct Served {
    pub(crate) lowest: u64,
    pub(crate) paused: bool,
    pub(crate) short_since: Option<Instant>,
}

/// What becomes of a subscriber's videos, given in the order they are served, by its `latest`
/// estimate, the one `held` over the hold time, the audio tracks it gets and whether its
/// receiver reports losses: for each, whether the latest estimate falls short of it, and
/// whether it is to be paused (true) or resumed (false) now.
pub(crate) fn pausing(videos: &[Served], now: Instant, latest: u64, held: u64, audio_tracks: u64, losing: bool) -> Vec<(bool, Option<bool>)> {
    let reserve = audio_tracks * AUDIO_RESERVE;
    let lowest: Vec<u64> = videos.iter().map(|video| video.lowest).collect();
    let with_spare: Vec<u64> = lowest.iter().map(|rate| rate * 6 / 5).collect();
    let carried_now = carried(&lowest, latest.saturating_sub(reserve));
    let carried_held = carried(&with_spare, held.saturating_sub(reserve));
    videos
        .iter()
        .enumerate()
        .map(|(n, video)| {
            let short_long_enough = video.short_since.is_some_and(|since| now.duration_since(since) >= PAUSE_AFTER);
            let change = match video.paused {
                false if !carried_now[n] && short_long_enough && losing => Some(true),
                true if carried_held[n] => Some(false),
                _ => None,
            };
            (!carried_now[n], change)
        })
        .collect()
}

/// A simulcast layer as it arrives: when last, and its measured bitrate.
#[derive(Debug)]
pub(crate) struct Layer {
    last_seen: Instant,
    window_start: Instant,
    window_bytes: u64,
    /// Bits per second, smoothed over the windows measured so far.
    rate: Option<u64>,
}

impl Layer {
    fn new(now: Instant) -> Self {
        Self { last_seen: now, window_start: now, window_bytes: 0, rate: None }
    }

    /// A packet of the layer arrived. A layer back from a pause starts a new window.
    pub(crate) fn arrived(&mut self, now: Instant, bytes: usize) {
        if now.duration_since(self.last_seen) >= LAYER_TIMEOUT {
            (self.window_start, self.window_bytes) = (now, 0);
        }
        self.last_seen = now;
        self.window_bytes += bytes as u64;
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= RATE_WINDOW {
            let measured = (self.window_bytes as f64 * 8.0 / elapsed.as_secs_f64()) as u64;
            self.rate = Some(self.rate.map_or(measured, |rate| (rate + measured) / 2));
            (self.window_start, self.window_bytes) = (now, 0);
        }
    }

    fn arriving(&self, now: Instant) -> bool {
        now.duration_since(self.last_seen) < LAYER_TIMEOUT
    }
}

/// Notes a packet of a simulcast layer.
pub(crate) fn layer_arrived(published: &mut Published, rid: Rid, now: Instant, bytes: usize) {
    published.layers.entry(rid).or_insert_with(|| Layer::new(now)).arrived(now, bytes);
}

/// The simulcast layers of a track that arrive, lowest first, with their bitrates: as
/// measured, else as the publisher announced them (its encoder's ceiling, often well above
/// what it sends), else LiveKit's defaults.
// `TrackInfo.layers` is deprecated for per-codec layers, but it is what clients announce and read.
#[allow(deprecated)]
pub(crate) fn usable_layers(published: &Published, now: Instant) -> Vec<(Rid, i32, u64)> {
    let announced = |quality: i32, default: u64| published.info.layers.iter().find(|l| l.quality == quality && l.bitrate > 0).map_or(default, |l| u64::from(l.bitrate));
    LAYERS
        .iter()
        .filter_map(|(name, quality, default)| {
            let layer = published.layers.get(&Rid::from(*name)).filter(|layer| layer.arriving(now))?;
            Some((Rid::from(*name), *quality, layer.rate.unwrap_or_else(|| announced(*quality, *default))))
        })
        .collect()
}

/// The layer to forward to a subscriber who wants `wanted` and has `budget` bits per second
/// for it: the best usable layer at most that good which fits, else the lowest.
pub(crate) fn layer_for(usable: &[(Rid, i32, u64)], wanted: i32, budget: Option<u64>) -> Option<Rid> {
    usable
        .iter()
        .rev()
        .find(|(_, quality, bitrate)| *quality <= wanted && budget.is_none_or(|budget| *bitrate <= budget))
        .or(usable.first())
        .map(|(rid, _, _)| *rid)
}

/// The layer to forward to a subscriber now on `current`: as [`layer_for`] by the latest
/// `budget`, but a better layer only once the budget `held` over the last [`HOLD`] holds it
/// with a fifth to spare. An estimate hovering about a layer's bitrate would otherwise switch
/// the subscriber up and down, each switch waiting for a keyframe.
pub(crate) fn layer_from(usable: &[(Rid, i32, u64)], wanted: i32, budget: Option<u64>, held: Option<u64>, current: Option<Rid>) -> Option<Rid> {
    let target = layer_for(usable, wanted, budget)?;
    let quality = |rid: Rid| usable.iter().find(|(layer, _, _)| *layer == rid).map(|(_, quality, _)| *quality);
    match current.and_then(quality) {
        Some(now) if quality(target) > Some(now) => layer_for(usable, wanted, held.map(|held| held * 5 / 6)).filter(|up| quality(*up) > Some(now)).or(current),
        _ => Some(target),
    }
}

impl Sfu {
    /// Each subscriber connection probes for the bitrate of the layers its subscriber wants
    /// (TWCC), so that the estimate can grow to allow them. An estimate grows only a little past
    /// what the connection carries: after a while on a low layer it has fallen to about that
    /// layer's rate, and probing up from there takes many seconds. So the estimator starts again
    /// from the estimate it has, as a new connection's does, and probes at three and six times
    /// that (str0m's initial probes, at most twice the bitrate wanted), when a subscriber comes
    /// to want a better layer than it gets (it asks for one, or one comes back), and, while its
    /// estimate holds one back, now and then: [`RETRY_FIRST`] after it fell short, then twice
    /// as long after each try that fell short again, up to [`RETRY_MOST`]. The layer changes
    /// only once a probe has raised the estimate. Starting again from the bitrate wanted, as
    /// this did before, switched the subscriber a layer up whether or not the link could carry
    /// it, and on a limited link its picture stopped until the switch back; trying on every
    /// change of a layer's measured rate kept one on a limited link switching twice a second.
    pub(crate) fn steer_bandwidth_estimates(&mut self, now: Instant) {
        // Per subscriber: the bitrate of the layers it wants, whether its estimate holds one of
        // them back, and whether one of them got better.
        let mut wanted: HashMap<ParticipantId, (u64, bool, bool)> = HashMap::new();
        let mut best_layers = Vec::new();
        for (id, participant) in &self.participants {
            for (index, down) in participant.down.iter().enumerate().filter(|(_, d)| d.kind == MediaKind::Video && matches!(d.state, DownState::Open(_))) {
                let Some(track) = self.participants.get(&down.publisher).and_then(|p| p.tracks.iter().find(|t| t.info.sid == down.track_sid)) else { continue };
                let layers = usable_layers(track, now);
                let best = layers.iter().rev().find(|(_, quality, _)| *quality <= down.layers.wanted).or(layers.first());
                let (rate, held_back) = best.map_or((0, false), |(rid, _, rate)| (*rate, down.layers.paused || down.layers.current.is_some_and(|current| current != *rid)));
                let quality = best.map(|(_, quality, _)| *quality);
                let entry = wanted.entry(*id).or_default();
                entry.0 += rate;
                entry.1 |= held_back;
                entry.2 |= quality > down.layers.best;
                best_layers.push((*id, index, quality));
            }
        }
        for (id, index, quality) in best_layers {
            if let Some(down) = self.participants.get_mut(&id).and_then(|p| p.down.get_mut(index)) {
                down.layers.best = quality;
            }
        }
        for (id, (rate, held_back, better)) in wanted {
            let Some(participant) = self.participants.get_mut(&id) else { continue };
            if rate == 0 {
                continue;
            }
            if !held_back {
                participant.retry = Retry::default();
            }
            let estimate = participant.estimate.latest();
            let short = held_back && estimate.is_some_and(|estimate| estimate < rate);
            let again = short && (better || participant.retry.due(now));
            if short && better {
                participant.retry = Retry { at: Some(now + RETRY_FIRST), wait: RETRY_FIRST };
            }
            let mut bwe = participant.rtc(Pc::Subscriber).bwe();
            if again && let Some(estimate) = estimate {
                tracing::debug!(participant = id, estimate, wanted = rate, "the subscriber wants more than its estimate: probing from it");
                bwe.reset(Bitrate::bps(estimate));
            }
            bwe.set_bitrate(Bitrate::kbps(100), Bitrate::bps(rate));
            self.dirty.insert((id, Pc::Subscriber));
        }
    }

    /// Pauses a subscriber's videos that its bandwidth does not carry even at their lowest
    /// layer, once its estimate has fallen short for [`PAUSE_AFTER`] and at least
    /// [`PAUSE_LOSS`] of what it is sent is lost, so that what it has goes
    /// to its audio ([`AUDIO_RESERVE`] each) and to the videos it does carry (screen shares
    /// first, then in the order subscribed); and resumes one once the estimate held over the
    /// last [`HOLD`] (longer after falls) carries its lowest layer with a fifth to spare. The
    /// subscriber is told with LiveKit's `stream_state_update` (`PAUSED`, `ACTIVE`); a resumed
    /// video starts again at a keyframe. Only simulcast videos, whose layers' bitrates are
    /// measured, are paused.
    pub(crate) fn pause_what_bandwidth_does_not_carry(&mut self, now: Instant) {
        // Per video down-track: whether the latest estimate falls short of it, and whether it
        // is to be paused (true) or resumed (false) now.
        let mut decided: Vec<(ParticipantId, usize, bool, Option<bool>)> = Vec::new();
        for (id, participant) in &self.participants {
            let Some(latest) = participant.estimate.latest() else { continue };
            let held = participant.estimate.held(now).unwrap_or(latest);
            let open = |d: &DownTrack| matches!(d.state, DownState::Open(_));
            let audio = participant.down.iter().filter(|d| open(d) && d.kind == MediaKind::Audio).count() as u64;
            let mut videos: Vec<(usize, bool, Served)> = Vec::new();
            for (index, down) in participant.down.iter().enumerate() {
                if down.kind != MediaKind::Video || !open(down) || down.layers.wanted == lk::VideoQuality::Off as i32 {
                    continue;
                }
                let Some(track) = self.participants.get(&down.publisher).and_then(|p| p.tracks.iter().find(|t| t.info.sid == down.track_sid)) else { continue };
                if let Some((_, _, lowest)) = usable_layers(track, now).first() {
                    let screen = track.info.source == lk::TrackSource::ScreenShare as i32;
                    videos.push((index, screen, Served { lowest: *lowest, paused: down.layers.paused, short_since: down.layers.short_since }));
                }
            }
            videos.sort_by_key(|(index, screen, _)| (!screen, *index));
            let served: Vec<Served> = videos.iter().map(|(_, _, video)| *video).collect();
            let outcome = pausing(&served, now, latest, held, audio, participant.link.loss_out >= PAUSE_LOSS);
            decided.extend(videos.iter().zip(outcome).map(|((index, _, _), (short, change))| (*id, *index, short, change)));
        }
        for (id, index, short, change) in decided {
            let Some(participant) = self.participants.get_mut(&id) else { continue };
            let Some(down) = participant.down.get_mut(index) else { continue };
            down.layers.short_since = if short { down.layers.short_since.or(Some(now)) } else { None };
            let Some(paused) = change else { continue };
            down.layers.paused = paused;
            if paused {
                // Back at a keyframe, whichever layer then fits.
                down.rtp.pause();
                down.layers.current = None;
                participant.estimate.fell(now);
            }
            let (publisher, track_sid) = (down.publisher, down.track_sid.clone());
            tracing::debug!(participant = id, track = %track_sid, paused, "a video paused or resumed for the subscriber's bandwidth");
            let Some(publisher_sid) = self.participants.get(&publisher).map(|p| p.info.sid.clone()) else { continue };
            let state = if paused { lk::StreamState::Paused } else { lk::StreamState::Active };
            let info = lk::StreamStateInfo { participant_sid: publisher_sid, track_sid, state: state as i32 };
            self.signals.push_back((id, response(lk::signal_response::Message::StreamStateUpdate(lk::StreamStateUpdate { stream_states: vec![info] }))));
        }
    }

    /// Tells each room who started or stopped speaking (LiveKit's `SpeakersChanged`: the
    /// changes only, loudest first).
    pub(crate) fn announce_speakers(&mut self) {
        let mut now_speaking: HashMap<String, HashMap<String, f32>> = HashMap::new();
        for participant in self.participants.values() {
            let level = participant.tracks.iter().filter(|t| t.mid.is_some() && !t.info.muted && kind_of(&t.info) == MediaKind::Audio).map(|t| t.level).fold(0.0, f32::max);
            if level >= SPEAKING_LEVEL {
                now_speaking.entry(participant.room.clone()).or_default().insert(participant.info.sid.clone(), level);
            }
        }
        let rooms: std::collections::HashSet<String> = self.speaking.keys().chain(now_speaking.keys()).cloned().collect();
        for room in rooms {
            let before = self.speaking.remove(&room).unwrap_or_default();
            let after = now_speaking.remove(&room).unwrap_or_default();
            let mut changes: Vec<lk::SpeakerInfo> = after
                .iter()
                .filter(|(sid, _)| !before.contains_key(*sid))
                .map(|(sid, level)| lk::SpeakerInfo { sid: sid.clone(), level: *level, active: true })
                .chain(before.keys().filter(|sid| !after.contains_key(*sid)).map(|sid| lk::SpeakerInfo { sid: sid.clone(), level: 0.0, active: false }))
                .collect();
            if !changes.is_empty() {
                changes.sort_by(|a, b| b.level.total_cmp(&a.level));
                let message = response(lk::signal_response::Message::SpeakersChanged(lk::SpeakersChanged { speakers: changes }));
                for (id, participant) in &self.participants {
                    if participant.room == room {
                        self.signals.push_back((*id, message.clone()));
                    }
                }
            }
            if !after.is_empty() {
                self.speaking.insert(room, after);
            }
        }
    }

    /// A publisher's media line arrived: it carries the track the client announced with that
    /// track id (else the oldest announced track of its kind), which everyone now learns of.
    /// A publisher stopped a track (its media line no longer carries anything to us): they
    /// get `track_unpublished`, the others an `update` without it, and their subscriber
    /// connections drop its media line.
    pub(crate) fn track_unpublished(&mut self, now: Instant, id: ParticipantId, mid: Mid) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        let Some(index) = participant.tracks.iter().position(|t| t.mid == Some(mid)) else { return };
        let track = participant.tracks.remove(index);
        participant.bump_version();
        let room = participant.room.clone();
        let unpublished = lk::TrackUnpublishedResponse { track_sid: track.info.sid.clone() };
        self.signals.push_back((id, response(lk::signal_response::Message::TrackUnpublished(unpublished))));
        self.broadcast_update(id);
        let mut renegotiate = Vec::new();
        for (other, subscriber) in &mut self.participants {
            if subscriber.room != room {
                continue;
            }
            let stopped: Vec<Mid> = subscriber.down.iter().filter(|d| d.publisher == id && d.track_sid == track.info.sid).filter_map(|d| d.state.mid()).collect();
            subscriber.down.retain(|d| !(d.publisher == id && d.track_sid == track.info.sid));
            renegotiate.push((*other, stopped));
        }
        for (other, mids) in renegotiate {
            self.stop_media(now, other, &mids);
        }
    }

    pub(crate) fn track_arrived(&mut self, id: ParticipantId, mid: Mid, kind: MediaKind) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        let track_id = participant.publisher.media(mid).map(|m| m.track_id().to_owned()).unwrap_or_default();
        let unbound = |t: &Published| t.mid.is_none() && kind_of(&t.info) == kind;
        let index = participant.tracks.iter().position(|t| unbound(t) && t.cid == track_id).or_else(|| participant.tracks.iter().position(unbound));
        let Some(index) = index else {
            tracing::debug!(participant = id, %mid, "media without an announced track");
            return;
        };
        let track = &mut participant.tracks[index];
        track.mid = Some(mid);
        track.info.mid = mid.to_string();
        track.info.mime_type = if kind == MediaKind::Audio { "audio/opus" } else { "video/vp8" }.to_owned();
        let (track_sid, room) = (track.info.sid.clone(), participant.room.clone());
        participant.bump_version();
        self.broadcast_update(id);
        for (other, subscriber) in &mut self.participants {
            if *other != id && subscriber.room == room && subscriber.auto_subscribe && subscriber.rights.subscribe {
                subscriber.down.push(DownTrack::new(id, track_sid.clone(), kind));
                self.to_negotiate.insert(*other);
            }
        }
    }

    /// A packet of a published track, to every participant it is open to; of a simulcast
    /// track, of the layer each subscriber's wish and bandwidth allow. Video starts, and moves
    /// to another layer, at a keyframe.
    pub(crate) fn forward(&mut self, now: Instant, id: ParticipantId, mid: Mid, rid: Option<Rid>, packet: &RtpPacket) {
        // Padding only: the SFU pads its own connections as their estimates need.
        if packet.payload.is_empty() {
            return;
        }
        let Some(publisher) = self.participants.get_mut(&id) else { return };
        let in_pt = packet.header.payload_type;
        let Some(params) = publisher.publisher.codec_config().find(|p| p.pt() == in_pt).copied() else { return };
        let Some(track) = publisher.tracks.iter_mut().find(|t| t.mid == Some(mid)) else { return };
        let video = params.spec().codec.is_video();
        let vp8 = if video { Vp8::parse(&packet.payload) } else { None };
        let incoming = Incoming { ssrc: packet.header.ssrc, seq: *packet.seq_no, time: packet.time.numer(), frequency: packet.time.frequency().get(), arrived: packet.timestamp, vp8 };
        // What the subscriber's decoder needs of the publisher's extensions: how to turn the
        // picture (phones send it unrotated), and how loud the audio is.
        let mut ext_vals = ExtensionValues { video_orientation: packet.header.ext_vals.video_orientation, ..ExtensionValues::default() };
        if let Some(level) = packet.header.ext_vals.audio_level {
            // The extension carries -dBov (0 loudest, -127 silent).
            let linear = 10f32.powf(f32::from(level.min(0)) / 20.0);
            track.level += LEVEL_SMOOTHING * (linear - track.level);
            (ext_vals.audio_level, ext_vals.voice_activity) = (Some(level), packet.header.ext_vals.voice_activity);
        }
        if let Some(rid) = rid {
            layer_arrived(track, rid, now, packet.payload.len());
        }
        if let Some(recording) = self.recordings.get_mut(&publisher.room) {
            record(recording, track, &publisher.app_user, rid, &incoming, packet, now);
        }
        // A new stream starts at any audio packet, at the first packet of a video keyframe.
        let can_start = !video || vp8.is_some_and(|vp8| vp8.starts_keyframe);
        let mut keyframes_wanted: Vec<Option<Rid>> = Vec::new();
        let track_sid = track.info.sid.clone();
        let room = publisher.room.clone();
        let usable = if rid.is_some() { usable_layers(track, now) } else { Vec::new() };
        for (other, subscriber) in &mut self.participants {
            // Media never leaves its room, whatever a subscriber's down tracks say.
            if *other == id || subscriber.room != room {
                continue;
            }
            let video_downs = subscriber.down.iter().filter(|d| d.kind == MediaKind::Video).count().max(1) as u64;
            let budget = subscriber.estimate.latest().map(|estimate| estimate / video_downs);
            let held = subscriber.estimate.held(now).map(|estimate| estimate / video_downs);
            let Some(down) = subscriber.down.iter_mut().find(|d| d.publisher == id && d.track_sid == track_sid) else { continue };
            let DownState::Open(out_mid) = down.state else { continue };
            if down.layers.wanted == lk::VideoQuality::Off as i32 || down.layers.paused {
                continue;
            }
            let target = rid.and_then(|_| layer_from(&usable, down.layers.wanted, budget, held, down.layers.current));
            if down.rtp.source() != Some(incoming.ssrc) {
                if target != rid {
                    continue;
                }
                if !can_start {
                    wants_keyframe(&mut keyframes_wanted, rid);
                    continue;
                }
                // A fall for want of bandwidth (not because less was wanted) makes the next
                // switch up wait longer.
                let quality = |layer: Option<Rid>| usable.iter().find(|(usable, _, _)| Some(*usable) == layer).map(|(_, quality, _)| *quality);
                let best_wanted = layer_for(&usable, down.layers.wanted, None);
                if quality(rid) < quality(down.layers.current) && quality(rid) < quality(best_wanted) {
                    subscriber.estimate.fell(now);
                }
                down.rtp.switch_to(&incoming);
                down.layers.current = rid;
            } else if target != rid {
                wants_keyframe(&mut keyframes_wanted, target);
            }
            let Some(out) = down.rtp.rewrite(&incoming) else { continue };
            // The connection the down track goes out on (`down` holds the participant's tracks).
            let rtc = subscriber.subscriber.as_mut().unwrap_or(&mut subscriber.publisher);
            let out_pt = match down.pt {
                Some((from, to)) if from == in_pt => to,
                _ => {
                    let Some(to) = rtc.codec_config().match_params(params).map(|p| p.pt()) else { continue };
                    down.pt = Some((in_pt, to));
                    to
                }
            };
            let mut direct = rtc.direct_api();
            let Some(stream) = direct.stream_tx_by_mid(out_mid, None) else { continue };
            let mut write = RtpWrite::new(out_pt, out.seq, out.time, packet.timestamp, packet.payload.clone()).marker(packet.header.marker).ext_vals(ext_vals.clone()).nackable(video);
            if let Some(patch) = out.vp8_patch {
                write = write.vp8_patch(patch);
            }
            stream.write_rtp(write);
            self.dirty.insert((*other, Pc::Subscriber));
        }
        // A subscriber waiting for a keyframe to start on, or for another layer: the publisher is asked.
        if keyframes_wanted.is_empty() {
            return;
        }
        let Some(publisher) = self.participants.get_mut(&id) else { return };
        let Some(track) = publisher.tracks.iter_mut().find(|t| t.mid == Some(mid)) else { return };
        if track.last_keyframe_request.is_none_or(|at| now.duration_since(at) >= KEYFRAME_REQUEST_INTERVAL) {
            track.last_keyframe_request = Some(now);
            for rid in keyframes_wanted {
                request_keyframe(&mut publisher.publisher, mid, rid, KeyframeRequestKind::Pli);
            }
            self.dirty.insert((id, Pc::Publisher));
        }
    }

    /// A LiveKit data packet a participant sent: to the others in the room (those it names, if
    /// it names any), on the subscriber channel of the kind it came on (with a single
    /// connection, on the channel of that label the client opened), marked as theirs. Only
    /// from the channels the participant was let open, within the size and rate limits.
    pub(crate) fn relay_data(&mut self, now: Instant, id: ParticipantId, data: &ChannelData) {
        let Some(sender) = self.participants.get_mut(&id) else { return };
        if !sender.rights.publish {
            return;
        }
        let Some(label) = sender.publisher_channels.get(&data.id) else { return };
        let label = if label == LOSSY { LOSSY } else { RELIABLE };
        let size = data.data.len();
        if size > self.limits.data_packet_bytes || !sender.data_budget.take(size.max(self.limits.data_packet_min_cost) as f64, now) {
            tracing::debug!(participant = id, size, "dropped a data packet over the size or rate limit");
            return;
        }
        let sender = &*sender;
        let Ok(mut packet) = lk::DataPacket::decode(data.data.as_slice()) else { return };
        packet.participant_identity = sender.info.identity.clone();
        #[allow(deprecated)] // still read by clients that predate `participant_identity`
        {
            packet.participant_sid = sender.info.sid.clone();
        }
        let room = sender.room.clone();
        if self.data_rooms.insert(room.clone()) {
            // The room's first data packet: everyone's subscriber connection gets its channels
            // (this packet goes to those who have them already: none).
            let members: Vec<ParticipantId> = self.participants.iter().filter(|(_, p)| p.room == room).map(|(other, _)| *other).collect();
            self.to_negotiate.extend(members);
        }
        let bytes = packet.encode_to_vec();
        for (other, participant) in &mut self.participants {
            if *other == id || participant.room != room || !(packet.destination_identities.is_empty() || packet.destination_identities.contains(&participant.info.identity)) {
                continue;
            }
            let channel = match &participant.subscriber_channels {
                Some(channels) => channels.get(label).copied(),
                None if participant.single() => participant.publisher_channels.iter().find(|(_, opened)| opened.as_str() == label).map(|(channel, _)| *channel),
                None => None,
            };
            let Some(channel) = channel else { continue };
            if let Some(mut channel) = participant.rtc(Pc::Subscriber).channel(channel) {
                let _ = channel.write(true, &bytes);
                self.dirty.insert((*other, Pc::Subscriber));
            }
        }
    }

    /// A subscriber asked for a keyframe of a track it gets: the publisher is asked.
    pub(crate) fn relay_keyframe_request(&mut self, now: Instant, id: ParticipantId, request: &KeyframeRequest) {
        let Some(down) = self.participants.get(&id).and_then(|p| p.down.iter().find(|d| d.state.mid() == Some(request.mid))) else { return };
        let (publisher_id, track_sid, rid) = (down.publisher, down.track_sid.clone(), down.layers.current);
        let Some(publisher) = self.participants.get_mut(&publisher_id) else { return };
        let Some(track) = publisher.tracks.iter_mut().find(|t| t.info.sid == track_sid) else { return };
        let Some(mid) = track.mid else { return };
        if track.last_keyframe_request.is_some_and(|at| now.duration_since(at) < KEYFRAME_REQUEST_INTERVAL) {
            return;
        }
        track.last_keyframe_request = Some(now);
        if request_keyframe(&mut publisher.publisher, mid, rid, request.kind) {
            self.dirty.insert((publisher_id, Pc::Publisher));
        }
    }
}

/// Notes that a keyframe of layer `rid` is wanted, once.
fn wants_keyframe(wanted: &mut Vec<Option<Rid>>, rid: Option<Rid>) {
    if !wanted.contains(&rid) {
        wanted.push(rid);
    }
}

/// Asks a publisher connection for a keyframe of media line `mid` (of its layer `rid`); false
/// if it receives no such stream.
pub(crate) fn request_keyframe(rtc: &mut Rtc, mid: Mid, rid: Option<Rid>, kind: KeyframeRequestKind) -> bool {
    rtc.direct_api().stream_rx_by_mid(mid, rid).map(|stream| stream.request_keyframe(kind)).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_video_is_paused_after_a_second_short_with_losses_and_resumed_with_a_fifth_to_spare() {
        let start = Instant::now();
        let video = |paused, short_since| Served { lowest: 150_000, paused, short_since };
        // 120 kbit/s with one audio track: short of the lowest layer, not paused at once.
        assert_eq!(pausing(&[video(false, None)], start, 120_000, 120_000, 1, true), [(true, None)]);
        let later = start + PAUSE_AFTER;
        assert_eq!(pausing(&[video(false, Some(start))], later, 120_000, 120_000, 1, true), [(true, Some(true))]);
        // Short as long, but nothing lost: the estimate alone does not pause it.
        assert_eq!(pausing(&[video(false, Some(start))], later, 120_000, 120_000, 1, false), [(true, None)]);
        // The audio's share counts: 200 kbit/s leaves 136 for video.
        assert_eq!(pausing(&[video(false, Some(start))], later, 200_000, 200_000, 1, true), [(true, Some(true))]);
        assert_eq!(pausing(&[video(false, Some(start))], later, 200_000, 200_000, 0, true), [(false, None)]);
        // Paused: resumed once the held estimate carries the layer and a fifth more (180 + 64).
        assert_eq!(pausing(&[video(true, Some(start))], later, 400_000, 230_000, 1, false), [(false, None)]);
        assert_eq!(pausing(&[video(true, Some(start))], later, 400_000, 250_000, 1, false), [(false, Some(false))]);
        // Two videos and room for one: the first served keeps it.
        let both = [video(false, Some(start)), video(false, Some(start))];
        assert_eq!(pausing(&both, later, 200_000, 200_000, 0, true), [(false, None), (true, Some(true))]);
    }

    #[test]
    fn each_video_in_turn_gets_its_lowest_layer_from_what_is_left() {
        assert_eq!(carried(&[150_000, 150_000], 400_000), [true, true]);
        assert_eq!(carried(&[150_000, 150_000], 200_000), [true, false]);
        // One too big for what is left does not keep a smaller one after it from fitting.
        assert_eq!(carried(&[150_000, 300_000, 100_000], 260_000), [true, false, true]);
        assert_eq!(carried(&[150_000], 0), [false]);
        assert!(carried(&[], 0).is_empty());
    }

    #[test]
    fn a_better_layer_needs_a_fifth_to_spare_and_a_worse_one_none() {
        let (low, medium, high) = (lk::VideoQuality::Low as i32, lk::VideoQuality::Medium as i32, lk::VideoQuality::High as i32);
        let all = [(Rid::from("q"), low, 150_000), (Rid::from("h"), medium, 430_000), (Rid::from("f"), high, 1_800_000)];
        let pick = |budget: u64, current: &str| layer_from(&all, high, Some(budget), Some(budget), Some(Rid::from(current))).map(|rid| rid.to_string());
        assert_eq!(pick(450_000, "q").as_deref(), Some("q"), "h fits, but only just");
        assert_eq!(pick(520_000, "q").as_deref(), Some("h"));
        assert_eq!(pick(450_000, "h").as_deref(), Some("h"), "staying needs no room to spare");
        assert_eq!(pick(400_000, "h").as_deref(), Some("q"), "down at once");
        assert_eq!(pick(2_200_000, "q").as_deref(), Some("f"), "up by more than one layer");
        assert_eq!(pick(2_000_000, "q").as_deref(), Some("h"), "as far up as the room allows");
        assert_eq!(layer_from(&all, high, Some(450_000), Some(450_000), None).map(|rid| rid.to_string()).as_deref(), Some("h"), "a first layer as layer_for picks it");
        let after_a_probe = |current: &str| layer_from(&all, high, Some(2_200_000), Some(450_000), Some(Rid::from(current))).map(|rid| rid.to_string());
        assert_eq!(after_a_probe("q").as_deref(), Some("q"), "up only by what the estimate held");
        assert_eq!(after_a_probe("h").as_deref(), Some("h"));
        assert_eq!(layer_from(&all, high, Some(300_000), Some(300_000), Some(Rid::from("h"))).map(|rid| rid.to_string()).as_deref(), Some("q"), "down by the latest");
    }

    #[test]
    fn an_estimate_is_held_once_it_has_lasted() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut estimate = Estimate::default();
        assert_eq!((estimate.latest(), estimate.held(start)), (None, None));
        estimate.update(at(0), Bitrate::kbps(400));
        estimate.update(at(500), Bitrate::kbps(2_000)); // a probe's burst
        assert_eq!((estimate.latest(), estimate.held(at(500))), (Some(2_000_000), Some(400_000)));
        assert_eq!(estimate.held(at(2_499)), Some(400_000), "the 400 was in effect until 500");
        assert_eq!(estimate.held(at(2_500)), Some(2_000_000), "held for 2 s");
        estimate.update(at(2_600), Bitrate::kbps(600));
        assert_eq!((estimate.latest(), estimate.held(at(2_600))), (Some(600_000), Some(600_000)), "lower: at once");
        estimate.update(at(19_000), Bitrate::kbps(900));
        assert_eq!(estimate.held(at(19_000)), Some(600_000));
        assert_eq!(estimate.recent.len(), 2, "older estimates are let go");
    }

    #[test]
    fn after_falls_an_estimate_must_hold_longer() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut estimate = Estimate::default();
        estimate.update(at(0), Bitrate::kbps(300));
        estimate.fell(at(0));
        estimate.fell(at(1_000));
        estimate.update(at(2_000), Bitrate::kbps(900)); // a probe's overshoot
        assert_eq!(estimate.held(at(5_000)), Some(300_000), "after two falls: 8 s, not 2");
        assert_eq!(estimate.held(at(9_999)), Some(300_000));
        assert_eq!(estimate.held(at(10_000)), Some(900_000));
        // Falls long ago are forgotten: 2 s again.
        estimate.update(at(40_000), Bitrate::kbps(1_500));
        assert_eq!(estimate.held(at(42_000)), Some(1_500_000));
        // A fall now starts a new count: 4 s.
        estimate.fell(at(42_000));
        estimate.update(at(43_000), Bitrate::kbps(3_000));
        assert_eq!(estimate.held(at(46_999)), Some(1_500_000));
        assert_eq!(estimate.held(at(47_000)), Some(3_000_000));
    }

    #[test]
    fn tries_again_come_less_and_less_often() {
        let start = Instant::now();
        let mut retry = Retry::default();
        let tries: Vec<u64> = (0..=200).filter(|second| retry.due(start + Duration::from_secs(*second))).collect();
        assert_eq!(tries, [10, 30, 70, 130, 190]);
    }

    #[test]
    fn a_subscriber_gets_the_best_layer_it_wants_that_fits_its_bandwidth() {
        let (low, medium, high) = (lk::VideoQuality::Low as i32, lk::VideoQuality::Medium as i32, lk::VideoQuality::High as i32);
        let all = [(Rid::from("q"), low, 150_000), (Rid::from("h"), medium, 500_000), (Rid::from("f"), high, 1_500_000)];
        let pick = |usable: &[(Rid, i32, u64)], wanted: i32, budget: Option<u64>| layer_for(usable, wanted, budget).map(|rid| rid.to_string());
        assert_eq!(pick(&all, high, None).as_deref(), Some("f"), "no estimate yet: what it wants");
        assert_eq!(pick(&all, high, Some(1_000_000)).as_deref(), Some("h"), "the best that fits");
        assert_eq!(pick(&all, high, Some(1_500_000)).as_deref(), Some("f"));
        assert_eq!(pick(&all, medium, Some(5_000_000)).as_deref(), Some("h"), "never better than wanted");
        assert_eq!(pick(&all, low, None).as_deref(), Some("q"));
        assert_eq!(pick(&all, high, Some(100_000)).as_deref(), Some("q"), "nothing fits: the lowest, not nothing");
        assert_eq!(pick(&all[..2], high, None).as_deref(), Some("h"), "the high layer paused");
        assert_eq!(pick(&all[1..], low, None).as_deref(), Some("h"), "the low layer paused: the lowest there is");
        assert_eq!(pick(&[], high, None), None);
    }

    #[test]
    fn a_layers_bitrate_is_measured_and_a_pause_does_not_dilute_it() {
        let start = Instant::now();
        let mut layer = Layer::new(start);
        // 30 frames of 2,500 bytes a second: 600 kbit/s.
        let frame = Duration::from_millis(1000 / 30);
        let mut now = start;
        for _ in 0..=31 {
            layer.arrived(now, 2_500);
            now += frame;
        }
        let measured = layer.rate.expect("a rate after a second");
        assert!((550_000..=650_000).contains(&measured), "{measured}");
        // Paused for five seconds, then back at the same rate: the pause is not averaged in.
        now += Duration::from_secs(5);
        for _ in 0..=31 {
            layer.arrived(now, 2_500);
            now += frame;
        }
        let after = layer.rate.unwrap();
        assert!((550_000..=650_000).contains(&after), "{after}");
        assert!(layer.arriving(now) && !layer.arriving(now + LAYER_TIMEOUT));
    }
}
