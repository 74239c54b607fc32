//! Who is on the other end of a loopback connection, and when it exits.
//!
//! The peer's socket is found in `/proc/net/tcp` (or `tcp6`) by its address
//! pair, which gives its inode; the process holding `socket:[inode]` among
//! its file descriptors is the peer. Its exit is then watched with a pidfd
//! (Linux 5.3+), which becomes readable the moment the process is gone,
//! however it died.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd};

/// The inode of the socket whose local address is `local` and remote address
/// `remote`, from this network namespace's socket tables.
pub fn socket_inode(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let tables: &[&str] = match local {
        SocketAddr::V4(_) => &["/proc/net/tcp", "/proc/net/tcp6"],
        SocketAddr::V6(_) => &["/proc/net/tcp6"],
    };
    for table in tables {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        if let Some(inode) = find_inode(&text, local, remote) {
            return Some(inode);
        }
    }
    None
}

/// Parses a `/proc/net/tcp{,6}` table and finds the row for the address pair.
pub fn find_inode(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Some(l), Some(r)) = (parse_addr(f[1]), parse_addr(f[2])) else {
            continue;
        };
        if same(l, local) && same(r, remote) {
            return f[9].parse().ok().filter(|&i| i != 0);
        }
    }
    None
}

/// Equal addresses, an IPv4 address and its IPv4-mapped IPv6 form included.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    a.port() == b.port() && canon(a.ip()) == canon(b.ip())
}

/// `0100007F:1F90` (IPv4, the address as a native-endian word) or 32 hex
/// digits (IPv6, four native-endian words), then the port.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether process `pid` holds the socket `inode`.
fn holds(pid: u32, target: &str) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .map(|l| l.as_os_str() == target)
            .unwrap_or(false)
    })
}

/// The process holding socket `inode`: `hint` first (NIXL's PING nonce is
/// its pid), then every process this user may look into.
pub fn pid_of_socket(inode: u64, hint: Option<u32>) -> Option<u32> {
    let target = format!("socket:[{inode}]");
    if let Some(pid) = hint.filter(|&p| p > 0) {
        if holds(pid, &target) {
            return Some(pid);
        }
    }
    let me = std::process::id();
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    // Newest first: the peer usually started after most of the system; this
    // process last (a peer in this process is found all the same).
    pids.sort_unstable_by(|a, b| b.cmp(a));
    pids.retain(|&p| p != me);
    pids.push(me);
    pids.into_iter().find(|&pid| holds(pid, &target))
}

/// The process at the other end of a loopback TCP connection, if this
/// store can see it (same PID namespace, permission to read its fds).
pub fn loopback_peer_pid(local: SocketAddr, peer: SocketAddr, hint: Option<u32>) -> Option<u32> {
    if !is_loopback(peer.ip()) {
        return None;
    }
    // The peer's socket: its local address is our peer address.
    let inode = socket_inode(peer, local)?;
    pid_of_socket(inode, hint)
}

/// A loopback address, its IPv4-mapped IPv6 form included.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
        || matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
}

/// Test-only: `NIXL_ETCD_STORE_TEST_PIDFD_ERRNO=38` makes every
/// `pidfd_open` fail with that errno (38 is ENOSYS, as before Linux 5.3), so
/// tests can run the store as on a kernel or seccomp profile without pidfd.
const TEST_PIDFD_ERRNO: &str = "NIXL_ETCD_STORE_TEST_PIDFD_ERRNO";

/// A pidfd for `pid`: readable once the process has exited.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    if let Some(errno) = std::env::var(TEST_PIDFD_ERRNO)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        return Err(std::io::Error::from_raw_os_error(errno));
    }
    // SAFETY: a plain syscall with integer arguments; a non-negative result
    // is a new file descriptor that we then own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until process `pid`, whose pidfd is `fd`, has exited. If the pidfd
/// cannot be polled, never returns: the process is not known to be gone, and
/// its keys stay (the store's own lease bounds them if the store dies).
pub async fn exited(pid: u32, fd: OwnedFd) {
    // SAFETY: `fd` is an open pidfd owned by the AsyncFd for its whole
    // lifetime, and always reports the same descriptor.
    match unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    } {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(e) => {
            log::warn!(
                "nixl-etcd store: cannot poll the pidfd of process {pid}: {e}; its keys stay \
                 until the store stops"
            );
            std::future::pending::<()>().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_rows_are_parsed() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n";
        let l: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let r: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        assert_eq!(find_inode(table, l, r), Some(4242));
        assert_eq!(find_inode(table, r, l), None);
    }

    #[test]
    fn the_peer_of_a_loopback_connection_is_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        assert_eq!(
            loopback_peer_pid(local, peer, None),
            Some(std::process::id())
        );
        drop(client);
    }
}
