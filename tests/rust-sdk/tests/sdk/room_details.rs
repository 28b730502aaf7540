use std::time::Duration;

use anyhow::{Context as _, Result};
use limbic_rust_sdk_tests::{Server, Syncing, create_room, wait_for};

const WAIT: Duration = Duration::from_secs(20);
const IMAGE: &[u8] = include_bytes!("../data/image.png");

/// What the room list shows of a room follows changes made elsewhere: name, topic and avatar
/// (state in later sliding sync responses), favourite and marked-unread (room account data
/// through the account-data extension).
#[tokio::test]
async fn state_and_account_data_changes_reach_a_syncing_client() -> Result<()> {
    Server::run(async |server| {
        let alice = Syncing::start(server.user("alice").await?).await?;
        // Alice's other device makes the changes, so that her first one learns them from the server.
        let elsewhere = server.login("alice").await?;
        let team = create_room(&elsewhere, "team", &[], false).await?;
        let room = alice.room(team.room_id()).await?;
        wait_for("the room's name", WAIT, || async { (room.name().as_deref() == Some("team")).then_some(()) }).await?;

        team.set_name("team, renamed".to_owned()).await?;
        team.set_room_topic("what the team is about").await?;
        let avatar = elsewhere.media().upload(&mime::IMAGE_PNG, IMAGE.to_vec(), None).await?.content_uri;
        team.set_avatar_url(&avatar, None).await?;
        wait_for("the new name, topic and avatar", WAIT, || async {
            (room.name().as_deref() == Some("team, renamed")
                && room.topic().as_deref() == Some("what the team is about")
                && room.avatar_url().as_ref() == Some(&avatar))
            .then_some(())
        })
        .await
        .with_context(|| format!("name {:?}, topic {:?}, avatar {:?}", room.name(), room.topic(), room.avatar_url()))?;

        team.set_is_favourite(true, None).await?;
        team.set_unread_flag(true).await?;
        wait_for("favourite and marked unread", WAIT, || async {
            (room.is_favourite() && room.is_marked_unread()).then_some(())
        })
        .await
        .with_context(|| format!("favourite {}, marked unread {}", room.is_favourite(), room.is_marked_unread()))?;

        Ok(())
    })
    .await
}

/// A direct chat without a name is named after the other user (the room's heroes), and renamed
/// when he changes his display name: the server sends the heroes again.
#[tokio::test]
async fn a_direct_chat_follows_the_other_users_new_name() -> Result<()> {
    Server::run(async |server| {
        let alice = Syncing::start(server.user("alice").await?).await?;
        let bob = server.user("bob").await?;
        bob.account().set_display_name(Some("Bob")).await?;
        let dm = bob.create_dm(alice.client.user_id().context("alice")?).await?;
        alice.room(dm.room_id()).await?.join().await?;
        let alices_dm = alice.room(dm.room_id()).await?;
        let name = async |expected: &str| {
            wait_for(&format!("the direct chat named {expected:?}"), WAIT, || async {
                (alices_dm.display_name().await.ok()?.to_string() == expected).then_some(())
            })
            .await
            .with_context(|| format!("named {:?}, heroes {:?}", alices_dm.cached_display_name(), alices_dm.heroes()))
        };
        name("Bob").await?;
        bob.account().set_display_name(Some("Robert")).await?;
        name("Robert").await?;
        Ok(())
    })
    .await
}
