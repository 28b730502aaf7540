//! The billing plugin: attendance in therapy sessions, and one invoice per completed session.
//!
//! **Tracking** (`on-event` of `org.limbic.session`, `org.limbic.session.role`, `m.room.member`
//! and `org.matrix.msc3401.call.member`): per session room, the kv key `session:<room id>` holds
//! a [`Record`]: the session (kind, title, scheduled times, status), the time each status was
//! first seen, each user's role, and presence marks — `m.room.member` join / anything else for
//! the room, and call member state events for the call (state key `_@user:server_DEVICE`,
//! `@user:server_DEVICE` or legacy `@user:server`; non-empty content means in the call, `{}` or
//! an empty legacy `memberships` list means out; only the user themselves counts). The first
//! event of a room that has no record seeds it from the room's current state, so a plugin loaded
//! mid-session still knows who is there. Rooms without an `org.limbic.session` are ignored.
//!
//! **Billing**: when an `org.limbic.session` event with status `completed` arrives and the kv
//! key `invoice:<room id>` is empty, the plugin builds the [`Invoice`] (see
//! [`invoice::build`]) and stores it there. The key is checked first, so an event delivered
//! again never bills twice; once a room is invoiced its events are ignored.
//!
//! **HTTP** (an access token is required, else `401 M_MISSING_TOKEN`):
//! - `GET /invoices` → `{"invoices": [...]}` sorted by `ended_at`: every invoice for server
//!   admins, those of the sessions where the caller is a therapist or co-therapist, and for a
//!   client the invoices that bill them, showing their own line and attendance only (see
//!   [`view_for`]); `GET /invoices?format=csv` → the same as `text/csv` (see [`invoice::csv`]).
//! - `GET /invoices/<room id>` → the invoice as the caller may see it; `404 M_NOT_FOUND` if there
//!   is none, `403 M_FORBIDDEN` if the caller is neither an admin, one of its therapists nor a
//!   client it bills.
//!
//! Config: the rate card, see [`Config`].

use std::{cell::RefCell, collections::HashSet};

use limbic_plugin_sdk::{
    Caller, Error, Event, Host, HttpRequest, HttpResponse, LogLevel, Plugin, WasmHost,
    clinic::{self, Session, Status},
    export_plugin, serde_json,
};

pub mod invoice;
pub mod record;

pub use invoice::{Config, Invoice};
pub use record::Record;

/// The kv key of a session room's record.
pub fn record_key(room_id: &str) -> String {
    format!("session:{room_id}")
}

/// The kv prefix of invoices.
pub const INVOICE_PREFIX: &str = "invoice:";

/// The kv key of a session room's invoice.
pub fn invoice_key(room_id: &str) -> String {
    format!("{INVOICE_PREFIX}{room_id}")
}

/// Rooms known not to be sessions, so that membership in ordinary rooms costs one lookup per
/// room and instance, not one per event. Forgotten when it grows large.
#[derive(Default)]
pub struct NotSessions(RefCell<HashSet<String>>);

impl NotSessions {
    const MAX: usize = 10_000;

    fn contains(&self, room_id: &str) -> bool {
        self.0.borrow().contains(room_id)
    }

    fn insert(&self, room_id: &str) {
        let mut rooms = self.0.borrow_mut();
        if rooms.len() >= Self::MAX {
            rooms.clear();
        }
        rooms.insert(room_id.to_owned());
    }

    fn remove(&self, room_id: &str) {
        self.0.borrow_mut().remove(room_id);
    }
}

fn json_error(e: serde_json::Error) -> String {
    Error::from(e).to_string()
}

/// Takes an event into account, and bills the session when it completes.
pub fn on_event(host: &impl Host, config: &Config, not_sessions: &NotSessions, event: &Event) -> Result<(), String> {
    let Some(state_key) = event.state_key.as_deref() else { return Ok(()) };
    let is_session = event.event_type == clinic::SESSION && state_key.is_empty();
    if !is_session && ![clinic::ROLE, clinic::MEMBER, clinic::CALL_MEMBER].contains(&event.event_type.as_str()) {
        return Ok(());
    }
    let room = event.room_id.as_str();
    if is_session {
        not_sessions.remove(room);
    } else if not_sessions.contains(room) {
        return Ok(());
    }
    if host.kv_get(&invoice_key(room))?.is_some() {
        return Ok(()); // invoiced: nothing left to track
    }

    let key = record_key(room);
    let (mut record, mut changed) = match host.kv_get(&key)? {
        Some(bytes) => {
            let record = serde_json::from_slice::<Record>(&bytes).map_err(|e| format!("{key} is corrupt: {e}"))?;
            (record, false)
        }
        None => {
            if !is_session && host.state_event(room, clinic::SESSION, "")?.is_none() {
                not_sessions.insert(room);
                return Ok(());
            }
            let mut record = Record::default();
            for state in host.room_state(room)? {
                record.apply(&state);
            }
            (record, true)
        }
    };
    changed |= record.apply(event);
    if changed {
        host.kv_set(&key, &serde_json::to_vec(&record).map_err(json_error)?)?;
    }
    if is_session && event.content::<Session>().is_ok_and(|session| session.status == Status::Completed) {
        bill(host, config, room, &record)?;
    }
    Ok(())
}

/// Stores the invoice of a completed session unless it has one; returns the new invoice.
pub fn bill(host: &impl Host, config: &Config, room_id: &str, record: &Record) -> Result<Option<Invoice>, String> {
    let key = invoice_key(room_id);
    if host.kv_get(&key)?.is_some() {
        return Ok(None);
    }
    let (invoice, warning) = invoice::build(room_id, record, config, host.now_ms())?;
    if let Some(warning) = warning {
        host.log(LogLevel::Warn, &warning);
    }
    host.kv_set(&key, &serde_json::to_vec(&invoice).map_err(json_error)?)?;
    host.log(
        LogLevel::Info,
        &format!(
            "invoiced the session {room_id}: {} line(s), {} cents {}",
            invoice.lines.len(),
            invoice.total_cents,
            invoice.currency
        ),
    );
    Ok(Some(invoice))
}

/// What `caller` may see of `invoice`: all of it for server admins and the session's
/// therapists; for a client billed in it, their own line and attendance only, with their line's
/// amount as the total (who else was in a group session stays private); nothing for anyone else.
pub fn view_for(caller: &Caller, invoice: &Invoice) -> Option<Invoice> {
    if caller.is_admin || invoice.therapists.contains(&caller.user_id) {
        return Some(invoice.clone());
    }
    let lines: Vec<_> = invoice.lines.iter().filter(|line| line.user_id == caller.user_id).cloned().collect();
    if lines.is_empty() {
        return None;
    }
    Some(Invoice {
        total_cents: lines.iter().map(|line| line.amount_cents).sum(),
        attendance: invoice.attendance.iter().filter(|a| a.user_id == caller.user_id).cloned().collect(),
        lines,
        ..invoice.clone()
    })
}

/// The invoices `caller` may see, sorted by `ended_at` (then room id).
pub fn visible_invoices(host: &impl Host, caller: &Caller) -> Result<Vec<Invoice>, Error> {
    const PAGE: u32 = 200;
    let mut invoices = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = host.kv_scan(INVOICE_PREFIX, after.as_deref(), PAGE)?;
        for (key, value) in &page {
            match serde_json::from_slice::<Invoice>(value) {
                Ok(invoice) => invoices.extend(view_for(caller, &invoice)),
                Err(e) => host.log(LogLevel::Warn, &format!("{key} is corrupt: {e}")),
            }
        }
        match page.last() {
            Some((key, _)) if page.len() == PAGE as usize => after = Some(key.clone()),
            _ => break,
        }
    }
    invoices.sort_by(|a, b| (a.ended_at, &a.room_id).cmp(&(b.ended_at, &b.room_id)));
    Ok(invoices)
}

fn server_error(e: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::error(500, "M_UNKNOWN", &e.to_string())
}

/// Answers the plugin's routes.
pub fn handle_http(host: &impl Host, request: &HttpRequest) -> HttpResponse {
    let segments = request.path_segments();
    let room = match (request.method.as_str(), segments.as_slice()) {
        ("GET", [invoices]) if invoices == "invoices" => None,
        ("GET", [invoices, room]) if invoices == "invoices" => Some(room.as_str()),
        _ => return HttpResponse::not_found(),
    };
    let Some(caller) = request.caller.as_ref() else {
        return HttpResponse::error(401, "M_MISSING_TOKEN", "Missing access token");
    };
    match room {
        None => {
            let csv = match request.query_param("format").as_deref() {
                None | Some("json") => false,
                Some("csv") => true,
                Some(_) => return HttpResponse::error(400, "M_INVALID_PARAM", "format must be json or csv"),
            };
            match visible_invoices(host, caller) {
                Ok(invoices) if csv => HttpResponse::text(200, "text/csv; charset=utf-8", invoice::csv(&invoices))
                    .with_header("content-disposition", "attachment; filename=\"invoices.csv\""),
                Ok(invoices) => HttpResponse::json(200, &serde_json::json!({ "invoices": invoices })),
                Err(e) => server_error(e),
            }
        }
        Some(room) => match host.kv_get(&invoice_key(room)) {
            Ok(None) => HttpResponse::error(404, "M_NOT_FOUND", "This session has no invoice"),
            Ok(Some(bytes)) => match serde_json::from_slice::<Invoice>(&bytes) {
                Ok(invoice) => match view_for(caller, &invoice) {
                    Some(view) => HttpResponse::json(200, &view),
                    None => HttpResponse::error(
                        403,
                        "M_FORBIDDEN",
                        "Only the session's therapists, the clients it bills and admins see its invoice",
                    ),
                },
                Err(e) => server_error(e),
            },
            Err(e) => server_error(e),
        },
    }
}

/// The plugin.
pub struct Billing {
    config: Config,
    not_sessions: NotSessions,
}

impl Plugin for Billing {
    fn new(config: serde_json::Value) -> Result<Self, String> {
        Ok(Billing { config: Config::parse(config)?, not_sessions: NotSessions::default() })
    }

    fn on_event(&self, event: &Event) -> Result<(), String> {
        on_event(&WasmHost, &self.config, &self.not_sessions, event)
    }

    fn handle_http(&self, request: HttpRequest) -> HttpResponse {
        handle_http(&WasmHost, &request)
    }
}

export_plugin!(Billing);

#[cfg(test)]
mod tests {
    use limbic_plugin_sdk::testing::FakeHost;

    use super::*;

    const ROOM: &str = "!s:clinic.example";
    const MIN: u64 = 60_000;
    const T0: u64 = 1_795_000_000_000;
    const THERAPIST: &str = "@t:clinic.example";
    const ANN: &str = "@ann:clinic.example";

    /// The SDK's fake server, with the invoice of a room read back.
    trait Invoices {
        fn invoice(&self, room: &str) -> Option<Invoice>;
    }

    impl Invoices for FakeHost {
        fn invoice(&self, room: &str) -> Option<Invoice> {
            self.kv().get(&invoice_key(room)).map(|bytes| serde_json::from_slice(bytes).unwrap())
        }
    }

    fn event(
        room: &str,
        id: &str,
        event_type: &str,
        state_key: &str,
        sender: &str,
        ts: u64,
        content: serde_json::Value,
    ) -> Event {
        Event {
            event_id: id.into(),
            room_id: room.into(),
            sender: sender.into(),
            event_type: event_type.into(),
            state_key: Some(state_key.into()),
            content: content.to_string(),
            origin_server_ts: ts,
        }
    }

    fn session(room: &str, id: &str, ts: u64, kind: &str, status: &str) -> Event {
        event(
            room,
            id,
            clinic::SESSION,
            "",
            THERAPIST,
            ts,
            serde_json::json!({
                "kind": kind, "title": "Weekly session", "starts_at": T0, "ends_at": T0 + 50 * MIN,
                "timezone": "UTC", "status": status, "max_participants": 2,
            }),
        )
    }

    fn member(room: &str, id: &str, user: &str, ts: u64, membership: &str) -> Event {
        event(room, id, clinic::MEMBER, user, user, ts, serde_json::json!({ "membership": membership }))
    }

    fn role(room: &str, id: &str, user: &str, role: &str) -> Event {
        event(
            room,
            id,
            clinic::ROLE,
            &clinic::role_key(user),
            THERAPIST,
            T0 - 10 * MIN,
            serde_json::json!({ "role": role }),
        )
    }

    fn config() -> Config {
        Config::parse(serde_json::json!({
            "currency": "EUR",
            "rates": { "individual": { "per": "session", "amount_cents": 9000 } },
        }))
        .unwrap()
    }

    /// An individual session from creation to completion; the client attends by call only.
    fn history(room: &str) -> Vec<Event> {
        vec![
            member(room, "$m1", THERAPIST, T0 - 10 * MIN, "join"),
            session(room, "$s1", T0 - 10 * MIN, "individual", "scheduled"),
            role(room, "$r1", THERAPIST, "therapist"),
            role(room, "$r2", ANN, "client"),
            member(room, "$m2", ANN, T0 - 10 * MIN, "invite"),
            session(room, "$s2", T0 - 5 * MIN, "individual", "open"),
            session(room, "$s3", T0, "individual", "in_progress"),
            event(
                room,
                "$c1",
                clinic::CALL_MEMBER,
                "_@ann:clinic.example_PHONE",
                ANN,
                T0 + MIN,
                serde_json::json!({ "application": "m.call", "call_id": "", "device_id": "PHONE" }),
            ),
            event(
                room,
                "$c2",
                clinic::CALL_MEMBER,
                "_@ann:clinic.example_PHONE",
                ANN,
                T0 + 46 * MIN,
                serde_json::json!({}),
            ),
            session(room, "$s4", T0 + 48 * MIN, "individual", "completed"),
            member(room, "$m3", THERAPIST, T0 + 49 * MIN, "leave"),
        ]
    }

    fn run(fake: &FakeHost, not_sessions: &NotSessions, events: &[Event]) {
        for e in events {
            fake.persist(e);
            on_event(fake, &config(), not_sessions, e).unwrap();
        }
    }

    #[test]
    fn a_completed_session_is_invoiced_exactly_once() {
        let fake = FakeHost::new();
        let not_sessions = NotSessions::default();
        run(&fake, &not_sessions, &history(ROOM));
        let invoice = fake.invoice(ROOM).expect("invoiced");
        assert_eq!((invoice.started_at, invoice.ended_at, invoice.duration_minutes), (T0, T0 + 48 * MIN, 48));
        assert_eq!(invoice.therapists, [THERAPIST]);
        assert_eq!(invoice.lines.len(), 1);
        assert_eq!(invoice.lines[0].user_id, ANN);
        assert_eq!((invoice.lines[0].room_minutes, invoice.lines[0].call_minutes), (0, 45));
        assert!(invoice.lines[0].attended);
        assert_eq!(invoice.total_cents, 9000);
        assert!(fake.logs().iter().any(|l| l.starts_with("info: invoiced the session !s:clinic.example")));

        // Everything delivered again (at least once): the same invoice, no more writes.
        let writes = fake.calls("kv_set");
        for e in history(ROOM) {
            on_event(&fake, &config(), &not_sessions, &e).unwrap();
        }
        assert_eq!(fake.invoice(ROOM), Some(invoice.clone()));
        assert_eq!(fake.calls("kv_set"), writes);
        // Even with a fresh instance and the record gone, the invoice key guards it.
        fake.kv_delete(&record_key(ROOM)).unwrap();
        run(&fake, &NotSessions::default(), &history(ROOM));
        assert_eq!(fake.invoice(ROOM), Some(invoice));
    }

    #[test]
    fn a_record_starts_from_the_current_state() {
        let fake = FakeHost::new();
        let events = history(ROOM);
        // The plugin was loaded mid-session: the server already holds the first 8 events.
        for e in &events[..8] {
            fake.persist(e);
        }
        // Its first event (a profile change) seeds the record from the current state.
        let mut rest = vec![member(ROOM, "$m9", THERAPIST, T0 + 2 * MIN, "join")];
        rest.extend_from_slice(&events[8..]);
        run(&fake, &NotSessions::default(), &rest);
        let invoice = fake.invoice(ROOM).unwrap();
        assert_eq!(invoice.started_at, T0);
        assert_eq!(invoice.lines[0].call_minutes, 45);
    }

    #[test]
    fn ordinary_rooms_are_ignored() {
        let fake = FakeHost::new();
        let not_sessions = NotSessions::default();
        let room = "!chat:clinic.example";
        run(&fake, &not_sessions, &[member(room, "$a", ANN, 1, "join"), member(room, "$b", THERAPIST, 2, "join")]);
        assert!(fake.kv().is_empty());
        assert_eq!(fake.calls("state_event"), 1, "one lookup per room");
        // A message or a non-state event never reaches the store.
        let mut message = member(ROOM, "$x", ANN, 3, "join");
        message.state_key = None;
        on_event(&fake, &config(), &not_sessions, &message).unwrap();
        assert!(fake.kv().is_empty());
        // If the room becomes a session after all, it is tracked from then on.
        run(&fake, &not_sessions, &[session(room, "$s", 4, "individual", "scheduled")]);
        assert!(fake.kv().contains_key(&record_key(room)));
        let record: Record = serde_json::from_slice(&fake.kv()[&record_key(room)]).unwrap();
        assert_eq!(record.marks.len(), 2, "seeded from the room's state");
    }

    #[test]
    fn a_kind_without_rate_is_billed_zero_with_a_warning() {
        let fake = FakeHost::new();
        let events: Vec<Event> = history(ROOM)
            .into_iter()
            .map(|mut e| {
                e.content = e.content.replace("individual", "couples");
                e
            })
            .collect();
        run(&fake, &NotSessions::default(), &events);
        assert_eq!(fake.invoice(ROOM).unwrap().total_cents, 0);
        assert!(fake.logs().iter().any(|l| l.starts_with("warn: no rate for sessions of kind Couples")));
    }

    fn request(path: &str, query: &str, caller: Option<(&str, bool)>) -> HttpRequest {
        HttpRequest {
            method: "GET".into(),
            path: path.into(),
            query: query.into(),
            headers: vec![],
            body: vec![],
            caller: caller.map(|(user, is_admin)| Caller { user_id: user.into(), is_admin }),
        }
    }

    #[test]
    fn http_routes() {
        let fake = FakeHost::new();
        let not_sessions = NotSessions::default();
        run(&fake, &not_sessions, &history(ROOM));
        let other = "!other:clinic.example";
        let events: Vec<Event> = history(other)
            .into_iter()
            .map(|mut e| {
                e.content = e.content.replace(THERAPIST, "@t2:clinic.example");
                e.state_key = e.state_key.map(|k| k.replace(THERAPIST, "@t2:clinic.example"));
                e.origin_server_ts -= 24 * 60 * MIN;
                e
            })
            .collect();
        run(&fake, &not_sessions, &events);
        assert!(fake.invoice(other).is_some());

        let list = |caller| {
            let response = handle_http(&fake, &request("/invoices", "", caller));
            assert_eq!(response.status, 200);
            let body: serde_json::Value = response.json_body().unwrap();
            body["invoices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["room_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(list(Some((THERAPIST, false))), [ROOM]);
        assert_eq!(list(Some(("@t2:clinic.example", false))), [other]);
        assert_eq!(list(Some(("@admin:clinic.example", true))), [other, ROOM], "sorted by ended_at");
        assert_eq!(list(Some((ANN, false))), [other, ROOM], "a client sees the invoices that bill them");
        assert!(list(Some(("@stranger:clinic.example", false))).is_empty());

        let response = handle_http(&fake, &request("/invoices", "format=csv", Some((THERAPIST, false))));
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("text/csv; charset=utf-8"));
        let text = response.text_body();
        assert_eq!(text.lines().count(), 2);
        assert!(text.ends_with(",@ann:clinic.example,client,1,session,9000,9000,EUR\r\n"), "{text}");
        assert_eq!(handle_http(&fake, &request("/invoices", "format=xml", Some((THERAPIST, false)))).status, 400);

        let one = |room: &str, caller| handle_http(&fake, &request(&format!("/invoices/{room}"), "", caller)).status;
        assert_eq!(one("%21s%3Aclinic.example", Some((THERAPIST, false))), 200);
        assert_eq!(one(ROOM, Some(("@admin:clinic.example", true))), 200);
        assert_eq!(one(ROOM, Some(("@stranger:clinic.example", false))), 403);
        // A client sees their own line and attendance, and nobody else's: with a second client
        // billed in the same (group) session,
        let mut whole = fake.invoice(ROOM).unwrap();
        let mut bo = whole.lines[0].clone();
        bo.user_id = "@bo:clinic.example".into();
        whole.lines.push(bo);
        let mut bo_there = whole.attendance.iter().find(|a| a.user_id == ANN).unwrap().clone();
        bo_there.user_id = "@bo:clinic.example".into();
        whole.attendance.push(bo_there);
        whole.total_cents += whole.lines[0].amount_cents;
        fake.kv_set_json(&invoice_key(ROOM), &whole).unwrap();
        let theirs: Invoice =
            handle_http(&fake, &request(&format!("/invoices/{ROOM}"), "", Some((ANN, false)))).json_body().unwrap();
        assert_eq!(theirs.lines.iter().map(|l| l.user_id.as_str()).collect::<Vec<_>>(), [ANN]);
        assert_eq!(theirs.attendance.iter().map(|a| a.user_id.as_str()).collect::<Vec<_>>(), [ANN]);
        assert_eq!(theirs.total_cents, theirs.lines[0].amount_cents);
        assert_eq!((theirs.room_id.as_str(), theirs.therapists.clone()), (whole.room_id.as_str(), whole.therapists.clone()));
        assert_eq!(one("!nope:clinic.example", Some((THERAPIST, false))), 404);
        assert_eq!(one(ROOM, None), 401);
        let body: Invoice = handle_http(&fake, &request(&format!("/invoices/{ROOM}"), "", Some((THERAPIST, false))))
            .json_body()
            .unwrap();
        assert_eq!(body, fake.invoice(ROOM).unwrap());

        let anonymous = handle_http(&fake, &request("/invoices", "", None));
        assert_eq!(anonymous.status, 401);
        assert_eq!(anonymous.json_body::<serde_json::Value>().unwrap()["errcode"], "M_MISSING_TOKEN");
        assert_eq!(handle_http(&fake, &request("/nothing", "", None)).status, 404);
        let mut post = request("/invoices", "", Some((THERAPIST, false)));
        post.method = "POST".into();
        assert_eq!(handle_http(&fake, &post).status, 404);
    }

    #[test]
    fn the_plugin_checks_its_config() {
        assert!(
            Billing::new(serde_json::json!({ "rates": { "group": { "per": "day", "amount_cents": 1 } } })).is_err()
        );
        let plugin = Billing::new(serde_json::json!({})).unwrap();
        // Anonymous requests are answered before any host call.
        assert_eq!(plugin.handle_http(request("/invoices", "", None)).status, 401);
    }
}
