//! A test store: the embedded store with etcd's watch timing added, for unit tests of the
//! code that works around it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::mem::MemStore;
use super::{
    Compare, KeyRange, LeaseGrant, LeaseId, Range, RangeResponse, Revision, SortTarget, Store, Txn,
    TxnOp, TxnResponse, Watch, WatchStream,
};
use crate::error::Result;

/// A [`MemStore`] whose watches take `create` to be created (etcd's take a round trip), and
/// deliver nothing until `sweep` after their creation (as etcd serves a watch registered
/// behind its current revision: at its next sweep), then everything as it happens. Calls
/// itself `backend`. Counts the watches created from now.
#[derive(Debug)]
pub(crate) struct SlowWatches {
    pub(crate) inner: MemStore,
    pub(crate) backend: &'static str,
    pub(crate) create: Duration,
    pub(crate) sweep: Duration,
    pub(crate) created_from_now: AtomicU64,
    /// A key that the next read scanning a prefix by create revision (a sorted range with no
    /// limit, alone or in a transaction) deletes just before it runs: a delete that lands
    /// between a waiter's two reads, every time.
    pub(crate) delete_before_scan: StdMutex<Option<Vec<u8>>>,
    /// A transaction applied just before the next transaction: another client's write
    /// that lands between a read and the transaction that relies on it.
    pub(crate) before_next_txn: StdMutex<Option<Txn>>,
    /// A transaction applied just before every transaction: another client that keeps
    /// writing between our requests.
    pub(crate) before_every_txn: StdMutex<Option<Txn>>,
    /// A transaction applied just before the next transaction that puts this key (once).
    pub(crate) before_txn_putting: StdMutex<Option<(Vec<u8>, Txn)>>,
    /// A transaction applied just before the next transaction that has this compare
    /// (once): a write that lands between two transactions of one call.
    pub(crate) before_txn_comparing: StdMutex<Option<(Compare, Txn)>>,
    /// Fail the next lease revoke, as a store that does not answer in time.
    pub(crate) fail_next_revoke: std::sync::atomic::AtomicBool,
    /// Transactions that delete land this long after they are sent, even if the caller has
    /// stopped waiting (as etcd applies a request it has received).
    pub(crate) delay_deletes: StdMutex<Option<Duration>>,
    /// Apply the next transaction, then answer it with an error (a reply lost on the way).
    pub(crate) lose_next_reply: std::sync::atomic::AtomicBool,
    /// The next transaction that deletes fails at once ("request timed out"), and is
    /// applied this long afterwards all the same (as etcd applies a request whose caller
    /// has given up on it).
    pub(crate) fail_then_land: StdMutex<Option<Duration>>,
    /// A watch of exactly this key (or prefix) ends at once: with no error (a stream closed cleanly,
    /// say by a proxy), or (`true`) after a `Compacted` error (etcd cancels a watch left
    /// behind, before its sweep, by a compaction).
    pub(crate) end_watch_on: StdMutex<Option<(Vec<u8>, bool)>>,
    /// Every read, write and watch fails at once as unavailable (leases still work): the
    /// key-value service down, or cut off.
    pub(crate) kv_down: std::sync::atomic::AtomicBool,
    /// The next transaction that deletes sets [`kv_down`](Self::kv_down) and fails: the
    /// store goes down right then.
    pub(crate) down_at_next_delete: std::sync::atomic::AtomicBool,
    /// The next transaction that puts fails at once ("request timed out"), and is applied
    /// right after the next read that is answered: a request left waiting at a server that
    /// stopped answering, applied when it answers again, just after a later request.
    pub(crate) put_lands_after_next_read: std::sync::atomic::AtomicBool,
    /// The next transaction that puts begins an outage of this long: it, and every read,
    /// write and watch until the outage ends, fail as unavailable (leases are kept alive).
    pub(crate) outage_at_next_put: StdMutex<Option<Duration>>,
    /// When the outage begun by [`outage_at_next_put`](Self::outage_at_next_put) ends.
    outage_until: StdMutex<Option<tokio::time::Instant>>,
    /// The put waiting to land (see [`put_lands_after_next_read`](Self::put_lands_after_next_read)).
    landing: StdMutex<Option<Txn>>,
    /// How many transactions were sent (reads of a queue are transactions).
    pub(crate) txns: AtomicU64,
    /// Reads made (ranges).
    pub(crate) ranges: AtomicU64,
    /// Reads of a queue by create revision (the one etcd 3.4 serves by fetching every key
    /// under the prefix), alone or in a transaction that writes nothing: a waiter's reads,
    /// not a join's.
    pub(crate) queue_reads: AtomicU64,
    /// Lease grants wait this long first.
    pub(crate) grant_delay: StdMutex<Option<Duration>>,
    /// What [`Store::request_timeout`] answers (`None`, as the embedded store, unless set).
    pub(crate) request_timeout: StdMutex<Option<Duration>>,
    /// Every transaction waits this long before it is applied and answered (a slow round
    /// trip: a request stays in flight that long).
    pub(crate) delay_txns: StdMutex<Option<Duration>>,
}

/// True if `range` reads keys by create revision (a queue's read).
fn by_create_revision(range: &Range) -> bool {
    matches!(range.sort, Some((SortTarget::CreateRevision, _)))
}

impl SlowWatches {
    pub(crate) fn new(backend: &'static str, create: Duration, sweep: Duration) -> SlowWatches {
        SlowWatches {
            inner: MemStore::new(),
            backend,
            create,
            sweep,
            created_from_now: AtomicU64::new(0),
            delete_before_scan: StdMutex::new(None),
            before_next_txn: StdMutex::new(None),
            before_every_txn: StdMutex::new(None),
            before_txn_putting: StdMutex::new(None),
            before_txn_comparing: StdMutex::new(None),
            fail_next_revoke: std::sync::atomic::AtomicBool::new(false),
            delay_deletes: StdMutex::new(None),
            lose_next_reply: std::sync::atomic::AtomicBool::new(false),
            fail_then_land: StdMutex::new(None),
            end_watch_on: StdMutex::new(None),
            kv_down: std::sync::atomic::AtomicBool::new(false),
            down_at_next_delete: std::sync::atomic::AtomicBool::new(false),
            put_lands_after_next_read: std::sync::atomic::AtomicBool::new(false),
            landing: StdMutex::new(None),
            outage_at_next_put: StdMutex::new(None),
            outage_until: StdMutex::new(None),
            request_timeout: StdMutex::new(None),
            delay_txns: StdMutex::new(None),
            txns: AtomicU64::new(0),
            ranges: AtomicU64::new(0),
            queue_reads: AtomicU64::new(0),
            grant_delay: StdMutex::new(None),
        }
    }

    /// Fail as unavailable if [`kv_down`](Self::kv_down) is set.
    fn check_kv(&self) -> Result<()> {
        let outage = *self.outage_until.lock().unwrap_or_else(|e| e.into_inner());
        if outage.is_some_and(|until| tokio::time::Instant::now() < until) {
            return Err(crate::error::Error::Unavailable(
                "injected: an outage".into(),
            ));
        }
        if self.kv_down.load(Ordering::Relaxed) {
            return Err(crate::error::Error::Unavailable(
                "injected: store down".into(),
            ));
        }
        Ok(())
    }

    /// Calls itself etcd, and every new watch starts behind: nothing until etcd's sweep,
    /// 100 ms after its creation.
    pub(crate) fn etcd_unsynced() -> SlowWatches {
        SlowWatches::new("etcd", Duration::ZERO, Duration::from_millis(100))
    }

    /// Delete the key set in `delete_before_scan`, once, if `ranges` holds a scan.
    async fn spring<'a>(&self, mut ranges: impl Iterator<Item = &'a Range>) {
        let scans =
            ranges.any(|r| matches!(r.sort, Some((SortTarget::CreateRevision, _))) && r.limit == 0);
        let key = scans
            .then(|| {
                self.delete_before_scan
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
            })
            .flatten();
        if let Some(key) = key {
            let _ = self.inner.delete(KeyRange::Key(key)).await;
        }
    }

    /// The stream of a watch that [`end_watch_on`](Self::end_watch_on) ends at once, if it
    /// does.
    fn ended(&self, watch: &Watch) -> Option<WatchStream> {
        let ends = match (
            &watch.keys,
            &*self.end_watch_on.lock().unwrap_or_else(|e| e.into_inner()),
        ) {
            (KeyRange::Key(k) | KeyRange::Prefix(k), Some((key, compacted))) if k == key => {
                *compacted
            }
            _ => return None,
        };
        Some(if ends {
            Box::pin(futures::stream::once(async {
                Err(crate::error::Error::Compacted {
                    requested: 0,
                    compact_revision: 1,
                })
            }))
        } else {
            Box::pin(futures::stream::empty())
        })
    }

    fn hold_back(&self, stream: WatchStream) -> WatchStream {
        let sweep = tokio::time::Instant::now() + self.sweep;
        Box::pin(stream.then(move |batch| async move {
            tokio::time::sleep_until(sweep).await;
            batch
        }))
    }
}

#[async_trait]
impl Store for SlowWatches {
    fn backend(&self) -> &'static str {
        self.backend
    }
    async fn range(&self, range: Range) -> Result<RangeResponse> {
        self.ranges.fetch_add(1, Ordering::Relaxed);
        if by_create_revision(&range) {
            self.queue_reads.fetch_add(1, Ordering::Relaxed);
        }
        self.check_kv()?;
        self.spring(std::iter::once(&range)).await;
        let resp = self.inner.range(range).await;
        let landing = self
            .landing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(txn) = landing {
            self.inner.txn(txn).await?;
        }
        resp
    }
    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision> {
        self.check_kv()?;
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, keys: KeyRange) -> Result<(i64, Revision)> {
        self.check_kv()?;
        self.inner.delete(keys).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.txns.fetch_add(1, Ordering::Relaxed);
        self.check_kv()?;
        let delay = *self.delay_txns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let gets = txn
            .success
            .iter()
            .chain(&txn.failure)
            .filter_map(|op| match op {
                TxnOp::Get(range) => Some(range),
                _ => None,
            });
        let read_only = txn
            .success
            .iter()
            .chain(&txn.failure)
            .all(|op| matches!(op, TxnOp::Get(_)));
        if read_only && gets.clone().any(by_create_revision) {
            self.queue_reads.fetch_add(1, Ordering::Relaxed);
        }
        self.spring(gets).await;
        let first = self
            .before_next_txn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(first) = first {
            self.inner.txn(first).await?;
        }
        let every = self
            .before_every_txn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(every) = every {
            self.inner.txn(every).await?;
        }
        let first = {
            let mut trap = self
                .before_txn_putting
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let puts = |key: &[u8]| {
                txn.success
                    .iter()
                    .any(|op| matches!(op, TxnOp::Put { key: k, .. } if k.as_slice() == key))
            };
            match trap.take() {
                Some((key, first)) if puts(&key) => Some(first),
                other => {
                    *trap = other;
                    None
                }
            }
        };
        if let Some(first) = first {
            self.inner.txn(first).await?;
        }
        let first = {
            let mut trap = self
                .before_txn_comparing
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match trap.take() {
                Some((compare, first)) if txn.compares.contains(&compare) => Some(first),
                other => {
                    *trap = other;
                    None
                }
            }
        };
        if let Some(first) = first {
            self.inner.txn(first).await?;
        }
        let delay = *self.delay_deletes.lock().unwrap_or_else(|e| e.into_inner());
        let deletes = txn
            .success
            .iter()
            .chain(&txn.failure)
            .any(|op| matches!(op, TxnOp::Delete(_)));
        if let (Some(delay), true) = (delay, deletes) {
            let inner = self.inner.clone();
            let landing = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                inner.txn(txn).await
            });
            return landing
                .await
                .unwrap_or_else(|e| Err(crate::error::Error::Store(e.to_string())));
        }
        if deletes && self.down_at_next_delete.swap(false, Ordering::Relaxed) {
            self.kv_down.store(true, Ordering::Relaxed);
            self.check_kv()?;
        }
        if deletes {
            let land = self
                .fail_then_land
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(after) = land {
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = inner.txn(txn).await;
                });
                return Err(crate::error::Error::Store("request timed out".into()));
            }
        }
        let puts = txn
            .success
            .iter()
            .chain(&txn.failure)
            .any(|op| matches!(op, TxnOp::Put { .. }));
        let outage = if puts {
            (self.outage_at_next_put)
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
        } else {
            None
        };
        if let Some(outage) = outage {
            *self.outage_until.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(tokio::time::Instant::now() + outage);
            self.check_kv()?;
        }
        if puts
            && self
                .put_lands_after_next_read
                .swap(false, Ordering::Relaxed)
        {
            *self.landing.lock().unwrap_or_else(|e| e.into_inner()) = Some(txn);
            return Err(crate::error::Error::Store("request timed out".into()));
        }
        if self.lose_next_reply.swap(false, Ordering::Relaxed) {
            self.inner.txn(txn).await?;
            return Err(crate::error::Error::Store("connection reset".into()));
        }
        self.inner.txn(txn).await
    }
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseGrant> {
        let delay = *self.grant_delay.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<Option<Duration>> {
        self.inner.lease_keep_alive(id).await
    }
    async fn lease_revoke(&self, id: LeaseId) -> Result<()> {
        if self.fail_next_revoke.swap(false, Ordering::Relaxed) {
            return Err(crate::error::Error::Timeout {
                operation: "lease revoke",
                after: Duration::ZERO,
            });
        }
        self.inner.lease_revoke(id).await
    }
    async fn lease_time_to_live(&self, id: LeaseId) -> Result<Option<Duration>> {
        self.inner.lease_time_to_live(id).await
    }
    async fn watch(&self, watch: Watch) -> Result<WatchStream> {
        self.check_kv()?;
        tokio::time::sleep(self.create).await;
        if let Some(ended) = self.ended(&watch) {
            return Ok(ended);
        }
        Ok(self.hold_back(self.inner.watch(watch).await?))
    }
    async fn watch_from_now(&self, watch: Watch) -> Result<(Revision, WatchStream)> {
        self.check_kv()?;
        self.created_from_now.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.create).await;
        if let Some(ended) = self.ended(&watch) {
            let at = (self.inner)
                .range(Range::key(watch.keys.bytes().to_vec()).keys_only())
                .await;
            return Ok((at?.header_revision, ended));
        }
        let (at, stream) = self.inner.watch_from_now(watch).await?;
        Ok((at, self.hold_back(stream)))
    }
    async fn compact(&self, revision: Revision) -> Result<()> {
        self.inner.compact(revision).await
    }
    fn request_timeout(&self) -> Option<Duration> {
        *self
            .request_timeout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// A test store made of hooks around another: each call goes to [`inner`](Hooks::inner)
/// unless the test's type overrides it (refusing a key, failing a call once, racing a
/// write in before it). Every type that implements it is a [`Store`].
#[async_trait]
pub(crate) trait Hooks: std::fmt::Debug + Send + Sync + 'static {
    /// The store underneath.
    fn inner(&self) -> &dyn Store;

    async fn range(&self, range: Range) -> Result<RangeResponse> {
        self.inner().range(range).await
    }

    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision> {
        self.inner().put(key, value, lease).await
    }

    async fn delete(&self, keys: KeyRange) -> Result<(i64, Revision)> {
        self.inner().delete(keys).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.inner().txn(txn).await
    }

    async fn watch(&self, watch: Watch) -> Result<WatchStream> {
        self.inner().watch(watch).await
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseGrant> {
        self.inner().lease_grant(ttl).await
    }
}

#[async_trait]
impl<H: Hooks> Store for H {
    fn backend(&self) -> &'static str {
        self.inner().backend()
    }

    async fn range(&self, range: Range) -> Result<RangeResponse> {
        Hooks::range(self, range).await
    }

    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision> {
        Hooks::put(self, key, value, lease).await
    }

    async fn delete(&self, keys: KeyRange) -> Result<(i64, Revision)> {
        Hooks::delete(self, keys).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        Hooks::txn(self, txn).await
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseGrant> {
        Hooks::lease_grant(self, ttl).await
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<Option<Duration>> {
        self.inner().lease_keep_alive(id).await
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<()> {
        self.inner().lease_revoke(id).await
    }

    async fn lease_time_to_live(&self, id: LeaseId) -> Result<Option<Duration>> {
        self.inner().lease_time_to_live(id).await
    }

    fn request_timeout(&self) -> Option<Duration> {
        self.inner().request_timeout()
    }

    async fn watch(&self, watch: Watch) -> Result<WatchStream> {
        Hooks::watch(self, watch).await
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.inner().compact(revision).await
    }
}

/// The embedded store, whose open watches can be cut (a broken connection) at will, again
/// and again: [`cut_watches`](CutWatches::cut_watches) ends every watch open now.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct CutWatches {
    inner: MemStore,
    cut: StdMutex<tokio_util::sync::CancellationToken>,
}

#[cfg(test)]
impl CutWatches {
    /// End every watch open now (later ones live until the next cut).
    pub(crate) fn cut_watches(&self) {
        let open = std::mem::take(&mut *self.cut.lock().unwrap_or_else(|e| e.into_inner()));
        open.cancel();
    }
}

#[cfg(test)]
#[async_trait]
impl Hooks for CutWatches {
    fn inner(&self) -> &dyn Store {
        &self.inner
    }

    async fn watch(&self, watch: Watch) -> Result<WatchStream> {
        let cut = self
            .cut
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .cancelled_owned();
        Ok(self.inner.watch(watch).await?.take_until(cut).boxed())
    }
}
