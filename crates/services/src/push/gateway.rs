//! Delivery to HTTP push gateways (`/_matrix/push/v1/notify`), off the request path, with
//! exponential backoff. Notifications are best effort: after the last retry they are dropped
//! and logged, as Synapse does. Gateways are reached only at public addresses or in the
//! networks `[push] allowed_networks` names, and never through a redirect (`crate::net_filter`).

use std::{sync::Arc, time::Duration};

use serde_json::Value as JsonValue;
use tokio::sync::mpsc;

use crate::{
    config::PushConfig,
    net_filter::{Client, FetchError},
    network::AddressFilter,
};

const ATTEMPTS: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const QUEUE: usize = 10_000;

pub struct Delivery {
    queue: mpsc::Sender<(String, JsonValue)>,
}

impl Delivery {
    /// Starts the delivery task (needs a Tokio runtime).
    pub fn start(config: &PushConfig) -> Self {
        let (queue, mut jobs) = mpsc::channel::<(String, JsonValue)>(QUEUE);
        let filter = AddressFilter::new(&config.allowed_networks);
        let client = Arc::new(Client::build(reqwest::Client::builder().timeout(Duration::from_secs(10)), filter, None).expect("HTTP client"));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                while let Some((url, body)) = jobs.recv().await {
                    // Each notification retries on its own, so one slow gateway does not hold
                    // up the others.
                    tokio::spawn(deliver(client.clone(), url, body));
                }
            });
        }
        Self { queue }
    }

    pub fn send(&self, url: String, body: JsonValue) {
        if self.queue.try_send((url, body)).is_err() {
            tracing::warn!("push delivery queue full; dropping a notification");
        }
    }
}

async fn deliver(client: Arc<Client>, url: String, body: JsonValue) {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let request = match client.request(reqwest::Method::POST, &url).json(&body).build() {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(%url, %error, "cannot build a push notification request");
                return;
            }
        };
        match client.execute(request).await {
            Ok(response) if response.status().is_success() => return,
            // A gateway that rejects the request, or sends it elsewhere, will do so again.
            Ok(response) if response.status().is_client_error() || response.status().is_redirection() => {
                tracing::warn!(%url, status = %response.status(), "push gateway refused a notification");
                return;
            }
            Err(FetchError::Refused(address)) => {
                tracing::warn!(%url, %address, "push gateway at an internal address; not delivering (see [push] allowed_networks)");
                return;
            }
            Ok(response) => tracing::debug!(%url, status = %response.status(), attempt, "push gateway error; retrying"),
            Err(error) => tracing::debug!(%url, %error, attempt, "push gateway unreachable; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    tracing::warn!(%url, "giving up on a push notification after {ATTEMPTS} attempts");
}
