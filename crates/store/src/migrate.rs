//! Moving a store into another engine (a clinic's RocksDB store into PostgreSQL, or back),
//! offline: every table copied in batches, then both read back and compared entry by entry.

use super::{Batch, Engine, Store, StoreError, Table, stream, tables};

/// Entries (or bytes) in one batch of the copy: small enough for memory, large enough that
/// the target's commits are not what takes the time.
const BATCH_ENTRIES: usize = 1000;
const BATCH_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the target store already holds data (table {0}): migrate into an empty one (a new RocksDB \
         directory, or a PostgreSQL database without limbic_* tables; after an interrupted \
         migration, remove what it wrote first)"
    )]
    TargetNotEmpty(&'static str),
    #[error("the copy differs from the original in table {table}: {reason}")]
    Mismatch { table: &'static str, reason: String },
}

impl Store {
    /// Copies every table into `target`, which must hold no data, and then checks that both
    /// hold the same entries. Returns how many entries each table holds. Into the embedded
    /// engine, what only nodes sharing a database keep ([`tables::SHARED_ONLY`]) stays behind.
    pub fn migrate_into(&self, target: &Store) -> Result<Vec<(Table, u64)>, MigrateError> {
        for table in tables::ALL {
            if target.scan_prefix(*table, Vec::new(), false).next().transpose()?.is_some() {
                return Err(MigrateError::TargetNotEmpty(table.name()));
            }
        }
        self.reserve_positions_handed_out()?;
        let moved: Vec<Table> = tables::ALL.iter().copied().filter(|table| target.is_shared() || !tables::SHARED_ONLY.contains(table)).collect();
        for table in &moved {
            let mut batch = Batch::default();
            let mut bytes = 0;
            for entry in self.scan_prefix(*table, Vec::new(), false) {
                let (key, value) = entry?;
                bytes += key.len() + value.len();
                batch.put(*table, &key, &value);
                if batch.ops.len() >= BATCH_ENTRIES || bytes >= BATCH_BYTES {
                    target.write(std::mem::take(&mut batch))?;
                    bytes = 0;
                }
            }
            target.write(batch)?;
        }
        moved.iter().map(|table| Ok((*table, self.compare(target, *table)?))).collect()
    }

    /// Stores the last position PostgreSQL's sequence handed out as the stream's reservation,
    /// which the copy carries: the embedded engine resumes after its reservation, so that no
    /// position a client synced past is handed out again. (The other way, a node resumes after
    /// the reservation it finds; the embedded engine keeps its own up to date.)
    fn reserve_positions_handed_out(&self) -> Result<(), MigrateError> {
        let Engine::Postgres(db) = &self.engine else { return Ok(()) };
        let handed_out = db.last_position()?;
        let reserved = self.get(tables::GLOBAL, stream::RESERVATION_KEY)?.map(|bytes| stream::decode_reservation(&bytes)).transpose()?.unwrap_or(0);
        if handed_out > reserved {
            let mut batch = Batch::default();
            batch.put(tables::GLOBAL, stream::RESERVATION_KEY, &handed_out.to_be_bytes());
            self.write(batch)?;
        }
        Ok(())
    }

    /// Reads `table` in both stores side by side: the number of entries when they are equal.
    pub(crate) fn compare(&self, other: &Store, table: Table) -> Result<u64, MigrateError> {
        let mismatch = |reason: String| MigrateError::Mismatch { table: table.name(), reason };
        let mut ours = self.scan_prefix(table, Vec::new(), false);
        let mut theirs = other.scan_prefix(table, Vec::new(), false);
        let mut count = 0;
        loop {
            match (ours.next().transpose()?, theirs.next().transpose()?) {
                (None, None) => return Ok(count),
                (Some((key, _)), None) => return Err(mismatch(format!("entry {count} ({key:x?}) is missing"))),
                (None, Some((key, _))) => return Err(mismatch(format!("entry {count} ({key:x?}) is extra"))),
                (Some(a), Some(b)) if a != b => return Err(mismatch(format!("entry {count} ({:x?}) differs", a.0))),
                _ => count += 1,
            }
        }
    }
}
