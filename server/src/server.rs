//! The running server: every service, built once at start and shared by the handlers.

use std::sync::Arc;

use crate::{
    config::Config,
    error::Result,
    events::ServerSigningKey,
    metrics::Metrics,
    ratelimit::RateLimiter,
    rooms::Rooms,
    store::Store,
    users::Users,
};

pub struct Server {
    pub config: Config,
    pub store: Arc<Store>,
    pub signing_key: Arc<ServerSigningKey>,
    pub users: Users,
    pub rooms: Rooms,
    pub rate_limiter: RateLimiter,
    pub metrics: Metrics,
    /// Set once shutdown begins, so that long-polls answer at once instead of holding it up.
    pub shutting_down: tokio::sync::watch::Sender<bool>,
}

impl Server {
    /// Opens (or creates) the store and loads (or generates) the signing key.
    pub fn open(config: Config) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&config.database.path).map_err(|e| {
            crate::Error::internal(format!("cannot create {}: {e}", config.database.path.display()))
        })?;
        let store = Arc::new(Store::open(&config.database.path)?);
        let signing_key =
            Arc::new(ServerSigningKey::load_or_generate(&store, config.server_name.clone())?);
        Ok(Arc::new(Self {
            users: Users::new(store.clone()),
            rooms: Rooms::new(store.clone(), signing_key.clone()),
            rate_limiter: RateLimiter::new(&config.rate_limits),
            metrics: Metrics::default(),
            shutting_down: tokio::sync::watch::Sender::new(false),
            signing_key,
            store,
            config,
        }))
    }

    pub fn server_name(&self) -> &ruma::ServerName {
        &self.config.server_name
    }
}
