//! The running server: every service, built once at start and shared by the handlers.

use std::sync::Arc;

use crate::{
    audit::Audit,
    clinic::Clinic,
    config::{Config, DatabaseBackend},
    e2ee::E2ee,
    push::Push,
    error::Result,
    events::{PduBuilder, ServerSigningKey},
    media::Media,
    metrics::Metrics,
    ratelimit::RateLimiter,
    rooms::Rooms,
    store::Store,
    users::Users,
};

/// Opens the store the config names: the embedded RocksDB store, or the PostgreSQL database,
/// beside the other nodes that share it.
pub fn open_store(config: &Config) -> crate::store::Result<Store> {
    let database = &config.database;
    match database.backend {
        DatabaseBackend::RocksDb => Store::open(&database.path),
        DatabaseBackend::Postgres => Store::open_node(&database.url, database.pool_size, &config.cluster.node_name, true),
    }
}

/// Where the other nodes reach this one: `[cluster] url`, or the listener.
fn node_url(config: &Config) -> String {
    match config.cluster.url.as_str() {
        "" => format!("http://{}:{}", config.listen.address, config.listen.port),
        url => url.trim_end_matches('/').to_owned(),
    }
}

pub struct Server {
    pub config: Config,
    pub store: Arc<Store>,
    pub signing_key: Arc<ServerSigningKey>,
    /// Seals secrets kept in the store (plugins' stored values); its key is outside the store.
    pub secrets: crate::secrets::SecretKey,
    pub users: Users,
    pub rooms: Rooms,
    pub media: Media,
    pub e2ee: E2ee,
    pub audit: Arc<Audit>,
    pub clinic: Arc<Clinic>,
    pub appointments: crate::clinic::appointments::Appointments,
    pub calls: crate::calls::Calls,
    pub push: Arc<Push>,
    pub rate_limiter: RateLimiter,
    pub metrics: Arc<Metrics>,
    pub admin: crate::admin::Admin,
    pub plugins: Arc<crate::plugins::Plugins>,
    /// Events users scheduled to be sent later (MSC4140).
    pub delayed: crate::delayed::DelayedEvents,
    /// Present when `[federation] enabled`.
    pub federation: Option<Arc<crate::federation::Federation>>,
    /// Set once shutdown begins, so that long-polls answer at once instead of holding it up.
    pub shutting_down: tokio::sync::watch::Sender<bool>,
    /// Sliding sync connections (MSC4186).
    pub sliding_sync: crate::sync::sliding::Connections,
    /// The other nodes sharing the store, to pass them what only they can answer.
    pub peers: crate::cluster::Peers,
}

impl Server {
    /// A server named `test.local` with its store and media under `dir`, for unit tests.
    #[cfg(test)]
    pub fn open_in(dir: &std::path::Path) -> Arc<Self> {
        let toml = format!(
            "server_name = \"test.local\"\n[database]\npath = \"{}\"\n[media]\npath = \"{}\"\n",
            dir.join("db").display(),
            dir.join("media").display()
        );
        Self::open(Config::from_toml(&toml, []).expect("test config")).expect("test server")
    }

    /// Opens (or creates) the store and loads (or generates) the signing key and the key that
    /// seals secrets in the store.
    pub fn open(config: Config) -> Result<Arc<Self>> {
        crate::secrets::private_dir(&config.database.path).map_err(|e| {
            crate::Error::internal(format!("cannot create {}: {e}", config.database.path.display()))
        })?;
        let store = Arc::new(open_store(&config)?);
        let secrets = crate::secrets::SecretKey::load_or_create(&config.database.key_file, &store)?;
        secrets.seal_table(&store, crate::store::tables::PLUGIN_KV)?;
        let signing_key =
            Arc::new(ServerSigningKey::load_or_generate(&store, config.server_name.clone())?);
        let shutting_down = tokio::sync::watch::Sender::new(false);
        let push = Arc::new(Push::new(store.clone(), &config.push));
        let audit = Arc::new(Audit::load(&store, &config.audit.key_file)?);
        let clinic = Arc::new(Clinic::new(store.clone(), config.sessions.clone()));
        let plugins = Arc::new(crate::plugins::Plugins::load(&config, store.clone()).map_err(crate::Error::internal)?);
        let federation = if config.federation.enabled {
            let federation = crate::federation::Federation::new(config.federation.clone(), signing_key.clone(), store.clone()).map_err(crate::Error::internal)?;
            Some(Arc::new(federation))
        } else {
            None
        };
        let server = Arc::new(Self {
            federation,
            plugins: plugins.clone(),
            push: push.clone(),
            audit: audit.clone(),
            clinic: clinic.clone(),
            appointments: crate::clinic::appointments::Appointments::open(store.clone(), config.appointments.clone(), config.server_name.clone())?,
            calls: crate::calls::Calls::open(&store, config.calls.clone(), &config.voip, &config.listen, &config.media.path.join("recordings"), &config.cluster.node_name)?,
            users: Users::new(store.clone(), vec![push.clone()]),
            delayed: crate::delayed::DelayedEvents::new(store.clone(), config.delayed_events.clone()),
            rooms: Rooms::new(store.clone(), signing_key.clone(), audit, config.federation.enabled),
            e2ee: E2ee::new(store.clone()),
            rate_limiter: RateLimiter::for_store(&config.rate_limits, &store),
            metrics: Arc::default(),
            sliding_sync: crate::sync::sliding::Connections::new(store.is_shared().then(|| config.cluster.node_name.clone())),
            peers: crate::cluster::Peers::new(store.clone(), &config.cluster.node_name, node_url(&config))?,
            admin: crate::admin::Admin::default(),
            media: Media::open(&config.media, store.clone(), config.server_name.clone(), shutting_down.subscribe())?,
            shutting_down,
            signing_key,
            secrets,
            store,
            config,
        });
        server.rooms.register(server.fanout());
        Ok(server)
    }

    /// What the room pipeline fans out to, in order: the clinic's rules before the plugins'
    /// `check-event`; the indexers staging into each event's write; then the after-commit hooks.
    fn fanout(self: &Arc<Self>) -> crate::rooms::Fanout {
        let server_name = self.config.server_name.clone();
        let mut indexers: Vec<Arc<dyn crate::rooms::Indexer>> = vec![
            Arc::new(crate::search::SearchIndex),
            Arc::new(crate::media::MediaReferences::new(server_name.clone())),
            self.plugins.clone(),
        ];
        if self.federation.is_some() {
            indexers.push(Arc::new(crate::federation::sender::Outbox::new(server_name.clone())));
        }
        indexers.push(Arc::new(crate::push::Notifier::new(self.push.clone(), server_name)));
        indexers.push(self.clinic.clone());
        crate::rooms::Fanout {
            policies: vec![self.clinic.clone(), self.plugins.clone()],
            indexers,
            after_commit: vec![
                self.metrics.clone(),
                Arc::new(crate::calls::recording::RecordingWatch::new(Arc::downgrade(&(self.clone() as Arc<dyn crate::calls::CallsHost>)))),
                Arc::new(crate::clinic::subrooms::RemoteRoleChanges::new(Arc::downgrade(&(self.clone() as Arc<dyn crate::clinic::ClinicHost>)), self.config.server_name.clone())),
            ],
        }
    }

    pub fn server_name(&self) -> &ruma::ServerName {
        &self.config.server_name
    }

    /// The checks a local user's event passes at the send and state endpoints (and when a
    /// delayed event comes due), beyond the room's rules.
    pub fn local_events(&self) -> crate::local_events::LocalEvents<'_> {
        crate::local_events::LocalEvents { rooms: &self.rooms, server_name: &self.config.server_name, max_message_length: self.config.clinic.max_message_length }
    }

    /// What the plugin host reaches of this server.
    pub fn plugin_host(self: &Arc<Self>) -> Arc<dyn crate::plugins::HostServices> {
        self.clone()
    }

    /// Appends one event from a local user (a client, a plugin acting for one, a delayed event
    /// coming due) and commits it, with `records` of another module in the same batch (a delayed
    /// event's removal goes with the event it became). The after-commit work is done before it
    /// returns, so that an answer reflects it (a withdrawn consent has stopped the recording).
    pub async fn send_local_event(
        &self,
        sender: &ruma::UserId,
        room_id: &ruma::RoomId,
        builder: PduBuilder,
        txn: Option<crate::rooms::TxnInfo>,
        records: Option<crate::store::Batch>,
    ) -> Result<crate::events::Pdu> {
        // Messages with nothing else in their write are committed in groups.
        if records.is_none() && Rooms::groups(&builder) {
            let sent = self.rooms.send(sender, room_id, builder, txn).await?;
            sent.committed.finish().await;
            return Ok(sent.pdu);
        }
        let mut writer = self.rooms.writer(room_id).await?;
        if !writer.exists() {
            return Err(crate::Error::not_found("unknown room"));
        }
        // A role taken away ends its notes-room and breakout memberships in the same write.
        let subrooms = crate::clinic::subrooms::stage_for_event(self, room_id, sender, &builder).await?;
        let pdu = writer.append(sender, builder, txn)?;
        if let Some(records) = records {
            writer.batch().append(records);
        }
        writer.commit_with(subrooms)?.finish().await;
        Ok(pdu)
    }

}

/// What every domain service reaches of the server.
impl crate::host::LocalServer for Server {
    fn rooms(&self) -> &Rooms {
        &self.rooms
    }

    fn users(&self) -> &Users {
        &self.users
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn e2ee(&self) -> &E2ee {
        &self.e2ee
    }

    fn server_name(&self) -> &ruma::ServerName {
        &self.config.server_name
    }

    fn shutting_down(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutting_down.subscribe()
    }

    fn send_local_event<'a>(&'a self, sender: &'a ruma::UserId, room_id: &'a ruma::RoomId, builder: PduBuilder) -> crate::host::Sent<'a> {
        Box::pin(Server::send_local_event(self, sender, room_id, builder, None, None))
    }
}

/// The plugin host's view of the server: with the above, the key that seals its stored values.
impl crate::plugins::HostServices for Server {
    fn secrets(&self) -> &crate::secrets::SecretKey {
        &self.secrets
    }
}

/// Delayed events' view of the server: with the above, their own service, the send checks and
/// a send that carries the delayed event's removal in its write.
impl crate::delayed::DelayedHost for Server {
    fn delayed(&self) -> &crate::delayed::DelayedEvents {
        &self.delayed
    }

    fn local_events(&self) -> crate::local_events::LocalEvents<'_> {
        Server::local_events(self)
    }

    fn send_local_event_with<'a>(&'a self, sender: &'a ruma::UserId, room_id: &'a ruma::RoomId, builder: PduBuilder, records: crate::store::Batch) -> crate::host::Sent<'a> {
        Box::pin(Server::send_local_event(self, sender, room_id, builder, None, Some(records)))
    }
}

/// The clinic's view of the server: with the above, the clinic and appointments services and the
/// audit log.
impl crate::clinic::ClinicHost for Server {
    fn clinic(&self) -> &Clinic {
        &self.clinic
    }

    fn appointments(&self) -> &crate::clinic::appointments::Appointments {
        &self.appointments
    }

    fn audit(&self) -> &Audit {
        &self.audit
    }
}

/// Sync's view of the server: with the above, the notification counts and sliding-sync state.
impl crate::sync::SyncHost for Server {
    fn push(&self) -> &Push {
        &self.push
    }

    fn sliding_sync(&self) -> &crate::sync::sliding::Connections {
        &self.sliding_sync
    }
}

/// Federation's view of the server: with the above, the federation client when federation is
/// on, and whether presence is shared.
impl crate::federation::FederationHost for Server {
    fn federation(&self) -> Option<&Arc<crate::federation::Federation>> {
        self.federation.as_ref()
    }

    fn presence_enabled(&self) -> bool {
        self.config.presence.enabled
    }
}

/// Recordings' and the call warden's view of the server: with the above, the calls service and
/// the media store.
impl crate::calls::CallsHost for Server {
    fn calls(&self) -> &crate::calls::Calls {
        &self.calls
    }

    fn media(&self) -> &Media {
        &self.media
    }
}

/// Administration's view of the server: everything above and the admin state.
impl crate::admin::AdminHost for Server {
    fn admin(&self) -> &crate::admin::Admin {
        &self.admin
    }
}

#[cfg(test)]
mod tests;
