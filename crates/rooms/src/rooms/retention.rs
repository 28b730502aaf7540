//! Message retention (MSC1763): expired message events are removed from every table, as
//! Synapse's retention purge does. State events and the room's latest event stay, so that the
//! room's state and DAG remain whole. The media the removed events referenced is queued for
//! the media repository, which deletes what no remaining event references (`Media::collect`).

use ruma::RoomId;

use super::Rooms;
use crate::{config::ClinicConfig, error::Result, store::StreamPos};

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Events removed per run of the job across all rooms; the rest waits for the next run.
const REMOVALS_PER_RUN: usize = 2_000;

/// How long a room keeps its messages, in milliseconds, or `None` for forever.
fn lifetime_ms(config: &ClinicConfig, retention: Option<&serde_json::Value>) -> Option<u64> {
    let field = |name: &str| retention.and_then(|r| r.get(name)).and_then(serde_json::Value::as_u64);
    let lifetime = match field("max_lifetime") {
        // A room may not ask to lose messages before its own minimum.
        Some(max) => max.max(field("min_lifetime").unwrap_or(0)),
        None if config.default_retention_days > 0 => config.default_retention_days.saturating_mul(DAY_MS),
        None => return None,
    };
    let lifetime = lifetime.max(config.min_retention_days.saturating_mul(DAY_MS));
    Some(match config.max_retention_days {
        0 => lifetime,
        days => lifetime.min(days.saturating_mul(DAY_MS)),
    })
}

impl Rooms {
    /// Removes message events older than each room's lifetime, a bounded number per call;
    /// returns how many were removed.
    pub async fn expire_events(&self, config: &ClinicConfig) -> Result<usize> {
        let now_ms: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
        let budget = REMOVALS_PER_RUN;
        let mut removed = 0;
        for room_id in self.room_ids()? {
            if removed >= budget {
                break;
            }
            let retention = self.state_content(&room_id, "m.room.retention", "")?;
            let Some(lifetime) = lifetime_ms(config, retention.as_ref()) else { continue };
            // One broken room must not stop retention in the others.
            match self.expire_room_events(&room_id, now_ms.saturating_sub(lifetime), budget - removed).await {
                Ok(count) => removed += count,
                Err(e) => tracing::warn!(%room_id, error = %e, "retention failed in room"),
            }
        }
        Ok(removed)
    }

    /// Removes up to `budget` of the room's message events sent before `cutoff_ms`, in one batch.
    async fn expire_room_events(&self, room_id: &RoomId, cutoff_ms: u64, budget: usize) -> Result<usize> {
        // The writer holds the room's lock, so the latest event cannot change underneath.
        let writer = self.writer(room_id).await?;
        let Some(record) = self.room(room_id)? else { return Ok(0) };
        let members: Vec<ruma::OwnedUserId> = self.members(room_id)?.into_iter().map(|(user_id, _)| user_id).collect();
        // Everything before the cursor is state or already removed: each run reads only what
        // arrived since, so an idle room costs next to nothing.
        let start = self.retention_cursors.lock().expect("retention cursors").get(room_id).copied().unwrap_or(0);
        let mut cursor = start;
        let mut batch = self.store.batch();
        let mut removed = 0;
        for item in self.timeline_after(room_id, start, StreamPos::MAX) {
            let (pos, event_id) = item?;
            let Some(pdu) = self.pdu(&event_id)? else { continue };
            // The timeline is in arrival order: the first young event ends the expired stretch,
            // and the latest event is never removed, so that new events have a parent.
            if u64::from(pdu.origin_server_ts.0) >= cutoff_ms
                || removed == budget
                || record.extremities.contains(&event_id)
            {
                break;
            }
            if !pdu.is_state() {
                self.stage_event_removal(&mut batch, room_id, pos, &event_id, Some(&pdu), super::admin::Removal::Expired)?;
                for indexer in &self.fanout().indexers {
                    indexer.expired(&self.store, &mut batch, room_id, &pdu, pos, &members)?;
                }
                removed += 1;
            }
            cursor = pos;
        }
        if removed > 0 {
            tokio::task::block_in_place(|| self.store.write(batch))?;
            tracing::info!(%room_id, removed, "retention removed expired events");
        }
        self.retention_cursors.lock().expect("retention cursors").insert(room_id.to_owned(), cursor);
        drop(writer);
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn lifetime_follows_the_room_then_the_default_within_bounds() {
        let mut config = ClinicConfig::default();
        assert_eq!(lifetime_ms(&config, None), None);
        assert_eq!(lifetime_ms(&config, Some(&json!({ "max_lifetime": 1500 }))), Some(1500));
        assert_eq!(lifetime_ms(&config, Some(&json!({ "max_lifetime": 1500, "min_lifetime": 4000 }))), Some(4000));
        config.default_retention_days = 2;
        assert_eq!(lifetime_ms(&config, Some(&json!({ "min_lifetime": 1 }))), Some(2 * DAY_MS));
        config.min_retention_days = 1;
        config.max_retention_days = 30;
        assert_eq!(lifetime_ms(&config, Some(&json!({ "max_lifetime": 1500 }))), Some(DAY_MS));
        assert_eq!(lifetime_ms(&config, Some(&json!({ "max_lifetime": 365 * DAY_MS }))), Some(30 * DAY_MS));
    }
}
