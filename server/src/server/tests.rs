//! Services tested through the whole composed server: what one of them does must reach every
//! table the others keep.

use ruma::{UserId, events::TimelineEventType};
use serde_json::{Value as JsonValue, json};

use super::Server;
use crate::{
    admin::{DeleteRoom, delete_room},
    events::{DEFAULT_ROOM_VERSION, PduBuilder},
    rooms::TxnInfo,
    store::tables,
    users::local_user_id,
};

#[tokio::test(flavor = "multi_thread")]
async fn purging_leaves_nothing_of_the_room_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::open_in(dir.path());
    let [alice, bob, admin] = ["alice", "bob", "admin"].map(|name| local_user_id(name, server.server_name()).unwrap());
    for user in [&alice, &bob] {
        server.users.create(user, None, false).unwrap();
    }

    let create = PduBuilder::state("m.room.create", "", json!({}));
    let mut writer = server.rooms.new_room(DEFAULT_ROOM_VERSION, &alice, [create]).await.unwrap();
    let room_id = writer.room_id().clone();
    let message = |body: &str, relates_to: Option<JsonValue>| {
        let mut content = json!({ "msgtype": "m.text", "body": body });
        if let Some(relates_to) = relates_to {
            content["m.relates_to"] = relates_to;
        }
        PduBuilder::message(TimelineEventType::RoomMessage, content)
    };
    let mut append = |sender: &UserId, builder: PduBuilder, txn: Option<&str>| {
        let txn = txn.map(|t| TxnInfo { device_id: "DEVICE".to_owned(), txn_id: t.to_owned() });
        writer.append(sender, builder, txn).unwrap().event_id
    };
    append(&alice, PduBuilder::state("m.room.member", alice.as_str(), json!({ "membership": "join" })), None);
    append(&alice, PduBuilder::state("m.room.power_levels", "", json!({ "users": { alice.as_str(): 100 } })), None);
    append(&alice, PduBuilder::state("m.room.join_rules", "", json!({ "join_rule": "public" })), None);
    append(&bob, PduBuilder::state("m.room.member", bob.as_str(), json!({ "membership": "join" })), None);
    let root = append(&alice, message("session notes follow", None), Some("t1"));
    append(&bob, message("a threaded reply", Some(json!({ "rel_type": "m.thread", "event_id": root }))), Some("t2"));
    let edited = append(&alice, message("to be redacted", None), Some("t3"));
    append(&alice, message("* edit", Some(json!({ "rel_type": "m.replace", "event_id": edited }))), None);
    let mut redaction = PduBuilder::message(TimelineEventType::RoomRedaction, json!({ "redacts": edited }));
    redaction.redacts = Some(edited);
    append(&alice, redaction, None);
    writer.commit().unwrap();
    server.rooms.set_receipt(&room_id, "m.read", &bob, root, None).unwrap();
    let alias = ruma::OwnedRoomAliasId::try_from("#notes:test.local").unwrap();
    server.rooms.set_alias(&alias, &room_id, &alice).unwrap();
    server.rooms.set_public(&room_id, true).unwrap();

    let options = DeleteRoom { block: true, purge: true, message: None };
    let deletion = delete_room(&*server, &admin, &room_id, &options).await.unwrap();
    assert_eq!(deletion.report.kicked_users.len(), 2);
    assert_eq!(deletion.report.local_aliases, [alias]);

    // This was the only room: every table that holds rooms and events is empty now.
    for table in [
        tables::PDUS, tables::EVENT_META, tables::TIMELINE, tables::BACKFILL, tables::ROOM_STATE, tables::ROOMS,
        tables::STATE_SNAPSHOTS, tables::ROOM_SNAPSHOTS, tables::ROOM_MEMBERS, tables::USER_ROOMS, tables::TXN_IDS,
        tables::ALIASES, tables::PUBLIC_ROOMS, tables::RECEIPTS, tables::RELATIONS,
        tables::THREAD_REPLIES, tables::SEARCH_INDEX,
    ] {
        let left: Vec<_> = server.store.scan_prefix(table, Vec::new(), false).map(|item| item.unwrap().0).collect();
        assert!(left.is_empty(), "{} keeps {} entries", table.name(), left.len());
    }
    // Only the block and the append-only audit log (which must outlive a purge) name the room.
    let allowed = [tables::BLOCKED_ROOMS.name(), tables::AUDIT_LOG.name()];
    for table in tables::ALL.iter().filter(|t| !allowed.contains(&t.name())) {
        for item in server.store.scan_prefix(*table, Vec::new(), false) {
            let (key, value) = item.unwrap();
            let named = [&key, &value].iter().any(|bytes| bytes.windows(room_id.as_str().len()).any(|w| w == room_id.as_bytes()));
            assert!(!named, "{} still names the room", table.name());
        }
    }
    assert_eq!(server.rooms.blocked_by(&room_id).unwrap(), Some(admin));
}
