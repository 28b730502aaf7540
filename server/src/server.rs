//! The running server: every service, built once at start and shared by the handlers.

use std::sync::Arc;

use crate::{
    config::Config,
    e2ee::E2ee,
    error::Result,
    events::ServerSigningKey,
    media::Media,
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
    pub media: Media,
    pub e2ee: E2ee,
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
        let shutting_down = tokio::sync::watch::Sender::new(false);
        Ok(Arc::new(Self {
            users: Users::new(store.clone()),
            rooms: Rooms::new(store.clone(), signing_key.clone()),
            e2ee: E2ee::new(store.clone()),
            rate_limiter: RateLimiter::new(&config.rate_limits),
            metrics: Metrics::default(),
            media: Media::open(&config.media, store.clone(), config.server_name.clone(), shutting_down.subscribe())?,
            shutting_down,
            signing_key,
            store,
            config,
        }))
    }

    pub fn server_name(&self) -> &ruma::ServerName {
        &self.config.server_name
    }

    /// Removes devices with their access tokens, keys and pending messages, in one batch.
    pub fn delete_devices<'d>(&self, user_id: &ruma::UserId, device_ids: impl IntoIterator<Item = &'d str>) -> Result<()> {
        let ticket = self.store.streams().allocate(&self.store)?;
        let mut batch = self.store.batch();
        for device_id in device_ids {
            if self.users.stage_device_removal(&mut batch, user_id, device_id)? {
                self.e2ee.stage_device_removal(&mut batch, user_id, device_id, ticket.pos())?;
            }
        }
        tokio::task::block_in_place(|| self.store.write(batch))?;
        drop(ticket);
        Ok(())
    }

    pub fn delete_all_devices(&self, user_id: &ruma::UserId, except: Option<&str>) -> Result<()> {
        let devices = self.users.devices(user_id)?;
        self.delete_devices(user_id, devices.iter().map(|(id, _)| id.as_str()).filter(|id| Some(*id) != except))
    }
}
