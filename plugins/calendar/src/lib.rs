//! The calendar plugin: an iCalendar feed of each user's sessions at a secret URL, and push to
//! a CalDAV collection each user configures.
//!
//! **Tracking** (`on-event` of `org.limbic.session` and `org.limbic.session.role`): the plugin
//! reads the room's *current* state (so an event delivered again, or late, changes nothing) and
//! keeps per session room a [`CalSession`] in kv `session:<room id>` — kind, title, times,
//! status, participants (users with a non-null role), and an iCalendar `SEQUENCE` that each
//! change of the times, status or title bumps — and per user the list of their session rooms in
//! `sessions:<user id>`.
//!
//! **Feeds**: `GET /feed-url` (authenticated) → `{"url": "/_limbic/plugins/calendar/feed/<token>.ics"}`,
//! creating the user's secret token (32 random bytes from the host's WASI random source, hex)
//! on first use; `POST /feed-url/reset` replaces it (the old URL answers 404 from then on).
//! `GET /feed/<token>.ics` (no authentication: the token is the secret) → `text/calendar` with
//! a VEVENT per session of the user; cancelled and no-show sessions stay, as `STATUS:CANCELLED`.
//!
//! **CalDAV**: `PUT /caldav` `{"url", "username", "password"}` stores the user's collection and
//! pushes all their sessions at once; `GET /caldav` → `{"url", "username"}`; `DELETE /caldav`
//! forgets it. Each change of a session PUTs `<url><uid>.ics` (one VEVENT, Basic auth) to the
//! collection of each participant who configured one (the resource is named after the UID, see
//! [`resource_name`]), or DELETEs it when the session is
//! cancelled or no-show, or the participant lost their role. Failures are logged with the
//! status; those worth another try (transport errors, 5xx, 408, 429) are retried by `on-tick`
//! with a growing wait. One call spends at most [`PUSH_BUDGET_MS`] on CalDAV requests and leaves
//! the rest to the next ticks, so many participants or sessions never overrun the host's budget.

use limbic_plugin_sdk::{
    Error, Event, Host, HttpRequest, HttpResponse, LogLevel, OutboundRequest, Plugin, WasmHost,
    clinic::{self, Session},
    export_plugin, serde_json,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub mod ics;

pub use ics::CalSession;

/// Where the host mounts the plugin's routes.
pub const MOUNT: &str = "/_limbic/plugins/calendar";

/// How long one call (`on-event`, `PUT /caldav`, `on-tick`) spends on CalDAV requests before it
/// leaves the rest to the next ticks: well inside the host's time budget per call.
pub const PUSH_BUDGET_MS: u64 = 2_000;
/// How many attempts a push gets in all (transport errors, 5xx, 408, 429 count).
pub const MAX_ATTEMPTS: u32 = 12;
/// The wait before the first retry of a failed push; it doubles with each attempt, up to
/// [`MAX_BACKOFF_MS`].
pub const FIRST_BACKOFF_MS: u64 = 60_000;
/// See [`FIRST_BACKOFF_MS`].
pub const MAX_BACKOFF_MS: u64 = 3_600_000;
/// How many queued pushes one tick looks at, at most.
pub const SCAN_PER_TICK: u32 = 1_000;

/// kv key: a session room's [`CalSession`].
pub fn session_key(room_id: &str) -> String {
    format!("session:{room_id}")
}
/// kv key: a user's session rooms (a JSON list).
pub fn sessions_key(user_id: &str) -> String {
    format!("sessions:{user_id}")
}
/// kv key: the user a feed token belongs to.
pub fn token_key(token: &str) -> String {
    format!("token:{token}")
}
/// kv key: a user's feed token.
pub fn user_token_key(user_id: &str) -> String {
    format!("user-token:{user_id}")
}
/// kv key: a user's [`CalDav`] collection.
pub fn caldav_key(user_id: &str) -> String {
    format!("caldav:{user_id}")
}
/// kv prefix of a user's pending retries.
pub fn retry_prefix(user_id: &str) -> String {
    format!("retry:{user_id} ")
}
/// kv key: a pending [`Retry`] of the push of a session to a user's collection.
pub fn retry_key(user_id: &str, room_id: &str) -> String {
    format!("{}{room_id}", retry_prefix(user_id))
}

/// A user's CalDAV collection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalDav {
    /// The collection's URL, ending in `/`.
    pub url: String,
    /// For Basic auth; empty: no `Authorization` header.
    #[serde(default)]
    pub username: String,
    /// For Basic auth.
    #[serde(default)]
    pub password: String,
}

impl CalDav {
    /// Checks a configuration from `PUT /caldav`: an `http` or `https` URL with a host; a
    /// missing final `/` is added.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let mut caldav: CalDav = serde_json::from_slice(body).map_err(|e| format!("invalid body: {e}"))?;
        let rest = caldav
            .url
            .strip_prefix("http://")
            .or_else(|| caldav.url.strip_prefix("https://"))
            .ok_or("url must be an http:// or https:// URL")?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if host.is_empty() || caldav.url.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err("url must be an http:// or https:// URL".into());
        }
        if caldav.url.contains(['?', '#']) {
            return Err("url must not have a query or fragment".into());
        }
        if !caldav.url.ends_with('/') {
            caldav.url.push('/');
        }
        Ok(caldav)
    }

    /// The URL of a session's resource in the collection: `<url><resource name>.ics`, see
    /// [`resource_name`].
    pub fn resource_url(&self, uid: &str) -> String {
        format!("{}{}.ics", self.url, resource_name(uid))
    }

    /// The `Authorization` header value, if there are credentials.
    pub fn authorization(&self) -> Option<String> {
        (!self.username.is_empty() || !self.password.is_empty())
            .then(|| format!("Basic {}", base64(format!("{}:{}", self.username, self.password).as_bytes())))
    }
}

/// A queued push (kv `retry:<user> <room>`): one that failed in a way worth another try, or
/// that a call had no time left for. What to send is decided when it is sent, from the session
/// as it is then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    /// The user whose collection it is.
    pub user_id: String,
    /// The session room.
    pub room_id: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not before this time (ms since the epoch); 0: at the next tick.
    #[serde(default)]
    pub due_at: u64,
}

/// The wait after `attempts` failed attempts.
pub fn backoff_ms(attempts: u32) -> u64 {
    FIRST_BACKOFF_MS.saturating_mul(1 << attempts.saturating_sub(1).min(20)).min(MAX_BACKOFF_MS)
}

/// The name of a session's resource in a CalDAV collection (without `.ics`): its UID with each
/// byte other than ASCII letters, digits, `-`, `.` and `@` written `_XX` (upper-case hex), so
/// `abc:clinic.example@clinic.example` is `abc_3Aclinic.example@clinic.example`. Servers refuse
/// some characters in paths (Radicale: `:`, `,`, quotes, `*`, `?`), and the mapping is one to one.
pub fn resource_name(uid: &str) -> String {
    let mut out = String::with_capacity(uid.len() + 4);
    for b in uid.bytes() {
        if b.is_ascii_alphanumeric() || b"-.@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

/// Standard base64 with padding (RFC 4648), for Basic auth.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `token` looks like one of ours (64 hex digits), before any lookup.
pub fn is_token(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The feed URL of a token.
pub fn feed_url(token: &str) -> String {
    format!("{MOUNT}/feed/{token}.ics")
}

fn get_json<T: DeserializeOwned>(host: &impl Host, key: &str) -> Result<Option<T>, String> {
    match host.kv_get(key)? {
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("{key} is corrupt: {e}")),
        None => Ok(None),
    }
}

fn set_json<T: Serialize>(host: &impl Host, key: &str, value: &T) -> Result<(), String> {
    let bytes = serde_json::to_vec(value).map_err(|e| Error::from(e).to_string())?;
    Ok(host.kv_set(key, &bytes)?)
}

fn get_string(host: &impl Host, key: &str) -> Result<Option<String>, String> {
    Ok(host.kv_get(key)?.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
}

/// Takes a session or role event into account: updates the session, the users' lists and the
/// participants' CalDAV collections.
pub fn on_event(host: &impl Host, event: &Event) -> Result<(), String> {
    let relevant = event.is_state_of(clinic::SESSION, "")
        || (event.event_type == clinic::ROLE
            && event.state_key.as_deref().is_some_and(|k| clinic::role_user(k).is_some()));
    if !relevant {
        return Ok(());
    }
    let room = event.room_id.as_str();
    let state = host.room_state(room)?;
    let Some(session_event) = state.iter().find(|e| e.is_state_of(clinic::SESSION, "")) else {
        return Ok(());
    };
    let session: Session = match session_event.content() {
        Ok(session) => session,
        Err(e) => {
            host.log(LogLevel::Warn, &format!("{room}: unreadable org.limbic.session: {e}"));
            return Ok(());
        }
    };
    let old: Option<CalSession> = get_json(host, &session_key(room))?;
    let change = ics::update(old.as_ref(), room, &session, session_event.origin_server_ts, clinic::roles(&state));
    if !change.changed {
        return Ok(());
    }
    set_json(host, &session_key(room), &change.session)?;
    for user in &change.added {
        edit_list(host, user, |rooms| {
            if !rooms.iter().any(|r| r == room) {
                rooms.push(room.to_owned());
            }
        })?;
    }
    for user in &change.removed {
        edit_list(host, user, |rooms| rooms.retain(|r| r != room))?;
    }

    // Push: everybody when the event changed, else only who came or went.
    let mut targets: Vec<(&String, bool)> = if change.event_changed {
        change.session.participants.keys().map(|user| (user, true)).collect()
    } else {
        change.added.iter().map(|user| (user, true)).collect()
    };
    targets.extend(change.removed.iter().map(|user| (user, false)));
    let server_name = host.server_name();
    let budget = Budget::start(host);
    for (user, participant) in targets {
        if let Some(caldav) = get_json::<CalDav>(host, &caldav_key(user))? {
            if budget.spent(host) {
                defer(host, user, room)?;
            } else {
                sync(host, &server_name, user, &caldav, &change.session, participant)?;
            }
        }
    }
    Ok(())
}

/// The time a call may spend on CalDAV requests, [`PUSH_BUDGET_MS`].
pub struct Budget {
    start: u64,
}

impl Budget {
    /// Starts counting.
    pub fn start(host: &impl Host) -> Self {
        Budget { start: host.now_ms() }
    }

    /// Whether the time is up.
    pub fn spent(&self, host: &impl Host) -> bool {
        host.now_ms().saturating_sub(self.start) >= PUSH_BUDGET_MS
    }
}

/// Queues the push of a session to a user's collection for the next tick (keeping the count of
/// failed attempts, if it was queued already).
pub fn defer(host: &impl Host, user: &str, room_id: &str) -> Result<(), String> {
    let key = retry_key(user, room_id);
    let attempts = get_json::<Retry>(host, &key)?.map_or(0, |pending| pending.attempts);
    set_json(host, &key, &Retry { user_id: user.to_owned(), room_id: room_id.to_owned(), attempts, due_at: 0 })
}

fn edit_list(host: &impl Host, user: &str, edit: impl FnOnce(&mut Vec<String>)) -> Result<(), String> {
    let key = sessions_key(user);
    let mut rooms: Vec<String> = get_json(host, &key)?.unwrap_or_default();
    let before = rooms.clone();
    edit(&mut rooms);
    if rooms == before {
        return Ok(());
    }
    if rooms.is_empty() { Ok(host.kv_delete(&key)?) } else { set_json(host, &key, &rooms) }
}

/// Why a push failed.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    /// What happened, e.g. `HTTP 403` or `not-granted: ...`.
    pub message: String,
    /// Whether another try may succeed.
    pub retry: bool,
}

/// One request to a collection: PUT the session's VEVENT (`put`), or DELETE it (404 and 410
/// count as done).
pub fn push(
    host: &impl Host,
    server_name: &str,
    caldav: &CalDav,
    session: &CalSession,
    put: bool,
) -> Result<(), Failure> {
    let url = caldav.resource_url(&ics::uid(&session.room_id, server_name));
    let mut request =
        if put {
            OutboundRequest::new("PUT", &url)
                .header("content-type", "text/calendar; charset=utf-8")
                .body(ics::calendar(std::slice::from_ref(session), server_name, None))
        } else {
            OutboundRequest::new("DELETE", &url)
        };
    if let Some(authorization) = caldav.authorization() {
        request = request.header("authorization", &authorization);
    }
    match host.fetch(&request) {
        Ok(response) if (200..300).contains(&response.status) => Ok(()),
        Ok(response) if !put && matches!(response.status, 404 | 410) => Ok(()),
        Ok(response) => Err(Failure {
            message: format!("HTTP {}", response.status),
            retry: response.status >= 500 || matches!(response.status, 408 | 429),
        }),
        Err(e) => Err(Failure { retry: matches!(e, Error::Failed(_)), message: e.to_string() }),
    }
}

/// Brings a user's collection in line with a session: PUT if they are a participant of a
/// session that is not cancelled, else DELETE. A failure is logged and, if worth it, queued for
/// `on-tick` (up to [`MAX_ATTEMPTS`]); returns what failed (`PUT <url>: HTTP 401`), `None` if it
/// worked. Only kv errors are errors.
pub fn sync(
    host: &impl Host,
    server_name: &str,
    user: &str,
    caldav: &CalDav,
    session: &CalSession,
    participant: bool,
) -> Result<Option<String>, String> {
    let put = participant && !session.is_cancelled();
    let key = retry_key(user, &session.room_id);
    let pending: Option<Retry> = get_json(host, &key)?;
    match push(host, server_name, caldav, session, put) {
        Ok(()) => {
            if pending.is_some() {
                host.kv_delete(&key)?;
            }
            Ok(None)
        }
        Err(failure) => {
            let method = if put { "PUT" } else { "DELETE" };
            let attempts = pending.as_ref().map_or(0, |p| p.attempts) + 1;
            let url = caldav.resource_url(&ics::uid(&session.room_id, server_name));
            if failure.retry && attempts < MAX_ATTEMPTS {
                host.log(
                    LogLevel::Warn,
                    &format!(
                        "CalDAV {method} {url} for {user} failed ({}); will retry (attempt {attempts})",
                        failure.message
                    ),
                );
                let due_at = host.now_ms().saturating_add(backoff_ms(attempts));
                let retry = Retry { user_id: user.to_owned(), room_id: session.room_id.clone(), attempts, due_at };
                set_json(host, &key, &retry)?;
            } else {
                host.log(LogLevel::Warn, &format!("CalDAV {method} {url} for {user} failed ({})", failure.message));
                if pending.is_some() {
                    host.kv_delete(&key)?;
                }
            }
            Ok(Some(format!("{method} {url}: {}", failure.message)))
        }
    }
}

/// Sends the queued pushes that are due, in key order, as long as [`PUSH_BUDGET_MS`] lasts
/// (looking at [`SCAN_PER_TICK`] of them at most).
pub fn retry(host: &impl Host) -> Result<(), String> {
    const PAGE: u32 = 100;
    let server_name = host.server_name();
    let budget = Budget::start(host);
    let mut after: Option<String> = None;
    let mut scanned = 0;
    loop {
        let page = host.kv_scan("retry:", after.as_deref(), PAGE)?;
        for (key, value) in &page {
            if budget.spent(host) {
                return Ok(());
            }
            let Ok(pending) = serde_json::from_slice::<Retry>(value) else {
                host.kv_delete(key)?;
                continue;
            };
            if pending.due_at > host.now_ms() {
                continue;
            }
            let caldav: Option<CalDav> = get_json(host, &caldav_key(&pending.user_id))?;
            let session: Option<CalSession> = get_json(host, &session_key(&pending.room_id))?;
            match (caldav, session) {
                (Some(caldav), Some(session)) => {
                    let participant = session.participants.contains_key(&pending.user_id);
                    sync(host, &server_name, &pending.user_id, &caldav, &session, participant)?;
                }
                _ => host.kv_delete(key)?,
            }
        }
        scanned += page.len() as u32;
        match page.last() {
            Some((key, _)) if page.len() == PAGE as usize && scanned < SCAN_PER_TICK => after = Some(key.clone()),
            _ => return Ok(()),
        }
    }
}

/// The sessions of a user, by start time.
pub fn user_sessions(host: &impl Host, user: &str) -> Result<Vec<CalSession>, String> {
    let rooms: Vec<String> = get_json(host, &sessions_key(user))?.unwrap_or_default();
    let mut sessions = Vec::with_capacity(rooms.len());
    for room in rooms {
        if let Some(session) = get_json::<CalSession>(host, &session_key(&room))?
            && session.participants.contains_key(user)
        {
            sessions.push(session);
        }
    }
    sessions.sort_by(|a, b| (a.starts_at, &a.room_id).cmp(&(b.starts_at, &b.room_id)));
    Ok(sessions)
}

/// A new feed token for a user, replacing the old one.
pub fn new_token(host: &impl Host, user: &str) -> Result<String, String> {
    let mut bytes = [0u8; 32];
    host.random(&mut bytes)?;
    let token = hex(&bytes);
    if let Some(old) = get_string(host, &user_token_key(user))? {
        host.kv_delete(&token_key(&old))?;
    }
    host.kv_set(&token_key(&token), user.as_bytes())?;
    host.kv_set(&user_token_key(user), token.as_bytes())?;
    Ok(token)
}

fn server_error(e: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::error(500, "M_UNKNOWN", &e.to_string())
}

fn calendar_response(body: String) -> HttpResponse {
    HttpResponse::text(200, "text/calendar; charset=utf-8", body).with_header("cache-control", "no-store")
}

/// Answers the plugin's routes.
pub fn handle_http(host: &impl Host, config: &Config, request: &HttpRequest) -> HttpResponse {
    let segments = request.path_segments();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = request.method.as_str();

    // The feed: no access token, the token in the URL is the secret.
    if let ("GET", ["feed", file]) = (method, segments.as_slice()) {
        let Some(token) = file.strip_suffix(".ics").filter(|t| is_token(t)) else {
            return HttpResponse::not_found();
        };
        return match get_string(host, &token_key(token)) {
            Ok(Some(user)) => match user_sessions(host, &user) {
                Ok(sessions) => {
                    calendar_response(ics::calendar(&sessions, &host.server_name(), Some(&config.feed_name)))
                }
                Err(e) => server_error(e),
            },
            Ok(None) => HttpResponse::error(404, "M_NOT_FOUND", "Unknown calendar feed"),
            Err(e) => server_error(e),
        };
    }

    let known = matches!(
        (method, segments.as_slice()),
        ("GET", ["feed-url"]) | ("POST", ["feed-url", "reset"]) | ("GET" | "PUT" | "DELETE", ["caldav"])
    );
    if !known {
        return HttpResponse::not_found();
    }
    let Some(user) = request.caller_id() else {
        return HttpResponse::error(401, "M_MISSING_TOKEN", "Missing access token");
    };
    let result = match (method, segments.as_slice()) {
        ("GET", ["feed-url"]) => get_string(host, &user_token_key(user))
            .and_then(|token| match token {
                Some(token) => Ok(token),
                None => new_token(host, user),
            })
            .map(|token| HttpResponse::json(200, &serde_json::json!({ "url": feed_url(&token) }))),
        ("POST", ["feed-url", "reset"]) => {
            new_token(host, user).map(|token| HttpResponse::json(200, &serde_json::json!({ "url": feed_url(&token) })))
        }
        ("GET", ["caldav"]) => get_json::<CalDav>(host, &caldav_key(user)).map(|caldav| match caldav {
            Some(caldav) => {
                HttpResponse::json(200, &serde_json::json!({ "url": caldav.url, "username": caldav.username }))
            }
            None => HttpResponse::error(404, "M_NOT_FOUND", "No CalDAV collection is configured"),
        }),
        ("PUT", ["caldav"]) => match CalDav::parse(&request.body) {
            Ok(caldav) => configure(host, user, &caldav),
            Err(e) => Ok(HttpResponse::error(400, "M_BAD_JSON", &e)),
        },
        ("DELETE", ["caldav"]) => forget(host, user).map(|()| HttpResponse::json(200, &serde_json::json!({}))),
        _ => Ok(HttpResponse::not_found()),
    };
    result.unwrap_or_else(server_error)
}

/// `PUT /caldav`: stores the collection and pushes all the user's sessions; answers
/// `{url, username, pushed, queued, failed, errors}`: `queued` pushes were left to the next
/// ticks for lack of time, `errors` says what failed.
fn configure(host: &impl Host, user: &str, caldav: &CalDav) -> Result<HttpResponse, String> {
    set_json(host, &caldav_key(user), caldav)?;
    let server_name = host.server_name();
    let (mut pushed, mut queued, mut errors) = (0, 0, Vec::new());
    let budget = Budget::start(host);
    for session in user_sessions(host, user)? {
        if budget.spent(host) {
            defer(host, user, &session.room_id)?;
            queued += 1;
            continue;
        }
        match sync(host, &server_name, user, caldav, &session, true)? {
            None => pushed += 1,
            Some(error) => errors.push(error),
        }
    }
    Ok(HttpResponse::json(
        200,
        &serde_json::json!({
            "url": caldav.url, "username": caldav.username, "pushed": pushed, "queued": queued,
            "failed": errors.len(), "errors": errors,
        }),
    ))
}

/// `DELETE /caldav`: forgets the collection and its pending retries.
fn forget(host: &impl Host, user: &str) -> Result<(), String> {
    host.kv_delete(&caldav_key(user))?;
    let prefix = retry_prefix(user);
    loop {
        let page = host.kv_scan(&prefix, None, 100)?;
        if page.is_empty() {
            return Ok(());
        }
        for (key, _) in page {
            host.kv_delete(&key)?;
        }
    }
}

/// The plugin's config (optional): `{"feed_name": "Therapy sessions"}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The feed's `X-WR-CALNAME`, the name calendar apps show for it.
    #[serde(default = "default_feed_name")]
    pub feed_name: String,
}

fn default_feed_name() -> String {
    "Therapy sessions".into()
}

impl Default for Config {
    fn default() -> Self {
        Config { feed_name: default_feed_name() }
    }
}

/// The plugin.
pub struct Calendar {
    config: Config,
}

impl Plugin for Calendar {
    fn new(config: serde_json::Value) -> Result<Self, String> {
        Ok(Calendar { config: limbic_plugin_sdk::parse_config(config)? })
    }

    fn on_event(&self, event: &Event) -> Result<(), String> {
        on_event(&WasmHost, event)
    }

    fn handle_http(&self, request: HttpRequest) -> HttpResponse {
        handle_http(&WasmHost, &self.config, &request)
    }

    fn on_tick(&self, _now_ms: u64) -> Result<(), String> {
        retry(&WasmHost)
    }
}

export_plugin!(Calendar);

#[cfg(test)]
mod tests;
