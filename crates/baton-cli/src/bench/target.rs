//! What a scenario measures: a [`Target`] makes [`Worker`]s (each a connection and a session,
//! as a separate process would have), which lock and campaign, giving [`Held`]s.
//!
//! [`BatonTarget`] is Baton on the store family (etcd, `mem://`). Peers are in
//! [`super::peer`]; a Redis backend plugs in the same way.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio_util::task::TaskTracker;

use crate::cli::{self, Global};
use crate::exit::CliError;

/// A scenario's failure, as one line of text.
#[derive(Debug)]
pub(crate) struct Failure(pub(crate) String);

impl<E: Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

pub(crate) type Result<T> = std::result::Result<T, Failure>;

/// What a target has done so far, summed over every worker it made.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    /// Keep-alive requests sent.
    pub(crate) keep_alives: u64,
    /// Waiter wake-ups, where the target can count them.
    pub(crate) wakeups: Option<u64>,
    /// Watch streams opened, where the target can count them.
    pub(crate) watches_opened: Option<u64>,
}

/// An implementation being measured, on one backend.
#[async_trait]
pub(crate) trait Target: Send + Sync {
    /// How it is named in reports: `baton`, or the peer's name.
    fn name(&self) -> &'static str;

    /// The backend: `etcd`, `mem`.
    fn backend(&self) -> &'static str;

    /// A new worker with its own connection and its own session (lease).
    async fn worker(&self) -> Result<Box<dyn Worker>>;

    /// End `held` from outside, from a connection of the target's own, as an operator or
    /// an expiry would: revoke its lease.
    async fn revoke(&self, held: &dyn Held) -> Result<()>;

    /// How many keys are queued on lock or election `name`, the holder's included.
    async fn queued(&self, name: &str) -> Result<usize>;

    /// Counters over every worker made so far.
    fn counters(&self) -> Counters;

    /// What `lost` measures for this target, if it is not `lost()` itself.
    fn lost_note(&self) -> Option<&'static str> {
        None
    }

    /// Delete what the run left on the backend under the names starting with `prefix`,
    /// once its workers are closed: on Redis, the fencing counters and the other keys that
    /// outlive a hold. Nothing to do where every key is bound to a lease (etcd, `mem://`).
    async fn clean_up(&self, _prefix: &str) -> Result<()> {
        Ok(())
    }
}

/// One connection and one session.
#[async_trait]
pub(crate) trait Worker: Send + Sync {
    /// Wait until lock `name` is ours.
    async fn lock(&self, name: &str) -> Result<Box<dyn Held>>;

    /// Campaign in election `name` with `value`, and wait until we lead.
    async fn campaign(&self, name: &str, value: &str) -> Result<Box<dyn Held>>;

    /// End the session (revoke its lease).
    async fn close(&self);
}

/// A lock or leadership held.
#[async_trait]
pub(crate) trait Held: Send + Sync {
    /// The lease the hold is bound to (etcd); 0 where there is none (Redis).
    fn lease(&self) -> i64;

    /// The key held, where ending the hold from outside means deleting it (Redis).
    fn key(&self) -> Option<&str> {
        None
    }

    /// Completes when the holder is told that the hold is lost.
    fn lost(&self) -> BoxFuture<'_, ()>;

    /// Unlock, or resign.
    async fn release(self: Box<Self>) -> Result<()>;
}

/// Baton on the store family, through its public API.
pub(crate) struct BatonTarget {
    /// The global options, for connecting workers as the admin client was connected:
    /// with `--namespace`, the credentials and the TLS settings.
    global: Global,
    ttl: Duration,
    /// For revokes and reading queues: never a worker's connection.
    admin: baton::Client,
    /// The clients of the workers not yet closed, and the final counters of those closed.
    registry: Arc<Registry>,
}

/// Every worker's client, for [`Target::counters`]. A closed worker's client is dropped
/// (ending its watches), its counters kept.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    live: StdMutex<HashMap<u64, baton::Client>>,
    closed: StdMutex<baton::ClientStats>,
}

impl Registry {
    fn add(&self, client: baton::Client) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, client);
        id
    }

    fn retire(&self, id: u64) {
        let client = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(c) = client {
            let s = c.stats();
            let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
            closed.keep_alives += s.keep_alives;
            closed.wakeups += s.wakeups;
            closed.watches_opened += s.watches_opened;
        }
    }
}

impl BatonTarget {
    /// Connect the admin client; workers connect on their own, the same way (the same
    /// namespace, credentials and TLS settings).
    pub(crate) async fn connect(
        global: &Global,
        ttl: Duration,
    ) -> std::result::Result<Self, CliError> {
        let admin = cli::connect(global, &global.endpoints).await?;
        Ok(BatonTarget {
            global: global.clone(),
            ttl,
            admin,
            registry: Arc::default(),
        })
    }

    /// The endpoints, credentials redacted.
    pub(crate) fn endpoints(&self) -> &str {
        self.admin.endpoints()
    }
}

#[async_trait]
impl Target for BatonTarget {
    fn name(&self) -> &'static str {
        "baton"
    }

    fn backend(&self) -> &'static str {
        self.admin.backend()
    }

    async fn worker(&self) -> Result<Box<dyn Worker>> {
        let client = cli::connect(&self.global, &self.global.endpoints)
            .await
            .map_err(|e| Failure(e.message().unwrap_or("cannot connect").to_string()))?;
        let session = baton::Session::builder(&client)
            .with_ttl(self.ttl)
            .build()
            .await?;
        let id = self.registry.add(client);
        Ok(Box::new(BatonWorker {
            session,
            id,
            registry: self.registry.clone(),
        }))
    }

    async fn revoke(&self, held: &dyn Held) -> Result<()> {
        Ok(self.admin.store().lease_revoke(held.lease()).await?)
    }

    async fn queued(&self, name: &str) -> Result<usize> {
        let prefix = format!("{name}/");
        let resp = self
            .admin
            .store()
            .range(baton::store::Range::prefix(prefix.as_bytes().to_vec()))
            .await?;
        Ok(resp
            .kvs
            .iter()
            .filter(|kv| !kv.key[prefix.len()..].contains(&b'/'))
            .count())
    }

    fn counters(&self) -> Counters {
        let closed = *self
            .registry
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let clients = self.registry.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = Counters {
            keep_alives: closed.keep_alives,
            wakeups: Some(closed.wakeups),
            watches_opened: Some(closed.watches_opened),
        };
        for client in clients.values() {
            let s = client.stats();
            c.keep_alives += s.keep_alives;
            c.wakeups = c.wakeups.map(|w| w + s.wakeups);
            c.watches_opened = c.watches_opened.map(|w| w + s.watches_opened);
        }
        c
    }
}

struct BatonWorker {
    session: baton::Session,
    id: u64,
    registry: Arc<Registry>,
}

#[async_trait]
impl Worker for BatonWorker {
    async fn lock(&self, name: &str) -> Result<Box<dyn Held>> {
        let guard = baton::Mutex::new(&self.session, name)?.lock().await?;
        Ok(Box::new(BatonHeld::Lock(guard)))
    }

    async fn campaign(&self, name: &str, value: &str) -> Result<Box<dyn Held>> {
        let leadership = baton::Election::new(&self.session, name)?
            .campaign(value)
            .await?;
        Ok(Box::new(BatonHeld::Lead(leadership)))
    }

    async fn close(&self) {
        cli::close(&self.session).await;
        self.registry.retire(self.id);
    }
}

enum BatonHeld {
    Lock(baton::MutexGuard),
    Lead(baton::Leadership),
}

#[async_trait]
impl Held for BatonHeld {
    fn lease(&self) -> i64 {
        match self {
            BatonHeld::Lock(g) => g.session().lease_id(),
            BatonHeld::Lead(l) => l.session().lease_id(),
        }
    }

    fn lost(&self) -> BoxFuture<'_, ()> {
        match self {
            BatonHeld::Lock(g) => Box::pin(g.lost()),
            BatonHeld::Lead(l) => Box::pin(l.lost()),
        }
    }

    async fn release(self: Box<Self>) -> Result<()> {
        match *self {
            BatonHeld::Lock(g) => g.unlock().await?,
            BatonHeld::Lead(l) => l.resign().await?,
        }
        Ok(())
    }
}

/// A target that knows which of its workers are not closed yet, so that a run that is cut
/// short (a signal drops the scenario midway) can still close them, revoking their leases,
/// rather than leave their keys for the whole TTL.
pub(crate) struct Tracked {
    inner: Arc<dyn Target>,
    live: Arc<Live>,
    /// The workers being built: each on a task of its own, so that one half built when the
    /// scenario is dropped is still registered, and then closed.
    building: TaskTracker,
}

/// The workers made and not yet closed.
#[derive(Default)]
struct Live {
    next: AtomicU64,
    workers: StdMutex<HashMap<u64, Arc<dyn Worker>>>,
}

impl Live {
    fn add(&self, worker: Arc<dyn Worker>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, worker);
        id
    }

    fn remove(&self, id: u64) {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

impl Tracked {
    pub(crate) fn new(inner: Arc<dyn Target>) -> Self {
        Tracked {
            inner,
            live: Arc::default(),
            building: TaskTracker::new(),
        }
    }

    /// Close every worker not closed yet, once those being built are (each within the
    /// dial timeout, then within [`cli::RELEASE_TIMEOUT`]). Meant for when the scenario
    /// was dropped: its workers are no longer in use.
    ///
    /// # Cancel safety
    ///
    /// The workers not closed when the future is dropped keep their leases until the TTL.
    pub(crate) async fn close_all(&self) {
        self.building.close();
        self.building.wait().await;
        let workers: Vec<Arc<dyn Worker>> = self
            .live
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, w)| w)
            .collect();
        futures::stream::iter(workers)
            // All at once, as a scenario closes its own (see `scenario::close_all`): with
            // the backend gone, each waits up to the release timeout.
            .for_each_concurrent(None, |w| async move { w.close().await })
            .await;
    }
}

#[async_trait]
impl Target for Tracked {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn worker(&self) -> Result<Box<dyn Worker>> {
        let (inner, live) = (self.inner.clone(), self.live.clone());
        let built = self.building.spawn(async move {
            let worker: Arc<dyn Worker> = Arc::from(inner.worker().await?);
            let id = live.add(worker.clone());
            Ok::<_, Failure>(TrackedWorker {
                inner: worker,
                id,
                live,
            })
        });
        Ok(Box::new(built.await??))
    }

    async fn revoke(&self, held: &dyn Held) -> Result<()> {
        self.inner.revoke(held).await
    }

    async fn queued(&self, name: &str) -> Result<usize> {
        self.inner.queued(name).await
    }

    fn counters(&self) -> Counters {
        self.inner.counters()
    }

    fn lost_note(&self) -> Option<&'static str> {
        self.inner.lost_note()
    }

    async fn clean_up(&self, prefix: &str) -> Result<()> {
        self.inner.clean_up(prefix).await
    }
}

/// A worker of a [`Tracked`] target: forgotten once closed.
struct TrackedWorker {
    inner: Arc<dyn Worker>,
    id: u64,
    live: Arc<Live>,
}

#[async_trait]
impl Worker for TrackedWorker {
    async fn lock(&self, name: &str) -> Result<Box<dyn Held>> {
        self.inner.lock(name).await
    }

    async fn campaign(&self, name: &str, value: &str) -> Result<Box<dyn Held>> {
        self.inner.campaign(name, value).await
    }

    /// Forgotten only once closed: a close cut short is done again by
    /// [`Tracked::close_all`].
    async fn close(&self) {
        self.inner.close().await;
        self.live.remove(self.id);
    }
}
