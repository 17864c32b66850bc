//! A store that loses answers: it wraps another (real etcd, say) and, when told, applies a
//! transaction that deletes, then answers it with an error, as a connection cut after the
//! server applied a request (or a timeout just then) does. The fault proxy cuts
//! connections at random moments; this loses exactly the answers chosen.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> baton::Result<()> {
//! use baton::store::etcd::{EtcdOptions, EtcdStore};
//! use baton_testkit::lost_answers::LoseAnswers;
//!
//! let etcd = baton_testkit::EtcdServer::start();
//! let store = EtcdStore::connect(&[etcd.endpoint()], EtcdOptions::default()).await?;
//! let lossy = LoseAnswers::new(store);
//! lossy.lose_every_nth_delete(2);
//! let client = baton::Client::from_store(lossy.clone());
//! # let _ = client; Ok(()) }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use baton::store::{
    KeyRange, LeaseGrant, LeaseId, Range, RangeResponse, Revision, Store, Txn, TxnOp, TxnResponse,
    Watch, WatchStream,
};
use baton::{Error, Result};

/// A [`Store`] over `inner` that loses the answers of chosen transactions that delete a
/// key (a queue's claim, a lock's release, …) after `inner` applied them. Clones share the
/// knobs and counters.
#[derive(Clone, Debug)]
pub struct LoseAnswers {
    inner: Arc<dyn Store>,
    knobs: Arc<Knobs>,
}

#[derive(Debug, Default)]
struct Knobs {
    /// Lose the answer of every `nth` transaction that deletes a key (0: none).
    nth: AtomicU64,
    /// Transactions that delete a key, seen since `nth` was set.
    seen: AtomicU64,
    /// Answers lost so far.
    lost: AtomicU64,
    /// How long a lost answer's error takes to come, in milliseconds (a timeout, a
    /// connection that dies slowly).
    delay_ms: AtomicU64,
    /// True: a lost answer is the inner store's request timeout instead
    /// ([`LoseAnswers::time_out_lost_answers`]).
    timed_out: std::sync::atomic::AtomicBool,
}

impl LoseAnswers {
    /// A store over `inner` that loses nothing until told.
    pub fn new(inner: impl Store) -> LoseAnswers {
        LoseAnswers {
            inner: Arc::new(inner),
            knobs: Arc::default(),
        }
    }

    /// From now, apply every `nth` transaction that deletes a key (1: every one) and answer
    /// it with [`Error::Unavailable`] (retryable: the caller cannot tell it was applied).
    /// 0 loses no more answers.
    pub fn lose_every_nth_delete(&self, nth: u64) {
        self.knobs.seen.store(0, Ordering::SeqCst);
        self.knobs.nth.store(nth, Ordering::SeqCst);
    }

    /// From now, a lost answer's error comes `delay` after the transaction was applied.
    pub fn delay_lost_answers(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.knobs.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// From now (`true`), a lost answer fails as a request that etcd applied but whose
    /// answer did not come within the inner store's request timeout does: with
    /// [`Error::Timeout`], once that whole timeout has passed since the send (a member that
    /// applies, then stalls; a reply delayed past the timeout). The delay of
    /// [`delay_lost_answers`](Self::delay_lost_answers) is then not used.
    pub fn time_out_lost_answers(&self, timed_out: bool) {
        self.knobs.timed_out.store(timed_out, Ordering::SeqCst);
    }

    /// How many answers were lost so far.
    pub fn lost(&self) -> u64 {
        self.knobs.lost.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Store for LoseAnswers {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn range(&self, range: Range) -> Result<RangeResponse> {
        self.inner.range(range).await
    }
    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision> {
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, keys: KeyRange) -> Result<(i64, Revision)> {
        self.inner.delete(keys).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let deletes = txn
            .success
            .iter()
            .any(|op| matches!(op, TxnOp::Delete { .. }));
        let nth = self.knobs.nth.load(Ordering::SeqCst);
        let lose = deletes
            && nth > 0
            && (self.knobs.seen.fetch_add(1, Ordering::SeqCst) + 1).is_multiple_of(nth);
        let sent = tokio::time::Instant::now();
        let answer = self.inner.txn(txn).await;
        if lose && answer.is_ok() {
            self.knobs.lost.fetch_add(1, Ordering::SeqCst);
            if self.knobs.timed_out.load(Ordering::SeqCst) {
                let after = self
                    .inner
                    .request_timeout()
                    .unwrap_or(baton::DEFAULT_REQUEST_TIMEOUT);
                tokio::time::sleep_until(sent + after).await;
                return Err(Error::Timeout {
                    operation: "txn",
                    after,
                });
            }
            let delay = self.knobs.delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            return Err(Error::Unavailable(
                "injected: the answer was lost after the transaction was applied".into(),
            ));
        }
        answer
    }
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseGrant> {
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<Option<Duration>> {
        self.inner.lease_keep_alive(id).await
    }
    async fn lease_revoke(&self, id: LeaseId) -> Result<()> {
        self.inner.lease_revoke(id).await
    }
    async fn lease_time_to_live(&self, id: LeaseId) -> Result<Option<Duration>> {
        self.inner.lease_time_to_live(id).await
    }
    fn lease_keep_alive_done(&self, id: LeaseId) {
        self.inner.lease_keep_alive_done(id);
    }
    fn request_timeout(&self) -> Option<Duration> {
        self.inner.request_timeout()
    }
    async fn watch(&self, watch: Watch) -> Result<WatchStream> {
        self.inner.watch(watch).await
    }
    async fn watch_from_now(&self, watch: Watch) -> Result<(Revision, WatchStream)> {
        self.inner.watch_from_now(watch).await
    }
    async fn compact(&self, revision: Revision) -> Result<()> {
        self.inner.compact(revision).await
    }
}
