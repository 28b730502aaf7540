//! The global stream position: one monotonically increasing counter that orders everything a
//! client can sync. Positions are reserved in blocks on disk so that restarts never reuse one,
//! and a watermark tells readers up to where every allocated position has been written.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

use super::{Result, StoreError, tables};

pub type StreamPos = u64;

pub(crate) const RESERVATION_KEY: &[u8] = b"stream_reserved";
const RESERVATION_BLOCK: u64 = 1024;

struct Allocator {
    next: StreamPos,
    reserved_until: StreamPos,
    in_flight: BTreeSet<StreamPos>,
}

pub struct Streams {
    allocator: Arc<Mutex<Allocator>>,
    watermark: watch::Sender<StreamPos>,
}

impl Streams {
    /// Resumes after `reserved`, the reservation stored under [`RESERVATION_KEY`].
    pub(super) fn load(reserved: Option<Vec<u8>>) -> Result<Self> {
        let reserved = match reserved {
            Some(bytes) => u64::from_be_bytes(bytes.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt { table: "global", reason: "bad stream reservation".into() }
            })?),
            None => 0,
        };
        // Everything up to the old reservation may have been handed out before a crash.
        let start = reserved + 1;
        Ok(Self {
            allocator: Arc::new(Mutex::new(Allocator {
                next: start,
                reserved_until: reserved,
                in_flight: BTreeSet::new(),
            })),
            watermark: watch::Sender::new(reserved),
        })
    }

    /// The highest position at and below which every write is complete.
    pub fn current(&self) -> StreamPos {
        *self.watermark.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<StreamPos> {
        self.watermark.subscribe()
    }

    /// Allocates the next position. The returned ticket must live until the write carrying the
    /// position is durable; dropping it then advances the watermark.
    pub fn allocate(&self, store: &super::Store) -> Result<StreamTicket> {
        let mut alloc = self.allocator.lock().expect("stream allocator lock");
        if alloc.next > alloc.reserved_until {
            let until = alloc.next + RESERVATION_BLOCK;
            let mut batch = store.batch();
            batch.put(tables::GLOBAL, RESERVATION_KEY, &until.to_be_bytes());
            store.write(batch)?;
            alloc.reserved_until = until;
        }
        let pos = alloc.next;
        alloc.next += 1;
        alloc.in_flight.insert(pos);
        Ok(StreamTicket {
            pos,
            allocator: self.allocator.clone(),
            watermark: self.watermark.clone(),
        })
    }
}

/// A position being written. Dropping it marks the write finished (whether it succeeded or not).
pub struct StreamTicket {
    pos: StreamPos,
    allocator: Arc<Mutex<Allocator>>,
    watermark: watch::Sender<StreamPos>,
}

impl StreamTicket {
    pub fn pos(&self) -> StreamPos {
        self.pos
    }
}

impl Drop for StreamTicket {
    fn drop(&mut self) {
        let mut alloc = self.allocator.lock().expect("stream allocator lock");
        alloc.in_flight.remove(&self.pos);
        let complete = match alloc.in_flight.first() {
            Some(first) => first - 1,
            None => alloc.next - 1,
        };
        self.watermark.send_if_modified(|current| {
            if complete > *current {
                *current = complete;
                true
            } else {
                false
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::Store;

    #[test]
    fn watermark_waits_for_earlier_writes_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let last;
        {
            let store = Store::open(dir.path()).unwrap();
            let streams = store.streams();
            let start = streams.current();
            let a = streams.allocate(&store).unwrap();
            let b = streams.allocate(&store).unwrap();
            assert!(b.pos() > a.pos());
            last = b.pos();
            drop(b);
            assert_eq!(streams.current(), start, "a is still in flight");
            drop(a);
            assert_eq!(streams.current(), last);
        }
        let store = Store::open(dir.path()).unwrap();
        let next = store.streams().allocate(&store).unwrap();
        assert!(next.pos() > last, "positions are never reused after a restart");
        assert!(store.streams().current() >= last);
    }
}
