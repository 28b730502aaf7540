//! The embedded engine: one RocksDB column family per table.

use std::path::Path;

use rocksdb::{Cache, ColumnFamilyDescriptor, DB, FlushOptions, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions};

use super::{Entry, KeyRange, Op, Result, StoreError, Table, tables};

const MEMTABLE_BUDGET: usize = 16 << 20;
const TABLE_MEMTABLE: usize = 4 << 20;
const BLOCK_CACHE: usize = 16 << 20;
/// Memtables grow in blocks of this size. RocksDB's default (an eighth of the memtable) would
/// reserve half a megabyte in each of the dozens of tables one message touches.
const MEMTABLE_BLOCK: usize = 64 << 10;
/// Memtables smaller than this together are left in memory at rest: writing them out would
/// make many tiny table files for little memory.
const MEMTABLES_WORTH_FLUSHING: u64 = 1 << 20;

pub(crate) struct RocksDb {
    db: DB,
    cache: Cache,
}

impl RocksDb {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        options.set_max_background_jobs(2);
        options.set_keep_log_file_num(4);
        // A clinic server is small: bound memtables across all tables and share one block
        // cache, so that memory stays low at rest instead of growing per table.
        options.set_db_write_buffer_size(MEMTABLE_BUDGET);
        let cache = Cache::new_lru_cache(BLOCK_CACHE);
        let descriptors = tables::ALL.iter().map(|t| {
            let mut cf = Options::default();
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
            cf.set_write_buffer_size(TABLE_MEMTABLE);
            cf.set_arena_block_size(MEMTABLE_BLOCK);
            let mut block = rocksdb::BlockBasedOptions::default();
            block.set_block_cache(&cache);
            cf.set_block_based_table_factory(&block);
            ColumnFamilyDescriptor::new(t.name(), cf)
        });
        let db = DB::open_cf_descriptors(&options, path, descriptors).map_err(|e| {
            // RocksDB reports a LOCK file held by another process as an I/O error naming it.
            if e.kind() == rocksdb::ErrorKind::IOError && e.to_string().to_lowercase().contains("lock") {
                StoreError::Locked
            } else {
                StoreError::Engine(e)
            }
        })?;
        Ok(Self { db, cache })
    }

    fn cf(&self, table: Table) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(table.name()).expect("every table is created at open")
    }

    pub(crate) fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(table), key)?)
    }

    pub(crate) fn get_many(&self, table: Table, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        let cf = self.cf(table);
        self.db.multi_get_cf(keys.iter().map(|key| (cf, *key))).into_iter().map(|value| Ok(value?)).collect()
    }

    pub(crate) fn contains(&self, table: Table, key: &[u8]) -> Result<bool> {
        Ok(self.db.get_pinned_cf(self.cf(table), key)?.is_some())
    }

    pub(crate) fn scan<'a>(
        &'a self,
        table: Table,
        range: KeyRange,
        reverse: bool,
    ) -> impl Iterator<Item = Result<Entry>> + use<'a> {
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(range.start);
        if let Some(end) = range.end {
            options.set_iterate_upper_bound(end);
        }
        let mode = if reverse { IteratorMode::End } else { IteratorMode::Start };
        self.db.iterator_cf_opt(self.cf(table), options, mode).map(|item| item.map_err(StoreError::from))
    }

    pub(crate) fn write(&self, ops: Vec<Op>, durable: bool) -> Result<()> {
        let mut batch = WriteBatch::default();
        for op in ops {
            match op {
                Op::Put { table, key, value } => batch.put_cf(self.cf(table), key, value),
                Op::Delete { table, key } => batch.delete_cf(self.cf(table), key),
                // This process alone writes here: see `Batch::expect` and `Batch::announce`.
                Op::Expect { .. } | Op::Announce { .. } => {}
            }
        }
        let mut options = WriteOptions::default();
        options.set_sync(durable);
        self.db.write_opt(batch, &options)?;
        Ok(())
    }

    pub(crate) fn approximate_size(&self) -> u64 {
        tables::ALL
            .iter()
            .filter_map(|t| {
                self.db.property_int_value_cf(self.cf(*t), "rocksdb.total-sst-files-size").ok().flatten()
            })
            .sum()
    }

    pub(crate) fn flush(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Writes the memtables out (once they hold enough to matter) and empties the block cache.
    pub(crate) fn rest(&self) -> Result<()> {
        if tables::ALL.iter().map(|t| self.memtable_bytes(*t)).sum::<u64>() >= MEMTABLES_WORTH_FLUSHING {
            let written: Vec<_> = tables::ALL.iter().filter(|t| self.memtable_entries(**t) > 0).map(|t| self.cf(*t)).collect();
            self.db.flush_cfs_opt(&written, &FlushOptions::default())?;
        }
        // Lowering the capacity evicts down to it at once; every table shares this one cache.
        let mut cache = self.cache.clone();
        cache.set_capacity(0);
        cache.set_capacity(BLOCK_CACHE);
        Ok(())
    }

    fn memtable_bytes(&self, table: Table) -> u64 {
        self.property(table, "rocksdb.cur-size-active-mem-table")
    }

    fn memtable_entries(&self, table: Table) -> u64 {
        self.property(table, "rocksdb.num-entries-active-mem-table")
    }

    fn property(&self, table: Table, name: &str) -> u64 {
        self.db.property_int_value_cf(self.cf(table), name).ok().flatten().unwrap_or(0)
    }

    pub(crate) fn compact(&self, table: Table) {
        self.db.compact_range_cf(self.cf(table), None::<&[u8]>, None::<&[u8]>);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resting_writes_memtables_out_and_empties_the_block_cache_keeping_every_value() {
        let dir = tempfile::tempdir().unwrap();
        let db = RocksDb::open(dir.path()).unwrap();
        let value = |n: u32| n.to_be_bytes().repeat(256);
        let write = |range: std::ops::Range<u32>| {
            let ops = range.map(|n| Op::Put { table: tables::TIMELINE, key: n.to_be_bytes().to_vec(), value: value(n) }).collect();
            db.write(ops, true).unwrap();
        };
        write(0..3000);
        db.write(vec![Op::Put { table: tables::USERS, key: b"@a:x".to_vec(), value: b"{}".to_vec() }], true).unwrap();
        assert!(db.memtable_bytes(tables::TIMELINE) >= MEMTABLES_WORTH_FLUSHING);

        db.rest().unwrap();
        assert_eq!((db.memtable_entries(tables::TIMELINE), db.memtable_entries(tables::USERS)), (0, 0), "both written out");
        for n in (0..3000u32).step_by(7) {
            assert_eq!(db.get(tables::TIMELINE, &n.to_be_bytes()).unwrap(), Some(value(n)));
        }
        assert_eq!(db.get(tables::USERS, b"@a:x").unwrap().as_deref(), Some(&b"{}"[..]));
        assert!(db.cache.get_usage() > 256 << 10, "the reads went through the block cache: {}", db.cache.get_usage());

        // Below the threshold the memtable stays: a tiny table file would save next to nothing.
        write(3000..3001);
        db.rest().unwrap();
        assert_eq!(db.memtable_entries(tables::TIMELINE), 1);
        // What stays is pinned by readers in use (a table's handle: a few bytes).
        assert_eq!(db.cache.get_usage(), db.cache.get_pinned_usage(), "the block cache is emptied at every rest");
        assert_eq!(db.get(tables::TIMELINE, &7u32.to_be_bytes()).unwrap(), Some(value(7)), "and fills again on demand");
    }
}
