//! The global stream position: one monotonically increasing counter that orders everything a
//! client can sync, and a watermark that tells readers up to where every allocated position has
//! been written. The embedded engine reserves positions in blocks on disk, so that restarts never
//! reuse one; on PostgreSQL, nodes share a sequence and the database keeps what is in flight.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

use super::{Result, StoreError, tables};

pub type StreamPos = u64;

/// The end of the block of positions reserved on disk (the embedded engine).
pub(crate) const RESERVATION_KEY: &[u8] = b"stream_reserved";
const RESERVATION_BLOCK: u64 = 1024;

struct Allocator {
    next: StreamPos,
    reserved_until: StreamPos,
    in_flight: BTreeSet<StreamPos>,
}

/// Positions shared by several nodes (the PostgreSQL engine): each allocation and each finished
/// write goes through the database, which computes the watermark across the nodes.
pub(crate) trait SharedPositions: Send + Sync {
    fn allocate(&self) -> Result<StreamPos>;
    /// The writes carrying `positions` are finished: the watermark moves on. `written`: they
    /// were written durably (so was each position's allocation, which came before); else they
    /// were abandoned, and the move waits for the disk, so that no position a client may have
    /// synced past can be handed out again after a crash of the database.
    fn finish(&self, positions: &[StreamPos], written: bool);
    /// Moves the watermark to the database's now, rather than when the other nodes' news
    /// arrives.
    fn catch_up(&self) -> Result<()>;
}

enum Source {
    Local(Arc<Mutex<Allocator>>),
    Shared(Arc<dyn SharedPositions>),
}

pub struct Streams {
    source: Source,
    watermark: watch::Sender<StreamPos>,
}

impl Streams {
    /// Resumes after `reserved`, the reservation stored under [`RESERVATION_KEY`].
    pub(super) fn load(reserved: Option<Vec<u8>>) -> Result<Self> {
        let reserved = reserved.map(|bytes| decode_reservation(&bytes)).transpose()?.unwrap_or(0);
        // Everything up to the old reservation may have been handed out before a crash.
        let start = reserved + 1;
        Ok(Self {
            source: Source::Local(Arc::new(Mutex::new(Allocator {
                next: start,
                reserved_until: reserved,
                in_flight: BTreeSet::new(),
            }))),
            watermark: watch::Sender::new(reserved),
        })
    }

    /// Positions allocated through `positions`, whose owner moves `watermark`.
    pub(super) fn shared(positions: Arc<dyn SharedPositions>, watermark: watch::Sender<StreamPos>) -> Self {
        Self { source: Source::Shared(positions), watermark }
    }

    /// The highest position at and below which every write is complete.
    pub fn current(&self) -> StreamPos {
        *self.watermark.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<StreamPos> {
        self.watermark.subscribe()
    }

    /// Brings the watermark up to every write finished anywhere so far, so that what a client
    /// reads next includes what another client was told is written, through whichever node (a
    /// round trip on a shared store; nothing on the embedded one, whose writes are all here).
    pub fn catch_up(&self) -> Result<()> {
        match &self.source {
            Source::Shared(positions) => positions.catch_up(),
            Source::Local(_) => Ok(()),
        }
    }

    /// Allocates the next position. The returned ticket must live until the write carrying the
    /// position is durable; dropping it then advances the watermark.
    pub fn allocate(&self, store: &super::Store) -> Result<StreamTicket> {
        let allocator = match &self.source {
            Source::Shared(positions) => {
                return Ok(StreamTicket { pos: positions.allocate()?, finish: Some(Finish::Shared(positions.clone())) });
            }
            Source::Local(allocator) => allocator,
        };
        let mut alloc = allocator.lock().expect("stream allocator lock");
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
            finish: Some(Finish::Local { allocator: allocator.clone(), watermark: self.watermark.clone() }),
        })
    }
}

pub(crate) fn decode_reservation(bytes: &[u8]) -> Result<StreamPos> {
    Ok(u64::from_be_bytes(bytes.try_into().map_err(|_| StoreError::Corrupt { table: "global", reason: "bad stream reservation".into() })?))
}

/// A position being written. Dropping it marks the write finished (whether it succeeded or not).
pub struct StreamTicket {
    pos: StreamPos,
    /// `None` once [`StreamTicket::finish_all`] has finished it.
    finish: Option<Finish>,
}

enum Finish {
    Local { allocator: Arc<Mutex<Allocator>>, watermark: watch::Sender<StreamPos> },
    Shared(Arc<dyn SharedPositions>),
}

impl StreamTicket {
    pub fn pos(&self) -> StreamPos {
        self.pos
    }

    /// Finishes the tickets of one durable write together: on a shared store, in one round trip
    /// to the database instead of one each (they all come from the one store). A ticket
    /// dropped instead marks its position abandoned.
    pub fn finish_all(tickets: Vec<StreamTicket>) {
        let mut shared = None;
        let mut positions = Vec::new();
        for mut ticket in tickets {
            match ticket.finish.take() {
                Some(Finish::Shared(source)) => {
                    positions.push(ticket.pos);
                    shared = Some(source);
                }
                // A ticket of the embedded store finishes as it drops.
                local => ticket.finish = local,
            }
        }
        if let Some(source) = shared {
            source.finish(&positions, true);
        }
    }
}

impl Drop for StreamTicket {
    fn drop(&mut self) {
        let (allocator, watermark) = match &self.finish {
            None => return,
            Some(Finish::Shared(positions)) => return positions.finish(&[self.pos], false),
            Some(Finish::Local { allocator, watermark }) => (allocator, watermark),
        };
        let mut alloc = allocator.lock().expect("stream allocator lock");
        alloc.in_flight.remove(&self.pos);
        let complete = match alloc.in_flight.first() {
            Some(first) => first - 1,
            None => alloc.next - 1,
        };
        advance(watermark, complete);
    }
}

/// Moves the watermark up to `complete`, never back.
pub(crate) fn advance(watermark: &watch::Sender<StreamPos>, complete: StreamPos) {
    watermark.send_if_modified(|current| {
        if complete > *current {
            *current = complete;
            true
        } else {
            false
        }
    });
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
