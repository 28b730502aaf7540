//! Forwarding capacity of the SFU: one publisher sends 1 Mbit/s of VP8-framed video (30 frames
//! a second of about 4.2 kB) to N subscribers, through the real SFU core (DTLS-SRTP, RTP
//! packetization, NACK/TWCC) on the in-memory network of `limbic_sfu::loopback`, on a
//! virtual clock. Only time inside the SFU is counted, so the str0m peers playing the clients
//! cost nothing here.
//!
//! Reported per N: down-tracks one core sustains (N over the share of a core the SFU needs per
//! second of media), loss (frames the subscribers did not get), and how long the SFU takes to
//! handle one of the publisher's datagrams and forward it to every subscriber (p50, p99): the
//! added forwarding latency, counted until the last subscriber's copy is out.
//!
//! Run: `cargo bench -p limbic-sfu --features testing --bench sfu_forwarding [-- N...]`

use std::time::Duration;

use limbic_sfu::loopback::Network;
use str0m::{
    format::Codec,
    media::{Frequency, MediaKind, MediaTime},
};

const FPS: u64 = 30;
const BITRATE: u64 = 1_000_000;
const WARM_UP_SECONDS: u64 = 2;
const MEASURED_SECONDS: u64 = 5;
const TICK: Duration = Duration::from_millis(1);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn run(subscribers: usize) {
    let mut net = Network::new();
    let publisher = net.join("publisher", true);
    for n in 0..subscribers {
        net.join(&format!("subscriber-{n}"), false);
    }
    let mid = net.publish(publisher, MediaKind::Video, "camera");
    let params = net.params(publisher, Codec::Vp8);
    let frame_bytes = (BITRATE / 8 / FPS) as usize;
    let frame_every = 1000 / FPS;

    let total_ms = (WARM_UP_SECONDS + MEASURED_SECONDS) * 1000;
    let (mut sent, mut frames_before) = (0u64, 0usize);
    for ms in 0..total_ms {
        if ms == WARM_UP_SECONDS * 1000 {
            net.sfu_time = Duration::ZERO;
            net.timing = true;
            frames_before = net.clients[1..].iter().map(|c| c.frames).sum();
            sent = 0;
        }
        if ms % frame_every == 0 {
            // The first frame of every 2 s a keyframe (VP8: bit 0 of the first byte clear), deltas
            // between; each subscriber's video starts at a keyframe.
            let mut frame = vec![0x5a_u8; frame_bytes];
            frame[0] = if ms % 2000 < frame_every { 0x10 } else { 0x11 };
            if net.write(publisher, mid, params, MediaTime::from_millis(ms).rebase(Frequency::NINETY_KHZ), &frame) && net.timing {
                sent += 1;
            }
        }
        net.step(TICK);
    }
    // What is still in flight arrives; nothing more is sent.
    net.timing = false;
    for _ in 0..300 {
        net.step(TICK);
    }
    let received: usize = net.clients[1..].iter().map(|c| c.frames).sum::<usize>() - frames_before;
    let expected = sent as usize * subscribers;
    let loss = if expected == 0 { 1.0 } else { 1.0 - received as f64 / expected as f64 };
    let core_share = net.sfu_time.as_secs_f64() / MEASURED_SECONDS as f64;
    let per_core = subscribers as f64 / core_share;
    // The publisher's datagrams: each is forwarded to every subscriber before the SFU returns.
    let from = net.clients[publisher].publisher_addr();
    let mut times: Vec<Duration> = net.receive_times.iter().filter(|(source, _)| *source == from).map(|(_, took)| *took).collect();
    times.sort();
    println!(
        "{subscribers:>5} down-tracks at 1 Mbit/s: SFU busy {:>5.1}% of a core -> {:>6.0} down-tracks/core; loss {:>5.2}%; forwarding a datagram to all: p50 {:>7.1} µs, p99 {:>7.1} µs ({} datagrams)",
        core_share * 100.0,
        per_core,
        loss.max(0.0) * 100.0,
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
        times.len(),
    );
}

fn main() {
    let counts: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let counts = if counts.is_empty() { vec![10, 50, 100, 200] } else { counts };
    for n in counts {
        run(n);
    }
}
