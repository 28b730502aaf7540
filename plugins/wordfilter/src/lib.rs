//! The wordfilter plugin, the SDK's minimal example: refuses `m.room.message` events whose body
//! contains one of the configured words, case-insensitively.
//!
//! Config: `{"words": ["..."]}`. Manifest: `plugin.toml` (a `check-event` hook on
//! `m.room.message`, no capabilities).

use limbic_plugin_sdk::{Event, Plugin, Verdict, export_plugin, serde_json};
use serde::Deserialize;

/// The reason a refused message gets.
pub const REASON: &str = "message contains a blocked word";

#[derive(Deserialize)]
struct Config {
    words: Vec<String>,
}

/// The plugin: the blocked words, lower case.
pub struct WordFilter {
    words: Vec<String>,
}

impl WordFilter {
    /// Whether `body` contains a blocked word.
    pub fn blocks(&self, body: &str) -> bool {
        let body = body.to_lowercase();
        self.words.iter().any(|word| body.contains(word.as_str()))
    }
}

impl Plugin for WordFilter {
    fn new(config: serde_json::Value) -> Result<Self, String> {
        let config: Config = limbic_plugin_sdk::parse_config(config)?;
        let words = config.words.iter().map(|w| w.trim().to_lowercase()).filter(|w| !w.is_empty()).collect();
        Ok(WordFilter { words })
    }

    fn check_event(&self, event: &Event, _state: &[Event]) -> Verdict {
        #[derive(Deserialize)]
        struct Message {
            body: Option<String>,
        }
        match event.content::<Message>() {
            Ok(Message { body: Some(body) }) if self.blocks(&body) => Verdict::deny(REASON),
            _ => Verdict::Allow,
        }
    }
}

export_plugin!(WordFilter);

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &str) -> Event {
        Event {
            event_id: "$e".into(),
            room_id: "!r:s".into(),
            sender: "@u:s".into(),
            event_type: "m.room.message".into(),
            state_key: None,
            content: serde_json::json!({ "msgtype": "m.text", "body": body }).to_string(),
            origin_server_ts: 0,
        }
    }

    #[test]
    fn refuses_blocked_words_case_insensitively() {
        let filter = WordFilter::new(serde_json::json!({ "words": ["Darn", " ", "heck"] })).unwrap();
        assert_eq!(filter.check_event(&message("oh DARN it"), &[]), Verdict::deny(REASON));
        assert_eq!(filter.check_event(&message("what the heck"), &[]), Verdict::deny(REASON));
        assert_eq!(filter.check_event(&message("all good"), &[]), Verdict::Allow);
        let mut no_body = message("");
        no_body.content = "{}".into();
        assert_eq!(filter.check_event(&no_body, &[]), Verdict::Allow);
    }

    #[test]
    fn needs_a_word_list() {
        assert!(WordFilter::new(serde_json::json!({})).is_err());
        assert!(WordFilter::new(serde_json::json!({ "words": "darn" })).is_err());
    }
}
