use limbic_plugin_sdk::{Caller, clinic::Status, testing::FakeHost};

use super::*;

const SERVER: &str = "clinic.example";
const ROOM: &str = "!abc:clinic.example";
const UID: &str = "abc:clinic.example@clinic.example";
/// The UID as a resource name in a CalDAV collection.
const RESOURCE: &str = "abc_3Aclinic.example@clinic.example";
const T0: u64 = 1_795_000_000_000;
const THERAPIST: &str = "@t:clinic.example";
const ANN: &str = "@ann:clinic.example";
const BOB: &str = "@bob:clinic.example";

/// The SDK's fake server, with the scenario's steps below.
type Fake = FakeHost;

/// Steps of the scenarios on the fake server.
trait Scenario {
    /// The fake at T0, with a CalDAV server that answers 201 and takes 10 ms a request.
    fn calendar() -> Self;
    /// A scheduled session with a therapist and ann.
    fn scheduled() -> Self;
    /// Persists a state event and delivers it, as the server does.
    fn send(&self, event_type: &str, state_key: &str, ts: u64, content: serde_json::Value) -> Event;
    fn session(&self, ts: u64, status: &str, title: &str, starts_at: u64) -> Event;
    fn role(&self, user: &str, role: Option<&str>) -> Event;
    /// What the CalDAV server answers from now on: a status, or the error of the host call.
    fn answer(&self, answer: Result<u16, Error>);
    fn wait(&self, ms: u64);
    fn pending(&self) -> Vec<Retry>;
    fn stored(&self) -> CalSession;
    /// The CalDAV requests made: (method, URL).
    fn requests(&self) -> Vec<(String, String)>;
    fn http(&self, method: &str, path: &str, user: Option<&str>, body: serde_json::Value) -> HttpResponse;
    fn feed_url(&self, user: &str) -> String;
    fn feed(&self, url: &str) -> HttpResponse;
}

impl Scenario for FakeHost {
    fn calendar() -> Self {
        let fake = FakeHost::new().with_server_name(SERVER);
        fake.set_now(T0);
        fake.set_fetch_ms(10);
        fake.answer(Ok(201));
        fake
    }

    fn scheduled() -> Self {
        let fake = Fake::calendar();
        fake.session(T0 - 10_000, "scheduled", "Weekly, with care", T0);
        fake.role(THERAPIST, Some("therapist"));
        fake.role(ANN, Some("client"));
        fake
    }

    fn send(&self, event_type: &str, state_key: &str, ts: u64, content: serde_json::Value) -> Event {
        let event = Event {
            event_id: self.next_event_id(),
            room_id: ROOM.into(),
            sender: THERAPIST.into(),
            event_type: event_type.into(),
            state_key: Some(state_key.into()),
            content: content.to_string(),
            origin_server_ts: ts,
        };
        self.persist(&event);
        on_event(self, &event).unwrap();
        event
    }

    fn session(&self, ts: u64, status: &str, title: &str, starts_at: u64) -> Event {
        self.send(
            clinic::SESSION,
            "",
            ts,
            serde_json::json!({
                "kind": "couples", "title": title, "starts_at": starts_at, "ends_at": starts_at + 3_000_000,
                "timezone": "Europe/Berlin", "status": status, "max_participants": 3,
            }),
        )
    }

    fn role(&self, user: &str, role: Option<&str>) -> Event {
        self.send(clinic::ROLE, &clinic::role_key(user), T0 - 1000, serde_json::json!({ "role": role }))
    }

    fn answer(&self, answer: Result<u16, Error>) {
        match answer {
            Ok(status) => self.respond_status(status),
            Err(e) => self.respond(Err(e)),
        }
    }

    fn wait(&self, ms: u64) {
        self.advance(ms);
    }

    fn pending(&self) -> Vec<Retry> {
        self.kv_scan("retry:", None, 100).unwrap().iter().map(|(_, v)| serde_json::from_slice(v).unwrap()).collect()
    }

    fn stored(&self) -> CalSession {
        get_json(self, &session_key(ROOM)).unwrap().unwrap()
    }

    fn requests(&self) -> Vec<(String, String)> {
        self.fetched().iter().map(|r| (r.method.clone(), r.url.clone())).collect()
    }

    fn http(&self, method: &str, path: &str, user: Option<&str>, body: serde_json::Value) -> HttpResponse {
        let request = HttpRequest {
            method: method.into(),
            path: path.into(),
            query: String::new(),
            headers: vec![],
            body: if body.is_null() { vec![] } else { body.to_string().into_bytes() },
            caller: user.map(|user| Caller { user_id: user.into(), is_admin: false }),
        };
        handle_http(self, &Config::default(), &request)
    }

    fn feed_url(&self, user: &str) -> String {
        let response = self.http("GET", "/feed-url", Some(user), serde_json::Value::Null);
        assert_eq!(response.status, 200);
        response.json_body::<serde_json::Value>().unwrap()["url"].as_str().unwrap().to_owned()
    }

    fn feed(&self, url: &str) -> HttpResponse {
        let path = url.strip_prefix(MOUNT).unwrap();
        self.http("GET", path, None, serde_json::Value::Null)
    }
}

#[test]
fn sessions_and_user_lists_follow_the_room_state() {
    let fake = Fake::scheduled();
    let session = fake.stored();
    assert_eq!(session.sequence, 0);
    assert_eq!(session.participants.keys().collect::<Vec<_>>(), [ANN, THERAPIST]);
    assert_eq!(get_json::<Vec<String>>(&fake, &sessions_key(ANN)).unwrap(), Some(vec![ROOM.to_string()]));

    // Reschedule, rename, cancel: one bump each.
    fake.session(T0 - 9_000, "scheduled", "Weekly, with care", T0 + 3_600_000);
    assert_eq!(fake.stored().sequence, 1);
    fake.session(T0 - 8_000, "scheduled", "Weekly", T0 + 3_600_000);
    assert_eq!((fake.stored().sequence, fake.stored().last_modified), (2, T0 - 8_000));
    // A role event, or any event delivered again, changes nothing.
    let event = fake.role(ANN, Some("client"));
    on_event(&fake, &event).unwrap();
    assert_eq!(fake.stored().sequence, 2);

    // Losing the role takes the session out of the user's list.
    fake.role(ANN, None);
    assert_eq!(get_json::<Vec<String>>(&fake, &sessions_key(ANN)).unwrap(), None);
    assert!(user_sessions(&fake, ANN).unwrap().is_empty());
    assert_eq!(user_sessions(&fake, THERAPIST).unwrap().len(), 1);

    // Rooms without a session and other events are ignored.
    let mut other = event.clone();
    other.room_id = "!chat:clinic.example".into();
    on_event(&fake, &other).unwrap();
    other.event_type = "m.room.message".into();
    on_event(&fake, &other).unwrap();
    assert!(!fake.kv().contains_key(&session_key("!chat:clinic.example")));
}

#[test]
fn the_feed_at_a_secret_url() {
    let fake = Fake::scheduled();
    assert_eq!(fake.http("GET", "/feed-url", None, serde_json::Value::Null).status, 401);
    let url = fake.feed_url(ANN);
    assert_eq!(url, format!("{MOUNT}/feed/{}.ics", "01".repeat(32)));
    assert_eq!(fake.feed_url(ANN), url, "the same URL until reset");

    let feed = fake.feed(&url);
    assert_eq!(feed.status, 200);
    assert_eq!(feed.header("content-type"), Some("text/calendar; charset=utf-8"));
    let text = feed.text_body();
    assert!(text.starts_with("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:"), "{text}");
    assert!(text.contains("CALSCALE:GREGORIAN\r\n"));
    assert!(text.contains("X-WR-CALNAME:Therapy sessions\r\n"));
    assert!(text.contains(&format!("UID:{UID}\r\n")));
    assert!(text.contains("SUMMARY:Weekly\\, with care\r\n"));
    assert!(text.contains("DTSTART:20261118T110640Z\r\nDTEND:20261118T115640Z\r\n"));
    assert!(text.contains("STATUS:CONFIRMED\r\nSEQUENCE:0\r\n"));

    // A no-show stays in the feed, cancelled, with the same UID and a higher SEQUENCE.
    fake.session(T0 + 900_000, "no_show", "Weekly, with care", T0);
    let text = fake.feed(&url).text_body();
    assert!(text.contains(&format!("UID:{UID}\r\n")));
    assert!(text.contains("STATUS:CANCELLED\r\nSEQUENCE:1\r\n"));
    assert!(text.contains("DESCRIPTION:Kind: couples\\nStatus: no_show\r\n"));

    // Reset: the old URL stops working.
    let reset = fake.http("POST", "/feed-url/reset", Some(ANN), serde_json::Value::Null);
    assert_eq!(reset.status, 200);
    let new_url = reset.json_body::<serde_json::Value>().unwrap()["url"].as_str().unwrap().to_owned();
    assert_ne!(new_url, url);
    assert_eq!(fake.feed(&url).status, 404);
    assert_eq!(fake.feed(&new_url).status, 200);
    assert_eq!(fake.feed_url(ANN), new_url);

    // Another user's feed holds their sessions only; unknown and malformed tokens are 404.
    let bob = fake.feed_url(BOB);
    assert!(!fake.feed(&bob).text_body().contains("BEGIN:VEVENT"));
    assert_eq!(fake.feed(&format!("{MOUNT}/feed/{}.ics", "ab".repeat(32))).status, 404);
    assert_eq!(fake.feed(&format!("{MOUNT}/feed/{}", "01".repeat(32))).status, 404);
    assert_eq!(fake.feed(&format!("{MOUNT}/feed/../x.ics")).status, 404);
    assert_eq!(fake.http("GET", "/nothing", Some(ANN), serde_json::Value::Null).status, 404);
    assert_eq!(fake.http("POST", "/feed-url", Some(ANN), serde_json::Value::Null).status, 404);
}

#[test]
fn caldav_configuration() {
    let fake = Fake::scheduled();
    let put = |body: serde_json::Value| fake.http("PUT", "/caldav", Some(ANN), body);
    assert_eq!(fake.http("PUT", "/caldav", None, serde_json::json!({ "url": "http://x/" })).status, 401);
    assert_eq!(fake.http("GET", "/caldav", Some(ANN), serde_json::Value::Null).status, 404);
    for bad in ["ftp://x/", "http://", "http:///a", "http://x/a b/", "http://x/?q", "nope"] {
        assert_eq!(put(serde_json::json!({ "url": bad, "username": "ann", "password": "pw" })).status, 400, "{bad}");
    }
    assert_eq!(put(serde_json::json!({ "username": "ann" })).status, 400);

    let response = put(
        serde_json::json!({ "url": "http://127.0.0.1:5232/ann/calendar", "username": "ann", "password": "s3cret" }),
    );
    assert_eq!(response.status, 200);
    let body: serde_json::Value = response.json_body().unwrap();
    assert_eq!(body["url"], "http://127.0.0.1:5232/ann/calendar/");
    assert_eq!((body["pushed"].as_u64(), body["failed"].as_u64()), (Some(1), Some(0)));
    assert_eq!(body["errors"], serde_json::json!([]));
    let got: serde_json::Value = fake.http("GET", "/caldav", Some(ANN), serde_json::Value::Null).json_body().unwrap();
    assert_eq!(got, serde_json::json!({ "url": "http://127.0.0.1:5232/ann/calendar/", "username": "ann" }));

    // The initial push: one PUT of the session's VEVENT, Basic auth.
    let requests = fake.fetched();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(
        (request.method.as_str(), request.url.as_str()),
        ("PUT", &*format!("http://127.0.0.1:5232/ann/calendar/{RESOURCE}.ics"))
    );
    let header = |name: &str| request.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    assert_eq!(header("content-type"), Some("text/calendar; charset=utf-8"));
    assert_eq!(header("authorization"), Some("Basic YW5uOnMzY3JldA=="));
    let body = String::from_utf8(request.body.clone()).unwrap();
    assert_eq!(body.matches("BEGIN:VEVENT").count(), 1);
    assert!(body.starts_with("BEGIN:VCALENDAR\r\n") && body.ends_with("END:VCALENDAR\r\n"));
    assert!(!body.contains("X-WR-CALNAME"));

    assert_eq!(fake.http("DELETE", "/caldav", Some(ANN), serde_json::Value::Null).status, 200);
    assert_eq!(fake.http("GET", "/caldav", Some(ANN), serde_json::Value::Null).status, 404);
    fake.session(T0 - 5_000, "scheduled", "Moved", T0 + 1);
    assert_eq!(fake.fetched().len(), 1, "no pushes once forgotten");
}

#[test]
fn changes_are_pushed_to_each_participant_with_a_collection() {
    let fake = Fake::scheduled();
    let configure = |user: &str, url: &str| {
        let response =
            fake.http("PUT", "/caldav", Some(user), serde_json::json!({ "url": url, "username": "", "password": "" }));
        assert_eq!(response.status, 200);
    };
    configure(ANN, "http://dav.example/ann/");
    configure(THERAPIST, "http://dav.example/t/");
    configure(BOB, "http://dav.example/bob/");
    assert_eq!(fake.requests().len(), 2, "bob has no sessions yet");
    assert!(fake.fetched().iter().all(|r| r.headers.iter().all(|(n, _)| n != "authorization")));
    fake.clear_fetched();

    // A reschedule: a PUT to both participants.
    fake.session(T0 - 5_000, "scheduled", "Weekly", T0 + 60_000);
    let put = |who: &str| ("PUT".to_string(), format!("http://dav.example/{who}/{RESOURCE}.ics"));
    let delete = |who: &str| ("DELETE".to_string(), format!("http://dav.example/{who}/{RESOURCE}.ics"));
    assert_eq!(fake.requests(), [put("ann"), put("t")]);
    assert!(String::from_utf8(fake.fetched()[0].body.clone()).unwrap().contains("SEQUENCE:1\r\n"));
    fake.clear_fetched();

    // A new participant gets it; one who leaves loses it; the others hear nothing.
    fake.role(BOB, Some("client"));
    assert_eq!(fake.requests(), [put("bob")]);
    fake.clear_fetched();
    fake.role(ANN, None);
    assert_eq!(fake.requests(), [delete("ann")]);
    fake.clear_fetched();

    // Cancellation: DELETE everywhere (a 404 is fine).
    fake.answer(Ok(404));
    fake.session(T0 - 4_000, "cancelled", "Weekly", T0 + 60_000);
    assert_eq!(fake.requests(), [delete("bob"), delete("t")]);
    assert!(fake.logs().is_empty(), "{:?}", fake.logs());
    assert_eq!(fake.stored().status, Status::Cancelled);
}

#[test]
fn failures_are_logged_and_retried_when_worth_it() {
    let fake = Fake::scheduled();
    fake.answer(Err(Error::NotGranted("http: dav.example is not granted".into())));
    let response = fake.http(
        "PUT",
        "/caldav",
        Some(ANN),
        serde_json::json!({ "url": "http://dav.example/ann/", "username": "a", "password": "b" }),
    );
    assert_eq!(response.status, 200, "the collection is stored all the same");
    let body: serde_json::Value = response.json_body().unwrap();
    assert_eq!(body["failed"], 1);
    assert_eq!(
        body["errors"],
        serde_json::json!([format!(
            "PUT http://dav.example/ann/{RESOURCE}.ics: not-granted: http: dav.example is not granted"
        )])
    );
    assert!(fake.logs()[0].contains("not-granted"), "{:?}", fake.logs());
    assert!(fake.kv_scan("retry:", None, 10).unwrap().is_empty(), "not worth a retry");

    fake.answer(Ok(403));
    fake.session(T0 - 5_000, "scheduled", "Weekly", T0 + 1);
    assert!(fake.logs().last().unwrap().contains("failed (HTTP 403)"));
    assert!(fake.kv_scan("retry:", None, 10).unwrap().is_empty());

    fake.answer(Ok(503));
    fake.session(T0 - 4_000, "scheduled", "Weekly", T0 + 2);
    let pending = fake.kv_scan("retry:", None, 10).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].0, retry_key(ANN, ROOM));
    let sent = fake.fetched().len();
    retry(&fake).unwrap();
    assert_eq!(fake.fetched().len(), sent, "not due yet");
    fake.wait(FIRST_BACKOFF_MS);
    retry(&fake).unwrap();
    assert_eq!(fake.fetched().len(), sent + 1);
    let pending: Retry = get_json(&fake, &retry_key(ANN, ROOM)).unwrap().unwrap();
    assert_eq!(pending.attempts, 2);
    assert_eq!(pending.due_at, fake.now_ms() + 2 * FIRST_BACKOFF_MS);

    fake.answer(Ok(204));
    fake.wait(2 * FIRST_BACKOFF_MS);
    let before = fake.fetched().len();
    retry(&fake).unwrap();
    assert_eq!(fake.fetched().len(), before + 1);
    assert!(fake.pending().is_empty());

    // A push that keeps failing is given up after MAX_ATTEMPTS.
    fake.answer(Err(Error::Failed("connection refused".into())));
    fake.session(T0 - 3_000, "scheduled", "Weekly", T0 + 3);
    for _ in 0..MAX_ATTEMPTS + 2 {
        fake.wait(MAX_BACKOFF_MS);
        retry(&fake).unwrap();
    }
    assert!(fake.pending().is_empty());
    let attempts = fake.fetched().len() - before - 1;
    assert_eq!(attempts, MAX_ATTEMPTS as usize);
    assert!(fake.logs().last().unwrap().ends_with("failed (failed: connection refused)"));

    // Forgetting the collection drops pending retries.
    fake.session(T0 - 2_000, "scheduled", "Weekly", T0 + 4);
    assert!(!fake.kv_scan("retry:", None, 10).unwrap().is_empty());
    fake.http("DELETE", "/caldav", Some(ANN), serde_json::Value::Null);
    assert!(fake.kv_scan("retry:", None, 10).unwrap().is_empty());
}

#[test]
fn helpers() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foob"), "Zm9vYg==");
    assert_eq!(base64("Aladdin:open sesame".as_bytes()), "QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    assert_eq!(resource_name(UID), RESOURCE);
    assert_eq!(resource_name("a/b?c#d e%_,é"), "a_2Fb_3Fc_23d_20e_25_5F_2C_C3_A9");
    assert_ne!(resource_name("a_3A"), resource_name("a:"));
    assert!(is_token(&"0f".repeat(32)));
    assert!(!is_token(&"0F".repeat(32)));
    assert!(!is_token("abc"));
    let caldav = CalDav::parse(br#"{"url": "https://dav.example/c"}"#).unwrap();
    assert_eq!((caldav.url.as_str(), caldav.authorization()), ("https://dav.example/c/", None));

    // Real randomness natively (getrandom), and distinct tokens.
    let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
    WasmHost.random(&mut a).unwrap();
    WasmHost.random(&mut b).unwrap();
    assert_ne!(a, b);
    assert!(is_token(&hex(&a)));

    assert!(Calendar::new(serde_json::json!({})).is_ok());
    assert!(Calendar::new(serde_json::json!({ "feed_name": "Praxis" })).is_ok());
    assert!(Calendar::new(serde_json::json!({ "colour": "red" })).is_err());
}

#[test]
fn slow_collections_leave_the_rest_to_the_ticks() {
    let fake = Fake::scheduled();
    fake.role(BOB, Some("client"));
    for user in [ANN, BOB, THERAPIST] {
        let body = serde_json::json!({ "url": "http://dav.example/x/", "username": "", "password": "" });
        assert_eq!(fake.http("PUT", "/caldav", Some(user), body).status, 200);
    }
    fake.clear_fetched();

    // Each request takes 1.5 s: two fit in the budget, the third is queued.
    fake.set_fetch_ms(1_500);
    fake.session(T0 - 5_000, "scheduled", "Weekly", T0 + 60_000);
    assert_eq!(fake.fetched().len(), 2);
    let pending = fake.pending();
    assert_eq!(pending.len(), 1);
    assert_eq!((pending[0].user_id.as_str(), pending[0].attempts, pending[0].due_at), (THERAPIST, 0, 0));
    retry(&fake).unwrap();
    assert_eq!(fake.fetched().len(), 3);
    assert!(fake.pending().is_empty());
    assert!(String::from_utf8(fake.fetched()[2].body.clone()).unwrap().contains("SEQUENCE:1\r\n"));

    // PUT /caldav of a user with many sessions: as many as fit, the rest queued.
    let user = "@busy:clinic.example";
    for i in 0..5 {
        let room = format!("!r{i}:clinic.example");
        let session = update_for(&room, user);
        set_json(&fake, &session_key(&room), &session).unwrap();
        edit_list(&fake, user, |rooms| rooms.push(room.clone())).unwrap();
    }
    let body = serde_json::json!({ "url": "http://dav.example/busy/", "username": "", "password": "" });
    let response: serde_json::Value = fake.http("PUT", "/caldav", Some(user), body).json_body().unwrap();
    assert_eq!(
        (response["pushed"].as_u64(), response["queued"].as_u64(), response["failed"].as_u64()),
        (Some(2), Some(3), Some(0))
    );
    retry(&fake).unwrap();
    retry(&fake).unwrap();
    assert!(fake.pending().is_empty());
    let busy = fake.fetched().iter().filter(|r| r.url.starts_with("http://dav.example/busy/")).count();
    assert_eq!(busy, 5);
}

fn update_for(room: &str, user: &str) -> CalSession {
    let session: Session = serde_json::from_value(serde_json::json!({
        "kind": "group", "title": room, "starts_at": T0, "ends_at": T0 + 1, "timezone": "UTC",
        "status": "scheduled", "max_participants": 12,
    }))
    .unwrap();
    let participants = [(user.to_string(), limbic_plugin_sdk::clinic::Role::Client)].into_iter().collect();
    ics::update(None, room, &session, T0, participants).session
}

#[test]
fn backoff_doubles_up_to_an_hour() {
    assert_eq!(backoff_ms(1), FIRST_BACKOFF_MS);
    assert_eq!(backoff_ms(2), 2 * FIRST_BACKOFF_MS);
    assert_eq!(backoff_ms(6), 32 * FIRST_BACKOFF_MS);
    assert_eq!(backoff_ms(7), MAX_BACKOFF_MS);
    assert_eq!(backoff_ms(100), MAX_BACKOFF_MS);
}
