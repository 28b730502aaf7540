//! Helpers on the WIT records: typed event content, HTTP requests and responses.

use serde::{Serialize, de::DeserializeOwned};

use crate::{Error, Event, HttpRequest, HttpResponse, OutboundRequest, RoomSpec, StateEntry, Verdict};

impl Event {
    /// The content, deserialized into `T` (a struct of the fields you need, or one of the
    /// [`clinic`](crate::clinic) types).
    pub fn content<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_str(&self.content).map_err(Error::json)
    }

    /// The content as a JSON value.
    pub fn content_json(&self) -> Result<serde_json::Value, Error> {
        self.content()
    }

    /// Whether this is a state event (it has a state key).
    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    /// Whether this is a state event of type `event_type` with state key `state_key`.
    pub fn is_state_of(&self, event_type: &str, state_key: &str) -> bool {
        self.event_type == event_type && self.state_key.as_deref() == Some(state_key)
    }
}

impl Verdict {
    /// A [`Verdict::Deny`] with this reason.
    pub fn deny(reason: impl Into<String>) -> Self {
        Verdict::Deny(reason.into())
    }

    /// Whether the verdict lets the event through.
    pub fn is_allow(&self) -> bool {
        matches!(self, Verdict::Allow)
    }
}

impl HttpRequest {
    /// The first value of the query parameter `name`, percent-decoded (`+` is a space), or
    /// `None` if the query does not have it.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_form(key) == name).then(|| decode_form(value))
        })
    }

    /// The body parsed as JSON into `T`.
    pub fn json_body<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(Error::json)
    }

    /// The value of the first header called `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The path's segments, percent-decoded: `/rooms/%21a%3Ab` is `["rooms", "!a:b"]`, `/` is
    /// `[]`. Handy for routing with `match (request.method.as_str(), segments.as_slice())`.
    pub fn path_segments(&self) -> Vec<String> {
        self.path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect()
    }

    /// The authenticated user's id, if the request carried a valid access token.
    pub fn caller_id(&self) -> Option<&str> {
        self.caller.as_ref().map(|caller| caller.user_id.as_str())
    }
}

impl HttpResponse {
    /// A JSON response (`content-type: application/json`). If `value` cannot be serialized
    /// (a map with non-string keys, say) the response is a 500 Matrix error instead.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => {
                HttpResponse { status, headers: vec![("content-type".into(), "application/json".into())], body }
            }
            Err(e) => HttpResponse::error(500, "M_UNKNOWN", &format!("the plugin's response is not JSON: {e}")),
        }
    }

    /// A response with a text body and the given content type, e.g. `text/csv; charset=utf-8`.
    pub fn text(status: u16, content_type: &str, body: impl Into<String>) -> Self {
        HttpResponse {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body: body.into().into_bytes(),
        }
    }

    /// A Matrix error response: `{"errcode": errcode, "error": message}` with this status.
    pub fn error(status: u16, errcode: &str, message: &str) -> Self {
        HttpResponse::json(status, &serde_json::json!({ "errcode": errcode, "error": message }))
    }

    /// `404 M_NOT_FOUND`: what [`Plugin::handle_http`](crate::Plugin::handle_http) answers
    /// by default.
    pub fn not_found() -> Self {
        HttpResponse::error(404, "M_NOT_FOUND", "Unrecognized request")
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The value of the first header called `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body parsed as JSON into `T` (for responses of [`http::fetch`](crate::http::fetch)).
    pub fn json_body<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(Error::json)
    }

    /// The body as text (invalid UTF-8 is replaced).
    pub fn text_body(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl OutboundRequest {
    /// A request with no headers and an empty body.
    pub fn new(method: &str, url: &str) -> Self {
        OutboundRequest { method: method.into(), url: url.into(), headers: Vec::new(), body: Vec::new() }
    }

    /// A `GET` of `url`.
    pub fn get(url: &str) -> Self {
        OutboundRequest::new("GET", url)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets a JSON body and `content-type: application/json`.
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Result<Self, Error> {
        let body = serde_json::to_vec(value).map_err(Error::json)?;
        Ok(self.header("content-type", "application/json").body(body))
    }
}

impl StateEntry {
    /// A state entry for [`RoomSpec::initial_state`] with `content` serialized to JSON.
    pub fn new<T: Serialize + ?Sized>(event_type: &str, state_key: &str, content: &T) -> Result<Self, Error> {
        Ok(StateEntry {
            event_type: event_type.into(),
            state_key: state_key.into(),
            content: serde_json::to_string(content).map_err(Error::json)?,
        })
    }
}

impl RoomSpec {
    /// A spec with just a name; fill in the other fields with struct update syntax or by
    /// assignment.
    pub fn named(name: impl Into<String>) -> Self {
        RoomSpec { name: Some(name.into()), ..RoomSpec::default() }
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Decodes `%XX` escapes (a malformed escape is kept as it is; invalid UTF-8 is replaced).
/// `+` stays `+`: this is for paths; query values go through [`HttpRequest::query_param`].
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (bytes.get(i + 1).and_then(hex), bytes.get(i + 2).and_then(hex))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn decode_form(s: &str) -> String {
    percent_decode(&s.replace('+', " "))
}

fn hex(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, query: &str) -> HttpRequest {
        HttpRequest {
            method: "GET".into(),
            path: path.into(),
            query: query.into(),
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: br#"{"a": 1}"#.to_vec(),
            caller: None,
        }
    }

    #[test]
    fn query_params_and_paths_are_decoded() {
        let r = request("/rooms/%21abc%3Aclinic.example/x", "a=1&b=two+words%21&c&a=2");
        assert_eq!(r.query_param("a").as_deref(), Some("1"));
        assert_eq!(r.query_param("b").as_deref(), Some("two words!"));
        assert_eq!(r.query_param("c").as_deref(), Some(""));
        assert_eq!(r.query_param("d"), None);
        assert_eq!(r.path_segments(), ["rooms", "!abc:clinic.example", "x"]);
        assert!(request("/", "").path_segments().is_empty());
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(percent_decode("%C3%A9"), "é");
    }

    #[test]
    fn bodies_and_headers() {
        let r = request("/", "");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body: serde_json::Value = r.json_body().unwrap();
        assert_eq!(body["a"], 1);
        assert!(matches!(r.json_body::<Vec<u8>>(), Err(Error::Json(_))));
    }

    #[test]
    fn responses() {
        let ok = HttpResponse::json(200, &serde_json::json!({"ok": true}));
        assert_eq!(ok.header("Content-Type"), Some("application/json"));
        assert_eq!(ok.text_body(), r#"{"ok":true}"#);
        let missing = HttpResponse::not_found();
        assert_eq!(missing.status, 404);
        assert_eq!(missing.json_body::<serde_json::Value>().unwrap()["errcode"], "M_NOT_FOUND");
        let csv = HttpResponse::text(200, "text/csv", "a,b\n").with_header("x-a", "1");
        assert_eq!(csv.body, b"a,b\n");
        assert_eq!(csv.header("x-a"), Some("1"));
        let mut map = std::collections::HashMap::new();
        map.insert(vec![1u8], 1);
        assert_eq!(HttpResponse::json(200, &map).status, 500);
    }

    #[test]
    fn event_content() {
        let event = Event {
            event_id: "$e".into(),
            room_id: "!r:s".into(),
            sender: "@u:s".into(),
            event_type: "org.limbic.session.role".into(),
            state_key: Some("_@u:s".into()),
            content: r#"{"role": "client"}"#.into(),
            origin_server_ts: 1,
        };
        let role: crate::clinic::RoleContent = event.content().unwrap();
        assert_eq!(role.role, Some(crate::clinic::Role::Client));
        assert_eq!(event.content_json().unwrap()["role"], "client");
        assert!(event.is_state() && event.is_state_of(crate::clinic::ROLE, "_@u:s"));
        assert!(event.content::<crate::clinic::Session>().is_err());
    }

    #[test]
    fn builders() {
        let request = OutboundRequest::get("https://x.example/").json(&[1, 2]).unwrap();
        assert_eq!(request.body, b"[1,2]");
        assert_eq!(request.headers, [("content-type".to_string(), "application/json".to_string())]);
        let entry = StateEntry::new("m.room.topic", "", &serde_json::json!({"topic": "t"})).unwrap();
        assert_eq!(entry.content, r#"{"topic":"t"}"#);
        assert_eq!(RoomSpec::named("n").name.as_deref(), Some("n"));
        assert!(Verdict::Allow.is_allow() && !Verdict::deny("x").is_allow());
    }
}
