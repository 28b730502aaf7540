use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use futures_util::{StreamExt as _, pin_mut};
use limbic_rust_sdk_tests::{Server, Syncing, create_room, wait_for};
use matrix_sdk::{
    RoomState,
    room::knock_requests::KnockRequest,
    room_preview::RoomPreview,
    ruma::{
        OwnedRoomId, UserId,
        api::client::room::create_room::v3::Request as CreateRoomRequest,
        events::{
            InitialStateEvent,
            room::join_rules::{JoinRule, RoomJoinRulesEventContent},
        },
        room::JoinRuleSummary,
    },
};

const WAIT: Duration = Duration::from_secs(20);

/// Knocking, Limbic's waiting room, through matrix-sdk: a knocker sees the room's name from the
/// knock's stripped state; the room's admin gets each knock, with its reason, as a knock
/// request; accepting invites the knocker, who joins; declining (a kick) leaves the other
/// knocker's room as left.
#[tokio::test]
async fn knock_requests_accepted_and_declined() -> Result<()> {
    Server::run(async |server| {
        let alice = Syncing::start(server.user("alice").await?).await?;
        let bob = Syncing::start(server.user("bob").await?).await?;
        let carol = Syncing::start(server.user("carol").await?).await?;

        let mut request = CreateRoomRequest::new();
        request.name = Some("waiting room".to_owned());
        request.initial_state =
            vec![InitialStateEvent::with_empty_state_key(RoomJoinRulesEventContent::new(JoinRule::Knock)).to_raw_any()];
        let room = alice.client.create_room(request).await?;
        let room_id: OwnedRoomId = room.room_id().to_owned();

        for (knocker, reason) in [(&bob, "bob would like to come in"), (&carol, "carol too")] {
            knocker.client.knock(room_id.clone().into(), Some(reason.to_owned()), vec![]).await?;
        }
        for knocker in [&bob, &carol] {
            let knocked = knocker.room(&room_id).await?;
            wait_for("the room's name in the knock's stripped state", WAIT, || async {
                (knocked.state() == RoomState::Knocked && knocked.name().as_deref() == Some("waiting room"))
                    .then_some(())
            })
            .await
            .with_context(|| format!("the knocker sees {:?} named {:?}", knocked.state(), knocked.name()))?;
        }

        let alices_room = alice.room(&room_id).await?;
        let (requests, _task) = alices_room.subscribe_to_knock_requests().await?;
        pin_mut!(requests);
        let requests: Vec<KnockRequest> = tokio::time::timeout(WAIT, async {
            while let Some(requests) = requests.next().await {
                if requests.len() == 2 {
                    return Some(requests);
                }
            }
            None
        })
        .await
        .context("timed out waiting for both knock requests")?
        .context("the knock requests stream ended")?;
        let request_of = |user: &UserId| requests.iter().find(|request| request.member_info.user_id == user);
        let bobs = request_of(bob.client.user_id().context("bob")?).context("no knock request from bob")?;
        ensure!(
            bobs.member_info.reason.as_deref() == Some("bob would like to come in"),
            "bob's reason: {:?}",
            bobs.member_info.reason
        );
        let carols = request_of(carol.client.user_id().context("carol")?).context("no knock request from carol")?;

        bobs.accept().await?;
        let bobs_room = bob.client.get_room(&room_id).context("bob's room")?;
        wait_for("bob invited after his knock was accepted", WAIT, || async {
            (bobs_room.state() == RoomState::Invited).then_some(())
        })
        .await?;
        bobs_room.join().await?;
        wait_for("bob's join at alice", WAIT, || async {
            let member = alices_room.get_member_no_sync(bob.client.user_id()?).await.ok().flatten()?;
            (*member.membership() == matrix_sdk::ruma::events::room::member::MembershipState::Join).then_some(())
        })
        .await?;

        carols.decline(Some("not today")).await?;
        let carols_room = carol.client.get_room(&room_id).context("carol's room")?;
        wait_for("carol's room left after her knock was declined", WAIT, || async {
            (carols_room.state() == RoomState::Left).then_some(())
        })
        .await
        .with_context(|| format!("carol's room is {:?}", carols_room.state()))?;
        Ok(())
    })
    .await
}

/// Room previews as Element X shows them before joining, from the room summary (MSC3266): a
/// knock room to someone outside it (name, topic, join rule, members), an invite to the
/// invitee; a private room is not previewed to a stranger.
#[tokio::test]
async fn room_previews_from_the_room_summary() -> Result<()> {
    Server::run(async |server| {
        let alice = server.user("alice").await?;
        let bob = Syncing::start(server.user("bob").await?).await?;
        let carol = server.user("carol").await?;

        let mut request = CreateRoomRequest::new();
        request.name = Some("waiting room".to_owned());
        request.topic = Some("knock to come in".to_owned());
        request.initial_state =
            vec![InitialStateEvent::with_empty_state_key(RoomJoinRulesEventContent::new(JoinRule::Knock)).to_raw_any()];
        let waiting_room = alice.create_room(request).await?;
        let preview = RoomPreview::from_room_summary(
            &carol,
            waiting_room.room_id().to_owned(),
            waiting_room.room_id().into(),
            vec![],
        )
        .await?;
        ensure!(
            preview.name.as_deref() == Some("waiting room")
                && preview.topic.as_deref() == Some("knock to come in")
                && matches!(preview.join_rule, Some(JoinRuleSummary::Knock))
                && preview.num_joined_members == 1,
            "the knock room's preview: {preview:?}"
        );

        let invited = create_room(&alice, "invited", &[bob.client.user_id().context("bob")?.to_owned()], false).await?;
        bob.room(invited.room_id()).await?;
        let preview = bob.client.get_room_preview(invited.room_id().into(), vec![]).await?;
        ensure!(
            preview.name.as_deref() == Some("invited") && preview.state == Some(RoomState::Invited),
            "the invite's preview: {preview:?}"
        );

        let private = create_room(&alice, "private", &[], false).await?;
        let stranger =
            RoomPreview::from_room_summary(&carol, private.room_id().to_owned(), private.room_id().into(), vec![])
                .await;
        ensure!(stranger.is_err(), "a stranger previewed a private room: {stranger:?}");
        Ok(())
    })
    .await
}
