//! Full-text search over room events: an inverted index (word token, room, stream position →
//! event id) written in the batch that persists the event, and the ranked, paginated query
//! behind /search.

use std::collections::{BTreeMap, BTreeSet};

use ruma::{OwnedEventId, OwnedUserId, UserId};
use serde_json::{Value as JsonValue, json};

use crate::{
    error::{Error, Result},
    events::Pdu,
    rooms::{EventMeta, Membership, Rooms},
    store::{Batch, Key, KeyReader, Store, StreamPos, tables},
    rooms::filter::EventFilter,
};

/// Longer "words" (hashes, base64 blobs) are not worth a key in the index.
const MAX_TOKEN_BYTES: usize = 64;
/// A query ranks at most this many of the newest matching events.
const MAX_CANDIDATES: usize = 5_000;

/// The content fields that are indexed, and that a search's `keys` choose among.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Body,
    Name,
    Topic,
}

impl Field {
    pub const ALL: [Field; 3] = [Field::Body, Field::Name, Field::Topic];

    fn content_key(self) -> &'static str {
        match self {
            Self::Body => "body",
            Self::Name => "name",
            Self::Topic => "topic",
        }
    }
}

/// Lower-cased words: maximal runs of letters and digits.
pub fn tokenize(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty() && word.len() <= MAX_TOKEN_BYTES)
        .map(str::to_lowercase)
}

/// The distinct tokens of an event's string `fields`; encrypted content has none.
fn event_tokens(pdu: &Pdu, fields: &[Field]) -> BTreeSet<String> {
    let content = pdu.content_json();
    fields
        .iter()
        .filter_map(|field| content.get(field.content_key()).and_then(JsonValue::as_str))
        .flat_map(tokenize)
        .collect()
}

fn index_keys(pdu: &Pdu, pos: StreamPos) -> impl Iterator<Item = Vec<u8>> + '_ {
    event_tokens(pdu, &Field::ALL)
        .into_iter()
        .map(move |token| Key::new().str(&token).str(pdu.room_id.as_str()).u64(pos).into_vec())
}

/// Indexes the event's words in the batch that persists it.
fn stage(batch: &mut Batch, pdu: &Pdu, pos: StreamPos) {
    for key in index_keys(pdu, pos) {
        batch.put(tables::SEARCH_INDEX, &key, pdu.event_id.as_bytes());
    }
}

/// Drops a redacted event's words, in the redaction's batch.
fn unstage(batch: &mut Batch, pdu: &Pdu, pos: StreamPos) {
    for key in index_keys(pdu, pos) {
        batch.delete(tables::SEARCH_INDEX, &key);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Most matched terms first, then the most recent.
    Rank,
    Recent,
}

pub struct Query<'a> {
    pub user_id: &'a UserId,
    pub search_term: &'a str,
    pub fields: &'a [Field],
    pub filter: &'a EventFilter,
    pub order: Order,
    pub limit: usize,
    /// The `next_batch` of the previous page.
    pub next_batch: Option<&'a str>,
}

pub struct Hit {
    pub pdu: Pdu,
    pub meta: EventMeta,
    /// How many distinct search terms the event matches.
    pub rank: usize,
}

pub struct Results {
    pub hits: Vec<Hit>,
    /// Every match, over all pages.
    pub count: usize,
    /// The search terms that matched, for clients to highlight.
    pub highlights: BTreeSet<String>,
    pub next_batch: Option<String>,
}

/// Results sort descending by this key; `next_batch` is the key of a page's last result.
type SortKey = (u64, StreamPos);

fn sort_key(hit: &Hit, order: Order) -> SortKey {
    match order {
        Order::Rank => (hit.rank as u64, hit.meta.pos),
        Order::Recent => (0, hit.meta.pos),
    }
}

fn parse_next_batch(token: &str) -> Result<SortKey> {
    token
        .split_once('_')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| Error::invalid_param(format!("invalid next_batch {token:?}")))
}

/// Events of the rooms the user is joined to (and may see) that match any search term.
pub fn search(rooms: &Rooms, query: &Query<'_>) -> Result<Results> {
    let after = query.next_batch.map(parse_next_batch).transpose()?;
    let terms: BTreeSet<String> = tokenize(query.search_term).collect();
    let joined = rooms
        .user_rooms(query.user_id)?
        .into_iter()
        .filter(|(room_id, entry)| entry.membership == Membership::Join && query.filter.allows_room(room_id.as_str()));
    let mut candidates: BTreeMap<StreamPos, OwnedEventId> = BTreeMap::new();
    for (room_id, _) in joined {
        for term in &terms {
            let prefix = Key::new().str(term).str(room_id.as_str()).into_vec();
            for item in rooms.store().scan_prefix(tables::SEARCH_INDEX, prefix, false) {
                let (key, value) = item?;
                let pos = KeyReader::new(&key).skip_str().skip_str().u64().ok_or_else(|| Error::internal("corrupt search key"))?;
                let event_id = OwnedEventId::try_from(String::from_utf8_lossy(&value).into_owned()).map_err(Error::internal)?;
                candidates.insert(pos, event_id);
            }
        }
    }

    let mut hits = Vec::new();
    let mut highlights = BTreeSet::new();
    for event_id in candidates.into_values().rev().take(MAX_CANDIDATES) {
        let Some((pdu, meta)) = rooms.visible_event(query.user_id, &event_id)? else { continue };
        if !query.filter.allows(&pdu) {
            continue;
        }
        // The index covers every field; `keys` narrows the match to the chosen ones.
        let matched: Vec<String> = event_tokens(&pdu, query.fields).intersection(&terms).cloned().collect();
        if matched.is_empty() {
            continue;
        }
        let rank = matched.len();
        highlights.extend(matched);
        hits.push(Hit { pdu, meta, rank });
    }
    let count = hits.len();
    hits.sort_by_key(|hit| std::cmp::Reverse(sort_key(hit, query.order)));
    hits.retain(|hit| after.is_none_or(|after| sort_key(hit, query.order) < after));
    let more = hits.len() > query.limit;
    hits.truncate(query.limit);
    let next_batch = hits.last().filter(|_| more).map(|hit| {
        let (a, b) = sort_key(hit, query.order);
        format!("{a}_{b}")
    });
    Ok(Results { hits, count, highlights, next_batch })
}

/// The events around a result, as the user may see them.
pub struct Context {
    /// Newest first.
    pub before: Vec<(Pdu, EventMeta)>,
    pub after: Vec<(Pdu, EventMeta)>,
    pub start: StreamPos,
    pub end: StreamPos,
    /// Display name and avatar of the senders, as of the result.
    pub profiles: BTreeMap<OwnedUserId, JsonValue>,
}

pub fn context(rooms: &Rooms, user_id: &UserId, hit: &Hit, before_limit: usize, after_limit: usize, with_profiles: bool) -> Result<Context> {
    let room_id = &hit.pdu.room_id;
    let collect = |entries: &mut dyn Iterator<Item = Result<(StreamPos, OwnedEventId)>>, limit: usize| {
        let mut events = Vec::new();
        let mut last = hit.meta.pos;
        for entry in entries {
            if events.len() >= limit {
                break;
            }
            let (pos, event_id) = entry?;
            last = pos;
            if let Some(event) = rooms.visible_event(user_id, &event_id)? {
                events.push(event);
            }
        }
        Ok::<_, Error>((events, last))
    };
    let current = rooms.store().streams().current();
    let (before, first) = collect(&mut rooms.timeline_before(room_id, hit.meta.pos - 1), before_limit)?;
    let (after, end) = collect(&mut rooms.timeline_after(room_id, hit.meta.pos, current), after_limit)?;

    let mut profiles = BTreeMap::new();
    if with_profiles {
        let state = rooms.state_map(hit.meta.state_after)?;
        let senders = before.iter().chain(&after).map(|(p, _)| &p.sender).chain([&hit.pdu.sender]);
        for sender in senders {
            if let Some(member) = state.get(&("m.room.member".to_owned(), sender.to_string()))
                && let Some(member) = rooms.pdu(member)?
            {
                let content = member.content_json();
                profiles.insert(sender.clone(), json!({ "displayname": content.get("displayname"), "avatar_url": content.get("avatar_url") }));
            }
        }
    }
    Ok(Context { before, after, start: first.saturating_sub(1), end, profiles })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_lower_cased_words() {
        let tokens: Vec<String> = tokenize("Hello, WORLD! Straße-42 über_alles").collect();
        assert_eq!(tokens, ["hello", "world", "straße", "42", "über", "alles"]);
        assert_eq!(tokenize(&"x".repeat(MAX_TOKEN_BYTES + 1)).count(), 0);
    }

    #[test]
    fn unstaging_removes_every_index_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pdu = Pdu::from_stored(&serde_json::to_vec(&json!({
            "event_id": "$e", "room_id": "!r:x", "sender": "@a:x", "origin_server_ts": 1, "type": "m.room.message",
            "content": { "body": "Hello hello world", "url": "mxc://x/not-indexed" },
            "prev_events": [], "auth_events": [], "depth": 1,
        })).unwrap())
        .unwrap();
        let entries = |store: &Store| store.scan_prefix(tables::SEARCH_INDEX, Vec::new(), false).count();
        let mut batch = store.batch();
        stage(&mut batch, &pdu, 7);
        store.write(batch).unwrap();
        assert_eq!(entries(&store), 2, "hello and world, once each");
        assert!(store.contains(tables::SEARCH_INDEX, &Key::new().str("hello").str("!r:x").u64(7).into_vec()).unwrap());
        let mut batch = store.batch();
        unstage(&mut batch, &pdu, 7);
        store.write(batch).unwrap();
        assert_eq!(entries(&store), 0);
    }

    #[test]
    fn next_batch_tokens_round_trip_and_reject_garbage() {
        assert_eq!(parse_next_batch("2_17").unwrap(), (2, 17));
        assert!(parse_next_batch("17").is_err());
        assert!(parse_next_batch("a_b").is_err());
    }
}

/// The search index, kept in each event's own write: events in, redacted or removed events out.
pub struct SearchIndex;

impl crate::rooms::Indexer for SearchIndex {
    fn stage(&self, _room: &dyn crate::rooms::RoomView, event: &crate::rooms::StagedEvent<'_>, staging: &mut crate::rooms::Staging<'_>) -> Result<()> {
        stage(staging.batch(), event.pdu, event.pos);
        Ok(())
    }

    fn unstage(&self, _store: &Store, batch: &mut Batch, pdu: &Pdu, pos: StreamPos) {
        unstage(batch, pdu, pos);
    }
}
