//! Rights that end during a call end the call for that participant: whoever is kicked, banned
//! or leaves the call's room, is removed from its session, loses the role their call token was
//! issued for, or whose session (or breakout) is over, is dropped from the call with LiveKit's
//! `leave` (`PARTICIPANT_REMOVED`; `ROOM_CLOSED` when the call closed for everyone), and the
//! others see them go.
//!
//! Each such change is an event committed to the call's room, or for a breakout room to its
//! session room, and every commit advances the stream watermark that also wakes `/sync`, the
//! federation sender and the plugins. The warden waits on that watermark and checks again, with
//! the rule that issued the token ([`super::still_allowed`]), only the participants of call
//! rooms whose timeline moved (each room's newest position is kept in memory). So a kick takes
//! effect milliseconds after its commit, whatever path committed it (client or admin API,
//! federation, plugins), and commits elsewhere cost a map look-up per live call; a periodic
//! sweep would read every participant's state each period and still lag by up to that period.

use std::{collections::HashMap, sync::Arc};

use livekit_protocol as lk;
use ruma::{OwnedRoomId, RoomId};

use super::{
    breakout_of, open_session_call,
    sfu::{Live, ParticipantId},
    still_allowed,
};
use super::CallsHost;
use crate::{rooms::Rooms, store::StreamPos};

/// What the warden knows of a live call's Matrix room.
struct Watched {
    /// The rooms whose events can change rights in this room's call: itself, and a breakout's
    /// session room.
    governing: Vec<OwnedRoomId>,
    /// The watermark up to which its participants were checked.
    checked_at: StreamPos,
}

pub async fn run(server: Arc<dyn CallsHost>) {
    let Some(sfu) = server.calls().sfu.get().cloned() else { return };
    let mut watermark = server.store().streams().subscribe();
    let mut shutdown = server.shutting_down();
    let mut watched: HashMap<OwnedRoomId, Watched> = HashMap::new();
    // The recorded rooms, and the position up to which their events were looked at.
    let mut recorded: HashMap<OwnedRoomId, StreamPos> = HashMap::new();
    let mut previous = *watermark.borrow_and_update();
    loop {
        tokio::select! {
            changed = watermark.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
        // Read before the state: a commit racing with this round is looked at in the next one.
        let upto = *watermark.borrow_and_update();
        let Some(live) = sfu.run(|sfu, _| sfu.live()).await else { return };
        let expelled = check(&server.rooms(), &mut watched, live, upto);
        if !expelled.is_empty() {
            sfu.run(move |sfu, _| {
                for (id, reason) in expelled {
                    sfu.disconnect(id, reason);
                }
            })
            .await;
        }
        stop_recordings(&server, &sfu, &mut recorded, previous, upto).await;
        previous = upto;
    }
}

/// Stops the recordings made here that events committed since the last round stop (on any
/// node), in tasks of their own: storing a recording takes a while, and drops wait for nothing.
/// A recording first seen now is looked at from the last round's watermark on; what stopped it
/// before that was seen when it started (`start` checks consent and the session's status).
async fn stop_recordings(server: &Arc<dyn CallsHost>, sfu: &super::media::SfuHandle, recorded: &mut HashMap<OwnedRoomId, StreamPos>, previous: StreamPos, upto: StreamPos) {
    let Some(rooms) = sfu.run(|sfu, _| sfu.recorded_rooms()).await else { return };
    let rooms: Vec<OwnedRoomId> = rooms.into_iter().filter_map(|room| OwnedRoomId::try_from(room).ok()).collect();
    recorded.retain(|room, _| rooms.contains(room));
    for room in rooms {
        let after = *recorded.entry(room.clone()).or_insert(previous);
        if after >= upto {
            continue;
        }
        recorded.insert(room.clone(), upto);
        let server = server.clone();
        tokio::spawn(async move {
            if let Err(error) = super::recording::stop_on_committed(&*server, &room, after, upto).await {
                tracing::error!(%room, %error, "could not look at a recorded room's events");
            }
        });
    }
}

/// The participants of `live` to drop, and why: those in call rooms whose governing rooms moved
/// since they were last checked, who no longer have the rights of their token.
fn check(rooms: &Rooms, watched: &mut HashMap<OwnedRoomId, Watched>, live: Vec<Live>, upto: StreamPos) -> Vec<(ParticipantId, lk::DisconnectReason)> {
    let mut by_room: HashMap<OwnedRoomId, Vec<Live>> = HashMap::new();
    for participant in live {
        if let Ok(room) = OwnedRoomId::try_from(participant.app_room.as_str()) {
            by_room.entry(room).or_default().push(participant);
        }
    }
    watched.retain(|room, _| by_room.contains_key(room));
    let mut expelled = Vec::new();
    for (room, participants) in by_room {
        let moved = match watched.get(&room) {
            Some(seen) => seen.governing.iter().any(|governing| rooms.latest_timeline_pos(governing).ok().flatten().is_none_or(|pos| pos > seen.checked_at)),
            None => true,
        };
        if !moved {
            continue;
        }
        watched.insert(room.clone(), Watched { governing: governing(rooms, &room), checked_at: upto });
        // A call that closed for everyone (the session is over, the breakout closed) says so.
        let reason = if open_session_call(rooms, &room).is_ok() { lk::DisconnectReason::ParticipantRemoved } else { lk::DisconnectReason::RoomClosed };
        for participant in participants {
            if let Err(error) = still_allowed(rooms, &room, &participant.app_user, participant.rights) {
                tracing::info!(%room, user = %participant.app_user, participant = participant.id, %error, "dropped from a call: its rights ended");
                expelled.push((participant.id, reason));
            }
        }
    }
    expelled
}

fn governing(rooms: &Rooms, room: &RoomId) -> Vec<OwnedRoomId> {
    match breakout_of(rooms, room) {
        Ok(Some((session_room, _))) => vec![room.to_owned(), session_room],
        _ => vec![room.to_owned()],
    }
}
