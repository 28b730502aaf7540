//! WebAssembly plugins: components of the versioned `limbic:plugin` world (sdk/wit), each with a
//! manifest, loaded from config and run sandboxed in wasmtime.
//!
//! - `check-event` runs at the authorize step, on its own instance (so a slow `on-event` never
//!   holds up the write path), read-only.
//! - `on-event` is fed from a durable outbox written in each event's own batch, in stream order,
//!   by one task per plugin with a persisted cursor: at least once, in order per room.
//! - `handle-http` serves `/_limbic/plugins/<name>/…`; `on-tick` runs on the manifest's schedule.
//! - A trap or an overrun drops the instance (the next call starts a fresh one); too many within
//!   the failure window disable the plugin until its file changes. Files are watched and
//!   reloaded when they change.

#[doc(hidden)]
pub mod host;
pub mod manifest;
mod runtime;

use std::{
    collections::{BTreeSet, VecDeque},
    path::Path,
    sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak},
    time::{Duration, Instant, SystemTime},
};

use ruma::{OwnedServerName, OwnedUserId};
use wasmtime::{Engine, component::Linker};

pub use manifest::{Capability, Manifest};
use runtime::{CallMode, HostState, Instance};

use crate::{
    config::{CheckFailure, Config, PluginConfig, PluginHostConfig},
    error::{Error, Result},
    events::Pdu,
    store::{Batch, Store, StreamPos, tables},
};

#[doc(hidden)]
pub mod bindings {
    wasmtime::component::bindgen!({ path: "../../sdk/wit", world: "plugin" });
}

use bindings::limbic::plugin::types::{Caller, HttpRequest, HttpResponse, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin engine: {0}")]
    Engine(String),
    #[error("invalid plugin manifest: {0}")]
    Manifest(String),
    #[error("cannot compile plugin: {0}")]
    Compile(String),
    #[error("plugin {plugin}: {reason}")]
    Load { plugin: String, reason: String },
}

/// Why a call into a plugin produced no answer.
#[derive(Debug)]
enum CallError {
    /// Disabled after repeated failures.
    Disabled,
    /// It trapped, overran its budget or its memory, or failed to start (logged by then).
    Failed,
}

/// What host functions know about the plugin that calls them.
pub struct PluginContext {
    pub name: String,
    /// The user the plugin acts as by default.
    pub user_id: OwnedUserId,
    /// Declared by the manifest and granted by the config.
    pub capabilities: BTreeSet<Capability>,
    pub http_hosts: Vec<String>,
    pub config_json: String,
    pub store: Arc<Store>,
    pub http: reqwest::Client,
    server: Arc<OnceLock<Weak<dyn HostServices>>>,
}

impl PluginContext {
    pub fn server(&self) -> Option<Arc<dyn HostServices>> {
        self.server.get()?.upgrade()
    }
}

/// What the plugin host reaches of the rest of the server, given once at start-up
/// ([`Plugins::attach`]); the server implements it. Weak, since the server owns the plugins and
/// its room pipeline calls them. A plugin's writes go through the local send path, so they pass
/// the room's rules, the clinic's and the other plugins' `check-event`, and the after-commit
/// hooks, as a client's do.
pub trait HostServices: crate::host::LocalServer {
    /// Seals plugins' stored values.
    fn secrets(&self) -> &crate::secrets::SecretKey;
}

/// Modification times and sizes of a plugin's files, to notice changes.
#[derive(Clone, Debug, PartialEq)]
struct Stamp(Vec<Option<(SystemTime, u64)>>);

impl Stamp {
    fn of(config: &PluginConfig) -> Self {
        let stamp = |path: &Path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        Self(vec![stamp(&config.path), stamp(&config.manifest)])
    }
}

/// One loaded version of a plugin.
struct Code {
    manifest: Manifest,
    pre: bindings::PluginPre<HostState>,
    context: Arc<PluginContext>,
    stamp: Stamp,
}

/// A running instance and the code it runs.
struct Live {
    code: Arc<Code>,
    instance: Instance,
}

#[derive(Default)]
struct Health {
    failures: VecDeque<Instant>,
    disabled: bool,
    restarts: u64,
    last_error: Option<String>,
}

#[derive(Clone, Copy)]
enum Slot {
    /// The instance that answers `check-event`.
    Policy,
    /// The instance for everything else.
    Worker,
}

pub struct Plugin {
    config: PluginConfig,
    code: RwLock<Arc<Code>>,
    policy: Mutex<Option<Live>>,
    worker: Mutex<Option<Live>>,
    health: Mutex<Health>,
    /// The files of a changed version that failed to load, so it is not retried every round.
    unloadable: Mutex<Option<Stamp>>,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    fn code(&self) -> Arc<Code> {
        self.code.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Calls into the plugin on one of its instances, starting one if needed. A failure drops
    /// the instance and counts towards disabling the plugin.
    fn call<R>(&self, plugins: &Plugins, slot: Slot, mode: CallMode, run: impl FnOnce(&mut Instance) -> wasmtime::Result<R>) -> Result<R, CallError> {
        let Some((engine, _)) = &plugins.runtime else { return Err(CallError::Disabled) };
        if locked(&self.health).disabled {
            return Err(CallError::Disabled);
        }
        let host = &plugins.host;
        let budget = match mode {
            CallMode::ReadOnly => Duration::from_millis(host.check_event_budget_ms),
            CallMode::Full => Duration::from_millis(host.call_budget_ms),
        };
        let mut live = locked(match slot {
            Slot::Policy => &self.policy,
            Slot::Worker => &self.worker,
        });
        let code = self.code();
        if live.as_ref().is_none_or(|live| !Arc::ptr_eq(&live.code, &code)) {
            *live = None;
            let memory = usize::try_from(host.memory_limit_mb << 20).unwrap_or(usize::MAX);
            match Instance::start(engine, &code.pre, code.context.clone(), memory, Duration::from_millis(host.call_budget_ms)) {
                Ok(instance) => *live = Some(Live { code, instance }),
                Err(reason) => return Err(self.failed(host, format!("could not start: {reason}"))),
            }
        }
        let running = live.as_mut().expect("an instance was just started");
        running.instance.arm(mode, budget);
        run(&mut running.instance).map_err(|error| {
            *live = None;
            self.failed(host, format!("{error:#}"))
        })
    }

    fn failed(&self, host: &PluginHostConfig, reason: String) -> CallError {
        let mut health = locked(&self.health);
        let now = Instant::now();
        health.failures.push_back(now);
        let window = Duration::from_secs(host.failure_window_seconds);
        while health.failures.front().is_some_and(|at| now.duration_since(*at) > window) {
            health.failures.pop_front();
        }
        health.restarts += 1;
        health.last_error = Some(reason.clone());
        if health.failures.len() >= host.max_failures as usize {
            health.disabled = true;
            tracing::error!(plugin = self.name(), %reason, "plugin disabled after {} failures within {}s", health.failures.len(), host.failure_window_seconds);
        } else {
            tracing::warn!(plugin = self.name(), %reason, "plugin call failed; its instance will be restarted");
        }
        CallError::Failed
    }
}

/// The loaded plugins and the engine they run on.
pub struct Plugins {
    runtime: Option<(Engine, Linker<HostState>)>,
    host: PluginHostConfig,
    plugins: Vec<Arc<Plugin>>,
    server: Arc<OnceLock<Weak<dyn HostServices>>>,
    store: Arc<Store>,
    server_name: OwnedServerName,
    http: reqwest::Client,
}

/// GLOBAL key of a plugin's on-event cursor: the last stream position delivered.
fn cursor_key(name: &str) -> Vec<u8> {
    format!("plugin_cursor:{name}").into_bytes()
}

impl Plugins {
    /// Loads and compiles every configured plugin; any error stops the server from starting.
    pub fn load(config: &Config, store: Arc<Store>) -> Result<Self, PluginError> {
        let runtime = if config.plugins.is_empty() {
            None
        } else {
            let engine = runtime::engine()?;
            let linker = runtime::linker(&engine)?;
            Some((engine, linker))
        };
        let mut plugins = Self {
            runtime,
            host: config.plugin_host.clone(),
            plugins: Vec::new(),
            server: Arc::new(OnceLock::new()),
            store,
            server_name: config.server_name.clone(),
            http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().map_err(|e| PluginError::Engine(e.to_string()))?,
        };
        for plugin in &config.plugins {
            let code = plugins.load_code(plugin)?;
            tracing::info!(plugin = %plugin.name, version = %code.manifest.version, capabilities = ?code.context.capabilities, "plugin loaded");
            plugins.plugins.push(Arc::new(Plugin {
                config: plugin.clone(),
                code: RwLock::new(Arc::new(code)),
                policy: Mutex::new(None),
                worker: Mutex::new(None),
                health: Mutex::new(Health::default()),
                unloadable: Mutex::new(None),
            }));
        }
        Ok(plugins)
    }

    fn load_code(&self, config: &PluginConfig) -> Result<Code, PluginError> {
        let failed = |reason: String| PluginError::Load { plugin: config.name.clone(), reason };
        let (engine, linker) = self.runtime.as_ref().ok_or_else(|| failed("no plugin engine".into()))?;
        let stamp = Stamp::of(config);
        let manifest = Manifest::load(&config.manifest)?;
        if manifest.name != config.name {
            return Err(failed(format!("its manifest names it {:?}", manifest.name)));
        }
        let granted = config.grants.iter().map(|g| Capability::parse(g)).collect::<Result<BTreeSet<_>, _>>()?;
        for missing in manifest.capabilities.difference(&granted) {
            tracing::warn!(plugin = %config.name, capability = missing.name(), "capability declared but not granted: calls needing it will fail");
        }
        let capabilities = manifest.capabilities.intersection(&granted).copied().collect();
        let wasm = std::fs::read(&config.path).map_err(|e| failed(format!("cannot read {}: {e}", config.path.display())))?;
        let component = runtime::compile(engine, &wasm, &self.host.cache_dir)?;
        let pre = linker.instantiate_pre(&component).map_err(|e| failed(format!("{e:#}")))?;
        let pre = bindings::PluginPre::new(pre).map_err(|e| failed(format!("not a limbic:plugin@{} component: {e:#}", manifest::API_VERSION)))?;
        let config_json = serde_json::to_string(&config.config).map_err(|e| failed(e.to_string()))?;
        let user_id = OwnedUserId::try_from(format!("@plugin.{}:{}", config.name, self.server_name)).map_err(|e| failed(e.to_string()))?;
        let context = Arc::new(PluginContext {
            name: config.name.clone(),
            user_id,
            capabilities,
            http_hosts: config.http_hosts.clone(),
            config_json,
            store: self.store.clone(),
            http: self.http.clone(),
            server: self.server.clone(),
        });
        Ok(Code { manifest, pre, context, stamp })
    }

    /// Gives host functions the server, and makes sure every plugin's user exists.
    pub fn attach(&self, server: &Arc<dyn HostServices>) -> Result<()> {
        let _ = self.server.set(Arc::downgrade(server));
        for plugin in &self.plugins {
            let user = plugin.code().context.user_id.clone();
            if !server.users().exists(&user)? {
                server.users().create(&user, None, false)?;
                tracing::info!(plugin = plugin.name(), %user, "created the plugin's user");
            }
        }
        Ok(())
    }

    pub fn find(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.plugins.iter().find(|p| p.name() == name)
    }

    /// Whether some plugin wants events of this type after they are persisted.
    fn wants_event(&self, event_type: &str) -> bool {
        self.plugins.iter().any(|p| p.code().manifest.on_event.as_ref().is_some_and(|filter| filter.wants(event_type)))
    }

    /// Stages an event into the on-event outbox, in the event's own batch, when some plugin
    /// wants its type (so the common message event costs the plugins nothing).
    pub fn stage_outbox(&self, batch: &mut Batch, pos: StreamPos, pdu: &Pdu) {
        if !self.plugins.is_empty() && self.wants_event(&pdu.kind.to_string()) {
            batch.put(tables::PLUGIN_OUTBOX, &pos.to_be_bytes(), pdu.event_id.as_bytes());
        }
    }

    /// Asks every plugin that checks this event type; the first refusal wins.
    pub fn check_event(&self, pdu: &Pdu, room: &dyn crate::rooms::RoomView) -> Result<()> {
        // Notes rooms are the clinic policy's alone: no plugin sees a note.
        if self.plugins.is_empty() || room.state(crate::clinic::NOTES_FOR, "")?.is_some() {
            return Ok(());
        }
        let kind = pdu.kind.to_string();
        for plugin in &self.plugins {
            let code = plugin.code();
            let Some(filter) = code.manifest.check_event.as_ref().filter(|f| f.wants(&kind)) else { continue };
            let mut state = Vec::new();
            for state_type in &filter.state_types {
                state.extend(room.state_of_type(state_type)?.iter().map(|(_, pdu)| host::event(pdu)));
            }
            let event = host::event(pdu);
            let verdict = tokio::task::block_in_place(|| {
                plugin.call(self, Slot::Policy, CallMode::ReadOnly, |i| i.bindings.call_check_event(&mut i.store, &event, &state))
            });
            match verdict {
                Ok(Verdict::Allow) | Err(CallError::Disabled) => {}
                Ok(Verdict::Deny(reason)) => return Err(Error::forbidden(reason)),
                Err(CallError::Failed) if plugin.config.on_check_failure == CheckFailure::Deny => {
                    return Err(Error::forbidden(format!("the {} plugin could not check this event", plugin.name())));
                }
                Err(CallError::Failed) => {}
            }
        }
        Ok(())
    }

    /// Serves a request under `/_limbic/plugins/<name>/`.
    pub async fn handle_http(self: &Arc<Self>, name: &str, request: HttpRequest) -> Result<HttpResponse> {
        let plugin = self.find(name).filter(|p| p.code().manifest.http).cloned().ok_or_else(|| Error::not_found(format!("no plugin {name:?} serves HTTP")))?;
        let plugins = self.clone();
        let answer = tokio::task::spawn_blocking(move || {
            plugin.call(&plugins, Slot::Worker, CallMode::Full, |i| i.bindings.call_handle_http(&mut i.store, &request))
        })
        .await
        .map_err(Error::internal)?;
        match answer {
            Ok(response) => Ok(response),
            Err(CallError::Disabled) => Err(Error::with_status(crate::error::ErrorCode::Unknown, http::StatusCode::SERVICE_UNAVAILABLE, format!("the {name} plugin is disabled"))),
            Err(CallError::Failed) => Err(Error::with_status(crate::error::ErrorCode::Unknown, http::StatusCode::BAD_GATEWAY, format!("the {name} plugin failed to answer"))),
        }
    }

    /// Each plugin's state, for admins.
    pub fn status(&self) -> Vec<PluginStatus> {
        self.plugins
            .iter()
            .map(|plugin| {
                let code = plugin.code();
                let health = locked(&plugin.health);
                PluginStatus {
                    name: plugin.name().to_owned(),
                    version: code.manifest.version.clone(),
                    description: code.manifest.description.clone(),
                    user_id: code.context.user_id.clone(),
                    capabilities: code.context.capabilities.iter().map(|c| c.name()).collect(),
                    enabled: !health.disabled,
                    restarts: health.restarts,
                    last_error: health.last_error.clone(),
                }
            })
            .collect()
    }

    /// Starts the on-event, tick and reload tasks.
    pub fn spawn_tasks(self: &Arc<Self>, server: &Arc<dyn HostServices>) {
        if self.plugins.is_empty() {
            return;
        }
        // Each plugin's events and ticks are delivered by one node of those sharing the store.
        for plugin in &self.plugins {
            let (plugins, host, led) = (self.clone(), server.clone(), plugin.clone());
            tokio::spawn(async move {
                crate::host::lead(host.store(), &format!("plugin {}: events", led.name())).await;
                deliver_events(plugins, host, led).await;
            });
            let (plugins, host, led) = (self.clone(), server.clone(), plugin.clone());
            tokio::spawn(async move {
                crate::host::lead(host.store(), &format!("plugin {}: ticks", led.name())).await;
                tick(plugins, host, led).await;
            });
        }
        tokio::spawn(watch_files(self.clone(), server.clone()));
    }

    /// Reloads plugins whose files changed; a plugin that fails to load keeps its old code
    /// until its files change again.
    fn reload_changed(&self) {
        for plugin in &self.plugins {
            let stamp = Stamp::of(&plugin.config);
            if stamp == plugin.code().stamp || locked(&plugin.unloadable).as_ref() == Some(&stamp) {
                continue;
            }
            match self.load_code(&plugin.config) {
                Ok(code) => {
                    tracing::info!(plugin = plugin.name(), version = %code.manifest.version, "plugin reloaded");
                    *plugin.code.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(code);
                    *locked(&plugin.health) = Health::default();
                }
                Err(error) => {
                    tracing::error!(plugin = plugin.name(), %error, "plugin changed but cannot be loaded; keeping the running version");
                    *locked(&plugin.unloadable) = Some(stamp);
                }
            }
        }
    }

    /// Drops delivered outbox entries: those every on-event plugin's cursor has passed.
    fn prune_outbox(&self) -> Result<()> {
        let mut oldest: Option<StreamPos> = None;
        for plugin in self.plugins.iter().filter(|p| p.code().manifest.on_event.is_some()) {
            let cursor = self.cursor(plugin.name())?.unwrap_or(0);
            oldest = Some(oldest.map_or(cursor, |o| o.min(cursor)));
        }
        let Some(oldest) = oldest else { return Ok(()) };
        let mut batch = self.store.batch();
        for item in self.store.scan_prefix(tables::PLUGIN_OUTBOX, Vec::new(), false) {
            let (key, _) = item?;
            if pos_of(&key) > oldest {
                break;
            }
            batch.delete(tables::PLUGIN_OUTBOX, &key);
        }
        if !batch.is_empty() {
            self.store.write(batch)?;
        }
        Ok(())
    }

    fn cursor(&self, name: &str) -> Result<Option<StreamPos>> {
        Ok(self.store.get(tables::GLOBAL, &cursor_key(name))?.as_deref().map(pos_of))
    }

    /// Losing a cursor update in a crash only means redelivery, which on-event allows.
    fn set_cursor(&self, name: &str, pos: StreamPos) -> Result<()> {
        let mut batch = self.store.batch();
        batch.put(tables::GLOBAL, &cursor_key(name), &pos.to_be_bytes());
        Ok(self.store.write_relaxed(batch)?)
    }
}

fn pos_of(bytes: &[u8]) -> StreamPos {
    <[u8; 8]>::try_from(bytes).map(u64::from_be_bytes).unwrap_or(0)
}

/// The request a plugin sees: no credentials, and the caller when there is one.
pub fn http_request(method: &str, path: String, query: String, headers: &http::HeaderMap, body: Vec<u8>, caller: Option<(OwnedUserId, bool)>) -> HttpRequest {
    let headers = headers
        .iter()
        .filter(|(name, _)| *name != http::header::AUTHORIZATION && *name != http::header::COOKIE)
        .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    HttpRequest { method: method.to_owned(), path, query, headers, body, caller: caller.map(|(user, is_admin)| Caller { user_id: user.to_string(), is_admin }) }
}

/// The HTTP response of a plugin's answer: its status, the headers that are valid, its body.
pub fn http_response(plugin: &str, answer: HttpResponse) -> Result<axum::response::Response> {
    let status = http::StatusCode::from_u16(answer.status).map_err(|_| Error::internal(format!("plugin {plugin} answered with status {}", answer.status)))?;
    // Only the plugin's headers: no default content type beside its own.
    let mut response = axum::response::Response::new(axum::body::Body::from(answer.body));
    *response.status_mut() = status;
    for (header, value) in answer.headers {
        match (http::HeaderName::try_from(header), http::HeaderValue::try_from(value)) {
            (Ok(header), Ok(value)) => {
                response.headers_mut().append(header, value);
            }
            _ => tracing::warn!(%plugin, "dropped an invalid response header"),
        }
    }
    // Passed on as the plugin wrote it: the API's error rewriting leaves it alone.
    response.extensions_mut().insert(PluginAnswer);
    Ok(response)
}

/// A loaded plugin's state (`GET /_limbic/admin/v1/plugins`, spec/plugins.md).
#[derive(Debug, serde::Serialize)]
pub struct PluginStatus {
    pub name: String,
    pub version: String,
    pub description: String,
    /// The user it acts as by default.
    pub user_id: OwnedUserId,
    pub capabilities: Vec<&'static str>,
    /// False once it failed too often and was turned off.
    pub enabled: bool,
    pub restarts: u64,
    pub last_error: Option<String>,
}

/// Marks a response a plugin produced, so that the API layer passes it on as written.
#[derive(Clone, Copy)]
pub struct PluginAnswer;

/// How many outbox entries one delivery round takes.
const DELIVERY_BATCH: usize = 256;

/// Feeds a plugin's `on-event` from the outbox, in stream order, from its persisted cursor.
async fn deliver_events(plugins: Arc<Plugins>, server: Arc<dyn HostServices>, plugin: Arc<Plugin>) {
    let mut watermark = server.store().streams().subscribe();
    let mut shutdown = server.shutting_down();
    let mut cursor = match plugins.cursor(plugin.name()) {
        Ok(Some(cursor)) => cursor,
        // A new plugin starts from now; it does not see history.
        _ => {
            let now = server.store().streams().current();
            if let Err(error) = plugins.set_cursor(plugin.name(), now) {
                tracing::error!(plugin = plugin.name(), %error, "cannot store the plugin's event cursor");
            }
            now
        }
    };
    loop {
        let upto = server.store().streams().current();
        let wants = plugin.code().manifest.on_event.is_some() && !locked(&plugin.health).disabled;
        // Most events never reach the outbox (no plugin wants their type): nothing to do.
        let next = server.store().scan_from(tables::PLUGIN_OUTBOX, Vec::new(), &(cursor + 1).to_be_bytes(), false).next();
        let pending = matches!(next, Some(Ok((key, _))) if pos_of(&key) <= upto);
        if wants && pending {
            let (plugins2, server2, plugin2) = (plugins.clone(), server.clone(), plugin.clone());
            let delivered = tokio::task::spawn_blocking(move || deliver_batch(&plugins2, &*server2, &plugin2, cursor, upto)).await;
            match delivered {
                Ok(Ok(last)) if last > cursor => {
                    cursor = last;
                    if let Err(error) = plugins.set_cursor(plugin.name(), cursor) {
                        tracing::error!(plugin = plugin.name(), %error, "cannot store the plugin's event cursor");
                    }
                    continue;
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::error!(plugin = plugin.name(), %error, "reading the plugin outbox failed"),
                Err(error) => tracing::error!(plugin = plugin.name(), %error, "event delivery task failed"),
            }
        }
        tokio::select! {
            changed = watermark.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
            // A disabled or reloaded plugin is looked at again now and then.
            _ = tokio::time::sleep(Duration::from_secs(plugins.host.reload_interval_seconds)) => {}
        }
    }
}

/// Delivers the outbox entries after `cursor` up to `upto`; returns the last position handled.
fn deliver_batch(plugins: &Plugins, server: &dyn HostServices, plugin: &Plugin, cursor: StreamPos, upto: StreamPos) -> Result<StreamPos> {
    let mut last = cursor;
    let start = (cursor + 1).to_be_bytes();
    let entries: Vec<(StreamPos, Vec<u8>)> = server
        .store()
        .scan_from(tables::PLUGIN_OUTBOX, Vec::new(), &start, false)
        .take(DELIVERY_BATCH)
        .map(|item| item.map(|(key, value)| (pos_of(&key), value.to_vec())))
        .collect::<Result<_, _>>()?;
    for (pos, event_id) in entries {
        if pos > upto {
            break;
        }
        last = pos;
        let Ok(event_id) = ruma::OwnedEventId::try_from(String::from_utf8_lossy(&event_id).as_ref()) else { continue };
        let Some(pdu) = server.rooms().pdu(&event_id)? else { continue };
        // Notes are for the session's therapists alone, never a plugin's.
        if crate::clinic::subrooms::is_notes_room(server.rooms(), &pdu.room_id)? {
            continue;
        }
        let code = plugin.code();
        if !code.manifest.on_event.as_ref().is_some_and(|f| f.wants(&pdu.kind.to_string())) {
            continue;
        }
        let event = host::event(&pdu);
        match plugin.call(plugins, Slot::Worker, CallMode::Full, |i| i.bindings.call_on_event(&mut i.store, &event)) {
            Ok(Ok(())) | Err(CallError::Failed) => {}
            Ok(Err(message)) => tracing::warn!(plugin = plugin.name(), event_id = %event.event_id, %message, "on-event returned an error"),
            // Stop here; delivery resumes from this event once the plugin is enabled again.
            Err(CallError::Disabled) => return Ok(pos - 1),
        }
    }
    Ok(last)
}

/// Calls a plugin's `on-tick` on the schedule its manifest sets.
async fn tick(plugins: Arc<Plugins>, server: Arc<dyn HostServices>, plugin: Arc<Plugin>) {
    let mut shutdown = server.shutting_down();
    loop {
        let every = plugin.code().manifest.tick_seconds.unwrap_or(plugins.host.reload_interval_seconds.max(1));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(every)) => {}
            _ = shutdown.changed() => return,
        }
        if plugin.code().manifest.tick_seconds.is_none() {
            continue;
        }
        let (plugins2, plugin2) = (plugins.clone(), plugin.clone());
        let now: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
        let ticked = tokio::task::spawn_blocking(move || plugin2.call(&plugins2, Slot::Worker, CallMode::Full, |i| i.bindings.call_on_tick(&mut i.store, now))).await;
        if let Ok(Ok(Err(message))) = ticked {
            tracing::warn!(plugin = plugin.name(), %message, "on-tick returned an error");
        }
    }
}

/// Reloads changed plugin files and prunes the outbox, every `reload_interval_seconds`.
async fn watch_files(plugins: Arc<Plugins>, server: Arc<dyn HostServices>) {
    let mut shutdown = server.shutting_down();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(plugins.host.reload_interval_seconds)) => {}
            _ = shutdown.changed() => return,
        }
        let plugins2 = plugins.clone();
        let _ = tokio::task::spawn_blocking(move || {
            plugins2.reload_changed();
            if let Err(error) = plugins2.prune_outbox() {
                tracing::warn!(%error, "pruning the plugin outbox failed");
            }
        })
        .await;
    }
}

/// The plugins' `check-event`, after the clinic policy.
impl crate::rooms::Policy for Plugins {
    fn authorize(&self, room: &dyn crate::rooms::RoomView, pdu: &Pdu) -> Result<()> {
        self.check_event(pdu, room)
    }
}

/// Events the plugins subscribe to, queued for delivery in the event's own write.
impl crate::rooms::Indexer for Plugins {
    fn stage(&self, _room: &dyn crate::rooms::RoomView, event: &crate::rooms::StagedEvent<'_>, staging: &mut crate::rooms::Staging<'_>) -> Result<()> {
        self.stage_outbox(staging.batch(), event.pos, event.pdu);
        Ok(())
    }
}
