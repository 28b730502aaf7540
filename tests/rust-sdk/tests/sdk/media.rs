use anyhow::{Context as _, Result, ensure};
use limbic_rust_sdk_tests::{Server, Syncing, create_room, wait_for_item};
use matrix_sdk::{
    attachment::AttachmentConfig,
    media::{MediaFormat, MediaRequestParameters, MediaThumbnailSettings},
    ruma::{
        OwnedMxcUri,
        events::room::{MediaSource, message::MessageType},
        uint,
    },
};
use matrix_sdk_ui::timeline::RoomExt as _;

const IMAGE: &[u8] = include_bytes!("../data/image.png");

fn file(source: MediaSource) -> MediaRequestParameters {
    MediaRequestParameters { source, format: MediaFormat::File }
}

/// Media through matrix-sdk: an uploaded PNG downloads back byte for byte for its uploader and for
/// another user, a thumbnail is an image, the download endpoint is the authenticated one (a
/// request without a token is refused), and an image sent to a room is shown and downloaded by
/// the other member from the event's source.
#[tokio::test]
async fn upload_and_download_an_image() -> Result<()> {
    Server::run(async |server| {
        let alice = server.user("alice").await?;
        let bob = server.user("bob").await?;

        let uri: OwnedMxcUri = alice.media().upload(&mime::IMAGE_PNG, IMAGE.to_vec(), None).await?.content_uri;
        for (who, client) in [("alice", &alice), ("bob", &bob)] {
            let bytes = client.media().get_media_content(&file(MediaSource::Plain(uri.clone())), false).await?;
            ensure!(
                bytes == IMAGE,
                "{who} downloaded {} bytes that differ from the {} uploaded",
                bytes.len(),
                IMAGE.len()
            );
        }
        let thumbnail = MediaRequestParameters {
            source: MediaSource::Plain(uri.clone()),
            format: MediaFormat::Thumbnail(MediaThumbnailSettings::new(uint!(32), uint!(32))),
        };
        let thumbnail = bob.media().get_media_content(&thumbnail, false).await?;
        ensure!(
            thumbnail.starts_with(b"\x89PNG\r\n\x1a\n") || thumbnail.starts_with(b"\xff\xd8\xff"),
            "the thumbnail is not a PNG or JPEG: {:?}",
            &thumbnail[..thumbnail.len().min(16)]
        );

        // Authenticated media (v1.11): the client download endpoint wants a token.
        let (server_name, media_id) = uri.parts()?;
        let url = format!("{}/_matrix/client/v1/media/download/{server_name}/{media_id}", server.base);
        let http = reqwest::Client::new();
        let anonymous = http.get(&url).send().await?;
        ensure!(anonymous.status() == 401, "an anonymous download answered {}", anonymous.status());
        let token = bob.access_token().context("bob's token")?;
        let authenticated = http.get(&url).bearer_auth(token).send().await?;
        ensure!(authenticated.status() == 200, "an authenticated download answered {}", authenticated.status());
        ensure!(authenticated.bytes().await?.as_ref() == IMAGE, "the authenticated download differs");

        // An image message, as a client sends and shows one.
        let room = create_room(&alice, "pictures", &[bob.user_id().context("bob")?.to_owned()], false).await?;
        bob.join_room_by_id(room.room_id()).await?;
        room.send_attachment("image.png", &mime::IMAGE_PNG, IMAGE.to_vec(), AttachmentConfig::new()).await?;
        let bob = Syncing::start(bob).await?;
        let timeline = bob.room(room.room_id()).await?.timeline().await?;
        let item = wait_for_item(&timeline, "alice's image in bob's timeline", |item| {
            item.content().as_message().is_some_and(|message| matches!(message.msgtype(), MessageType::Image(_)))
        })
        .await?;
        let Some(MessageType::Image(image)) = item.content().as_message().map(|message| message.msgtype().clone())
        else {
            unreachable!("matched above")
        };
        ensure!(image.body == "image.png", "the image is called {:?}", image.body);
        let bytes = bob.client.media().get_media_content(&file(image.source), false).await?;
        ensure!(bytes == IMAGE, "the image from the room differs ({} bytes)", bytes.len());
        Ok(())
    })
    .await
}
