//! The SFU on the in-memory network: what a LiveKit client sees in signalling, media from one
//! participant reaching another, and who may publish.

use std::time::Duration;

use livekit_protocol as lk;
use str0m::{
    format::Codec,
    media::{Frequency, MediaKind, MediaTime},
};

use super::SERVER_VERSION;
use crate::calls::loopback::Network;

const TICK: Duration = Duration::from_millis(5);

#[test]
fn a_participants_audio_reaches_the_other_after_the_signalling_livekit_clients_expect() {
    let mut net = Network::new();
    let ana = net.join("ana", true);
    let ben = net.join("ben", false);
    net.step(TICK);
    let Some(lk::signal_response::Message::Join(join)) = net.clients[ana].signals.first() else { panic!("the first message is the join: {:?}", net.clients[ana].signals) };
    let me = join.participant.as_ref().unwrap();
    assert!(me.sid.starts_with("PA_") && join.room.as_ref().unwrap().sid.starts_with("RM_"));
    assert!(join.ping_interval > 0 && join.ping_timeout > 0 && !join.subscriber_primary);
    assert_eq!(join.server_info.as_ref().unwrap().version, SERVER_VERSION);
    let ana_sid = me.sid.clone();

    let mid = net.publish(ana, MediaKind::Audio, "mic-1");
    let params = net.params(ana, Codec::Opus);
    let payload = vec![0xf8, 0xff, 0xfe, 7, 7, 7];
    for n in 0..400u64 {
        net.write(ana, mid, params, MediaTime::from_millis(n * 5).rebase(Frequency::FORTY_EIGHT_KHZ), &payload);
        net.step(TICK);
    }

    // Ana learnt her track's sid; Ben heard of it before the offer that carries it.
    let published = net.clients[ana].signals.iter().find_map(|m| match m { lk::signal_response::Message::TrackPublished(p) => p.track.clone(), _ => None }).expect("TrackPublished");
    assert!(published.sid.starts_with("TR_"));
    let signals = &net.clients[ben].signals;
    let update_at = signals.iter().position(|m| matches!(m, lk::signal_response::Message::Update(u) if u.participants.iter().any(|p| p.sid == ana_sid && p.tracks.iter().any(|t| t.sid == published.sid)))).expect("an update with ana's track");
    let offer_at = signals.iter().position(|m| matches!(m, lk::signal_response::Message::Offer(o) if o.sdp.contains(&format!("{ana_sid}|{}", published.sid)))).expect("an offer with ana's track");
    assert!(update_at < offer_at, "{signals:?}");
    assert!(net.clients[ben].frames > 100, "ben got {} frames", net.clients[ben].frames);
    assert_eq!(net.clients[ben].last_frame.as_deref(), Some(&payload[..]));

    // Ana leaves: Ben sees her disconnected.
    net.leave(ana);
    net.step(TICK);
    assert!(net.clients[ben].signals.iter().any(|m| matches!(m, lk::signal_response::Message::Update(u) if u.participants.iter().any(|p| p.sid == ana_sid && p.state == lk::participant_info::State::Disconnected as i32))));
}

#[test]
fn an_observer_cannot_publish() {
    let mut net = Network::new();
    let olga = net.join("olga", false);
    net.publish(olga, MediaKind::Audio, "mic-1");
    net.step(TICK);
    assert!(!net.clients[olga].signals.iter().any(|m| matches!(m, lk::signal_response::Message::TrackPublished(_))));
}
