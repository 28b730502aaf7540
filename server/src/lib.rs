//! Limbic: a Matrix homeserver for therapy practices and clinics. This crate is the API layer
//! and the binary: the client-server API and Limbic's own APIs (`client/`), the federation API
//! (`federation_api.rs`), LiveKit's signalling and RoomService (`livekit/`), the HTTP
//! application and the listeners, and the `Server` that composes the domain services
//! (`server.rs`); those services are `limbic-services`, re-exported here under the paths the code
//! has always used.

pub mod cli;
pub mod client;
pub mod federation_api;
pub mod livekit;
pub mod server;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, middleware};
pub use limbic_services::{
    Error, Result, accounts, admin, audit, calls, clinic, cluster, config, delayed, e2ee, error, events, federation, local_events, media, membership, metrics,
    host, net_filter, network, plugins, privacy, push, ratelimit, room_creation, rooms, search, secrets, store, sync, users,
};
pub use server::Server;

/// Builds the HTTP application for a running server.
pub fn app(server: Arc<Server>) -> Router {
    let cors = Arc::new(client::cors::Cors::new(&server.config.web.cors_origins));
    federation_api::routes(client::router())
        .fallback(client::unrecognized)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(client::panic_response))
        .layer(middleware::from_fn(client::rejections::as_matrix_errors))
        .layer(middleware::from_fn_with_state(cors, client::cors::apply))
        .layer(middleware::from_fn_with_state(server.clone(), client::track_metrics))
        .with_state(server)
}

/// Serves until SIGTERM or Ctrl-C, then lets in-flight requests (and their writes) finish.
pub async fn serve(server: Arc<Server>) -> std::io::Result<()> {
    let addr = SocketAddr::new(server.config.listen.address, server.config.listen.port);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, server_name = %server.server_name(), "listening");

    server.peers.register().map_err(std::io::Error::other)?;
    let plugin_host = server.plugin_host();
    server.plugins.attach(&plugin_host).map_err(std::io::Error::other)?;
    server.plugins.spawn_tasks(&plugin_host);
    let resting = tokio::spawn(resting(server.clone()));
    let sweeper = tokio::spawn(sweeping(server.clone()));
    tokio::spawn(led(server.clone(), "delayed events", |server| delayed::run(server)));
    if server.config.calls.enabled {
        let sfu = calls::media::start(&server.config.calls).await?;
        let _ = server.calls.sfu.set(sfu);
        tokio::spawn(calls::warden::run(server.clone()));
        tokio::spawn(calls::placement::run(server.clone()));
        calls::recording::repair(&*server).await;
        tokio::spawn(calls::recording::write_as_made(server.clone()));
    }
    if server.federation.is_some() {
        tokio::spawn(led(server.clone(), "federation sender", |server| federation::sender::run(server)));
        let tls = federation::serve_tls(&server.config.federation).await.map_err(std::io::Error::other)?;
        tracing::info!(addr = %axum::serve::Listener::local_addr(&tls)?, "federation listening (TLS)");
        // The same application, with the peer's address where the client listener puts it.
        let federated = app(server.clone())
            .layer(middleware::map_request(|axum::extract::ConnectInfo(federation::Peer(peer)): axum::extract::ConnectInfo<federation::Peer>, mut request: axum::extract::Request| async move {
                request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                request
            }))
            .into_make_service_with_connect_info::<federation::Peer>();
        tokio::spawn(async move {
            if let Err(error) = axum::serve(tls, federated).await {
                tracing::error!(%error, "the federation listener stopped");
            }
        });
    }
    let app = app(server.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let stopping = server.clone();
    let fenced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let was_fenced = fenced.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                () = shutdown_signal() => {}
                // A node the others fenced writes nothing more: it stops (its supervisor starts
                // it again, as a new incarnation) rather than answer every write with an error.
                () = stopping.store.fenced() => {
                    tracing::error!("this node was fenced by the others sharing the database (its session or lease ended): stopping");
                    was_fenced.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            stopping.shutting_down.send_replace(true);
        })
        .await?;
    resting.abort();
    sweeper.abort();
    if server.calls.sfu.get().is_some()
        && let Err(error) = server.calls.placements.deregister()
    {
        tracing::warn!(%error, "could not take this node's SFU out of the others' placements");
    }
    server.store.flush().map_err(std::io::Error::other)?;
    if fenced.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(std::io::Error::other("this node was fenced by the others sharing the database; start it again"));
    }
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Runs `job` once this node leads it among the nodes sharing the store (at once on the
/// embedded store).
async fn led<F: Future<Output = ()>>(server: Arc<Server>, name: &'static str, job: impl FnOnce(Arc<Server>) -> F) {
    host::lead(&server.store, name).await;
    job(server).await;
}

/// What each node does for itself: memory handed back. After a tick without a write, what
/// the store and the rooms keep only for speed goes, and then the allocator's free pages, at
/// every such tick: reads alone (initial syncs) fill those caches again, and must not keep
/// them full on an idle node. Under writes nothing is handed back: the memory is in use again
/// at once, and trimming the allocator holds every allocation up for milliseconds.
async fn resting(server: Arc<Server>) {
    let mut tick = tokio::time::interval(Duration::from_secs(MEMORY_TICK_SECONDS));
    let mut writes = server.store.writes();
    loop {
        tick.tick().await;
        let now = server.store.writes();
        if now == writes {
            // Off the runtime's workers: dropping the caches' maps, flushing and trimming take a while.
            let idle = server.clone();
            let rest = move || {
                idle.rooms.rest();
                let rested = idle.store.rest();
                release_free_memory();
                rested
            };
            match tokio::task::spawn_blocking(rest).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "could not hand back the store's memory"),
                Err(error) => tracing::warn!(%error, "handing back the store's memory failed"),
            }
        }
        writes = now;
    }
}

/// What one node does for all: typing that ran out, retention, the media it frees, used link
/// tokens, full rate limit buckets, what dead nodes' calls left behind.
async fn sweeping(server: Arc<Server>) {
    host::lead(&server.store, "expiry, retention and pruning").await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seconds: u64 = 0;
    loop {
        tick.tick().await;
        seconds += 1;
        if let Err(e) = server.rooms.expire_typing() {
            tracing::warn!(error = %e, "typing expiry failed");
        }
        if seconds.is_multiple_of(server.config.clinic.retention_interval_seconds) {
            if let Err(e) = server.rooms.expire_events(&server.config.clinic).await {
                tracing::warn!(error = %e, "retention purge failed");
            }
            // The media of the purged messages, now that the purge is durable.
            if let Err(e) = server.media.collect().await {
                tracing::warn!(error = %e, "deleting the media of purged messages failed");
            }
        }
        if seconds.is_multiple_of(LINK_TOKEN_PRUNE_SECONDS)
            && let Err(e) = server.appointments.prune_used()
        {
            tracing::warn!(error = %e, "pruning used link tokens failed");
        }
        if seconds.is_multiple_of(RATE_BUCKET_PRUNE_SECONDS)
            && let Err(e) = server.rate_limiter.prune()
        {
            tracing::warn!(error = %e, "pruning full rate limit buckets failed");
        }
        if server.store.is_shared()
            && seconds.is_multiple_of(DEAD_NODE_SWEEP_SECONDS)
            && let Err(e) = limbic_services::calls::placement::sweep_dead_nodes(&*server).await
        {
            tracing::warn!(error = %e, "clearing the calls of dead nodes failed");
        }
    }
}

const MEMORY_TICK_SECONDS: u64 = 5;
const LINK_TOKEN_PRUNE_SECONDS: u64 = 3600;
const RATE_BUCKET_PRUNE_SECONDS: u64 = 60;
/// How soon after a node dies (once the database has fenced it) its calls are released and
/// what it was recording is stored, when nobody joins them meanwhile.
const DEAD_NODE_SWEEP_SECONDS: u64 = 5;

/// glibc keeps freed memory in its arenas after a burst of load; hand it back to the OS so
/// that an idle server stays small.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Fewer malloc arenas fragment less; two match the runtime's worker threads on small servers.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
