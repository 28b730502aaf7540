//! The TOML configuration, with `LIMBIC_...` environment overrides, validated at start.

use std::{net::IpAddr, path::PathBuf};

use ruma::OwnedServerName;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("invalid config: `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server_name: OwnedServerName,
    #[serde(default)]
    pub listen: ListenConfig,
    pub database: DatabaseConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub registration: RegistrationConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub rate_limits: RateLimitsConfig,
    #[serde(default)]
    pub presence: PresenceConfig,
    #[serde(default)]
    pub media: MediaConfig,
    #[serde(default)]
    pub clinic: ClinicConfig,
    #[serde(default)]
    pub sessions: SessionsConfig,
    #[serde(default)]
    pub appointments: AppointmentsConfig,
    #[serde(default)]
    pub federation: FederationConfig,
    #[serde(default)]
    pub calls: CallsConfig,
    #[serde(default)]
    pub voip: VoipConfig,
    #[serde(default)]
    pub web: WebConfig,
    #[serde(default)]
    pub plugin_host: PluginHostConfig,
    #[serde(default)]
    pub delayed_events: DelayedEventsConfig,
    #[serde(default)]
    pub push: PushConfig,
    #[serde(default)]
    pub privacy: PrivacyConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    /// `[[plugins]]`: the WebAssembly plugins to load, with what each is granted.
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
}

/// The browser join page (`/join`), whose built assets (`npm run build --prefix web`) are served
/// from a directory, and which other origins' pages may call `/_limbic` (spec/cors.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    pub assets_dir: PathBuf,
    /// Origins (`https://clinic.example`) allowed to call `/_limbic` APIs; empty: same-origin only.
    pub cors_origins: Vec<String>,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self { assets_dir: PathBuf::from("web/dist"), cors_origins: Vec::new() }
    }
}

/// Calls: the built-in SFU (LiveKit's client protocol) and the MatrixRTC tokens that admit to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    pub enabled: bool,
    /// Where clients reach this server for call tokens (MatrixRTC's `livekit_service_url`);
    /// empty: the client listener's address plus `/_limbic/calls`.
    pub service_url: String,
    /// Where LiveKit clients open the signalling WebSocket (`ws://` or `wss://`, the token
    /// answer's `url`); empty: the client listener's address.
    pub signalling_url: String,
    /// The `iss` of call tokens (LiveKit's API key).
    pub api_key: String,
    /// HS256 key of call tokens (LiveKit's API secret); empty: a random key kept in the store.
    pub api_secret: String,
    pub token_lifetime_seconds: u64,
    /// The UDP socket every peer connection's media goes through (port 0: any free port).
    pub udp_address: IpAddr,
    pub udp_port: u16,
    /// The address peers send media to, when it is not the socket's (behind NAT); unset with an
    /// unspecified `udp_address`: this host's address on its default route.
    pub announced_address: Option<IpAddr>,
    /// ICE over TCP: a TCP listener on `udp_address` for peers whose UDP is blocked.
    pub ice_tcp: bool,
    /// Its port (0: any free port).
    pub tcp_port: u16,
    /// Largest signalling message (and WebSocket frame) a participant may send, in bytes.
    pub max_signal_message_bytes: usize,
    /// Signalling messages per connection: sustained per second, and burst.
    pub signal_rate: RateLimit,
    /// Participants in one call, whatever the room's own rules allow.
    pub max_participants_per_call: usize,
    /// Tracks one participant may publish (simulcast layers are one track).
    pub max_tracks_per_participant: usize,
    /// Data channels one participant may open (LiveKit's SDKs open two).
    pub max_data_channels: usize,
    /// Largest data packet relayed, in bytes.
    pub max_data_packet_bytes: usize,
    /// Data relayed per participant, in bytes (each packet counts at least
    /// [`DATA_PACKET_MIN_COST`]): sustained per second, and burst.
    pub data_rate: RateLimit,
}

/// What a data packet counts for at least against `[calls] data_rate`: relaying a packet costs
/// about as much whatever its size, so tiny ones must not come by the thousand.
pub const DATA_PACKET_MIN_COST: usize = 1024;

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            service_url: String::new(),
            signalling_url: String::new(),
            api_key: "limbic".to_owned(),
            api_secret: String::new(),
            token_lifetime_seconds: 3600,
            udp_address: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            udp_port: 7882,
            announced_address: None,
            ice_tcp: true,
            // LiveKit's default.
            tcp_port: 7881,
            // LiveKit's own limit is 2 MiB; a subscriber's answer in a full call takes a few KB
            // per track it receives.
            max_signal_message_bytes: 1024 * 1024,
            signal_rate: RateLimit { per_second: 50.0, burst: 200 },
            max_participants_per_call: 100,
            // A camera, a microphone and screen shares, with room to spare.
            max_tracks_per_participant: 16,
            max_data_channels: 4,
            // LiveKit's documented limit of a whole data packet.
            max_data_packet_bytes: 16 * 1024,
            data_rate: RateLimit { per_second: 256.0 * 1024.0, burst: 1024 * 1024 },
        }
    }
}

/// TURN servers clients relay media through (`/voip/turnServer`, and LiveKit's join response),
/// with short-lived credentials from a secret shared with them: coturn's `use-auth-secret`.
/// The keys are Synapse's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VoipConfig {
    /// `turn:` and `turns:` URIs; empty: no TURN server is offered.
    pub turn_uris: Vec<String>,
    /// The secret shared with the TURN server; empty: a random one kept in the store
    /// (`limbic voip coturn-config` prints it in coturn's configuration).
    pub turn_shared_secret: String,
    /// How long credentials stay valid, in seconds.
    pub turn_user_lifetime: u64,
    /// The certificate (PEM, with its chain) and private key of the TURN server's TLS listener
    /// for `turns:` URIs, as `limbic voip coturn-config` hands them to coturn; both or neither.
    pub turn_tls_cert: String,
    pub turn_tls_key: String,
}

impl Default for VoipConfig {
    fn default() -> Self {
        // Synapse's default lifetime.
        Self { turn_uris: Vec::new(), turn_shared_secret: String::new(), turn_user_lifetime: 3600, turn_tls_cert: String::new(), turn_tls_key: String::new() }
    }
}

/// Federation with other homeservers: the TLS listener other servers reach, whom we trust for
/// outbound TLS and keys, and which servers we talk to at all.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    pub enabled: bool,
    /// The TLS listener for other servers (it serves the client API too).
    pub address: IpAddr,
    pub port: u16,
    /// PEM certificate chain and private key of the listener.
    pub tls_certificate: PathBuf,
    pub tls_private_key: PathBuf,
    /// PEM files of extra certificate authorities trusted for outbound federation (test setups,
    /// private clinics' CAs).
    pub ca_certificates: Vec<PathBuf>,
    /// Whether the built-in web PKI roots are trusted as well.
    pub trust_web_pki: bool,
    /// Served as `m.server` at `/.well-known/matrix/server`; empty: not served.
    pub well_known_server: String,
    /// Notary servers asked for another server's keys when it cannot be reached.
    pub trusted_key_servers: Vec<OwnedServerName>,
    /// If not empty, only these servers (`*.example.org` wildcards) are talked to.
    pub allow_servers: Vec<String>,
    /// Never talked to, whatever `allow_servers` says.
    pub deny_servers: Vec<String>,
    /// Largest inbound transaction body, in bytes.
    pub max_transaction_bytes: usize,
    /// Internal networks (loopback, private, link-local, …) other servers may be reached at;
    /// outside them, only public addresses are (`crate::network`).
    pub allowed_networks: Vec<crate::network::Network>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            address: IpAddr::from([0, 0, 0, 0]),
            port: 8448,
            tls_certificate: PathBuf::new(),
            tls_private_key: PathBuf::new(),
            ca_certificates: Vec::new(),
            trust_web_pki: true,
            well_known_server: String::new(),
            trusted_key_servers: Vec::new(),
            allow_servers: Vec::new(),
            deny_servers: Vec::new(),
            max_transaction_bytes: 4 << 20,
            allowed_networks: Vec::new(),
        }
    }
}

/// Delivery to push gateways (spec/push.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Internal networks (loopback, private, link-local, …) push gateways may be reached at, for
    /// on-premise gateways; outside them, only public addresses are (`crate::network`).
    pub allowed_networks: Vec<crate::network::Network>,
}

/// Limits and caching of the WebAssembly plugin host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginHostConfig {
    /// Compiled plugins, keyed by their hash and the engine's; empty: `<database.path>/plugin-cache`.
    pub cache_dir: PathBuf,
    /// Time budget of one `check-event` call.
    pub check_event_budget_ms: u64,
    /// Time budget of every other call (`on-event`, `handle-http`, `on-tick`, `init`).
    pub call_budget_ms: u64,
    /// Linear memory cap of each instance.
    pub memory_limit_mb: u64,
    /// Traps and overruns tolerated within `failure_window_seconds` before a plugin is disabled.
    pub max_failures: u32,
    pub failure_window_seconds: u64,
    /// How often plugin files are checked for changes (hot reload).
    pub reload_interval_seconds: u64,
}

impl Default for PluginHostConfig {
    fn default() -> Self {
        Self {
            cache_dir: PathBuf::new(),
            check_event_budget_ms: 20,
            call_budget_ms: 5000,
            memory_limit_mb: 64,
            max_failures: 5,
            failure_window_seconds: 60,
            reload_interval_seconds: 2,
        }
    }
}

/// One plugin: where its component and manifest are, and what the operator grants it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Must equal the manifest's name; routes live under `/_limbic/plugins/<name>/`.
    pub name: String,
    /// The component (`.wasm`, wasm32-wasip2).
    pub path: PathBuf,
    /// The manifest (`plugin.toml`).
    pub manifest: PathBuf,
    /// Capabilities granted; the plugin gets those it also declares.
    #[serde(default)]
    pub grants: Vec<String>,
    /// Hosts (`host` or `host:port`) the `http` capability may reach.
    #[serde(default)]
    pub http_hosts: Vec<String>,
    /// What happens to an event when `check-event` traps or overruns: refused (default) or let through.
    #[serde(default)]
    pub on_check_failure: CheckFailure,
    /// Handed to the plugin's `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckFailure {
    #[default]
    Deny,
    Allow,
}

/// Appointment links: booking systems create sessions and get a join link per participant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppointmentsConfig {
    /// Bearer token of the booking service; empty disables the endpoint.
    pub shared_secret: String,
    /// HS256 key of link tokens; empty means a random key kept in the store.
    pub jwt_secret: String,
    /// Where links point; the token is appended as `?token=`.
    pub link_base_url: String,
    pub token_lifetime_seconds: u64,
}

impl Default for AppointmentsConfig {
    fn default() -> Self {
        Self {
            shared_secret: String::new(),
            jwt_secret: String::new(),
            link_base_url: "http://127.0.0.1:8008/join".to_owned(),
            token_lifetime_seconds: 3600,
        }
    }
}

/// Therapy sessions: the participant limit of each session kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    pub individual: u32,
    pub couples: u32,
    pub family: u32,
    pub group: u32,
    pub support: u32,
    pub workshop: u32,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self { individual: 2, couples: 3, family: 8, group: 12, support: 20, workshop: 50 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    pub address: IpAddr,
    pub port: u16,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self { address: IpAddr::from([127, 0, 0, 1]), port: 8008 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    #[serde(default)]
    pub backend: DatabaseBackend,
    /// The node's own directory: the RocksDB store, and the default place of the key files and
    /// the media beside it.
    pub path: PathBuf,
    /// With `backend = "postgres"`: a `postgresql://` URL or libpq's `key=value` pairs.
    #[serde(default)]
    pub url: String,
    /// With `backend = "postgres"`: connections to PostgreSQL at most.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// The key sealing secrets kept in the store (plugins' stored values), outside the store;
    /// created `0600` on first start. Empty: the database path with `.key` appended.
    #[serde(default)]
    pub key_file: PathBuf,
}

fn default_pool_size() -> usize {
    16
}

/// Where the tables live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseBackend {
    /// Embedded RocksDB in `database.path`: one node.
    #[default]
    RocksDb,
    /// PostgreSQL at `database.url`.
    Postgres,
}

/// `[cluster]`: this node among the nodes that share a PostgreSQL database.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Unique per process; required with `database.backend = "postgres"`.
    pub node_name: String,
    /// Where the other nodes reach this node's client API (`http://host:port`), to pass it
    /// requests only it can answer; empty: the listener's address.
    pub url: String,
}

/// The audit log (spec/audit.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The key that MACs every audit entry, outside the store; created `0600` on first start.
    /// Empty: the database path with `-audit.key` appended.
    pub key_file: PathBuf,
}

/// Who may look other users up: Synapse's options of the same names, applied to profiles,
/// presence and the user directory (spec/behaviour.md, "Looking users up").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Profile look-ups need an access token (401 `M_MISSING_TOKEN` without).
    pub require_auth_for_profile_requests: bool,
    /// Profiles and presence only of users who share a room with the asker (403 `M_FORBIDDEN`
    /// otherwise), and a user directory of those users only.
    pub limit_profile_requests_to_users_who_share_rooms: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { level: "info".to_owned() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationMode {
    Open,
    Token,
    Closed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationConfig {
    pub mode: RegistrationMode,
    #[serde(default)]
    pub tokens: Vec<String>,
    #[serde(default)]
    pub shared_secret: String,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self { mode: RegistrationMode::Closed, tokens: Vec::new(), shared_secret: String::new() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_request_body: usize,
    /// Largest JSON body of a request without an access token (register, login, …): strangers
    /// get far less than users.
    pub max_unauthenticated_body: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { max_request_body: 10 * 1024 * 1024, max_unauthenticated_body: 64 * 1024 }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    pub enabled: bool,
    /// Proxies whose `X-Forwarded-For` is believed (the server's `ratelimit::client_address`).
    pub trusted_proxies: Vec<crate::network::Network>,
    pub message: RateLimit,
    pub registration: RateLimit,
    pub login: RateLimit,
    pub create_room: RateLimit,
    pub state_event: RateLimit,
    pub search: RateLimit,
    /// Failed passwords in user-interactive auth.
    pub reauth: RateLimit,
    /// Failed session passcodes on knock or join.
    pub knock_passcode: RateLimit,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            trusted_proxies: Vec::new(),
            message: RateLimit { per_second: 10.0, burst: 50 },
            registration: RateLimit { per_second: 0.2, burst: 5 },
            login: RateLimit { per_second: 0.5, burst: 10 },
            create_room: RateLimit { per_second: 0.5, burst: 10 },
            state_event: RateLimit { per_second: 1.0, burst: 30 },
            search: RateLimit { per_second: 0.5, burst: 10 },
            // Five failures, then one more every three minutes (five per quarter hour).
            reauth: RateLimit { per_second: 1.0 / 180.0, burst: 5 },
            knock_passcode: RateLimit { per_second: 1.0 / 180.0, burst: 5 },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceConfig {
    pub enabled: bool,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Directory of the content store; empty means `<database.path>-media`, set at load.
    pub path: PathBuf,
    /// Largest upload accepted, in bytes.
    pub max_upload_size: usize,
    /// Total bytes a user may upload; 0 means no quota.
    pub user_quota: u64,
    /// Media ids a user may hold from `create` without having uploaded to them yet.
    pub max_pending_uploads: usize,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            max_upload_size: 50 * 1024 * 1024,
            user_quota: 1024 * 1024 * 1024,
            max_pending_uploads: 5,
        }
    }
}

/// Delayed events (MSC4140): events users schedule to be sent later (spec/delayed-events.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DelayedEventsConfig {
    /// The longest delay a client may ask for, in milliseconds (Synapse's
    /// `max_event_delay_duration`).
    pub max_delay_ms: u64,
    /// How many events one user may have scheduled at once.
    pub max_per_user: usize,
}

impl Default for DelayedEventsConfig {
    fn default() -> Self {
        Self { max_delay_ms: 24 * 3600 * 1000, max_per_user: 100 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClinicConfig {
    /// Longest `body` of an `m.room.message` sent by a local client, in characters.
    pub max_message_length: usize,
    /// Lifetime of events in rooms without `m.room.retention`, in days; 0 keeps them forever.
    pub default_retention_days: u64,
    /// Bounds on a room's `max_lifetime`, in days; 0 means no bound.
    pub min_retention_days: u64,
    pub max_retention_days: u64,
    /// How often the retention job runs.
    pub retention_interval_seconds: u64,
}

impl Default for ClinicConfig {
    fn default() -> Self {
        Self {
            max_message_length: 10_000,
            default_retention_days: 0,
            min_retention_days: 0,
            max_retention_days: 0,
            retention_interval_seconds: 60,
        }
    }
}

/// A path beside the database's: `./data/limbic` keeps its media in `./data/limbic-media` and
/// its key in `./data/limbic.key`.
fn beside_database(database: &std::path::Path, suffix: &str) -> PathBuf {
    match database.file_name() {
        Some(name) => {
            let mut name = name.to_owned();
            name.push(suffix);
            database.with_file_name(name)
        }
        None => database.join(suffix.trim_start_matches(['-', '.'])),
    }
}

const ENV_PREFIX: &str = "LIMBIC_";

impl Config {
    /// Reads the file, applies `LIMBIC_*` overrides from the process environment, validates.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text, std::env::vars())
    }

    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            text.parse().map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        for (var, value) in env {
            if let Some(rest) = var.strip_prefix(ENV_PREFIX) {
                apply_env_override(&mut table, &var, rest, &value)?;
            }
        }
        let mut config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        if config.media.path.as_os_str().is_empty() {
            config.media.path = beside_database(&config.database.path, "-media");
        }
        if config.plugin_host.cache_dir.as_os_str().is_empty() {
            config.plugin_host.cache_dir = config.database.path.join("plugin-cache");
        }
        if config.database.key_file.as_os_str().is_empty() {
            config.database.key_file = beside_database(&config.database.path, ".key");
        }
        if config.audit.key_file.as_os_str().is_empty() {
            config.audit.key_file = beside_database(&config.database.path, "-audit.key");
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.database.path.as_os_str().is_empty() {
            return Err(ConfigError::Invalid { key: "database.path", reason: "must not be empty".into() });
        }
        if self.database.backend == DatabaseBackend::Postgres {
            if self.database.url.is_empty() {
                return Err(ConfigError::Invalid { key: "database.url", reason: "backend \"postgres\" needs the database's URL".into() });
            }
            if self.cluster.node_name.is_empty() {
                return Err(ConfigError::Invalid { key: "cluster.node_name", reason: "backend \"postgres\" needs a name for this node, unique among the nodes".into() });
            }
            if self.cluster.url.is_empty() && self.listen.address.is_unspecified() {
                return Err(ConfigError::Invalid { key: "cluster.url", reason: format!("the other nodes reach this one at no address when [listen] address is {}: name it", self.listen.address) });
            }
        }
        if self.database.pool_size == 0 {
            return Err(ConfigError::Invalid { key: "database.pool_size", reason: "must be at least 1".into() });
        }
        if let Some(reason) = weak_shared_secret(&self.registration.shared_secret) {
            return Err(ConfigError::Invalid { key: "registration.shared_secret", reason: reason.into() });
        }
        if self.registration.mode == RegistrationMode::Token && self.registration.tokens.is_empty() {
            return Err(ConfigError::Invalid {
                key: "registration.tokens",
                reason: "mode \"token\" needs at least one token".into(),
            });
        }
        if self.limits.max_request_body < 1024 {
            return Err(ConfigError::Invalid {
                key: "limits.max_request_body",
                reason: "must be at least 1024 bytes".into(),
            });
        }
        if self.limits.max_unauthenticated_body < 1024 {
            return Err(ConfigError::Invalid {
                key: "limits.max_unauthenticated_body",
                reason: "must be at least 1024 bytes".into(),
            });
        }
        for (key, value) in [
            ("media.max_upload_size", self.media.max_upload_size),
            ("media.max_pending_uploads", self.media.max_pending_uploads),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid { key, reason: "must be at least 1".into() });
            }
        }
        for (key, value) in [
            ("clinic.max_message_length", self.clinic.max_message_length as u64),
            ("clinic.retention_interval_seconds", self.clinic.retention_interval_seconds),
            ("appointments.token_lifetime_seconds", self.appointments.token_lifetime_seconds),
            ("delayed_events.max_delay_ms", self.delayed_events.max_delay_ms),
            ("delayed_events.max_per_user", self.delayed_events.max_per_user as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid { key, reason: "must be at least 1".into() });
            }
        }
        if let Some(uri) = self.voip.turn_uris.iter().find(|uri| !(uri.starts_with("turn:") || uri.starts_with("turns:"))) {
            return Err(ConfigError::Invalid { key: "voip.turn_uris", reason: format!("{uri:?} is not a turn: or turns: URI") });
        }
        if self.voip.turn_tls_cert.is_empty() != self.voip.turn_tls_key.is_empty() {
            return Err(ConfigError::Invalid { key: "voip.turn_tls_key", reason: "turn_tls_cert and turn_tls_key are set together".into() });
        }
        if self.voip.turn_user_lifetime == 0 {
            return Err(ConfigError::Invalid { key: "voip.turn_user_lifetime", reason: "must be at least 1".into() });
        }
        let clinic = &self.clinic;
        if clinic.max_retention_days != 0 && clinic.min_retention_days > clinic.max_retention_days {
            return Err(ConfigError::Invalid {
                key: "clinic.min_retention_days",
                reason: "must not exceed clinic.max_retention_days".into(),
            });
        }
        let federation = &self.federation;
        if federation.enabled && (federation.tls_certificate.as_os_str().is_empty() || federation.tls_private_key.as_os_str().is_empty()) {
            return Err(ConfigError::Invalid { key: "federation.tls_certificate", reason: "federation needs a TLS certificate and key".into() });
        }
        if federation.max_transaction_bytes < 1024 {
            return Err(ConfigError::Invalid { key: "federation.max_transaction_bytes", reason: "must be at least 1024".into() });
        }
        let host = &self.plugin_host;
        for (key, value) in [
            ("plugin_host.check_event_budget_ms", host.check_event_budget_ms),
            ("plugin_host.call_budget_ms", host.call_budget_ms),
            ("plugin_host.memory_limit_mb", host.memory_limit_mb),
            ("plugin_host.failure_window_seconds", host.failure_window_seconds),
            ("plugin_host.reload_interval_seconds", host.reload_interval_seconds),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid { key, reason: "must be at least 1".into() });
            }
        }
        let mut names = std::collections::HashSet::new();
        for plugin in &self.plugins {
            let valid = !plugin.name.is_empty() && plugin.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !valid {
                return Err(ConfigError::Invalid { key: "plugins.name", reason: format!("{:?}: use a-z, 0-9, - and _", plugin.name) });
            }
            if !names.insert(&plugin.name) {
                return Err(ConfigError::Invalid { key: "plugins.name", reason: format!("{} is configured twice", plugin.name) });
            }
        }
        if let Some(origin) = self.web.cors_origins.iter().find(|origin| !is_origin(origin)) {
            return Err(ConfigError::Invalid {
                key: "web.cors_origins",
                reason: format!("{origin:?} is not an origin: write scheme://host[:port] in lowercase, as browsers send it (e.g. \"https://clinic.example\"), without a path or trailing slash"),
            });
        }
        let calls = &self.calls;
        for (key, value) in [
            ("calls.max_signal_message_bytes", calls.max_signal_message_bytes),
            ("calls.max_participants_per_call", calls.max_participants_per_call),
            ("calls.max_data_packet_bytes", calls.max_data_packet_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid { key, reason: "must be at least 1".into() });
            }
        }
        if (calls.data_rate.burst as usize) < calls.max_data_packet_bytes.max(DATA_PACKET_MIN_COST) {
            return Err(ConfigError::Invalid { key: "calls.data_rate", reason: "burst must be at least max_data_packet_bytes (and 1024)".into() });
        }
        let limits = &self.rate_limits;
        for (key, limit) in [
            ("rate_limits.message", limits.message),
            ("rate_limits.registration", limits.registration),
            ("rate_limits.login", limits.login),
            ("rate_limits.create_room", limits.create_room),
            ("rate_limits.state_event", limits.state_event),
            ("rate_limits.search", limits.search),
            ("rate_limits.reauth", limits.reauth),
            ("rate_limits.knock_passcode", limits.knock_passcode),
            ("calls.signal_rate", calls.signal_rate),
            ("calls.data_rate", calls.data_rate),
        ] {
            if !(limit.per_second > 0.0 && limit.per_second.is_finite()) || limit.burst == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "per_second must be positive and burst at least 1".into(),
                });
            }
        }
        Ok(())
    }
}

/// Whether `text` is a serialized web origin, `http(s)://host[:port]`, exactly as a browser's
/// `Origin` header carries it (CORS compares origins byte for byte).
fn is_origin(text: &str) -> bool {
    let Ok(uri) = text.parse::<http::Uri>() else { return false };
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else { return false };
    matches!(scheme, "http" | "https")
        && !authority.host().is_empty()
        && !authority.as_str().contains('@')
        && text == format!("{scheme}://{authority}")
        && !text.bytes().any(|b| b.is_ascii_uppercase())
}

/// `LIMBIC_LISTEN__PORT=9000` sets `listen.port`. The value is parsed as a TOML value when it
/// is one (numbers, booleans, arrays, inline tables), otherwise taken as a string.
fn apply_env_override(
    table: &mut toml::Table,
    var: &str,
    path: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(ConfigError::Env { var: var.to_owned(), reason: "empty key segment".into() });
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let (last, parents) = keys.split_last().expect("split yields at least one segment");
    let mut current = table;
    for key in parents {
        let entry =
            current.entry(key.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
            var: var.to_owned(),
            reason: format!("`{key}` is not a section"),
        })?;
    }
    current.insert(last.clone(), parsed);
    Ok(())
}

/// The shortest admin registration secret accepted, in bytes.
const MIN_SHARED_SECRET_BYTES: usize = 32;

/// Why a non-empty `[registration] shared_secret` must not be used: whoever knows it registers
/// server admins, so a short one or a placeholder from an example would hand the server out.
fn weak_shared_secret(secret: &str) -> Option<&'static str> {
    if secret.is_empty() {
        return None;
    }
    let lower = secret.to_ascii_lowercase();
    if ["change-me", "changeme", "placeholder", "example", "secret-here"].iter().any(|p| lower.contains(p)) {
        return Some("is a placeholder: generate one (e.g. `openssl rand -hex 32`) or leave it empty and create the first admin with `limbic user create --admin`");
    }
    if secret.len() < MIN_SHARED_SECRET_BYTES {
        return Some("is shorter than 32 bytes: generate one (e.g. `openssl rand -hex 32`)");
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn admin_registration_secrets_are_long_and_not_placeholders() {
        // The example ships none; with one, it must be long and not a placeholder.
        let with = |secret: &str| Config::from_toml(EXAMPLE, [("LIMBIC_REGISTRATION__SHARED_SECRET".to_owned(), secret.to_owned())]);
        assert_eq!(Config::from_toml(EXAMPLE, []).unwrap().registration.shared_secret, "");
        assert!(with("").is_ok());
        assert!(with(&"a1".repeat(16)).is_ok());
        for weak in ["short-secret", "change-me-limbic-registration-secret", "CHANGEME-0123456789abcdef0123456789abcdef"] {
            let error = with(weak).unwrap_err().to_string();
            assert!(error.contains("registration.shared_secret"), "{weak}: {error}");
        }
    }

    use super::*;

    const EXAMPLE: &str = include_str!("../../../config.example.toml");

    #[test]
    fn a_turn_tls_certificate_comes_with_its_key() {
        let with = |vars: &[(&str, &str)]| Config::from_toml(EXAMPLE, vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        assert!(with(&[("LIMBIC_VOIP__TURN_TLS_CERT", "/etc/turn/cert.pem"), ("LIMBIC_VOIP__TURN_TLS_KEY", "/etc/turn/key.pem")]).is_ok());
        let error = with(&[("LIMBIC_VOIP__TURN_TLS_CERT", "/etc/turn/cert.pem")]).unwrap_err().to_string();
        assert!(error.contains("voip.turn_tls_key"), "{error}");
    }

    #[test]
    fn the_postgres_backend_needs_its_url_and_a_node_name() {
        let with = |vars: &[(&str, &str)]| Config::from_toml(EXAMPLE, vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let postgres = ("LIMBIC_DATABASE__BACKEND", "postgres");
        let url = ("LIMBIC_DATABASE__URL", "postgresql://limbic@127.0.0.1/limbic");
        let node = ("LIMBIC_CLUSTER__NODE_NAME", "node-a");
        let config = with(&[postgres, url, node, ("LIMBIC_DATABASE__POOL_SIZE", "4")]).unwrap();
        assert_eq!((config.database.backend, config.database.pool_size), (DatabaseBackend::Postgres, 4));
        assert_eq!(config.cluster.node_name, "node-a");
        assert!(with(&[postgres, node]).unwrap_err().to_string().contains("database.url"));
        assert!(with(&[postgres, url]).unwrap_err().to_string().contains("cluster.node_name"));
        // Listening on every address, a node says where the others reach it.
        let everywhere = ("LIMBIC_LISTEN__ADDRESS", "0.0.0.0");
        assert!(with(&[postgres, url, node, everywhere]).unwrap_err().to_string().contains("cluster.url"));
        assert!(with(&[postgres, url, node, everywhere, ("LIMBIC_CLUSTER__URL", "http://10.0.0.5:8008")]).is_ok());
        assert!(with(&[("LIMBIC_DATABASE__BACKEND", "mysql")]).is_err());
        assert!(with(&[("LIMBIC_DATABASE__POOL_SIZE", "0")]).unwrap_err().to_string().contains("database.pool_size"));
    }

    #[test]
    fn example_config_is_valid() {
        let config = Config::from_toml(EXAMPLE, []).unwrap();
        assert_eq!(config.server_name.as_str(), "localhost");
        assert_eq!(config.registration.mode, RegistrationMode::Open);
    }

    #[test]
    fn env_overrides_nested_keys_with_types() {
        let env = [
            ("LIMBIC_LISTEN__PORT".to_owned(), "9123".to_owned()),
            ("LIMBIC_SERVER_NAME".to_owned(), "clinic.example".to_owned()),
            ("LIMBIC_RATE_LIMITS__ENABLED".to_owned(), "false".to_owned()),
            ("OTHER".to_owned(), "x".to_owned()),
        ];
        let config = Config::from_toml(EXAMPLE, env).unwrap();
        assert_eq!(config.listen.port, 9123);
        assert_eq!(config.server_name.as_str(), "clinic.example");
        assert!(!config.rate_limits.enabled);
    }

    #[test]
    fn media_defaults_next_to_the_database() {
        let config = Config::from_toml(&EXAMPLE.replace("path = \"./data/limbic-media\"", ""), []).unwrap();
        assert_eq!(config.media.path, PathBuf::from("./data/limbic-media"));
        let env = [("LIMBIC_MEDIA__USER_QUOTA".to_owned(), "0".to_owned())];
        let config = Config::from_toml("server_name = \"x\"\n[database]\npath = \"/var/lib/limbic/\"\n", env).unwrap();
        assert_eq!(config.media.path, PathBuf::from("/var/lib/limbic-media"));
        assert_eq!(config.database.key_file, PathBuf::from("/var/lib/limbic.key"));
        assert_eq!(config.audit.key_file, PathBuf::from("/var/lib/limbic-audit.key"));
        assert_eq!(config.media.user_quota, 0);
        assert_eq!(config.media.max_upload_size, MediaConfig::default().max_upload_size);
    }

    #[test]
    fn errors_name_the_key() {
        let err = Config::from_toml(&EXAMPLE.replace("port = 8008", "port = \"x\""), []).unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
        let err = Config::from_toml(&EXAMPLE.replace("mode = \"open\"", "mode = \"token\""), [])
            .unwrap_err();
        assert!(err.to_string().contains("registration.tokens"), "{err}");
        let err = Config::from_toml(&format!("bogus = 1\n{EXAMPLE}"), []).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn clinic_limits_are_checked() {
        let env = |key: &str, value: &str| [(format!("LIMBIC_CLINIC__{key}"), value.to_owned())];
        let config = Config::from_toml(EXAMPLE, env("RETENTION_INTERVAL_SECONDS", "1")).unwrap();
        assert_eq!(config.clinic.retention_interval_seconds, 1);
        assert_eq!(config.clinic.max_message_length, 10_000);
        let err = Config::from_toml(EXAMPLE, env("MAX_MESSAGE_LENGTH", "0")).unwrap_err();
        assert!(err.to_string().contains("clinic.max_message_length"), "{err}");
        let err = Config::from_toml(&EXAMPLE.replace("max_retention_days = 0", "max_retention_days = 7"), env("MIN_RETENTION_DAYS", "30"))
            .unwrap_err();
        assert!(err.to_string().contains("clinic.min_retention_days"), "{err}");
    }

    #[test]
    fn cors_origins_are_origins() {
        let with = |origins: &str| Config::from_toml(&EXAMPLE.replace("cors_origins = []", &format!("cors_origins = {origins}")), []);
        let config = with(r#"["https://clinic.example", "http://127.0.0.1:8080", "https://[::1]:8443"]"#).unwrap();
        assert_eq!(config.web.cors_origins.len(), 3);
        for bad in ["*", "clinic.example", "https://clinic.example/", "https://clinic.example/app", "ftp://clinic.example", "https://Clinic.example", "https://user@clinic.example", "https://"] {
            let err = with(&format!("[{bad:?}]")).unwrap_err().to_string();
            assert!(err.contains("web.cors_origins") && err.contains("not an origin"), "{bad}: {err}");
        }
    }
}
