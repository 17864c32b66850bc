//! Free loopback ports for servers started by tests.
//!
//! A port is chosen at random below the kernel's range of ephemeral ports (Linux's
//! `ip_local_port_range`, 32768–60999 by default), from 10000 up, and checked by binding
//! it. A server that is killed and started again on the same port ([`crate::EtcdServer::restart`])
//! would otherwise find it taken now and then: the kernel gives ports of that range to
//! outgoing connections, including the clients' reconnect attempts to that very server.
//! Where the range cannot be read, or leaves too little room below it, the kernel picks the
//! port (binding port 0).
//!
//! The listener is closed before the server binds the port, so another process could take
//! it in between; fixtures therefore retry a start that fails to bind. Within this process
//! no port is handed out twice, so tests running in parallel never collide with each other.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, OnceLock};

/// The lowest port handed out when ports below the ephemeral range are used.
const LOWEST: u16 = 10_000;

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// The ports below the ephemeral range, `[LOWEST, first ephemeral)`, if at least 2,000.
fn below_ephemeral() -> Option<(u16, u16)> {
    static RANGE: OnceLock<Option<(u16, u16)>> = OnceLock::new();
    *RANGE.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let first: u16 = text.split_whitespace().next()?.parse().ok()?;
        (first >= LOWEST + 2_000).then_some((LOWEST, first))
    })
}

/// A random number (std's randomly keyed hasher; no extra dependency).
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// A candidate port: free right now (bound and closed again), not yet handed out.
fn candidate() -> u16 {
    if let Some((low, high)) = below_ephemeral() {
        for _ in 0..100 {
            let port = low + (random() % u64::from(high - low)) as u16;
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return port;
            }
        }
    }
    let listener = match TcpListener::bind((Ipv4Addr::LOCALHOST, 0)) {
        Ok(listener) => listener,
        Err(e) => panic!("cannot bind a loopback port: {e}"),
    };
    match listener.local_addr() {
        Ok(addr) => addr.port(),
        Err(e) => panic!("cannot read the address of a loopback listener: {e}"),
    }
}

/// A loopback TCP port that is free now and was never returned before by this process.
///
/// # Panics
///
/// If no port can be bound at all (no loopback interface).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = candidate();
        let mut ports = handed_out()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ports.insert(port) {
            return port;
        }
    }
    panic!("no free loopback port found after 1000 attempts")
}

/// `n` distinct free loopback ports (see [`free_port`]).
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| free_port()).collect()
}

/// True if nothing accepts TCP connections on `127.0.0.1:port` right now.
pub fn is_closed(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        std::time::Duration::from_millis(200),
    )
    .is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_unique() {
        let ports = free_ports(50);
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        assert!(ports.iter().all(|p| *p != 0));
        if let Some((low, high)) = below_ephemeral() {
            assert!(ports.iter().all(|p| (low..high).contains(p)), "{ports:?}");
        }
    }
}
