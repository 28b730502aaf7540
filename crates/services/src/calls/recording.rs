//! Recording a therapy session's call: only where the session's policy allows it, started and
//! stopped by its therapists, only while every participant in the call has consented
//! (`org.limbic.recording.consent`), and stopped the moment one withdraws (or someone joins
//! without consent). Each track becomes a file (Ogg/Opus, IVF/VP8), written to disk as it is
//! made ([`super::spool`]) and stored in the media repository when the recording stops,
//! announced in the room; `org.limbic.recording` in the room says whether it is recording. A
//! recording the server stopped for (a crash, a restart) is stored at the next start.

use std::{sync::{Arc, Weak}, time::Duration};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::Serialize;
use serde_json::{Value as JsonValue, json};
use str0m::media::MediaKind;

use super::{CallsHost, spool::Spool};
use crate::{
    audit::AuditRecord,
    clinic::{RECORDING, RECORDING_CONSENT, RecordingPolicy, Role, SESSION, Status, session_role},
    error::{Error, ErrorCode, Result},
    events::{Pdu, PduBuilder},
    media::Upload,
    rooms::{AfterCommit, FollowUp},
    store::StreamPos,
};

/// Whether `user` consented to the session's call being recorded.
pub fn consented(server: &dyn CallsHost, room_id: &RoomId, user: &str) -> Result<bool> {
    let consent = server.rooms().state_content(room_id, RECORDING_CONSENT, user)?;
    Ok(consent.and_then(|c| c.get("consent").and_then(JsonValue::as_bool)) == Some(true))
}

fn sfu(server: &dyn CallsHost) -> Result<&super::media::SfuHandle> {
    server.calls().sfu.get().ok_or_else(|| Error::not_found("calls are not running on this server"))
}

fn stopped() -> Error {
    Error::internal("the SFU has stopped")
}

/// Starts recording the room's call, for one of its therapists.
pub async fn start(server: &dyn CallsHost, therapist: &UserId, room_id: &RoomId) -> Result<Recorded> {
    let content = server.rooms().state_content(room_id, SESSION, "")?.ok_or_else(|| Error::not_found("not a session room"))?;
    let session = crate::clinic::parse_session(&content)?;
    require_therapist(server, room_id, therapist, "start and stop recordings")?;
    if session.recording_policy != RecordingPolicy::WithConsent {
        return Err(Error::forbidden("the session's recording policy does not allow recording"));
    }
    let sfu = sfu(server)?;
    let matrix_room = room_id.to_string();
    let (rooms, callers) = sfu
        .run(move |sfu, _| {
            let rooms = sfu.rooms_of(&matrix_room);
            let callers: Vec<String> = rooms.iter().flat_map(|room| sfu.callers(room)).collect();
            (rooms, callers)
        })
        .await
        .ok_or_else(stopped)?;
    if rooms.is_empty() {
        return Err(Error::new(ErrorCode::BadState, "nobody is in the session's call"));
    }
    let callers_now = callers.clone();
    let mut missing: Vec<String> = Vec::new();
    for caller in callers {
        if !consented(server, room_id, &caller)? && !missing.contains(&caller) {
            missing.push(caller);
        }
    }
    if !missing.is_empty() {
        return Err(Error::Detailed {
            status: http::StatusCode::FORBIDDEN,
            body: json!({
                "errcode": "M_FORBIDDEN",
                "error": "every participant in the call must consent to the recording first",
                "org.limbic.without_consent": missing,
            }),
        });
    }
    let owned = room_id.to_owned();
    server.calls().spool.lock().await.blocking(move |spool| spool.begin(&owned)).await.map_err(Error::internal)?;
    let matrix_room = room_id.to_string();
    let started = sfu.run(move |sfu, now| !sfu.is_recording(&matrix_room) && rooms.iter().fold(false, |any, room| sfu.start_recording(now, room, &matrix_room) | any)).await.ok_or_else(stopped)?;
    if !started {
        return Err(Error::new(ErrorCode::BadState, "the call is being recorded already"));
    }
    let mut writer = server.rooms().writer(room_id).await?;
    writer.append(therapist, PduBuilder::state(RECORDING, "", json!({ "recording": true, "by": therapist })), None)?;
    writer.audit(AuditRecord::new("recording_started", therapist).room(room_id));
    writer.commit()?;
    tracing::info!(%room_id, %therapist, "started recording a call");
    // A consent withdrawn between the check above and the start, on any node, found nothing to
    // stop yet: looked at again now that the recording is on record.
    for caller in callers_now {
        if !consented(server, room_id, &caller)? {
            let user = OwnedUserId::try_from(caller).map_err(Error::internal)?;
            stop_without_consent(server, room_id, &user, false).await;
            return Ok(Recorded { recording: false, files: None });
        }
    }
    Ok(Recorded { recording: true, files: None })
}

/// Whether the call is being recorded, and what a stop stored: the answer of
/// `PUT /sessions/{roomId}/recording` (spec/calls.md).
#[derive(Debug, Serialize)]
pub struct Recorded {
    pub recording: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<RecordedFile>>,
}

/// One track's file: its `mxc://` URL and duration (ms), or why it could not be stored.
#[derive(Debug, Serialize)]
pub struct RecordedFile {
    pub owner: String,
    /// `m.audio` or `m.video`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<ruma::OwnedMxcUri>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why a recording stopped.
pub enum StopReason<'a> {
    Therapist(&'a UserId),
    ConsentWithdrawn(&'a UserId),
    JoinedWithoutConsent(&'a UserId),
    /// The session is over (the user who ended it).
    SessionEnded(&'a UserId),
    /// The server stopped (crashed, or was restarted) while it was recording.
    ServerStopped,
}

/// How often what the SFU recorded is written to disk: what a crash may lose.
const WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Writes what the SFU records to disk as it is made, every [`WRITE_INTERVAL`].
pub async fn write_as_made(server: Arc<dyn CallsHost>) {
    let mut interval = tokio::time::interval(WRITE_INTERVAL);
    loop {
        interval.tick().await;
        let Some(sfu) = server.calls().sfu.get() else { continue };
        let spool = server.calls().spool.lock().await;
        let Some(made) = sfu.run(|sfu, _| sfu.take_recorded()).await else { return };
        if made.is_empty() {
            continue;
        }
        // In the order taken: the lock is held until they are written.
        if let Err(error) = spool.blocking(move |spool| spool.append(&made)).await {
            tracing::error!(%error, "could not write what a recording made");
        }
    }
}

/// Stores the recordings the server stopped for (a crash, a restart): each file cut short is
/// made whole, stored and announced as on any stop, and `org.limbic.recording` says why it ended.
pub async fn repair(server: &dyn CallsHost) {
    let rooms = match server.calls().spool.lock().await.blocking(Spool::rooms).await {
        Ok(rooms) => rooms,
        Err(error) => return tracing::error!(%error, "could not look for recordings the server stopped for"),
    };
    for room_id in rooms {
        match store(server, None, &room_id, StopReason::ServerStopped).await {
            Ok(Some(recorded)) => tracing::info!(%room_id, files = recorded.files.map_or(0, |f| f.len()), "stored a recording the server had stopped for"),
            Ok(None) => {}
            Err(error) => tracing::error!(%room_id, %error, "could not store a recording the server had stopped for"),
        }
    }
}

/// Stops recording the room's call: each track's file is stored and announced in the room by
/// the therapist who started it. `None` when it was not recording.
pub async fn stop(server: &dyn CallsHost, room_id: &RoomId, reason: StopReason<'_>) -> Result<Option<Recorded>> {
    if let StopReason::Therapist(therapist) = reason {
        require_therapist(server, room_id, therapist, "start and stop recordings")?;
    }
    let sfu = sfu(server)?;
    let matrix_room = room_id.to_string();
    {
        let spool = server.calls().spool.lock().await;
        let rest = sfu.run(move |sfu, _| sfu.stop_recording(&matrix_room)).await.ok_or_else(stopped)?;
        match rest.or_else(|| spool.has(room_id).then(Vec::new)) {
            Some(rest) => spool.blocking(move |spool| spool.append(&rest)).await.map_err(Error::internal)?,
            None => {
                drop(spool);
                // The node that recorded it died, and its call never moved: stored from here.
                if let Some(dead) = server.calls().placements.dead_owner(&super::call_home(server.rooms(), room_id)?)? {
                    return store(server, Some(&server.calls().spool_of(&dead)?), room_id, StopReason::ServerStopped).await;
                }
                stopped_elsewhere(server, room_id).await;
                return Ok(None);
            }
        }
    }
    store(server, None, room_id, reason).await
}

/// How long a node waits for another node, which serves the call, to stop its recording.
const STOPPED_ELSEWHERE_WITHIN: Duration = Duration::from_secs(5);

/// Not recorded here: when another node serves the call, it stops the recording when it sees
/// the event that stops it (its warden); this waits for that, so that an answer here reflects
/// it as it would on that node (a withdrawn consent has stopped the recording).
async fn stopped_elsewhere(server: &dyn CallsHost, room_id: &RoomId) {
    // Subscribed first: a stop committed from now on wakes the wait.
    let mut committed = server.store().streams().subscribe();
    let is_recording = || server.rooms().state_content(room_id, RECORDING, "").ok().flatten().and_then(|s| s.get("recording").and_then(JsonValue::as_bool)) == Some(true);
    let served_elsewhere = || super::call_home(server.rooms(), room_id).and_then(|home| server.calls().placements.elsewhere(&home)).is_ok_and(|url| url.is_some());
    if !is_recording() || !served_elsewhere() {
        return;
    }
    let deadline = tokio::time::Instant::now() + STOPPED_ELSEWHERE_WITHIN;
    while is_recording() {
        match tokio::time::timeout_at(deadline, committed.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => return tracing::warn!(%room_id, "the node serving the call did not stop its recording in time"),
        }
    }
}

/// This node's call of `room_id` was placed on another node while this one was passed over
/// (silent, yet alive): its recording stops here, stored as one the server stopped for.
pub async fn moved_away(server: &dyn CallsHost, room_id: &RoomId) {
    if let Err(error) = stop(server, room_id, StopReason::ServerStopped).await {
        tracing::error!(%room_id, %error, "could not stop the recording of a call placed elsewhere");
    }
}

/// Stores the recording of `room_id` that `node`, which died, was making when its calls move
/// to this node, as one the server stopped for.
pub async fn take_over(server: &dyn CallsHost, room_id: &RoomId, node: &str) {
    let stored = match server.calls().spool_of(node) {
        Ok(spool) => store(server, Some(&spool), room_id, StopReason::ServerStopped).await,
        Err(error) => Err(error),
    };
    match stored {
        Ok(Some(recorded)) => tracing::info!(%room_id, %node, files = recorded.files.map_or(0, |f| f.len()), "stored the recording of a node that died"),
        Ok(None) => {}
        Err(error) => tracing::error!(%room_id, %node, %error, "could not store the recording of a node that died"),
    }
}

/// Stores and announces the room's recorded tracks from disk (this node's, or `from`), and
/// records that the recording stopped. `None` when it was not recording.
async fn store(server: &dyn CallsHost, from: Option<&Spool>, room_id: &RoomId, reason: StopReason<'_>) -> Result<Option<Recorded>> {
    // Held throughout: one stop at a time on this node.
    let local = server.calls().spool.lock().await;
    let spool = from.unwrap_or(&local);
    let owned = room_id.to_owned();
    let tracks = spool.blocking(move |spool| spool.tracks(&owned)).await.map_err(Error::internal)?;
    let state = server.rooms().state_content(room_id, RECORDING, "")?;
    let recording = state.as_ref().and_then(|s| s.get("recording")).and_then(JsonValue::as_bool) == Some(true);
    if !recording {
        // Stored already (a crash came between the announcement and the files' removal).
        let owned = room_id.to_owned();
        spool.blocking(move |spool| spool.remove(&owned)).await.map_err(Error::internal)?;
        return Ok(None);
    }
    // The announcements come from the therapist who started it (or who stops it).
    let announcer: OwnedUserId = match reason {
        StopReason::Therapist(therapist) => therapist.to_owned(),
        _ => state.as_ref().and_then(|s| s.get("by")).and_then(JsonValue::as_str).and_then(|by| OwnedUserId::try_from(by).ok()).ok_or_else(|| Error::internal("a recording without its therapist"))?,
    };
    let mut files = Vec::new();
    let mut messages = Vec::new();
    for track in tracks {
        let (msgtype, mimetype, extension) = match track.kind {
            MediaKind::Audio => ("m.audio", "audio/ogg", "ogg"),
            MediaKind::Video => ("m.video", "video/x-ivf", "ivf"),
        };
        let filename = format!("recording-{}-{}.{extension}", track.owner.trim_start_matches('@').replace(':', "_"), track.track_name.replace(['/', ' '], "_"));
        let size = track.bytes.len();
        // One file that cannot be stored does not cost the others, nor the end of the recording.
        // Only the session's therapists may read it (enforced by the media repository).
        let upload = Upload { bytes: track.bytes, content_type: Some(mimetype.to_owned()), filename: Some(filename.clone()), recording_of: Some(room_id.to_owned()) };
        let url = match server.media().upload(&announcer, upload).await {
            Ok(url) => url,
            Err(error) => {
                tracing::error!(%room_id, owner = %track.owner, %error, "a recorded track could not be stored");
                files.push(RecordedFile { owner: track.owner, kind: msgtype, url: None, duration: None, error: Some(error.to_string()) });
                continue;
            }
        };
        files.push(RecordedFile { owner: track.owner.clone(), kind: msgtype, url: Some(url.clone()), duration: Some(track.duration_ms), error: None });
        messages.push(PduBuilder::message(
            "m.room.message",
            json!({
                "msgtype": msgtype,
                "body": filename,
                "filename": filename,
                "url": url,
                "info": { "mimetype": mimetype, "size": size, "duration": track.duration_ms },
                "org.limbic.recording_of": track.owner,
            }),
        ));
    }
    let (actor, why) = match reason {
        StopReason::Therapist(user) => (user, "stopped by a therapist"),
        StopReason::ConsentWithdrawn(user) => (user, "a participant withdrew consent"),
        StopReason::JoinedWithoutConsent(user) => (user, "a participant without consent joined the call"),
        StopReason::SessionEnded(user) => (user, "the session ended"),
        StopReason::ServerStopped => (announcer.as_ref(), "the server stopped during the recording"),
    };
    let mut writer = server.rooms().writer(room_id).await?;
    // Another node may have stored it meanwhile (a node starting again repairs what a node
    // moving its calls stores): the room's writer settles which.
    let still = server.rooms().state_content(room_id, RECORDING, "")?.and_then(|s| s.get("recording").and_then(JsonValue::as_bool)) == Some(true);
    if !still {
        return Ok(None);
    }
    for message in messages {
        writer.append(&announcer, message, None)?;
    }
    writer.append(&announcer, PduBuilder::state(RECORDING, "", json!({ "recording": false, "by": announcer, "stopped_because": why })), None)?;
    writer.audit(AuditRecord::new("recording_stopped", actor).room(room_id).details(json!({ "reason": why, "files": files })));
    writer.commit()?;
    let owned = room_id.to_owned();
    spool.blocking(move |spool| spool.remove(&owned)).await.map_err(Error::internal)?;
    tracing::info!(%room_id, %actor, reason = why, files = files.len(), "stopped recording a call");
    Ok(Some(Recorded { recording: false, files: Some(files) }))
}

/// A recorded track of the session's call, as it was announced in the session room.
#[derive(Debug, Serialize)]
pub struct RecordingFile {
    pub event_id: ruma::OwnedEventId,
    /// When it was announced (the recording stopped), ms since the Unix epoch.
    pub ts: u64,
    /// Whose track it is.
    pub owner: String,
    /// `m.audio` or `m.video`.
    pub kind: String,
    pub url: String,
    pub filename: String,
    pub mimetype: String,
    pub size: u64,
    /// In milliseconds.
    pub duration: u64,
}

/// The recordings of the session's calls, oldest first: the files its therapists announced in
/// the room when a recording stopped. A message from anyone else that looks like one, or that
/// names another server's file, is not one. For the session's therapists.
pub fn list(server: &dyn CallsHost, therapist: &UserId, room_id: &RoomId) -> Result<Vec<RecordingFile>> {
    require_therapist(server, room_id, therapist, "see its recordings")?;
    let own_media = format!("mxc://{}/", server.server_name());
    let upto = server.store().streams().current();
    let mut files = Vec::new();
    for entry in server.rooms().timeline_after(room_id, 0, upto) {
        let (_, event_id) = entry?;
        let Some(pdu) = server.rooms().pdu(&event_id)? else { continue };
        if pdu.kind.to_string() != "m.room.message" {
            continue;
        }
        let content = pdu.content_json();
        let text = |field: &str| content.get(field).and_then(JsonValue::as_str).map(str::to_owned);
        let info = |field: &str| content.get("info").and_then(|info| info.get(field));
        let (Some(owner), Some(kind), Some(url)) = (text("org.limbic.recording_of"), text("msgtype"), text("url")) else { continue };
        if !matches!(kind.as_str(), "m.audio" | "m.video") || !url.starts_with(&own_media) {
            continue;
        }
        if !session_role(server.rooms(), room_id, pdu.sender.as_str())?.is_some_and(Role::is_therapist) {
            continue;
        }
        files.push(RecordingFile {
            event_id: pdu.event_id.clone(),
            ts: pdu.origin_server_ts.0.into(),
            owner,
            kind,
            url,
            filename: text("filename").unwrap_or_default(),
            mimetype: info("mimetype").and_then(JsonValue::as_str).unwrap_or_default().to_owned(),
            size: info("size").and_then(JsonValue::as_u64).unwrap_or_default(),
            duration: info("duration").and_then(JsonValue::as_u64).unwrap_or_default(),
        });
    }
    Ok(files)
}

/// The session left `open`/`in_progress`: its recording stops and its calls end (tokens for them
/// are refused from now on, so nobody gets back in).
pub async fn session_ended(server: &dyn CallsHost, room_id: &RoomId, by: &UserId) {
    if let Err(error) = stop(server, room_id, StopReason::SessionEnded(by)).await {
        tracing::error!(%room_id, %error, "a recording could not be stopped at the end of its session");
    }
    let Some(sfu) = server.calls().sfu.get() else { return };
    let matrix_room = room_id.to_string();
    if let Some(ended) = sfu.run(move |sfu, _| sfu.close(&matrix_room)).await.filter(|n| *n > 0) {
        tracing::info!(%room_id, participants = ended, "ended the session's call");
    }
}

/// A participant withdrew consent, or joined the call without it: the recording stops.
pub async fn stop_without_consent(server: &dyn CallsHost, room_id: &RoomId, user: &UserId, joined: bool) {
    let reason = if joined { StopReason::JoinedWithoutConsent(user) } else { StopReason::ConsentWithdrawn(user) };
    if let Err(error) = stop(server, room_id, reason).await {
        tracing::error!(%room_id, %user, %error, "a recording could not be stopped");
    }
}

/// Stops the recording of `room_id` (made on this node) when an event of the room after `after`
/// and up to `upto` stops it, whichever node committed it: the event's own node stops only what
/// it records itself ([`RecordingWatch`]).
pub async fn stop_on_committed(server: &dyn CallsHost, room_id: &RoomId, after: StreamPos, upto: StreamPos) -> Result<()> {
    let committed: Vec<(StreamPos, ruma::OwnedEventId)> = server.rooms().timeline_after(room_id, after, upto).collect::<Result<_>>()?;
    for (_, event_id) in committed {
        let Some(pdu) = server.rooms().pdu(&event_id)? else { continue };
        if let Some(stop) = Stop::of(&pdu) {
            stop.apply(server, room_id, &pdu.sender).await;
        }
    }
    Ok(())
}

/// A committed event that stops a recording.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    ConsentWithdrawn,
    SessionEnded,
}

impl Stop {
    /// Stops the recording for this reason, if it still holds: an event looked at late (by
    /// another node's warden) may have been undone since (consent given again, say).
    async fn apply(&self, server: &dyn CallsHost, room_id: &RoomId, sender: &UserId) {
        let holds = match self {
            Stop::ConsentWithdrawn => !consented(server, room_id, sender.as_str()).unwrap_or(false),
            Stop::SessionEnded => super::open_session_call(server.rooms(), room_id).is_err(),
        };
        match self {
            _ if !holds => {}
            Stop::ConsentWithdrawn => stop_without_consent(server, room_id, sender, false).await,
            Stop::SessionEnded => session_ended(server, room_id, sender).await,
        }
    }

    fn of(pdu: &Pdu) -> Option<Stop> {
        let kind = pdu.kind.to_string();
        if kind == RECORDING_CONSENT && pdu.content_json().get("consent").and_then(JsonValue::as_bool) != Some(true) {
            return Some(Stop::ConsentWithdrawn);
        }
        let status = || crate::clinic::parse_session(&pdu.content_json()).map(|session| session.status);
        if kind == SESSION && !status().is_ok_and(Status::is_live) {
            return Some(Stop::SessionEnded);
        }
        None
    }
}

/// Stops recordings on consent withdrawn and sessions ended, whichever path committed the event
/// (a client, a plugin, another server). Weak: the server owns the rooms that own this hook.
pub struct RecordingWatch(Weak<dyn CallsHost>);

impl RecordingWatch {
    pub fn new(server: Weak<dyn CallsHost>) -> Self {
        Self(server)
    }
}

impl AfterCommit for RecordingWatch {
    fn committed(&self, events: &[Pdu]) -> Option<FollowUp> {
        let stops: Vec<(Stop, OwnedRoomId, OwnedUserId)> = events.iter().filter_map(|pdu| Some((Stop::of(pdu)?, pdu.room_id.clone(), pdu.sender.clone()))).collect();
        if stops.is_empty() {
            return None;
        }
        let server = self.0.clone();
        Some(Box::pin(async move {
            let Some(server) = server.upgrade() else { return };
            for (stop, room_id, sender) in stops {
                stop.apply(&*server, &room_id, &sender).await;
            }
        }))
    }
}

fn require_therapist(server: &dyn CallsHost, room_id: &RoomId, user: &UserId, why: &str) -> Result<()> {
    if session_role(server.rooms(), room_id, user.as_str())?.is_some_and(Role::is_therapist) { Ok(()) } else { Err(Error::forbidden(format!("only the session's therapists {why}"))) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::events::{PduPlacement, ServerSigningKey, build_pdu, rules_for};

    fn event(builder: PduBuilder) -> Pdu {
        let key = ServerSigningKey::generate(ruma::server_name!("test.local").to_owned());
        let rules = rules_for(&ruma::RoomVersionId::V11).unwrap();
        let sender = ruma::owned_user_id!("@ann:test.local");
        let room_id = ruma::owned_room_id!("!session:test.local");
        let placement = PduPlacement { room_id: &room_id, sender: &sender, prev_events: vec![], auth_events: vec![], depth: 1, rules: &rules };
        build_pdu(builder, placement, &key).unwrap().pdu
    }

    fn session(status: &str) -> Pdu {
        let content = json!({ "kind": "individual", "title": "t", "starts_at": 1, "ends_at": 2, "timezone": "UTC", "status": status, "max_participants": 2 });
        event(PduBuilder::state(SESSION, "", content))
    }

    #[test]
    fn consent_withdrawn_and_sessions_ended_stop_recordings() {
        let consent = |content| event(PduBuilder::state(RECORDING_CONSENT, "@ann:test.local", content));
        assert_eq!(Stop::of(&consent(json!({ "consent": false }))), Some(Stop::ConsentWithdrawn));
        assert_eq!(Stop::of(&consent(json!({}))), Some(Stop::ConsentWithdrawn));
        assert_eq!(Stop::of(&consent(json!({ "consent": true }))), None);
        for ended in ["completed", "cancelled", "no_show"] {
            assert_eq!(Stop::of(&session(ended)), Some(Stop::SessionEnded), "{ended}");
        }
        for live in ["scheduled", "open", "in_progress"] {
            assert_eq!(Stop::of(&session(live)), None, "{live}");
        }
        assert_eq!(Stop::of(&event(PduBuilder::message("m.room.message", json!({ "body": "consent" })))), None);
    }
}
