//! When a datagram reached this machine: the kernel's receive timestamp (`SO_TIMESTAMPNS`), so
//! that the latency the load reports ends where the server's sending ends, not when the load's
//! one thread got round to reading the socket.

use std::{
    io, mem,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{io::Interest, net::UdpSocket};

/// Asks the kernel to stamp every datagram `socket` receives.
pub fn enable(socket: &UdpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, and an int option of the size given.
    let done = unsafe { libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, (&raw const on).cast(), mem::size_of::<libc::c_int>() as libc::socklen_t) };
    if done == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The next datagram into `buffer`: its length, its source, and when the kernel received it
/// (`None` if it carried no timestamp).
pub async fn recv(socket: &UdpSocket, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<Instant>)> {
    loop {
        socket.readable().await?;
        match socket.try_io(Interest::READABLE, || recv_now(socket, buffer)) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

fn recv_now(socket: &UdpSocket, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<Instant>)> {
    // SAFETY: zeroed plain C structs; recvmsg writes at most the lengths given into the
    // buffers they point to, which outlive the call.
    unsafe {
        let mut source: libc::sockaddr_storage = mem::zeroed();
        let mut control = [0u64; 8];
        let mut iov = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
        let mut message: libc::msghdr = mem::zeroed();
        message.msg_name = (&raw mut source).cast();
        message.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        message.msg_iov = &raw mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = mem::size_of_val(&control);
        let length = libc::recvmsg(socket.as_raw_fd(), &raw mut message, 0);
        if length < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut stamped = None;
        let mut header = libc::CMSG_FIRSTHDR(&raw const message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_TIMESTAMPNS {
                let at: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast());
                stamped = Some(UNIX_EPOCH + Duration::new(u64::try_from(at.tv_sec).unwrap_or(0), u32::try_from(at.tv_nsec).unwrap_or(0)));
            }
            header = libc::CMSG_NXTHDR(&raw const message, header);
        }
        let source = socket_addr(&source).ok_or_else(|| io::Error::other("a datagram from an address of an unknown family"))?;
        Ok((length as usize, source, stamped.map(on_monotonic_clock)))
    }
}

/// A wall-clock time as an `Instant`, by its distance from now on both clocks.
fn on_monotonic_clock(at: SystemTime) -> Instant {
    let (now, wall) = (Instant::now(), SystemTime::now());
    now.checked_sub(wall.duration_since(at).unwrap_or(Duration::ZERO)).unwrap_or(now)
}

fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4: &libc::sockaddr_in = unsafe { &*(std::ptr::from_ref(storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)), u16::from_be(v4.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6: &libc::sockaddr_in6 = unsafe { &*(std::ptr::from_ref(storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(v6.sin6_addr.s6_addr), u16::from_be(v6.sin6_port), v6.sin6_flowinfo, v6.sin6_scope_id)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_datagram_comes_with_its_source_and_the_time_the_kernel_got_it() {
        let receiver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        enable(&receiver).unwrap();
        // The kernel turns receive timestamps on for the whole machine a moment later (until
        // then a datagram is stamped when it is read).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let before = Instant::now();
        sender.send_to(b"stamped", receiver.local_addr().unwrap()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut buffer = [0u8; 64];
        let (length, source, arrived) = recv(&receiver, &mut buffer).await.unwrap();
        assert_eq!(&buffer[..length], b"stamped");
        assert_eq!(source, sender.local_addr().unwrap());
        let arrived = arrived.expect("a kernel timestamp");
        // It arrived before it was read, 50 ms after it was sent (give or take the clocks).
        let waited = Instant::now().duration_since(arrived);
        assert!(waited >= Duration::from_millis(40), "{waited:?}");
        assert!(arrived + Duration::from_millis(5) >= before, "{:?}", before.duration_since(arrived));
    }
}
