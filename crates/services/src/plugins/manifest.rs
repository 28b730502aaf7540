//! A plugin's manifest (`plugin.toml`): what it is, which hooks it implements and which
//! capabilities it needs. The server config grants capabilities; a plugin gets those that are
//! both declared and granted.

use std::{collections::BTreeSet, path::Path};

use serde::Deserialize;

use super::PluginError;

/// The WIT package version this host implements.
pub const API_VERSION: &str = "0.1.0";

/// What a host function may need beyond log, clock and config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// The plugin's private key-value store.
    Kv,
    /// Room state and members.
    RoomsRead,
    /// Sending events.
    RoomsSend,
    /// Creating rooms.
    RoomsCreate,
    /// Inviting users.
    RoomsInvite,
    /// Acting as a local user rather than the plugin's own.
    UsersActAs,
    /// Outbound HTTP to granted hosts.
    Http,
}

impl Capability {
    pub const ALL: [Capability; 7] = [
        Capability::Kv,
        Capability::RoomsRead,
        Capability::RoomsSend,
        Capability::RoomsCreate,
        Capability::RoomsInvite,
        Capability::UsersActAs,
        Capability::Http,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Capability::Kv => "kv",
            Capability::RoomsRead => "rooms.read",
            Capability::RoomsSend => "rooms.send",
            Capability::RoomsCreate => "rooms.create",
            Capability::RoomsInvite => "rooms.invite",
            Capability::UsersActAs => "users.act-as",
            Capability::Http => "http",
        }
    }

    pub fn parse(name: &str) -> Result<Self, PluginError> {
        Self::ALL.into_iter().find(|c| c.name() == name).ok_or_else(|| PluginError::Manifest(format!("unknown capability {name:?}")))
    }
}

/// Event types a hook wants; `None` means all.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    pub event_types: Option<Vec<String>>,
    /// For `check-event`: the room state types passed along with the event.
    #[serde(default)]
    pub state_types: Vec<String>,
}

impl EventFilter {
    pub fn wants(&self, event_type: &str) -> bool {
        self.event_types.as_ref().is_none_or(|types| types.iter().any(|t| t == event_type))
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TickHook {
    pub seconds: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHook {}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    version: String,
    api: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    capabilities: Vec<String>,
    check_event: Option<EventFilter>,
    on_event: Option<EventFilter>,
    http: Option<HttpHook>,
    tick: Option<TickHook>,
}

#[derive(Clone, Debug)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub description: String,
    pub capabilities: BTreeSet<Capability>,
    pub check_event: Option<EventFilter>,
    pub on_event: Option<EventFilter>,
    pub http: bool,
    pub tick_seconds: Option<u64>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Self, PluginError> {
        let text = std::fs::read_to_string(path).map_err(|e| PluginError::Manifest(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, PluginError> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| PluginError::Manifest(e.to_string()))?;
        if raw.api != API_VERSION {
            return Err(PluginError::Manifest(format!("built for limbic:plugin@{}, this server implements {API_VERSION}", raw.api)));
        }
        if raw.tick.as_ref().is_some_and(|t| t.seconds == 0) {
            return Err(PluginError::Manifest("tick.seconds must be at least 1".into()));
        }
        Ok(Self {
            capabilities: raw.capabilities.iter().map(|c| Capability::parse(c)).collect::<Result<_, _>>()?,
            name: raw.name,
            version: raw.version,
            description: raw.description,
            check_event: raw.check_event,
            on_event: raw.on_event,
            http: raw.http.is_some(),
            tick_seconds: raw.tick.map(|t| t.seconds),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_declare_hooks_and_known_capabilities() {
        let manifest = Manifest::parse(
            r#"
            name = "billing"
            version = "0.1.0"
            api = "0.1.0"
            capabilities = ["kv", "rooms.read"]
            [on_event]
            event_types = ["org.limbic.session"]
            [http]
            [tick]
            seconds = 30
            "#,
        )
        .unwrap();
        assert_eq!(manifest.capabilities.into_iter().collect::<Vec<_>>(), [Capability::Kv, Capability::RoomsRead]);
        assert!(manifest.check_event.is_none() && manifest.http);
        assert!(manifest.on_event.as_ref().unwrap().wants("org.limbic.session"));
        assert!(!manifest.on_event.unwrap().wants("m.room.message"));
        assert_eq!(manifest.tick_seconds, Some(30));

        let unknown = Manifest::parse("name = \"x\"\nversion = \"1\"\napi = \"0.1.0\"\ncapabilities = [\"root\"]");
        assert!(matches!(unknown, Err(PluginError::Manifest(m)) if m.contains("root")));
        let newer = Manifest::parse("name = \"x\"\nversion = \"1\"\napi = \"0.2.0\"");
        assert!(matches!(newer, Err(PluginError::Manifest(m)) if m.contains("0.2.0")));
    }
}
