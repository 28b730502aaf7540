//! The SFU's I/O: one UDP socket for every peer connection, the signalling connections'
//! channels, and the clock, around the sans-IO [`Sfu`].

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket},
    time::Instant,
};

use livekit_protocol as lk;
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot},
};

use super::sfu::{Grant, ParticipantId, Sfu};
use crate::config::CallsConfig;

/// What the SFU tells one participant's signalling connection.
pub enum ToParticipant {
    Signal(lk::SignalResponse),
    /// Their connections failed: the signalling connection closes.
    Close,
}

/// Work on the SFU's state, run on its task.
type Job = Box<dyn FnOnce(&mut Sfu, Instant) + Send>;

enum Command {
    Join { grant: Box<Grant>, auto_subscribe: bool, to: mpsc::UnboundedSender<ToParticipant>, joined: oneshot::Sender<ParticipantId> },
    Signal(ParticipantId, lk::SignalRequest),
    Leave(ParticipantId),
    Run(Job),
}

/// The running SFU, for the signalling connections.
#[derive(Clone)]
pub struct SfuHandle {
    commands: mpsc::UnboundedSender<Command>,
    /// Where peers send media (the host candidate of every connection).
    pub candidate_addr: SocketAddr,
}

impl SfuHandle {
    /// Joins the call `grant` admits to; `None` if the SFU has stopped.
    pub async fn join(&self, grant: Grant, auto_subscribe: bool, to: mpsc::UnboundedSender<ToParticipant>) -> Option<ParticipantId> {
        let (joined, id) = oneshot::channel();
        self.commands.send(Command::Join { grant: Box::new(grant), auto_subscribe, to, joined }).ok()?;
        id.await.ok()
    }

    pub fn signal(&self, id: ParticipantId, request: lk::SignalRequest) {
        let _ = self.commands.send(Command::Signal(id, request));
    }

    pub fn leave(&self, id: ParticipantId) {
        let _ = self.commands.send(Command::Leave(id));
    }

    /// Runs `job` on the SFU's state (moderation, listings); `None` if the SFU has stopped.
    pub async fn run<R: Send + 'static>(&self, job: impl FnOnce(&mut Sfu, Instant) -> R + Send + 'static) -> Option<R> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move |sfu, now| {
            let _ = done.send(job(sfu, now));
        });
        self.commands.send(Command::Run(job)).ok()?;
        result.await.ok()
    }
}

/// Binds the media socket and starts the SFU.
pub async fn start(config: &CallsConfig) -> std::io::Result<SfuHandle> {
    let socket = UdpSocket::bind(SocketAddr::new(config.udp_address, config.udp_port)).await?;
    let bound = socket.local_addr()?;
    let ip = match config.announced_address {
        Some(ip) => ip,
        None if bound.ip().is_unspecified() => primary_ipv4(),
        None => bound.ip(),
    };
    let candidate_addr = SocketAddr::new(ip, bound.port());
    let (commands, receiver) = mpsc::unbounded_channel();
    tokio::spawn(run(socket, Sfu::new(candidate_addr, super::sfu_limits(config)), receiver, candidate_addr));
    tracing::info!(%bound, %candidate_addr, "SFU media listening (UDP)");
    Ok(SfuHandle { commands, candidate_addr })
}

/// The address this host reaches others from (no packet is sent), as peers on the network see
/// it; loopback when there is no route at all.
fn primary_ipv4() -> IpAddr {
    StdUdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|socket| socket.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).map(|()| socket))
        .and_then(|socket| socket.local_addr())
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |addr| addr.ip())
}

async fn run(socket: UdpSocket, mut sfu: Sfu, mut commands: mpsc::UnboundedReceiver<Command>, candidate_addr: SocketAddr) {
    let mut participants: HashMap<ParticipantId, mpsc::UnboundedSender<ToParticipant>> = HashMap::new();
    let mut buffer = vec![0u8; 2048];
    loop {
        // Until nothing is left: a participant's going makes news for the others.
        loop {
            while let Some((destination, datagram)) = sfu.poll_transmit() {
                if let Err(error) = socket.try_send_to(&datagram, destination) {
                    tracing::debug!(%destination, %error, "a datagram was not sent");
                }
            }
            while let Some((id, response)) = sfu.poll_signal() {
                if let Some(to) = participants.get(&id) {
                    let _ = to.send(ToParticipant::Signal(response));
                }
            }
            let mut gone = false;
            while let Some(id) = sfu.poll_gone() {
                gone = true;
                if let Some(to) = participants.remove(&id) {
                    let _ = to.send(ToParticipant::Close);
                }
                sfu.leave(Instant::now(), id);
            }
            if !gone {
                break;
            }
        }
        let deadline = sfu.next_timeout(Instant::now());
        tokio::select! {
            command = commands.recv() => {
                let now = Instant::now();
                match command {
                    None => return,
                    Some(Command::Join { grant, auto_subscribe, to, joined }) => {
                        let id = sfu.join(now, &grant, auto_subscribe);
                        participants.insert(id, to);
                        let _ = joined.send(id);
                    }
                    Some(Command::Signal(id, request)) => sfu.signal(now, id, request),
                    Some(Command::Leave(id)) => {
                        participants.remove(&id);
                        sfu.leave(now, id);
                    }
                    Some(Command::Run(job)) => job(&mut sfu, now),
                }
            }
            received = socket.recv_from(&mut buffer) => match received {
                Ok((length, source)) => sfu.receive(Instant::now(), source, candidate_addr, &buffer[..length]),
                Err(error) => tracing::debug!(%error, "reading the media socket failed"),
            },
            () = tokio::time::sleep_until(deadline.into()) => sfu.timeout(Instant::now()),
        }
    }
}
