//! The shared engine: the same tables in PostgreSQL, one SQL table per Limbic table with `bytea`
//! keys (PostgreSQL orders `bytea` bytewise, as RocksDB orders keys) and one transaction per batch.
//!
//! The store's API is synchronous, like RocksDB's, and is called from the server's async tasks.
//! The connections therefore live on a runtime of their own (two threads); a call hands its
//! query to that runtime and waits for the answer, as it would wait for RocksDB's disk.

pub(crate) mod nodes;
mod tls;

pub(crate) use nodes::is_fenced;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    future::Future,
    sync::{Arc, mpsc},
};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};


use super::{Entry, KeyRange, Op, Result, StoreError, StreamPos, Streams, Table, Watchers, tables};

/// A scan's first page is small (many scans read one entry); later pages grow up to the last.
const FIRST_PAGE: i64 = 32;
const LAST_PAGE: i64 = 1024;

pub(crate) struct Postgres {
    runtime: EngineRuntime,
    pool: Pool,
    /// The connections of holds, apart from `pool`, so that holders reading meanwhile never
    /// wait for a connection another holder keeps.
    holds: Pool,
    stream: Arc<nodes::SharedStream>,
    session: Arc<Session>,
}

/// The node's own session: it holds the node's lock and the jobs it leads, and they go with it.
/// It also tries for the jobs the node waits to lead, all in one query ([`LEAD_RETRY`] apart,
/// and at once when one is added): a query per job and second came to about ten queries a
/// second from every node that leads nothing.
struct Session {
    client: tokio_postgres::Client,
    /// The jobs waited for, each with whoever waits.
    waiting: std::sync::Mutex<Vec<(String, tokio::sync::oneshot::Sender<()>)>>,
    added: tokio::sync::Notify,
}

impl Session {
    /// Tries for the jobs waited for until the engine's runtime ends; a failed try (the
    /// database out of reach) is tried again as any other.
    async fn stand(self: Arc<Self>) {
        loop {
            let jobs: Vec<String> = {
                let mut waiting = self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                // Whoever stopped waiting (a job ended before it led) is not tried for.
                waiting.retain(|(_, waiter)| !waiter.is_closed());
                waiting.iter().map(|(job, _)| job.clone()).collect()
            };
            if !jobs.is_empty() {
                match self.client.query("SELECT job FROM unnest($2::text[]) AS job WHERE pg_try_advisory_lock($1, hashtext(job))", &[&LEAD_LOCK_CLASS, &jobs]).await {
                    Ok(rows) => {
                        let won: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
                        let leading: Vec<_> = {
                            let mut waiting = self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            let (leading, still) = waiting.drain(..).partition(|(job, _)| won.contains(job));
                            *waiting = still;
                            leading
                        };
                        for (job, waiter) in leading {
                            // Won for a waiter gone since: the job is let go, for another node to lead.
                            if waiter.send(()).is_err()
                                && let Err(error) = self.client.execute("SELECT pg_advisory_unlock($1, hashtext($2))", &[&LEAD_LOCK_CLASS, &job]).await
                            {
                                tracing::warn!(%error, job, "could not let go of a job nobody here waits for any more");
                            }
                        }
                    }
                    Err(error) => tracing::warn!(%error, "could not try for the lead of the jobs this node waits for; trying again"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(LEAD_RETRY) => {}
                _ = self.added.notified() => {}
            }
        }
    }
}

/// A key longer than this is announced as a change to its whole table: a notification's payload
/// holds at most 8,000 bytes, and the key goes in hex.
const LONGEST_ANNOUNCED_KEY: usize = 3_000;

/// The SQL name of a table.
fn sql_table(table: Table) -> String {
    format!("limbic_{}", table.name())
}

impl Postgres {
    /// Connects to `url` (a `postgresql://` URL or `key=value` pairs), creates the tables that
    /// are missing and joins the nodes (`others_allowed: false`: as the only live one). Changes
    /// the nodes announce run `watchers`.
    pub(crate) fn open(url: &str, pool_size: usize, node_name: &str, others_allowed: bool, watchers: Arc<Watchers>) -> Result<Self> {
        let (mut config, tls) = tls::connection(url)?;
        // Operators see which node a session belongs to (pg_stat_activity).
        config.application_name(format!("limbic {node_name}"));
        let runtime = EngineRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("limbic-postgres")
                .enable_all()
                .build()
                .map_err(StoreError::Runtime)?,
        ));
        let new_pool = |size: usize| {
            let manager = Manager::from_config(config.clone(), tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
            Pool::builder(manager)
                .max_size(size)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(POOL_WAIT))
                .build()
                .map_err(|e| StoreError::Pool(e.to_string()))
        };
        // A holder may take a second hold (an upload: the files, then the media commits), so
        // holds get twice the connections; and a wait for one ends, rather than hangs.
        let (pool, holds) = (new_pool(pool_size.max(1))?, new_pool(pool_size.max(1) * 2)?);
        let handle = runtime.handle();
        let mut session_config = config;
        session_config.application_name(format!("limbic {node_name} (node)"));
        let tables: String = tables::ALL
            .iter()
            .map(|t| format!("CREATE TABLE IF NOT EXISTS {} (k bytea PRIMARY KEY, v bytea NOT NULL);", sql_table(*t)))
            .collect();
        let name = node_name.to_owned();
        let fenced = tokio::sync::watch::Sender::new(false);
        let session_fenced = fenced.clone();
        let (session, notifications, node) = block_on(&handle, async move {
            let (session, connection) = session_config.connect(tls).await?;
            let (driver, notifications) = nodes::drive(connection, name.clone(), session_fenced, watchers);
            match nodes::join(&session, &name, &tables, others_allowed).await {
                Ok(node) => Ok((session, notifications, node)),
                Err(error) => {
                    driver.abort();
                    Err(error)
                }
            }
        })?;
        let watermark = block_on(&handle, nodes::watermark(pool.clone()))?;
        let stream = Arc::new(nodes::SharedStream {
            runtime: handle.clone(),
            pool: pool.clone(),
            node: Arc::new(node),
            watermark: tokio::sync::watch::Sender::new(watermark),
            fenced,
        });
        handle.spawn(nodes::keep_alive(notifications, stream.clone()));
        let session = Arc::new(Session { client: session, waiting: std::sync::Mutex::default(), added: tokio::sync::Notify::new() });
        handle.spawn(session.clone().stand());
        Ok(Self { runtime, pool, holds, stream, session })
    }

    /// Turns true once this node is fenced (it can no longer write).
    pub(crate) fn fenced(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stream.fenced.subscribe()
    }

    /// The stream positions of this node among the others.
    pub(crate) fn streams(&self) -> Streams {
        Streams::shared(self.stream.clone(), self.stream.watermark.clone())
    }

    /// Runs `work` on the engine's runtime and waits for its result.
    fn run<T: Send + 'static>(&self, work: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        block_on(&self.runtime.handle(), work)
    }

    /// [`Self::run`] for async callers: they await the result rather than block their thread.
    async fn run_async<T: Send + 'static>(&self, work: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.runtime.handle().spawn(async move {
            let _ = reply.send(work.await);
        });
        answer.await.map_err(|_| StoreError::Unavailable)?
    }

    /// Takes the advisory lock named `name` in a transaction of its own, which the hold keeps
    /// open (`pg_advisory_xact_lock`): the lock ends with the transaction, when the hold is
    /// dropped or its connection breaks. Waiting for another node's gives up after
    /// [`HOLD_TIMEOUT`].
    /// `shared`: beside other shared holds of the name (`pg_advisory_xact_lock_shared`).
    fn take_hold(&self, name: &str, shared: bool) -> impl Future<Output = Result<Held>> + Send + 'static {
        let (pool, name, runtime) = (self.holds.clone(), name.to_owned(), self.runtime.handle());
        async move {
            let client = pool.get().await?;
            let function = if shared { "pg_advisory_xact_lock_shared" } else { "pg_advisory_xact_lock" };
            // One round trip: the transaction, its lock timeout and the lock (keyed by numbers,
            // so nothing of the name is in the SQL).
            let sql = format!("BEGIN; SET LOCAL lock_timeout = '{HOLD_TIMEOUT}'; SELECT {function}({HOLD_LOCK_CLASS}, {})", lock_key(&name));
            // From here on, dropping the hold ends the transaction.
            let held = Held { client: Some(client), runtime };
            held.client.as_ref().expect("just set").batch_execute(&sql).await?;
            Ok(held)
        }
    }

    pub(crate) async fn hold(&self, name: &str, shared: bool) -> Result<Held> {
        self.run_async(self.take_hold(name, shared)).await
    }

    pub(crate) fn hold_blocking(&self, name: &str) -> Result<Held> {
        self.run(self.take_hold(name, false))
    }

    /// [`Self::take_hold`] unless another node holds `name` now (`pg_try_advisory_xact_lock`);
    /// waits for nothing but the database.
    pub(crate) fn try_hold(&self, name: &str) -> Result<Option<Held>> {
        let (pool, name, runtime) = (self.holds.clone(), name.to_owned(), self.runtime.handle());
        self.run(async move {
            let client = pool.get().await?;
            let held = Held { client: Some(client), runtime };
            let sql = format!("BEGIN; SELECT pg_try_advisory_xact_lock({HOLD_LOCK_CLASS}, {})", lock_key(&name));
            let answers = held.client.as_ref().expect("just set").simple_query(&sql).await?;
            let taken = answers.iter().any(|answer| matches!(answer, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("t")));
            Ok(taken.then_some(held))
        })
    }

    /// The nodes not fenced: alive, or dead for less than the second it takes the others to
    /// notice (see [`nodes`]).
    pub(crate) fn live_nodes(&self) -> Result<Vec<String>> {
        let pool = self.pool.clone();
        self.run(async move {
            let client = pool.get().await?;
            let statement = client.prepare_cached("SELECT name FROM limbic_nodes WHERE NOT fenced ORDER BY name").await?;
            Ok(client.query(&statement, &[]).await?.iter().map(|row| row.get(0)).collect())
        })
    }

    /// The last position the database's sequence handed out (0 before the first).
    pub(crate) fn last_position(&self) -> Result<StreamPos> {
        let pool = self.pool.clone();
        self.run(async move {
            let client = pool.get().await?;
            let row = client.query_one("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM limbic_stream_positions", &[]).await?;
            Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        })
    }

    /// Waits until this node leads `job`: it takes the job's advisory lock in its own session,
    /// trying every [`LEAD_RETRY`] (with the other jobs it waits for, [`Session`]) while
    /// another node holds it. The lock is the node's until the process ends; if its session
    /// ends first, the other nodes fence the node (it writes nothing more) and one of them
    /// takes the lock.
    pub(crate) async fn lead(&self, job: &str) -> Result<()> {
        let (won, winning) = tokio::sync::oneshot::channel();
        self.session.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((job.to_owned(), won));
        self.session.added.notify_one();
        winning.await.map_err(|_| StoreError::Unavailable)
    }

    pub(crate) fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let (pool, key) = (self.pool.clone(), key.to_vec());
        self.run(async move {
            let client = pool.get().await?;
            let statement = client.prepare_cached(&format!("SELECT v FROM {} WHERE k = $1", sql_table(table))).await?;
            Ok(client.query_opt(&statement, &[&key]).await?.map(|row| row.get(0)))
        })
    }

    pub(crate) fn get_many(&self, table: Table, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let (pool, wanted) = (self.pool.clone(), keys.iter().map(|key| key.to_vec()).collect::<Vec<_>>());
        let found: HashMap<Vec<u8>, Vec<u8>> = self.run(async move {
            let client = pool.get().await?;
            let statement = client.prepare_cached(&format!("SELECT k, v FROM {} WHERE k = ANY($1)", sql_table(table))).await?;
            Ok(client.query(&statement, &[&wanted]).await?.into_iter().map(|row| (row.get(0), row.get(1))).collect())
        })?;
        Ok(keys.iter().map(|key| found.get(*key).cloned()).collect())
    }

    pub(crate) fn scan(&self, table: Table, range: KeyRange, reverse: bool) -> Scan<'_> {
        Scan { engine: self, table, range, reverse, page: VecDeque::new(), page_size: FIRST_PAGE, done: false }
    }

    /// One page of a scan: up to `limit` entries of `range`, nearest its start (or its end).
    fn page(&self, table: Table, range: &KeyRange, reverse: bool, limit: i64) -> Result<Vec<Entry>> {
        let pool = self.pool.clone();
        let (start, end) = (range.start.clone(), range.end.clone());
        self.run(async move {
            let client = pool.get().await?;
            let order = if reverse { "DESC" } else { "ASC" };
            let table = sql_table(table);
            let rows = match &end {
                Some(end) => {
                    let sql = format!("SELECT k, v FROM {table} WHERE k >= $1 AND k < $2 ORDER BY k {order} LIMIT $3");
                    client.query(&client.prepare_cached(&sql).await?, &[&start, end, &limit]).await?
                }
                None => {
                    let sql = format!("SELECT k, v FROM {table} WHERE k >= $1 ORDER BY k {order} LIMIT $2");
                    client.query(&client.prepare_cached(&sql).await?, &[&start, &limit]).await?
                }
            };
            Ok(rows
                .into_iter()
                .map(|row| (row.get::<_, Vec<u8>>(0).into_boxed_slice(), row.get::<_, Vec<u8>>(1).into_boxed_slice()))
                .collect())
        })
    }

    /// Commits the operations in one transaction; the last operation on a key wins, as in a
    /// RocksDB batch. `durable: false` commits without waiting for the WAL to reach the disk.
    pub(crate) fn write(&self, ops: Vec<Op>, durable: bool) -> Result<()> {
        let changes = TableChanges::from_ops(ops);
        let (pool, node) = (self.pool.clone(), self.stream.node.clone());
        self.run(async move {
            let mut client = pool.get().await?;
            let transaction = client.transaction().await?;
            if !durable {
                transaction.batch_execute("SET LOCAL synchronous_commit TO OFF").await?;
            }
            // The statements go out together, in this order (one connection pipelines them), so
            // that a database on another machine costs one round trip, not one per table. The
            // first checks that this node is not fenced (nodes.rs), the next ones the batch's
            // conditions, each answering whether it holds: a value as read is compared under
            // the row's lock, an absence is claimed by inserting the key (an insert waits for
            // another transaction's insert of it). Then the changes, which overwrite a claimed
            // key (or delete it, if the batch does not write it). Any failure aborts the
            // transaction, and a condition that does not hold rolls it back.
            let mut statements: Vec<(String, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>)> =
                vec![("SELECT limbic_node_live($1, $2)".to_owned(), vec![&node.name, &node.incarnation])];
            for (table, key, value) in &changes.expected {
                let table = sql_table(*table);
                statements.push(match value {
                    Some(value) => (format!("SELECT v = $2 FROM {table} WHERE k = $1 FOR UPDATE"), vec![key, value]),
                    None => (format!("INSERT INTO {table} (k, v) VALUES ($1, '') ON CONFLICT (k) DO NOTHING RETURNING true"), vec![key]),
                });
            }
            for (table, change) in &changes.by_table {
                let table = sql_table(*table);
                if !change.put_keys.is_empty() {
                    let sql = format!(
                        "INSERT INTO {table} (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                         ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
                    );
                    statements.push((sql, vec![&change.put_keys, &change.put_values]));
                }
                if !change.deletes.is_empty() {
                    statements.push((format!("DELETE FROM {table} WHERE k = ANY($1)"), vec![&change.deletes]));
                }
            }
            // Delivered to the listening nodes when (and only if) the transaction commits.
            for (table, key) in &changes.announced {
                let sql = format!("SELECT pg_notify('{}', $1 || ' ' || encode($2, 'hex'))", nodes::CHANGES_CHANNEL);
                statements.push((sql, vec![table, key]));
            }
            // Prepared first, so that nothing but the order of the queries orders their sending.
            let pipelined = &transaction;
            let prepared = futures_util::future::try_join_all(statements.iter().map(|(sql, _)| pipelined.prepare_cached(sql))).await?;
            let answers = futures_util::future::try_join_all(prepared.iter().zip(&statements).map(|(statement, (_, params))| pipelined.query(statement, params))).await?;
            let held = |rows: &Vec<tokio_postgres::Row>| matches!(rows.as_slice(), [row] if row.get::<_, bool>(0));
            if let Some(((table, _, _), _)) = changes.expected.iter().zip(&answers[1..]).find(|(_, rows)| !held(rows)) {
                return Err(StoreError::Conflict { table: table.name() });
            }
            transaction.commit().await?;
            Ok(())
        })
    }

    pub(crate) fn approximate_size(&self) -> Result<u64> {
        let pool = self.pool.clone();
        self.run(async move {
            let client = pool.get().await?;
            let row = client.query_one("SELECT pg_database_size(current_database())", &[]).await?;
            Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        })
    }

    /// Rewrites the table, so that overwritten values leave the files on disk.
    pub(crate) fn compact(&self, table: Table) -> Result<()> {
        let pool = self.pool.clone();
        self.run(async move {
            let client = pool.get().await?;
            client.batch_execute(&format!("VACUUM FULL {}", sql_table(table))).await?;
            Ok(())
        })
    }
}

/// Whether a database error is the database undoing a transaction that met others (a deadlock
/// it broke, or a serialization failure): nothing of it was written.
pub(crate) fn is_contention(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    error.code().is_some_and(|code| *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE)
}

/// How long a call waits for a free connection before it fails.
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The advisory lock class of the jobs a node leads ("led"), and how often a node that does not
/// lead one tries again.
const LEAD_LOCK_CLASS: i32 = 0x006c_6564;
const LEAD_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The advisory lock class of holds ("hld"), beside the nodes' own locks (nodes.rs).
const HOLD_LOCK_CLASS: i32 = 0x0068_6c64;
/// How long a hold waits for another node's hold on the same name.
const HOLD_TIMEOUT: &str = "30s";

/// The second key of a hold's advisory lock: the name's 32-bit FNV-1a hash (the same on every
/// node; two names that meet only share a lock).
fn lock_key(name: &str) -> i32 {
    let hash = name.bytes().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193));
    hash as i32
}

/// A hold's open transaction, which holds its lock; dropping it rolls the transaction back.
pub(crate) struct Held {
    client: Option<deadpool_postgres::Object>,
    runtime: tokio::runtime::Handle,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else { return };
        self.runtime.spawn(async move {
            if let Err(error) = client.batch_execute("ROLLBACK").await {
                // Not back into the pool with a transaction in it: the connection closes.
                tracing::warn!(%error, "could not end a hold's transaction; closing its connection");
                drop(deadpool_postgres::Object::take(client));
            }
        });
    }
}

/// The runtime of the engine's connections.
struct EngineRuntime(Option<tokio::runtime::Runtime>);

impl EngineRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("the runtime lives as long as the engine").handle().clone()
    }
}

impl Drop for EngineRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside the server's own async tasks.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn block_on<T: Send + 'static>(runtime: &tokio::runtime::Handle, work: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    let (reply, answer) = mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = reply.send(work.await);
    });
    answer.recv().map_err(|_| StoreError::Unavailable)?
}

/// A batch's conditions, and its net effect per table: what to upsert and what to delete.
#[derive(Default)]
struct TableChanges {
    expected: Vec<(Table, Vec<u8>, Option<Vec<u8>>)>,
    /// Changes to announce, by table name (an empty key: anything in the table).
    announced: Vec<(&'static str, Vec<u8>)>,
    by_table: HashMap<Table, Change>,
}

#[derive(Default)]
struct Change {
    put_keys: Vec<Vec<u8>>,
    put_values: Vec<Vec<u8>>,
    deletes: Vec<Vec<u8>>,
}

impl TableChanges {
    fn from_ops(ops: Vec<Op>) -> Self {
        let mut changes = Self::default();
        let mut seen = HashSet::new();
        // Newest first: the first operation met on a key is the one that stands.
        for op in ops.into_iter().rev() {
            let (table, key, put) = match op {
                Op::Expect { table, key, value } => {
                    changes.expected.push((table, key, value));
                    continue;
                }
                Op::Announce { table, mut key } => {
                    if key.len() > LONGEST_ANNOUNCED_KEY {
                        key.clear();
                    }
                    if !changes.announced.contains(&(table.name(), key.clone())) {
                        changes.announced.push((table.name(), key));
                    }
                    continue;
                }
                Op::Put { table, key, value } => (table, key, Some(value)),
                Op::Delete { table, key } => (table, key, None),
            };
            if !seen.insert((table, key.clone())) {
                continue;
            }
            let change = changes.by_table.entry(table).or_default();
            match put {
                Some(value) => {
                    change.put_keys.push(key);
                    change.put_values.push(value);
                }
                None => change.deletes.push(key),
            }
        }
        // A key claimed as absent that the batch does not write is left as it was: absent.
        for (table, key, value) in &changes.expected {
            if value.is_none() && seen.insert((*table, key.clone())) {
                changes.by_table.entry(*table).or_default().deletes.push(key.clone());
            }
        }
        changes
    }
}

/// A range scan read page by page (keyset paging: each page starts after the last key read).
pub(crate) struct Scan<'a> {
    engine: &'a Postgres,
    table: Table,
    range: KeyRange,
    reverse: bool,
    page: VecDeque<Entry>,
    page_size: i64,
    done: bool,
}

impl Iterator for Scan<'_> {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.page.is_empty() && !self.done {
            match self.engine.page(self.table, &self.range, self.reverse, self.page_size) {
                Ok(entries) => {
                    self.done = (entries.len() as i64) < self.page_size;
                    if let Some((last, _)) = entries.last() {
                        if self.reverse {
                            self.range.end = Some(last.to_vec());
                        } else {
                            self.range.start = [last, &[0][..]].concat();
                        }
                    }
                    self.page = entries.into();
                    self.page_size = (self.page_size * 4).min(LAST_PAGE);
                }
                Err(error) => {
                    self.done = true;
                    return Some(Err(error));
                }
            }
        }
        self.page.pop_front().map(Ok)
    }
}
