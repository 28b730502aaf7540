//! The wasmtime side: one engine with epoch interruption, components compiled once and cached
//! on disk, and sandboxed instances (WASI with nothing inherited, a memory cap, a time budget
//! per call).

use std::{
    hash::{Hash, Hasher},
    path::Path,
    sync::Arc,
    time::Duration,
};

use sha2::{Digest, Sha256};
use wasmtime::{
    Engine, Store, StoreLimits, StoreLimitsBuilder,
    component::{Component, HasSelf, Linker, ResourceTable},
};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::{PluginContext, PluginError, bindings};

/// How often the engine's epoch advances; call budgets are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);

/// What host functions may do during a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallMode {
    /// `check-event`: reads only, no writes, no outbound HTTP (the room is locked).
    ReadOnly,
    Full,
}

/// The data of one instance's store.
pub struct HostState {
    pub context: Arc<PluginContext>,
    pub mode: CallMode,
    /// When the current call's time budget runs out; blocking host calls stay within it.
    pub deadline: std::time::Instant,
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The engine shared by every plugin, and a thread that advances its epoch.
pub fn engine() -> Result<Engine, PluginError> {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // Plugins are small: no need to reserve 4 GiB of address space per memory.
    config.memory_reservation(64 << 20);
    config.memory_guard_size(64 << 10);
    let engine = Engine::new(&config).map_err(|e| PluginError::Engine(e.to_string()))?;
    let ticking = engine.weak();
    std::thread::Builder::new()
        .name("plugin-epoch".into())
        .spawn(move || {
            while let Some(engine) = ticking.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .map_err(|e| PluginError::Engine(e.to_string()))?;
    Ok(engine)
}

/// Epoch ticks for a budget, rounded up, plus one for the tick already under way.
pub fn budget_ticks(budget: Duration) -> u64 {
    budget.as_micros().div_ceil(EPOCH_TICK.as_micros()) as u64 + 1
}

pub fn linker(engine: &Engine) -> Result<Linker<HostState>, PluginError> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| PluginError::Engine(e.to_string()))?;
    bindings::Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state).map_err(|e| PluginError::Engine(e.to_string()))?;
    Ok(linker)
}

/// Compiles a component, or loads it from `cache_dir` when this engine compiled the same bytes
/// before (the file name holds the hash of both).
pub fn compile(engine: &Engine, wasm: &[u8], cache_dir: &Path) -> Result<Component, PluginError> {
    let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut engine_hash);
    let cached = cache_dir.join(format!("{}-{:016x}.cwasm", hex::encode(Sha256::digest(wasm)), engine_hash.finish()));
    if cached.exists() {
        // SAFETY: the file was written by `Component::serialize` of this engine configuration
        // (its name carries the engine's compatibility hash) into the server's own directory.
        match unsafe { Component::deserialize_file(engine, &cached) } {
            Ok(component) => return Ok(component),
            Err(error) => tracing::warn!(%error, file = %cached.display(), "ignoring an unreadable compiled plugin"),
        }
    }
    let component = Component::new(engine, wasm).map_err(|e| PluginError::Compile(format!("{e:#}")))?;
    let write = || -> std::io::Result<()> {
        // Compiled code is loaded without checks (above): only the server's user may write it.
        crate::secrets::private_dir(cache_dir)?;
        let bytes = component.serialize().map_err(std::io::Error::other)?;
        // Servers may share a cache directory: each writes its own file, then renames it.
        let partial = cached.with_extension(format!("partial-{}", std::process::id()));
        std::fs::write(&partial, bytes)?;
        std::fs::rename(&partial, &cached)
    };
    if let Err(error) = write() {
        tracing::warn!(%error, dir = %cache_dir.display(), "cannot cache a compiled plugin");
    }
    Ok(component)
}

/// A live instance of a plugin, with its store.
pub struct Instance {
    pub store: Store<HostState>,
    pub bindings: bindings::Plugin,
}

impl Instance {
    /// Instantiates the plugin in a fresh sandbox and runs its `init`.
    pub fn start(
        engine: &Engine,
        pre: &bindings::PluginPre<HostState>,
        context: Arc<PluginContext>,
        memory_limit: usize,
        budget: Duration,
    ) -> Result<Self, String> {
        let mut wasi = WasiCtxBuilder::new();
        // Nothing from the host: no environment, arguments, files, stdio or sockets.
        wasi.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        let state = HostState {
            mode: CallMode::Full,
            deadline: std::time::Instant::now() + budget,
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new().memory_size(memory_limit).instances(16).tables(16).memories(4).trap_on_grow_failure(true).build(),
            context: context.clone(),
        };
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(budget_ticks(budget));
        let bindings = pre.instantiate(&mut store).map_err(|e| format!("{e:#}"))?;
        store.set_epoch_deadline(budget_ticks(budget));
        bindings.call_init(&mut store, &context.config_json).map_err(|e| format!("{e:#}"))?.map_err(|e| format!("init refused: {e}"))?;
        Ok(Self { store, bindings })
    }

    /// Prepares the store for one call.
    pub fn arm(&mut self, mode: CallMode, budget: Duration) {
        let state = self.store.data_mut();
        state.mode = mode;
        state.deadline = std::time::Instant::now() + budget;
        self.store.set_epoch_deadline(budget_ticks(budget));
    }
}
