//! Baton: distributed coordination for Rust services.
//!
//! Services run as many copies on many machines. Baton gives them:
//!
//! - **exactly one holder**: a [`Mutex`] grants a lock to one session at a time, in FIFO
//!   order, waking only the next waiter on each release;
//! - **knowing at once when that stops being true**: every guard has a `lost()` future that
//!   fires when its key is deleted or revoked, when its lease expires, or when keep-alives
//!   stop being acknowledged before the local deadline ([`Session`]);
//! - **a fencing token on every grant**, so a stale holder's writes can be refused
//!   ([`MutexGuard::fencing_token`], [`MutexGuard::txn`]).
//!
//! Everything rests on a real coordination service, chosen by URL ([`Client::connect`]):
//! etcd (`http://h:p`), or the embedded in-process store (`mem://`), a faithful
//! implementation of etcd's data model used for demos, tests and simulations.
//!
//! # Quick start
//!
//! ```
//! use std::time::Duration;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> baton::Result<()> {
//! let client = baton::Client::connect("mem://").await?;
//! let session = baton::Session::builder(&client)
//!     .with_ttl(Duration::from_secs(10))
//!     .build()
//!     .await?;
//! let lock = baton::Mutex::new(&session, "reports/nightly")?;
//! let guard = lock.lock().await?;
//! tokio::select! {
//!     _ = guard.lost() => eprintln!("lock lost: stop writing"),
//!     _ = async { /* the work, writing with guard.fencing_token() */ } => {}
//! }
//! guard.unlock().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # What is guaranteed, and what is not
//!
//! Leases cannot by themselves guarantee mutual exclusion: a holder paused (GC, SIGSTOP,
//! swapping) past its TTL cannot know another process took over. Baton's answer has two parts:
//! the holder is told as fast as possible (`lost()`, whose local deadline is never later than
//! the server's expiry), and every grant carries a fencing token — the create revision of the
//! lock key — which increases with every grant, so the protected resource can refuse stale
//! writes. [`MutexGuard::txn`] applies a store transaction only while the lock is held.
//!
//! # Key layouts
//!
//! A [`Mutex`] named `NAME` uses the key `NAME/<lease id in lowercase hex>`, empty value,
//! bound to the session's lease — the layout of Go's `clientv3/concurrency` and of
//! `etcdctl lock`, so Go services, operators and Baton share one lock.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]

mod client;
pub mod coordinator;
mod election;
pub mod error;
mod mutex;
mod names;
mod ownership;
mod queue;
mod rwlock;
mod session;
pub mod store;
mod wait;

pub use client::{Client, ClientBuilder, DEFAULT_DIAL_TIMEOUT, DEFAULT_REQUEST_TIMEOUT};
pub use coordinator::{Coordinator, CoordinatorBuilder};
pub use election::{Election, Leader, Leadership, Observe};
pub use error::{Error, Result};
pub use mutex::{Mutex, MutexGuard};
pub use names::MAX_NAME_LEN;
pub use rwlock::{RwLock, RwLockReadGuard, RwLockWriteGuard};
pub use session::{Session, SessionBuilder, DEFAULT_TTL, MAX_TTL, MIN_TTL};
pub use store::Revision;
