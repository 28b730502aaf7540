//! `m.room.server_acl`: which servers may take part in a room. Denied servers' events, EDUs,
//! joins and history requests are refused, and nothing is sent to them.

use ruma::{RoomId, ServerName};
use serde_json::Value as JsonValue;

use crate::{Result, rooms::Rooms};

/// Glob matching with `*` (any run) and `?` (one character), as the ACL spec has it.
fn glob(pattern: &str, name: &str) -> bool {
    let (pattern, name): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut p, mut n, mut star, mut mark) = (0, 0, None, 0);
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p].eq_ignore_ascii_case(&name[n])) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some(p);
            mark = n;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            n = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

/// Whether an ACL's content lets `server` in.
pub fn content_allows(acl: &JsonValue, server: &ServerName) -> bool {
    let host = super::resolve::Name::parse(server.as_str()).map_or_else(|| server.to_string(), |name| name.host);
    let list = |key: &str| acl.get(key).and_then(JsonValue::as_array).cloned().unwrap_or_default();
    let matches = |patterns: &[JsonValue]| patterns.iter().filter_map(JsonValue::as_str).any(|p| glob(p, &host));
    let ip_literal = host.parse::<std::net::IpAddr>().is_ok();
    if ip_literal && acl.get("allow_ip_literals") == Some(&JsonValue::Bool(false)) {
        return false;
    }
    !matches(&list("deny")) && matches(&list("allow"))
}

/// Whether the room's current ACL (if any) lets `server` in.
pub fn allows(rooms: &Rooms, room_id: &RoomId, server: &ServerName) -> Result<bool> {
    Ok(rooms.state_content(room_id, "m.room.server_acl", "")?.is_none_or(|acl| content_allows(&acl, server)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acls_allow_deny_and_ip_literals() {
        let acl = serde_json::json!({ "allow": ["*"], "deny": ["*.evil.example", "bad?.example"], "allow_ip_literals": false });
        fn server(s: &str) -> &ServerName {
            <&ServerName>::try_from(s).unwrap()
        }
        assert!(content_allows(&acl, server("clinic.example")));
        assert!(content_allows(&acl, server("clinic.example:8448")));
        assert!(!content_allows(&acl, server("a.evil.example")));
        assert!(!content_allows(&acl, server("bad1.example")));
        assert!(content_allows(&acl, server("bad12.example")));
        assert!(!content_allows(&acl, server("127.0.0.1:8448")));
        assert!(!content_allows(&serde_json::json!({ "deny": [] }), server("clinic.example")), "no allow list allows nobody");
        assert!(content_allows(&serde_json::json!({ "allow": ["*"] }), server("127.0.0.1")));
    }
}
