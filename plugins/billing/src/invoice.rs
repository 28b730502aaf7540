//! The rate card, invoices and their CSV form: pure functions of a [`Record`].

use std::collections::BTreeMap;

use limbic_plugin_sdk::clinic::{Kind, Role, Status};
use serde::{Deserialize, Serialize};

use crate::record::Record;

/// The plugin's config: the rate card.
///
/// ```json
/// {"currency": "EUR", "rates": {"individual": {"per": "session", "amount_cents": 9000},
///                               "group": {"per": "minute", "amount_cents": 60}}}
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The currency of every amount (ISO 4217 code, e.g. `EUR`); default `EUR`.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// The rate per session kind; a kind without one bills 0 (and logs a warning).
    #[serde(default)]
    pub rates: BTreeMap<Kind, Rate>,
}

fn default_currency() -> String {
    "EUR".into()
}

impl Config {
    /// Parses and checks the config.
    pub fn parse(config: limbic_plugin_sdk::serde_json::Value) -> Result<Self, String> {
        let config: Config = limbic_plugin_sdk::parse_config(config)?;
        if config.currency.trim().is_empty() {
            return Err("invalid plugin config: currency must not be empty".into());
        }
        Ok(config)
    }
}

/// What one kind of session costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Per attended session, or per attended minute.
    pub per: Unit,
    /// The price of one unit, in cents.
    pub amount_cents: u64,
}

/// What a line counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Attended sessions (1 or 0).
    Session,
    /// Attended minutes, rounded up.
    Minute,
}

impl Unit {
    /// `session` or `minute`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Session => "session",
            Unit::Minute => "minute",
        }
    }
}

/// One client's line of an invoice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The client.
    pub user_id: String,
    /// Their role (`client`).
    pub role: Role,
    /// Minutes in the room within the session, rounded up.
    pub room_minutes: u64,
    /// Minutes in the call within the session, rounded up.
    pub call_minutes: u64,
    /// Whether they were in the room or the call at all during the session.
    pub attended: bool,
    /// Units billed: 1 or 0 sessions, or the attended minutes.
    pub quantity: u64,
    /// The unit.
    pub unit: Unit,
    /// The price of a unit in cents.
    pub unit_price_cents: u64,
    /// `quantity × unit_price_cents`.
    pub amount_cents: u64,
}

/// A participant's attendance (every user with a role, therapists and observers too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attendance {
    /// The participant.
    pub user_id: String,
    /// Their role.
    pub role: Role,
    /// Minutes in the room within the session, rounded up.
    pub room_minutes: u64,
    /// Minutes in the call within the session, rounded up.
    pub call_minutes: u64,
}

/// The invoice of a completed session (kv `invoice:<room id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    /// The session room.
    pub room_id: String,
    /// The session's title.
    pub title: String,
    /// The session's kind.
    pub kind: Kind,
    /// Its therapists and co-therapists, sorted.
    pub therapists: Vec<String>,
    /// When it went in progress (or its scheduled start), ms since the epoch.
    pub started_at: u64,
    /// When it completed (or its scheduled end), ms since the epoch.
    pub ended_at: u64,
    /// `ended_at − started_at` in minutes, rounded up.
    pub duration_minutes: u64,
    /// The rate card's currency.
    pub currency: String,
    /// One line per client, sorted by user id.
    pub lines: Vec<Line>,
    /// The sum of the lines.
    pub total_cents: u64,
    /// When the invoice was made, ms since the epoch.
    pub created_at: u64,
    /// Every participant's attendance, sorted by user id.
    #[serde(default)]
    pub attendance: Vec<Attendance>,
}

/// Milliseconds as minutes, rounded up.
pub fn minutes(ms: u64) -> u64 {
    ms.div_ceil(60_000)
}

/// The invoice of a completed session from its record; a warning to log comes with it when the
/// rate card has no rate for the session's kind. `Err` if the record does not show a completed
/// session.
pub fn build(
    room_id: &str,
    record: &Record,
    config: &Config,
    now_ms: u64,
) -> Result<(Invoice, Option<String>), String> {
    let session = record.session.as_ref().ok_or_else(|| format!("{room_id}: no session seen"))?;
    let &completed_at = record.statuses.get(&Status::Completed).ok_or_else(|| format!("{room_id}: not completed"))?;
    let (started_at, ended_at) = match record.statuses.get(&Status::InProgress) {
        Some(&in_progress_at) if in_progress_at <= completed_at => (in_progress_at, completed_at),
        _ => (session.starts_at, session.ends_at.max(session.starts_at)),
    };
    let rate = config.rates.get(&session.kind).copied();
    let warning = rate
        .is_none()
        .then(|| format!("no rate for sessions of kind {:?} in the rate card: {room_id} is billed 0", session.kind));

    let roles = record.current_roles();
    let mut lines = Vec::new();
    let mut attendance = Vec::new();
    for (user, &role) in &roles {
        let (room_ms, call_ms) = record.attendance_ms(user, started_at, ended_at);
        attendance.push(Attendance {
            user_id: user.clone(),
            role,
            room_minutes: minutes(room_ms),
            call_minutes: minutes(call_ms),
        });
        if role != Role::Client {
            continue;
        }
        let attended = room_ms > 0 || call_ms > 0;
        let (unit, unit_price_cents, quantity) = match rate {
            Some(Rate { per: Unit::Minute, amount_cents }) => {
                (Unit::Minute, amount_cents, minutes(room_ms.max(call_ms)))
            }
            Some(Rate { per: Unit::Session, amount_cents }) => (Unit::Session, amount_cents, u64::from(attended)),
            None => (Unit::Session, 0, u64::from(attended)),
        };
        lines.push(Line {
            user_id: user.clone(),
            role,
            room_minutes: minutes(room_ms),
            call_minutes: minutes(call_ms),
            attended,
            quantity,
            unit,
            unit_price_cents,
            amount_cents: quantity.saturating_mul(unit_price_cents),
        });
    }
    let invoice = Invoice {
        room_id: room_id.to_owned(),
        title: session.title.clone(),
        kind: session.kind,
        therapists: roles.iter().filter(|(_, role)| role.is_therapist()).map(|(user, _)| user.clone()).collect(),
        started_at,
        ended_at,
        duration_minutes: minutes(ended_at - started_at),
        currency: config.currency.clone(),
        total_cents: lines.iter().map(|line| line.amount_cents).fold(0, u64::saturating_add),
        lines,
        created_at: now_ms,
        attendance,
    };
    Ok((invoice, warning))
}

/// The CSV columns.
pub const CSV_HEADER: &str =
    "room_id,title,kind,ended_at,user_id,role,quantity,unit,unit_price_cents,amount_cents,currency";

/// The invoices as CSV (RFC 4180, CRLF line ends): the header, then one row per line.
pub fn csv(invoices: &[Invoice]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push_str("\r\n");
    for invoice in invoices {
        for line in &invoice.lines {
            let row = [
                csv_field(&invoice.room_id),
                csv_field(&defuse(&invoice.title)),
                kind_name(invoice.kind).to_owned(),
                iso8601(invoice.ended_at),
                csv_field(&line.user_id),
                role_name(line.role).to_owned(),
                line.quantity.to_string(),
                line.unit.as_str().to_owned(),
                line.unit_price_cents.to_string(),
                line.amount_cents.to_string(),
                csv_field(&invoice.currency),
            ];
            out.push_str(&row.join(","));
            out.push_str("\r\n");
        }
    }
    out
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

/// Free text that a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, CR first) gets
/// a leading `'`.
fn defuse(text: &str) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{text}") } else { text.to_owned() }
}

/// The JSON name of a kind (`individual`, `group`, ...).
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Individual => "individual",
        Kind::Couples => "couples",
        Kind::Family => "family",
        Kind::Group => "group",
        Kind::Workshop => "workshop",
        Kind::Support => "support",
    }
}

/// The JSON name of a role.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Therapist => "therapist",
        Role::CoTherapist => "co_therapist",
        Role::Client => "client",
        Role::Observer => "observer",
    }
}

/// Milliseconds since the epoch as ISO 8601 in UTC, to the second: `2026-11-18T20:00:00Z`.
pub fn iso8601(ms: u64) -> String {
    let t = limbic_plugin_sdk::clock::UtcTime::from_ms(ms);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", t.year, t.month, t.day, t.hour, t.minute, t.second)
}

#[cfg(test)]
mod tests {
    use limbic_plugin_sdk::{Event, clinic, serde_json};

    use super::*;

    const ROOM: &str = "!s:clinic.example";
    const MIN: u64 = 60_000;
    const T0: u64 = 1_795_000_000_000;

    fn event(id: &str, event_type: &str, state_key: &str, sender: &str, ts: u64, content: serde_json::Value) -> Event {
        Event {
            event_id: id.into(),
            room_id: ROOM.into(),
            sender: sender.into(),
            event_type: event_type.into(),
            state_key: Some(state_key.into()),
            content: content.to_string(),
            origin_server_ts: ts,
        }
    }

    fn session(id: &str, ts: u64, kind: &str, status: &str) -> Event {
        event(
            id,
            clinic::SESSION,
            "",
            "@t:clinic.example",
            ts,
            serde_json::json!({
                "kind": kind, "title": "Weekly, \"deep\" talk", "starts_at": T0, "ends_at": T0 + 50 * MIN,
                "timezone": "Europe/Berlin", "status": status, "max_participants": 12,
            }),
        )
    }

    fn role(user: &str, role: &str) -> Event {
        event(
            &format!("$role{user}"),
            clinic::ROLE,
            &clinic::role_key(user),
            "@t:clinic.example",
            T0 - MIN,
            serde_json::json!({ "role": role }),
        )
    }

    fn member(id: &str, user: &str, ts: u64, membership: &str) -> Event {
        event(id, clinic::MEMBER, user, user, ts, serde_json::json!({ "membership": membership }))
    }

    fn config() -> Config {
        Config::parse(serde_json::json!({
            "currency": "EUR",
            "rates": {
                "individual": { "per": "session", "amount_cents": 9000 },
                "group": { "per": "minute", "amount_cents": 60 },
            },
        }))
        .unwrap()
    }

    /// A group session: in progress from T0+2min to T0+47min; ann in the room from T0 to
    /// T0+30min and in the call T0+5min..T0+40min30s; bob invited but never there; cat an
    /// observer; the therapist there throughout.
    fn group_record(kind: &str) -> Record {
        let mut record = Record::default();
        for e in [
            session("$s1", T0 - 10 * MIN, kind, "scheduled"),
            role("@t:clinic.example", "therapist"),
            role("@co:other.example", "co_therapist"),
            role("@ann:clinic.example", "client"),
            role("@bob:clinic.example", "client"),
            role("@cat:clinic.example", "observer"),
            member("$m1", "@t:clinic.example", T0 - 10 * MIN, "join"),
            member("$m2", "@ann:clinic.example", T0, "join"),
            session("$s2", T0 + 2 * MIN, kind, "in_progress"),
            event(
                "$c1",
                clinic::CALL_MEMBER,
                "_@ann:clinic.example_DEV",
                "@ann:clinic.example",
                T0 + 5 * MIN,
                serde_json::json!({ "application": "m.call", "call_id": "", "device_id": "DEV" }),
            ),
            member("$m3", "@ann:clinic.example", T0 + 30 * MIN, "leave"),
            event(
                "$c2",
                clinic::CALL_MEMBER,
                "_@ann:clinic.example_DEV",
                "@ann:clinic.example",
                T0 + 40 * MIN + 30_000,
                serde_json::json!({}),
            ),
            session("$s3", T0 + 47 * MIN, kind, "completed"),
        ] {
            record.apply(&e);
        }
        record
    }

    #[test]
    fn per_minute_lines_bill_the_attended_minutes_rounded_up() {
        let (invoice, warning) = build(ROOM, &group_record("group"), &config(), 42).unwrap();
        assert_eq!(warning, None);
        assert_eq!(invoice.started_at, T0 + 2 * MIN);
        assert_eq!(invoice.ended_at, T0 + 47 * MIN);
        assert_eq!(invoice.duration_minutes, 45);
        assert_eq!(invoice.therapists, ["@co:other.example", "@t:clinic.example"]);
        assert_eq!(invoice.created_at, 42);
        assert_eq!(invoice.lines.len(), 2);
        let ann = &invoice.lines[0];
        assert_eq!(ann.user_id, "@ann:clinic.example");
        assert_eq!((ann.room_minutes, ann.call_minutes), (28, 36));
        assert!(ann.attended);
        assert_eq!((ann.quantity, ann.unit, ann.unit_price_cents, ann.amount_cents), (36, Unit::Minute, 60, 2160));
        let bob = &invoice.lines[1];
        assert!(!bob.attended);
        assert_eq!((bob.quantity, bob.amount_cents), (0, 0));
        assert_eq!(invoice.total_cents, 2160);
        let therapist = invoice.attendance.iter().find(|a| a.user_id == "@t:clinic.example").unwrap();
        assert_eq!((therapist.role, therapist.room_minutes), (Role::Therapist, 45));
        assert_eq!(invoice.attendance.len(), 5);

        let json = serde_json::to_value(&invoice).unwrap();
        assert_eq!(json["kind"], "group");
        assert_eq!(json["lines"][0]["unit"], "minute");
        assert_eq!(json["lines"][0]["role"], "client");
        assert_eq!(serde_json::from_value::<Invoice>(json).unwrap(), invoice);
    }

    #[test]
    fn per_session_lines_bill_attending_clients_once() {
        let (invoice, _) = build(ROOM, &group_record("individual"), &config(), 0).unwrap();
        let amounts: Vec<_> = invoice.lines.iter().map(|l| (l.quantity, l.unit, l.amount_cents)).collect();
        assert_eq!(amounts, [(1, Unit::Session, 9000), (0, Unit::Session, 0)]);
        assert_eq!(invoice.total_cents, 9000);
        assert_eq!(invoice.currency, "EUR");
    }

    #[test]
    fn a_kind_without_a_rate_bills_nothing_with_a_warning() {
        let (invoice, warning) = build(ROOM, &group_record("workshop"), &config(), 0).unwrap();
        assert!(warning.unwrap().contains("Workshop"));
        assert_eq!(invoice.total_cents, 0);
        assert!(invoice.lines[0].attended);
        assert_eq!((invoice.lines[0].quantity, invoice.lines[0].unit_price_cents), (1, 0));
    }

    #[test]
    fn without_in_progress_the_scheduled_times_are_the_window() {
        let mut record = Record::default();
        record.apply(&session("$s1", T0 - 10 * MIN, "individual", "scheduled"));
        record.apply(&role("@ann:clinic.example", "client"));
        record.apply(&member("$m", "@ann:clinic.example", T0 + 49 * MIN, "join"));
        assert!(build(ROOM, &record, &config(), 0).unwrap_err().contains("not completed"));
        record.apply(&session("$s2", T0 + 60 * MIN, "individual", "completed"));
        let (invoice, _) = build(ROOM, &record, &config(), 0).unwrap();
        assert_eq!((invoice.started_at, invoice.ended_at, invoice.duration_minutes), (T0, T0 + 50 * MIN, 50));
        assert_eq!(invoice.lines[0].room_minutes, 1);
        assert_eq!(invoice.total_cents, 9000);
        assert!(build(ROOM, &Record::default(), &config(), 0).is_err());
    }

    #[test]
    fn config_is_checked() {
        let c = Config::parse(serde_json::json!({})).unwrap();
        assert_eq!((c.currency.as_str(), c.rates.len()), ("EUR", 0));
        assert!(
            Config::parse(serde_json::json!({ "rates": { "party": { "per": "session", "amount_cents": 1 } } }))
                .is_err()
        );
        assert!(
            Config::parse(serde_json::json!({ "rates": { "group": { "per": "hour", "amount_cents": 1 } } })).is_err()
        );
        assert!(Config::parse(serde_json::json!({ "currency": "" })).is_err());
        assert!(Config::parse(serde_json::json!({ "currancy": "EUR" })).is_err());
        assert_eq!(
            Config::parse(serde_json::json!({ "currency": "CHF", "rates": { "couples": { "per": "minute", "amount_cents": 150 } } }))
                .unwrap()
                .rates[&Kind::Couples],
            Rate { per: Unit::Minute, amount_cents: 150 }
        );
    }

    #[test]
    fn csv_rows() {
        let (mut invoice, _) = build(ROOM, &group_record("group"), &config(), 0).unwrap();
        let text = csv(std::slice::from_ref(&invoice));
        let rows: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(rows[0], CSV_HEADER);
        assert_eq!(
            rows[1],
            "!s:clinic.example,\"Weekly, \"\"deep\"\" talk\",group,2026-11-18T11:53:40Z,@ann:clinic.example,client,36,minute,60,2160,EUR"
        );
        assert_eq!(
            rows[2],
            "!s:clinic.example,\"Weekly, \"\"deep\"\" talk\",group,2026-11-18T11:53:40Z,@bob:clinic.example,client,0,minute,60,0,EUR"
        );
        assert_eq!(rows[3], "");
        assert_eq!(rows.len(), 4);
        invoice.title = "=HYPERLINK(\"x\")".into();
        assert!(csv(&[invoice]).contains("\"'=HYPERLINK(\"\"x\"\")\""));
        assert_eq!(csv(&[]), format!("{CSV_HEADER}\r\n"));
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(T0 + 47 * MIN), "2026-11-18T11:53:40Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(4_102_444_799_999), "2099-12-31T23:59:59Z");
        assert_eq!(minutes(0), 0);
        assert_eq!(minutes(1), 1);
        assert_eq!(minutes(60_000), 1);
        assert_eq!(minutes(60_001), 2);
    }
}
