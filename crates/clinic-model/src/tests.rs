use std::collections::BTreeSet;

use serde_json::json;

use super::*;

/// The wire format as the repository specifies it.
const SESSIONS_MD: &str = include_str!("../../../spec/sessions.md");
const SESSION_SCHEMA: &str = include_str!("../../../spec/schemas/org.limbic.session.json");
const ROLE_SCHEMA: &str = include_str!("../../../spec/schemas/org.limbic.session.role.json");
const BREAKOUT_SCHEMA: &str = include_str!("../../../spec/schemas/org.limbic.breakout.json");
const RECORDING_SCHEMA: &str = include_str!("../../../spec/schemas/org.limbic.recording.json");
const CONSENT_SCHEMA: &str = include_str!("../../../spec/schemas/org.limbic.recording.consent.json");
const HAND_SCHEMA: &str = include_str!("../../../spec/schemas/org.limbic.hand.json");

fn schema(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

/// The example content of `org.limbic.session` in spec/sessions.md, with its `a | b | c`
/// alternatives.
fn session_example() -> Value {
    let section = SESSIONS_MD.split("### `org.limbic.session` ").nth(1).expect("the session section");
    let block = section.split("```json").nth(1).and_then(|rest| rest.split("```").next()).expect("its example");
    serde_json::from_str(block).unwrap()
}

/// The example with the first alternative of each `a | b` value.
fn session_json() -> Value {
    let mut example = session_example();
    for value in example.as_object_mut().unwrap().values_mut() {
        if let Some(first) = value.as_str().and_then(|s| s.split(" | ").next()).map(str::to_owned) {
            *value = Value::String(first);
        }
    }
    example
}

fn session() -> Session {
    Session::parse(&session_json()).unwrap()
}

/// Every variant of an enum, serialized, and the variants themselves.
fn wire_names<T: Serialize>(variants: &[T]) -> Vec<String> {
    variants.iter().map(|v| serde_json::to_value(v).unwrap().as_str().unwrap().to_owned()).collect()
}

const KINDS: [Kind; 6] = [Kind::Individual, Kind::Couples, Kind::Family, Kind::Group, Kind::Workshop, Kind::Support];
const STATUSES: [Status; 6] =
    [Status::Scheduled, Status::Open, Status::InProgress, Status::Completed, Status::Cancelled, Status::NoShow];
const ROLES: [Role; 4] = [Role::Therapist, Role::CoTherapist, Role::Client, Role::Observer];
const POLICIES: [RecordingPolicy; 2] = [RecordingPolicy::Forbidden, RecordingPolicy::WithConsent];

/// The keys of a serialized value.
fn keys<T: Serialize>(value: &T) -> BTreeSet<String> {
    serde_json::to_value(value).unwrap().as_object().unwrap().keys().cloned().collect()
}

fn set(fields: &[&str]) -> BTreeSet<String> {
    let set: BTreeSet<String> = fields.iter().map(|f| f.to_string()).collect();
    assert_eq!(set.len(), fields.len(), "FIELDS has duplicates: {fields:?}");
    set
}

/// FIELDS is what a full value serializes to, and what the JSON Schema lists.
fn fields_match<T: Serialize>(full: &T, fields: &[&str], schema_text: &str) {
    assert_eq!(keys(full), set(fields), "FIELDS against a serialized value");
    let schema = schema(schema_text);
    let properties: BTreeSet<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(properties, set(fields), "FIELDS against {}", schema["title"]);
}

/// The fields a strict parse needs are the schema's `required`.
fn required_match<T: DeserializeOwned>(
    full: &Value,
    fields: &[&str],
    schema_text: &str,
    parse: fn(&Value) -> Result<T, String>,
) {
    let schema = schema(schema_text);
    let required: BTreeSet<String> =
        schema["required"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_owned()).collect();
    for field in fields {
        let mut without = full.clone();
        without.as_object_mut().unwrap().remove(*field);
        assert_eq!(parse(&without).is_err(), required.contains(*field), "is `{field}` required?");
    }
}

#[test]
fn the_spec_example_session_round_trips() {
    let json = session_json();
    let session = session();
    assert_eq!(session.kind, Kind::Individual);
    assert_eq!(session.title, "Weekly session");
    assert_eq!((session.starts_at, session.ends_at), (1_795_000_000_000, 1_795_003_600_000));
    assert_eq!(session.timezone, "Europe/Berlin");
    assert_eq!(session.status, Status::Scheduled);
    assert_eq!((session.max_participants, session.join_window_minutes), (2, 15));
    assert_eq!(session.recording_policy, RecordingPolicy::Forbidden);
    assert_eq!(serde_json::to_value(&session).unwrap(), json);
    session.check().unwrap();

    // Every alternative the spec lists is a variant, and every variant is in the spec.
    let example = session_example();
    let alternatives =
        |field: &str| -> Vec<String> { example[field].as_str().unwrap().split(" | ").map(str::to_owned).collect() };
    assert_eq!(alternatives("kind"), wire_names(&KINDS));
    assert_eq!(alternatives("status"), wire_names(&STATUSES));
    assert_eq!(alternatives("recording_policy"), wire_names(&POLICIES));
    for (kind, name) in KINDS.iter().zip(alternatives("kind")) {
        let mut json = session_json();
        json["kind"] = json!(name);
        assert_eq!(Session::parse(&json).unwrap().kind, *kind);
    }
    for (status, name) in STATUSES.iter().zip(alternatives("status")) {
        let mut json = session_json();
        json["status"] = json!(name);
        let parsed = Session::parse(&json).unwrap();
        assert_eq!(parsed.status, *status);
        assert_eq!(serde_json::to_value(&parsed).unwrap(), json);
    }

    // The schemas' enums say the same.
    let schema = schema(SESSION_SCHEMA);
    let names = |field: &str| -> Vec<String> {
        schema["properties"][field]["enum"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names("kind"), wire_names(&KINDS));
    assert_eq!(names("status"), wire_names(&STATUSES));
    assert_eq!(names("recording_policy"), wire_names(&POLICIES));
    assert_eq!(schema["properties"]["join_window_minutes"]["default"], DEFAULT_JOIN_WINDOW_MINUTES);
    assert_eq!(schema["properties"]["recording_policy"]["default"], json!(RecordingPolicy::default()));
}

#[test]
fn session_defaults() {
    let mut json = session_json();
    json.as_object_mut().unwrap().remove("join_window_minutes");
    json.as_object_mut().unwrap().remove("recording_policy");
    let session = Session::parse(&json).unwrap();
    assert_eq!(session.join_window_minutes, DEFAULT_JOIN_WINDOW_MINUTES);
    assert_eq!(session.recording_policy, RecordingPolicy::Forbidden);
    // Defaults are written out.
    assert_eq!(serde_json::to_value(&session).unwrap()["join_window_minutes"], 15);
    assert_eq!(serde_json::to_value(&session).unwrap()["recording_policy"], "forbidden");
}

#[test]
fn roles() {
    let schema = schema(ROLE_SCHEMA);
    let names: Vec<Value> = schema["properties"]["role"]["enum"].as_array().unwrap().clone();
    let mut expected: Vec<Value> = wire_names(&ROLES).into_iter().map(Value::String).collect();
    expected.push(Value::Null);
    assert_eq!(names, expected);

    for (role, name) in ROLES.iter().zip(wire_names(&ROLES)) {
        let json = json!({ "role": name });
        let content: RoleContent = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(content, RoleContent { role: Some(*role) });
        assert_eq!(serde_json::to_value(&content).unwrap(), json);
        assert_eq!(RoleContent::parse(&json).unwrap(), content);
        assert_eq!(Role::of(&json), Some(*role));
    }
    let removed = json!({ "role": null });
    assert_eq!(RoleContent::parse(&removed).unwrap(), RoleContent { role: None });
    assert_eq!(serde_json::to_string(&RoleContent { role: None }).unwrap(), r#"{"role":null}"#);
    assert_eq!(Role::of(&removed), None);
    assert_eq!(Role::of(&json!({})), None);
    assert_eq!(Role::of(&json!({ "role": "chef" })), None);
    assert!(RoleContent::parse(&json!({ "role": "chef" })).is_err());

    assert_eq!(ROLES.map(Role::power_level), [100, 50, 0, 0]);
    assert_eq!(ROLES.map(Role::is_therapist), [true, true, false, false]);
    assert_eq!(role_key("@a:b"), "_@a:b");
    assert_eq!(role_user("_@a:b"), Some("@a:b"));
    assert_eq!(role_user("@a:b"), None);
    assert_eq!(role_user("_a:b"), None);
    assert_eq!(role_user(&role_key("@ann:clinic.example")), Some("@ann:clinic.example"));
}

#[test]
fn breakouts() {
    let json = json!({ "session_room": "!s:clinic.example", "name": "Pairs A", "closed": false });
    let breakout = Breakout::parse(&json).unwrap();
    assert_eq!(breakout, Breakout { session_room: "!s:clinic.example".into(), name: "Pairs A".into(), closed: false });
    assert_eq!(serde_json::to_value(&breakout).unwrap(), json);
    breakout.check().unwrap();

    let open = Breakout::parse(&json!({ "session_room": "!s:x", "name": "A" })).unwrap();
    assert!(!open.closed, "closed defaults to false");
    assert_eq!(serde_json::to_value(&open).unwrap()["closed"], false);
    let blank = Breakout { name: " \t".into(), ..breakout };
    assert_eq!(blank.check().unwrap_err(), "a breakout room needs a name");
    assert_eq!(schema(BREAKOUT_SCHEMA)["properties"]["closed"]["default"], false);
}

#[test]
fn recording_consent_and_hands() {
    let started = json!({ "recording": true, "by": "@t:clinic.example" });
    let recording = Recording::parse(&started).unwrap();
    assert_eq!(recording, Recording { recording: true, by: "@t:clinic.example".into(), stopped_because: None });
    assert_eq!(serde_json::to_value(&recording).unwrap(), started, "no stopped_because while recording");
    let stopped = json!({ "recording": false, "by": "@t:clinic.example", "stopped_because": "the session ended" });
    assert_eq!(serde_json::to_value(Recording::parse(&stopped).unwrap()).unwrap(), stopped);

    for flag in [true, false] {
        let consent = json!({ "consent": flag });
        assert_eq!(RecordingConsent::parse(&consent).unwrap(), RecordingConsent { consent: flag });
        assert_eq!(serde_json::to_value(RecordingConsent { consent: flag }).unwrap(), consent);
        let hand = json!({ "raised": flag });
        assert_eq!(Hand::parse(&hand).unwrap(), Hand { raised: flag });
        assert_eq!(serde_json::to_value(Hand { raised: flag }).unwrap(), hand);
    }
    assert!(RecordingConsent::parse(&json!({ "consent": "yes" })).is_err());
    assert!(Hand::parse(&json!({})).is_err());
    assert_eq!(Hand::parse(&json!([true])).unwrap_err(), "invalid org.limbic.hand content: expected a JSON object");
    assert!(serde_json::from_value::<Hand>(json!([true])).is_ok(), "what serde alone would take");
}

#[test]
fn fields_are_the_serialized_names_and_the_schemas_properties() {
    fields_match(&session(), Session::FIELDS, SESSION_SCHEMA);
    fields_match(&RoleContent { role: Some(Role::Client) }, RoleContent::FIELDS, ROLE_SCHEMA);
    fields_match(&RoleContent { role: None }, RoleContent::FIELDS, ROLE_SCHEMA);
    let breakout = Breakout { session_room: "!s:x".into(), name: "A".into(), closed: true };
    fields_match(&breakout, Breakout::FIELDS, BREAKOUT_SCHEMA);
    let recording =
        Recording { recording: false, by: "@t:x".into(), stopped_because: Some("stopped by a therapist".into()) };
    fields_match(&recording, Recording::FIELDS, RECORDING_SCHEMA);
    fields_match(&RecordingConsent { consent: true }, RecordingConsent::FIELDS, CONSENT_SCHEMA);
    fields_match(&Hand { raised: true }, Hand::FIELDS, HAND_SCHEMA);

    // What a strict parse needs is what the schema requires (a role's `role` aside: absent
    // deserializes as removed, and the server tells the two apart with `Role::of`).
    required_match(&session_json(), Session::FIELDS, SESSION_SCHEMA, Session::parse);
    required_match(&serde_json::to_value(&breakout).unwrap(), Breakout::FIELDS, BREAKOUT_SCHEMA, Breakout::parse);
    required_match(&serde_json::to_value(&recording).unwrap(), Recording::FIELDS, RECORDING_SCHEMA, Recording::parse);
    required_match(&json!({ "consent": true }), RecordingConsent::FIELDS, CONSENT_SCHEMA, RecordingConsent::parse);
    required_match(&json!({ "raised": true }), Hand::FIELDS, HAND_SCHEMA, Hand::parse);
}

#[test]
fn unknown_fields_are_accepted_by_serde_and_refused_by_parse() {
    let mut json = session_json();
    json["future_field"] = json!(1);
    json["another"] = json!({ "nested": true });
    let lenient: Session = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(lenient, session());
    assert_eq!(Session::unknown_fields(&json), ["another", "future_field"]);
    assert_eq!(Session::unknown_fields(&session_json()), Vec::<String>::new());
    assert_eq!(
        Session::parse(&json).unwrap_err(),
        "invalid org.limbic.session content: unknown field `another`, expected one of `kind`, `title`, `starts_at`, \
         `ends_at`, `timezone`, `status`, `max_participants`, `join_window_minutes`, `recording_policy`"
    );

    let role = json!({ "role": "client", "reason": "x" });
    assert_eq!(serde_json::from_value::<RoleContent>(role.clone()).unwrap().role, Some(Role::Client));
    assert_eq!(Role::of(&role), Some(Role::Client));
    assert_eq!(
        RoleContent::parse(&role).unwrap_err(),
        "invalid org.limbic.session.role content: unknown field `reason`, expected `role`"
    );

    let breakout = json!({ "session_room": "!s:x", "name": "A", "colour": "red" });
    assert_eq!(serde_json::from_value::<Breakout>(breakout.clone()).unwrap().name, "A");
    assert_eq!(
        Breakout::parse(&breakout).unwrap_err(),
        "invalid org.limbic.breakout content: unknown field `colour`, expected one of `session_room`, `name`, `closed`"
    );

    let recording = json!({ "recording": true, "by": "@t:x", "files": [] });
    assert!(serde_json::from_value::<Recording>(recording.clone()).is_ok());
    assert_eq!(Recording::unknown_fields(&recording), ["files"]);
    assert!(Recording::parse(&recording).is_err());
    let consent = json!({ "consent": true, "until": 5 });
    assert!(serde_json::from_value::<RecordingConsent>(consent.clone()).is_ok());
    assert!(RecordingConsent::parse(&consent).unwrap_err().contains("unknown field `until`, expected `consent`"));
    let hand = json!({ "raised": true, "emoji": "✋" });
    assert!(serde_json::from_value::<Hand>(hand.clone()).is_ok());
    assert!(Hand::parse(&hand).is_err());

    // The free function, with serde's wording for the expected fields.
    assert_eq!(unknown_fields(&json!({ "a": 1, "b": 2 }), &["a"]), ["b"]);
    assert!(unknown_fields(&json!("not an object"), &["a"]).is_empty());
    assert_eq!(
        parse_strict::<Value>("t", &json!({ "c": 1 }), &["a", "b"]).unwrap_err(),
        "invalid t content: unknown field `c`, expected `a` or `b`"
    );
    assert_eq!(
        parse_strict::<Value>("t", &json!({ "c": 1 }), &[]).unwrap_err(),
        "invalid t content: unknown field `c`, there are no fields"
    );
}

#[test]
fn invalid_content_says_what_is_wrong() {
    let mut json = session_json();
    json["status"] = json!("postponed");
    let error = Session::parse(&json).unwrap_err();
    assert!(error.starts_with("invalid org.limbic.session content: unknown variant `postponed`"), "{error}");
    assert!(serde_json::from_value::<Session>(json).is_err(), "unknown values are errors even when lenient");
    let mut json = session_json();
    json.as_object_mut().unwrap().remove("title");
    assert_eq!(Session::parse(&json).unwrap_err(), "invalid org.limbic.session content: missing field `title`");
    assert!(Session::parse(&json!("a string")).is_err());
    assert!(
        Session::parse(
            &serde_json::to_value(session_json().as_object().unwrap().values().collect::<Vec<_>>()).unwrap()
        )
        .is_err()
    );

    let check = |change: fn(&mut Session)| {
        let mut session = session();
        change(&mut session);
        session.check().unwrap_err()
    };
    assert_eq!(check(|s| s.ends_at = s.starts_at), "a session must end after it starts");
    assert_eq!(check(|s| s.title = "  ".into()), "a session needs a title");
    assert_eq!(check(|s| s.max_participants = 0), "max_participants must be at least 1");
}

#[test]
fn status_transitions() {
    use Status::*;
    let allowed = [
        (Scheduled, Open),
        (Open, InProgress),
        (InProgress, Completed),
        (Scheduled, Cancelled),
        (Scheduled, NoShow),
        (Open, Cancelled),
        (Open, NoShow),
    ];
    for from in STATUSES {
        for to in STATUSES {
            assert_eq!(from.can_become(to), allowed.contains(&(from, to)), "{from:?} -> {to:?}");
        }
    }
    assert_eq!(STATUSES.map(Status::is_live), [true, true, true, false, false, false]);
    // Final statuses go nowhere.
    for status in [Completed, Cancelled, NoShow] {
        assert!(STATUSES.iter().all(|next| !status.can_become(*next)));
    }
}

#[test]
fn kinds() {
    assert_eq!(KINDS.map(Kind::allows_breakouts), [false, false, true, true, true, true]);
    // Debug names are what the server's messages lower-case ("a couples session ...").
    assert_eq!(format!("{:?}", Kind::Couples).to_lowercase(), "couples");
    assert_eq!(format!("{:?}", Status::InProgress).to_lowercase(), "inprogress");
    // Ordering follows the declaration (the workflow, for statuses).
    assert!(Status::Scheduled < Status::Open && Status::Open < Status::InProgress);
    assert!(Kind::Individual < Kind::Support && Role::Therapist < Role::Observer);
}

#[test]
fn join_windows_and_overlaps() {
    const MIN: u64 = 60_000;
    let session = session();
    let (start, end) = (session.starts_at, session.ends_at);
    assert_eq!(session.join_opens_at(), start - 15 * MIN);
    assert!(!session.join_window_open(start - 15 * MIN - 1));
    assert!(session.join_window_open(start - 15 * MIN));
    assert!(session.join_window_open(end));
    assert!(!session.join_window_open(end + 1));
    let done = Session { status: Status::Completed, ..session.clone() };
    assert!(!done.join_window_open(start));
    let early = Session { starts_at: 5, ends_at: 10, ..session.clone() };
    assert_eq!(early.join_opens_at(), 0, "saturates");

    assert!(session.overlaps(start, end));
    assert!(session.overlaps(start - 1, start + 1));
    assert!(session.overlaps(end - 1, end + 1));
    assert!(!session.overlaps(end, end + MIN), "back to back");
    assert!(!session.overlaps(start - MIN, start));
}

#[test]
fn event_types() {
    assert_eq!(
        [SESSION, ROLE, NOTE, NOTES_FOR, BREAKOUT, RECORDING, RECORDING_CONSENT, HAND, PASSCODE_FIELD],
        [
            "org.limbic.session",
            "org.limbic.session.role",
            "org.limbic.session.note",
            "org.limbic.session.notes_for",
            "org.limbic.breakout",
            "org.limbic.recording",
            "org.limbic.recording.consent",
            "org.limbic.hand",
            "org.limbic.passcode",
        ]
    );
    // Each has its schema, titled with the type.
    for (event_type, text) in [
        (SESSION, SESSION_SCHEMA),
        (ROLE, ROLE_SCHEMA),
        (BREAKOUT, BREAKOUT_SCHEMA),
        (RECORDING, RECORDING_SCHEMA),
        (RECORDING_CONSENT, CONSENT_SCHEMA),
        (HAND, HAND_SCHEMA),
    ] {
        assert_eq!(schema(text)["title"], event_type);
    }
    assert_eq!(CALL_MEMBER, "org.matrix.msc3401.call.member");
    assert_eq!(RTC_MEMBER, "org.matrix.msc4143.rtc.member");
}

#[test]
fn utc_times_break_down_and_print_milliseconds() {
    assert_eq!(UtcTime::from_ms(0), UtcTime { year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0 });
    assert_eq!(UtcTime::from_ms(1_709_210_096_999), UtcTime { year: 2024, month: 2, day: 29, hour: 12, minute: 34, second: 56 });
    assert_eq!(UtcTime::from_ms(1_709_210_096_000).to_string(), "2024-02-29 12:34:56 UTC");
    // Days around the epoch and the leap day.
    assert_eq!(super::civil_from_days(-1), (1969, 12, 31));
    assert_eq!(super::civil_from_days(19_723), (2024, 1, 1));
}
