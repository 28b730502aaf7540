//! Nodes sharing one database: registration, liveness, fencing, and the stream positions they
//! allocate from one sequence.
//!
//! Positions come from the sequence `limbic_stream_positions`; each one is a row of
//! `limbic_in_flight` from its allocation until its write is finished. The watermark every node
//! serves up to is the lowest position still in flight, less one, or the sequence's last value
//! when none is. Allocations hold a shared advisory lock and the watermark's computation an
//! exclusive one, so that the computation never counts a position handed out whose in-flight row
//! it cannot see yet.
//!
//! A node holds a session advisory lock named after it for as long as it runs. A node whose lock
//! is free (its session ended: it died) or whose lease ran out is fenced by whichever node
//! notices: marked so, and its in-flight rows dropped, so the watermark moves past them. Every
//! write transaction first checks, under a share lock on its node's row, that its node is not
//! fenced; fencing takes the row's update lock, so it waits for writes in progress, and after it
//! the node commits nothing more. A position a client synced past is therefore never written.

use std::{sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client};

use super::block_on;
use crate::{
    Result, StoreError, StreamPos, Watchers,
    stream::{self, SharedPositions, advance},
};

/// How long a node's lease lasts without renewal, and how often it is renewed (and dead nodes
/// looked for).
const LEASE_SECONDS: u32 = 10;
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Advisory lock keys: the class of the per-node session locks (two-key form, the second key the
/// node name's hash) and the stream's allocation lock ("limbic" and "stream", as numbers).
pub(crate) const NODE_LOCK_CLASS: i32 = 0x6c_6d_62;
const STREAM_LOCK: i64 = 0x73_74_72_65_61_6d;
/// The channel on which finished writes (with the writer's name) and fenced nodes (with none)
/// are announced.
const CHANNEL: &str = "limbic_stream";
/// The channel on which changes of keys other nodes may keep are announced (`Batch::announce`):
/// the table's name, a space, and the key in hex (empty: anything in the table).
pub(crate) const CHANGES_CHANNEL: &str = "limbic_changed";
/// What the nodes sharing a database assume of each other: the SQL functions they share, how
/// they announce changes to what they keep (`Batch::announce`), the rules their caches follow.
/// Raised whenever nodes of the new version and the old one would be unsafe together; a node
/// refuses to start beside live nodes of another protocol. Nodes of versions before the
/// protocol existed count as protocol 0.
pub(crate) const PROTOCOL: i32 = 1;
/// The SQLSTATE the fence check raises.
const FENCED: &str = "LF001";

/// The nodes: created before the rest of the schema, to find nodes of another protocol first.
const NODES_TABLE: &str = "CREATE TABLE IF NOT EXISTS limbic_nodes (
    name text PRIMARY KEY,
    incarnation bigint NOT NULL,
    lease_until timestamptz NOT NULL,
    fenced boolean NOT NULL
);";

/// The shared tables and functions; created (or replaced) at every start, under a lock.
fn schema() -> String {
    format!(
        r#"
CREATE SEQUENCE IF NOT EXISTS limbic_stream_positions;
CREATE TABLE IF NOT EXISTS limbic_in_flight (
    pos bigint PRIMARY KEY,
    node text NOT NULL,
    incarnation bigint NOT NULL
);
CREATE OR REPLACE FUNCTION limbic_node_live(n text, i bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM limbic_nodes WHERE name = n AND incarnation = i AND NOT fenced FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'node % (incarnation %) is fenced', n, i USING ERRCODE = '{FENCED}';
    END IF;
END $$;
CREATE OR REPLACE FUNCTION limbic_allocate(n text, i bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE p bigint;
BEGIN
    -- The in-flight rows need not wait for the disk: the write that carries a position commits
    -- durably after its row, so a crash that loses the row loses that write too.
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock_shared({STREAM_LOCK});
    PERFORM limbic_node_live(n, i);
    p := nextval('limbic_stream_positions');
    INSERT INTO limbic_in_flight VALUES (p, n, i);
    RETURN p;
END $$;
CREATE OR REPLACE FUNCTION limbic_watermark() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE s bigint; m bigint;
BEGIN
    PERFORM pg_advisory_xact_lock({STREAM_LOCK});
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END INTO s FROM limbic_stream_positions;
    SELECT min(pos) - 1 INTO m FROM limbic_in_flight;
    RETURN LEAST(s, COALESCE(m, s));
END $$;
DROP FUNCTION IF EXISTS limbic_finish(bigint);
DROP FUNCTION IF EXISTS limbic_finish_all(bigint[], text);
CREATE OR REPLACE FUNCTION limbic_finish_all(ps bigint[], n text, written boolean) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    -- After a durable write a row a crash brings back only holds the watermark until the node
    -- is fenced. After an abandoned one, the watermark may pass positions whose allocation
    -- (the sequence's advance) is not on disk yet: that waits for the disk.
    IF written THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    DELETE FROM limbic_in_flight WHERE pos = ANY(ps);
    PERFORM pg_notify('{CHANNEL}', n);
    RETURN limbic_watermark();
END $$;
CREATE OR REPLACE FUNCTION limbic_reap(me text) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE r record; fenced_now integer := 0;
BEGIN
    FOR r IN SELECT name, lease_until FROM limbic_nodes WHERE NOT fenced AND name <> me FOR UPDATE SKIP LOCKED LOOP
        IF r.lease_until < now() OR pg_try_advisory_xact_lock({NODE_LOCK_CLASS}, hashtext(r.name)) THEN
            UPDATE limbic_nodes SET fenced = true WHERE name = r.name;
            DELETE FROM limbic_in_flight WHERE node = r.name;
            fenced_now := fenced_now + 1;
        END IF;
    END LOOP;
    IF fenced_now > 0 THEN
        PERFORM pg_notify('{CHANNEL}', '');
    END IF;
    RETURN fenced_now;
END $$;
"#
    )
}

/// This process among the nodes: its name and which start of that name it is.
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) incarnation: i64,
}

/// Joins the nodes of the database through `listener`, the session that holds this node's lock
/// for as long as it lives and hears the other nodes. `others_allowed: false` refuses to start
/// beside another live node.
/// `tables` creates the Limbic tables that are missing.
pub(crate) async fn join(listener: &Client, name: &str, tables: &str, others_allowed: bool) -> Result<Node> {
    let locked = listener.query_one("SELECT pg_try_advisory_lock($1, hashtext($2))", &[&NODE_LOCK_CLASS, &name]).await?;
    if !locked.get::<_, bool>(0) {
        return Err(StoreError::Locked);
    }
    // Nodes starting together create the schema one after the other; a node of another
    // protocol that still runs must not have the shared functions replaced under it.
    listener
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({STREAM_LOCK}); {NODES_TABLE} \
             ALTER TABLE limbic_nodes ADD COLUMN IF NOT EXISTS protocol integer NOT NULL DEFAULT 0;"
        ))
        .await?;
    let other = listener
        .query_opt(
            "SELECT name, protocol FROM limbic_nodes WHERE name <> $1 AND protocol <> $2 AND NOT fenced AND lease_until > now() \
             AND NOT pg_try_advisory_xact_lock($3, hashtext(name)) LIMIT 1",
            &[&name, &PROTOCOL, &NODE_LOCK_CLASS],
        )
        .await;
    if !matches!(other, Ok(None)) {
        listener.batch_execute("ROLLBACK").await?;
    }
    if let Some(other) = other? {
        return Err(StoreError::OtherProtocol { node: other.get(0), theirs: other.get(1), ours: PROTOCOL });
    }
    listener.batch_execute(&format!("{tables} {} COMMIT;", schema())).await?;
    let registered = listener
        .query_one(
            &format!(
                "INSERT INTO limbic_nodes (name, incarnation, lease_until, fenced, protocol) VALUES ($1, 1, now() + interval '{LEASE_SECONDS} seconds', false, $2) \
                 ON CONFLICT (name) DO UPDATE SET incarnation = limbic_nodes.incarnation + 1, lease_until = EXCLUDED.lease_until, fenced = false, protocol = EXCLUDED.protocol \
                 RETURNING incarnation"
            ),
            &[&name, &PROTOCOL],
        )
        .await?;
    let node = Node { name: name.to_owned(), incarnation: registered.get(0) };
    // What an earlier start of this node left in flight will never be written: it has stopped.
    listener.execute("DELETE FROM limbic_in_flight WHERE node = $1 AND incarnation <> $2", &[&node.name, &node.incarnation]).await?;
    // A store moved in from the embedded engine goes on after the positions it handed out.
    let reservation = format!("SELECT v FROM {} WHERE k = $1", super::sql_table(crate::tables::GLOBAL));
    let reserved = listener.query_opt(&reservation, &[&stream::RESERVATION_KEY]).await?;
    let reserved = reserved.map(|row| stream::decode_reservation(&row.get::<_, Vec<u8>>(0))).transpose()?;
    if let Some(reserved) = reserved.and_then(|r| i64::try_from(r).ok()).filter(|r| *r > 0) {
        listener
            .execute("SELECT setval('limbic_stream_positions', $1) WHERE $1 > (SELECT last_value FROM limbic_stream_positions)", &[&reserved])
            .await?;
    }
    listener.query_one("SELECT limbic_reap($1)", &[&node.name]).await?;
    if !others_allowed {
        let other = listener.query_opt("SELECT name FROM limbic_nodes WHERE name <> $1 AND NOT fenced LIMIT 1", &[&node.name]).await?;
        if let Some(other) = other {
            listener.execute("UPDATE limbic_nodes SET fenced = true WHERE name = $1", &[&node.name]).await?;
            return Err(StoreError::OtherNode(other.get(0)));
        }
    }
    listener.batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {CHANGES_CHANNEL};")).await?;
    Ok(node)
}

/// Whether a database error is the fence check's refusal.
pub(crate) fn is_fenced(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| db.code().code() == FENCED)
}

/// The stream positions of this node, allocated and finished in the database.
pub(crate) struct SharedStream {
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) pool: Pool,
    pub(crate) node: Arc<Node>,
    pub(crate) watermark: watch::Sender<StreamPos>,
    /// Turns true once this node is fenced, or its session (whose end fences it) ended.
    pub(crate) fenced: watch::Sender<bool>,
}

/// The watermark across the nodes, now.
pub(crate) async fn watermark(pool: Pool) -> Result<StreamPos> {
    let client = pool.get().await?;
    let statement = client.prepare_cached("SELECT limbic_watermark()").await?;
    Ok(position(client.query_one(&statement, &[]).await?.get(0)))
}

/// Positions are positive in the database's `bigint`s.
fn position(value: i64) -> StreamPos {
    u64::try_from(value).unwrap_or(0)
}

impl SharedPositions for SharedStream {
    fn allocate(&self) -> Result<StreamPos> {
        let (pool, node) = (self.pool.clone(), self.node.clone());
        block_on(&self.runtime, async move {
            let client = pool.get().await?;
            let statement = client.prepare_cached("SELECT limbic_allocate($1, $2)").await?;
            Ok(position(client.query_one(&statement, &[&node.name, &node.incarnation]).await?.get(0)))
        })
    }

    fn finish(&self, positions: &[StreamPos], written: bool) {
        let (pool, node) = (self.pool.clone(), self.node.clone());
        let rows: Vec<i64> = positions.iter().map(|&pos| pos as i64).collect();
        let finished = block_on(&self.runtime, async move {
            let client = pool.get().await?;
            let statement = client.prepare_cached("SELECT limbic_finish_all($1, $2, $3)").await?;
            Ok(position(client.query_one(&statement, &[&rows, &node.name, &written]).await?.get(0)))
        });
        match finished {
            Ok(watermark) => advance(&self.watermark, watermark),
            // The rows stay: the watermark waits until this node restarts or is fenced.
            Err(error) => tracing::error!(%error, ?positions, "could not mark stream positions finished"),
        }
    }

    fn catch_up(&self) -> Result<()> {
        let now = block_on(&self.runtime, watermark(self.pool.clone()))?;
        advance(&self.watermark, now);
        Ok(())
    }
}

/// Runs the watchers of a change another node (or this one) announced: its payload is the
/// table's name, a space, and the key in hex (see [`CHANGES_CHANNEL`]).
fn changed(watchers: &Watchers, payload: &str) {
    let (table, key) = payload.split_once(' ').unwrap_or((payload, ""));
    let key = hex::decode(key).ok().filter(|key| !key.is_empty());
    watchers.run(table, key.as_deref());
}

/// Drives the node's session (its queries need it from the start), passing on the notifications
/// of the other nodes (a node already knows the watermark after its own writes) and running the
/// `watchers` of announced changes. When the session ends, `fenced` turns true: the other nodes
/// fence a node whose session ended.
pub(crate) fn drive<T>(
    mut connection: tokio_postgres::Connection<tokio_postgres::Socket, T>,
    own_name: String,
    fenced: watch::Sender<bool>,
    watchers: Arc<Watchers>,
) -> (tokio::task::JoinHandle<()>, mpsc::UnboundedReceiver<()>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (notified, notifications) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(notification)) if notification.channel() == CHANGES_CHANNEL => {
                    changed(&watchers, notification.payload());
                }
                Ok(AsyncMessage::Notification(notification)) if notification.payload() != own_name => {
                    let _ = notified.send(());
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::error!(%error, "the node's PostgreSQL session ended: other nodes will fence this one");
                    break;
                }
            }
        }
        fenced.send_replace(true);
    });
    (driver, notifications)
}

/// Renews the lease, fences dead nodes and moves the watermark when others write. Runs until the
/// engine's runtime stops.
pub(crate) async fn keep_alive(mut notifications: mpsc::UnboundedReceiver<()>, stream: Arc<SharedStream>) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                if let Err(error) = renew(&stream).await {
                    tracing::error!(%error, "could not renew this node's lease");
                }
            }
            Some(()) = notifications.recv() => {
                while notifications.try_recv().is_ok() {}
            }
        }
        match watermark(stream.pool.clone()).await {
            Ok(watermark) => advance(&stream.watermark, watermark),
            Err(error) => tracing::warn!(%error, "could not read the stream's watermark"),
        }
    }
}

async fn renew(stream: &SharedStream) -> Result<()> {
    let client = stream.pool.get().await?;
    let renewed = client
        .execute(
            &format!("UPDATE limbic_nodes SET lease_until = now() + interval '{LEASE_SECONDS} seconds' WHERE name = $1 AND incarnation = $2 AND NOT fenced"),
            &[&stream.node.name, &stream.node.incarnation],
        )
        .await?;
    if renewed == 0 {
        tracing::error!(node = %stream.node.name, "this node was fenced: it can no longer write");
        stream.fenced.send_replace(true);
    }
    client.query_one("SELECT limbic_reap($1)", &[&stream.node.name]).await?;
    Ok(())
}
