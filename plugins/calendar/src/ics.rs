//! iCalendar (RFC 5545) text of sessions: pure functions.

use std::collections::BTreeMap;

use limbic_plugin_sdk::clinic::{Kind, Role, Session, Status};
use serde::{Deserialize, Serialize};

/// The `PRODID` of every calendar the plugin writes.
pub const PRODID: &str = "-//Limbic//Limbic calendar plugin 0.1.0//EN";

/// What the calendar keeps of a session (kv `session:<room id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalSession {
    /// The session room.
    pub room_id: String,
    /// The kind of session.
    pub kind: Kind,
    /// Its title.
    pub title: String,
    /// Start, ms since the epoch.
    pub starts_at: u64,
    /// End, ms since the epoch.
    pub ends_at: u64,
    /// The IANA time zone it was scheduled in (the calendar writes UTC times).
    pub timezone: String,
    /// Its status.
    pub status: Status,
    /// The iCalendar `SEQUENCE`: bumped by each change of the times, status or title.
    pub sequence: u32,
    /// When the times, status or title last changed (the session event's `origin_server_ts`).
    pub last_modified: u64,
    /// Users with a role.
    pub participants: BTreeMap<String, Role>,
}

impl CalSession {
    /// Cancelled and no-show sessions stay in feeds as `STATUS:CANCELLED`, and are deleted from
    /// CalDAV collections.
    pub fn is_cancelled(&self) -> bool {
        matches!(self.status, Status::Cancelled | Status::NoShow)
    }
}

/// The result of [`update`].
#[derive(Debug, PartialEq, Eq)]
pub struct Change {
    /// The session as it is now.
    pub session: CalSession,
    /// Whether anything stored changed.
    pub changed: bool,
    /// Whether the VEVENT changed (times, status or title; or a new session).
    pub event_changed: bool,
    /// Users who got a role.
    pub added: Vec<String>,
    /// Users who lost their role.
    pub removed: Vec<String>,
}

/// The session after its room's current `org.limbic.session` (sent at `session_ts`) and roles,
/// compared with what was stored (`old`).
pub fn update(
    old: Option<&CalSession>,
    room_id: &str,
    session: &Session,
    session_ts: u64,
    participants: BTreeMap<String, Role>,
) -> Change {
    let event_changed = old.is_none_or(|old| {
        (old.title.as_str(), old.starts_at, old.ends_at, old.status)
            != (session.title.as_str(), session.starts_at, session.ends_at, session.status)
    });
    let (sequence, last_modified) = match old {
        None => (0, session_ts),
        Some(old) if event_changed => (old.sequence + 1, session_ts.max(old.last_modified)),
        Some(old) => (old.sequence, old.last_modified),
    };
    let before = old.map(|old| &old.participants);
    let added = participants.keys().filter(|user| before.is_none_or(|b| !b.contains_key(*user))).cloned().collect();
    let removed = before.map_or_else(Vec::new, |before| {
        before.keys().filter(|user| !participants.contains_key(*user)).cloned().collect()
    });
    let new = CalSession {
        room_id: room_id.to_owned(),
        kind: session.kind,
        title: session.title.clone(),
        starts_at: session.starts_at,
        ends_at: session.ends_at,
        timezone: session.timezone.clone(),
        status: session.status,
        sequence,
        last_modified,
        participants,
    };
    Change { changed: old != Some(&new), session: new, event_changed, added, removed }
}

/// The stable UID of a session's VEVENT: `<room id without '!'>@<server name>`.
pub fn uid(room_id: &str, server_name: &str) -> String {
    format!("{}@{server_name}", room_id.strip_prefix('!').unwrap_or(room_id))
}

/// TEXT escaped per RFC 5545 §3.3.11: backslash, semicolon, comma and line breaks.
pub fn escape_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push_str("\\\\"),
            ';' => out.push_str("\\;"),
            ',' => out.push_str("\\,"),
            '\r' => {
                chars.next_if_eq(&'\n');
                out.push_str("\\n");
            }
            '\n' => out.push_str("\\n"),
            // Other control characters are not allowed in TEXT.
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// A content line folded at 75 octets (RFC 5545 §3.1), never inside a UTF-8 character, each
/// physical line ended by CRLF.
pub fn fold(line: &str) -> String {
    let mut out = String::with_capacity(line.len() + line.len() / 70 * 3 + 2);
    let mut width = 0;
    for c in line.chars() {
        if width + c.len_utf8() > 75 {
            out.push_str("\r\n ");
            width = 1;
        }
        out.push(c);
        width += c.len_utf8();
    }
    out.push_str("\r\n");
    out
}

/// A UTC DATE-TIME: `YYYYMMDDTHHMMSSZ`.
pub fn utc(ms: u64) -> String {
    let t = limbic_plugin_sdk::clock::UtcTime::from_ms(ms);
    format!("{:04}{:02}{:02}T{:02}{:02}{:02}Z", t.year, t.month, t.day, t.hour, t.minute, t.second)
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Individual => "individual",
        Kind::Couples => "couples",
        Kind::Family => "family",
        Kind::Group => "group",
        Kind::Workshop => "workshop",
        Kind::Support => "support",
    }
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Scheduled => "scheduled",
        Status::Open => "open",
        Status::InProgress => "in_progress",
        Status::Completed => "completed",
        Status::Cancelled => "cancelled",
        Status::NoShow => "no_show",
    }
}

/// The (unfolded) content lines of a session's VEVENT.
pub fn vevent(session: &CalSession, server_name: &str) -> Vec<String> {
    let description = format!("Kind: {}\nStatus: {}", kind_name(session.kind), status_name(session.status));
    vec![
        "BEGIN:VEVENT".into(),
        format!("UID:{}", uid(&session.room_id, server_name)),
        format!("DTSTAMP:{}", utc(session.last_modified)),
        format!("DTSTART:{}", utc(session.starts_at)),
        format!("DTEND:{}", utc(session.ends_at)),
        format!("SUMMARY:{}", escape_text(&session.title)),
        format!("DESCRIPTION:{}", escape_text(&description)),
        format!("STATUS:{}", if session.is_cancelled() { "CANCELLED" } else { "CONFIRMED" }),
        format!("SEQUENCE:{}", session.sequence),
        format!("LAST-MODIFIED:{}", utc(session.last_modified)),
        "END:VEVENT".into(),
    ]
}

/// A VCALENDAR with one VEVENT per session, CRLF line ends, folded; `name` becomes
/// `X-WR-CALNAME` (the name calendar apps show for a subscribed feed).
pub fn calendar(sessions: &[CalSession], server_name: &str, name: Option<&str>) -> String {
    let mut lines: Vec<String> =
        vec!["BEGIN:VCALENDAR".into(), "VERSION:2.0".into(), format!("PRODID:{PRODID}"), "CALSCALE:GREGORIAN".into()];
    if let Some(name) = name {
        lines.push(format!("X-WR-CALNAME:{}", escape_text(name)));
    }
    for session in sessions {
        lines.extend(vevent(session, server_name));
    }
    lines.push("END:VCALENDAR".into());
    lines.iter().map(|line| fold(line)).collect()
}

#[cfg(test)]
mod tests {
    use limbic_plugin_sdk::serde_json;

    use super::*;

    const T0: u64 = 1_795_000_000_000;

    fn session(status: &str, title: &str, starts_at: u64) -> Session {
        serde_json::from_value(serde_json::json!({
            "kind": "individual", "title": title, "starts_at": starts_at, "ends_at": starts_at + 3_000_000,
            "timezone": "Europe/Berlin", "status": status, "max_participants": 2,
        }))
        .unwrap()
    }

    fn people(list: &[(&str, Role)]) -> BTreeMap<String, Role> {
        list.iter().map(|(user, role)| (user.to_string(), *role)).collect()
    }

    #[test]
    fn sequence_follows_changes_of_times_status_and_title() {
        let room = "!abc:clinic.example";
        let roles = people(&[("@t:c", Role::Therapist), ("@ann:c", Role::Client)]);
        let first = update(None, room, &session("scheduled", "Weekly", T0), 10, roles.clone());
        assert!(first.changed && first.event_changed);
        assert_eq!((first.session.sequence, first.session.last_modified), (0, 10));
        assert_eq!(first.added, ["@ann:c", "@t:c"]);

        // The same state again (a replay, or a role event that changed nothing): no change.
        let same = update(Some(&first.session), room, &session("scheduled", "Weekly", T0), 10, roles.clone());
        assert!(!same.changed && !same.event_changed && same.added.is_empty() && same.removed.is_empty());
        assert_eq!(same.session, first.session);

        let moved = update(Some(&first.session), room, &session("scheduled", "Weekly", T0 + 1), 20, roles.clone());
        assert!(moved.event_changed);
        assert_eq!((moved.session.sequence, moved.session.last_modified), (1, 20));
        let renamed = update(Some(&moved.session), room, &session("scheduled", "Monthly", T0 + 1), 30, roles.clone());
        assert_eq!(renamed.session.sequence, 2);
        let opened = update(Some(&renamed.session), room, &session("open", "Monthly", T0 + 1), 40, roles.clone());
        assert_eq!(opened.session.sequence, 3);

        // A role change alone keeps the sequence.
        let fewer = people(&[("@t:c", Role::Therapist), ("@bob:c", Role::Client)]);
        let swapped = update(Some(&opened.session), room, &session("open", "Monthly", T0 + 1), 40, fewer);
        assert!(swapped.changed && !swapped.event_changed);
        assert_eq!(
            (swapped.added.as_slice(), swapped.removed.as_slice()),
            (&["@bob:c".to_string()][..], &["@ann:c".to_string()][..])
        );
        assert_eq!((swapped.session.sequence, swapped.session.last_modified), (3, 40));
        // A time zone change alone is stored, but the UTC event is the same.
        let mut zoned = session("open", "Monthly", T0 + 1);
        zoned.timezone = "UTC".into();
        let rezoned = update(Some(&swapped.session), room, &zoned, 50, swapped.session.participants.clone());
        assert!(rezoned.changed && !rezoned.event_changed);
    }

    #[test]
    fn text_escaping_and_folding() {
        assert_eq!(escape_text("a\\b;c,d\r\ne\nf\rg\u{7}h\ti"), "a\\\\b\\;c\\,d\\ne\\nf\\ngh\ti");
        assert_eq!(fold("short"), "short\r\n");
        let long = format!("SUMMARY:{}", "x".repeat(200));
        let folded = fold(&long);
        let lines: Vec<&str> = folded.trim_end_matches("\r\n").split("\r\n").collect();
        assert_eq!(lines[0].len(), 75);
        assert!(lines[1..].iter().all(|l| l.starts_with(' ') && l.len() <= 75));
        assert_eq!(lines.concat().replace(" x", "x"), long);
        // Never inside a character: 'é' is two octets.
        let accents = format!("SUMMARY:{}", "é".repeat(100));
        for line in fold(&accents).split("\r\n") {
            assert!(line.len() <= 75);
        }
        let unfolded: String = fold(&accents).replace("\r\n ", "").trim_end().to_owned();
        assert_eq!(unfolded, accents);
        assert_eq!(fold(&"y".repeat(75)), format!("{}\r\n", "y".repeat(75)));
        assert_eq!(fold(&"y".repeat(76)), format!("{}\r\n y\r\n", "y".repeat(75)));
    }

    #[test]
    fn dates() {
        assert_eq!(utc(0), "19700101T000000Z");
        assert_eq!(utc(T0), "20261118T110640Z");
        assert_eq!(utc(951_868_799_000), "20000229T235959Z");
        assert_eq!(uid("!abc:clinic.example", "clinic.example"), "abc:clinic.example@clinic.example");
    }

    #[test]
    fn a_calendar_with_cancelled_and_confirmed_events() {
        let mut cancelled =
            update(None, "!b:c.example", &session("cancelled", "Couples; A, B", T0), 5, BTreeMap::new()).session;
        cancelled.kind = Kind::Couples;
        let done =
            update(None, "!a:c.example", &session("completed", "Weekly\\session", T0 + 86_400_000), 7, BTreeMap::new())
                .session;
        let text = calendar(&[done, cancelled.clone()], "c.example", Some("Sessions"));
        assert!(text.ends_with("END:VCALENDAR\r\n"));
        assert!(!text.replace("\r\n", "").contains('\n'), "CRLF only");
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(
            &lines[..5],
            [
                "BEGIN:VCALENDAR",
                "VERSION:2.0",
                &format!("PRODID:{PRODID}"),
                "CALSCALE:GREGORIAN",
                "X-WR-CALNAME:Sessions"
            ]
        );
        let expected = [
            "BEGIN:VEVENT",
            "UID:b:c.example@c.example",
            "DTSTAMP:19700101T000000Z",
            "DTSTART:20261118T110640Z",
            "DTEND:20261118T115640Z",
            "SUMMARY:Couples\\; A\\, B",
            "DESCRIPTION:Kind: couples\\nStatus: cancelled",
            "STATUS:CANCELLED",
            "SEQUENCE:0",
            "LAST-MODIFIED:19700101T000000Z",
            "END:VEVENT",
        ];
        assert_eq!(vevent(&cancelled, "c.example"), expected);
        assert!(text.contains(&expected.join("\r\n")));
        assert!(text.contains("SUMMARY:Weekly\\\\session\r\n"));
        assert!(text.contains("STATUS:CONFIRMED\r\n"));
        assert_eq!(text.matches("BEGIN:VEVENT").count(), 2);
        assert!(calendar(&[], "c.example", None).starts_with("BEGIN:VCALENDAR\r\nVERSION:2.0\r\n"));
    }
}
