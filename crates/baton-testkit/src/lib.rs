//! Test fixtures for Baton (not published).
//!
//! - [`EtcdServer`] and [`EtcdCluster`]: real etcd members on free loopback ports, in
//!   temporary directories, killed on drop (and by the kernel if the test process dies).
//! - [`RedisServer`] and [`RedisServers`]: real `redis-server`s without persistence, the
//!   same way (one server, or N independent masters for Redlock).
//! - [`TestPki`]: a throw-away CA with server and client certificates, for TLS tests.
//! - [`ports`]: free loopback ports that parallel tests never share.
//! - [`conformance`]: the behaviours every store must show, run on every backend.
//! - [`proxy`]: a TCP fault proxy (delay, jitter, pause, blackhole, reset, per direction).
//! - [`lost_answers`]: a store over another that applies chosen transactions and loses
//!   their answers.
//! - [`oracle`]: the fenced-resource oracle and the history checker of the fault suite.
//! - [`scenarios`]: fault scenarios shared by the fault suites of every backend.
//! - [`worker`]: worker processes that tests pause (SIGSTOP/SIGCONT) and kill.
//! - [`connect_client`]: the client most fault tests build.
//! - [`etcd_available`]: whether the etcd binary is there, for a clear message instead of a
//!   spawn error.
//!
//! The binaries are found through `BATON_ETCD_BIN` / `BATON_ETCDCTL_BIN`, else in
//! `/usr/bin`, else on the `PATH`.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> baton::Result<()> {
//! use baton::store::etcd::{EtcdOptions, EtcdStore};
//! use baton::store::Store;
//!
//! let etcd = baton_testkit::EtcdServer::start();
//! let store = EtcdStore::connect(&[etcd.endpoint()], EtcdOptions::default()).await?;
//! store.put(b"k", b"v", 0).await?;
//! # Ok(()) }
//! ```

// Fixtures report a broken environment (no etcd, a server that does not start) by
// panicking with a message that says what to fix: that is their interface.
#![allow(clippy::panic)]

pub mod bank;
pub mod conformance;
pub mod etcd;
pub mod lost_answers;
pub mod oracle;
pub mod ports;
mod process;
pub mod proxy;
pub mod redis;
pub mod scenarios;
pub mod tls;
pub mod worker;

pub use etcd::{
    etcd_available, etcd_bin, etcdctl, etcdctl_bin, EtcdCluster, EtcdServer, EtcdServerOptions,
};
pub use ports::free_port;
pub use redis::{redis_available, redis_bin, RedisServer, RedisServerOptions, RedisServers};
pub use tls::TestPki;

/// A [`baton::Client`] on `endpoints` with the given request timeout and a 2 s dial
/// timeout: the client most fault tests build. Panics if it cannot connect.
pub async fn connect_client(
    endpoints: &str,
    request_timeout: std::time::Duration,
) -> baton::Client {
    baton::Client::builder(endpoints)
        .with_request_timeout(request_timeout)
        .with_dial_timeout(std::time::Duration::from_secs(2))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect a client to {endpoints}: {e}"))
}
