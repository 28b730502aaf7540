//! The followup plugin: when a group session completes, a follow-up chat room for its
//! participants, exactly once.
//!
//! On `on-event` of an `org.limbic.session` state event (state key `""`) whose status is
//! `completed` and whose kind is one of the configured kinds (default `group`, `workshop`,
//! `support`):
//! 1. if the kv key `room:<session room id>` holds no room yet, it creates the follow-up room as
//!    the plugin's user: name `<session title> — follow-up`, every user with a role in the session
//!    invited (from the session room's `org.limbic.session.role` state), therapists at power level
//!    100 and co-therapists at 50 (as in the session room); and stores the new room's id under
//!    that key right after;
//! 2. posts the welcome message (config `welcome`, `{title}` replaced by the session title) as the
//!    plugin's user, once (kv key `welcome:<session room id>` → the message's event id);
//! 3. links the room from the session room with the state event `org.limbic.followup` (state key
//!    `""`, content `{"room_id": <follow-up room>}`), sent as the session's therapist (a local
//!    user with the role `therapist`, else `co_therapist`; capability `users.act-as`), unless the
//!    session room already has that link.
//!
//! An event delivered again (on-event is at least once) finds the kv key and only finishes the
//! steps 2 and 3 that are missing, so there is never a second room. A step that fails returns
//! the error (the server logs it); the next delivery of a completed-session event finishes it.
//!
//! HTTP: `GET /rooms/<session room id>` → `{"room_id": <follow-up room>}` for server admins and
//! users with a role in the session; 404 `M_NOT_FOUND` if there is no follow-up room (yet), 403
//! `M_FORBIDDEN` for other users, 401 `M_MISSING_TOKEN` without an access token.
//!
//! Config (all optional): `{"welcome": "...", "kinds": ["group", "workshop", "support"]}`.

use std::collections::BTreeMap;

use limbic_plugin_sdk::{
    Caller, Event, Host, HttpRequest, HttpResponse, LogLevel, Plugin, RoomSpec, WasmHost,
    clinic::{self, Kind, Role, RoleContent, Session, Status},
    export_plugin, serde_json,
};
use serde::Deserialize;

/// The state event in a session room that links its follow-up room (state key `""`).
pub const FOLLOWUP: &str = "org.limbic.followup";

/// The welcome message when the config has none; `{title}` is the session title.
pub const DEFAULT_WELCOME: &str = "Welcome to the follow-up chat for \u{201c}{title}\u{201d}. This room stays open after \
                                   the session so you can keep in touch with your group and your therapist.";

/// The plugin's config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The welcome message; `{title}` is replaced by the session title.
    #[serde(default = "default_welcome")]
    pub welcome: String,
    /// The kinds of session that get a follow-up room.
    #[serde(default = "default_kinds")]
    pub kinds: Vec<Kind>,
}

fn default_welcome() -> String {
    DEFAULT_WELCOME.into()
}

fn default_kinds() -> Vec<Kind> {
    vec![Kind::Group, Kind::Workshop, Kind::Support]
}

/// The kv key holding the follow-up room of a session room.
pub fn room_key(session_room: &str) -> String {
    format!("room:{session_room}")
}

/// The kv key holding the event id of the welcome message posted for a session room.
pub fn welcome_key(session_room: &str) -> String {
    format!("welcome:{session_room}")
}

/// The session of an event that should get a follow-up room: an `org.limbic.session` state
/// event with state key `""`, status `completed` and one of `kinds`.
pub fn completed_session(event: &Event, kinds: &[Kind]) -> Option<Session> {
    if !event.is_state_of(clinic::SESSION, "") {
        return None;
    }
    let session: Session = event.content().ok()?;
    (session.status == Status::Completed && kinds.contains(&session.kind)).then_some(session)
}

/// What the plugin does for a completed session.
#[derive(Debug, PartialEq)]
pub struct Plan {
    /// The follow-up room to create.
    pub spec: RoomSpec,
    /// The welcome message's body.
    pub welcome: String,
    /// Who links the room from the session room: a local therapist (or co-therapist), if any.
    pub link_sender: Option<String>,
}

/// The plan for a session from its room's state. `plugin_user` creates the room (so it is not
/// invited); `server_name` tells local users (who the plugin may act as) from remote ones.
pub fn plan(session: &Session, state: &[Event], plugin_user: &str, server_name: &str, welcome: &str) -> Plan {
    let roles: BTreeMap<String, Role> = clinic::roles(state);
    let invite = roles.keys().filter(|user| *user != plugin_user).cloned().collect();
    let power_levels = roles
        .iter()
        .filter(|(user, role)| role.is_therapist() && *user != plugin_user)
        .map(|(user, role)| (user.clone(), role.power_level()))
        .collect();
    let local = |user: &&String| user.rsplit_once(':').is_some_and(|(_, server)| server == server_name);
    let with_role = |wanted: Role| roles.iter().filter(move |(_, role)| **role == wanted).map(|(user, _)| user);
    let link_sender =
        with_role(Role::Therapist).find(local).or_else(|| with_role(Role::CoTherapist).find(local)).cloned();
    Plan {
        spec: RoomSpec {
            name: Some(format!("{} \u{2014} follow-up", session.title)),
            invite,
            power_levels,
            ..RoomSpec::default()
        },
        welcome: welcome.replace("{title}", &session.title),
        link_sender,
    }
}

/// Who may ask for a session's follow-up room.
#[derive(Debug, PartialEq, Eq)]
pub enum Access {
    /// A server admin or a participant.
    Allowed,
    /// No access token.
    Anonymous,
    /// Someone else.
    Forbidden,
}

/// Whether `caller`, who holds `role` in the session (if any), may read its follow-up room.
pub fn access(caller: Option<&Caller>, role: Option<Role>) -> Access {
    match caller {
        None => Access::Anonymous,
        Some(caller) if caller.is_admin || role.is_some() => Access::Allowed,
        Some(_) => Access::Forbidden,
    }
}

/// The room a `org.limbic.followup` event links to.
#[derive(Deserialize)]
struct Link {
    room_id: String,
}

/// Creates, welcomes and links the follow-up room of `session_room` as far as not done yet;
/// returns the follow-up room's id.
pub fn follow_up(host: &impl Host, config: &Config, session_room: &str, session: &Session) -> Result<String, String> {
    let state = host.room_state(session_room)?;
    let plan = plan(session, &state, &host.plugin_user(), &host.server_name(), &config.welcome);

    let key = room_key(session_room);
    let room = match host.kv_get_string(&key)? {
        Some(room) => room,
        None => {
            let room = host.create_room(None, &plan.spec)?;
            host.kv_set(&key, room.as_bytes()).map_err(|e| {
                format!("created the follow-up room {room} for {session_room} but could not record it: {e}")
            })?;
            host.log(LogLevel::Info, &format!("created the follow-up room {room} for the session {session_room}"));
            room
        }
    };

    let welcomed = welcome_key(session_room);
    if host.kv_get_string(&welcomed)?.is_none() {
        let event_id = host.send_text(&room, None, &plan.welcome)?;
        host.kv_set(&welcomed, event_id.as_bytes())?;
    }

    let linked = host
        .state_event(session_room, FOLLOWUP, "")?
        .and_then(|event| event.content::<Link>().ok())
        .is_some_and(|link| link.room_id == room);
    if !linked {
        let sender = plan
            .link_sender
            .ok_or_else(|| format!("no local therapist of {session_room} can link its follow-up room {room}"))?;
        host.send_state(session_room, Some(&sender), FOLLOWUP, "", &serde_json::json!({ "room_id": room }))?;
    }
    Ok(room)
}

/// The follow-up room of a session room, for the HTTP route.
pub fn lookup(host: &impl Host, caller: Option<&Caller>, session_room: &str) -> HttpResponse {
    let role = match caller {
        Some(caller) if !caller.is_admin => {
            match host.state_event(session_room, clinic::ROLE, &clinic::role_key(&caller.user_id)) {
                Ok(event) => event.and_then(|e| e.content::<RoleContent>().ok()).and_then(|c| c.role),
                Err(e) => return HttpResponse::error(500, "M_UNKNOWN", &e.to_string()),
            }
        }
        _ => None,
    };
    match access(caller, role) {
        Access::Anonymous => HttpResponse::error(401, "M_MISSING_TOKEN", "Missing access token"),
        Access::Forbidden => HttpResponse::error(403, "M_FORBIDDEN", "You are not a participant of this session"),
        Access::Allowed => match host.kv_get_string(&room_key(session_room)) {
            Ok(Some(room)) => HttpResponse::json(200, &serde_json::json!({ "room_id": room })),
            Ok(None) => HttpResponse::error(404, "M_NOT_FOUND", "This session has no follow-up room"),
            Err(e) => HttpResponse::error(500, "M_UNKNOWN", &e.to_string()),
        },
    }
}

/// The plugin.
pub struct FollowUp {
    config: Config,
}

impl Plugin for FollowUp {
    fn new(config: serde_json::Value) -> Result<Self, String> {
        Ok(FollowUp { config: limbic_plugin_sdk::parse_config(config)? })
    }

    fn on_event(&self, event: &Event) -> Result<(), String> {
        match completed_session(event, &self.config.kinds) {
            Some(session) => follow_up(&WasmHost, &self.config, &event.room_id, &session).map(|_| ()),
            None => Ok(()),
        }
    }

    fn handle_http(&self, request: HttpRequest) -> HttpResponse {
        match (request.method.as_str(), request.path_segments().as_slice()) {
            ("GET", [rooms, session_room]) if rooms == "rooms" => lookup(&WasmHost, request.caller.as_ref(), session_room),
            _ => HttpResponse::not_found(),
        }
    }
}

export_plugin!(FollowUp);

#[cfg(test)]
mod tests {
    use limbic_plugin_sdk::{
        Error, MatrixError,
        testing::{FakeHost, RoomAction},
    };

    use super::*;

    const ROOM: &str = "!session:clinic.example";

    fn state(event_type: &str, state_key: &str, content: serde_json::Value) -> Event {
        Event {
            event_id: format!("${event_type}{state_key}"),
            room_id: ROOM.into(),
            sender: "@therapist:clinic.example".into(),
            event_type: event_type.into(),
            state_key: Some(state_key.into()),
            content: content.to_string(),
            origin_server_ts: 1,
        }
    }

    fn session_event(kind: &str, status: &str) -> Event {
        state(
            clinic::SESSION,
            "",
            serde_json::json!({
                "kind": kind, "title": "Tuesday group", "starts_at": 1, "ends_at": 2,
                "timezone": "Europe/Berlin", "status": status, "max_participants": 12,
            }),
        )
    }

    fn role(user: &str, role: Option<&str>) -> Event {
        state(clinic::ROLE, &clinic::role_key(user), serde_json::json!({ "role": role }))
    }

    fn config() -> Config {
        limbic_plugin_sdk::parse_config(serde_json::json!({})).unwrap()
    }

    /// The SDK's fake server holding the session room's state, with the plugin's user
    /// `@followup:clinic.example` (so the rooms it creates are `!followup<n>:clinic.example`).
    fn server() -> FakeHost {
        let fake = FakeHost::new().with_plugin_user("@followup:clinic.example");
        for event in [
            session_event("group", "completed"),
            role("@therapist:clinic.example", Some("therapist")),
            role("@co:other.example", Some("co_therapist")),
            role("@ann:clinic.example", Some("client")),
            role("@bob:other.example", Some("observer")),
            role("@gone:clinic.example", None),
            state(clinic::MEMBER, "@ann:clinic.example", serde_json::json!({ "membership": "join" })),
        ] {
            fake.persist(&event);
        }
        fake
    }

    /// What the plugin did in rooms: `create <name>`, `text <room> <body>` and `state <room>
    /// <sender> <type>`.
    fn writes_of(fake: &FakeHost) -> Vec<String> {
        fake.room_actions()
            .into_iter()
            .map(|action| match action {
                RoomAction::CreateRoom { spec, .. } => format!("create {}", spec.name.as_deref().unwrap_or("")),
                RoomAction::Send(event) if event.is_state() => {
                    format!("state {} {} {}", event.room_id, event.sender, event.event_type)
                }
                RoomAction::Send(event) => {
                    let body = event.content_json().unwrap()["body"].as_str().unwrap().to_owned();
                    format!("text {} {body}", event.room_id)
                }
                RoomAction::Invite { room_id, user_id, .. } => format!("invite {room_id} {user_id}"),
            })
            .collect()
    }

    #[test]
    fn only_completed_sessions_of_the_configured_kinds() {
        let kinds = config().kinds;
        assert!(completed_session(&session_event("group", "completed"), &kinds).is_some());
        assert!(completed_session(&session_event("support", "completed"), &kinds).is_some());
        assert!(completed_session(&session_event("individual", "completed"), &kinds).is_none());
        assert!(completed_session(&session_event("group", "in_progress"), &kinds).is_none());
        let mut keyed = session_event("group", "completed");
        keyed.state_key = Some("x".into());
        assert!(completed_session(&keyed, &kinds).is_none());
        let mut garbage = session_event("group", "completed");
        garbage.content = "{}".into();
        assert!(completed_session(&garbage, &kinds).is_none());
        let family: Config = limbic_plugin_sdk::parse_config(serde_json::json!({ "kinds": ["family"] })).unwrap();
        assert!(completed_session(&session_event("family", "completed"), &family.kinds).is_some());
        assert!(limbic_plugin_sdk::parse_config::<Config>(serde_json::json!({ "kinds": ["party"] })).is_err());
    }

    #[test]
    fn plans_the_room_from_the_roles() {
        let fake = server();
        let session = completed_session(&session_event("group", "completed"), &config().kinds).unwrap();
        let plan = plan(&session, &fake.room_state(ROOM).unwrap(), "@followup:clinic.example", "clinic.example", "Hi {title}!");
        assert_eq!(plan.spec.name.as_deref(), Some("Tuesday group \u{2014} follow-up"));
        assert_eq!(
            plan.spec.invite,
            ["@ann:clinic.example", "@bob:other.example", "@co:other.example", "@therapist:clinic.example"]
        );
        assert_eq!(
            plan.spec.power_levels,
            [("@co:other.example".to_string(), 50), ("@therapist:clinic.example".to_string(), 100)]
        );
        assert_eq!(plan.welcome, "Hi Tuesday group!");
        assert_eq!(plan.link_sender.as_deref(), Some("@therapist:clinic.example"));

        // Only a remote therapist: a local co-therapist links; nobody local: nobody.
        let state = [role("@t:other.example", Some("therapist")), role("@co:clinic.example", Some("co_therapist"))];
        assert_eq!(plan_sender(&session, &state), Some("@co:clinic.example".into()));
        let state = [role("@t:other.example", Some("therapist")), role("@c:clinic.example", Some("client"))];
        assert_eq!(plan_sender(&session, &state), None);
    }

    fn plan_sender(session: &Session, state: &[Event]) -> Option<String> {
        plan(session, state, "@followup:clinic.example", "clinic.example", "").link_sender
    }

    #[test]
    fn creates_welcomes_and_links_exactly_once() {
        let fake = server();
        let session = completed_session(&session_event("group", "completed"), &config().kinds).unwrap();
        let room = follow_up(&fake, &config(), ROOM, &session).unwrap();
        assert_eq!(room, "!followup0:clinic.example");
        assert_eq!(fake.kv_get_string(&room_key(ROOM)).unwrap(), Some(room.clone()));
        let writes = writes_of(&fake);
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert_eq!(writes[0], "create Tuesday group \u{2014} follow-up");
        assert!(writes[1].starts_with(
            "text !followup0:clinic.example Welcome to the follow-up chat for \u{201c}Tuesday group\u{201d}."
        ));
        assert_eq!(writes[2], format!("state {ROOM} @therapist:clinic.example {FOLLOWUP}"));

        // The same event again: nothing more.
        assert_eq!(follow_up(&fake, &config(), ROOM, &session).unwrap(), room);
        assert_eq!(writes_of(&fake).len(), 3);
    }

    #[test]
    fn a_replay_finishes_what_failed() {
        let fake = server();
        let refused = MatrixError { status: 403, errcode: "M_FORBIDDEN".into(), message: "no".into() };
        fake.fail("send_raw", Error::Refused(refused));
        let session = completed_session(&session_event("group", "completed"), &config().kinds).unwrap();
        let error = follow_up(&fake, &config(), ROOM, &session).unwrap_err();
        assert_eq!(error, "refused: 403 M_FORBIDDEN: no");
        assert_eq!(writes_of(&fake), ["create Tuesday group \u{2014} follow-up"]);

        fake.recover("send_raw");
        assert_eq!(follow_up(&fake, &config(), ROOM, &session).unwrap(), "!followup0:clinic.example");
        let writes = writes_of(&fake);
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert!(writes[1].starts_with("text !followup0"));
    }

    #[test]
    fn lookup_checks_the_caller() {
        let fake = server();
        let caller = |user: &str, is_admin| Caller { user_id: user.into(), is_admin };
        let status = |caller: Option<Caller>| lookup(&fake, caller.as_ref(), ROOM).status;
        assert_eq!(status(None), 401);
        assert_eq!(status(Some(caller("@stranger:clinic.example", false))), 403);
        assert_eq!(status(Some(caller("@gone:clinic.example", false))), 403);
        assert_eq!(status(Some(caller("@ann:clinic.example", false))), 404);
        assert_eq!(status(Some(caller("@admin:clinic.example", true))), 404);

        fake.kv_set(&room_key(ROOM), b"!f:clinic.example").unwrap();
        let response = lookup(&fake, Some(&caller("@bob:other.example", false)), ROOM);
        assert_eq!(response.status, 200);
        assert_eq!(
            response.json_body::<serde_json::Value>().unwrap(),
            serde_json::json!({ "room_id": "!f:clinic.example" })
        );
        assert_eq!(status(Some(caller("@admin:clinic.example", true))), 200);
    }

    #[test]
    fn routes() {
        let plugin = FollowUp::new(serde_json::json!({})).unwrap();
        let request = |method: &str, path: &str| HttpRequest {
            method: method.into(),
            path: path.into(),
            query: String::new(),
            headers: vec![],
            body: vec![],
            caller: None,
        };
        // Anonymous requests are answered before any host call.
        assert_eq!(plugin.handle_http(request("GET", "/rooms/%21session%3Aclinic.example")).status, 401);
        assert_eq!(plugin.handle_http(request("GET", "/rooms")).status, 404);
        assert_eq!(plugin.handle_http(request("POST", "/rooms/!a:b")).status, 404);
        assert_eq!(plugin.handle_http(request("GET", "/rooms/!a:b/x")).status, 404);
        // Other events are ignored without touching the host.
        assert!(plugin.on_event(&session_event("group", "in_progress")).is_ok());
    }
}
