//! A LiveKit client's signalling connection over a raw WebSocket, for tests of `/rtc` and
//! `/rtc/v1`.

use std::time::Duration;

use livekit_protocol as lk;
use prost::Message as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::TestServer;

/// A LiveKit client's signalling connection, as far as these tests need it: a WebSocket
/// (RFC 6455's handshake, and the server's unmasked frames) carrying `SignalResponse`s.
pub struct Signalling {
    stream: TcpStream,
    buffered: Vec<u8>,
}

impl Signalling {
    /// Opens `/rtc` with a call token; the status and body when the server refuses.
    pub async fn connect(server: &TestServer, jwt: &str) -> Result<Self, (u16, String)> {
        Self::connect_with(server, jwt, "").await
    }

    /// Opens `/rtc?reconnect=1&sid=…`, as an SDK resuming participant `sid` does.
    pub async fn resume(server: &TestServer, jwt: &str, sid: &str) -> Result<Self, (u16, String)> {
        Self::connect_with(server, jwt, &format!("&reconnect=1&sid={sid}")).await
    }

    /// Opens `/rtc/v1` (LiveKit's single peer connection) with `request` in its
    /// `join_request`, gzipped or not, as LiveKit's JavaScript SDK sends it.
    pub async fn connect_v1(server: &TestServer, jwt: &str, request: &lk::JoinRequest, gzip: bool) -> Result<Self, (u16, String)> {
        Self::open(server, &format!("/rtc/v1?access_token={jwt}&join_request={}", join_request(request, gzip))).await
    }

    async fn connect_with(server: &TestServer, jwt: &str, query: &str) -> Result<Self, (u16, String)> {
        Self::open(server, &format!("/rtc?access_token={jwt}&auto_subscribe=1&protocol=16{query}")).await
    }

    /// Opens a signalling WebSocket at `target` (a path and query carrying the call token).
    pub async fn open(server: &TestServer, target: &str) -> Result<Self, (u16, String)> {
        let jwt = target.split("access_token=").nth(1).and_then(|rest| rest.split('&').next()).unwrap_or_default();
        let port = server.signalling_port(jwt);
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut connection = Self { stream, buffered: Vec::new() };
        let end = loop {
            if let Some(at) = connection.buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(connection.fill().await, "the server closed the connection during the handshake");
        };
        let head = String::from_utf8_lossy(&connection.buffered[..end]).into_owned();
        connection.buffered.drain(..end);
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status line");
        if status == 101 {
            return Ok(connection);
        }
        let length = head.lines().find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").and_then(|v| v.trim().parse().ok())).unwrap_or(0);
        while connection.buffered.len() < length && connection.fill().await {}
        Err((status, String::from_utf8_lossy(&connection.buffered).into_owned()))
    }

    /// Reads more from the socket; false once it is closed.
    pub async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buffered.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next signalling message; `None` once the connection is closed.
    pub async fn next(&mut self) -> Option<lk::signal_response::Message> {
        loop {
            if let Some((opcode, payload)) = self.frame() {
                match opcode {
                    0x2 => return Some(lk::SignalResponse::decode(payload.as_slice()).expect("a SignalResponse").message.expect("a message")),
                    0x8 => return None,
                    _ => continue,
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// A whole frame from the buffer, if one is there.
    pub fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let b = &self.buffered;
        if b.len() < 2 {
            return None;
        }
        let (length, start) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => (usize::try_from(u64::from_be_bytes(b[2..10].try_into().unwrap())).unwrap(), 10),
            126 | 127 => return None,
            short => (usize::from(short), 2),
        };
        if b.len() < start + length {
            return None;
        }
        let opcode = b[0] & 0x0f;
        let payload = b[start..start + length].to_vec();
        self.buffered.drain(..start + length);
        Some((opcode, payload))
    }

    /// Reads messages until one matches, for at most `within`; it, or `None` if the connection
    /// closed or time ran out first.
    pub async fn until(&mut self, within: Duration, wanted: impl Fn(&lk::signal_response::Message) -> bool) -> Option<lk::signal_response::Message> {
        tokio::time::timeout(within, async {
            while let Some(message) = self.next().await {
                if wanted(&message) {
                    return Some(message);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }

    /// Joins: the first message is the `JoinResponse`.
    pub async fn join(server: &TestServer, jwt: &str) -> Self {
        Self::join_with_response(server, jwt).await.0
    }

    /// Joins, with the `JoinResponse`.
    pub async fn join_with_response(server: &TestServer, jwt: &str) -> (Self, lk::JoinResponse) {
        let mut connection = Self::connect(server, jwt).await.unwrap_or_else(|(status, body)| panic!("/rtc refused: {status} {body}"));
        let first = tokio::time::timeout(Duration::from_secs(5), connection.next()).await.expect("a join response in time");
        let Some(lk::signal_response::Message::Join(join)) = first else { panic!("the first message is not a join response: {first:?}") };
        (connection, join)
    }

    /// Waits for the server to tell this participant to leave: the reason, then the close.
    pub async fn left_because(&mut self, within: Duration) -> Option<lk::DisconnectReason> {
        let leave = self.until(within, |m| matches!(m, lk::signal_response::Message::Leave(_))).await?;
        let lk::signal_response::Message::Leave(leave) = leave else { unreachable!() };
        let reason = lk::DisconnectReason::try_from(leave.reason).ok();
        assert!(tokio::time::timeout(Duration::from_secs(2), self.next()).await.expect("closed in time").is_none(), "the connection closes after the leave");
        reason
    }

    /// Sends a frame of `opcode` whose header announces `length` bytes, with `payload` (masked,
    /// as a client's frames are); `payload` may be shorter than announced.
    pub async fn send_frame(&mut self, opcode: u8, length: usize, payload: &[u8]) {
        let mut frame = vec![0x80 | opcode];
        match length {
            0..=125 => frame.push(0x80 | length as u8),
            126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(length as u16).to_be_bytes());
            }
            _ => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(length as u64).to_be_bytes());
            }
        }
        let mask = [0x1b, 0x2c, 0x3d, 0x4e];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, byte)| byte ^ mask[i % 4]));
        self.stream.write_all(&frame).await.unwrap();
    }

    pub async fn send(&mut self, message: lk::signal_request::Message) {
        let payload = lk::SignalRequest { message: Some(message) }.encode_to_vec();
        self.send_frame(0x2, payload.len(), &payload).await;
    }

    /// Reads until the server closes: whether a `leave` came first, and the close frame's code
    /// and reason (`None`: no close frame in time).
    pub async fn closed(&mut self, within: Duration) -> (bool, Option<(u16, String)>) {
        let mut left = false;
        let close = tokio::time::timeout(within, async {
            loop {
                match self.frame() {
                    Some((0x8, payload)) if payload.len() >= 2 => return Some((u16::from_be_bytes([payload[0], payload[1]]), String::from_utf8_lossy(&payload[2..]).into_owned())),
                    Some((0x2, payload)) => left |= matches!(lk::SignalResponse::decode(payload.as_slice()).ok().and_then(|r| r.message), Some(lk::signal_response::Message::Leave(_))),
                    Some(_) => {}
                    None if !self.fill().await => return None,
                    None => {}
                }
            }
        })
        .await
        .ok()
        .flatten();
        (left, close)
    }

    /// Waits until the participant `identity` is reported gone.
    pub async fn sees_leave(&mut self, identity: &str, within: Duration) -> bool {
        let gone = |m: &lk::signal_response::Message| matches!(m, lk::signal_response::Message::Update(u) if u.participants.iter().any(|p| p.identity == identity && p.state == lk::participant_info::State::Disconnected as i32));
        self.until(within, gone).await.is_some()
    }
}


/// A `join_request` query value: the `WrappedJoinRequest` in base64url, padded (as LiveKit's
/// JavaScript SDK writes it).
pub fn join_request(request: &lk::JoinRequest, gzip: bool) -> String {
    use base64::Engine as _;
    use std::io::Write as _;
    let bytes = request.encode_to_vec();
    let (join_request, compression) = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&bytes).unwrap();
        (encoder.finish().unwrap(), lk::wrapped_join_request::Compression::Gzip)
    } else {
        (bytes, lk::wrapped_join_request::Compression::None)
    };
    let wrapped = lk::WrappedJoinRequest { compression: compression as i32, join_request };
    base64::engine::general_purpose::URL_SAFE.encode(wrapped.encode_to_vec())
}
