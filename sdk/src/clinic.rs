//! The clinic's event types: therapy sessions as rooms (the repository's `spec/sessions.md`,
//! with a JSON Schema per content in `spec/schemas/`).
//!
//! Everything but [`roles`], [`MEMBER`] and [`MESSAGE`] is the crate `limbic-clinic-model`, which
//! the server uses too, so plugin and server read the same types. The types accept unknown fields,
//! so a plugin built against this SDK keeps reading events written by a newer server; the server
//! itself validates what it stores (the types' strict `parse`).

use std::collections::BTreeMap;

pub use limbic_clinic_model::*;

use crate::Event;

/// `m.room.member` (state key: the user id): membership.
pub const MEMBER: &str = "m.room.member";
/// `m.room.message`: a chat message.
pub const MESSAGE: &str = "m.room.message";

/// Every user with a role in a session room, from its state events (e.g.
/// [`rooms::room_state`](crate::rooms::room_state)), sorted by user id. Removed roles
/// (`{"role": null}`) and malformed role events are left out.
pub fn roles(state: &[Event]) -> BTreeMap<String, Role> {
    state
        .iter()
        .filter(|event| event.event_type == ROLE)
        .filter_map(|event| {
            let user = role_user(event.state_key.as_deref()?)?;
            let role = event.content::<RoleContent>().ok()?.role?;
            Some((user.to_owned(), role))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(event_type: &str, state_key: &str, content: &str) -> Event {
        Event {
            event_id: format!("${state_key}"),
            room_id: "!r:s".into(),
            sender: "@t:s".into(),
            event_type: event_type.into(),
            state_key: Some(state_key.into()),
            content: content.into(),
            origin_server_ts: 1,
        }
    }

    #[test]
    fn session_content() {
        let session: Session = serde_json::from_str(
            r#"{"kind": "group", "title": "T", "starts_at": 1, "ends_at": 2, "timezone": "UTC",
                "status": "in_progress", "max_participants": 12, "future_field": 1}"#,
        )
        .unwrap();
        assert_eq!(session.kind, Kind::Group);
        assert_eq!(session.status, Status::InProgress);
        assert_eq!(session.join_window_minutes, 15);
        assert_eq!(session.recording_policy, RecordingPolicy::Forbidden);
        assert!(session.status.can_become(Status::Completed));
        assert!(!Status::Completed.can_become(Status::Open));
        let json = serde_json::to_value(&session).unwrap();
        assert_eq!(json["status"], "in_progress");
        assert_eq!(json["recording_policy"], "forbidden");
    }

    #[test]
    fn roles_from_state() {
        let events = [
            state(ROLE, "_@t:s", r#"{"role": "therapist"}"#),
            state(ROLE, "_@c:s", r#"{"role": "client"}"#),
            state(ROLE, "_@gone:s", r#"{"role": null}"#),
            state(ROLE, "@bad:s", r#"{"role": "client"}"#),
            state(ROLE, "_@odd:s", r#"{"role": "chef"}"#),
            state(MEMBER, "@t:s", r#"{"membership": "join"}"#),
        ];
        let roles = roles(&events);
        assert_eq!(
            roles.into_iter().collect::<Vec<_>>(),
            [("@c:s".to_string(), Role::Client), ("@t:s".to_string(), Role::Therapist)]
        );
        assert_eq!(role_user("_@a:b"), Some("@a:b"));
        assert_eq!(role_user("@a:b"), None);
        assert_eq!(role_key("@a:b"), "_@a:b");
        assert_eq!(serde_json::to_string(&RoleContent { role: None }).unwrap(), r#"{"role":null}"#);
    }

    #[test]
    fn breakout_content() {
        let breakout: Breakout = serde_json::from_str(r#"{"session_room": "!s:x", "name": "A"}"#).unwrap();
        assert!(!breakout.closed);
    }
}
