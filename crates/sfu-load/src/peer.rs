//! One WebRTC connection of the load: a str0m `Rtc` on its own UDP socket, driven by
//! its own task. A publisher's sends simulcast VP8 (three layers, one frame time) and Opus, every
//! frame stamped; a subscriber's counts the stamped frames it gets and times them.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use str0m::{
    Candidate, Event, Input, Output, Rtc,
    change::{SdpAnswer, SdpOffer, SdpPendingOffer},
    format::Codec,
    media::{Direction, Frequency, KeyframeRequest, MediaData, MediaKind, MediaTime, Mid, Rid, Simulcast, SimulcastLayer},
    net::{Protocol, Receive},
};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot},
};

use crate::{
    arrival,
    stamp::{Kind, Stamp},
};

/// How many datagrams' kernel arrival times a connection remembers, to find a frame's first.
const ARRIVALS_KEPT: usize = 64;

/// The simulcast layers a publisher sends, lowest first, as LiveKit's SDKs name them.
pub const RIDS: [&str; 3] = ["q", "h", "f"];
const VIDEO_EVERY: Duration = Duration::from_nanos(1_000_000_000 / 30);
const AUDIO_EVERY: Duration = Duration::from_millis(20);
const KEYFRAME_EVERY: Duration = Duration::from_secs(2);
/// An Opus packet of 32 kbit/s at 20 ms.
const AUDIO_BYTES: usize = 80;

/// What every connection of one load run shares: the epoch stamps count from, and the window
/// whose frames are counted.
pub struct Shared {
    pub epoch: Instant,
    /// The local address every connection's socket is bound to.
    address: IpAddr,
    window: [AtomicU64; 2],
}

impl Shared {
    pub fn new(address: IpAddr) -> Self {
        Self { epoch: Instant::now(), address, window: [AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)] }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Frames sent from now on count, until [`Shared::close_window`].
    pub fn open_window(&self) {
        self.window[0].store(self.nanos(Instant::now()), Ordering::SeqCst);
    }

    pub fn close_window(&self) {
        self.window[1].store(self.nanos(Instant::now()), Ordering::SeqCst);
    }

    fn in_window(&self, sent_nanos: u64) -> bool {
        (self.window[0].load(Ordering::Relaxed)..self.window[1].load(Ordering::Relaxed)).contains(&sent_nanos)
    }
}

/// What one connection did, frames counted only when sent within the window.
#[derive(Default)]
pub struct Stats {
    pub connected: Option<Instant>,
    pub first_media: Option<Instant>,
    /// A publisher's frames sent, per kind (a video frame counts once for its three layers).
    pub sent: HashMap<Kind, u64>,
    /// A subscriber's frames received, per publisher track.
    pub received: HashMap<(u16, Kind), u64>,
    /// Every track it got a stamped frame of, within the window or not.
    pub tracks_seen: HashSet<(u16, Kind)>,
    pub video_bytes: u64,
    /// Microseconds from the publisher's write to the kernel receiving the frame's first
    /// datagram, per kind (indexed by [`Kind`]).
    pub latencies_us: [Vec<u32>; 2],
    /// The same, to when the load read that datagram (its own queueing included).
    pub read_latencies_us: Vec<u32>,
}

/// A connection's running task, told what to do with the other side's session descriptions.
pub struct Peer {
    commands: mpsc::Sender<Command>,
    pub stats: Arc<Mutex<Stats>>,
}

enum Command {
    Offer(String, oneshot::Sender<Result<String, String>>),
    Answer(String, oneshot::Sender<Result<(), String>>),
    /// Lines to receive on (audio, video): the offer that adds them.
    Receive(u32, u32, oneshot::Sender<Result<String, String>>),
    /// Starts publishing as publisher number `.0` with those frame sizes: the offer that adds
    /// the audio and simulcast video lines.
    Publish(u16, [usize; 3], oneshot::Sender<Result<String, String>>),
}

/// How far a publisher is in its media.
struct Sending {
    publisher: u16,
    audio: Mid,
    video: Mid,
    frame_bytes: [usize; 3],
    next_audio: Instant,
    next_video: Instant,
    frames: u64,
    audio_packets: u64,
    keyframe_due: [Instant; 3],
}

impl Peer {
    /// A publisher connection (`frame_bytes`: each layer's frame size, lowest first), and its
    /// offer. Publishers are spread over a frame time by their index.
    pub async fn publisher(shared: Arc<Shared>, publisher: u16, frame_bytes: [usize; 3]) -> io::Result<(Self, String)> {
        let (mut rtc, socket) = connection(shared.address).await?;
        let mut changes = rtc.sdp_api();
        let (audio, video) = publishing_lines(&mut changes);
        let (offer, pending) = changes.apply().expect("an offer of two media lines");
        let sending = Sending::new(publisher, audio, video, frame_bytes);
        Ok((Self::start(shared, rtc, socket, Some(pending), Some(sending)), offer.to_sdp_string()))
    }

    /// A single connection (LiveKit's `/rtc/v1`) and its first offer: `lines` lines to receive
    /// on of each kind, as LiveKit's SDKs offer them before they publish anything.
    pub async fn single(shared: Arc<Shared>, lines: usize) -> io::Result<(Self, String)> {
        let (mut rtc, socket) = connection(shared.address).await?;
        let mut changes = rtc.sdp_api();
        for kind in [MediaKind::Audio, MediaKind::Video] {
            for _ in 0..lines {
                changes.add_media(kind, Direction::RecvOnly, None, None, None);
            }
        }
        let (offer, pending) = changes.apply().expect("an offer of lines to receive on");
        Ok((Self::start(shared, rtc, socket, Some(pending), None), offer.to_sdp_string()))
    }

    /// A connection that takes the SFU's offers and receives.
    pub async fn subscriber(shared: Arc<Shared>) -> io::Result<Self> {
        let (rtc, socket) = connection(shared.address).await?;
        Ok(Self::start(shared, rtc, socket, None, None))
    }

    fn start(shared: Arc<Shared>, rtc: Rtc, socket: UdpSocket, pending: Option<SdpPendingOffer>, sending: Option<Sending>) -> Self {
        let (commands, received) = mpsc::channel(4);
        let stats = Arc::new(Mutex::new(Stats::default()));
        tokio::spawn(run(Driver { rtc, socket, pending, sending, shared, stats: stats.clone(), arrivals: VecDeque::new() }, received));
        Self { commands, stats }
    }

    /// Takes the other side's offer; the answer.
    pub async fn accept_offer(&self, sdp: String) -> Result<String, String> {
        self.ask(|reply| Command::Offer(sdp, reply)).await
    }

    /// Takes the other side's answer to this publisher's offer.
    pub async fn accept_answer(&self, sdp: String) -> Result<(), String> {
        self.ask(|reply| Command::Answer(sdp, reply)).await
    }

    /// The offer of a single connection asked for more lines to receive on.
    pub async fn offer_to_receive(&self, audios: u32, videos: u32) -> Result<String, String> {
        self.ask(|reply| Command::Receive(audios, videos, reply)).await
    }

    /// The offer of a single connection that starts publishing.
    pub async fn offer_to_publish(&self, publisher: u16, frame_bytes: [usize; 3]) -> Result<String, String> {
        self.ask(|reply| Command::Publish(publisher, frame_bytes, reply)).await
    }

    /// Hands the connection's task a command and waits for its reply.
    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Command) -> Result<T, String> {
        fn ended<E>(_: E) -> String {
            "the connection's task ended".to_owned()
        }
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).await.map_err(ended)?;
        answer.await.map_err(ended)?
    }
}

/// An `Rtc` with the codecs both servers forward, and its socket on `address` as its one
/// candidate.
async fn connection(address: IpAddr) -> io::Result<(Rtc, UdpSocket)> {
    let socket = UdpSocket::bind((address, 0)).await?;
    arrival::enable(&socket)?;
    let mut rtc = Rtc::builder().clear_codecs().enable_opus(true, false).enable_vp8(true).build(Instant::now());
    let candidate = Candidate::host(socket.local_addr()?, Protocol::Udp).map_err(io::Error::other)?;
    rtc.add_local_candidate(candidate);
    Ok((rtc, socket))
}

struct Driver {
    rtc: Rtc,
    socket: UdpSocket,
    pending: Option<SdpPendingOffer>,
    sending: Option<Sending>,
    shared: Arc<Shared>,
    stats: Arc<Mutex<Stats>>,
    /// When the last datagrams were read (the time str0m was given), and when the kernel got them.
    arrivals: VecDeque<(Instant, Instant)>,
}

async fn run(mut driver: Driver, mut commands: mpsc::Receiver<Command>) {
    let local = match driver.socket.local_addr() {
        Ok(local) => local,
        Err(_) => return,
    };
    let mut datagram = vec![0u8; 2048];
    loop {
        let Some(timeout) = driver.drain().await else { return };
        let due = driver.sending.as_ref().map_or(timeout, |s| timeout.min(s.next_audio).min(s.next_video));
        tokio::select! {
            command = commands.recv() => match command {
                Some(command) => driver.apply(command),
                None => return,
            },
            received = arrival::recv(&driver.socket, &mut datagram) => {
                let now = Instant::now();
                if let Ok((length, source, arrived)) = received {
                    if driver.arrivals.len() == ARRIVALS_KEPT {
                        driver.arrivals.pop_front();
                    }
                    driver.arrivals.push_back((now, arrived.unwrap_or(now).min(now)));
                    driver.receive(now, source, local, &datagram[..length]);
                }
            }
            () = tokio::time::sleep_until(due.into()) => {}
        }
        let now = Instant::now();
        driver.send_due(now);
        if driver.rtc.handle_input(Input::Timeout(now)).is_err() {
            return;
        }
    }
}

impl Driver {
    /// Sends what str0m has to send and handles its events; when it next wants the time, or
    /// `None` once it has failed.
    async fn drain(&mut self) -> Option<Instant> {
        loop {
            match limbic_sfu::poll_output(&mut self.rtc, Instant::now()) {
                Ok(Output::Timeout(at)) => return Some(at),
                Ok(Output::Transmit(transmit)) => {
                    let _ = self.socket.send_to(&transmit.contents, transmit.destination).await;
                }
                Ok(Output::Event(event)) => self.event(event),
                Err(_) => return None,
            }
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Connected => self.stats.lock().expect("stats").connected = Some(Instant::now()),
            Event::MediaData(data) => self.media(&data),
            Event::KeyframeRequest(KeyframeRequest { rid, .. }) => {
                if let Some(sending) = &mut self.sending {
                    let now = Instant::now();
                    for (layer, name) in RIDS.iter().enumerate() {
                        if rid.is_none_or(|rid| rid == Rid::from(*name)) {
                            sending.keyframe_due[layer] = now;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn media(&mut self, data: &MediaData) {
        let kind = if data.params.spec().codec == Codec::Vp8 { Kind::Video } else { Kind::Audio };
        let Some(stamp) = Stamp::of(kind, &data.data) else { return };
        let mut stats = self.stats.lock().expect("stats");
        stats.first_media.get_or_insert(data.network_time);
        stats.tracks_seen.insert((stamp.publisher, kind));
        if !self.shared.in_window(stamp.sent_nanos) {
            return;
        }
        *stats.received.entry((stamp.publisher, kind)).or_default() += 1;
        if kind == Kind::Video {
            stats.video_bytes += data.data.len() as u64;
        }
        let sent = self.shared.epoch + Duration::from_nanos(stamp.sent_nanos);
        let arrived = self.arrivals.iter().rev().find(|(read, _)| *read == data.network_time).map_or(data.network_time, |(_, arrived)| *arrived);
        let micros = |since: Instant| u32::try_from(since.saturating_duration_since(sent).as_micros()).unwrap_or(u32::MAX);
        stats.latencies_us[kind as usize].push(micros(arrived));
        stats.read_latencies_us.push(micros(data.network_time));
    }

    fn receive(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, datagram: &[u8]) {
        if let Ok(contents) = datagram.try_into() {
            let _ = self.rtc.handle_input(Input::Receive(now, Receive { proto: Protocol::Udp, source, destination, contents }));
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Offer(sdp, reply) => {
                let answer = SdpOffer::from_sdp_string(&sdp)
                    .map_err(|e| format!("an unreadable offer: {e}"))
                    .and_then(|offer| self.rtc.sdp_api().accept_offer(offer).map_err(|e| format!("the offer is refused: {e}")))
                    .map(|answer| answer.to_sdp_string());
                let _ = reply.send(answer);
            }
            Command::Receive(audios, videos, reply) => {
                let mut changes = self.rtc.sdp_api();
                for (kind, count) in [(MediaKind::Audio, audios), (MediaKind::Video, videos)] {
                    for _ in 0..count {
                        changes.add_media(kind, Direction::RecvOnly, None, None, None);
                    }
                }
                // str0m offers only a change: asked for an offer alone, it adds a spare line.
                if audios + videos == 0 {
                    changes.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
                }
                let _ = reply.send(offer(changes, &mut self.pending));
            }
            Command::Publish(publisher, frame_bytes, reply) => {
                let mut changes = self.rtc.sdp_api();
                let (audio, video) = publishing_lines(&mut changes);
                let offer = offer(changes, &mut self.pending);
                if offer.is_ok() {
                    self.sending = Some(Sending::new(publisher, audio, video, frame_bytes));
                }
                let _ = reply.send(offer);
            }
            Command::Answer(sdp, reply) => {
                let accepted = match (self.pending.take(), SdpAnswer::from_sdp_string(&sdp)) {
                    (None, _) => Err("no offer is pending".to_owned()),
                    (_, Err(e)) => Err(format!("an unreadable answer: {e}")),
                    (Some(pending), Ok(answer)) => self.rtc.sdp_api().accept_answer(pending, answer).map_err(|e| format!("the answer is refused: {e}")),
                };
                let _ = reply.send(accepted);
            }
        }
    }

    /// A publisher writes the frames that are due: nothing before it is connected, and a
    /// frame time it fell behind on is skipped rather than sent in a burst.
    fn send_due(&mut self, now: Instant) {
        let Some(sending) = &mut self.sending else { return };
        if !self.rtc.is_connected() {
            sending.next_audio = sending.next_audio.max(now);
            sending.next_video = sending.next_video.max(now);
            return;
        }
        let sent_nanos = self.shared.nanos(now);
        let counted = self.shared.in_window(sent_nanos);
        if now >= sending.next_audio {
            let stamp = Stamp { sent_nanos, publisher: sending.publisher, kind: Kind::Audio };
            let time = MediaTime::new(sending.audio_packets * 960, Frequency::FORTY_EIGHT_KHZ);
            if write(&mut self.rtc, sending.audio, Codec::Opus, None, now, time, stamp.audio_frame(AUDIO_BYTES)) && counted {
                *self.stats.lock().expect("stats").sent.entry(Kind::Audio).or_default() += 1;
            }
            sending.audio_packets += 1;
            sending.next_audio = (sending.next_audio + AUDIO_EVERY).max(now);
        }
        if now >= sending.next_video {
            let stamp = Stamp { sent_nanos, publisher: sending.publisher, kind: Kind::Video };
            let time = MediaTime::new(sending.frames * 3000, Frequency::NINETY_KHZ);
            let mut written = false;
            for (layer, rid) in RIDS.iter().enumerate() {
                let keyframe = now >= sending.keyframe_due[layer];
                if keyframe {
                    sending.keyframe_due[layer] = now + KEYFRAME_EVERY;
                }
                written |= write(&mut self.rtc, sending.video, Codec::Vp8, Some(Rid::from(*rid)), now, time, stamp.video_frame(keyframe, sending.frame_bytes[layer]));
            }
            if written && counted {
                *self.stats.lock().expect("stats").sent.entry(Kind::Video).or_default() += 1;
            }
            sending.frames += 1;
            sending.next_video = (sending.next_video + VIDEO_EVERY).max(now);
        }
    }
}

/// Writes one frame of `codec` on media line `mid` (on layer `rid`); whether it was taken.
fn write(rtc: &mut Rtc, mid: Mid, codec: Codec, rid: Option<Rid>, now: Instant, time: MediaTime, frame: Vec<u8>) -> bool {
    let Some(writer) = rtc.writer(mid) else { return false };
    let Some(pt) = writer.payload_params().find(|p| p.spec().codec == codec).map(|p| p.pt()) else { return false };
    let writer = match rid {
        Some(rid) => writer.rid(rid),
        None => writer,
    };
    writer.write(pt, now, time, frame).is_ok()
}

/// A publisher's lines: audio, and video in the simulcast layers `RIDS`.
fn publishing_lines(changes: &mut str0m::change::SdpApi<'_>) -> (Mid, Mid) {
    let audio = changes.add_media(MediaKind::Audio, Direction::SendOnly, Some("load".into()), Some("audio".into()), None);
    let mut simulcast = Simulcast::new();
    for rid in RIDS {
        simulcast.add_send_layer(SimulcastLayer::new(rid));
    }
    let video = changes.add_media(MediaKind::Video, Direction::SendOnly, Some("load".into()), Some("video".into()), Some(simulcast));
    (audio, video)
}

impl Sending {
    /// Publisher number `publisher` starts; publishers are spread over a frame time by their index.
    fn new(publisher: u16, audio: Mid, video: Mid, frame_bytes: [usize; 3]) -> Self {
        let start = Instant::now() + VIDEO_EVERY.mul_f64(f64::from(publisher % 16) / 16.0);
        Self { publisher, audio, video, frame_bytes, next_audio: start, next_video: start, frames: 0, audio_packets: 0, keyframe_due: [start; 3] }
    }
}

/// The offer of `changes`, whose answer is then awaited (`pending`).
fn offer(changes: str0m::change::SdpApi<'_>, pending: &mut Option<SdpPendingOffer>) -> Result<String, String> {
    let (offer, waiting) = changes.apply().ok_or("nothing to offer")?;
    *pending = Some(waiting);
    Ok(offer.to_sdp_string())
}
