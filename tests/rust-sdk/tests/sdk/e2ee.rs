use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use limbic_rust_sdk_tests::{Server, Syncing, body, bootstrap_cross_signing, create_room, wait_for, wait_for_item};
use matrix_sdk::{
    encryption::verification::{SasVerification, Verification},
    ruma::{
        OwnedUserId, UserId,
        events::room::{
            encrypted::OriginalSyncRoomEncryptedEvent, member::MembershipState, message::RoomMessageEventContent,
        },
        serde::Raw,
    },
};
use matrix_sdk_ui::timeline::RoomExt as _;

const WAIT: Duration = Duration::from_secs(30);

/// Two matrix-sdk clients in an encrypted room: Megolm messages decrypt both ways. Both bootstrap
/// cross-signing (uploading signing keys, the other learns of them through the device-list
/// changes of sliding sync's e2ee extension), then verify each other with SAS emojis over
/// to-device messages, which leaves each side's view of the other's device and identity verified.
#[tokio::test]
async fn encrypted_messages_cross_signing_and_sas_verification() -> Result<()> {
    Server::run(async |server| {
        let alice = Syncing::start(server.user("alice").await?).await?;
        let bob = Syncing::start(server.user("bob").await?).await?;
        let alice_id: OwnedUserId = alice.client.user_id().context("alice")?.to_owned();
        let bob_id: OwnedUserId = bob.client.user_id().context("bob")?.to_owned();

        let room = create_room(&alice.client, "secret", &[bob_id.clone()], true).await?;
        let bobs_room = bob.room(room.room_id()).await?;
        bobs_room.join().await?;
        let alice_timeline = alice.room(room.room_id()).await?.timeline().await?;
        let bob_timeline = bobs_room.timeline().await?;
        // Alice sends only once bob's join is known to her, so that he gets the room key.
        wait_for("bob's join in alice's room", WAIT, || async {
            room.get_member_no_sync(&bob_id).await.ok().flatten().filter(|m| *m.membership() == MembershipState::Join)
        })
        .await?;

        alice_timeline.send(RoomMessageEventContent::text_plain("from alice, encrypted").into()).await?;
        let received = wait_for_item(&bob_timeline, "alice's encrypted message, decrypted by bob", |item| {
            body(item) == Some("from alice, encrypted")
        })
        .await?;
        ensure!(received.encryption_info().is_some(), "alice's message reached bob unencrypted");
        bob_timeline.send(RoomMessageEventContent::text_plain("from bob, encrypted").into()).await?;
        let received = wait_for_item(&alice_timeline, "bob's encrypted message, decrypted by alice", |item| {
            body(item) == Some("from bob, encrypted")
        })
        .await?;
        ensure!(received.encryption_info().is_some(), "bob's message reached alice unencrypted");

        bootstrap_cross_signing(&alice.client).await?;
        bootstrap_cross_signing(&bob.client).await?;
        for client in [&alice.client, &bob.client] {
            let status = client.encryption().cross_signing_status().await.context("cross-signing status")?;
            ensure!(status.is_complete(), "cross-signing of {:?} incomplete: {status:?}", client.user_id());
        }
        // Each learns of the other's new identity from a device-list change.
        for (client, other) in [(&alice.client, &bob_id), (&bob.client, &alice_id)] {
            wait_for(&format!("{other}'s cross-signing identity at {:?}", client.user_id()), WAIT, || async {
                client.encryption().get_user_identity(other).await.ok().flatten()
            })
            .await?;
        }

        // SAS over to-device messages, alice asking.
        let bob_device_id = bob.client.device_id().context("bob's device")?.to_owned();
        let bobs_device =
            alice.client.encryption().get_device(&bob_id, &bob_device_id).await?.context("bob's device at alice")?;
        let request = bobs_device.request_verification().await?;
        let flow_id = request.flow_id().to_owned();
        let bobs_request = wait_for("the verification request at bob", WAIT, || async {
            bob.client.encryption().get_verification_request(&alice_id, &flow_id).await
        })
        .await?;
        bobs_request.accept().await?;
        wait_for("bob's ready at alice", WAIT, || async { request.is_ready().then_some(()) }).await?;
        let alice_sas = request.start_sas().await?.context("alice could not start SAS")?;
        let bob_sas = wait_for("alice's SAS start at bob", WAIT, || async {
            match bob.client.encryption().get_verification(&alice_id, &flow_id).await {
                Some(Verification::SasV1(sas)) => Some(sas),
                _ => None,
            }
        })
        .await?;
        bob_sas.accept().await?;
        let emojis = |sas: &SasVerification| sas.emoji().map(|emojis| emojis.map(|emoji| emoji.symbol));
        for sas in [&alice_sas, &bob_sas] {
            wait_for("the short authentication strings", WAIT, || async { sas.can_be_presented().then_some(()) })
                .await?;
        }
        let (alice_emojis, bob_emojis) = (emojis(&alice_sas), emojis(&bob_sas));
        ensure!(
            alice_emojis.is_some() && alice_emojis == bob_emojis,
            "emojis differ: {alice_emojis:?} / {bob_emojis:?}"
        );
        alice_sas.confirm().await?;
        bob_sas.confirm().await?;
        for sas in [&alice_sas, &bob_sas] {
            wait_for("SAS done", WAIT, || async {
                if let Some(info) = sas.cancel_info() {
                    return Some(Err(anyhow::anyhow!("SAS cancelled: {info:?}")));
                }
                sas.is_done().then_some(Ok(()))
            })
            .await??;
        }

        // Each side now trusts the other's device and identity.
        for (client, other, other_device) in [
            (&alice.client, &*bob_id, bob_device_id.clone()),
            (&bob.client, &*alice_id, alice.client.device_id().context("alice's device")?.to_owned()),
        ] {
            verified(client, other, &other_device).await?;
        }
        Ok(())
    })
    .await
}

async fn verified(client: &matrix_sdk::Client, other: &UserId, device: &matrix_sdk::ruma::DeviceId) -> Result<()> {
    wait_for(&format!("{other}'s device and identity verified at {:?}", client.user_id()), WAIT, || async {
        let device = client.encryption().get_device(other, device).await.ok().flatten()?;
        let identity = client.encryption().get_user_identity(other).await.ok().flatten()?;
        (device.is_verified() && identity.is_verified()).then_some(())
    })
    .await
}

/// Device lists through sliding sync's e2ee extension: bob's device logged in after alice shared
/// the room key gets the next one (alice learns of it from a device-list change), cannot read
/// what came before, and bob's logged-out device drops out of alice's view of his devices.
#[tokio::test]
async fn a_new_device_gets_the_next_room_key_and_a_deleted_one_goes() -> Result<()> {
    Server::run(async |server| {
        let alice = Syncing::start(server.user("alice").await?).await?;
        let bob = Syncing::start(server.user("bob").await?).await?;
        let bob_id: OwnedUserId = bob.client.user_id().context("bob")?.to_owned();
        let room = create_room(&alice.client, "secret", &[bob_id.clone()], true).await?;
        bob.room(room.room_id()).await?.join().await?;
        let alice_timeline = alice.room(room.room_id()).await?.timeline().await?;
        wait_for("bob's join in alice's room", WAIT, || async {
            room.get_member_no_sync(&bob_id).await.ok().flatten().filter(|m| *m.membership() == MembershipState::Join)
        })
        .await?;
        alice_timeline.send(RoomMessageEventContent::text_plain("before the new device").into()).await?;
        let bob_timeline = bob.room(room.room_id()).await?.timeline().await?;
        wait_for_item(&bob_timeline, "the first message at bob", |item| body(item) == Some("before the new device"))
            .await?;

        let bob2 = Syncing::start(server.login("bob").await?).await?;
        let new_device = bob2.client.device_id().context("bob's new device")?.to_owned();
        wait_for("bob's new device known to alice", WAIT, || async {
            alice.client.encryption().get_device(&bob_id, &new_device).await.ok().flatten()
        })
        .await?;
        alice_timeline.send(RoomMessageEventContent::text_plain("after the new device").into()).await?;
        let new_timeline = bob2.room(room.room_id()).await?.timeline().await?;
        wait_for_item(&new_timeline, "the second message on bob's new device", |item| {
            body(item) == Some("after the new device")
        })
        .await?;
        new_timeline.paginate_backwards(20).await?;
        let items = limbic_rust_sdk_tests::event_items(&new_timeline).await;
        ensure!(
            !items.iter().any(|item| body(item) == Some("before the new device")),
            "the new device read a message sent before it existed"
        );

        let old_device = bob.client.device_id().context("bob's device")?.to_owned();
        bob.sync.stop().await;
        bob.client.logout().await?;
        wait_for("bob's logged-out device gone from alice's view", WAIT, || async {
            match alice.client.encryption().get_device(&bob_id, &old_device).await {
                Ok(None) => Some(()),
                Ok(Some(device)) if device.is_deleted() => Some(()),
                _ => None,
            }
        })
        .await?;
        Ok(())
    })
    .await
}

/// A member kicked from an encrypted room gets no key to what is said after: the other members'
/// SDKs learn of the kick from their sync (the leave, in the timeline, must also come in
/// `required_state`, the only state matrix-sdk reads from sliding sync) and leave her out of the
/// next room key.
#[tokio::test]
async fn a_kicked_member_gets_no_later_room_keys() -> Result<()> {
    Server::run(async |server| {
        let alice = Syncing::start(server.user("alice").await?).await?;
        let bob = Syncing::start(server.user("bob").await?).await?;
        let carol = Syncing::start(server.user("carol").await?).await?;
        let alice_id: OwnedUserId = alice.client.user_id().context("alice")?.to_owned();
        let carol_id: OwnedUserId = carol.client.user_id().context("carol")?.to_owned();
        let bobs_room = create_room(&bob.client, "team", &[alice_id.clone(), carol_id.clone()], true).await?;
        let room_id = bobs_room.room_id().to_owned();
        alice.room(&room_id).await?.join().await?;
        carol.room(&room_id).await?.join().await?;
        let alices_room = alice.room(&room_id).await?;
        let membership_at_alice = async |user: &UserId, expected: MembershipState| {
            wait_for(&format!("{user} {expected} at alice"), WAIT, || async {
                let member = alices_room.get_member_no_sync(user).await.ok().flatten()?;
                (*member.membership() == expected).then_some(())
            })
            .await
        };
        membership_at_alice(&carol_id, MembershipState::Join).await?;
        let alice_timeline = alices_room.timeline().await?;
        alice_timeline.send(RoomMessageEventContent::text_plain("before the kick").into()).await?;
        let carol_timeline = carol.room(&room_id).await?.timeline().await?;
        wait_for_item(&carol_timeline, "alice's message at carol", |item| body(item) == Some("before the kick"))
            .await?;

        bobs_room.kick_user(&carol_id, Some("bye")).await?;
        membership_at_alice(&carol_id, MembershipState::Leave).await?;

        let event_id = alices_room.send(RoomMessageEventContent::text_plain("after the kick")).await?.response.event_id;
        let bob_timeline = bobs_room.timeline().await?;
        wait_for_item(&bob_timeline, "alice's message after the kick at bob", |item| {
            body(item) == Some("after the kick")
        })
        .await?;
        // The encrypted event as the server stores it, handed to carol's SDK to decrypt.
        let response = reqwest::Client::new()
            .get(format!("{}/_matrix/client/v3/rooms/{room_id}/event/{event_id}", server.base))
            .bearer_auth(bob.client.access_token().context("bob's token")?)
            .send()
            .await?;
        let raw: Raw<OriginalSyncRoomEncryptedEvent> = Raw::from_json(serde_json::from_str(&response.text().await?)?);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let carols_room = carol.client.get_room(&room_id).context("carol's room")?;
        let decrypted = carols_room.decrypt_event(&raw, None).await?;
        ensure!(decrypted.encryption_info().is_none(), "carol, kicked, decrypted a message sent after the kick");
        Ok(())
    })
    .await
}
