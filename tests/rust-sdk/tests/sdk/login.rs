use anyhow::{Result, ensure};
use limbic_rust_sdk_tests::{PASSWORD, Server};
use matrix_sdk::{ruma::api::error::ErrorKind, sliding_sync::Version};

/// Password login through matrix-sdk: a wrong password is refused, the right one gives a device
/// whose token works, and the SDK finds simplified sliding sync in `/versions`.
#[tokio::test]
async fn password_login() -> Result<()> {
    Server::run(async |server| {
        server.register("alice").await?;
        let client = server.client(Default::default()).await?;

        let refused = client.matrix_auth().login_username("alice", "not the password").await;
        let kind = refused.as_ref().err().and_then(|error| error.client_api_error_kind());
        ensure!(kind == Some(&ErrorKind::Forbidden), "a wrong password must be M_FORBIDDEN, got {refused:?}");
        ensure!(!client.is_active(), "a refused login must not log the client in");

        let response =
            client.matrix_auth().login_username("alice", PASSWORD).initial_device_display_name("sdk test").await?;
        ensure!(response.user_id.as_str() == server.user_id("alice"), "logged in as {}", response.user_id);
        ensure!(client.user_id() == Some(&*response.user_id));
        let whoami = client.whoami().await?;
        ensure!(whoami.user_id == response.user_id, "whoami says {}", whoami.user_id);
        ensure!(whoami.device_id.as_deref() == Some(&*response.device_id), "whoami's device {:?}", whoami.device_id);

        // Element X refuses servers without it: NativeVersionIsUnset.
        ensure!(
            matches!(client.sliding_sync_version(), Version::Native),
            "sliding sync: {:?}",
            client.sliding_sync_version()
        );

        // A second login is a second device; logging it out leaves the first one working.
        let second = server.login("alice").await?;
        ensure!(second.device_id() != client.device_id(), "two logins, one device");
        second.logout().await?;
        ensure!(client.whoami().await.is_ok(), "the first device was logged out with the second");
        Ok(())
    })
    .await
}
