//! Storage: tables of ordered keys, atomic write batches and the global stream position, on an
//! engine: embedded RocksDB, or PostgreSQL shared by several nodes. The only module that touches
//! the engine.

mod key;
mod kept;
mod migrate;
mod postgres;
mod rocks;
mod stream;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use serde::{Serialize, de::DeserializeOwned};

pub use key::{Key, KeyReader};
pub use kept::{Announced, Kept};
pub use migrate::MigrateError;
pub use stream::{StreamPos, StreamTicket, Streams};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Engine(#[from] rocksdb::Error),
    #[error("PostgreSQL: {}", postgres_message(.0))]
    Postgres(tokio_postgres::Error),
    #[error("this node was fenced by the others (its session or its lease ended): it can no longer write")]
    Fenced,
    #[error("PostgreSQL connection pool: {0}")]
    Pool(String),
    #[error("the database engine's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the database engine stopped")]
    Unavailable,
    #[error("TLS to PostgreSQL: {0}")]
    Tls(String),
    #[error("the database is in use by another process")]
    Locked,
    #[error("node {0} uses this database, and this node was opened to be the only one")]
    OtherNode(String),
    #[error("node {node} runs on this database with cluster protocol {theirs}, and this version speaks {ours}: nodes of both are unsafe together, so stop the other nodes first (docs/SCALING.md, \"Upgrades\")")]
    OtherProtocol { node: String, theirs: i32, ours: i32 },
    #[error("another node changed table {table} first: the write's condition no longer held, and nothing was written")]
    Conflict { table: &'static str },
    #[error("the database broke a deadlock between this write and another's: nothing was written, and the write can be made again")]
    Contention,
    #[error("corrupt record in table {table}: {reason}")]
    Corrupt { table: &'static str, reason: String },
    #[error("cannot encode record for table {table}: {reason}")]
    Encode { table: &'static str, reason: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        if postgres::is_fenced(&error) {
            Self::Fenced
        } else if postgres::is_contention(&error) {
            Self::Contention
        } else {
            Self::Postgres(error)
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(error) => Self::from(error),
            other => Self::Pool(other.to_string()),
        }
    }
}

/// tokio-postgres's own message names only the kind of failure; the server's message or the
/// I/O error behind it says what went wrong.
fn postgres_message(error: &tokio_postgres::Error) -> String {
    match (error.as_db_error(), std::error::Error::source(error)) {
        (Some(db), _) => format!("{}: {}", db.severity(), db.message()),
        (None, Some(source)) => format!("{error}: {source}"),
        (None, None) => error.to_string(),
    }
}

/// A typed handle on one column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Table(&'static str);

impl Table {
    pub const fn name(self) -> &'static str {
        self.0
    }
}

/// Every table of the server. Modules own their tables; this list only creates them.
pub mod tables {
    use super::Table;

    /// Server-wide values: signing key, sequence reservations.
    pub const GLOBAL: Table = Table("global");
    /// user id -> account record
    pub const USERS: Table = Table("users");
    /// user id, device id -> device record
    pub const DEVICES: Table = Table("devices");
    /// sha256(access token) -> (user id, device id)
    pub const ACCESS_TOKENS: Table = Table("access_tokens");
    /// user id, filter id -> filter definition
    pub const FILTERS: Table = Table("filters");
    /// user id, room id ("" for global), type -> account data
    pub const ACCOUNT_DATA: Table = Table("account_data");
    /// user id -> presence
    pub const PRESENCE: Table = Table("presence");
    /// event id -> PDU
    pub const PDUS: Table = Table("pdus");
    /// event id -> event metadata (stream position, state snapshots, transaction)
    pub const EVENT_META: Table = Table("event_meta");
    /// room id, stream position -> event id
    pub const TIMELINE: Table = Table("timeline");
    /// room id, anchor stream position, order -> event id: history fetched from other servers
    /// while paginating, older than the timeline event at the anchor (lower orders older still)
    pub const BACKFILL: Table = Table("backfill");
    /// room id, event type, state key -> event id (current state)
    pub const ROOM_STATE: Table = Table("room_state");
    /// room id -> room record (version, current snapshot, extremities, depth)
    pub const ROOMS: Table = Table("rooms");
    /// snapshot id -> state snapshot (a delta against a parent)
    pub const STATE_SNAPSHOTS: Table = Table("state_snapshots");
    /// room id, snapshot id -> (): the state snapshots made at positions that are no event's
    /// (an event's branch of a fork, a state resolution), so that they go with the room
    pub const ROOM_SNAPSHOTS: Table = Table("room_snapshots");
    /// room id, user id -> membership
    pub const ROOM_MEMBERS: Table = Table("room_members");
    /// user id, room id -> the user's membership in the room, with its position
    pub const USER_ROOMS: Table = Table("user_rooms");
    /// user id, device id, transaction id -> event id
    pub const TXN_IDS: Table = Table("txn_ids");
    /// room alias -> room id
    pub const ALIASES: Table = Table("aliases");
    /// room id -> () for rooms in the public directory
    pub const PUBLIC_ROOMS: Table = Table("public_rooms");
    /// room id -> user id of the server admin who blocked the room
    pub const BLOCKED_ROOMS: Table = Table("blocked_rooms");
    /// room id, receipt type, user id -> receipt
    pub const RECEIPTS: Table = Table("receipts");
    /// room id, user id -> whether they type, until when, and the position of the change
    pub const TYPING: Table = Table("typing");
    /// room id, user id -> until when (ms, big-endian) they type: the entries still to expire
    pub const TYPING_ACTIVE: Table = Table("typing_active");
    /// nonce -> when it was issued (ms, big-endian): shared-secret registration's nonces
    pub const REGISTRATION_NONCES: Table = Table("registration_nonces");
    /// room id, parent event id, rel_type, event type, stream position -> child event id
    pub const RELATIONS: Table = Table("relations");
    /// room id, stream position of a thread reply -> thread root event id
    pub const THREAD_REPLIES: Table = Table("thread_replies");
    /// word token, room id, stream position -> event id (the search index)
    pub const SEARCH_INDEX: Table = Table("search_index");

    /// user id, device id -> the device's signed keys
    pub const DEVICE_KEYS: Table = Table("device_keys");
    /// user id, device id, "algorithm:key id" -> one-time key
    pub const ONE_TIME_KEYS: Table = Table("one_time_keys");
    /// user id, device id, algorithm -> fallback key
    pub const FALLBACK_KEYS: Table = Table("fallback_keys");
    /// user id, kind (master, self_signing, user_signing) -> cross-signing key
    pub const CROSS_SIGNING_KEYS: Table = Table("cross_signing_keys");
    /// stream position -> user id whose devices or keys changed
    pub const KEY_CHANGES: Table = Table("key_changes");
    /// user id, device id, stream position -> to-device message
    pub const TO_DEVICE: Table = Table("to_device");
    /// user id, version -> key backup version
    pub const BACKUP_VERSIONS: Table = Table("backup_versions");
    /// user id, version, room id, session id -> backed-up session key
    pub const BACKUP_KEYS: Table = Table("backup_keys");

    /// media id -> media record (uploader, created; content sha256, type, filename, size once uploaded)
    pub const MEDIA: Table = Table("media");
    /// content sha256, method, width, height -> cached thumbnail
    pub const MEDIA_THUMBNAILS: Table = Table("media_thumbnails");
    /// user id -> bytes uploaded and media ids created but not yet uploaded to
    pub const MEDIA_USAGE: Table = Table("media_usage");
    /// media id, event id -> (): the events whose content names the local media
    pub const MEDIA_REFERENCES: Table = Table("media_references");
    /// event id -> the local media ids its content names
    pub const EVENT_MEDIA: Table = Table("event_media");
    /// media id -> (): media whose references retention purged, to delete if none is left
    pub const MEDIA_UNREFERENCED: Table = Table("media_unreferenced");

    /// user id, stream position -> notification
    pub const NOTIFICATIONS: Table = Table("notifications");
    /// user id, room id, stream position -> whether the notification highlights
    pub const ROOM_NOTIFICATIONS: Table = Table("room_notifications");
    /// user id, app id, pushkey -> pusher
    pub const PUSHERS: Table = Table("pushers");

    /// sequence number -> audit log entry (hash-chained)
    pub const AUDIT_LOG: Table = Table("audit_log");

    /// user id -> verification record of a therapist
    pub const THERAPISTS: Table = Table("therapists");
    /// therapist user id, room id -> () for each live session the therapist is booked in
    pub const THERAPIST_BOOKINGS: Table = Table("therapist_bookings");

    /// session room id -> argon2 hash of its passcode
    pub const SESSION_PASSCODES: Table = Table("session_passcodes");
    /// session room id -> its private notes room id
    pub const SESSION_NOTES: Table = Table("session_notes");

    /// appointment id -> session room id (appointment links)
    pub const APPOINTMENTS: Table = Table("appointments");
    /// jti of a redeemed link token -> its expiry (seconds); each link logs in once
    pub const LINK_TOKENS_USED: Table = Table("link_tokens_used");

    /// (plugin name, key) -> value: each plugin's private key-value store
    pub const PLUGIN_KV: Table = Table("plugin_kv");
    /// stream position (u64 BE) -> event id: events awaiting the plugins' on-event
    pub const PLUGIN_OUTBOX: Table = Table("plugin_outbox");

    /// server name -> its verify keys and last key server response (federation)
    pub const SERVER_KEYS: Table = Table("server_keys");
    /// sha256 of an OpenID token -> {user_id, expires_at}
    pub const OPENID_TOKENS: Table = Table("openid_tokens");
    /// user id, expiry (ms), token hash -> (): each account's OpenID tokens, oldest first
    pub const OPENID_TOKENS_BY_USER: Table = Table("openid_tokens_by_user");
    /// (destination server, stream position) -> event id: events not yet accepted by a server
    pub const FEDERATION_OUTBOX: Table = Table("federation_outbox");
    /// (destination server, stream position) -> EDU JSON (typing, receipts) not yet accepted
    pub const FEDERATION_EDUS: Table = Table("federation_edus");
    /// room id -> the stripped state sent with an invite to (or a knock on) a room this server is
    /// not in
    pub const REMOTE_ROOM_STATE: Table = Table("remote_room_state");

    /// delay id -> a delayed event scheduled by a local user (MSC4140)
    pub const DELAYED_EVENTS: Table = Table("delayed_events");
    /// fire time (ms), delay id -> (): delayed events in the order they fall due
    pub const DELAYED_EVENTS_DUE: Table = Table("delayed_events_due");
    /// owner user id, delay id -> (): each user's delayed events
    pub const DELAYED_EVENTS_BY_OWNER: Table = Table("delayed_events_by_owner");

    /// node name -> the node's SFU: where clients reach it, its load, its last heartbeat
    /// (nodes sharing a database)
    pub const CALL_NODES: Table = Table("call_nodes");
    /// call room id -> the node whose SFU serves the room's calls, and since when
    pub const CALL_PLACEMENTS: Table = Table("call_placements");
    /// node name, call room id -> (): the calls placed on each node
    pub const CALL_NODE_ROOMS: Table = Table("call_node_rooms");
    /// action, "s:" subject or "a:" address -> a rate limit's bucket: tokens, when refilled,
    /// when full again (nodes sharing a database; one process keeps them in memory)
    pub const RATE_BUCKETS: Table = Table("rate_buckets");
    /// node name -> where the other nodes reach its client API (nodes sharing a database)
    pub const NODE_URLS: Table = Table("node_urls");

    /// What only nodes sharing a database keep: each other's SFUs and the calls placed on them,
    /// the rate limits' buckets, each other's addresses. A store moved into the embedded engine
    /// leaves them behind (one process keeps its rate limits in memory and places no calls).
    pub const SHARED_ONLY: &[Table] = &[CALL_NODES, CALL_PLACEMENTS, CALL_NODE_ROOMS, RATE_BUCKETS, NODE_URLS];

    pub const ALL: &[Table] = &[
        GLOBAL, USERS, DEVICES, ACCESS_TOKENS, FILTERS, ACCOUNT_DATA, PRESENCE, PDUS, EVENT_META,
        TIMELINE, BACKFILL, ROOM_STATE, ROOMS, STATE_SNAPSHOTS, ROOM_SNAPSHOTS, ROOM_MEMBERS, USER_ROOMS, TXN_IDS, ALIASES,
        PUBLIC_ROOMS, BLOCKED_ROOMS, RECEIPTS, TYPING, TYPING_ACTIVE, REGISTRATION_NONCES, DEVICE_KEYS, ONE_TIME_KEYS, FALLBACK_KEYS, CROSS_SIGNING_KEYS,
        KEY_CHANGES, TO_DEVICE, BACKUP_VERSIONS, BACKUP_KEYS, NOTIFICATIONS, ROOM_NOTIFICATIONS, PUSHERS,
        MEDIA, MEDIA_THUMBNAILS, MEDIA_USAGE, MEDIA_REFERENCES, EVENT_MEDIA, MEDIA_UNREFERENCED,
        RELATIONS, THREAD_REPLIES, SEARCH_INDEX, AUDIT_LOG, THERAPISTS,
        THERAPIST_BOOKINGS, SESSION_NOTES, SESSION_PASSCODES, APPOINTMENTS, LINK_TOKENS_USED,
        PLUGIN_KV, PLUGIN_OUTBOX, SERVER_KEYS, OPENID_TOKENS, OPENID_TOKENS_BY_USER, FEDERATION_OUTBOX, FEDERATION_EDUS, REMOTE_ROOM_STATE,
        DELAYED_EVENTS, DELAYED_EVENTS_DUE, DELAYED_EVENTS_BY_OWNER, CALL_NODES, CALL_PLACEMENTS, CALL_NODE_ROOMS, RATE_BUCKETS, NODE_URLS,
    ];
}

/// A key, value pair as a scan yields it.
pub type Entry = (Box<[u8]>, Box<[u8]>);

/// The keys a scan covers: from `start` (inclusive) up to `end` (exclusive; `None`: no end).
pub(crate) struct KeyRange {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl KeyRange {
    fn prefix(prefix: Vec<u8>) -> Self {
        let end = key::prefix_successor(&mut prefix.clone());
        Self { start: prefix, end }
    }
}

enum Engine {
    RocksDb(rocks::RocksDb),
    Postgres(postgres::Postgres),
}

pub struct Store {
    engine: Engine,
    streams: Streams,
    watchers: Arc<Watchers>,
    /// Batches this process has written, so that the server can tell it went idle.
    writes: AtomicU64,
}

impl Store {
    /// Opens (creating if needed) the embedded RocksDB store in `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = rocks::RocksDb::open(path)?;
        Ok(Self {
            streams: Streams::load(db.get(tables::GLOBAL, stream::RESERVATION_KEY)?)?,
            engine: Engine::RocksDb(db),
            watchers: Arc::default(),
            writes: AtomicU64::new(0),
        })
    }

    /// Connects to the PostgreSQL database at `url` with up to `pool_size` connections,
    /// creating the tables that are missing; `node_name` names the node's sessions.
    pub fn open_postgres(url: &str, pool_size: usize, node_name: &str) -> Result<Self> {
        Self::open_node(url, pool_size, node_name, false)
    }

    /// [`Self::open_postgres`], beside other live nodes if `others_allowed`.
    pub fn open_node(url: &str, pool_size: usize, node_name: &str, others_allowed: bool) -> Result<Self> {
        let watchers = Arc::<Watchers>::default();
        let engine = postgres::Postgres::open(url, pool_size, node_name, others_allowed, watchers.clone())?;
        Ok(Self { streams: engine.streams(), engine: Engine::Postgres(engine), watchers, writes: AtomicU64::new(0) })
    }


    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    pub fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match &self.engine {
            Engine::RocksDb(db) => db.get(table, key),
            Engine::Postgres(db) => db.get(table, key),
        }
    }

    /// The values of `keys`, in their order: one read of the engine for all of them.
    pub fn get_many(&self, table: Table, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        match &self.engine {
            Engine::RocksDb(db) => db.get_many(table, keys),
            Engine::Postgres(db) => db.get_many(table, keys),
        }
    }

    pub fn get_json<T: DeserializeOwned>(&self, table: Table, key: &[u8]) -> Result<Option<T>> {
        self.get(table, key)?.map(|bytes| decode(table, &bytes)).transpose()
    }

    pub fn contains(&self, table: Table, key: &[u8]) -> Result<bool> {
        match &self.engine {
            Engine::RocksDb(db) => db.contains(table, key),
            // The value comes along in the same round trip; values are small.
            Engine::Postgres(db) => Ok(db.get(table, key)?.is_some()),
        }
    }

    fn scan<'a>(&'a self, table: Table, range: KeyRange, reverse: bool) -> Box<dyn Iterator<Item = Result<Entry>> + 'a> {
        match &self.engine {
            Engine::RocksDb(db) => Box::new(db.scan(table, range, reverse)),
            Engine::Postgres(db) => Box::new(db.scan(table, range, reverse)),
        }
    }

    /// Entries whose key starts with `prefix`, in key order (or reverse order).
    pub fn scan_prefix<'a>(&'a self, table: Table, prefix: Vec<u8>, reverse: bool) -> impl Iterator<Item = Result<Entry>> + use<'a> {
        self.scan(table, KeyRange::prefix(prefix), reverse)
    }

    /// The first entry of each group of keys under `prefix`, in key order, where `group` gives
    /// the prefix a key shares with the rest of its group (a key it gives none for is a group of
    /// its own): one seek per group, however many entries each holds.
    pub fn first_of_each<'a>(&'a self, table: Table, prefix: Vec<u8>, group: impl Fn(&[u8]) -> Option<Vec<u8>> + 'a) -> impl Iterator<Item = Result<Entry>> + 'a {
        let mut start = Some(prefix.clone());
        std::iter::from_fn(move || {
            let from = start.take()?;
            let entry = match self.scan_from(table, prefix.clone(), &from, false).next()? {
                Ok(entry) => entry,
                Err(error) => return Some(Err(error)),
            };
            let mut past = group(&entry.0).unwrap_or_else(|| entry.0.to_vec());
            start = key::prefix_successor(&mut past);
            Some(Ok(entry))
        })
    }

    /// Entries within `prefix` from `start` (inclusive), forward or backward.
    pub fn scan_from<'a>(&'a self, table: Table, prefix: Vec<u8>, start: &[u8], reverse: bool) -> impl Iterator<Item = Result<Entry>> + use<'a> {
        let mut range = KeyRange::prefix(prefix);
        if reverse {
            // The smallest key above `start` ends the range, unless the prefix ends it sooner.
            let after_start = [start, &[0]].concat();
            if range.end.as_ref().is_none_or(|end| after_start < *end) {
                range.end = Some(after_start);
            }
        } else if start > range.start.as_slice() {
            range.start = start.to_vec();
        }
        self.scan(table, range, reverse)
    }

    /// A signing secret: the configured one, else one generated on first use and kept under
    /// `key` in the global table, so that tokens survive restarts.
    pub fn secret(&self, key: &[u8], configured: &str) -> Result<Vec<u8>> {
        if !configured.is_empty() {
            return Ok(configured.as_bytes().to_vec());
        }
        if let Some(secret) = self.get(tables::GLOBAL, key)? {
            return Ok(secret);
        }
        let secret: [u8; 64] = rand::random();
        let mut batch = self.batch();
        batch.put(tables::GLOBAL, key, &secret);
        self.write(batch)?;
        Ok(secret.to_vec())
    }

    /// The JSON records keyed `parents… child`, as (child, record), in child order.
    pub fn children<T: DeserializeOwned>(&self, table: Table, parents: &[&str]) -> Result<Vec<(String, T)>> {
        let prefix = parents.iter().fold(Key::new(), |key, part| key.str(part)).into_vec();
        self.scan_prefix(table, prefix, false)
            .map(|item| {
                let (key, value) = item?;
                let mut reader = KeyReader::new(&key);
                for _ in parents {
                    reader.str();
                }
                let child = reader.str().map(str::to_owned).ok_or_else(|| {
                    StoreError::Corrupt { table: table.name(), reason: "malformed key".into() }
                })?;
                Ok((child, decode(table, &value)?))
            })
            .collect()
    }

    pub fn batch(&self) -> Batch {
        Batch::default()
    }

    /// Resolves once this node is fenced by the others sharing the store (its session or its
    /// lease ended): from then on it writes nothing, and should stop, to be started again.
    /// Never on the embedded store.
    pub async fn fenced(&self) {
        match &self.engine {
            Engine::RocksDb(_) => std::future::pending().await,
            Engine::Postgres(db) => {
                // The engine gone is as final as a fence.
                let _ = db.fenced().wait_for(|fenced| *fenced).await;
            }
        }
    }

    /// The names of the nodes sharing the store that are alive now (not fenced); `None` on the
    /// embedded store, which this process has to itself.
    pub fn live_nodes(&self) -> Result<Option<Vec<String>>> {
        match &self.engine {
            Engine::RocksDb(_) => Ok(None),
            Engine::Postgres(db) => db.live_nodes().map(Some),
        }
    }

    /// Runs `watcher` for each change to `table` announced ([`Batch::announce`]): by this process,
    /// once its write has committed and before the write returns; by another node sharing the
    /// store, when its notification arrives (milliseconds after its commit). On a shared store
    /// the notification reaches the writing process too, so a watcher may run twice for one
    /// change: it must only forget.
    pub fn watch(&self, table: Table, watcher: Watcher) {
        self.watchers.add(table, watcher);
    }

    /// Whether other nodes may write to the store while this process does (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.engine, Engine::Postgres(_))
    }

    /// Waits until this node leads `job` (one that must run on one node only: a sender, a
    /// sweeper) among the nodes sharing the store, and leads it from then on, until the process
    /// ends. The embedded store has one process: it leads every job at once. On a shared store a
    /// node waits while another leads the job, and takes over within seconds of its death.
    pub async fn lead(&self, job: &str) -> Result<()> {
        match &self.engine {
            Engine::RocksDb(_) => Ok(()),
            Engine::Postgres(db) => db.lead(job).await,
        }
    }

    /// Keeps the other nodes sharing the store out of `name` until the hold is dropped: theirs
    /// waits for it. One process keeps the embedded store to itself, so there a hold is nothing.
    /// A hold ends with its connection, so it keeps writers apart for speed, not for safety:
    /// writes that must never interleave also carry [`Batch::expect`].
    pub async fn hold(&self, name: &str) -> Result<Hold> {
        self.hold_as(name, false).await
    }

    /// [`Self::hold`] beside the other shared holds of `name`; it keeps out only holds that are
    /// not shared (a reader-writer lock's read side).
    pub async fn hold_shared(&self, name: &str) -> Result<Hold> {
        self.hold_as(name, true).await
    }

    async fn hold_as(&self, name: &str, shared: bool) -> Result<Hold> {
        match &self.engine {
            Engine::RocksDb(_) => Ok(Hold(None)),
            Engine::Postgres(db) => Ok(Hold(Some(db.hold(name, shared).await?))),
        }
    }

    /// [`Self::hold`] unless another node holds `name` now: `None` then, at once.
    pub fn try_hold(&self, name: &str) -> Result<Option<Hold>> {
        match &self.engine {
            Engine::RocksDb(_) => Ok(Some(Hold(None))),
            Engine::Postgres(db) => Ok(db.try_hold(name)?.map(|held| Hold(Some(held)))),
        }
    }

    /// [`Self::hold`], for code that may block (inside `block_in_place`, or off the runtime).
    pub fn hold_blocking(&self, name: &str) -> Result<Hold> {
        match &self.engine {
            Engine::RocksDb(_) => Ok(Hold(None)),
            Engine::Postgres(db) => Ok(Hold(Some(db.hold_blocking(name)?))),
        }
    }

    /// Writes the batch atomically and durably before returning.
    pub fn write(&self, batch: Batch) -> Result<()> {
        self.write_ops(batch, true)
    }

    /// Writes without waiting for the disk: for records that may be lost in a crash without
    /// harm (a delivery cursor whose loss only means a redelivery).
    pub fn write_relaxed(&self, batch: Batch) -> Result<()> {
        self.write_ops(batch, false)
    }

    fn write_ops(&self, batch: Batch, durable: bool) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        let announced: Vec<(Table, Vec<u8>)> = batch
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::Announce { table, key } => Some((*table, key.clone())),
                _ => None,
            })
            .collect();
        match &self.engine {
            Engine::RocksDb(db) => db.write(batch.ops, durable),
            Engine::Postgres(db) => db.write(batch.ops, durable),
        }?;
        for (table, key) in announced {
            self.watchers.run(table.name(), Some(&key));
        }
        Ok(())
    }

    /// Approximate on-disk size of all tables, for metrics.
    pub fn approximate_size(&self) -> u64 {
        match &self.engine {
            Engine::RocksDb(db) => db.approximate_size(),
            Engine::Postgres(db) => db.approximate_size().unwrap_or_else(|error| {
                tracing::warn!(%error, "could not read the database's size");
                0
            }),
        }
    }

    /// Makes every write so far durable, relaxed ones included (at shutdown). PostgreSQL's WAL
    /// writer does that on its own within a fraction of a second.
    pub fn flush(&self) -> Result<()> {
        match &self.engine {
            Engine::RocksDb(db) => db.flush(),
            Engine::Postgres(_) => Ok(()),
        }
    }

    /// How many batches this process has written so far; unchanged over a while means idle.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Hands back the memory the store keeps only for speed, for a node gone idle: RocksDB's
    /// memtables are written out to table files and its block cache is emptied (both fill
    /// again on demand). PostgreSQL's engine keeps nothing worth handing back.
    pub fn rest(&self) -> Result<()> {
        match &self.engine {
            Engine::RocksDb(db) => db.rest(),
            Engine::Postgres(_) => Ok(()),
        }
    }

    /// Compacts a whole table, so that values overwritten in it leave the files on disk.
    pub fn compact(&self, table: Table) -> Result<()> {
        match &self.engine {
            Engine::RocksDb(db) => {
                db.compact(table);
                Ok(())
            }
            Engine::Postgres(db) => db.compact(table),
        }
    }
}

/// What [`Store::hold`] holds, until it is dropped.
pub struct Hold(#[allow(dead_code, reason = "held for its drop")] Option<postgres::Held>);

/// One operation of a batch.
#[derive(Clone)]
pub(crate) enum Op {
    Put { table: Table, key: Vec<u8>, value: Vec<u8> },
    Delete { table: Table, key: Vec<u8> },
    /// A condition on the value before the batch (`None`: absent).
    Expect { table: Table, key: Vec<u8>, value: Option<Vec<u8>> },
    /// Tells the watchers, this process's and the other nodes', that `key` changed, once the
    /// batch commits.
    Announce { table: Table, key: Vec<u8> },
}

/// What a process runs when a key of a table it keeps things of changed ([`Batch::announce`]),
/// so that what it keeps of that key goes: the key, or `None` when anything in the table may
/// have changed.
pub type Watcher = Arc<dyn Fn(Option<&[u8]>) + Send + Sync>;

/// The watchers of a process, by table name.
#[derive(Default)]
pub(crate) struct Watchers(std::sync::RwLock<HashMap<&'static str, Vec<Watcher>>>);

impl Watchers {
    fn add(&self, table: Table, watcher: Watcher) {
        self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner).entry(table.name()).or_default().push(watcher);
    }

    /// Runs the watchers of `table` (by name) for a change to `key`.
    pub(crate) fn run(&self, table: &str, key: Option<&[u8]>) {
        let watchers = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        for watcher in watchers.get(table).into_iter().flatten() {
            watcher(key);
        }
    }
}

/// One logical write: everything in it lands together or not at all. A later operation on the
/// same key wins over an earlier one.
#[derive(Clone, Default)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    pub fn put(&mut self, table: Table, key: &[u8], value: &[u8]) {
        self.ops.push(Op::Put { table, key: key.to_vec(), value: value.to_vec() });
    }

    pub fn put_json<T: Serialize + ?Sized>(&mut self, table: Table, key: &[u8], value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| StoreError::Encode { table: table.name(), reason: e.to_string() })?;
        self.ops.push(Op::Put { table, key: key.to_vec(), value: bytes });
        Ok(())
    }

    pub fn delete(&mut self, table: Table, key: &[u8]) {
        self.ops.push(Op::Delete { table, key: key.to_vec() });
    }

    /// Makes the write conditional on `key` still holding `value` as read (`None`: still
    /// absent) when the batch commits; otherwise it fails with [`StoreError::Conflict`] and
    /// writes nothing. This guards against the other nodes of a shared store, atomically (a row
    /// lock, or an insert that waits for theirs). One process keeps the embedded store to
    /// itself and its writers apart with its own locks, so there the condition is not checked.
    pub fn expect(&mut self, table: Table, key: &[u8], value: Option<&[u8]>) {
        self.ops.push(Op::Expect { table, key: key.to_vec(), value: value.map(<[u8]>::to_vec) });
    }

    /// Tells this process, as soon as the batch commits, and the other nodes sharing the store,
    /// a moment after, that `key` of `table` changed, so that their [`Store::watch`]ers forget
    /// what they keep of it.
    pub fn announce(&mut self, table: Table, key: &[u8]) {
        self.ops.push(Op::Announce { table, key: key.to_vec() });
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Appends `other`'s operations, so that writes to several rooms land in one atomic write.
    pub fn append(&mut self, other: Batch) {
        self.ops.extend(other.ops);
    }
}

pub fn decode<T: DeserializeOwned>(table: Table, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt { table: table.name(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use limbic_test_postgres::TempPostgres;

    /// Opens a store (again) on the same data.
    type Open = Box<dyn Fn() -> Store>;

    /// Each engine, named, with a way to open a fresh store of it (reopening finds the same data).
    fn engines(purpose: &str) -> Vec<(&'static str, Open)> {
        let dir = tempfile::tempdir().unwrap();
        let url = TempPostgres::shared().new_database(purpose);
        vec![
            ("rocksdb", Box::new(move || Store::open(dir.path()).unwrap())),
            ("postgres", Box::new(move || reopen_postgres(&url))),
        ]
    }

    /// The previous store's session may not have ended on the server yet, with its lock.
    fn reopen_postgres(url: &str) -> Store {
        for _ in 0..50 {
            match Store::open_postgres(url, 4, "test") {
                Err(StoreError::Locked) => std::thread::sleep(std::time::Duration::from_millis(100)),
                other => return other.unwrap(),
            }
        }
        panic!("the database stayed locked");
    }

    fn keys(items: impl Iterator<Item = Result<Entry>>) -> Vec<Vec<u8>> {
        items.map(|item| item.unwrap().0.to_vec()).collect()
    }

    #[test]
    fn prefix_scans_follow_numeric_order_both_ways() {
        for (engine, open) in engines("prefix_scans") {
            let store = open();
            let mut batch = store.batch();
            for pos in [1u64, 255, 256, 65_536, 3] {
                let key = Key::new().str("!a:x").u64(pos).into_vec();
                batch.put(tables::TIMELINE, &key, b"a");
            }
            // Neighbouring prefixes that must not leak into the scan.
            batch.put(tables::TIMELINE, &Key::new().str("!b:x").u64(2).into_vec(), b"b");
            batch.put(tables::TIMELINE, b"!a:", b"shorter");
            store.write(batch).unwrap();

            let prefix = Key::new().str("!a:x").into_vec();
            let positions = |reverse| {
                store
                    .scan_prefix(tables::TIMELINE, prefix.clone(), reverse)
                    .map(|r| KeyReader::new(&r.unwrap().0).skip_str().u64().unwrap())
                    .collect::<Vec<_>>()
            };
            assert_eq!(positions(false), vec![1, 3, 255, 256, 65_536], "{engine}");
            assert_eq!(positions(true), vec![65_536, 256, 255, 3, 1], "{engine}");

            let from = |start: u64, reverse| {
                let start = Key::new().str("!a:x").u64(start).into_vec();
                store
                    .scan_from(tables::TIMELINE, prefix.clone(), &start, reverse)
                    .map(|r| KeyReader::new(&r.unwrap().0).skip_str().u64().unwrap())
                    .collect::<Vec<_>>()
            };
            assert_eq!(from(255, false), vec![255, 256, 65_536], "{engine}: the start is included");
            assert_eq!(from(255, true), vec![255, 3, 1], "{engine}");
            assert_eq!(from(254, true), vec![3, 1], "{engine}");
        }
    }

    #[test]
    fn long_scans_and_keys_of_every_byte_are_complete_and_ordered() {
        for (engine, open) in engines("long_scans") {
            let store = open();
            let mut batch = store.batch();
            // More entries than several of PostgreSQL's pages, and keys that end in 0x00 and
            // 0xFF, where the next page's start and the prefix's end are computed.
            let all: Vec<Vec<u8>> = (0..3000u32).map(|n| [&[0xFF][..], &n.to_be_bytes(), &[(n % 256) as u8]].concat()).collect();
            for key in &all {
                batch.put(tables::SEARCH_INDEX, key, key);
            }
            batch.put(tables::SEARCH_INDEX, b"\x00", b"before");
            store.write(batch).unwrap();

            assert_eq!(keys(store.scan_prefix(tables::SEARCH_INDEX, vec![0xFF], false)), all, "{engine}");
            let mut reversed = all.clone();
            reversed.reverse();
            assert_eq!(keys(store.scan_prefix(tables::SEARCH_INDEX, vec![0xFF], true)), reversed, "{engine}");
            assert_eq!(store.scan_prefix(tables::SEARCH_INDEX, Vec::new(), false).count(), 3001, "{engine}: an empty prefix is the whole table");
            let (first, value) = store.scan_prefix(tables::SEARCH_INDEX, Vec::new(), true).next().unwrap().unwrap();
            assert_eq!((&*first, &*value), (all[2999].as_slice(), all[2999].as_slice()), "{engine}");
        }
    }

    #[test]
    fn batches_are_atomic_the_last_operation_on_a_key_wins_and_survive_reopen() {
        for (engine, open) in engines("batches") {
            {
                let store = open();
                let mut setup = store.batch();
                setup.put(tables::USERS, b"@gone:x", b"0");
                setup.put(tables::USERS, b"@back:x", b"0");
                store.write(setup).unwrap();

                let mut first = store.batch();
                first.put_json(tables::USERS, b"@a:x", &serde_json::json!({"n": 1})).unwrap();
                first.put(tables::TIMELINE, b"t1", b"2");
                first.put(tables::TIMELINE, b"t1", b"3");
                let mut second = store.batch();
                second.delete(tables::USERS, b"@gone:x");
                second.delete(tables::USERS, b"@back:x");
                second.put(tables::USERS, b"@back:x", b"again");
                second.put(tables::PDUS, b"e1", b"4");
                second.delete(tables::PDUS, b"e1");
                first.append(second);
                first.append(store.batch());
                store.write(first).unwrap();

                let mut relaxed = store.batch();
                relaxed.put(tables::PLUGIN_OUTBOX, b"cursor", b"5");
                store.write_relaxed(relaxed).unwrap();
                store.flush().unwrap();
            }
            let store = open();
            let value: serde_json::Value = store.get_json(tables::USERS, b"@a:x").unwrap().unwrap();
            assert_eq!(value["n"], 1, "{engine}");
            assert_eq!(store.get(tables::TIMELINE, b"t1").unwrap().as_deref(), Some(&b"3"[..]), "{engine}");
            assert_eq!(store.get(tables::USERS, b"@back:x").unwrap().as_deref(), Some(&b"again"[..]), "{engine}");
            assert!(!store.contains(tables::USERS, b"@gone:x").unwrap(), "{engine}");
            assert!(!store.contains(tables::PDUS, b"e1").unwrap(), "{engine}");
            assert!(store.contains(tables::PLUGIN_OUTBOX, b"cursor").unwrap(), "{engine}");
            assert_eq!(store.get(tables::USERS, b"@nobody:x").unwrap(), None, "{engine}");
            let many = store.get_many(tables::USERS, &[b"@back:x", b"@nobody:x", b"@back:x", b"@gone:x"]).unwrap();
            assert_eq!(many, vec![Some(b"again".to_vec()), None, Some(b"again".to_vec()), None], "{engine}: in the keys' order");
            assert!(store.get_many(tables::USERS, &[]).unwrap().is_empty(), "{engine}");
        }
    }

    #[test]
    fn positions_are_never_reused_after_a_restart() {
        for (engine, open) in engines("positions") {
            let last = {
                let store = open();
                let tickets: Vec<_> = (0..3).map(|_| store.streams().allocate(&store).unwrap()).collect();
                let last = tickets[2].pos();
                drop(tickets);
                assert_eq!(store.streams().current(), last, "{engine}");
                last
            };
            let store = open();
            assert!(store.streams().allocate(&store).unwrap().pos() > last, "{engine}");
        }
    }

    #[test]
    fn a_database_in_use_refuses_a_second_process_of_the_node_and_another_node() {
        let url = TempPostgres::shared().new_database("in_use");
        let _first = reopen_postgres(&url);
        assert!(matches!(Store::open_postgres(&url, 1, "test"), Err(StoreError::Locked)));
        let refused = Store::open_postgres(&url, 1, "second");
        assert!(matches!(&refused, Err(StoreError::OtherNode(name)) if name == "test"), "{:?}", refused.err());
    }

    #[test]
    fn a_node_refuses_to_start_beside_a_live_node_of_another_protocol() {
        use postgres::nodes::{NODE_LOCK_CLASS, PROTOCOL};
        let url = TempPostgres::shared().new_database("protocols");
        let a = Store::open_node(&url, 2, "a", true).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        // A node of an earlier version: alive (its session holds its lock), protocol 0.
        let (old, connection) = runtime.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls)).unwrap();
        let session = runtime.spawn(connection);
        runtime.block_on(async {
            old.execute("SELECT pg_advisory_lock($1, hashtext('old'))", &[&NODE_LOCK_CLASS]).await.unwrap();
            old.execute("INSERT INTO limbic_nodes (name, incarnation, lease_until, fenced) VALUES ('old', 1, now() + interval '1 hour', false)", &[]).await.unwrap();
        });
        let refused = Store::open_node(&url, 2, "b", true);
        assert!(
            matches!(&refused, Err(StoreError::OtherProtocol { node, theirs: 0, ours }) if node == "old" && *ours == PROTOCOL),
            "{:?}",
            refused.err()
        );
        // The nodes of this version go on.
        let mut batch = a.batch();
        batch.put(tables::USERS, b"@u:x", b"{}");
        a.write(batch).unwrap();
        // Once the old node is gone (its session ended: its lease need not run out), the new one starts.
        drop(old);
        runtime.block_on(session).unwrap().unwrap();
        let b = Store::open_node(&url, 2, "b", true).unwrap();
        assert_eq!(b.get(tables::USERS, b"@u:x").unwrap().as_deref(), Some(&b"{}"[..]));
    }

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn two_nodes_share_one_order_and_each_serves_only_what_both_finished() {
        let url = TempPostgres::shared().new_database("two_nodes");
        let (a, b) = (Store::open_node(&url, 2, "a", true).unwrap(), Store::open_node(&url, 2, "b", true).unwrap());
        let first = a.streams().allocate(&a).unwrap();
        let second = b.streams().allocate(&b).unwrap();
        let (p1, p2) = (first.pos(), second.pos());
        assert!(p2 > p1, "one order across the nodes");
        drop(second);
        assert!(b.streams().current() < p1, "b waits for a's write still in flight");
        assert!(a.streams().current() < p1);
        let woken = b.streams().subscribe();
        drop(first);
        assert!(a.streams().current() >= p2, "a finished the last write in flight");
        wait_until("b hears that a finished", || b.streams().current() >= p2);
        assert!(woken.has_changed().unwrap(), "b's long-polls are woken");
    }

    #[test]
    fn tickets_finished_together_move_the_watermark_once_all_are_finished() {
        for (engine, open) in engines("finish_all") {
            let store = open();
            let streams = store.streams();
            let tickets: Vec<_> = (0..3).map(|_| streams.allocate(&store).unwrap()).collect();
            let last = tickets[2].pos();
            let later = streams.allocate(&store).unwrap();
            StreamTicket::finish_all(tickets);
            assert_eq!(streams.current(), last, "{engine}: up to the last of them, not the one still in flight");
            drop(later);
            streams.catch_up().unwrap();
            assert!(streams.current() > last, "{engine}");
        }
    }

    /// Nodes `a` and `b` on a new database, and its URL.
    fn two_nodes(purpose: &str) -> (String, Store, Store) {
        let url = TempPostgres::shared().new_database(purpose);
        let (a, b) = (Store::open_node(&url, 2, "a", true).unwrap(), Store::open_node(&url, 2, "b", true).unwrap());
        (url, a, b)
    }

    /// Ends node `node`'s own session on the database at `url`, as its death would.
    fn end_session(url: &str, node: &str) {
        let database = url.rsplit('/').next().unwrap();
        TempPostgres::shared().psql(database, &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'limbic {node} (node)' AND datname = current_database()"));
    }

    #[test]
    fn a_node_that_dies_is_fenced_and_no_longer_holds_the_others_back() {
        let (url, a, b) = two_nodes("fencing");
        let held = a.streams().allocate(&a).unwrap();
        let pos = held.pos();
        // a stops in the middle of a write: its ticket is never dropped, and its node session
        // ends (as the process's would).
        std::mem::forget(held);
        end_session(&url, "a");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(5), a.fenced()).await }).expect("a knows it is fenced");
        wait_until("b fences a and serves past its position", || b.streams().current() >= pos);
        let mut late = a.batch();
        late.put(tables::USERS, b"@late:x", b"{}");
        assert!(matches!(a.write(late), Err(StoreError::Fenced)), "a fenced node writes nothing");
        assert!(!b.contains(tables::USERS, b"@late:x").unwrap());
        assert!(b.streams().allocate(&b).unwrap().pos() > pos);
        drop(a);
        // Started again under its name, a is a live node again.
        let a = Store::open_node(&url, 2, "a", true).unwrap();
        let mut batch = a.batch();
        batch.put(tables::USERS, b"@again:x", b"{}");
        a.write(batch).unwrap();
        assert!(b.contains(tables::USERS, b"@again:x").unwrap());
    }

    #[test]
    fn a_conditional_write_lands_only_while_its_condition_holds_on_a_shared_store() {
        for (engine, open) in engines("conditions") {
            let store = open();
            let mut batch = store.batch();
            batch.put(tables::ROOMS, b"!r", b"v1");
            store.write(batch).unwrap();
            let conditional = |expected: Option<&[u8]>, key: &[u8]| {
                let mut batch = store.batch();
                batch.expect(tables::ROOMS, key, expected);
                batch.put(tables::ROOMS, key, b"v2");
                batch.put(tables::USERS, b"@side:x", key);
                store.write(batch)
            };
            let stale = conditional(Some(b"v0"), b"!r");
            let claimed = conditional(None, b"!r");
            if !store.is_shared() {
                // One process: its own locks keep its writers apart, and conditions are not checked.
                assert!(stale.is_ok() && claimed.is_ok(), "{engine}");
                continue;
            }
            for refused in [stale, claimed] {
                assert!(matches!(refused, Err(StoreError::Conflict { table: "rooms" })), "{engine}: {refused:?}");
            }
            assert_eq!(store.get(tables::ROOMS, b"!r").unwrap().as_deref(), Some(&b"v1"[..]), "nothing of a refused batch lands");
            assert!(!store.contains(tables::USERS, b"@side:x").unwrap());
            conditional(Some(b"v1"), b"!r").unwrap();
            assert_eq!(store.get(tables::ROOMS, b"!r").unwrap().as_deref(), Some(&b"v2"[..]));
            conditional(None, b"!new").unwrap();
            assert_eq!(store.get(tables::ROOMS, b"!new").unwrap().as_deref(), Some(&b"v2"[..]));
            // Claimed absent but not written: it stays absent.
            let mut batch = store.batch();
            batch.expect(tables::ROOMS, b"!never", None);
            batch.put(tables::USERS, b"@other:x", b"{}");
            store.write(batch).unwrap();
            assert!(!store.contains(tables::ROOMS, b"!never").unwrap() && store.contains(tables::USERS, b"@other:x").unwrap());
        }
    }

    #[test]
    fn nodes_racing_on_one_condition_land_exactly_one_write_and_a_hold_keeps_them_apart() {
        let url = TempPostgres::shared().new_database("races");
        let (a, b) = (Store::open_node(&url, 2, "a", true).unwrap(), Store::open_node(&url, 2, "b", true).unwrap());
        // Each node reads the head and writes the next entry, from many threads at once.
        let next_entry = |store: &Store| {
            let head = store.get(tables::GLOBAL, b"head").unwrap();
            let seq = head.as_deref().map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap())) + 1;
            let mut batch = store.batch();
            batch.expect(tables::GLOBAL, b"head", head.as_deref());
            batch.expect(tables::AUDIT_LOG, &seq.to_be_bytes(), None);
            batch.put(tables::GLOBAL, b"head", &seq.to_be_bytes());
            batch.put(tables::AUDIT_LOG, &seq.to_be_bytes(), b"entry");
            store.write(batch).map(|()| seq)
        };
        let landed: Vec<u64> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..8).map(|i| {
                let store = if i % 2 == 0 { &a } else { &b };
                scope.spawn(move || (0..10).filter_map(|_| match next_entry(store) {
                    Ok(seq) => Some(seq),
                    Err(StoreError::Conflict { .. } | StoreError::Contention) => None,
                    Err(other) => panic!("{other}"),
                }).collect::<Vec<_>>())
            }).collect();
            racers.into_iter().flat_map(|racer| racer.join().unwrap()).collect()
        });
        let mut sorted = landed.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=landed.len() as u64).collect::<Vec<_>>(), "each entry written once, none lost");
        assert!(landed.len() < 80, "the writers raced, and some lost");
        assert_eq!(keys(a.scan_prefix(tables::AUDIT_LOG, Vec::new(), false)).len(), landed.len());

        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let held = a.hold("!room:x").await.unwrap();
            let other_name = b.hold("!other:x").await.unwrap();
            let waiting = tokio::spawn({
                let b = std::sync::Arc::new(Store::open_node(&url, 2, "c", true).unwrap());
                async move { b.hold("!room:x").await.map(|_| ()) }
            });
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            assert!(!waiting.is_finished(), "another node's hold on the name waits");
            drop(held);
            tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.expect("taken once released").unwrap().unwrap();
            drop(other_name);
            // Shared holds go together, and keep out a hold that is not shared until they end.
            // A dropped hold ends its transaction a moment later (the rollback is sent after).
            let mut tried = None;
            for _ in 0..100 {
                tried = a.try_hold("!room:x").unwrap();
                if tried.is_some() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert!(tried.is_some(), "free again");
            assert!(b.try_hold("!room:x").unwrap().is_none(), "held: no wait, no hold");
            drop(tried);
            let (reading, also_reading) = (a.hold_shared("files").await.unwrap(), b.hold_shared("files").await.unwrap());
            let writing = tokio::spawn({
                let d = std::sync::Arc::new(Store::open_node(&url, 2, "d", true).unwrap());
                async move { d.hold("files").await.map(|_| ()) }
            });
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            assert!(!writing.is_finished());
            drop((reading, also_reading));
            tokio::time::timeout(std::time::Duration::from_secs(5), writing).await.expect("taken once both ended").unwrap().unwrap();
        });
    }

    #[test]
    fn a_change_announced_through_one_node_reaches_the_watchers_of_every_node_once_committed() {
        let postgres = TempPostgres::shared();
        let url = postgres.new_database("announcing");
        let (a, b) = (Store::open_node(&url, 2, "a", true).unwrap(), Store::open_node(&url, 2, "b", true).unwrap());
        let (heard, hearing) = std::sync::mpsc::channel::<Option<Vec<u8>>>();
        b.watch(tables::ACCOUNT_DATA, Arc::new(move |key: Option<&[u8]>| heard.send(key.map(<[u8]>::to_vec)).unwrap()));
        let next = || hearing.recv_timeout(std::time::Duration::from_secs(5)).expect("announced within 5 s");
        let quiet = || hearing.recv_timeout(std::time::Duration::from_millis(300)).is_err();

        let (writer_heard, writer_hearing) = std::sync::mpsc::channel::<Option<Vec<u8>>>();
        a.watch(tables::ACCOUNT_DATA, Arc::new(move |key: Option<&[u8]>| writer_heard.send(key.map(<[u8]>::to_vec)).unwrap()));
        let mut batch = a.batch();
        batch.put(tables::ACCOUNT_DATA, b"\0@u:x\0rules", b"{}");
        batch.announce(tables::ACCOUNT_DATA, b"\0@u:x\0rules");
        batch.announce(tables::USERS, b"@u:x");
        a.write(batch).unwrap();
        assert_eq!(writer_hearing.try_recv().ok(), Some(Some(b"\0@u:x\0rules".to_vec())), "the writer's own, before the write returns");
        assert_eq!(next(), Some(b"\0@u:x\0rules".to_vec()), "every byte of the key");
        assert!(quiet(), "another table's change is not this watcher's");

        // A batch that does not commit announces nothing.
        let mut batch = a.batch();
        batch.expect(tables::ACCOUNT_DATA, b"\0@u:x\0rules", None);
        batch.announce(tables::ACCOUNT_DATA, b"\0@u:x\0rules");
        assert!(matches!(a.write(batch), Err(StoreError::Conflict { .. })));
        assert!(quiet(), "a rolled-back write announces nothing");

        // A key too long for a notification stands for the whole table.
        let mut batch = b.batch();
        batch.announce(tables::ACCOUNT_DATA, &vec![7u8; 5_000]);
        b.write(batch).unwrap();
        // The writer's watchers run before the write returns, with the key; the notification
        // reaches the writing node too, as the whole table. Either may come first.
        let mut own = [next(), next()];
        own.sort();
        assert_eq!(own, [None, Some(vec![7u8; 5_000])], "the node's own announcements reach it, once each way");
        assert!(quiet());

        // On the embedded store, this process's own announcements, once written and before the
        // write returns: the watcher reads the value written.
        let dir = tempfile::tempdir().unwrap();
        let alone = Arc::new(Store::open(dir.path()).unwrap());
        let (heard, hearing) = std::sync::mpsc::channel::<(Option<Vec<u8>>, Option<Vec<u8>>)>();
        let store = Arc::downgrade(&alone);
        alone.watch(tables::ACCOUNT_DATA, Arc::new(move |key: Option<&[u8]>| {
            let value = store.upgrade().unwrap().get(tables::ACCOUNT_DATA, key.unwrap()).unwrap();
            heard.send((key.map(<[u8]>::to_vec), value)).unwrap();
        }));
        let mut batch = alone.batch();
        batch.put(tables::ACCOUNT_DATA, b"k", b"v");
        batch.announce(tables::ACCOUNT_DATA, b"k");
        alone.write(batch).unwrap();
        assert_eq!(hearing.try_recv().unwrap(), (Some(b"k".to_vec()), Some(b"v".to_vec())));
        assert!(hearing.try_recv().is_err(), "once");
    }

    #[test]
    fn one_node_leads_a_job_and_another_takes_over_when_it_dies() {
        let (url, a, b) = two_nodes("leading");
        let b = std::sync::Arc::new(b);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            a.lead("sender").await.unwrap();
            b.lead("other job").await.unwrap();
            let waiting = tokio::spawn({
                let b = b.clone();
                async move { b.lead("sender").await }
            });
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            assert!(!waiting.is_finished(), "one node leads a job");
            end_session(&url, "a");
            tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.expect("b takes over").unwrap().unwrap();
        });
    }

    #[test]
    fn a_node_that_stopped_waiting_for_a_job_leaves_it_to_the_others() {
        let (url, a, b) = two_nodes("leading_abandoned");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            a.lead("sender").await.unwrap();
            let gave_up = tokio::time::timeout(std::time::Duration::from_millis(300), b.lead("sender")).await;
            assert!(gave_up.is_err(), "a leads the job");
            end_session(&url, "a");
            // Long enough for b's session to try for the jobs it waits for again.
            tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
            let c = Store::open_node(&url, 2, "c", true).unwrap();
            tokio::time::timeout(std::time::Duration::from_secs(5), c.lead("sender")).await.expect("c takes the job b no longer waits for").unwrap();
        });
    }

    #[test]
    fn a_migration_copies_every_table_and_refuses_a_target_with_data() {
        let dir = tempfile::tempdir().unwrap();
        let source = Store::open(dir.path()).unwrap();
        let mut batch = source.batch();
        for n in 0..2500u32 {
            batch.put(tables::TIMELINE, &n.to_be_bytes(), &[0xFF; 100]);
        }
        batch.put(tables::USERS, b"@a:x", b"{}");
        batch.put(tables::GLOBAL, b"\x00", b"");
        source.write(batch).unwrap();
        let target = reopen_postgres(&TempPostgres::shared().new_database("migrate"));

        let counts = source.migrate_into(&target).unwrap();
        let count = |table| counts.iter().find(|(t, _)| *t == table).unwrap().1;
        assert_eq!((count(tables::TIMELINE), count(tables::USERS), count(tables::PDUS)), (2500, 1, 0));
        assert_eq!(count(tables::GLOBAL), source.scan_prefix(tables::GLOBAL, Vec::new(), false).count() as u64);
        assert_eq!(target.get(tables::TIMELINE, &2499u32.to_be_bytes()).unwrap(), Some(vec![0xFF; 100]));

        assert!(matches!(source.migrate_into(&target), Err(MigrateError::TargetNotEmpty("global"))));
        // A target that differs after the copy is caught.
        let mut tamper = target.batch();
        tamper.put(tables::USERS, b"@b:x", b"{}");
        target.write(tamper).unwrap();
        let error = source.compare(&target, tables::USERS).unwrap_err();
        assert!(matches!(error, MigrateError::Mismatch { table: "users", .. }), "{error}");
    }

    #[test]
    fn an_unreachable_database_is_a_clear_error() {
        let error = Store::open_postgres("postgresql://limbic@127.0.0.1:1/limbic", 1, "test").err().expect("no server listens on port 1");
        assert!(error.to_string().contains("PostgreSQL: error connecting to server"), "{error}");
    }

    /// `sslmode=require` encrypts the connections and checks the server's certificate against
    /// `sslrootcert`: a server with a certificate of another CA, or without TLS, is refused.
    #[test]
    fn tls_to_postgresql_checks_the_servers_certificate() {
        let ca = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            (params.self_signed(&key).unwrap(), rcgen::Issuer::new(params, key))
        };
        let (ca_certificate, issuer) = ca("test CA");
        let server_key = rcgen::KeyPair::generate().unwrap();
        let mut server_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        server_params.subject_alt_names = vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())];
        let server_certificate = server_params.signed_by(&server_key, &issuer).unwrap();
        let postgres = limbic_test_postgres::TempPostgres::start_with_tls(Some((&server_certificate.pem(), &server_key.serialize_pem())));
        let dir = tempfile::tempdir().unwrap();
        let (roots, other_roots) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
        std::fs::write(&roots, ca_certificate.pem()).unwrap();
        std::fs::write(&other_roots, ca("another CA").0.pem()).unwrap();
        let url = postgres.new_database("tls");

        let store = Store::open_postgres(&format!("{url}?sslmode=verify-full&sslrootcert={}", roots.display()), 2, "test").unwrap();
        let mut batch = store.batch();
        batch.put(tables::USERS, b"@a:x", b"{}");
        store.write(batch).unwrap();
        let encrypted = postgres.psql(url.rsplit('/').next().unwrap(), "SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name LIKE 'limbic%'");
        assert_eq!(encrypted.trim(), "t", "every connection of the node is encrypted");
        drop(store);
        let refused = Store::open_postgres(&format!("{url}?sslmode=require&sslrootcert={}", other_roots.display()), 2, "test").err().expect("a certificate of another CA is refused");
        assert!(refused.to_string().contains("certificate"), "{refused}");
        // A server without TLS is refused when TLS is required.
        let plain = limbic_test_postgres::TempPostgres::shared().new_database("no_tls");
        let refused = Store::open_postgres(&format!("{plain}?sslmode=require&sslrootcert={}", roots.display()), 2, "test").err().expect("a server without TLS is refused");
        assert!(refused.to_string().contains("TLS") || refused.to_string().contains("SSL"), "{refused}");
    }
}
