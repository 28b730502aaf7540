//! Relations (`m.relates_to`): indexed in the batch that persists the event, read back for
//! /relations, /threads and the aggregations bundled into `unsigned.m.relations`.

use std::collections::HashSet;

use ruma::{EventId, OwnedEventId, RoomId, UserId};

use super::{EventMeta, Rooms};
use crate::{
    error::{Error, Result},
    events::Pdu,
    store::{Batch, Key, KeyReader, StreamPos, Table, tables},
};

pub const THREAD: &str = "m.thread";
pub const REPLACE: &str = "m.replace";
pub const REFERENCE: &str = "m.reference";

/// How many levels `recurse` follows relations of relations (the spec asks for at least 3).
pub const MAX_DEPTH: usize = 3;

/// The `(rel_type, parent)` of an event's `m.relates_to`; replies without a `rel_type` are no
/// relation here.
pub fn relation(pdu: &Pdu) -> Option<(String, OwnedEventId)> {
    let content = pdu.content_json();
    let relates = content.get("m.relates_to")?;
    let rel_type = relates.get("rel_type")?.as_str()?.to_owned();
    let parent = relates.get("event_id")?.as_str()?.try_into().ok()?;
    Some((rel_type, parent))
}

/// The index entries of an event: its relation, and for thread replies the thread activity.
fn index_entries(pdu: &Pdu, pos: StreamPos) -> Vec<(Table, Vec<u8>, OwnedEventId)> {
    let Some((rel_type, parent)) = relation(pdu) else { return Vec::new() };
    let room = pdu.room_id.as_str();
    let key = Key::new().str(room).str(parent.as_str()).str(&rel_type).str(&pdu.kind.to_string()).u64(pos);
    let mut entries = vec![(tables::RELATIONS, key.into_vec(), pdu.event_id.clone())];
    if rel_type == THREAD {
        entries.push((tables::THREAD_REPLIES, Key::new().str(room).u64(pos).into_vec(), parent));
    }
    entries
}

/// Indexes the event's relation in the batch that persists it.
pub(super) fn stage(batch: &mut Batch, pdu: &Pdu, pos: StreamPos) {
    for (table, key, value) in index_entries(pdu, pos) {
        batch.put(table, &key, value.as_bytes());
    }
}

/// Drops a redacted event's relation, in the redaction's batch.
pub(super) fn unstage(batch: &mut Batch, pdu: &Pdu, pos: StreamPos) {
    for (table, key, _) in index_entries(pdu, pos) {
        batch.delete(table, &key);
    }
}

/// One indexed relation of a parent.
#[derive(Clone, Debug)]
struct Child {
    pos: StreamPos,
    event_id: OwnedEventId,
    rel_type: String,
    kind: String,
}

/// What a pagination over events yields: the events and, when more follow, the next token.
pub struct Page {
    pub events: Vec<(Pdu, EventMeta)>,
    pub next: Option<StreamPos>,
}

/// Which related events a /relations request asks for, and which page of them.
pub struct RelationsQuery<'a> {
    pub user_id: &'a UserId,
    pub room_id: &'a RoomId,
    pub parent: &'a EventId,
    pub rel_type: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub recurse: bool,
    pub from: Option<StreamPos>,
    pub to: Option<StreamPos>,
    pub backward: bool,
    pub limit: usize,
}

pub struct ThreadSummary {
    pub latest: Pdu,
    /// The latest reply's own latest edit, so that clients can preview the thread as edited.
    pub latest_edit: Option<Pdu>,
    pub count: usize,
    pub participated: bool,
}

/// The aggregations bundled with an event (reactions are not bundled since spec v1.7).
pub struct Aggregations {
    pub replace: Option<Pdu>,
    pub thread: Option<ThreadSummary>,
    pub references: Vec<OwnedEventId>,
}

impl Rooms {
    /// Direct children of `parent`, of one rel_type when given, ascending by position.
    fn children_of(&self, room_id: &RoomId, parent: &EventId, rel_type: Option<&str>) -> Result<Vec<Child>> {
        let mut prefix = Key::new().str(room_id.as_str()).str(parent.as_str());
        if let Some(rel_type) = rel_type {
            prefix = prefix.str(rel_type);
        }
        let mut children = self
            .store
            .scan_prefix(tables::RELATIONS, prefix.into_vec(), false)
            .map(|item| {
                let (key, value) = item?;
                let mut reader = KeyReader::new(&key).skip_str().skip_str();
                let (Some(rel_type), Some(kind), Some(pos)) = (reader.str(), reader.str(), reader.u64()) else {
                    return Err(Error::internal("corrupt relation key"));
                };
                let event_id = OwnedEventId::try_from(String::from_utf8_lossy(&value).into_owned()).map_err(Error::internal)?;
                Ok(Child { pos, event_id, rel_type: rel_type.to_owned(), kind: kind.to_owned() })
            })
            .collect::<Result<Vec<_>>>()?;
        children.sort_by_key(|c| c.pos);
        Ok(children)
    }

    /// One page of the events relating to a parent the user may see, in the requested
    /// direction. Tokens are stream positions, as for /messages.
    pub fn relating_events(&self, query: &RelationsQuery<'_>) -> Result<Page> {
        let depth = if query.recurse { MAX_DEPTH } else { 1 };
        let mut candidates = Vec::new();
        let mut level = vec![query.parent.to_owned()];
        let mut seen = HashSet::new();
        // Relations of relations are followed whatever their type; the filters apply to the results.
        for _ in 0..depth {
            let mut next = Vec::new();
            for parent in &level {
                for child in self.children_of(query.room_id, parent, None)? {
                    if seen.insert(child.event_id.clone()) {
                        next.push(child.event_id.clone());
                        candidates.push(child);
                    }
                }
            }
            level = next;
        }
        candidates.retain(|c| {
            query.rel_type.is_none_or(|r| r == c.rel_type) && query.kind.is_none_or(|k| k == c.kind)
        });
        candidates.sort_by_key(|c| c.pos);
        if query.backward {
            candidates.reverse();
        }
        let from = query.from.unwrap_or(if query.backward { StreamPos::MAX } else { 0 });
        let in_range = |pos: StreamPos| {
            if query.backward {
                pos <= from && query.to.is_none_or(|to| pos > to)
            } else {
                pos > from && query.to.is_none_or(|to| pos <= to)
            }
        };
        let mut events = Vec::new();
        let mut boundary = from;
        for child in candidates.into_iter().filter(|c| in_range(c.pos)) {
            if events.len() == query.limit {
                return Ok(Page { events, next: Some(boundary) });
            }
            boundary = if query.backward { child.pos - 1 } else { child.pos };
            if let Some(event) = self.visible_event(query.user_id, &child.event_id)? {
                events.push(event);
            }
        }
        Ok(Page { events, next: None })
    }

    /// The aggregations of `pdu` as `user_id` may see them. Edits are not aggregated further.
    pub fn aggregations(&self, pdu: &Pdu, user_id: &UserId) -> Result<Aggregations> {
        let mut aggregations = Aggregations { replace: None, thread: None, references: Vec::new() };
        let children = self.children_of(&pdu.room_id, &pdu.event_id, None)?;
        if children.is_empty() || relation(pdu).is_some_and(|(rel_type, _)| rel_type == REPLACE) {
            return Ok(aggregations);
        }
        aggregations.replace = self.latest_edit(pdu, user_id, &children)?;
        aggregations.thread = self.thread_summary(pdu, user_id, &children)?;
        for child in children.iter().filter(|c| c.rel_type == REFERENCE) {
            if self.visible_event(user_id, &child.event_id)?.is_some() {
                aggregations.references.push(child.event_id.clone());
            }
        }
        Ok(aggregations)
    }

    /// The most recent valid replacement of `original` among its `children`: by the original's
    /// sender, of the same type, with `m.new_content`, neither a state event.
    fn latest_edit(&self, original: &Pdu, user_id: &UserId, children: &[Child]) -> Result<Option<Pdu>> {
        if original.is_state() {
            return Ok(None);
        }
        let kind = original.kind.to_string();
        let mut latest: Option<Pdu> = None;
        for child in children.iter().filter(|c| c.rel_type == REPLACE && c.kind == kind) {
            let Some((edit, _)) = self.visible_event(user_id, &child.event_id)? else { continue };
            let valid = edit.sender == original.sender
                && !edit.is_state()
                && edit.content_json().get("m.new_content").is_some_and(|c| c.is_object());
            let newer = latest
                .as_ref()
                .is_none_or(|l| (edit.origin_server_ts, &edit.event_id) > (l.origin_server_ts, &l.event_id));
            if valid && newer {
                latest = Some(edit);
            }
        }
        Ok(latest)
    }

    /// The thread rooted at `root` among its `children`, if it has replies the user may see.
    fn thread_summary(&self, root: &Pdu, user_id: &UserId, children: &[Child]) -> Result<Option<ThreadSummary>> {
        let (mut latest, mut count, mut participated) = (None, 0, root.sender == user_id);
        // Children come in position order, so the last visible reply is the latest.
        for child in children.iter().filter(|c| c.rel_type == THREAD) {
            let Some((reply, _)) = self.visible_event(user_id, &child.event_id)? else { continue };
            participated |= reply.sender == user_id;
            count += 1;
            latest = Some(reply);
        }
        let Some(latest) = latest else { return Ok(None) };
        let edits = self.children_of(&latest.room_id, &latest.event_id, Some(REPLACE))?;
        let latest_edit = self.latest_edit(&latest, user_id, &edits)?;
        Ok(Some(ThreadSummary { latest, latest_edit, count, participated }))
    }

    /// One page of the room's threads, most recently active first; `from` is a stream position
    /// (inclusive) below which to continue.
    pub fn threads(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        from: Option<StreamPos>,
        participated_only: bool,
        limit: usize,
    ) -> Result<Page> {
        let prefix = Key::new().str(room_id.as_str()).into_vec();
        let start = Key::new().str(room_id.as_str()).u64(from.unwrap_or(StreamPos::MAX)).into_vec();
        let mut seen = HashSet::new();
        let mut events = Vec::new();
        let mut boundary = from.unwrap_or(StreamPos::MAX);
        for item in self.store.scan_from(tables::THREAD_REPLIES, prefix, &start, true) {
            let (key, value) = item?;
            let pos = KeyReader::new(&key).skip_str().u64().ok_or_else(|| Error::internal("corrupt thread key"))?;
            let root = OwnedEventId::try_from(String::from_utf8_lossy(&value).into_owned()).map_err(Error::internal)?;
            // A thread is listed at its latest reply; older replies of it are passed over, and
            // a thread whose latest reply is above `from` was on an earlier page.
            if !seen.insert(root.clone()) {
                continue;
            }
            let replies = self.children_of(room_id, &root, Some(THREAD))?;
            if replies.last().is_none_or(|latest| latest.pos != pos) {
                continue;
            }
            let Some((root_pdu, root_meta)) = self.visible_event(user_id, &root)? else { continue };
            if participated_only
                && !self.thread_summary(&root_pdu, user_id, &replies)?.is_some_and(|t| t.participated)
            {
                continue;
            }
            if events.len() == limit {
                return Ok(Page { events, next: Some(boundary) });
            }
            boundary = pos - 1;
            events.push((root_pdu, root_meta));
        }
        Ok(Page { events, next: None })
    }
}
