//! The SFU's I/O: one UDP socket for every peer connection, a TCP listener for peers whose
//! UDP is blocked (ICE over TCP, RFC 6544, framed as RFC 4571 says), the signalling
//! connections' channels, and the clock, around the sans-IO [`Sfu`].

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket},
    sync::Arc,
    time::{Duration, Instant},
};

use livekit_protocol as lk;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Semaphore, mpsc, oneshot},
};

use super::sfu::{Grant, JoinOptions, MediaAddresses, Outgoing, ParticipantId, Protocol, Sfu};
use crate::config::CallsConfig;

/// Media TCP connections open at once: each costs a task and its buffers, and one that no
/// participant's connection accepts only idles until it is closed.
const MAX_TCP_CONNECTIONS: usize = 1024;
/// A media TCP connection silent this long is closed: ICE consent checks come every few
/// seconds on a live one.
const TCP_IDLE: Duration = Duration::from_secs(30);
/// Frames queued for one TCP peer; beyond it they are dropped, as a full UDP socket drops them.
const TCP_QUEUE: usize = 512;

/// What the SFU tells one participant's signalling connection.
pub enum ToParticipant {
    Signal(lk::SignalResponse),
    /// Their connections failed: the signalling connection closes.
    Close,
}

/// Work on the SFU's state, run on its task.
type Job = Box<dyn FnOnce(&mut Sfu, Instant) + Send>;

enum Command {
    Join { grant: Box<Grant>, options: JoinOptions, to: mpsc::UnboundedSender<ToParticipant>, joined: oneshot::Sender<ParticipantId> },
    Resume { resumption: Box<Resumption>, to: mpsc::UnboundedSender<ToParticipant>, resumed: oneshot::Sender<Option<ParticipantId>> },
    Signal(ParticipantId, lk::SignalRequest),
    Leave(ParticipantId),
    /// With the connection's channel: only the participant's current connection detaches them.
    Detach(ParticipantId, mpsc::WeakUnboundedSender<ToParticipant>),
    Run(Job),
}

/// Who resumes a participation (LiveKit's `/rtc?reconnect=1&sid=`): the participant `sid`
/// with `identity` in the SFU room `room`.
pub struct Resumption {
    pub room: String,
    pub identity: String,
    pub sid: String,
    /// Resumed over LiveKit's single peer connection (`/rtc/v1`), as they must have joined.
    pub single_connection: bool,
    pub ice_servers: Vec<lk::IceServer>,
}

/// The running SFU, for the signalling connections.
#[derive(Clone)]
pub struct SfuHandle {
    commands: mpsc::UnboundedSender<Command>,
    /// Where peers send media (the host candidates of every connection).
    pub addresses: MediaAddresses,
}

impl SfuHandle {
    /// Joins the call `grant` admits to; `None` if the SFU has stopped.
    pub async fn join(&self, grant: Grant, options: JoinOptions, to: mpsc::UnboundedSender<ToParticipant>) -> Option<ParticipantId> {
        let (joined, id) = oneshot::channel();
        self.commands.send(Command::Join { grant: Box::new(grant), options, to, joined }).ok()?;
        id.await.ok()
    }

    /// Resumes a participation; `None` if there is none to resume (or the SFU has stopped).
    pub async fn resume(&self, resumption: Resumption, to: mpsc::UnboundedSender<ToParticipant>) -> Option<ParticipantId> {
        let (resumed, id) = oneshot::channel();
        self.commands.send(Command::Resume { resumption: Box::new(resumption), to, resumed }).ok()?;
        id.await.ok().flatten()
    }

    /// The participant's signalling connection (whose channel `to` was) closed without a
    /// `leave`: they may resume for a while. Nothing happens if they already resumed on another.
    pub fn detach(&self, id: ParticipantId, to: mpsc::WeakUnboundedSender<ToParticipant>) {
        let _ = self.commands.send(Command::Detach(id, to));
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

/// Binds the media sockets and starts the SFU.
pub async fn start(config: &CallsConfig) -> std::io::Result<SfuHandle> {
    let socket = UdpSocket::bind(SocketAddr::new(config.udp_address, config.udp_port)).await?;
    let bound = socket.local_addr()?;
    let ip = media_ip(config);
    let (frames, tcp_frames) = mpsc::channel(TCP_QUEUE);
    let (tcp_events, tcp_connections) = mpsc::unbounded_channel();
    let tcp = if config.ice_tcp {
        let listener = TcpListener::bind(SocketAddr::new(config.udp_address, config.tcp_port)).await?;
        let tcp_bound = listener.local_addr()?;
        tokio::spawn(accept_tcp(listener, frames, tcp_events));
        tracing::info!(bound = %tcp_bound, "SFU media listening (ICE over TCP)");
        Some(SocketAddr::new(ip, tcp_bound.port()))
    } else {
        None
    };
    let addresses = MediaAddresses { udp: SocketAddr::new(ip, bound.port()), tcp };
    let (commands, receiver) = mpsc::unbounded_channel();
    let io = Io { socket, addresses, tcp_frames, tcp_connections, tcp_peers: HashMap::new() };
    tokio::spawn(run(io, Sfu::new(addresses, super::sfu_limits(config)), receiver));
    tracing::info!(%bound, ?addresses, "SFU media listening (UDP)");
    Ok(SfuHandle { commands, addresses })
}

/// A frame a TCP peer sent.
struct TcpFrame {
    peer: SocketAddr,
    contents: Vec<u8>,
}

/// A TCP peer came or went: where its frames are written, or `None` once it is gone.
struct TcpConnection {
    peer: SocketAddr,
    writer: Option<mpsc::Sender<Vec<u8>>>,
}

/// Accepts media TCP connections, up to [`MAX_TCP_CONNECTIONS`] at once.
async fn accept_tcp(listener: TcpListener, frames: mpsc::Sender<TcpFrame>, events: mpsc::UnboundedSender<TcpConnection>) {
    let open = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok(permit) = open.clone().acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(%error, "accepting a media TCP connection failed");
                continue;
            }
        };
        let (frames, events) = (frames.clone(), events.clone());
        tokio::spawn(async move {
            serve_tcp(stream, peer, frames, &events).await;
            let _ = events.send(TcpConnection { peer, writer: None });
            drop(permit);
        });
    }
}

/// One media TCP connection: RFC 4571 frames (a 2-byte length, then a STUN, DTLS, RTP or RTCP
/// packet) both ways, until either side closes it or it idles for [`TCP_IDLE`].
async fn serve_tcp(stream: TcpStream, peer: SocketAddr, frames: mpsc::Sender<TcpFrame>, events: &mpsc::UnboundedSender<TcpConnection>) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let (to_peer, mut outgoing) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
    if events.send(TcpConnection { peer, writer: Some(to_peer) }).is_err() {
        return;
    }
    let write = async move {
        while let Some(frame) = outgoing.recv().await {
            let Ok(length) = u16::try_from(frame.len()) else { continue };
            let mut framed = Vec::with_capacity(frame.len() + 2);
            framed.extend_from_slice(&length.to_be_bytes());
            framed.extend_from_slice(&frame);
            if writer.write_all(&framed).await.is_err() {
                return;
            }
        }
    };
    let read = async move {
        loop {
            let mut length = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE, reader.read_exact(&mut length)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => return,
            }
            let mut contents = vec![0u8; usize::from(u16::from_be_bytes(length))];
            if reader.read_exact(&mut contents).await.is_err() || frames.send(TcpFrame { peer, contents }).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = write => {}
        () = read => {}
    }
}

/// What the SFU's task reads from and writes to: the UDP socket and the TCP connections.
struct Io {
    socket: UdpSocket,
    /// The sockets' addresses as peers know them (the destination of what they send).
    addresses: MediaAddresses,
    tcp_frames: mpsc::Receiver<TcpFrame>,
    tcp_connections: mpsc::UnboundedReceiver<TcpConnection>,
    tcp_peers: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
}

/// How many datagrams one `sendmmsg` takes at most.
const DATAGRAMS_PER_CALL: usize = 64;

impl Io {
    /// Sends what the SFU has to send: the datagrams in batches of one system call each (a
    /// frame goes to every subscriber at once), the TCP frames to their connections' tasks.
    fn send_all(&self, sfu: &mut Sfu) {
        let mut datagrams: Vec<Outgoing> = Vec::new();
        while let Some(outgoing) = sfu.poll_transmit() {
            if outgoing.proto != Protocol::Udp {
                self.send_tcp(outgoing);
                continue;
            }
            datagrams.push(outgoing);
            if datagrams.len() == DATAGRAMS_PER_CALL {
                self.send_datagrams(&datagrams);
                datagrams.clear();
            }
        }
        self.send_datagrams(&datagrams);
    }

    fn send_tcp(&self, outgoing: Outgoing) {
        let destination = outgoing.destination;
        if let Some(peer) = self.tcp_peers.get(&destination)
            && peer.try_send(outgoing.contents).is_err()
        {
            tracing::debug!(%destination, "a TCP frame was not sent: the connection is behind or closed");
        }
    }

    /// Datagrams sent with `sendmmsg`, as many per call as it takes; one the kernel refuses
    /// (or that would block) is dropped, as a lost datagram is, and the rest go on.
    fn send_datagrams(&self, datagrams: &[Outgoing]) {
        let addresses: Vec<socket2::SockAddr> = datagrams.iter().map(|d| socket2::SockAddr::from(d.destination)).collect();
        let mut next = 0;
        while next < datagrams.len() {
            match send_many(&self.socket, &datagrams[next..], &addresses[next..]) {
                Ok(sent) => next += sent.max(1),
                Err(error) => {
                    tracing::debug!(destination = %datagrams[next].destination, %error, "a datagram was not sent");
                    next += 1;
                }
            }
        }
    }
}

/// One `sendmmsg` of `datagrams` to `addresses`: how many the kernel took (at least one), or
/// why it took not even the first.
fn send_many(socket: &UdpSocket, datagrams: &[Outgoing], addresses: &[socket2::SockAddr]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut iovecs: Vec<libc::iovec> = datagrams.iter().map(|d| libc::iovec { iov_base: d.contents.as_ptr() as *mut libc::c_void, iov_len: d.contents.len() }).collect();
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .zip(addresses)
        .map(|(iovec, address)| {
            // SAFETY: an all-zero `msghdr` is valid (no control data, no flags).
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_name = address.as_ptr() as *mut libc::c_void;
            header.msg_namelen = address.len();
            header.msg_iov = iovec;
            header.msg_iovlen = 1;
            libc::mmsghdr { msg_hdr: header, msg_len: 0 }
        })
        .collect();
    let count = libc::c_uint::try_from(headers.len()).unwrap_or(libc::c_uint::MAX);
    socket.try_io(tokio::io::Interest::WRITABLE, || {
        // SAFETY: each header points at an address and an iovec (of a datagram's bytes) that
        // outlive the call; `count` is at most the headers' number.
        let sent = unsafe { libc::sendmmsg(socket.as_raw_fd(), headers.as_mut_ptr(), count, 0) };
        usize::try_from(sent).map_err(|_| std::io::Error::last_os_error())
    })
}

/// The address peers send media to: the announced one, else the sockets' (for an unspecified
/// one, this host's address on its default route).
pub fn media_ip(config: &CallsConfig) -> IpAddr {
    match config.announced_address {
        Some(ip) => ip,
        None if config.udp_address.is_unspecified() => primary_ipv4(),
        None => config.udp_address,
    }
}

/// The address this host reaches others from (no packet is sent), as peers on the network see
/// it; loopback when there is no route at all.
fn primary_ipv4() -> IpAddr {
    StdUdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|socket| socket.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).map(|()| socket))
        .and_then(|socket| socket.local_addr())
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |addr| addr.ip())
}

async fn run(mut io: Io, mut sfu: Sfu, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut participants: HashMap<ParticipantId, mpsc::UnboundedSender<ToParticipant>> = HashMap::new();
    let mut buffer = vec![0u8; 2048];
    loop {
        // Until nothing is left: a participant's going makes news for the others.
        loop {
            io.send_all(&mut sfu);
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
                    Some(Command::Join { grant, options, to, joined }) => {
                        let id = sfu.join(now, &grant, &options);
                        participants.insert(id, to);
                        let _ = joined.send(id);
                    }
                    Some(Command::Resume { resumption, to, resumed }) => {
                        let Resumption { room, identity, sid, single_connection, ice_servers } = *resumption;
                        let id = sfu.resume(now, &room, &identity, &sid, single_connection, ice_servers);
                        if let Some(id) = id {
                            participants.insert(id, to);
                        }
                        let _ = resumed.send(id);
                    }
                    Some(Command::Detach(id, to)) => {
                        let current = participants.get(&id).is_some_and(|sender| to.upgrade().is_some_and(|to| to.same_channel(sender)));
                        if current {
                            participants.remove(&id);
                            sfu.detach(now, id);
                        }
                    }
                    Some(Command::Signal(id, request)) => sfu.signal(now, id, request),
                    Some(Command::Leave(id)) => {
                        participants.remove(&id);
                        sfu.leave(now, id);
                    }
                    Some(Command::Run(job)) => job(&mut sfu, now),
                }
            }
            received = io.socket.recv_from(&mut buffer) => match received {
                Ok((length, source)) => sfu.receive(Instant::now(), Protocol::Udp, source, io.addresses.udp, &buffer[..length]),
                Err(error) => tracing::debug!(%error, "reading the media socket failed"),
            },
            Some(frame) = io.tcp_frames.recv() => if let Some(local) = io.addresses.tcp {
                sfu.receive(Instant::now(), Protocol::Tcp, frame.peer, local, &frame.contents);
            },
            Some(TcpConnection { peer, writer }) = io.tcp_connections.recv() => match writer {
                Some(writer) => { io.tcp_peers.insert(peer, writer); }
                None => { io.tcp_peers.remove(&peer); }
            },
            () = tokio::time::sleep_until(deadline.into()) => sfu.timeout(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch whose second datagram the kernel refuses (a broadcast address, without
    /// `SO_BROADCAST`): it alone is dropped, the ones before and after it arrive.
    #[tokio::test]
    async fn a_datagram_the_kernel_refuses_drops_out_of_its_batch_alone() {
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let to = receiver.local_addr().unwrap();
        let datagram = |destination: SocketAddr, byte: u8| Outgoing { proto: Protocol::Udp, destination, contents: vec![byte; 10] };
        let refused = SocketAddr::from((Ipv4Addr::BROADCAST, to.port()));
        let batch = [datagram(to, 1), datagram(refused, 2), datagram(to, 3)];
        let addresses: Vec<socket2::SockAddr> = batch.iter().map(|d| socket2::SockAddr::from(d.destination)).collect();
        // Writable as tokio knows it: the SFU's socket is, once its task has run.
        sender.writable().await.unwrap();
        let error = send_many(&sender, &batch[1..], &addresses[1..]).expect_err("the broadcast address is refused");
        assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied, "{error}");
        let io = Io { socket: sender, addresses: MediaAddresses { udp: to, tcp: None }, tcp_frames: mpsc::channel(1).1, tcp_connections: mpsc::unbounded_channel().1, tcp_peers: HashMap::new() };
        io.send_datagrams(&batch);
        let mut buffer = [0u8; 64];
        let mut got = Vec::new();
        for _ in 0..2 {
            let (length, _) = tokio::time::timeout(Duration::from_secs(5), receiver.recv_from(&mut buffer)).await.expect("a datagram").unwrap();
            got.push(buffer[..length].to_vec());
        }
        assert_eq!(got, [vec![1; 10], vec![3; 10]]);
    }
}
