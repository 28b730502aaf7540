//! Harness for the matrix-rust-sdk tests: starts a homeserver on a free loopback port with a fresh
//! store in a temporary directory — the real `limbic` binary by default, or Synapse from the
//! repository's `.venv` with `RUST_SDK_TARGET=synapse` — and logs SDK clients in to it.
//!
//! Environment:
//! - `LIMBIC_BIN`: the binary to test (default `<repo>/target/debug/limbic`);
//! - `RUST_SDK_TARGET`: `limbic` (default) or `synapse`;
//! - `RUST_SDK_PYTHON`: the Python with `matrix-synapse` (default `<repo>/.venv/bin/python`);
//! - `RUST_SDK_SERVER_LOG`: Limbic's log level (default `info`);
//! - `RUST_LOG`: the SDK's own tracing (e.g. `matrix_sdk=debug` logs each request with its status).
//!
//! A failing test prints the tail of the server's log.

use std::{
    fmt::Write as _,
    future::Future,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Once,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use matrix_sdk::{
    Client,
    encryption::{BackupDownloadStrategy, EncryptionSettings},
    ruma::{
        OwnedUserId,
        api::client::{
            room::create_room::v3::Request as CreateRoomRequest,
            uiaa::{AuthData, MatrixUserIdentifier, Password, UserIdentifier},
        },
        events::{InitialStateEvent, room::encryption::RoomEncryptionEventContent},
    },
    sliding_sync::VersionBuilder,
};
use matrix_sdk_ui::{
    sync_service::SyncService,
    timeline::{EventTimelineItem, Timeline},
};
use serde_json::{Value, json};

/// Every user's password.
pub const PASSWORD: &str = "correct horse battery staple";

/// The server implementation under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Limbic,
    Synapse,
}

impl Target {
    pub fn from_env() -> Self {
        match std::env::var("RUST_SDK_TARGET").as_deref() {
            Ok("synapse") => Self::Synapse,
            Ok("limbic") | Ok("") | Err(_) => Self::Limbic,
            Ok(other) => panic!("RUST_SDK_TARGET must be limbic or synapse, not {other:?}"),
        }
    }
}

/// A running homeserver; stopped (and its directory removed) when dropped.
pub struct Server {
    pub target: Target,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    pub server_name: String,
    port: u16,
    child: Child,
    log: PathBuf,
    dir: tempfile::TempDir,
    /// The log tail was printed already.
    reported: bool,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// SDK tracing on stderr (captured per test) when `RUST_LOG` is set.
fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

impl Server {
    /// Runs `test` against a fresh server of the kind `RUST_SDK_TARGET` selects; if it fails, the
    /// tail of the server's log is printed (and with `RUST_SDK_KEEP`, its directory kept).
    pub async fn run(test: impl AsyncFnOnce(&mut Server) -> Result<()>) -> Result<()> {
        let mut server = Self::start().await?;
        let result = test(&mut server).await;
        if result.is_err() {
            server.report_failure();
        }
        result
    }

    /// Starts the server selected by `RUST_SDK_TARGET`.
    async fn start() -> Result<Self> {
        init_tracing();
        let target = Target::from_env();
        let dir = tempfile::Builder::new().prefix("limbic-rust-sdk-").tempdir()?;
        let port = free_port()?;
        let log = dir.path().join("server.log");
        let child = spawn(target, dir.path(), port, &log)?;
        let server_name = match target {
            Target::Limbic => "limbic.test".to_owned(),
            Target::Synapse => "synapse.test".to_owned(),
        };
        let mut server = Self {
            target,
            base: format!("http://127.0.0.1:{port}"),
            port,
            server_name,
            child,
            log,
            dir,
            reported: false,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// Stops the server (SIGTERM) and starts it again on the same store and port.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.child = spawn(self.target, self.dir.path(), self.port, &self.log)?;
        self.wait_ready().await
    }

    /// SIGTERM, then SIGKILL after 10 s.
    fn stop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn report_failure(&mut self) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        eprintln!("{}", self.log_tail(60));
        if std::env::var_os("RUST_SDK_KEEP").is_some()
            && let Ok(spare) = tempfile::tempdir()
        {
            eprintln!("kept {}", self.dir.path().display());
            let _ = std::mem::replace(&mut self.dir, spare).keep();
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(response) = http.get(format!("{}/_matrix/client/versions", self.base)).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{:?} exited during start ({status})\n{}", self.target, self.log_tail(40));
            }
            ensure!(Instant::now() < deadline, "{:?} did not start in time\n{}", self.target, self.log_tail(40));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let mut out = format!("--- last {lines} lines of {} ---\n", self.log.display());
        for line in &all[all.len().saturating_sub(lines)..] {
            let _ = writeln!(out, "{line}");
        }
        out
    }

    pub fn user_id(&self, name: &str) -> String {
        format!("@{name}:{}", self.server_name)
    }

    /// Registers `name` with `m.login.dummy` (no login).
    pub async fn register(&self, name: &str) -> Result<()> {
        let body = json!({
            "username": name, "password": PASSWORD, "auth": { "type": "m.login.dummy" }, "inhibit_login": true,
        });
        let (status, answer) = self.post_json("/_matrix/client/v3/register", None, &body).await?;
        ensure!(status == 200, "POST /register {name}: {status} {answer}");
        Ok(())
    }

    /// A raw JSON POST, for what the SDK does not do itself.
    pub async fn post_json(&self, path: &str, token: Option<&str>, body: &Value) -> Result<(u16, Value)> {
        let mut request = reqwest::Client::new().post(format!("{}{path}", self.base)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    /// A fresh SDK client (memory stores) that discovers simplified sliding sync from `/versions`,
    /// as Element X does.
    pub async fn client(&self, encryption: EncryptionSettings) -> Result<Client> {
        Ok(Client::builder()
            .homeserver_url(&self.base)
            .sliding_sync_version_builder(VersionBuilder::DiscoverNative)
            .with_encryption_settings(encryption)
            .build()
            .await?)
    }

    /// Logs `name` in with a password on a new device.
    pub async fn login(&self, name: &str) -> Result<Client> {
        self.login_with(name, EncryptionSettings::default()).await
    }

    pub async fn login_with(&self, name: &str, encryption: EncryptionSettings) -> Result<Client> {
        let client = self.client(encryption).await?;
        client
            .matrix_auth()
            .login_username(name, PASSWORD)
            .initial_device_display_name("rust-sdk test")
            .await
            .with_context(|| format!("password login of {name}"))?;
        Ok(client)
    }

    /// Registers `name` and logs it in.
    pub async fn user(&self, name: &str) -> Result<Client> {
        self.register(name).await?;
        self.login(name).await
    }
}

/// Encryption settings for tests that use key backup: keys downloaded when a message fails to
/// decrypt, nothing created behind the test's back.
pub fn backup_settings() -> EncryptionSettings {
    EncryptionSettings {
        auto_enable_cross_signing: false,
        backup_download_strategy: BackupDownloadStrategy::AfterDecryptionFailure,
        auto_enable_backups: false,
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            self.report_failure();
        }
    }
}

/// Starts the server process, its output appended to `log`.
fn spawn(target: Target, dir: &Path, port: u16, log: &Path) -> Result<Child> {
    let mut command = match target {
        Target::Limbic => limbic_command(dir, port)?,
        Target::Synapse => synapse_command(dir, port)?,
    };
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    command
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {command:?}"))
}

fn limbic_command(dir: &Path, port: u16) -> Result<Command> {
    let bin =
        std::env::var_os("LIMBIC_BIN").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/debug/limbic"));
    ensure!(
        bin.exists(),
        "{} does not exist: build it with `cargo build -p limbic-server --bins` or set LIMBIC_BIN",
        bin.display()
    );
    let level = std::env::var("RUST_SDK_SERVER_LOG").unwrap_or_else(|_| "info".to_owned());
    // Open registration, no rate limits (the section's fields are required even when disabled),
    // calls on an ephemeral UDP port.
    let config = format!(
        r#"server_name = "limbic.test"

[listen]
address = "127.0.0.1"
port = {port}

[database]
path = "{db}"

[media]
path = "{media}"

[logging]
level = "{level}"

[registration]
mode = "open"

[rate_limits]
enabled = false
message = {{ per_second = 1.0, burst = 1 }}
registration = {{ per_second = 1.0, burst = 1 }}
login = {{ per_second = 1.0, burst = 1 }}
create_room = {{ per_second = 1.0, burst = 1 }}

[calls]
udp_address = "127.0.0.1"
udp_port = 0
tcp_port = 0
"#,
        db = dir.join("db").display(),
        media = dir.join("media").display(),
    );
    let path = dir.join("limbic.toml");
    std::fs::write(&path, config)?;
    let mut command = Command::new(bin);
    // A log file, not a terminal: no colours.
    command.arg("serve").arg("--config").arg(path).current_dir(dir).env("NO_COLOR", "1");
    // The server reads LIMBIC_* overrides: none of the caller's may leak in.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("LIMBIC_") {
            command.env_remove(key);
        }
    }
    Ok(command)
}

/// Synapse as the interop suite runs it: the config `--generate-config` writes, then a second
/// config file (JSON is YAML) that overrides listeners, database, registration and rate limits.
fn synapse_command(dir: &Path, port: u16) -> Result<Command> {
    let python =
        std::env::var_os("RUST_SDK_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    let generated = dir.join("homeserver.yaml");
    let overrides_path = dir.join("overrides.yaml");
    let mut command = Command::new(&python);
    command
        .args(["-m", "synapse.app.homeserver", "--config-path"])
        .arg(&generated)
        .arg("--config-path")
        .arg(&overrides_path)
        .current_dir(dir);
    if generated.exists() {
        return Ok(command); // a restart
    }
    let output = Command::new(&python)
        .args([
            "-m",
            "synapse.app.homeserver",
            "--server-name",
            "synapse.test",
            "--report-stats",
            "no",
            "--generate-config",
        ])
        .arg("--config-path")
        .arg(&generated)
        .arg("--data-directory")
        .arg(dir)
        .current_dir(dir)
        .output()
        .with_context(|| format!("{} -m synapse.app.homeserver (run scripts/setup)", python.display()))?;
    ensure!(output.status.success(), "synapse --generate-config: {}", String::from_utf8_lossy(&output.stderr));

    let high = json!({ "per_second": 10000, "burst_count": 100000 });
    let overrides = json!({
        "listeners": [{
            "port": port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": false, "x_forwarded": false,
            "resources": [{ "names": ["client"], "compress": false }],
        }],
        "database": { "name": "sqlite3", "args": { "database": dir.join("homeserver.db") } },
        "media_store_path": dir.join("media"),
        // The generated log config writes to a file; the harness's log is stderr.
        "log_config": null,
        "enable_registration": true,
        "enable_registration_without_verification": true,
        "trusted_key_servers": [],
        "presence": { "enabled": false },
        "report_stats": false,
        // MSC4140: Synapse serves delayed events only with a maximum delay.
        "max_event_delay_duration": "24h",
        "caches": { "sync_response_cache_duration": 0 },
        "rc_message": high, "rc_registration": high, "rc_login": { "address": high, "account": high, "failed_attempts": high },
        "rc_joins": { "local": high, "remote": high }, "rc_joins_per_room": high,
        "rc_invites": { "per_room": high, "per_user": high, "per_issuer": high },
        "rc_media_create": high, "rc_delayed_event_mgmt": high, "rc_room_creation": high,
        "rc_key_requests": high, "rc_presence": { "per_user": high }, "rc_admin_redaction": high,
    });
    std::fs::write(&overrides_path, serde_json::to_vec_pretty(&overrides)?)?;
    Ok(command)
}

/// Polls `check` until it returns `Some`, failing after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `SyncService` as Element X builds it: in offline mode, it waits for the server to come back
/// after a network error instead of stopping.
pub async fn sync_service(client: &Client) -> Result<SyncService> {
    Ok(SyncService::builder(client.clone()).with_offline_mode().build().await?)
}

/// A client syncing in the background the way Element X does: a `SyncService` (simplified
/// sliding sync, with the encryption sync beside the room list).
pub struct Syncing {
    pub client: Client,
    pub sync: SyncService,
}

impl Syncing {
    pub async fn start(client: Client) -> Result<Self> {
        let sync = sync_service(&client).await?;
        sync.start().await;
        Ok(Self { client, sync })
    }

    /// Waits until the client knows the room (joined, invited or left).
    pub async fn room(&self, room_id: &matrix_sdk::ruma::RoomId) -> Result<matrix_sdk::Room> {
        wait_for(
            &format!("{room_id} in {}'s sync", self.client.user_id().map(|u| u.as_str()).unwrap_or("?")),
            Duration::from_secs(20),
            || async { self.client.get_room(room_id) },
        )
        .await
    }
}

/// Creates a room named `name` inviting `invite`, encrypted when `encrypted`.
pub async fn create_room(
    client: &Client,
    name: &str,
    invite: &[OwnedUserId],
    encrypted: bool,
) -> Result<matrix_sdk::Room> {
    let mut request = CreateRoomRequest::new();
    request.name = Some(name.to_owned());
    request.invite = invite.to_vec();
    if encrypted {
        request.initial_state = vec![
            InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults())
                .to_raw_any(),
        ];
    }
    let room = client.create_room(request).await.with_context(|| format!("create room {name}"))?;
    if encrypted {
        // A sync that saw the room before its m.room.encryption event (Synapse persists a new
        // room's events one by one) leaves the SDK believing it unencrypted, and it would send
        // the first messages in the clear: wait until the SDK knows better.
        wait_for(&format!("{name} known as encrypted"), Duration::from_secs(20), || async {
            room.latest_encryption_state().await.ok().filter(|state| state.is_encrypted())
        })
        .await?;
    }
    Ok(room)
}

/// The text of a message item, if it is one.
pub fn body(item: &EventTimelineItem) -> Option<&str> {
    item.content().as_message().map(|message| message.body())
}

/// The timeline's event items, oldest first.
pub async fn event_items(timeline: &Timeline) -> Vec<EventTimelineItem> {
    timeline.items().await.iter().filter_map(|item| item.as_event().cloned()).collect()
}

/// Waits until `timeline` shows a remote (sent) event item matching `matches`.
pub async fn wait_for_item(
    timeline: &Timeline,
    what: &str,
    matches: impl Fn(&EventTimelineItem) -> bool,
) -> Result<EventTimelineItem> {
    wait_for_items(timeline, what, |items| items.iter().find(|item| item.is_remote_event() && matches(item)).cloned())
        .await
}

/// Waits until `check` finds what it wants in the timeline's event items; a timeout lists them.
pub async fn wait_for_items<T>(
    timeline: &Timeline,
    what: &str,
    check: impl Fn(&[EventTimelineItem]) -> Option<T>,
) -> Result<T> {
    let found = wait_for(what, Duration::from_secs(20), || async { check(&event_items(timeline).await) }).await;
    match found {
        Ok(found) => Ok(found),
        Err(error) => {
            let seen: Vec<String> = event_items(timeline).await.iter().map(describe).collect();
            Err(error.context(format!("timeline items: {seen:#?}")))
        }
    }
}

/// A one-line description of an item, for failure messages.
pub fn describe(item: &EventTimelineItem) -> String {
    let what = match body(item) {
        Some(body) if item.encryption_info().is_some() => format!("{body:?} (decrypted)"),
        Some(body) => format!("{body:?}"),
        None if item.content().is_unable_to_decrypt() => "unable to decrypt".to_owned(),
        None => event_type(item).unwrap_or_else(|| "(no json)".to_owned()),
    };
    format!("{} {} {what}", item.event_id().map(|id| id.as_str()).unwrap_or("(local)"), item.sender())
}

/// The event type of a remote item, from its JSON.
pub fn event_type(item: &EventTimelineItem) -> Option<String> {
    item.original_json()?.get_field::<String>("type").ok().flatten()
}

/// Creates and uploads the user's cross-signing keys, with password UIA if the server asks.
pub async fn bootstrap_cross_signing(client: &Client) -> Result<()> {
    let Err(error) = client.encryption().bootstrap_cross_signing(None).await else {
        return Ok(());
    };
    let uiaa = error.as_uiaa_response().with_context(|| format!("cross-signing bootstrap: {error:?}"))?;
    let user_id = client.user_id().context("not logged in")?;
    let mut password =
        Password::new(UserIdentifier::Matrix(MatrixUserIdentifier::new(user_id.to_string())), PASSWORD.to_owned());
    password.session = uiaa.session.clone();
    client
        .encryption()
        .bootstrap_cross_signing(Some(AuthData::Password(password)))
        .await
        .context("cross-signing bootstrap with password UIA")
}
