//! The load balancer in front of a cluster's two nodes in cluster mode (`E2E_DATABASE=cluster`):
//! each request goes to the node its access token picks (so one client keeps to one node, as a
//! load balancer pinning sessions would, and two clients are on different nodes about half the
//! time); requests without a token alternate. It runs on a thread of its own, so that a test's
//! blocking calls never hold it up, until it is dropped.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};

pub struct Proxy {
    pub port: u16,
    listener: Option<std::net::TcpListener>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

struct Backends {
    ports: [u16; 2],
    next: AtomicUsize,
}

impl Proxy {
    /// Its port, taken now (so that the nodes can be configured with it).
    pub fn bind() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Self { port: listener.local_addr().unwrap().port(), listener: Some(listener), stop: None }
    }

    /// Passes requests on to the nodes listening on `ports`, until dropped.
    pub fn serve(&mut self, ports: [u16; 2]) {
        let listener = self.listener.take().expect("a proxy serves once");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let backends = Arc::new(Backends { ports, next: AtomicUsize::new(0) });
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = axum::Router::new().fallback(forward).with_state(backends);
                let _ = axum::serve(listener, app).with_graceful_shutdown(async move { drop(stopped.await) }).await;
            });
        });
        self.stop = Some(stop);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Backends {
    /// The node for a request: by its access token, else the next in turn.
    fn pick(&self, request: &Request) -> u16 {
        let bearer = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let query = request.uri().query().and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("access_token=")));
        match bearer.or(query) {
            Some(token) => node_for(token, self.ports),
            None => self.ports[self.next.fetch_add(1, Ordering::Relaxed) % self.ports.len()],
        }
    }
}

/// The port of the node that requests with `token` go to.
pub fn node_for(token: &str, ports: [u16; 2]) -> u16 {
    let mut hasher = DefaultHasher::new();
    token.hash(&mut hasher);
    ports[hasher.finish() as usize % ports.len()]
}

async fn forward(State(backends): State<Arc<Backends>>, request: Request) -> Response {
    let port = backends.pick(&request);
    // A connection of its own per request, both bodies streamed: a chunked upload reaches the
    // node as it is sent, as it would through a load balancer.
    let answer = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        sender.send_request(request).await.map_err(|e| e.to_string())
    };
    match answer.await {
        Ok(answer) => answer.map(Body::new),
        Err(error) => (StatusCode::BAD_GATEWAY, error).into_response(),
    }
}
