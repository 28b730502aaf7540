//! The SFU core: every participant's two peer connections (LiveKit's dual-PC mode: the client
//! offers on its publisher connection, we offer on its subscriber connection), the tracks they
//! publish, and the forwarding of their media to the others, without transcoding.
//!
//! Sans-IO, in str0m's style: fed signalling requests, UDP datagrams and timeouts, and polled
//! for datagrams to send, signalling responses and the next timeout. The driver (the server's
//! `calls::media`) owns the socket and the WebSockets.
//!
//! It knows nothing of Matrix: a participant comes with a [`Grant`] (what their call token
//! allows), and the application's room and user they were admitted for are opaque labels that
//! the application asks about again ([`Sfu::live`], [`Sfu::close`], recordings).

pub mod containers;
#[cfg(any(test, feature = "testing"))]
pub mod loopback;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use livekit_protocol as lk;
use prost::Message as _;
use str0m::{
    Candidate, Event, IceConnectionState, Input, Output, Rtc,
    channel::{ChannelConfig, ChannelData, ChannelId, Reliability},
    bwe::{Bitrate, BweKind},
    change::{SdpAnswer, SdpOffer, SdpPendingOffer},
    media::{Direction, KeyframeRequest, KeyframeRequestKind, MediaData, MediaKind, MediaTime, Mid, Rid},
    net::{Protocol, Receive},
};

use containers::{Ivf, OggOpus};

/// A participant's handle inside the SFU.
pub type ParticipantId = u64;

/// What LiveKit clients are told this server is (they need a version of at least 1.8.0).
const SERVER_VERSION: &str = "1.9.0";
const PING_INTERVAL_SECONDS: i32 = 5;
const PING_TIMEOUT_SECONDS: i32 = 15;
/// How often a publisher is asked for a keyframe at most, per track.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);
/// LiveKit's data channel labels.
const RELIABLE: &str = "_reliable";
const LOSSY: &str = "_lossy";
/// How often the active speakers are worked out.
const SPEAKER_INTERVAL: Duration = Duration::from_millis(300);
/// The smoothed audio level above which a participant is speaking (about -30 dBov).
const SPEAKING_LEVEL: f32 = 0.03;
/// The weight of each new audio-level sample in the smoothed level.
const LEVEL_SMOOTHING: f32 = 0.2;

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

/// What a participant may do in a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rights {
    pub publish: bool,
    pub subscribe: bool,
    /// Mute and remove other participants.
    pub moderate: bool,
    pub record: bool,
}

impl Rights {
    /// Whether these rights include everything `granted` allows.
    pub fn cover(self, granted: Rights) -> bool {
        (self.publish || !granted.publish) && (self.subscribe || !granted.subscribe) && (self.moderate || !granted.moderate) && (self.record || !granted.record)
    }
}

/// Who joins, where, and what their call token allows.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The SFU room.
    pub room: String,
    /// The participant's identity in the call, and the name others see.
    pub identity: String,
    pub name: String,
    /// The application's room and user the participant was admitted for.
    pub app_room: String,
    pub app_user: String,
    pub rights: Rights,
    /// Whether they may send data packets.
    pub publish_data: bool,
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

/// One of the two peer connections of a participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pc {
    Publisher,
    Subscriber,
}

/// A track a participant publishes.
struct Published {
    info: lk::TrackInfo,
    /// The client's id for it, until its media line arrives.
    cid: String,
    /// The publisher connection's media line carrying it, once negotiated.
    mid: Option<Mid>,
    last_keyframe_request: Option<Instant>,
    /// Audio: the smoothed level (0 silent to 1 loudest) from the audio-level extension.
    level: f32,
    /// Simulcast: when each layer last arrived.
    layers_seen: HashMap<Rid, Instant>,
}

/// LiveKit's simulcast layer names, lowest first, and the bitrate assumed for each when the
/// publisher did not say.
const LAYERS: [(&str, i32, u64); 3] = [("q", lk::VideoQuality::Low as i32, 150_000), ("h", lk::VideoQuality::Medium as i32, 500_000), ("f", lk::VideoQuality::High as i32, 1_500_000)];
/// A layer not seen for this long is taken to be paused by the publisher.
const LAYER_TIMEOUT: Duration = Duration::from_secs(1);
/// The bandwidth a subscriber connection starts out with, before TWCC says more.
const INITIAL_ESTIMATE_KBPS: u64 = 2_500;
/// The gap left in the forwarded clock at a layer switch (one frame at 30 fps, 90 kHz).
const SWITCH_GAP: i128 = 3000;

/// The simulcast layers of a track that arrive, lowest first, with their bitrates.
// `TrackInfo.layers` is deprecated for per-codec layers, but it is what clients announce and read.
#[allow(deprecated)]
fn usable_layers(published: &Published, now: Instant) -> Vec<(Rid, i32, u64)> {
    let arriving = |name: &str| published.layers_seen.get(&Rid::from(name)).is_some_and(|at| now.duration_since(*at) < LAYER_TIMEOUT);
    let bitrate = |quality: i32, default: u64| published.info.layers.iter().find(|l| l.quality == quality && l.bitrate > 0).map_or(default, |l| u64::from(l.bitrate));
    LAYERS.iter().filter(|(name, _, _)| arriving(name)).map(|(name, quality, default)| (Rid::from(*name), *quality, bitrate(*quality, *default))).collect()
}

/// The layer to forward to a subscriber who wants `wanted` and has `budget` bits per second
/// for it: the best usable layer at most that good which fits, else the lowest.
fn layer_for(usable: &[(Rid, i32, u64)], wanted: i32, budget: Option<u64>) -> Option<Rid> {
    usable
        .iter()
        .rev()
        .find(|(_, quality, bitrate)| *quality <= wanted && budget.is_none_or(|budget| *bitrate <= budget))
        .or(usable.first())
        .map(|(rid, _, _)| *rid)
}

/// Another participant's track, forwarded to this participant.
struct DownTrack {
    publisher: ParticipantId,
    track_sid: String,
    kind: MediaKind,
    state: DownState,
    layers: Layering,
}

impl DownTrack {
    fn new(publisher: ParticipantId, track_sid: String, kind: MediaKind) -> Self {
        Self { publisher, track_sid, kind, state: DownState::ToOpen, layers: Layering::default() }
    }
}

/// Which simulcast layer a subscriber gets of a video track, and how its timestamps continue
/// across switches (each layer has its own RTP clock offset).
struct Layering {
    /// What the subscriber asked for (LiveKit's `VideoQuality`: low, medium, high, off).
    wanted: i32,
    /// The layer being forwarded; a switch happens on the new layer's keyframe.
    current: Option<Rid>,
    /// Added to the forwarded layer's media time, so the subscriber sees one continuous clock.
    offset: i128,
    /// The last media time written to the subscriber (after the offset).
    last_out: Option<i128>,
}

impl Default for Layering {
    fn default() -> Self {
        Self { wanted: lk::VideoQuality::High as i32, current: None, offset: 0, last_out: None }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DownState {
    /// Waiting for the next subscriber offer.
    ToOpen,
    /// In the offer we sent; forwarding starts with the answer.
    Negotiating(Mid),
    Open(Mid),
}

impl DownState {
    fn mid(self) -> Option<Mid> {
        match self {
            DownState::ToOpen => None,
            DownState::Negotiating(mid) | DownState::Open(mid) => Some(mid),
        }
    }
}

struct Participant {
    room: String,
    /// The application's room and user the participant was admitted for.
    app_room: String,
    app_user: String,
    info: lk::ParticipantInfo,
    rights: Rights,
    auto_subscribe: bool,
    publisher: Rtc,
    subscriber: Rtc,
    subscriber_pending: Option<SdpPendingOffer>,
    next_offer_id: u32,
    /// Media lines of the subscriber connection to remove with the next offer.
    to_stop: Vec<Mid>,
    /// The data channels LiveKit clients expect on their subscriber connection (`_reliable`,
    /// `_lossy`), once offered; and the labels of those they opened on their publisher one.
    subscriber_channels: Option<HashMap<&'static str, ChannelId>>,
    publisher_channels: HashMap<ChannelId, String>,
    /// What is left of the participant's data rate.
    data_budget: Bucket,
    tracks: Vec<Published>,
    down: Vec<DownTrack>,
    /// The subscriber connection's estimated available bitrate (TWCC), shared by its video.
    estimate: Option<Bitrate>,
}

impl Participant {
    fn rtc(&mut self, pc: Pc) -> &mut Rtc {
        match pc {
            Pc::Publisher => &mut self.publisher,
            Pc::Subscriber => &mut self.subscriber,
        }
    }

    fn bump_version(&mut self) {
        self.info.version += 1;
    }

    /// What others are told of the participant: who they are and the tracks they publish.
    fn public_info(&self) -> lk::ParticipantInfo {
        let mut info = self.info.clone();
        info.tracks = self.tracks.iter().filter(|t| t.mid.is_some()).map(|t| t.info.clone()).collect();
        info
    }
}

/// A recording of an SFU room's call: one file per track, written as the media arrives. It
/// lasts until stopped, even through moments when nobody is in the call.
struct Recording {
    app_room: String,
    tracks: HashMap<String, TrackFile>,
}

struct TrackFile {
    owner: String,
    name: String,
    file: RecordingFile,
    /// Of a simulcast video track: the layer recorded (chosen at its first keyframe).
    rid: Option<Rid>,
}

enum RecordingFile {
    Audio(OggOpus),
    Video(Ivf),
}

impl RecordingFile {
    fn push(&mut self, time: u64, data: &[u8]) {
        match self {
            RecordingFile::Audio(ogg) => ogg.push(time, data),
            RecordingFile::Video(ivf) => ivf.push(time, data),
        }
    }
}

/// One track's file of a finished recording.
pub struct RecordedTrack {
    /// The application's user who published the track.
    pub owner: String,
    pub track_name: String,
    pub kind: MediaKind,
    pub bytes: Vec<u8>,
    pub duration_ms: u64,
}

/// A participant in a call, as the application knows them.
pub struct Live {
    pub id: ParticipantId,
    pub app_room: String,
    pub app_user: String,
    pub rights: Rights,
}

/// Something a peer connection reported that may concern other participants.
enum Happened {
    MediaAdded { mid: Mid, kind: MediaKind, direction: Direction },
    Media(MediaData),
    KeyframeWanted(KeyframeRequest),
    Data(ChannelData),
    Disconnected,
}

pub struct Sfu {
    /// The address peers send media to (the host candidate): the socket's, or the announced one.
    candidate_addr: SocketAddr,
    limits: Limits,
    participants: HashMap<ParticipantId, Participant>,
    next_id: ParticipantId,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    signals: VecDeque<(ParticipantId, lk::SignalResponse)>,
    /// Participants whose connections failed, for the driver to close.
    gone: VecDeque<ParticipantId>,
    /// Per room, who was last announced as speaking, and when speakers were last worked out.
    speaking: HashMap<String, HashMap<String, f32>>,
    speakers_checked: Option<Instant>,
    /// The SFU rooms being recorded.
    recordings: HashMap<String, Recording>,
    /// Connections with input since their output was last drained: only they are polled.
    dirty: HashSet<(ParticipantId, Pc)>,
    /// Participants with down tracks waiting for a subscriber offer.
    to_negotiate: HashSet<ParticipantId>,
    /// When each connection's timers next fire.
    timers: HashMap<(ParticipantId, Pc), Instant>,
    /// Which connection a peer's address belongs to (learnt from the first datagram it sent).
    routes: HashMap<SocketAddr, (ParticipantId, Pc)>,
    /// SFU rooms where someone sent a data packet: only their subscriber connections get data
    /// channels, whose SCTP costs every connection time even when idle.
    data_rooms: HashSet<String>,
}

fn random_sid(prefix: &str) -> String {
    use rand::{RngExt, distr::Alphanumeric};
    let suffix: String = rand::rng().sample_iter(Alphanumeric).take(12).map(char::from).collect();
    format!("{prefix}{suffix}")
}

fn response(message: lk::signal_response::Message) -> lk::SignalResponse {
    lk::SignalResponse { message: Some(message) }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Sfu {
    pub fn new(candidate_addr: SocketAddr, limits: Limits) -> Self {
        Self {
            candidate_addr,
            limits,
            participants: HashMap::new(),
            next_id: 1,
            transmits: VecDeque::new(),
            signals: VecDeque::new(),
            gone: VecDeque::new(),
            speaking: HashMap::new(),
            speakers_checked: None,
            recordings: HashMap::new(),
            dirty: HashSet::new(),
            to_negotiate: HashSet::new(),
            timers: HashMap::new(),
            routes: HashMap::new(),
            data_rooms: HashSet::new(),
        }
    }

    fn new_rtc(&self, now: Instant, estimate_bandwidth: bool) -> Rtc {
        let mut config = Rtc::builder().set_ice_lite(true);
        if estimate_bandwidth {
            config = config.enable_bwe(Some(Bitrate::kbps(INITIAL_ESTIMATE_KBPS)));
        }
        let mut rtc = config.build(now);
        if let Ok(candidate) = Candidate::host(self.candidate_addr, "udp") {
            rtc.add_local_candidate(candidate);
        }
        rtc
    }

    /// Admits the holder of `grant`: they get the room and who is in it, and the others learn
    /// of them. In a full call they get `leave` (`JOIN_FAILURE`, as LiveKit answers a join
    /// beyond a room's `max_participants`) instead, and are gone.
    pub fn join(&mut self, now: Instant, grant: &Grant, auto_subscribe: bool) -> ParticipantId {
        let id = self.next_id;
        self.next_id += 1;
        let room = grant.room.clone();
        if self.is_full(&room) {
            tracing::info!(participant = id, %room, limit = self.limits.participants_per_call, "refused a participant: the call is full");
            let leave = lk::LeaveRequest { reason: lk::DisconnectReason::JoinFailure as i32, action: lk::leave_request::Action::Disconnect as i32, ..Default::default() };
            self.signals.push_back((id, response(lk::signal_response::Message::Leave(leave))));
            self.gone.push_back(id);
            return id;
        }
        let info = lk::ParticipantInfo {
            sid: random_sid("PA_"),
            identity: grant.identity.clone(),
            name: grant.name.clone(),
            state: lk::participant_info::State::Joined as i32,
            joined_at: now_ms() / 1000,
            joined_at_ms: now_ms(),
            version: 1,
            permission: Some(lk::ParticipantPermission {
                can_subscribe: grant.rights.subscribe,
                can_publish: grant.rights.publish,
                can_publish_data: grant.publish_data,
                ..Default::default()
            }),
            is_publisher: grant.rights.publish,
            ..Default::default()
        };
        let others: Vec<lk::ParticipantInfo> = self.participants.values().filter(|p| p.room == room).map(Participant::public_info).collect();
        let join = lk::JoinResponse {
            room: Some(lk::Room {
                sid: format!("RM_{}", room_sid(&room)),
                name: room.clone(),
                num_participants: others.len() as u32 + 1,
                creation_time: now_ms() / 1000,
                ..Default::default()
            }),
            participant: Some(info.clone()),
            other_participants: others,
            server_version: SERVER_VERSION.to_owned(),
            subscriber_primary: false,
            ping_interval: PING_INTERVAL_SECONDS,
            ping_timeout: PING_TIMEOUT_SECONDS,
            server_info: Some(lk::ServerInfo {
                edition: lk::server_info::Edition::Standard as i32,
                version: SERVER_VERSION.to_owned(),
                protocol: 16,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.signals.push_back((id, response(lk::signal_response::Message::Join(join))));
        let participant = Participant {
            room: room.clone(),
            app_room: grant.app_room.clone(),
            app_user: grant.app_user.clone(),
            info: info.clone(),
            rights: grant.rights,
            auto_subscribe,
            publisher: self.new_rtc(now, false),
            subscriber: self.new_rtc(now, true),
            subscriber_pending: None,
            next_offer_id: 1,
            to_stop: Vec::new(),
            subscriber_channels: None,
            publisher_channels: HashMap::new(),
            data_budget: Bucket::new(self.limits.data_rate, now),
            tracks: Vec::new(),
            down: Vec::new(),
            estimate: None,
        };
        self.participants.insert(id, participant);
        self.dirty.extend([(id, Pc::Publisher), (id, Pc::Subscriber)]);
        if self.data_rooms.contains(&room) {
            self.to_negotiate.insert(id);
        }
        self.broadcast_update(id);
        if auto_subscribe && grant.rights.subscribe {
            let published: Vec<(ParticipantId, String, MediaKind)> = self
                .participants
                .iter()
                .filter(|(other, p)| **other != id && p.room == room)
                .flat_map(|(other, p)| p.tracks.iter().filter(|t| t.mid.is_some()).map(move |t| (*other, t.info.sid.clone(), kind_of(&t.info))))
                .collect();
            if let Some(me) = self.participants.get_mut(&id) {
                for (publisher, track_sid, kind) in published {
                    me.down.push(DownTrack::new(publisher, track_sid, kind));
                    self.to_negotiate.insert(id);
                }
            }
        }
        self.process(now);
        id
    }

    /// The participant left (or their signalling connection closed): the others see them go.
    pub fn leave(&mut self, now: Instant, id: ParticipantId) {
        let Some(mut gone) = self.participants.remove(&id) else { return };
        self.routes.retain(|_, (owner, _)| *owner != id);
        self.timers.retain(|(owner, _), _| *owner != id);
        self.dirty.retain(|(owner, _)| *owner != id);
        self.to_negotiate.remove(&id);
        gone.publisher.disconnect();
        gone.subscriber.disconnect();
        gone.info.state = lk::participant_info::State::Disconnected as i32;
        gone.bump_version();
        let update = response(lk::signal_response::Message::Update(lk::ParticipantUpdate { participants: vec![gone.public_info()] }));
        let mut renegotiate = Vec::new();
        for (other, participant) in &mut self.participants {
            if participant.room != gone.room {
                continue;
            }
            self.signals.push_back((*other, update.clone()));
            let before = participant.down.len();
            let stopped: Vec<Mid> = participant.down.iter().filter(|d| d.publisher == id).filter_map(|d| d.state.mid()).collect();
            participant.down.retain(|d| d.publisher != id);
            if participant.down.len() != before {
                renegotiate.push((*other, stopped));
            }
        }
        for (other, mids) in renegotiate {
            self.stop_media(now, other, &mids);
        }
        if !self.participants.values().any(|p| p.room == gone.room) {
            self.data_rooms.remove(&gone.room);
        }
        self.process(now);
    }

    /// One signalling request of a participant.
    pub fn signal(&mut self, now: Instant, id: ParticipantId, request: lk::SignalRequest) {
        use lk::signal_request::Message;
        let Some(message) = request.message else { return };
        if self.participants.contains_key(&id) {
            self.dirty.extend([(id, Pc::Publisher), (id, Pc::Subscriber)]);
        }
        match message {
            Message::Offer(offer) => self.publisher_offer(id, offer),
            Message::Answer(answer) => self.subscriber_answer(id, &answer),
            Message::Trickle(trickle) => self.trickle(id, &trickle),
            Message::AddTrack(add) => self.add_track(id, add),
            Message::Mute(mute) => self.mute(id, &mute),
            Message::Subscription(update) => self.subscription(now, id, &update),
            Message::TrackSetting(settings) => self.track_settings(id, &settings),
            Message::Leave(_) => {
                self.leave(now, id);
                return;
            }
            Message::Ping(timestamp) => self.signals.push_back((id, response(lk::signal_response::Message::Pong(timestamp)))),
            Message::PingReq(ping) => {
                let pong = lk::Pong { last_ping_timestamp: ping.timestamp, timestamp: now_ms() };
                self.signals.push_back((id, response(lk::signal_response::Message::PongResp(pong))));
            }
            other => tracing::debug!(participant = id, message = ?std::mem::discriminant(&other), "signalling request not handled"),
        }
        self.process(now);
    }

    /// A UDP datagram for whichever peer connection it belongs to.
    pub fn receive(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, datagram: &[u8]) {
        let Ok(contents) = datagram.try_into() else { return };
        let input = Input::Receive(now, Receive { proto: Protocol::Udp, source, destination, contents });
        let known = self.routes.get(&source).copied().filter(|(id, pc)| self.participants.get_mut(id).is_some_and(|p| p.rtc(*pc).accepts(&input)));
        let target = known.or_else(|| {
            self.participants.iter_mut().find_map(|(id, p)| {
                if p.publisher.accepts(&input) {
                    Some((*id, Pc::Publisher))
                } else if p.subscriber.accepts(&input) {
                    Some((*id, Pc::Subscriber))
                } else {
                    None
                }
            })
        });
        let Some((id, pc)) = target else { return };
        self.routes.insert(source, (id, pc));
        if let Some(participant) = self.participants.get_mut(&id)
            && let Err(error) = participant.rtc(pc).handle_input(input)
        {
            tracing::debug!(participant = id, %error, "a datagram was not accepted");
        }
        self.dirty.insert((id, pc));
        self.process(now);
    }

    /// Time passed: every connection's timers, and the active speakers.
    pub fn timeout(&mut self, now: Instant) {
        let due: Vec<(ParticipantId, Pc)> = self.timers.iter().filter(|(_, at)| **at <= now).map(|(key, _)| *key).collect();
        for (id, pc) in due {
            if let Some(participant) = self.participants.get_mut(&id) {
                let _ = participant.rtc(pc).handle_input(Input::Timeout(now));
                self.dirty.insert((id, pc));
            }
        }
        if self.speakers_checked.is_none_or(|at| now.duration_since(at) >= SPEAKER_INTERVAL) {
            self.speakers_checked = Some(now);
            self.announce_speakers();
            self.steer_bandwidth_estimates(now);
        }
        self.process(now);
    }

    /// Each subscriber connection probes for the bitrate of the layers its subscriber wants
    /// (TWCC), so that the estimate can grow to allow them.
    fn steer_bandwidth_estimates(&mut self, now: Instant) {
        let mut wanted: HashMap<ParticipantId, u64> = HashMap::new();
        for (id, participant) in &self.participants {
            for down in participant.down.iter().filter(|d| d.kind == MediaKind::Video && matches!(d.state, DownState::Open(_))) {
                let Some(track) = self.participants.get(&down.publisher).and_then(|p| p.tracks.iter().find(|t| t.info.sid == down.track_sid)) else { continue };
                let layers = usable_layers(track, now);
                let rate = layers.iter().rev().find(|(_, quality, _)| *quality <= down.layers.wanted).or(layers.first()).map_or(0, |(_, _, rate)| *rate);
                *wanted.entry(*id).or_default() += rate;
            }
        }
        for (id, rate) in wanted {
            if let Some(participant) = self.participants.get_mut(&id)
                && rate > 0
            {
                participant.subscriber.bwe().set_bitrate(Bitrate::kbps(100), Bitrate::bps(rate));
                self.dirty.insert((id, Pc::Subscriber));
            }
        }
    }

    /// Tells each room who started or stopped speaking (LiveKit's `SpeakersChanged`: the
    /// changes only, loudest first).
    fn announce_speakers(&mut self) {
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

    /// Whether an SFU room's call has as many participants as a call may have.
    pub fn is_full(&self, room: &str) -> bool {
        self.participants.values().filter(|p| p.room == room).count() >= self.limits.participants_per_call
    }

    /// Who is in an SFU room, as its participants see each other.
    pub fn participants_in(&self, room: &str) -> Vec<lk::ParticipantInfo> {
        self.participants.values().filter(|p| p.room == room).map(Participant::public_info).collect()
    }

    /// A moderator muted a participant's track: the publisher is told to mute it, and everyone
    /// sees it muted. `None` if there is no such participant or track.
    pub fn mute_for(&mut self, now: Instant, room: &str, identity: &str, track_sid: &str) -> Option<lk::TrackInfo> {
        let id = self.find(room, identity)?;
        let participant = self.participants.get_mut(&id)?;
        let track = participant.tracks.iter_mut().find(|t| t.info.sid == track_sid)?;
        let changed = !track.info.muted;
        track.info.muted = true;
        let info = track.info.clone();
        let mute = lk::MuteTrackRequest { sid: track_sid.to_owned(), muted: true };
        self.signals.push_back((id, response(lk::signal_response::Message::Mute(mute))));
        if changed {
            if let Some(participant) = self.participants.get_mut(&id) {
                participant.bump_version();
            }
            self.broadcast_update(id);
        }
        self.process(now);
        Some(info)
    }

    /// A moderator removed a participant: they are told, and disconnected.
    pub fn remove(&mut self, room: &str, identity: &str) -> bool {
        let Some(id) = self.find(room, identity) else { return false };
        self.disconnect(id, lk::DisconnectReason::ParticipantRemoved);
        true
    }

    /// The Matrix room's calls end (its session is over): everyone in them is told, and
    /// disconnected. How many were.
    pub fn close(&mut self, app_room: &str) -> usize {
        let ids: Vec<ParticipantId> = self.participants.iter().filter(|(_, p)| p.app_room == app_room).map(|(id, _)| *id).collect();
        for id in &ids {
            self.disconnect(*id, lk::DisconnectReason::RoomClosed);
        }
        ids.len()
    }

    /// Tells a participant why they are leaving, and disconnects them: the others see them go.
    pub fn disconnect(&mut self, id: ParticipantId, reason: lk::DisconnectReason) {
        if !self.participants.contains_key(&id) || self.gone.contains(&id) {
            return;
        }
        let leave = lk::LeaveRequest { reason: reason as i32, action: lk::leave_request::Action::Disconnect as i32, ..Default::default() };
        self.signals.push_back((id, response(lk::signal_response::Message::Leave(leave))));
        self.gone.push_back(id);
    }

    /// The SFU rooms holding calls of a Matrix room.
    pub fn rooms_of(&self, app_room: &str) -> Vec<String> {
        let mut rooms: Vec<String> = self.participants.values().filter(|p| p.app_room == app_room).map(|p| p.room.clone()).collect();
        rooms.sort();
        rooms.dedup();
        rooms
    }

    /// Everyone in a call, with the Matrix room and user and the rights of their call token.
    pub fn live(&self) -> Vec<Live> {
        self.participants.iter().map(|(id, p)| Live { id: *id, app_room: p.app_room.clone(), app_user: p.app_user.clone(), rights: p.rights }).collect()
    }

    /// The Matrix users in an SFU room's call.
    pub fn callers(&self, room: &str) -> Vec<String> {
        self.participants.values().filter(|p| p.room == room).map(|p| p.app_user.clone()).collect()
    }

    /// Whether a call of the Matrix room is being recorded.
    pub fn is_recording(&self, app_room: &str) -> bool {
        self.recordings.values().any(|r| r.app_room == app_room)
    }

    /// Starts recording an SFU room's call of `app_room`: every track from now on (video
    /// from its next keyframe). False if it is recorded already.
    pub fn start_recording(&mut self, now: Instant, room: &str, app_room: &str) -> bool {
        if self.recordings.contains_key(room) {
            return false;
        }
        self.recordings.insert(room.to_owned(), Recording { app_room: app_room.to_owned(), tracks: HashMap::new() });
        // Video starts at a keyframe: ask for one now.
        let ids: Vec<ParticipantId> = self.participants.iter().filter(|(_, p)| p.room == room).map(|(id, _)| *id).collect();
        for id in ids {
            let Some(participant) = self.participants.get_mut(&id) else { continue };
            for track in participant.tracks.iter_mut().filter(|t| kind_of(&t.info) == MediaKind::Video) {
                let Some(mid) = track.mid else { continue };
                track.last_keyframe_request = Some(now);
                if let Some(mut writer) = participant.publisher.writer(mid) {
                    let rids: Vec<Option<Rid>> = if track.layers_seen.is_empty() { vec![None] } else { track.layers_seen.keys().copied().map(Some).collect() };
                    for rid in rids {
                        let _ = writer.request_keyframe(rid, KeyframeRequestKind::Pli);
                    }
                    self.dirty.insert((id, Pc::Publisher));
                }
            }
        }
        self.process(now);
        true
    }

    /// Stops recording the calls of a Matrix room; their files, if any was recorded.
    pub fn stop_recording(&mut self, app_room: &str) -> Option<Vec<RecordedTrack>> {
        let rooms: Vec<String> = self.recordings.iter().filter(|(_, r)| r.app_room == app_room).map(|(room, _)| room.clone()).collect();
        if rooms.is_empty() {
            return None;
        }
        Some(
            rooms
                .iter()
                .filter_map(|room| self.recordings.remove(room))
                .flat_map(|recording| recording.tracks.into_values())
                .map(|track| {
                    let (kind, duration_ms, bytes) = match track.file {
                        RecordingFile::Audio(ogg) => (MediaKind::Audio, ogg.duration_ms(), ogg.finish()),
                        RecordingFile::Video(ivf) => (MediaKind::Video, ivf.duration_ms(), ivf.finish()),
                    };
                    RecordedTrack { owner: track.owner, track_name: track.name, kind, bytes, duration_ms }
                })
                .collect(),
        )
    }

    fn find(&self, room: &str, identity: &str) -> Option<ParticipantId> {
        self.participants.iter().find(|(_, p)| p.room == room && p.info.identity == identity).map(|(id, _)| *id)
    }

    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    pub fn poll_signal(&mut self) -> Option<(ParticipantId, lk::SignalResponse)> {
        self.signals.pop_front()
    }

    /// A participant whose connections failed; the driver closes their signalling.
    pub fn poll_gone(&mut self) -> Option<ParticipantId> {
        self.gone.pop_front()
    }

    /// When [`Self::timeout`] is next due.
    pub fn next_timeout(&self, now: Instant) -> Instant {
        let next = self.timers.values().copied().min().unwrap_or(now + SPEAKER_INTERVAL);
        next.min(self.speakers_checked.map_or(now, |at| at + SPEAKER_INTERVAL))
    }

    fn publisher_offer(&mut self, id: ParticipantId, offer: lk::SessionDescription) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        // A media line per track, and one for data: counted before the offer is parsed.
        let lines = |kind: &str| offer.sdp.lines().filter(|line| line.strip_prefix("m=").is_some_and(|m| m.starts_with(kind))).count();
        let (media_lines, data_lines) = (lines("audio") + lines("video"), lines("application"));
        if media_lines > self.limits.tracks_per_participant || data_lines > 1 {
            tracing::info!(participant = id, media_lines, data_lines, "refused a publisher offer with more media lines than tracks allowed");
            return;
        }
        let parsed = match SdpOffer::from_sdp_string(&offer.sdp) {
            Ok(parsed) => parsed,
            Err(error) => {
                tracing::info!(participant = id, %error, "an unreadable publisher offer");
                return;
            }
        };
        match participant.publisher.sdp_api().accept_offer(parsed) {
            Ok(answer) => {
                let answer = lk::SessionDescription { r#type: "answer".to_owned(), sdp: answer.to_sdp_string(), id: offer.id, ..Default::default() };
                self.signals.push_back((id, response(lk::signal_response::Message::Answer(answer))));
            }
            Err(error) => tracing::info!(participant = id, %error, "a publisher offer was refused"),
        }
    }

    fn subscriber_answer(&mut self, id: ParticipantId, answer: &lk::SessionDescription) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        let Some(pending) = participant.subscriber_pending.take() else { return };
        let accepted = SdpAnswer::from_sdp_string(&answer.sdp).map_err(|e| e.to_string()).and_then(|parsed| participant.subscriber.sdp_api().accept_answer(pending, parsed).map_err(|e| e.to_string()));
        match accepted {
            Ok(()) => {
                for down in &mut participant.down {
                    if let DownState::Negotiating(mid) = down.state {
                        down.state = DownState::Open(mid);
                    }
                }
                if !participant.to_stop.is_empty() || participant.down.iter().any(|d| d.state == DownState::ToOpen) {
                    self.to_negotiate.insert(id);
                }
            }
            Err(error) => tracing::info!(participant = id, %error, "a subscriber answer was refused"),
        }
    }

    fn trickle(&mut self, id: ParticipantId, trickle: &lk::TrickleRequest) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        let Ok(init) = serde_json::from_str::<serde_json::Value>(&trickle.candidate_init) else { return };
        let Some(line) = init.get("candidate").and_then(serde_json::Value::as_str).filter(|c| !c.is_empty()) else { return };
        let Ok(candidate) = Candidate::from_sdp_string(line) else { return };
        let pc = if trickle.target == lk::SignalTarget::Subscriber as i32 { Pc::Subscriber } else { Pc::Publisher };
        participant.rtc(pc).add_remote_candidate(candidate);
    }

    // `simulcast`, `layers` and `disable_dtx` are deprecated in LiveKit's protocol, but its
    // SDKs still send and read them (the Python SDK's `set_video_quality` needs `simulcast`).
    #[allow(deprecated)]
    fn add_track(&mut self, id: ParticipantId, add: lk::AddTrackRequest) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        if !participant.rights.publish {
            tracing::info!(participant = id, "refused a track of a participant who may not publish");
            return;
        }
        if participant.tracks.len() >= self.limits.tracks_per_participant {
            tracing::info!(participant = id, "refused a track beyond the limit");
            // LiveKit's answer to a track over its limits.
            let refusal = lk::RequestResponse {
                reason: lk::request_response::Reason::LimitExceeded as i32,
                message: format!("a participant publishes at most {} tracks", self.limits.tracks_per_participant),
                request: Some(lk::request_response::Request::AddTrack(add)),
                ..Default::default()
            };
            self.signals.push_back((id, response(lk::signal_response::Message::RequestResponse(refusal))));
            return;
        }
        let simulcast = add.layers.len() > 1 || !add.simulcast_codecs.is_empty();
        let info = lk::TrackInfo {
            sid: random_sid("TR_"),
            r#type: add.r#type,
            name: add.name.clone(),
            muted: add.muted,
            width: add.width,
            height: add.height,
            simulcast,
            disable_dtx: add.disable_dtx,
            source: add.source,
            layers: add.layers.clone(),
            stream: add.stream.clone(),
            ..Default::default()
        };
        participant.tracks.push(Published { info: info.clone(), cid: add.cid.clone(), mid: None, last_keyframe_request: None, level: 0.0, layers_seen: HashMap::new() });
        let published = lk::TrackPublishedResponse { cid: add.cid, track: Some(info) };
        self.signals.push_back((id, response(lk::signal_response::Message::TrackPublished(published))));
    }

    fn mute(&mut self, id: ParticipantId, mute: &lk::MuteTrackRequest) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        let Some(track) = participant.tracks.iter_mut().find(|t| t.info.sid == mute.sid) else { return };
        if track.info.muted == mute.muted {
            return;
        }
        track.info.muted = mute.muted;
        participant.bump_version();
        self.broadcast_update(id);
    }

    fn subscription(&mut self, now: Instant, id: ParticipantId, update: &lk::UpdateSubscription) {
        let wanted: Vec<&String> = update.track_sids.iter().chain(update.participant_tracks.iter().flat_map(|p| p.track_sids.iter())).collect();
        if update.subscribe {
            let Some(room) = self.participants.get(&id).map(|p| p.room.as_str()) else { return };
            let found: Vec<(ParticipantId, String, MediaKind)> = wanted
                .iter()
                .filter_map(|sid| self.find_track(room, sid).map(|(publisher, kind)| (publisher, (*sid).clone(), kind)))
                .collect();
            let Some(participant) = self.participants.get_mut(&id) else { return };
            if !participant.rights.subscribe {
                return;
            }
            for (publisher, track_sid, kind) in found {
                if publisher != id && !participant.down.iter().any(|d| d.track_sid == track_sid) {
                    participant.down.push(DownTrack::new(publisher, track_sid, kind));
                    self.to_negotiate.insert(id);
                }
            }
        } else {
            let Some(participant) = self.participants.get_mut(&id) else { return };
            let stopped: Vec<Mid> = participant.down.iter().filter(|d| wanted.contains(&&d.track_sid)).filter_map(|d| d.state.mid()).collect();
            participant.down.retain(|d| !wanted.contains(&&d.track_sid));
            self.stop_media(now, id, &stopped);
        }
    }

    /// A subscriber's wish for the quality of video tracks it gets (or to pause them).
    fn track_settings(&mut self, id: ParticipantId, settings: &lk::UpdateTrackSettings) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        let wanted = if settings.disabled { lk::VideoQuality::Off as i32 } else { settings.quality };
        for down in participant.down.iter_mut().filter(|d| settings.track_sids.contains(&d.track_sid)) {
            down.layers.wanted = wanted;
        }
    }

    /// The publisher and kind of a track published in the SFU room `room`: a track id learnt
    /// elsewhere (another call, an earlier one) reaches no track of another room.
    fn find_track(&self, room: &str, track_sid: &str) -> Option<(ParticipantId, MediaKind)> {
        self.participants
            .iter()
            .filter(|(_, p)| p.room == room)
            .find_map(|(id, p)| p.tracks.iter().find(|t| t.info.sid == track_sid && t.mid.is_some()).map(|t| (*id, kind_of(&t.info))))
    }

    /// Removes media lines from a participant's subscriber connection, with its next offer.
    fn stop_media(&mut self, _now: Instant, id: ParticipantId, mids: &[Mid]) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        if !mids.is_empty() {
            participant.to_stop.extend_from_slice(mids);
            self.to_negotiate.insert(id);
        }
    }

    /// Tells the others in the room the participant's current state.
    fn broadcast_update(&mut self, id: ParticipantId) {
        let Some(participant) = self.participants.get(&id) else { return };
        let info = participant.public_info();
        let room = participant.room.clone();
        let update = response(lk::signal_response::Message::Update(lk::ParticipantUpdate { participants: vec![info] }));
        for (other, p) in &self.participants {
            if *other != id && p.room == room {
                self.signals.push_back((*other, update.clone()));
            }
        }
    }

    /// Offers the subscriber connection what changed: down tracks waiting for it, media lines
    /// to remove. One offer at a time; what comes meanwhile waits for the answer.
    fn negotiate(&mut self, id: ParticipantId) {
        let sids: HashMap<ParticipantId, String> = self.participants.iter().map(|(pid, p)| (*pid, p.info.sid.clone())).collect();
        let Some(participant) = self.participants.get_mut(&id) else { return };
        let channels_due = participant.subscriber_channels.is_none() && self.data_rooms.contains(&participant.room);
        if participant.subscriber_pending.is_some() || (!channels_due && participant.to_stop.is_empty() && !participant.down.iter().any(|d| d.state == DownState::ToOpen)) {
            return;
        }
        let mut changes = participant.subscriber.sdp_api();
        let channels = channels_due.then(|| {
            let reliable = changes.add_channel_with_config(ChannelConfig { label: RELIABLE.to_owned(), ordered: true, ..Default::default() });
            let lossy = changes.add_channel_with_config(ChannelConfig { label: LOSSY.to_owned(), ordered: false, reliability: Reliability::MaxRetransmits { retransmits: 0 }, ..Default::default() });
            HashMap::from([(RELIABLE, reliable), (LOSSY, lossy)])
        });
        for mid in participant.to_stop.drain(..) {
            changes.stop_media(mid);
        }
        let mut added = Vec::new();
        for (index, down) in participant.down.iter().enumerate().filter(|(_, d)| d.state == DownState::ToOpen) {
            let stream = format!("{}|{}", sids.get(&down.publisher).map_or("", String::as_str), down.track_sid);
            added.push((index, changes.add_media(down.kind, Direction::SendOnly, Some(stream), Some(down.track_sid.clone()), None)));
        }
        let Some((offer, pending)) = changes.apply() else { return };
        self.dirty.insert((id, Pc::Subscriber));
        if channels.is_some() {
            participant.subscriber_channels = channels;
        }
        for (index, mid) in added {
            participant.down[index].state = DownState::Negotiating(mid);
        }
        participant.subscriber_pending = Some(pending);
        let offer_id = participant.next_offer_id;
        participant.next_offer_id += 1;
        let offer = lk::SessionDescription { r#type: "offer".to_owned(), sdp: offer.to_sdp_string(), id: offer_id, ..Default::default() };
        self.signals.push_back((id, response(lk::signal_response::Message::Offer(offer))));
    }

    /// Negotiates what is waiting, drains every connection's output (datagrams to send, events),
    /// and acts on the events, until nothing more happens.
    fn process(&mut self, now: Instant) {
        loop {
            for id in std::mem::take(&mut self.to_negotiate) {
                self.negotiate(id);
            }
            if self.dirty.is_empty() {
                return;
            }
            let mut happened = Vec::new();
            for (id, pc) in std::mem::take(&mut self.dirty) {
                let Some(participant) = self.participants.get_mut(&id) else { continue };
                loop {
                    match participant.rtc(pc).poll_output() {
                        Ok(Output::Transmit(transmit)) => self.transmits.push_back((transmit.destination, transmit.contents.into())),
                        Ok(Output::Timeout(at)) => {
                            self.timers.insert((id, pc), at);
                            break;
                        }
                        Ok(Output::Event(event)) => match event {
                            Event::MediaAdded(added) => happened.push((id, pc, Happened::MediaAdded { mid: added.mid, kind: added.kind, direction: added.direction })),
                            Event::MediaData(data) => happened.push((id, pc, Happened::Media(data))),
                            Event::KeyframeRequest(request) => happened.push((id, pc, Happened::KeyframeWanted(request))),
                            Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) if pc == Pc::Subscriber => participant.estimate = Some(estimate),
                            Event::ChannelOpen(channel, label) if pc == Pc::Publisher => {
                                if participant.publisher_channels.len() < self.limits.data_channels {
                                    participant.publisher_channels.insert(channel, label);
                                } else {
                                    tracing::info!(participant = id, %label, "closed a data channel beyond the limit");
                                    participant.publisher.direct_api().close_data_channel(channel);
                                }
                            }
                            Event::ChannelData(data) if pc == Pc::Publisher => happened.push((id, pc, Happened::Data(data))),
                            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => happened.push((id, pc, Happened::Disconnected)),
                            _ => {}
                        },
                        Err(error) => {
                            tracing::info!(participant = id, ?pc, %error, "a peer connection failed");
                            happened.push((id, pc, Happened::Disconnected));
                            break;
                        }
                    }
                }
            }
            for (id, pc, what) in happened {
                self.handle(now, id, pc, what);
            }
        }
    }

    fn handle(&mut self, now: Instant, id: ParticipantId, pc: Pc, what: Happened) {
        match (pc, what) {
            (Pc::Publisher, Happened::MediaAdded { mid, kind, direction }) if matches!(direction, Direction::RecvOnly | Direction::SendRecv) => self.track_arrived(id, mid, kind),
            (Pc::Publisher, Happened::Media(data)) => self.forward(now, id, data),
            (Pc::Subscriber, Happened::KeyframeWanted(request)) => self.relay_keyframe_request(now, id, &request),
            (Pc::Publisher, Happened::Data(data)) => self.relay_data(now, id, &data),
            (_, Happened::Disconnected) => {
                if !self.gone.contains(&id) {
                    self.gone.push_back(id);
                }
            }
            _ => {}
        }
    }

    /// A publisher's media line arrived: it carries the track the client announced with that
    /// track id (else the oldest announced track of its kind), which everyone now learns of.
    fn track_arrived(&mut self, id: ParticipantId, mid: Mid, kind: MediaKind) {
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

    /// Media of a published track, to every participant it is open to; of a simulcast track,
    /// the layer each subscriber's wish and bandwidth allow.
    fn forward(&mut self, now: Instant, id: ParticipantId, data: MediaData) {
        let Some(publisher) = self.participants.get_mut(&id) else { return };
        let Some(track) = publisher.tracks.iter_mut().find(|t| t.mid == Some(data.mid)) else { return };
        if let Some(level) = data.ext_vals.audio_level {
            // The extension carries -dBov (0 loudest, -127 silent).
            let linear = 10f32.powf(f32::from(level.min(0)) / 20.0);
            track.level += LEVEL_SMOOTHING * (linear - track.level);
        }
        if let Some(rid) = data.rid {
            track.layers_seen.insert(rid, now);
        }
        if let Some(recording) = self.recordings.get_mut(&publisher.room) {
            record(recording, track, &publisher.app_user, &data, now);
        }
        let mut keyframe_wanted = !data.contiguous;
        let mut wanted_layers: Vec<Rid> = Vec::new();
        let track_sid = track.info.sid.clone();
        let room = publisher.room.clone();
        let usable = if data.rid.is_some() { usable_layers(track, now) } else { Vec::new() };
        for (other, subscriber) in &mut self.participants {
            // Media never leaves its room, whatever a subscriber's down tracks say.
            if *other == id || subscriber.room != room {
                continue;
            }
            let video_downs = subscriber.down.iter().filter(|d| d.kind == MediaKind::Video).count().max(1) as u64;
            let budget = subscriber.estimate.map(|estimate| estimate.as_u64() / video_downs);
            let Some(down) = subscriber.down.iter_mut().find(|d| d.publisher == id && d.track_sid == track_sid) else { continue };
            let DownState::Open(mid) = down.state else { continue };
            if down.layers.wanted == lk::VideoQuality::Off as i32 {
                continue;
            }
            let numer = i128::from(data.time.numer());
            if let Some(rid) = data.rid {
                let target = layer_for(&usable, down.layers.wanted, budget);
                if down.layers.current != Some(rid) {
                    if target != Some(rid) {
                        continue;
                    }
                    if !data.is_keyframe() {
                        wanted_layers.push(rid);
                        continue;
                    }
                    // The switch: the new layer's clock continues where the old one stopped.
                    down.layers.offset = down.layers.last_out.map_or(0, |last| last + SWITCH_GAP - numer);
                    down.layers.current = Some(rid);
                } else if target.is_some_and(|target| target != rid) {
                    wanted_layers.extend(target);
                }
            }
            let out = (numer + down.layers.offset).max(0);
            down.layers.last_out = Some(out);
            let time = MediaTime::new(out as u64, data.time.frequency());
            let Some(writer) = subscriber.subscriber.writer(mid) else { continue };
            let Some(pt) = writer.match_params(data.params) else { continue };
            if let Err(error) = writer.write(pt, data.network_time, time, data.data.clone()) {
                tracing::debug!(participant = other, %error, "forwarding failed");
            }
            self.dirty.insert((*other, Pc::Subscriber));
        }
        // A gap, or a subscriber waiting for another layer: the publisher is asked for a keyframe.
        let Some(publisher) = self.participants.get_mut(&id) else { return };
        let Some(track) = publisher.tracks.iter_mut().find(|t| t.mid == Some(data.mid)) else { return };
        keyframe_wanted |= !wanted_layers.is_empty();
        if keyframe_wanted && track.last_keyframe_request.is_none_or(|at| now.duration_since(at) >= KEYFRAME_REQUEST_INTERVAL) {
            track.last_keyframe_request = Some(now);
            if let Some(mut writer) = publisher.publisher.writer(data.mid) {
                let rids: Vec<Option<Rid>> = if wanted_layers.is_empty() { vec![data.rid] } else { wanted_layers.into_iter().map(Some).collect() };
                for rid in rids {
                    let _ = writer.request_keyframe(rid, KeyframeRequestKind::Pli);
                }
                self.dirty.insert((id, Pc::Publisher));
            }
        }
    }

    /// A LiveKit data packet a participant sent: to the others in the room (those it names, if
    /// it names any), on the subscriber channel of the kind it came on, marked as theirs. Only
    /// from the channels the participant was let open, within the size and rate limits.
    fn relay_data(&mut self, now: Instant, id: ParticipantId, data: &ChannelData) {
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
            let Some(channel) = participant.subscriber_channels.as_ref().and_then(|c| c.get(label)).copied() else { continue };
            if let Some(mut channel) = participant.subscriber.channel(channel) {
                let _ = channel.write(true, &bytes);
                self.dirty.insert((*other, Pc::Subscriber));
            }
        }
    }

    /// A subscriber asked for a keyframe of a track it gets: the publisher is asked.
    fn relay_keyframe_request(&mut self, now: Instant, id: ParticipantId, request: &KeyframeRequest) {
        let Some(down) = self.participants.get(&id).and_then(|p| p.down.iter().find(|d| d.state.mid() == Some(request.mid))) else { return };
        let (publisher_id, track_sid, rid) = (down.publisher, down.track_sid.clone(), down.layers.current);
        let Some(publisher) = self.participants.get_mut(&publisher_id) else { return };
        let Some(track) = publisher.tracks.iter_mut().find(|t| t.info.sid == track_sid) else { return };
        let Some(mid) = track.mid else { return };
        if track.last_keyframe_request.is_some_and(|at| now.duration_since(at) < KEYFRAME_REQUEST_INTERVAL) {
            return;
        }
        track.last_keyframe_request = Some(now);
        if let Some(mut writer) = publisher.publisher.writer(mid) {
            let _ = writer.request_keyframe(rid, request.kind);
            self.dirty.insert((publisher_id, Pc::Publisher));
        }
    }
}

/// Adds a packet of a track to the room's recording: Opus audio, and VP8 video from a
/// keyframe on (of a simulcast track, the best layer arriving at that keyframe).
fn record(recording: &mut Recording, track: &Published, owner: &str, data: &MediaData, now: Instant) {
    let numer = data.time.numer();
    if let Some(file) = recording.tracks.get_mut(&track.info.sid) {
        if file.rid == data.rid {
            file.file.push(numer, &data.data);
        }
        return;
    }
    let file = match kind_of(&track.info) {
        MediaKind::Audio if data.params.spec().codec == str0m::format::Codec::Opus => RecordingFile::Audio(OggOpus::new(recording.tracks.len() as u32 + 1, 2)),
        MediaKind::Video if data.params.spec().codec == str0m::format::Codec::Vp8 && data.is_keyframe() => {
            let best = usable_layers(track, now).last().map(|(rid, _, _)| *rid);
            if data.rid.is_some() && data.rid != best {
                return;
            }
            RecordingFile::Video(Ivf::new())
        }
        _ => return,
    };
    let mut file = TrackFile { owner: owner.to_owned(), name: track.info.name.clone(), file, rid: data.rid };
    file.file.push(numer, &data.data);
    recording.tracks.insert(track.info.sid.clone(), file);
}

fn kind_of(info: &lk::TrackInfo) -> MediaKind {
    if info.r#type == lk::TrackType::Video as i32 { MediaKind::Video } else { MediaKind::Audio }
}

/// A stable room sid for a room name.
fn room_sid(room: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(room.as_bytes())[..6])
}

#[cfg(test)]
mod tests;
