//! The embedded engine: one RocksDB column family per table.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions};

use super::{Entry, KeyRange, Op, Result, StoreError, Table, tables};

const MEMTABLE_BUDGET: usize = 16 << 20;
const TABLE_MEMTABLE: usize = 4 << 20;
const BLOCK_CACHE: usize = 16 << 20;

pub(crate) struct RocksDb {
    db: DB,
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
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE);
        let descriptors = tables::ALL.iter().map(|t| {
            let mut cf = Options::default();
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
            cf.set_write_buffer_size(TABLE_MEMTABLE);
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
        Ok(Self { db })
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
                // This process alone writes here: see `Batch::expect`.
                Op::Expect { .. } => {}
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

    pub(crate) fn compact(&self, table: Table) {
        self.db.compact_range_cf(self.cf(table), None::<&[u8]>, None::<&[u8]>);
    }
}
