use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use limbic_rust_sdk_tests::{
    Server, Syncing, backup_settings, body, bootstrap_cross_signing, create_room, wait_for, wait_for_items,
};
use matrix_sdk::{
    encryption::{VerificationState, recovery::RecoveryState},
    ruma::events::room::message::RoomMessageEventContent,
};
use matrix_sdk_ui::timeline::RoomExt as _;

const MESSAGES: [&str; 3] = ["first secret", "second secret", "third secret"];

/// Server-side key backup through matrix-sdk's recovery: one device enables recovery (a key
/// backup and secret storage), sends encrypted messages and logs out; a new device of the same
/// user cannot read them until it recovers with the recovery key, which also restores its
/// cross-signing identity, and then downloads the room keys from the backup and reads them.
#[tokio::test]
async fn recover_keys_from_backup_on_a_new_device() -> Result<()> {
    Server::run(async |server| {
        server.register("alice").await?;
        let old = Syncing::start(server.login_with("alice", backup_settings()).await?).await?;
        bootstrap_cross_signing(&old.client).await?;
        let recovery_key = old.client.encryption().recovery().enable().wait_for_backups_to_upload().await?;
        ensure!(
            old.client.encryption().recovery().state() == RecoveryState::Enabled,
            "recovery {:?}",
            old.client.encryption().recovery().state()
        );

        let room = create_room(&old.client, "diary", &[], true).await?;
        for message in MESSAGES {
            let sent = room.send(RoomMessageEventContent::text_plain(message)).await?;
            ensure!(sent.encryption_info.is_some(), "{message:?} was sent unencrypted");
        }
        old.client.encryption().backups().wait_for_steady_state().await?;
        old.sync.stop().await;
        old.client.logout().await?;

        let new = Syncing::start(server.login_with("alice", backup_settings()).await?).await?;
        let timeline = new.room(room.room_id()).await?.timeline().await?;
        timeline.paginate_backwards(20).await?;
        let undecryptable = wait_for_items(&timeline, "the old messages, undecryptable on the new device", |items| {
            let utds = items.iter().filter(|item| item.content().is_unable_to_decrypt()).count();
            (utds >= MESSAGES.len()).then_some(utds)
        })
        .await?;
        ensure!(undecryptable == MESSAGES.len(), "{undecryptable} undecryptable items");

        new.client.encryption().recovery().recover(&recovery_key).await?;
        ensure!(
            new.client.encryption().recovery().state() == RecoveryState::Enabled,
            "recovery {:?}",
            new.client.encryption().recovery().state()
        );
        let status = new.client.encryption().cross_signing_status().await.context("cross-signing status")?;
        ensure!(status.is_complete(), "cross-signing keys not recovered: {status:?}");
        wait_for("the new device verified by the recovered identity", Duration::from_secs(20), || async {
            (new.client.encryption().verification_state().get() == VerificationState::Verified).then_some(())
        })
        .await?;

        new.client.encryption().backups().download_room_keys_for_room(room.room_id()).await?;
        let read = wait_for_items(&timeline, "the old messages decrypted with keys from the backup", |items| {
            let bodies: Vec<String> = items.iter().filter_map(body).map(str::to_owned).collect();
            (bodies.len() == MESSAGES.len()).then_some(bodies)
        })
        .await?;
        ensure!(read == MESSAGES, "decrypted {read:?}");
        Ok(())
    })
    .await
}
