//! The SFU benchmark's load client (docs/BENCHMARKS.md, "SFU side by side with Janus").
//!
//! P publishers each send simulcast VP8 (three layers) and Opus; S subscribers each receive
//! every publisher's audio and video: P × S × 2 down-tracks. Against Limbic the participants
//! are Matrix users with call tokens who speak LiveKit's signalling (over `/rtc/v1`, one
//! connection each, as LiveKit's SDKs do now; `--two-connections`: over `/rtc`, two); against
//! Janus they use the
//! VideoRoom plugin's HTTP API. Every frame carries its send time, so each subscriber measures
//! loss and latency: from the write on the publisher to the kernel receiving the frame's first
//! datagram for the subscriber (the publisher's str0m and the loopback included, the same for
//! both servers; the load's own time to read it is reported apart, as `read_latency_*`). The
//! server's CPU and RSS are read from /proc for the process `--pid`.
//!
//! Prints one Markdown table row, and appends the figures as a JSON line to `--json`.

mod arrival;
mod janus;
mod livekit;
mod peer;
mod probe;
mod stamp;

use std::{
    io::Write as _,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use serde_json::json;

use crate::{
    janus::Janus,
    livekit::Limbic,
    peer::{Peer, Shared},
    probe::{Process, percentile},
    stamp::Kind,
};

#[derive(Parser)]
#[command(about = "Loads an SFU (Limbic's or Janus's VideoRoom) with simulcast publishers and subscribers, and measures it")]
struct Args {
    /// A Limbic server's client API, e.g. http://127.0.0.1:8008.
    #[arg(long, conflicts_with = "janus", required_unless_present = "janus")]
    limbic: Option<String>,
    /// Janus's HTTP API, e.g. http://127.0.0.1:8088.
    #[arg(long)]
    janus: Option<String>,
    /// The server's process id, whose CPU time and RSS are measured.
    #[arg(long)]
    pid: u32,
    #[arg(long, default_value_t = 5)]
    publishers: u16,
    #[arg(long, default_value_t = 10)]
    subscribers: usize,
    /// Each simulcast layer's bitrate in kbit/s, lowest first (30 frames a second each).
    #[arg(long, value_delimiter = ',', default_values_t = [60, 150, 300])]
    layers_kbps: Vec<usize>,
    /// Seconds of media before the measurement.
    #[arg(long, default_value_t = 5)]
    warm_up: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The local address the load's WebRTC connections use (Janus offers no loopback
    /// candidate, so both servers are given one of this machine's own addresses).
    #[arg(long, default_value = "127.0.0.1")]
    address: std::net::IpAddr,
    /// Where to append the figures as a JSON line.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Against Limbic: join over `/rtc`, two connections per participant (as LiveKit's SDKs
    /// did before `/rtc/v1`), not over `/rtc/v1`, one each (as they do now).
    #[arg(long)]
    two_connections: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{what} was refused ({status}): {body}")]
    Refused { what: String, status: u16, body: String },
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected: {0}")]
    Protocol(&'static str),
    #[error("SDP: {0}")]
    Negotiation(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("bad arguments: {0}")]
    Arguments(&'static str),
}

/// The server the load is pointed at: Limbic with every participant's call token, or Janus
/// with the VideoRoom they join.
enum Target {
    Limbic { publishers: Vec<livekit::CallToken>, subscribers: Vec<livekit::CallToken> },
    Janus(Arc<Janus>, u64),
}

/// A subscriber, and when it started to join.
struct Subscriber {
    started: Instant,
    peer: Arc<Peer>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(figures) => {
            println!("{}", row(&figures));
            if let Some(path) = &args.json {
                let appended = std::fs::OpenOptions::new().create(true).append(true).open(path).and_then(|mut file| writeln!(file, "{figures}"));
                if let Err(error) = appended {
                    eprintln!("limbic-sfu-load: cannot write {}: {error}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("limbic-sfu-load: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<serde_json::Value, LoadError> {
    let frame_bytes: [usize; 3] = args.layers_kbps.iter().map(|kbps| kbps * 1000 / 8 / 30).collect::<Vec<_>>().try_into().map_err(|_| LoadError::Arguments("--layers-kbps takes three bitrates"))?;
    let server = Process::new(args.pid);
    let shared = Arc::new(Shared::new(args.address));
    let target = match (&args.limbic, &args.janus) {
        (Some(base), _) => {
            // Every participant's Matrix account and call token come first: neither is part of
            // joining the call, nor of the memory its participants take.
            let limbic = Limbic::new(base).await?;
            let mut publishers = Vec::new();
            for index in 0..args.publishers {
                publishers.push(limbic.call_token(&format!("publisher-{index}")).await?);
            }
            let mut subscribers = Vec::new();
            for index in 0..args.subscribers {
                subscribers.push(limbic.call_token(&format!("subscriber-{index}")).await?);
            }
            Target::Limbic { publishers, subscribers }
        }
        (None, Some(base)) => {
            let janus = Arc::new(Janus::new(base));
            let room = janus.create_room(usize::from(args.publishers)).await?;
            Target::Janus(janus, room)
        }
        (None, None) => return Err(LoadError::Arguments("--limbic or --janus")),
    };
    let rss_at_rest = server.rss_kib()?;

    let mut publishers = Vec::new();
    let mut feeds = Vec::new();
    for index in 0..args.publishers {
        let peer = match &target {
            Target::Limbic { publishers: tokens, .. } => {
                let participant = livekit::Participant::join(&shared, &tokens[usize::from(index)], Some((index, frame_bytes)), !args.two_connections).await?;
                participant.publisher.ok_or(LoadError::Protocol("a publisher without a publisher connection"))?
            }
            Target::Janus(janus, room) => {
                let participant = janus.publish(&shared, *room, index, frame_bytes).await?;
                feeds.extend(participant.feed);
                participant.peer
            }
        };
        publishers.push(peer);
    }
    wait_for("every publisher to connect", Duration::from_secs(20), || publishers.iter().all(|p| p.stats.lock().expect("stats").connected.is_some())).await?;

    let mut subscribers = Vec::new();
    for index in 0..args.subscribers {
        let started = Instant::now();
        let peer = match &target {
            Target::Limbic { subscribers: tokens, .. } => livekit::Participant::join(&shared, &tokens[index], None, !args.two_connections).await?.subscriber,
            Target::Janus(janus, room) => janus.subscribe(&shared, *room, &feeds).await?.peer,
        };
        subscribers.push(Subscriber { started, peer });
    }
    let tracks = usize::from(args.publishers) * 2;
    // Media on every down-track, or on as many as the server manages within the time.
    let _ = wait_for("media on every down-track", Duration::from_secs(30), || subscribers.iter().all(|s| s.peer.stats.lock().expect("stats").tracks_seen.len() >= tracks)).await;

    tokio::time::sleep(Duration::from_secs(args.warm_up)).await;
    let (server_before, load_before, started) = (server.cpu_seconds()?, Process::own().cpu_seconds()?, Instant::now());
    shared.open_window();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    shared.close_window();
    let (server_after, load_after, wall) = (server.cpu_seconds()?, Process::own().cpu_seconds()?, started.elapsed().as_secs_f64());
    let rss_loaded = server.rss_kib()?;
    // What was sent inside the window and is still on its way arrives.
    tokio::time::sleep(Duration::from_secs(1)).await;

    Ok(figures(args, &target, &publishers, &subscribers, Measured { server_cpu: (server_after - server_before) / wall, load_cpu: (load_after - load_before) / wall, rss_at_rest, rss_loaded, wall }))
}

struct Measured {
    /// Shares of a core.
    server_cpu: f64,
    load_cpu: f64,
    rss_at_rest: u64,
    rss_loaded: u64,
    wall: f64,
}

fn figures(args: &Args, target: &Target, publishers: &[Arc<Peer>], subscribers: &[Subscriber], measured: Measured) -> serde_json::Value {
    let sent: Vec<[u64; 2]> = publishers.iter().map(|p| {
        let stats = p.stats.lock().expect("stats");
        [Kind::Audio, Kind::Video].map(|kind| stats.sent.get(&kind).copied().unwrap_or(0))
    }).collect();
    let (mut expected, mut received, mut flowing, mut video_bytes) = (0u64, 0u64, 0usize, 0u64);
    let (mut latencies, mut read_latencies, mut joins): ([Vec<u32>; 2], Vec<u32>, _) = (Default::default(), Vec::new(), Vec::new());
    for subscriber in subscribers {
        let stats = subscriber.peer.stats.lock().expect("stats");
        for (publisher, sent) in sent.iter().enumerate() {
            let publisher = u16::try_from(publisher).unwrap_or(u16::MAX);
            for (kind, sent) in [Kind::Audio, Kind::Video].into_iter().zip(sent) {
                let got = stats.received.get(&(publisher, kind)).copied().unwrap_or(0);
                expected += sent;
                received += got.min(*sent);
                flowing += usize::from(got > 0);
            }
        }
        video_bytes += stats.video_bytes;
        read_latencies.extend_from_slice(&stats.read_latencies_us);
        for (all, of_one) in latencies.iter_mut().zip(&stats.latencies_us) {
            all.extend_from_slice(of_one);
        }
        joins.extend(stats.first_media.map(|first| first.saturating_duration_since(subscriber.started)));
    }
    read_latencies.sort_unstable();
    let mut all_latencies = latencies.concat();
    all_latencies.sort_unstable();
    for of_kind in &mut latencies {
        of_kind.sort_unstable();
    }
    joins.sort_unstable();
    let down_tracks = usize::from(args.publishers) * 2 * subscribers.len();
    let participants = usize::from(args.publishers) + subscribers.len();
    let video_down_tracks = (usize::from(args.publishers) * subscribers.len()).max(1);
    let ms = |us: u32| f64::from(us) / 1000.0;
    json!({
        "server": match target { Target::Limbic { .. } if args.two_connections => "limbic-rtc", Target::Limbic { .. } => "limbic", Target::Janus(..) => "janus" },
        "publishers": args.publishers,
        "subscribers": subscribers.len(),
        "down_tracks": down_tracks,
        "down_tracks_flowing": flowing,
        "server_cpu_share": measured.server_cpu,
        "down_tracks_per_core": down_tracks as f64 / measured.server_cpu.max(1e-9),
        "rss_at_rest_mib": measured.rss_at_rest as f64 / 1024.0,
        "rss_loaded_mib": measured.rss_loaded as f64 / 1024.0,
        "rss_per_participant_kib": measured.rss_loaded.saturating_sub(measured.rss_at_rest) as f64 / participants as f64,
        "loss": if expected == 0 { 1.0 } else { 1.0 - received as f64 / expected as f64 },
        "latency_p50_ms": ms(percentile(&all_latencies, 0.5).unwrap_or(0)),
        "latency_p99_ms": ms(percentile(&all_latencies, 0.99).unwrap_or(0)),
        "audio_latency_p50_ms": ms(percentile(&latencies[Kind::Audio as usize], 0.5).unwrap_or(0)),
        "audio_latency_p99_ms": ms(percentile(&latencies[Kind::Audio as usize], 0.99).unwrap_or(0)),
        "video_latency_p50_ms": ms(percentile(&latencies[Kind::Video as usize], 0.5).unwrap_or(0)),
        "video_latency_p99_ms": ms(percentile(&latencies[Kind::Video as usize], 0.99).unwrap_or(0)),
        "read_latency_p50_ms": ms(percentile(&read_latencies, 0.5).unwrap_or(0)),
        "read_latency_p99_ms": ms(percentile(&read_latencies, 0.99).unwrap_or(0)),
        "frames_timed": all_latencies.len(),
        "video_kbps_per_down_track": video_bytes as f64 * 8.0 / 1000.0 / measured.wall / video_down_tracks as f64,
        "join_p50_ms": percentile(&joins, 0.5).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
        "join_max_ms": joins.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
        "joined": joins.len(),
        "load_cpu_share": measured.load_cpu,
        "seconds": measured.wall,
        "layers_kbps": args.layers_kbps,
    })
}

/// The figures as a row of docs/BENCHMARKS.md's table.
fn row(f: &serde_json::Value) -> String {
    let n = |key: &str| f[key].as_f64().unwrap_or(f64::NAN);
    format!(
        "| {} | {} ({}×{}, {} flowing) | {:.0} % | {:.0} | {:.1} → {:.1} MiB ({:.0} KiB/participant) | {:.2} % | {:.2} / {:.2} ms | {:.0} kbit/s | {:.0} / {:.0} ms ({}/{} joined) | {:.0} % |",
        f["server"].as_str().unwrap_or("?"),
        f["down_tracks"], f["publishers"], f["subscribers"], f["down_tracks_flowing"],
        n("server_cpu_share") * 100.0,
        n("down_tracks_per_core"),
        n("rss_at_rest_mib"), n("rss_loaded_mib"), n("rss_per_participant_kib"),
        n("loss") * 100.0,
        n("latency_p50_ms"), n("latency_p99_ms"),
        n("video_kbps_per_down_track"),
        n("join_p50_ms"), n("join_max_ms"), f["joined"], f["subscribers"],
        n("load_cpu_share") * 100.0,
    )
}

/// Polls `done` every 50 ms for at most `within`.
async fn wait_for(what: &'static str, within: Duration, done: impl Fn() -> bool) -> Result<(), LoadError> {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            return Err(LoadError::Timeout(what));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
