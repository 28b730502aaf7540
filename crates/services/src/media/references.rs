//! Which events reference which local media, kept so that retention can delete the media of the
//! messages it purges once no remaining event references them. Written in the batch that
//! persists an event, removed in the batch that purges it; a redaction keeps them, so that the
//! media of a redacted message is still found when retention purges that message.

use std::collections::BTreeSet;

use ruma::{EventId, MxcUri, ServerName};
use serde_json::Value as JsonValue;

use crate::{
    error::Result,
    events::Pdu,
    store::{Batch, Key, Store, tables},
};

/// The ids of this server's media that an event's content names, wherever they appear (`url`,
/// `info.thumbnail_url`, `file.url`, `m.new_content`, `avatar_url`, …). Encrypted content
/// names none that the server can see.
fn referenced(server_name: &ServerName, content: &JsonValue) -> BTreeSet<String> {
    fn walk(server_name: &ServerName, value: &JsonValue, found: &mut BTreeSet<String>) {
        match value {
            JsonValue::String(text) if text.starts_with("mxc://") => {
                if let Ok((server, media_id)) = <&MxcUri>::from(text.as_str()).parts()
                    && server == server_name
                    && !media_id.is_empty()
                {
                    found.insert(media_id.to_owned());
                }
            }
            JsonValue::Array(items) => items.iter().for_each(|item| walk(server_name, item, found)),
            JsonValue::Object(fields) => fields.values().for_each(|field| walk(server_name, field, found)),
            _ => {}
        }
    }
    let mut found = BTreeSet::new();
    walk(server_name, content, &mut found);
    found
}

fn reference_key(media_id: &str, event_id: &EventId) -> Vec<u8> {
    Key::new().str(media_id).str(event_id.as_str()).into_vec()
}

/// Stages the references of an event to local media, in the batch that persists it.
fn stage_references(batch: &mut Batch, server_name: &ServerName, pdu: &Pdu) -> Result<()> {
    let media_ids = referenced(server_name, &pdu.content_json());
    if media_ids.is_empty() {
        return Ok(());
    }
    for media_id in &media_ids {
        batch.put(tables::MEDIA_REFERENCES, &reference_key(media_id, &pdu.event_id), &[]);
    }
    batch.put_json(tables::EVENT_MEDIA, pdu.event_id.as_bytes(), &media_ids)?;
    Ok(())
}

/// Stages, with the purge of an event, the removal of its references; the media it referenced
/// are queued for [`super::Media::collect`], which deletes those left without reference.
fn stage_purge(store: &Store, batch: &mut Batch, event_id: &EventId) -> Result<()> {
    let Some(media_ids) = store.get_json::<BTreeSet<String>>(tables::EVENT_MEDIA, event_id.as_bytes())? else {
        return Ok(());
    };
    for media_id in &media_ids {
        batch.delete(tables::MEDIA_REFERENCES, &reference_key(media_id, event_id));
        batch.put(tables::MEDIA_UNREFERENCED, media_id.as_bytes(), &[]);
    }
    batch.delete(tables::EVENT_MEDIA, event_id.as_bytes());
    Ok(())
}

/// Whether any event still references the media.
pub(super) fn is_referenced(store: &Store, media_id: &str) -> Result<bool> {
    Ok(store.scan_prefix(tables::MEDIA_REFERENCES, Key::new().str(media_id).into_vec(), false).next().transpose()?.is_some())
}

#[cfg(test)]
mod tests {
    use ruma::server_name;
    use serde_json::json;

    use super::*;

    #[test]
    fn finds_local_mxc_uris_anywhere_in_the_content() {
        let content = json!({
            "msgtype": "m.image",
            "url": "mxc://test.local/AAAA",
            "info": { "thumbnail_url": "mxc://test.local/BBBB" },
            "m.new_content": { "file": { "url": "mxc://test.local/CCCC" } },
            "list": ["mxc://test.local/DDDD", "mxc://elsewhere.example/EEEE", "mxc://test.local/bad/id", "mxc://test.local/"],
            "body": "not a uri: mxc://test.local/FFFF",
        });
        let found: Vec<String> = referenced(server_name!("test.local"), &content).into_iter().collect();
        assert_eq!(found, ["AAAA", "BBBB", "CCCC", "DDDD"]);
    }
}

/// The references of events to local media, kept in each event's own write; retention's purge
/// queues the media no remaining event references.
pub struct MediaReferences {
    server_name: ruma::OwnedServerName,
}

impl MediaReferences {
    pub fn new(server_name: ruma::OwnedServerName) -> Self {
        Self { server_name }
    }
}

impl crate::rooms::Indexer for MediaReferences {
    fn stage(&self, _room: &dyn crate::rooms::RoomView, event: &crate::rooms::StagedEvent<'_>, staging: &mut crate::rooms::Staging<'_>) -> Result<()> {
        stage_references(staging.batch(), &self.server_name, event.pdu)
    }

    fn stage_backfilled(&self, _store: &Store, batch: &mut Batch, pdu: &Pdu) -> Result<()> {
        stage_references(batch, &self.server_name, pdu)
    }

    fn expired(&self, store: &Store, batch: &mut Batch, _room_id: &ruma::RoomId, pdu: &Pdu, _pos: crate::store::StreamPos, _members: &[ruma::OwnedUserId]) -> Result<()> {
        stage_purge(store, batch, &pdu.event_id)
    }
}
