//! Test harness: starts the real `limbic` binary on a free loopback port with a temporary store,
//! and a small Matrix client over HTTP.

#![allow(dead_code)]

pub mod calls;
pub mod federation;
mod proxy;
pub mod signalling;

use std::{
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub struct TestServer {
    child: Option<Child>,
    /// Where clients reach the server: its own port, or in cluster mode the proxy's.
    pub port: u16,
    pub base: String,
    /// The port the process listens on.
    listen_port: u16,
    /// The SFU's ICE-over-TCP port (kept across restarts, like `listen_port`).
    ice_tcp_port: u16,
    /// In cluster mode: the second node, and the proxy in front of both.
    peer: Option<(Box<TestServer>, proxy::Proxy)>,
    dir: tempfile::TempDir,
    /// `LIMBIC_*` overrides passed to the server process.
    env: Vec<(String, String)>,
    /// Appended to the generated config.
    extra: String,
    /// The PostgreSQL database of the server, when the tests run on that engine.
    postgres_url: Option<String>,
    /// A PostgreSQL database the config names for `limbic migrate` to copy into the server's
    /// RocksDB store ([`TestServer::switch_to_rocksdb`]).
    postgres_source: Option<String>,
    /// `[cluster] node_name`, and `[database] path` (where the key files are: the nodes of a
    /// cluster share them).
    node_name: String,
    db_dir: PathBuf,
}

/// `E2E_DATABASE=postgres` runs the end-to-end tests on the PostgreSQL engine: each server gets
/// its own database in one throwaway cluster per test binary. `E2E_DATABASE=cluster` does too,
/// and makes each server two nodes on that database behind a proxy that sends each client's
/// requests to one of them (by its access token), so that what one client does through one node
/// another sees through the other.
pub fn on_postgres() -> bool {
    matches!(std::env::var("E2E_DATABASE").as_deref(), Ok("postgres" | "cluster"))
}

fn in_cluster_mode() -> bool {
    std::env::var("E2E_DATABASE").as_deref() == Ok("cluster")
}

pub const SHARED_SECRET: &str = "test-shared-secret-0123456789abcdef";

/// The override of `[federation] allowed_networks`, and the loopback networks test servers allow.
pub const FEDERATION_ALLOWED_NETWORKS: &str = "LIMBIC_FEDERATION__ALLOWED_NETWORKS";
pub const LOOPBACK_NETWORKS: &str = r#"["127.0.0.0/8", "::1"]"#;

/// How often a server is started on fresh ports before a test gives up.
pub const START_ATTEMPTS: usize = 3;

/// Whether process `pid` holds the socket listening on TCP `port` (from Linux's /proc: the
/// listening sockets' inodes, and the process's open descriptors).
fn holds_listener(pid: u32, port: u16) -> bool {
    const LISTEN: &str = "0A";
    let listening: std::collections::HashSet<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|table| std::fs::read_to_string(table).unwrap_or_default().lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *fields.get(3)? == LISTEN).then(|| fields.get(9).map(|inode| (*inode).to_owned()))?
        })
        .collect();
    let Ok(descriptors) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    descriptors.flatten().filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|target| {
        target.to_str().and_then(|t| t.strip_prefix("socket:[")).and_then(|t| t.strip_suffix(']')).is_some_and(|inode| listening.contains(inode))
    })
}

/// A loopback TCP port free now, never handed out before by this process, and below the
/// kernel's ephemeral range: a server's port must still be free when it starts again after a
/// stop, and ports from that range are what other tests' `bind(0)`, the servers' own listeners
/// and every outgoing connection take meanwhile.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let ephemeral_start: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    if ephemeral_start < SPAN + 1024 {
        return TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    }
    // Each test binary starts at its own offset, so that two running at once rarely meet.
    let _ = NEXT.compare_exchange(u32::MAX, std::process::id().wrapping_mul(7_919) % SPAN, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..SPAN {
        let port = (ephemeral_start - SPAN + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a server with config overrides as `LIMBIC_*` environment variables.
    pub async fn start_with(env: &[(&str, &str)]) -> Self {
        Self::start_with_toml("", env).await
    }

    /// Starts a server whose config ends with `extra` (for sections such as `[[plugins]]`
    /// that environment variables cannot express).
    pub async fn start_with_toml(extra: &str, env: &[(&str, &str)]) -> Self {
        if !in_cluster_mode() {
            return Self::start_on(extra, env, on_postgres()).await;
        }
        // Clients find the call token service where they find the server: at the proxy.
        let mut proxy = proxy::Proxy::bind();
        let base = format!("http://127.0.0.1:{}", proxy.port);
        let service_url = format!("{base}/_limbic/calls");
        let env: Vec<(&str, &str)> = [("LIMBIC_CALLS__SERVICE_URL", service_url.as_str())].into_iter().chain(env.iter().copied()).collect();
        let mut server = Self::start_on(extra, &env, true).await;
        let peer = server.start_node("b").await;
        proxy.serve([server.listen_port, peer.listen_port]);
        (server.port, server.base) = (proxy.port, base);
        server.peer = Some((Box::new(peer), proxy));
        server
    }

    /// Starts a server on the embedded RocksDB store, whatever engine the suite runs on.
    pub async fn start_on_rocksdb() -> Self {
        Self::start_on("", &[], false).await
    }

    /// Starts the first node of a cluster on a new PostgreSQL database, whatever engine the
    /// suite runs on, with `env` as the nodes' overrides.
    pub async fn start_cluster(env: &[(&str, &str)]) -> Self {
        Self::start_on("", env, true).await
    }

    /// [`Self::start_cluster`] once, with `extra` config: the exit status if it stopped while
    /// starting.
    pub async fn try_start_cluster(extra: &str, env: &[(&str, &str)]) -> Result<Self, std::process::ExitStatus> {
        Self::try_start(extra, env, true).await
    }

    /// Another node of this server's cluster, named `name`: the same config, database and key
    /// files, its own port.
    pub async fn start_node(&self, name: &str) -> Self {
        self.start_node_with(name, &[]).await
    }

    /// [`Self::start_node`] with more overrides for this node alone.
    pub async fn start_node_with(&self, name: &str, env: &[(&str, &str)]) -> Self {
        assert!(self.postgres_url.is_some(), "nodes share a PostgreSQL database");
        let mut exited = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let mut node = Self {
                child: None,
                port,
                base: format!("http://127.0.0.1:{port}"),
                listen_port: port,
                ice_tcp_port: free_port(),
                peer: None,
                dir: tempfile::tempdir().unwrap(),
                env: self.env.iter().cloned().chain(env.iter().map(|(k, v)| (k.to_string(), v.to_string()))).collect(),
                extra: self.extra.clone(),
                postgres_url: self.postgres_url.clone(),
                postgres_source: None,
                node_name: name.to_owned(),
                db_dir: self.db_dir.clone(),
            };
            match node.spawn().await {
                Ok(()) => return node,
                Err(status) => exited = Some(status),
            }
        }
        panic!("node {name} exited during start {START_ATTEMPTS} times, last with {exited:?}");
    }

    async fn start_on(extra: &str, env: &[(&str, &str)], postgres: bool) -> Self {
        let mut exited = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(extra, env, postgres).await {
                Ok(server) => return server,
                Err(status) => exited = Some(status),
            }
        }
        panic!("limbic exited during start {START_ATTEMPTS} times, last with {exited:?}");
    }

    /// [`Self::start_with_toml`] once: the exit status if the server stopped while starting.
    /// A free port can be taken by another test between finding it and the server binding it,
    /// so callers try again with new ports.
    pub async fn try_start_with_toml(extra: &str, env: &[(&str, &str)]) -> Result<Self, std::process::ExitStatus> {
        Self::try_start(extra, env, on_postgres()).await
    }

    async fn try_start(extra: &str, env: &[(&str, &str)], postgres: bool) -> Result<Self, std::process::ExitStatus> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut server = Self {
            child: None,
            port,
            base: format!("http://127.0.0.1:{port}"),
            listen_port: port,
            ice_tcp_port: free_port(),
            peer: None,
            db_dir: dir.path().join("db"),
            dir,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            extra: extra.to_owned(),
            postgres_url: postgres.then(|| limbic_test_postgres::TempPostgres::shared().new_database("e2e")),
            postgres_source: None,
            node_name: "test".to_owned(),
        };
        server.spawn().await?;
        Ok(server)
    }

    /// The port to open `/rtc` on with a call token: the node the token names, in cluster mode
    /// (the proxy does not pass WebSockets on).
    pub fn signalling_port(&self, jwt: &str) -> u16 {
        match &self.peer {
            Some((peer, _)) if calls::claims(jwt)["org.limbic.node"] == peer.node_name => peer.listen_port,
            Some(_) => self.listen_port,
            None => self.port,
        }
    }

    /// Where `client`'s requests are served: the server, or in cluster mode the node the proxy
    /// sends them to (for what each node has of its own, such as its metrics).
    pub fn base_for(&self, client: &Client) -> String {
        match (&self.peer, &client.token) {
            (Some((peer, _)), Some(token)) => format!("http://127.0.0.1:{}", proxy::node_for(token, [self.listen_port, peer.listen_port])),
            _ => self.base.clone(),
        }
    }

    /// The process id of the running server (to read its memory use in /proc).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    /// The temporary directory holding the server's config and store.
    pub fn store_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The media directory, which a cluster's nodes share (beside the store, by default).
    pub fn media_dir(&self) -> PathBuf {
        PathBuf::from(format!("{}-media", self.db_dir.display()))
    }

    /// The server's store, opened by the test (the server must be stopped: it holds the store).
    pub fn open_store(&self) -> limbic_server::store::Store {
        use limbic_server::store::{Store, StoreError};
        let Some(url) = &self.postgres_url else { return Store::open(&self.db_dir).unwrap() };
        // The stopped server's PostgreSQL session, and the node lock with it, ends a moment
        // after its process.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Store::open_postgres(url, 2, "test") {
                Err(StoreError::Locked) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                opened => return opened.unwrap(),
            }
        }
    }

    /// Points the stopped server's config at a new, empty PostgreSQL database (its RocksDB
    /// store stays where it is, for `limbic migrate`).
    pub fn switch_to_postgres(&mut self) {
        self.postgres_url = Some(limbic_test_postgres::TempPostgres::shared().new_database("switched"));
        self.write_config();
    }

    /// Points the stopped server's config back at the embedded engine, at `[database] path`
    /// as before, and names its PostgreSQL database as `[database] url` for `limbic migrate` to
    /// copy from.
    pub fn switch_to_rocksdb(&mut self) {
        self.postgres_source = self.postgres_url.take();
        self.write_config();
    }

    /// Where the server's RocksDB store is (`[database] path`), with the key files beside it.
    pub fn db_dir(&self) -> &Path {
        &self.db_dir
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("limbic.toml")
    }

    fn write_config(&self) {
        let config = format!(
            "server_name = \"test.local\"\n\
             [listen]\naddress = \"127.0.0.1\"\nport = {port}\n\
             [database]\npath = \"{db}\"\n{postgres}\
             [logging]\nlevel = \"warn\"\n\
             [registration]\nmode = \"open\"\nshared_secret = \"{SHARED_SECRET}\"\n\
             [rate_limits]\nenabled = false\n\
             message = {{ per_second = 10.0, burst = 50 }}\n\
             registration = {{ per_second = 0.5, burst = 3 }}\n\
             login = {{ per_second = 0.5, burst = 3 }}\n\
             create_room = {{ per_second = 0.5, burst = 3 }}\n\
             [calls]\nudp_address = \"127.0.0.1\"\nudp_port = 0\ntcp_port = {ice_tcp_port}\n",
            port = self.listen_port,
            ice_tcp_port = self.ice_tcp_port,
            db = self.db_dir.display(),
            postgres = match (&self.postgres_url, &self.postgres_source) {
                (Some(url), _) => format!("backend = \"postgres\"\nurl = \"{url}\"\npool_size = 4\n[cluster]\nnode_name = \"{}\"\n", self.node_name),
                (None, Some(url)) => format!("url = \"{url}\"\n"),
                (None, None) => String::new(),
            },
        );
        let mut file = std::fs::File::create(self.config_path()).unwrap();
        file.write_all(config.as_bytes()).unwrap();
        file.write_all(self.extra.as_bytes()).unwrap();
    }

    /// Starts the process and waits until it answers; its exit status if it stopped first.
    async fn spawn(&mut self) -> Result<(), std::process::ExitStatus> {
        self.write_config();
        let child = Command::new(env!("CARGO_BIN_EXE_limbic"))
            .args(["serve", "--config"])
            .arg(self.config_path())
            // Test servers federate with each other over loopback, which the server refuses
            // unless allowed; a test's own `env` can take the allowance away.
            .env(FEDERATION_ALLOWED_NETWORKS, LOOPBACK_NETWORKS)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start limbic");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let http = reqwest::Client::new();
        let pid = self.child.as_ref().unwrap().id();
        loop {
            // Another test's server may have taken the port meanwhile and answer for it (this
            // one then exits: "Address already in use"): only this process's answer counts.
            if let Ok(r) = http.get(format!("http://127.0.0.1:{}/_matrix/client/versions", self.listen_port)).send().await
                && r.status().is_success()
                && holds_listener(pid, self.listen_port)
            {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(status);
            }
            assert!(Instant::now() < deadline, "limbic did not start in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and wait: a graceful shutdown (of every node).
    pub async fn stop(&mut self) {
        if let Some((peer, _)) = &mut self.peer {
            Box::pin(peer.stop()).await;
        }
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "limbic did not stop on SIGTERM");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Waits up to `timeout` for the process to exit on its own: its exit status, if it did.
    pub async fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().expect("the server is running").try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `sql` in the server's PostgreSQL database (as the cluster's superuser).
    pub fn psql(&self, sql: &str) -> String {
        let url = self.postgres_url.as_deref().expect("a server on PostgreSQL");
        limbic_test_postgres::TempPostgres::shared().psql(url.rsplit('/').next().unwrap(), sql)
    }

    /// SIGKILL: a crash (of every node).
    pub fn kill9(&mut self) {
        if let Some((peer, _)) = &mut self.peer {
            peer.kill9();
        }
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Starts the stopped server again, on its own port and store (every node).
    pub async fn start_again(&mut self) {
        if let Err(status) = self.spawn().await {
            panic!("limbic exited during start: {status}");
        }
        if let Some((peer, _)) = &mut self.peer {
            Box::pin(peer.start_again()).await;
        }
    }

    pub fn client(&self) -> Client {
        Client { http: reqwest::Client::new(), base: self.base.clone(), token: None, user_id: String::new(), device_id: String::new() }
    }

    /// Runs `limbic <args…> --config <this server's config>` to completion, with `stdin` as its
    /// input: the CLI on the store of a stopped server.
    pub fn run_cli(&self, args: &[&str], stdin: &str) -> std::process::Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_limbic"))
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run limbic");
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Registers a fresh server admin through shared-secret registration.
    /// An admin, a therapist they verified, the therapist's individual session starting now, and
    /// its notes room holding one note ("confidential").
    pub async fn session_with_a_note(&self) -> SessionWithNote {
        let admin = self.register_admin("admin").await;
        let therapist = self.register("therapist").await;
        admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let session = json!({ "kind": "individual", "title": "Intake", "starts_at": now, "ends_at": now + 3_600_000, "timezone": "UTC" });
        let room = therapist.ok(Method::POST, "/_limbic/client/v1/sessions", Some(session)).await["room_id"].as_str().unwrap().to_owned();
        let written = therapist.ok(Method::PUT, &format!("/_limbic/client/v1/sessions/{}/notes/intake", enc(&room)), Some(json!({ "body": "confidential" }))).await;
        let notes_room = written["room_id"].as_str().unwrap().to_owned();
        SessionWithNote { admin, therapist, room, notes_room }
    }

    pub async fn register_admin(&self, name: &str) -> Client {
        let mut client = self.client();
        let nonce = client.ok(Method::GET, "/_synapse/admin/v1/register", None).await["nonce"].as_str().unwrap().to_owned();
        let password = format!("{name}-password");
        let body = client
            .ok(Method::POST, "/_synapse/admin/v1/register", Some(json!({
                "nonce": nonce, "username": name, "password": password, "admin": true,
                "mac": admin_mac(&nonce, name, &password, true),
            })))
            .await;
        client.token = Some(body["access_token"].as_str().unwrap().to_owned());
        client.user_id = body["user_id"].as_str().unwrap().to_owned();
        client.device_id = body["device_id"].as_str().unwrap().to_owned();
        client
    }

    /// Registers a fresh user with m.login.dummy.
    pub async fn register(&self, name: &str) -> Client {
        let mut client = self.client();
        let (status, body) = client
            .request(Method::POST, "/_matrix/client/v3/register", Some(json!({
                "username": name, "password": format!("{name}-password"), "auth": { "type": "m.login.dummy" }
            })))
            .await;
        assert_eq!(status, StatusCode::OK, "register {name}: {body}");
        client.token = Some(body["access_token"].as_str().unwrap().to_owned());
        client.user_id = body["user_id"].as_str().unwrap().to_owned();
        client.device_id = body["device_id"].as_str().unwrap().to_owned();
        client
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}


/// A client, and the same session on another node of its server's cluster.
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub token: Option<String>,
    pub user_id: String,
    pub device_id: String,
}

pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    /// The same session (user, device, token) through `node`.
    pub fn through(&self, node: &TestServer) -> Client {
        Client { base: node.base.clone(), ..self.clone() }
    }

    pub async fn request(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(Method::PUT, path, Some(body)).await
    }

    /// Asserts success and returns the body.
    pub async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, response) = self.request(method.clone(), path, body).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {response}");
        response
    }

    pub async fn create_room(&self, body: Value) -> String {
        self.ok(Method::POST, "/_matrix/client/v3/createRoom", Some(body)).await["room_id"].as_str().unwrap().to_owned()
    }

    /// Uploads `bytes` as `content_type` and returns their `mxc://` URI (the upload must succeed).
    pub async fn upload(&self, bytes: &[u8], content_type: &str) -> String {
        let response = self
            .http
            .post(format!("{}/_matrix/media/v3/upload", self.base))
            .bearer_auth(self.token.as_deref().unwrap())
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json::<Value>().await.unwrap()["content_uri"].as_str().unwrap().to_owned()
    }

    pub async fn send_text(&self, room: &str, txn: &str, text: &str) -> String {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room));
        self.ok(Method::PUT, &path, Some(json!({ "msgtype": "m.text", "body": text }))).await["event_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn join(&self, room: &str) -> (StatusCode, Value) {
        self.post(&format!("/_matrix/client/v3/join/{}", enc(room)), json!({})).await
    }

    pub async fn invite(&self, room: &str, user: &str) -> (StatusCode, Value) {
        self.post(&format!("/_matrix/client/v3/rooms/{}/invite", enc(room)), json!({ "user_id": user })).await
    }

    pub async fn sync(&self, since: Option<&str>, timeout_ms: u64) -> Value {
        let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
        if let Some(since) = since {
            path.push_str(&format!("&since={}", enc(since)));
        }
        self.ok(Method::GET, &path, None).await
    }

    /// Event bodies of a room's /messages page.
    pub async fn messages(&self, room: &str, query: &str) -> Value {
        self.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/messages?{query}", enc(room)), None).await
    }
}

/// The HMAC-SHA1 (hex) that signs a shared-secret registration, keyed with the shared secret.
pub fn admin_mac(nonce: &str, user: &str, password: &str, admin: bool) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(SHARED_SECRET.as_bytes()).unwrap();
    mac.update(nonce.as_bytes());
    mac.update(b"\0");
    mac.update(user.as_bytes());
    mac.update(b"\0");
    mac.update(password.as_bytes());
    mac.update(b"\0");
    mac.update(if admin { b"admin".as_slice() } else { b"notadmin".as_slice() });
    hex::encode(mac.finalize().into_bytes())
}

pub fn errcode(body: &Value) -> &str {
    body["errcode"].as_str().unwrap_or("<none>")
}

/// What [`TestServer::session_with_a_note`] made.
pub struct SessionWithNote {
    pub admin: Client,
    pub therapist: Client,
    pub room: String,
    pub notes_room: String,
}
