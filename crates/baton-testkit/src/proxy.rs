//! A TCP fault proxy on loopback, for faults that must hit the network.
//!
//! [`FaultProxy::start`] listens on a free loopback port and forwards every connection it
//! accepts to one upstream address (an etcd member, a Redis server). Each direction of
//! traffic — client to server, server to client — has its own [`Fault`], changed from test
//! code at any time:
//!
//! - [`Fault::Pass`]: forward at once;
//! - [`Fault::Delay`] and [`Fault::Jitter`]: forward after a fixed or a random delay, in
//!   order (a delay line: each chunk is due at its arrival plus its delay, never before the
//!   chunk ahead of it);
//! - [`Fault::Pause`]: stop reading, so bytes wait in the kernel's buffers and flow again on
//!   [`heal`](FaultProxy::heal), as after a short partition that TCP retransmission covers;
//! - [`Fault::Blackhole`]: accept and read, never forward (the bytes are discarded, as in a
//!   partition that outlives TCP's retransmissions). Connections that lost bytes are reset on
//!   [`heal`](FaultProxy::heal), since their byte streams cannot be resumed;
//! - [`Fault::Reset`]: reset the connection (RST both ways) as soon as a byte flows in that
//!   direction.
//!
//! [`reset_all`](FaultProxy::reset_all) resets every open connection now. A new connection
//! whose upstream refuses is reset. Dropping the proxy closes its listener and resets every
//! connection. The proxy only ever binds and connects to loopback addresses.
//!
//! ```no_run
//! # #[tokio::main] async fn main() {
//! use std::time::Duration;
//! use baton_testkit::proxy::{Direction, Fault, FaultProxy};
//!
//! let etcd = baton_testkit::EtcdServer::start_async().await;
//! let proxy = FaultProxy::start(etcd.client_port()).await;
//! let endpoint = proxy.url("http");            // give this to the client
//! proxy.set(Direction::ServerToClient, Fault::Delay(Duration::from_millis(1500)));
//! proxy.set_both(Fault::Blackhole);            // partition
//! proxy.heal();                                // pass both ways again
//! # }
//! ```

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How many chunks one direction's delay line holds before the reader waits.
const DELAY_LINE_CHUNKS: usize = 256;
/// The largest chunk read at once.
const CHUNK: usize = 16 * 1024;

/// A direction of traffic through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client (who connects to the proxy) to the upstream server.
    ClientToServer,
    /// From the upstream server back to the client.
    ServerToClient,
}

impl Direction {
    /// Both directions.
    pub const BOTH: [Direction; 2] = [Direction::ClientToServer, Direction::ServerToClient];
}

/// What the proxy does to one direction of traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward at once.
    #[default]
    Pass,
    /// Forward after this delay, in order.
    Delay(Duration),
    /// Forward after `base` plus a uniformly random part of `jitter`, in order.
    Jitter {
        /// The smallest delay.
        base: Duration,
        /// The random extra delay is in `[0, jitter]`.
        jitter: Duration,
    },
    /// Stop reading: bytes wait in the kernel's buffers and flow again when the fault
    /// changes.
    Pause,
    /// Read and discard: nothing is ever forwarded. Connections that lost bytes are reset
    /// on [`FaultProxy::heal`].
    Blackhole,
    /// Reset the connection (RST both ways) as soon as a byte flows in this direction.
    Reset,
}

/// Counters of what the proxy has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open now.
    pub open: u64,
    /// Connections reset by a fault, [`FaultProxy::reset_all`] or a refused upstream.
    pub resets: u64,
    /// Bytes forwarded client → server.
    pub forwarded_to_server: u64,
    /// Bytes forwarded server → client.
    pub forwarded_to_client: u64,
    /// Bytes discarded by [`Fault::Blackhole`], both directions.
    pub discarded: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    resets: AtomicU64,
    to_server: AtomicU64,
    to_client: AtomicU64,
    discarded: AtomicU64,
}

/// One open connection, as the proxy tracks it.
struct ConnHandle {
    /// Send `true` to reset the connection.
    reset: watch::Sender<bool>,
    /// True once a blackhole discarded bytes of this connection.
    lost_bytes: Arc<AtomicBool>,
}

struct Shared {
    upstream: SocketAddr,
    faults: [watch::Sender<Fault>; 2],
    conns: StdMutex<HashMap<u64, ConnHandle>>,
    next_id: AtomicU64,
    counters: Counters,
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ConnHandle>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn index(d: Direction) -> usize {
    match d {
        Direction::ClientToServer => 0,
        Direction::ServerToClient => 1,
    }
}

/// A TCP proxy on loopback that injects [`Fault`]s, per direction. See the
/// [module docs](self).
///
/// Dropping it stops accepting and resets every open connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("client_to_server", &self.fault(Direction::ClientToServer))
            .field("server_to_client", &self.fault(Direction::ServerToClient))
            .finish()
    }
}

impl FaultProxy {
    /// Start a proxy on a free loopback port in front of `127.0.0.1:upstream_port`.
    ///
    /// Needs a tokio runtime (the proxy runs as tasks on it).
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub async fn start(upstream_port: u16) -> FaultProxy {
        Self::start_to(SocketAddr::from((Ipv4Addr::LOCALHOST, upstream_port))).await
    }

    /// Start a proxy in front of `upstream`, which must be a loopback address.
    ///
    /// # Panics
    ///
    /// If `upstream` is not a loopback address, or no loopback port can be bound.
    pub async fn start_to(upstream: SocketAddr) -> FaultProxy {
        assert!(
            upstream.ip().is_loopback(),
            "the fault proxy only forwards to loopback addresses, not {upstream}"
        );
        let listener = match TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await {
            Ok(l) => l,
            Err(e) => panic!("fault proxy: cannot bind a loopback port: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("fault proxy: no local address: {e}"),
        };
        let shared = Arc::new(Shared {
            upstream,
            faults: [
                watch::Sender::new(Fault::Pass),
                watch::Sender::new(Fault::Pass),
            ],
            conns: StdMutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        tracing::debug!(%addr, %upstream, "fault proxy started");
        FaultProxy {
            addr,
            shared,
            accept_task,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `SCHEME://127.0.0.1:PORT`, e.g. `proxy.url("http")` for etcd, `proxy.url("redis")`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    /// The upstream address.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The fault in force for `direction`.
    pub fn fault(&self, direction: Direction) -> Fault {
        *self.shared.faults[index(direction)].borrow()
    }

    /// Set the fault for one direction. It applies to open connections at once (a chunk
    /// already in a delay line keeps the delay it was given).
    pub fn set(&self, direction: Direction, fault: Fault) {
        tracing::debug!(addr = %self.addr, ?direction, ?fault, "fault proxy: set");
        self.shared.faults[index(direction)].send_replace(fault);
    }

    /// Set the same fault for both directions.
    pub fn set_both(&self, fault: Fault) {
        for d in Direction::BOTH {
            self.set(d, fault);
        }
    }

    /// Pass both directions again. Connections that a blackhole discarded bytes of are
    /// reset, since their byte streams cannot be resumed; paused bytes flow again.
    pub fn heal(&self) {
        self.set_both(Fault::Pass);
        let conns = self.shared.conns();
        for handle in conns.values() {
            if handle.lost_bytes.load(Ordering::Relaxed) {
                let _ = handle.reset.send(true);
            }
        }
    }

    /// Reset every open connection now (RST to both the client and the upstream). New
    /// connections are accepted as usual.
    pub fn reset_all(&self) {
        let conns = self.shared.conns();
        tracing::debug!(addr = %self.addr, open = conns.len(), "fault proxy: reset all");
        for handle in conns.values() {
            let _ = handle.reset.send(true);
        }
    }

    /// What the proxy has done so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            open: self.shared.conns().len() as u64,
            resets: c.resets.load(Ordering::Relaxed),
            forwarded_to_server: c.to_server.load(Ordering::Relaxed),
            forwarded_to_client: c.to_client.load(Ordering::Relaxed),
            discarded: c.discarded.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.reset_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "fault proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (reset_tx, reset_rx) = watch::channel(false);
        let lost_bytes = Arc::new(AtomicBool::new(false));
        shared.conns().insert(
            id,
            ConnHandle {
                reset: reset_tx,
                lost_bytes: lost_bytes.clone(),
            },
        );
        let shared = shared.clone();
        tokio::spawn(async move {
            connection(client, &shared, reset_rx, lost_bytes).await;
            shared.conns().remove(&id);
        });
    }
}

/// Why a pump stopped.
enum Stop {
    /// The source closed (EOF) and the sink was shut down: the direction is done.
    Done,
    /// A fault asked for a reset, or a socket failed: reset the connection.
    Reset,
}

async fn connection(
    mut client: TcpStream,
    shared: &Shared,
    mut reset: watch::Receiver<bool>,
    lost_bytes: Arc<AtomicBool>,
) {
    let _ = client.set_nodelay(true);
    let mut server = match TcpStream::connect(shared.upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(upstream = %shared.upstream, error = %e, "fault proxy: upstream refused");
            shared.counters.resets.fetch_add(1, Ordering::Relaxed);
            abort(&client);
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let must_reset = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let up = pump(
            cr,
            sw,
            shared.faults[0].subscribe(),
            &shared.counters.to_server,
            &shared.counters.discarded,
            &lost_bytes,
        );
        let down = pump(
            sr,
            cw,
            shared.faults[1].subscribe(),
            &shared.counters.to_client,
            &shared.counters.discarded,
            &lost_bytes,
        );
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Stop::Done => up_done = true,
                    Stop::Reset => break true,
                },
                r = &mut down, if !down_done => match r {
                    Stop::Done => down_done = true,
                    Stop::Reset => break true,
                },
                _ = reset.wait_for(|r| *r) => break true,
            }
            if up_done && down_done {
                break false;
            }
        }
    };
    if must_reset {
        shared.counters.resets.fetch_add(1, Ordering::Relaxed);
        abort(&client);
        abort(&server);
    }
}

/// Make the socket's close send RST instead of FIN.
fn abort(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Forward one direction through its fault until EOF or a reset.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    mut fault: watch::Receiver<Fault>,
    forwarded: &AtomicU64,
    discarded: &AtomicU64,
    lost_bytes: &AtomicBool,
) -> Stop
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(DELAY_LINE_CHUNKS);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        let mut last_due = Instant::now();
        loop {
            if fault.wait_for(|f| *f != Fault::Pause).await.is_err() {
                return Stop::Reset;
            }
            let n = tokio::select! {
                r = from.read(&mut buf) => match r {
                    Ok(n) => n,
                    Err(_) => return Stop::Reset,
                },
                // The fault changed while waiting for bytes (to Pause, say): look again.
                // A read is cancel safe: nothing was consumed.
                _ = fault.changed() => continue,
            };
            if n == 0 {
                return Stop::Done;
            }
            let now = Instant::now();
            let due = match *fault.borrow_and_update() {
                Fault::Pass | Fault::Pause => now,
                Fault::Delay(d) => now + d,
                Fault::Jitter { base, jitter } => now + base + random_up_to(jitter),
                Fault::Blackhole => {
                    discarded.fetch_add(n as u64, Ordering::Relaxed);
                    lost_bytes.store(true, Ordering::Relaxed);
                    continue;
                }
                Fault::Reset => return Stop::Reset,
            };
            let due = due.max(last_due);
            last_due = due;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return Stop::Reset;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return Stop::Reset;
            }
            forwarded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
        Stop::Done
    };
    // The writer ends when the reader drops its sender (EOF) and the line is drained; a
    // reader that wants a reset ends the pump at once.
    tokio::pin!(writer);
    tokio::select! {
        r = reader => match r {
            Stop::Reset => Stop::Reset,
            Stop::Done => writer.await,
        },
        w = &mut writer => w,
    }
}

fn random_up_to(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand_u64() % nanos.saturating_add(1))
}

/// A small thread-local xorshift generator, seeded from the clock and a counter: jitter
/// needs no cryptographic quality, and the testkit needs no `rand` for it.
fn fastrand_u64() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            static SEED: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            (t ^ SEED.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io;

    /// An echo server on loopback; returns its port.
    async fn echo_server() -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        port
    }

    async fn round_trip(addr: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(payload).await?;
        let mut out = vec![0u8; payload.len()];
        s.read_exact(&mut out).await?;
        Ok(out)
    }

    async fn connect(proxy: &FaultProxy) -> TcpStream {
        TcpStream::connect(proxy.addr()).await.unwrap()
    }

    async fn echo(s: &mut TcpStream, msg: &[u8], within: Duration) -> io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut out = vec![0u8; msg.len()];
        match tokio::time::timeout(within, s.read_exact(&mut out)).await {
            Ok(r) => r.map(|_| out),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no echo")),
        }
    }

    #[tokio::test]
    async fn passes_both_ways_and_counts() {
        let proxy = FaultProxy::start(echo_server().await).await;
        assert_eq!(round_trip(proxy.addr(), b"hello").await.unwrap(), b"hello");
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut s = connect(&proxy).await;
        assert_eq!(
            echo(&mut s, &big, Duration::from_secs(10)).await.unwrap(),
            big
        );
        let st = proxy.stats();
        assert_eq!(st.accepted, 2);
        assert_eq!(st.forwarded_to_server, 5 + big.len() as u64);
        assert_eq!(st.forwarded_to_client, 5 + big.len() as u64);
        assert_eq!(st.discarded, 0);
    }

    #[tokio::test]
    async fn delays_each_direction_separately() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut s = connect(&proxy).await;
        echo(&mut s, b"warm", Duration::from_secs(5)).await.unwrap();
        for d in Direction::BOTH {
            proxy.set(d, Fault::Delay(Duration::from_millis(300)));
            let t = Instant::now();
            echo(&mut s, b"x", Duration::from_secs(5)).await.unwrap();
            let took = t.elapsed();
            assert!(took >= Duration::from_millis(300), "{d:?}: {took:?}");
            assert!(took < Duration::from_millis(1500), "{d:?}: {took:?}");
            proxy.set(d, Fault::Pass);
        }
        // Both ways: the delays add up.
        proxy.set_both(Fault::Delay(Duration::from_millis(200)));
        let t = Instant::now();
        echo(&mut s, b"y", Duration::from_secs(5)).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(400));
    }

    #[tokio::test]
    async fn jitter_keeps_order() {
        let proxy = FaultProxy::start(echo_server().await).await;
        proxy.set(
            Direction::ClientToServer,
            Fault::Jitter {
                base: Duration::from_millis(1),
                jitter: Duration::from_millis(30),
            },
        );
        let mut s = connect(&proxy).await;
        let mut sent = Vec::new();
        for i in 0..200u32 {
            let chunk = i.to_be_bytes();
            s.write_all(&chunk).await.unwrap();
            sent.extend_from_slice(&chunk);
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let mut got = vec![0u8; sent.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn pause_holds_bytes_until_heal() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut s = connect(&proxy).await;
        echo(&mut s, b"a", Duration::from_secs(5)).await.unwrap();
        proxy.set(Direction::ServerToClient, Fault::Pause);
        let err = echo(&mut s, b"b", Duration::from_millis(300)).await;
        assert!(err.is_err(), "paused reply arrived");
        proxy.heal();
        let mut out = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&out, b"b");
        echo(&mut s, b"c", Duration::from_secs(5)).await.unwrap();
    }

    #[tokio::test]
    async fn blackhole_discards_and_heal_resets_the_broken_connection() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut s = connect(&proxy).await;
        echo(&mut s, b"a", Duration::from_secs(5)).await.unwrap();
        proxy.set(Direction::ClientToServer, Fault::Blackhole);
        assert!(echo(&mut s, b"lost", Duration::from_millis(300))
            .await
            .is_err());
        // New connections are accepted, and hear nothing either.
        let mut s2 = connect(&proxy).await;
        assert!(echo(&mut s2, b"lost2", Duration::from_millis(300))
            .await
            .is_err());
        assert_eq!(proxy.stats().discarded, 9);
        proxy.heal();
        // The connections that lost bytes are reset; a new one works.
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Err(_) | Ok(0)), "{r:?}");
        let mut s3 = connect(&proxy).await;
        echo(&mut s3, b"back", Duration::from_secs(5))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn reset_fault_and_reset_all() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut s = connect(&proxy).await;
        echo(&mut s, b"a", Duration::from_secs(5)).await.unwrap();
        proxy.reset_all();
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        proxy.set(Direction::ServerToClient, Fault::Reset);
        let mut s = connect(&proxy).await;
        assert!(echo(&mut s, b"x", Duration::from_secs(5)).await.is_err());
        proxy.heal();
        let mut s = connect(&proxy).await;
        echo(&mut s, b"ok", Duration::from_secs(5)).await.unwrap();
        assert!(proxy.stats().resets >= 2);
    }

    #[tokio::test]
    async fn refused_upstream_resets_the_client() {
        let port = crate::ports::free_port();
        let proxy = FaultProxy::start(port).await;
        let mut s = connect(&proxy).await;
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Err(_) | Ok(0)), "{r:?}");
    }

    #[tokio::test]
    async fn drop_resets_connections() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let addr = proxy.addr();
        let mut s = connect(&proxy).await;
        echo(&mut s, b"a", Duration::from_secs(5)).await.unwrap();
        drop(proxy);
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Err(_) | Ok(0)), "{r:?}");
        // The listener is closed soon after.
        let mut refused = false;
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused);
    }
}
