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
//! implementation of etcd's data model used for demos, tests and simulations. Teams that
//! already run Redis can use it through the backend-neutral [`Coordinator`]: one server
//! (`redis://h:p`, with a fencing token) or Redlock over independent masters
//! (`redlock://h1:p1,h2:p2,h3:p3`, without one); the `baton::redis` module (feature
//! `redis`) says what each guarantees and what it does not.
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
//! # The primitives
//!
//! | type | what it is | Go / etcdctl equivalent |
//! |---|---|---|
//! | [`Session`] | a lease kept alive; the liveness of everything bound to it | `concurrency.Session` |
//! | [`Mutex`] | a fair mutual-exclusion lock with fencing tokens | `concurrency.Mutex`, `etcdctl lock` |
//! | [`RwLock`] | a fair read-write lock | `recipe.RWMutex` |
//! | [`Election`] | leader election with proclaimed values and observation | `concurrency.Election`, `etcdctl elect` |
//! | [`Semaphore`] | a fair counting semaphore with lease-bound permits | – |
//! | [`Barrier`] | a gate: waiters block until it is released | `recipe.Barrier` |
//! | [`DoubleBarrier`] | `count` participants enter together and leave together | `recipe.DoubleBarrier` |
//! | [`Queue`] | a FIFO work queue; each item to exactly one consumer | `recipe.Queue` |
//! | [`PriorityQueue`] | the same, lower priority numbers first | `recipe.PriorityQueue` |
//! | [`CountDownLatch`] | waiters go after `count` count-downs | – |
//! | [`SharedValue`], [`SharedCount`] | a value every node reads, compare-and-sets and watches | Curator's `SharedValue` |
//! | [`Stm`] | multi-key transactions retried on conflict, four isolation levels | `concurrency.STM` |
//! | [`Coordinator`] | locks and elections on any backend (etcd, `mem://`, Redis, Redlock) behind one URL, through backend-neutral traits | – |
//!
//! # Key layouts
//!
//! A [`Mutex`] or [`Election`] named `NAME` uses the key `NAME/<lease id in lowercase hex>`,
//! bound to the session's lease (empty value for a mutex, the candidate's value for an
//! election) — the layout of Go's `clientv3/concurrency` and of `etcdctl lock` /
//! `etcdctl elect`, so Go services, operators and Baton share one lock or election. An
//! [`RwLock`] uses `NAME/read/…` and `NAME/write/…` like Go's `contrib/recipes`.
//!
//! One key is Baton's own: a [`Mutex`] holder (or an [`Election`] leader campaigned with an
//! empty value) that waited in a long queue (more than 8 ahead of it) writes its fencing
//! token to its name's handoff mark, bound to its lease, in
//! the transaction that releases it: the name with `"\0baton-handoff"` inserted after its
//! first component (`jobs\0baton-handoff` for `jobs`, `locks\0baton-handoff/db` for
//! `locks/db`; a NUL, which no name contains). Its successor, woken by that delete, reads
//! the mark and its own key instead of the whole queue (which etcd 3.4 serves by fetching
//! every key under `NAME/`). The mark lies under no prefix of the name or of its parents,
//! so Go's waiters and `etcdctl` never see it; Go holders write none (their successors then
//! read the queue, as without marks). With a [namespace](ClientBuilder::with_namespace) it
//! lies under the namespace's prefix, as every key of the client does: a Go lock or
//! election named as the namespace itself (`team-a` for `team-a/`) would count it. One mark per name stays after its queue drains, until
//! the session that wrote it last ends. A role that does not cover the mark works too: the
//! client then leaves and reads no marks (see `docs/security.md`).
//!
//! The recipes keep Go's layouts where Go has the recipe: a [`Barrier`] is the key `NAME`; a
//! [`DoubleBarrier`] uses `NAME/waiters/<lease id in hex>` and `NAME/ready`; a [`Queue`]
//! holds items at `NAME/<nanoseconds>` and a [`PriorityQueue`] at
//! `NAME/<priority, 5 digits>/<sequence, 16 digits>`, both without a lease, so items outlive
//! their producers; a priority queue also rewrites the key `__NAME/<priority>` on each
//! enqueue (Go's layout: it orders the enqueues), outside `NAME/`. A [`Semaphore`] uses `NAME/<lease id in hex>` holding `COUNT/PERMITS`; a
//! [`CountDownLatch`] the key `NAME` holding `REMAINING/COUNT`; a [`SharedValue`] or
//! [`SharedCount`] its key as given. Each type's documentation details its layout.
//!
//! ## Names shared by different types
//!
//! Within one type, names are independent: locks `a` and `a/b` never wait for each other.
//! Across types, keys may overlap, and Baton tells them apart by their lease, as Go writes
//! them: queue items never have one, while the keys of locks, elections, read-write locks,
//! semaphores and double-barrier waiters always do. So a [`Queue`] or [`PriorityQueue`]
//! never takes (deletes) a lock's key: queue `jobs` leaves lock `jobs`'s key `jobs/<lease>`
//! alone. And keys without a lease never hold a lock, election, read-write lock or
//! semaphore: queue `jobs`'s items, or a [`Barrier`] or [`CountDownLatch`] named `deploy/1`
//! (the key `deploy/1`), neither block lock `jobs` or `deploy` nor lead election `jobs`.
//!
//! Some pairs cannot be told apart, because both sides' keys have the same shape and are
//! bound to a lease (or both have none). Do not give them the same names:
//!
//! - a [`Mutex`], an [`Election`] and a [`Semaphore`] named `NAME`: all three are the
//!   queue of keys `NAME/<lease>`;
//! - an [`RwLock`] `NAME` and a lock, election or semaphore named `NAME/read` or
//!   `NAME/write`; a [`DoubleBarrier`] `NAME` and a lock, election or semaphore named
//!   `NAME/waiters`;
//! - a [`Barrier`] held with [`hold_while`](Barrier::hold_while) (its key `NAME` bound to a
//!   lease) whose name ends in `/` and hex digits (`deploy/1`) and a lock, election or
//!   semaphore named what comes before (`deploy`);
//! - a [`Queue`] `NAME/PPPPP` and a [`PriorityQueue`] `NAME` (both use items
//!   `NAME/PPPPP/<digits>`);
//! - a [`Queue`] `NAME` and a [`Barrier`], [`CountDownLatch`], [`SharedValue`] or
//!   [`SharedCount`] named `NAME/` and 16 or more digits (an item's shape: the queue's
//!   consumers would take it); shorter names (`jobs/1`, `jobs/cafe`) are safe. Likewise a
//!   [`PriorityQueue`] `NAME` and such a key named `NAME/PPPPP/` and 16 or more digits;
//! - types whose key is the name itself ([`Barrier`], [`CountDownLatch`], [`SharedValue`],
//!   [`SharedCount`]) given the same name.
//!
//! Waiters queue by create revision. Each waits only for its immediate predecessor, through
//! a watch opened from etcd's next write (the client's shared watch of the queue, or one on
//! the predecessor's key, then one more read: so etcd serves it from its synced group, not
//! its 100 ms sweep), and re-reads its own key after every wait, so a waiter whose lease
//! ended while it queued is told so instead of being granted the lock (etcd #11456).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]

mod barrier;
mod client;
pub mod coordinator;
mod deadline;
mod double_barrier;
mod election;
pub mod error;
mod hub;
mod latch;
mod mutex;
mod names;
mod ownership;
mod priority_queue;
mod queue;
mod race;
#[cfg(feature = "redis")]
pub mod redis;
mod rwlock;
mod security;
mod semaphore;
mod session;
mod shared_value;
mod stm;
pub mod store;
mod wait;
mod watching;
mod work_queue;

pub use barrier::Barrier;
pub use client::{Client, ClientBuilder, DEFAULT_DIAL_TIMEOUT, DEFAULT_REQUEST_TIMEOUT};
pub use coordinator::{Coordinator, CoordinatorBuilder};
pub use double_barrier::{DoubleBarrier, DoubleBarrierGuard};
pub use election::{Election, Leader, LeaderEvent, LeaderEvents, Leadership, Observe};
pub use error::{Error, Result};
pub use hub::ClientStats;
pub use latch::CountDownLatch;
pub use mutex::{Mutex, MutexGuard};
pub use names::{MAX_NAME_LEN, MAX_VALUE_LEN};
pub use priority_queue::PriorityQueue;
pub use rwlock::{RwLock, RwLockReadGuard, RwLockWriteGuard};
pub use security::{Credentials, TlsConfig};
pub use semaphore::{Semaphore, SemaphorePermit};
pub use session::{
    Session, SessionBuilder, DEFAULT_TTL, MAX_TTL, MIN_KEEP_ALIVE_INTERVAL, MIN_TTL,
};
pub use shared_value::{Changes, CompareAndSet, SharedCount, SharedValue, Versioned};
pub use stm::{Isolation, Stm, StmTx, MAX_TXN_KEYS};
pub use store::Revision;
pub use work_queue::Queue;
