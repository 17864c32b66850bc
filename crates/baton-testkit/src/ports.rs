//! Free loopback ports for servers started by tests.
//!
//! A port is found by binding `127.0.0.1:0` and reading the port the kernel chose. The
//! listener is closed before the server binds the port, so another process could take it
//! in between; fixtures therefore retry a start that fails to bind. Within this process no
//! port is handed out twice, so tests running in parallel never collide with each other.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, OnceLock};

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A loopback TCP port that is free now and was never returned before by this process.
///
/// # Panics
///
/// If no port can be bound at all (no loopback interface).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let listener = match TcpListener::bind((Ipv4Addr::LOCALHOST, 0)) {
            Ok(listener) => listener,
            Err(e) => panic!("cannot bind a loopback port: {e}"),
        };
        let port = match listener.local_addr() {
            Ok(addr) => addr.port(),
            Err(e) => panic!("cannot read the address of a loopback listener: {e}"),
        };
        drop(listener);
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
    }
}
