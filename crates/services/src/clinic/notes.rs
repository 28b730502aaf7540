//! A session's clinical notes and its transcript export: for its therapists alone, every read
//! and export audited.

use ruma::{OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, UserId};
use serde::Serialize;
use serde_json::{Value as JsonValue, json};

use super::ClinicHost;
use super::{NOTE, NOTES_FOR, SESSION, sessions::require_therapist};
use crate::{audit::AuditRecord, error::{Error, Result}, events::PduBuilder};

/// One version of a note.
#[derive(Serialize)]
pub struct NoteVersion {
    pub event_id: OwnedEventId,
    pub author: ruma::OwnedUserId,
    pub ts: ruma::MilliSecondsSinceUnixEpoch,
    pub content: JsonValue,
}

/// A note with its versions, newest first.
#[derive(Serialize)]
pub struct Note {
    pub note_id: Option<String>,
    pub versions: Vec<NoteVersion>,
}

const WHY: &str = "read and write its notes";

/// The session's private notes room, created on first use: never federated, invite-only, for
/// the session's therapists alone (the clinic policy keeps everyone else out).
async fn notes_room(server: &dyn ClinicHost, therapist: &UserId, session_room: &RoomId) -> Result<OwnedRoomId> {
    if let Some(room) = server.clinic().notes_room(session_room)? {
        return Ok(room);
    }
    // The session room's lock makes two first uses create one notes room.
    let _session_lock = server.rooms().writer(session_room).await?;
    if let Some(room) = server.clinic().notes_room(session_room)? {
        return Ok(room);
    }
    let events = vec![
        PduBuilder::state("m.room.create", "", json!({ "room_version": "11", "m.federate": false })),
        PduBuilder::state("m.room.member", therapist.as_str(), json!({ "membership": "join" })),
        PduBuilder::state("m.room.power_levels", "", json!({ "users": { therapist.as_str(): 100 }, "users_default": 50, "invite": 50, "state_default": 50, "events_default": 50 })),
        PduBuilder::state("m.room.join_rules", "", json!({ "join_rule": "invite" })),
        PduBuilder::state("m.room.history_visibility", "", json!({ "history_visibility": "joined" })),
        PduBuilder::state(NOTES_FOR, "", json!({ "room_id": session_room })),
    ];
    let mut writer = server.rooms().new_room(RoomVersionId::V11, therapist, events).await?;
    let room_id = writer.room_id().clone();
    server.clinic().stage_notes_link(writer.batch(), session_room, &room_id);
    writer.commit()?;
    Ok(room_id)
}

/// Every note with its earlier versions, newest version first, and the notes room; audited.
pub async fn list(server: &dyn ClinicHost, therapist: &UserId, session_room: &RoomId) -> Result<(OwnedRoomId, Vec<Note>)> {
    require_therapist(server, therapist, session_room, WHY)?;
    let notes_room = notes_room(server, therapist, session_room).await?;
    let mut notes = Vec::new();
    for pdu in server.rooms().current_state(&notes_room)?.into_iter().filter(|p| p.kind.to_string() == NOTE) {
        let mut versions = Vec::new();
        let mut next = Some(pdu.event_id.clone());
        while let Some(event_id) = next {
            let Some(version) = server.rooms().pdu(&event_id)? else { break };
            let content = version.content_json();
            versions.push(NoteVersion { event_id: version.event_id, author: version.sender, ts: version.origin_server_ts, content });
            next = server.rooms().meta(&event_id)?.and_then(|m| m.replaces_state);
        }
        notes.push(Note { note_id: pdu.state_key, versions });
    }
    let record = AuditRecord::new("note_read", therapist).room(session_room).details(json!({ "notes": notes.len() }));
    server.audit().write_with(server.store(), server.store().batch(), vec![record])?;
    Ok((notes_room, notes))
}

/// Creates or edits a note; the earlier versions stay in the notes room's history. Returns the
/// note's event and the notes room.
pub async fn write(server: &dyn ClinicHost, therapist: &UserId, session_room: &RoomId, note_id: &str, body: String) -> Result<(OwnedEventId, OwnedRoomId)> {
    require_therapist(server, therapist, session_room, WHY)?;
    if note_id.is_empty() || note_id.starts_with('@') {
        return Err(Error::invalid_param("note ids must not be empty or start with @"));
    }
    let notes_room = notes_room(server, therapist, session_room).await?;
    let mut writer = server.rooms().writer(&notes_room).await?;
    let pdu = writer.append(therapist, PduBuilder::state(NOTE, note_id, json!({ "body": body })), None)?;
    writer.audit(AuditRecord::new("note_write", therapist).room(session_room).details(json!({ "note_id": note_id, "event_id": pdu.event_id })));
    writer.commit()?;
    Ok((pdu.event_id, notes_room))
}

/// How a transcript is written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TranscriptFormat {
    Markdown,
    Text,
}

impl TranscriptFormat {
    pub fn name(self) -> &'static str {
        match self {
            TranscriptFormat::Markdown => "markdown",
            TranscriptFormat::Text => "text",
        }
    }
}

/// The session's chat in `format` (`markdown`, the default, or `text`): participants, times,
/// messages and session events, oldest first. Therapists only; audited as `export`.
pub fn transcript(server: &dyn ClinicHost, therapist: &UserId, room_id: &RoomId, format: Option<&str>) -> Result<(TranscriptFormat, String)> {
    require_therapist(server, therapist, room_id, "export its transcript")?;
    let format = match format {
        None | Some("markdown") => TranscriptFormat::Markdown,
        Some("text") => TranscriptFormat::Text,
        Some(other) => return Err(Error::invalid_param(format!("unknown transcript format {other:?}; use markdown or text"))),
    };
    let markdown = format == TranscriptFormat::Markdown;
    let view = super::sessions::view(server, therapist, room_id)?;
    let session = &view.session;
    let time = super::format_utc;
    let mut out = String::new();
    let heading = if markdown { "# " } else { "" };
    out.push_str(&format!("{heading}{}\n\n", session.title));
    out.push_str(&format!("Session: {:?}, {} to {} ({}), status {:?}\n", session.kind, time(session.starts_at), time(session.ends_at), session.timezone, session.status).to_lowercase());
    out.push_str("Participants:\n");
    for (user, role) in &view.roles {
        let role = serde_json::to_value(role).map_err(Error::internal)?;
        out.push_str(&format!("{} {user} ({})\n", if markdown { "-" } else { " " }, role.as_str().unwrap_or_default()));
    }
    out.push('\n');
    let upto = server.store().streams().current();
    for entry in server.rooms().timeline_after(room_id, 0, upto) {
        let (_, event_id) = entry?;
        let Some(pdu) = server.rooms().pdu(&event_id)? else { continue };
        let content = pdu.content_json();
        let line = match pdu.kind.to_string().as_str() {
            "m.room.message" => content.get("body").and_then(JsonValue::as_str).map(|b| format!("{}: {b}", pdu.sender)),
            "m.room.member" => pdu.membership().map(|m| format!("{} — {} ({})", pdu.state_key.clone().unwrap_or_default(), m.as_str(), pdu.sender)),
            kind if kind == SESSION => content.get("status").and_then(JsonValue::as_str).map(|s| format!("session status: {s} ({})", pdu.sender)),
            _ => None,
        };
        if let Some(line) = line {
            let stamp = time(pdu.origin_server_ts.0.into());
            out.push_str(&if markdown { format!("- `{stamp}` {line}\n") } else { format!("[{stamp}] {line}\n") });
        }
    }
    let record = AuditRecord::new("export", therapist).room(room_id).details(json!({ "format": format.name() }));
    server.audit().write_with(server.store(), server.store().batch(), vec![record])?;
    Ok((format, out))
}
