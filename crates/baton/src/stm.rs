//! Software transactional memory over many keys (Go's `concurrency.STM`): a closure reads
//! and writes keys, and is run again until its writes commit without a conflict.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex as StdMutex};

use tracing::Instrument;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::names::validate_value;
use crate::store::{
    Compare, CompareOp, KeyValue, Range, Revision, Store, Txn, TxnOp, TxnOpResponse,
};

/// The most compares or operations etcd accepts in one branch of a transaction
/// (`--max-txn-ops`, 128 by default): the most keys one STM transaction can write, or read
/// (except at [`ReadCommitted`](Isolation::ReadCommitted), which does not limit reads).
pub const MAX_TXN_KEYS: usize = 128;

/// How an [`Stm`] transaction is isolated from concurrent writers. The default is
/// [`SerializableSnapshot`](Isolation::SerializableSnapshot), as in Go.
///
/// Every level commits all of a transaction's writes in one store transaction, or none of
/// them, and never exposes uncommitted writes. They differ in what the closure sees and in
/// what makes a commit fail (and the closure run again):
///
/// | level | reads see | the commit fails if, since the transaction read them… | conserves invariants across keys |
/// |---|---|---|---|
/// | `SerializableSnapshot` | one snapshot | …a key it read was written, or a key it wrote was put (not deleted) | yes |
/// | `Serializable` | one snapshot | …a key it read was written | yes |
/// | `RepeatableReads` | each key as of its first read | …a key it read was written | yes, but the closure may see states that never existed |
/// | `ReadCommitted` | each key as of its first read | never | no: concurrent updates can be lost |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Isolation {
    /// Serializable, and also no put to a key this transaction writes since its snapshot.
    ///
    /// Every read is served at the revision of the transaction's first read (its
    /// snapshot), so the closure always sees a state of the store that existed. The commit
    /// succeeds only if no key it read changed (was put or deleted), and no key it writes
    /// was put after the snapshot: a blind write (a key written without being read) also
    /// conflicts with a concurrent put of that key. It does not conflict with a concurrent
    /// *delete* of that key: the guard is "the key's mod revision is at most the
    /// snapshot", and a deleted key has none (0), as in Go. Read a key first if a
    /// concurrent delete of it must be a conflict. A transaction that reads nothing has no
    /// snapshot, and its blind writes are not guarded at all. The strictest level, and the
    /// default.
    #[default]
    SerializableSnapshot,
    /// Reads from one snapshot; the commit succeeds only if no key it read has changed.
    ///
    /// Committed transactions are serializable: each behaves as if it ran alone at its
    /// commit. Blind writes do not conflict (the last writer wins for keys nobody read).
    Serializable,
    /// Each key is read once, at the latest revision when first read, and read again from
    /// that cache; the commit succeeds only if no key it read has changed.
    ///
    /// Committed transactions are as safe as with `Serializable` (every value they used is
    /// still current at the commit), but two keys may be read at different revisions, so a
    /// closure can see a state that never existed (say, money that left one account and
    /// has not reached the other yet). Such an attempt fails at commit and runs again (one
    /// whose closure returns `Err` after reads served at different revisions is checked
    /// the same way before its error is returned);
    /// do not act outside the store on what an attempt sees.
    RepeatableReads,
    /// Each key is read once, at the latest revision when first read; the commit never
    /// fails.
    ///
    /// Writes are atomic, but a concurrent transaction's update to a key this one read can
    /// be overwritten (a lost update): invariants across keys are not kept. For reads that
    /// tolerate it, and for blind writes.
    ReadCommitted,
}

impl Isolation {
    /// True if all reads are served at the snapshot revision.
    fn uses_snapshot(self) -> bool {
        matches!(
            self,
            Isolation::SerializableSnapshot | Isolation::Serializable
        )
    }
}

/// Software transactional memory: run a closure that reads and writes keys through an
/// [`StmTx`], and commit its writes atomically, running it again on conflict.
///
/// ```text
/// stm.run(|tx| async move { read with tx.get(..), buffer writes with tx.put(..) })
/// ```
///
/// The closure is called once per attempt with a fresh [`StmTx`]. Reads go to the store
/// (at the isolation level's revision) and are remembered; writes are buffered. When the
/// closure returns `Ok`, the writes are committed in one store transaction guarded by
/// compares on what was read (see [`Isolation`]). If the guard fails, another writer came
/// first: the closure is called again, with the keys it read already fetched at the
/// failed commit's revision (one round trip saved). If the closure returns `Err`, nothing
/// is written and the error is returned. A read that failed, or was cancelled, fails the
/// attempt even if the closure goes on: nothing is written and its error is returned (see
/// "Failed reads" on [`run`](Stm::run)).
///
/// The closure may run several times: keep it free of side effects outside the store.
///
/// # Differences from Go's STM
///
/// - reads are linearizable at every level (Go's `RepeatableReads` and `ReadCommitted`
///   read from the local member, possibly stale);
/// - a snapshot revision that is compacted away mid-transaction restarts it with a new
///   snapshot instead of failing;
/// - a value prefetched by a failed commit is used only if it belongs to the new snapshot;
/// - a transaction that only read, at a snapshot level, commits without a round trip: its
///   reads are one consistent snapshot already;
/// - [`StmTx::get_many`] returns every key's value (Go's `Get(keys...)` returns the
///   first's).
///
/// # Limits
///
/// etcd allows [`MAX_TXN_KEYS`] (128) operations per transaction branch: a transaction may
/// read at most that many keys and write at most that many. At
/// [`SerializableSnapshot`](Isolation::SerializableSnapshot), where a key written without
/// being read is compared too, the keys read and written together count once each: 128 keys
/// read and written fit, as do 100 read and 28 others written. At
/// [`ReadCommitted`](Isolation::ReadCommitted) nothing read is compared, so reads are not
/// limited (they are fetched 128 at a time); only the writes count. A transaction that
/// writes nothing, at a snapshot level, sends no commit (see above), so its reads are not
/// limited either. Larger transactions fail with [`Error::InvalidArgument`] before the
/// commit is sent.
///
/// All of a transaction's writes also go in one request, and etcd refuses a request over
/// 1.5 MiB (`--max-request-bytes`, counted encoded: keys, values and compares). Each value
/// may be up to [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN) (1 MiB, checked before the commit
/// is sent), but the values together must stay under the request limit: two puts of 1 MiB
/// do not fit. Such a commit is refused by the store (the embedded store applies etcd's
/// default limit) with [`Error::InvalidArgument`] ("request is too large"); nothing is
/// written, and running it again cannot help.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// client.store().put(b"accounts/a", b"100", 0).await?;
/// client.store().put(b"accounts/b", b"0", 0).await?;
///
/// let stm = baton::Stm::new(&client); // SerializableSnapshot
/// let moved = stm
///     .run(|tx| async move {
///         let balance = |v: Option<Vec<u8>>| -> i64 {
///             v.and_then(|v| String::from_utf8(v).ok()?.parse().ok()).unwrap_or(0)
///         };
///         let a = balance(tx.get("accounts/a").await?);
///         let b = balance(tx.get("accounts/b").await?);
///         let amount = a.min(30);
///         tx.put("accounts/a", (a - amount).to_string());
///         tx.put("accounts/b", (b + amount).to_string());
///         Ok::<_, baton::Error>(amount)
///     })
///     .await?;
/// assert_eq!(moved, 30);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Stm {
    client: Client,
    isolation: Isolation,
    prefetch: Vec<Vec<u8>>,
    max_attempts: u32,
}

impl fmt::Debug for Stm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stm")
            .field("isolation", &self.isolation)
            .field("prefetch", &self.prefetch.len())
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

impl Stm {
    /// Transactions on `client`'s store.
    ///
    /// # Default
    ///
    /// - isolation: [`Isolation::SerializableSnapshot`];
    /// - no prefetch;
    /// - attempts: no limit (a conflict means another transaction committed, so the system
    ///   as a whole makes progress; bound one caller's wait with a timeout around
    ///   [`run`](Stm::run), or with [`with_max_attempts`](Stm::with_max_attempts)).
    pub fn new(client: &Client) -> Stm {
        Stm {
            client: client.clone(),
            isolation: Isolation::default(),
            prefetch: Vec::new(),
            max_attempts: 0,
        }
    }

    /// Use this isolation level.
    pub fn with_isolation(mut self, isolation: Isolation) -> Stm {
        self.isolation = isolation;
        self
    }

    /// Read these keys in one round trip before each attempt (Go's `WithPrefetch`), for
    /// keys the closure always reads.
    pub fn with_prefetch<K: Into<Vec<u8>>>(mut self, keys: impl IntoIterator<Item = K>) -> Stm {
        self.prefetch.extend(keys.into_iter().map(Into::into));
        self
    }

    /// Give up with [`Error::Conflict`] after this many attempts (0: no limit, the
    /// default). An attempt ends in a conflict at its commit, or earlier when its snapshot
    /// is compacted away (see [`run`](Stm::run)): both count.
    pub fn with_max_attempts(mut self, attempts: u32) -> Stm {
        self.max_attempts = attempts;
        self
    }

    /// The isolation level.
    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// Run `apply` until its writes commit, and return what it returned.
    ///
    /// `apply` gets a fresh [`StmTx`] per attempt. If it returns `Err`, nothing is written
    /// and the error is returned (at [`RepeatableReads`](Isolation::RepeatableReads), if it
    /// read keys at different revisions, once a compares-only check, one round trip, showed
    /// that what it read is still current; else it runs again, as the error may come from a
    /// state that never existed; a check that fails returns its own error). A failed
    /// commit returns its error. Give up after [`with_max_attempts`](Stm::with_max_attempts)
    /// attempts (conflicts, or snapshots compacted away) with [`Error::Conflict`].
    ///
    /// # A failed commit may have been applied
    ///
    /// A commit that failed with [`Error::Timeout`], [`Error::Unavailable`] or
    /// [`Error::Store`] may have been applied: the store can commit it and its answer be
    /// lost on the way back. Those errors are [`is_retryable`](Error::is_retryable), but
    /// calling `run` again after such a commit applies the writes a second time, computed
    /// from the store as it is then (an increment is counted twice). Where that matters,
    /// have the transaction also write a key unique to the operation (an operation id),
    /// and first check, in the retry, whether that key exists.
    ///
    /// # Failed reads
    ///
    /// A read that fails (a store error) returns the error to `apply`, and also fails the
    /// attempt: even if `apply` swallows the error and returns `Ok`, nothing is written
    /// and `run` returns that read's error. A read dropped before it finished (by a
    /// timeout or a `select!` around it), or still running when `apply` returns (in a task
    /// it spawned and did not wait for), fails the attempt the same way, and `run`
    /// returns [`Error::InvalidArgument`]. The keys such a read did not record could not
    /// be guarded at the commit, which could then overwrite a concurrent update; Go's STM
    /// aborts on a failed read too. `run` does not run `apply` again after a failed read,
    /// whether or not the error [`is_retryable`](Error::is_retryable): as after a failed
    /// commit, it runs `apply` again only after a conflict, or when its snapshot was
    /// compacted away. Call `run` again if the error allows it.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while `apply` runs writes nothing. Dropping it while a commit
    /// is in flight leaves that commit applied or not.
    pub async fn run<T, E, F, Fut>(&self, mut apply: F) -> Result<T, E>
    where
        F: FnMut(StmTx) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<Error>,
    {
        let store = self.client.store().clone();
        let span = tracing::debug_span!("stm", isolation = ?self.isolation);
        async move {
            let mut prefetched = Prefetched::default();
            let mut attempt = 0_u32;
            loop {
                attempt = attempt.saturating_add(1);
                let tx = StmTx::new(
                    store.clone(),
                    self.isolation,
                    std::mem::take(&mut prefetched),
                );
                if !self.prefetch.is_empty() {
                    if let Err(e) = tx.fetch(&self.prefetch).await {
                        if tx.restart_needed() {
                            tracing::debug!(attempt, "snapshot compacted; restarting");
                            self.check_attempts(attempt)?;
                            continue;
                        }
                        return Err(e.into());
                    }
                }
                let out = apply(tx.clone()).await;
                let state = tx.finish();
                if state.restart {
                    tracing::debug!(attempt, "snapshot compacted; restarting");
                    self.check_attempts(attempt)?;
                    continue;
                }
                let value = match out {
                    Ok(value) => value,
                    // At repeatable reads the closure may have seen a state that never
                    // existed: an error computed from it is returned only if what it read
                    // is still current (a compares-only check), else it runs again.
                    Err(e) => {
                        if self.isolation == Isolation::RepeatableReads
                            && state.failed_read.is_none()
                            && state.mixed_revisions
                        {
                            let check = Attempt {
                                writes: BTreeMap::new(),
                                ..state
                            };
                            match commit(&store, self.isolation, check).await {
                                Ok(Commit::Conflict(next)) => {
                                    tracing::debug!(
                                        attempt,
                                        "an error from stale reads; running again"
                                    );
                                    self.check_attempts(attempt)?;
                                    prefetched = next;
                                    continue;
                                }
                                Ok(Commit::Done) => {}
                                // Unchecked, the error may come from a state that never
                                // existed: the check's error is returned, as a commit's.
                                Err(check) => return Err(check.into()),
                            }
                        }
                        return Err(e);
                    }
                };
                if let Some(e) = state.failed_read {
                    tracing::debug!(attempt, error = %e, "a read failed; not committing");
                    return Err(e.into());
                }
                match commit(&store, self.isolation, state).await? {
                    Commit::Done => {
                        tracing::debug!(attempt, "committed");
                        return Ok(value);
                    }
                    Commit::Conflict(next) => {
                        tracing::debug!(attempt, "conflict; running again");
                        self.check_attempts(attempt)?;
                        prefetched = next;
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// [`Error::Conflict`] once `attempt` attempts have run out of
    /// [`with_max_attempts`](Stm::with_max_attempts).
    fn check_attempts(&self, attempt: u32) -> Result<()> {
        if self.max_attempts > 0 && attempt >= self.max_attempts {
            return Err(Error::Conflict { attempts: attempt });
        }
        Ok(())
    }
}

/// Keys read by a failed commit, for the next attempt.
#[derive(Default)]
struct Prefetched {
    kvs: HashMap<Vec<u8>, Option<KeyValue>>,
    revision: Revision,
}

/// One attempt's reads and writes.
#[derive(Default)]
struct Attempt {
    /// The revision every read is served at (snapshot levels), set by the first read.
    snapshot: Option<Revision>,
    /// Each key read, as read (`None`: it did not exist).
    reads: HashMap<Vec<u8>, Option<KeyValue>>,
    /// Each key written: `Some(value)` to put, `None` to delete.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    prefetched: Prefetched,
    /// A snapshot read hit a compacted revision: start over with a new snapshot.
    restart: bool,
    /// The first read that failed, or was dropped before it finished: the keys it did not
    /// record could not be guarded, so the attempt must not commit.
    failed_read: Option<Error>,
    /// Reads started and not yet finished or dropped: one still running when the closure
    /// returns (in a task the closure did not wait for) fails the attempt too.
    reads_in_flight: usize,
    /// The revision the reads so far were served at, while they all were at one.
    served_at: Option<Revision>,
    /// Reads were served at different revisions: what they show may never have existed.
    mixed_revisions: bool,
}

impl Attempt {
    fn served(&mut self, revision: Revision) {
        match self.served_at {
            None => self.served_at = Some(revision),
            Some(r) if r != revision => self.mixed_revisions = true,
            Some(_) => {}
        }
    }
}

/// One attempt of an [`Stm`] transaction: reads from the store, buffered writes.
///
/// It is a cheap handle: clones share the attempt. Reads and writes after the attempt
/// ended (the closure returned) do nothing useful: their results are discarded.
#[derive(Clone)]
pub struct StmTx {
    store: Arc<dyn Store>,
    isolation: Isolation,
    state: Arc<StdMutex<Attempt>>,
    /// Held across a read, so that reads at a snapshot agree on the snapshot.
    reading: Arc<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for StmTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state();
        f.debug_struct("StmTx")
            .field("isolation", &self.isolation)
            .field("snapshot", &st.snapshot)
            .field("reads", &st.reads.len())
            .field("writes", &st.writes.len())
            .finish()
    }
}

impl StmTx {
    fn new(store: Arc<dyn Store>, isolation: Isolation, prefetched: Prefetched) -> StmTx {
        StmTx {
            store,
            isolation,
            state: Arc::new(StdMutex::new(Attempt {
                prefetched,
                ..Attempt::default()
            })),
            reading: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Attempt> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn restart_needed(&self) -> bool {
        self.state().restart
    }

    /// End the attempt: take its reads and writes. Reads that finish later change nothing.
    fn finish(&self) -> Attempt {
        let mut ended = std::mem::take(&mut *self.state());
        if ended.reads_in_flight > 0 && ended.failed_read.is_none() {
            ended.failed_read = Some(Error::invalid(
                "stm: a read was still running when the closure returned (in a task it did \
                 not wait for), so the commit could not guard what it was reading; nothing \
                 was written",
            ));
        }
        ended
    }

    /// The value of `key`: this transaction's own write if it wrote it, else the value read
    /// (`None` if the key does not exist or this transaction deleted it).
    ///
    /// # Errors
    ///
    /// A store error. It also fails the attempt, even if the closure goes on: see
    /// [`Stm::run`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it finished fails the attempt if the key was not read
    /// yet: [`Stm::run`] then writes nothing and returns [`Error::InvalidArgument`]. (A
    /// future dropped before it was first polled did nothing.)
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        let mut values = self.get_many([key]).await?;
        Ok(values.pop().flatten())
    }

    /// The values of `keys`, in order, as [`get`](StmTx::get); keys not read yet are read
    /// in one round trip.
    ///
    /// # Errors
    ///
    /// As [`get`](StmTx::get).
    ///
    /// # Cancel safety
    ///
    /// As [`get`](StmTx::get): dropping the future before it finished fails the attempt if
    /// one of the keys was not read yet.
    pub async fn get_many<K: AsRef<[u8]>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let keys: Vec<Vec<u8>> = keys.into_iter().map(|k| k.as_ref().to_vec()).collect();
        let unwritten: Vec<Vec<u8>> = {
            let st = self.state();
            keys.iter()
                .filter(|k| !st.writes.contains_key(*k))
                .cloned()
                .collect()
        };
        self.fetch(&unwritten).await?;
        let st = self.state();
        Ok(keys
            .iter()
            .map(|k| match st.writes.get(k) {
                Some(written) => written.clone(),
                None => st
                    .reads
                    .get(k)
                    .and_then(|kv| kv.as_ref().map(|kv| kv.value.clone())),
            })
            .collect())
    }

    /// The mod revision of `key` as this transaction read it (reading it if needed; 0 if it
    /// does not exist). This transaction's own writes do not count.
    ///
    /// # Errors
    ///
    /// As [`get`](StmTx::get).
    ///
    /// # Cancel safety
    ///
    /// As [`get`](StmTx::get).
    pub async fn rev(&self, key: impl AsRef<[u8]>) -> Result<Revision> {
        let key = key.as_ref().to_vec();
        self.fetch(std::slice::from_ref(&key)).await?;
        Ok(self
            .state()
            .reads
            .get(&key)
            .and_then(|kv| kv.as_ref().map(|kv| kv.mod_revision))
            .unwrap_or(0))
    }

    /// Write `value` to `key` when the transaction commits.
    pub fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.state().writes.insert(key.into(), Some(value.into()));
    }

    /// Delete `key` when the transaction commits.
    pub fn delete(&self, key: impl Into<Vec<u8>>) {
        self.state().writes.insert(key.into(), None);
    }

    /// Make sure every key of `keys` is in the read set.
    ///
    /// A read that fails, is dropped before it finishes, or is still running when the
    /// closure returns fails the attempt (see [`Stm::run`]): the keys it did not record
    /// could not be guarded at the commit.
    async fn fetch(&self, keys: &[Vec<u8>]) -> Result<()> {
        self.state().reads_in_flight += 1;
        let mut unfinished = UnfinishedRead {
            tx: self,
            keys,
            done: false,
        };
        let result = self.fetch_unguarded(keys).await;
        unfinished.done = true;
        if let Err(e) = &result {
            self.state().failed_read.get_or_insert_with(|| e.clone());
        }
        result
    }

    async fn fetch_unguarded(&self, keys: &[Vec<u8>]) -> Result<()> {
        let _reading = self.reading.lock().await;
        let missing: Vec<Vec<u8>> = {
            let mut guard = self.state();
            let st = &mut *guard;
            let mut missing = Vec::new();
            for key in keys {
                if st.reads.contains_key(key) || missing.contains(key) {
                    continue;
                }
                // A value a failed commit read, if it belongs to our snapshot.
                let fits = !self.isolation.uses_snapshot()
                    || st.snapshot.is_none_or(|s| s == st.prefetched.revision);
                if fits {
                    if let Some(kv) = st.prefetched.kvs.remove(key) {
                        if self.isolation.uses_snapshot() {
                            st.snapshot = Some(st.prefetched.revision);
                        }
                        let revision = st.prefetched.revision;
                        st.served(revision);
                        st.reads.insert(key.clone(), kv);
                        continue;
                    }
                }
                missing.push(key.clone());
            }
            missing
        };
        for chunk in missing.chunks(MAX_TXN_KEYS) {
            let at = if self.isolation.uses_snapshot() {
                self.state().snapshot.unwrap_or(0)
            } else {
                0
            };
            let gets = chunk
                .iter()
                .map(|k| TxnOp::get(Range::key(k.clone()).at_revision(at)));
            let resp = match self.store.txn(Txn::new().and_then(gets)).await {
                Ok(resp) => resp,
                Err(e @ Error::Compacted { .. }) => {
                    self.state().restart = true;
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            let mut st = self.state();
            if self.isolation.uses_snapshot() && st.snapshot.is_none() {
                st.snapshot = Some(resp.header_revision);
            }
            st.served(resp.header_revision);
            st.reads.extend(
                chunk
                    .iter()
                    .cloned()
                    .zip(resp.responses.into_iter().map(found)),
            );
        }
        Ok(())
    }
}

/// A read in progress: if it is dropped before it finished and left keys unread, the
/// attempt fails.
struct UnfinishedRead<'a> {
    tx: &'a StmTx,
    keys: &'a [Vec<u8>],
    done: bool,
}

impl Drop for UnfinishedRead<'_> {
    fn drop(&mut self) {
        let mut st = self.tx.state();
        // Saturating: after the attempt ended, this is the fresh state `finish` left.
        st.reads_in_flight = st.reads_in_flight.saturating_sub(1);
        if self.done {
            return;
        }
        if self.keys.iter().any(|k| !st.reads.contains_key(k)) {
            st.failed_read.get_or_insert_with(|| {
                Error::invalid(
                    "stm: a read was cancelled before it finished, so the commit could not \
                     guard what it was reading; nothing was written (return an error from \
                     the closure when a read does not finish)",
                )
            });
        }
    }
}

/// The key a one-key get found.
fn found(response: TxnOpResponse) -> Option<KeyValue> {
    match response {
        TxnOpResponse::Get(g) => g.kvs.into_iter().next(),
        _ => None,
    }
}

enum Commit {
    Done,
    /// The guard failed; the keys read, re-read at the failed commit's revision.
    Conflict(Prefetched),
}

/// Commit an attempt's writes, guarded as `isolation` requires.
async fn commit(store: &Arc<dyn Store>, isolation: Isolation, attempt: Attempt) -> Result<Commit> {
    let Attempt {
        snapshot,
        reads,
        writes,
        ..
    } = attempt;
    let read_only = writes.is_empty();
    // Nothing to write, and nothing that could have gone stale: a snapshot is consistent,
    // and read committed checks nothing.
    if read_only && (isolation.uses_snapshot() || isolation == Isolation::ReadCommitted) {
        return Ok(Commit::Done);
    }
    let mut compares = Vec::new();
    if isolation != Isolation::ReadCommitted {
        compares.extend(reads.iter().map(|(key, kv)| {
            let rev = kv.as_ref().map_or(0, |kv| kv.mod_revision);
            Compare::mod_revision(key.clone(), CompareOp::Equal, rev)
        }));
    }
    // A key also read is compared already: its read was served at the snapshot, so the
    // `mod == read` compare implies `mod <= snapshot`. Comparing it twice would only halve
    // the keys a transaction can read and write.
    if let (Isolation::SerializableSnapshot, Some(snapshot)) = (isolation, snapshot) {
        compares.extend(
            writes
                .keys()
                .filter(|key| !reads.contains_key(*key))
                .map(|key| Compare::mod_revision(key.clone(), CompareOp::Less, snapshot + 1)),
        );
    }
    let mut ops = Vec::with_capacity(writes.len());
    for (key, value) in writes {
        if key.is_empty() {
            return Err(Error::invalid("stm: a key to write is empty"));
        }
        ops.push(match value {
            Some(value) => {
                validate_value(&value)?;
                TxnOp::put(key, value, 0)
            }
            None => TxnOp::delete(key),
        });
    }
    // The keys read are read again if the guard fails, for the next attempt. With no
    // compare (read committed) the commit cannot fail: that branch would never run, and
    // would only count against etcd's limit.
    let keys_read: Vec<Vec<u8>> = if compares.is_empty() {
        Vec::new()
    } else {
        reads.into_keys().collect()
    };
    let biggest = compares.len().max(ops.len()).max(keys_read.len());
    if biggest > MAX_TXN_KEYS {
        return Err(Error::invalid(format!(
            "stm: the transaction needs {biggest} operations in one branch; etcd allows \
             {MAX_TXN_KEYS}"
        )));
    }
    let refetch = keys_read.iter().map(|k| TxnOp::get(Range::key(k.clone())));
    let resp = store
        .txn(Txn::new().when(compares).and_then(ops).or_else(refetch))
        .await?;
    if resp.succeeded {
        return Ok(Commit::Done);
    }
    let kvs = keys_read
        .into_iter()
        .zip(resp.responses.into_iter().map(found))
        .collect();
    Ok(Commit::Conflict(Prefetched {
        kvs,
        revision: resp.header_revision,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn number(v: Option<Vec<u8>>) -> i64 {
        v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(0)
    }

    /// A store holding `x = 10`, `a = 1` and `b = 1`, and a writer that interferes once.
    struct Scenario {
        client: Client,
        attempts: AtomicU32,
    }

    impl Scenario {
        async fn new() -> Scenario {
            let client = Client::memory();
            for (key, value) in [("x", "10"), ("a", "1"), ("b", "1")] {
                client
                    .store()
                    .put(key.as_bytes(), value.as_bytes(), 0)
                    .await
                    .unwrap();
            }
            Scenario {
                client,
                attempts: AtomicU32::new(0),
            }
        }

        /// Another writer puts `key = value`, during the first attempt only.
        async fn interfere(&self, key: &str, value: &str) -> Result<()> {
            if self.attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                self.client
                    .store()
                    .put(key.as_bytes(), value.as_bytes(), 0)
                    .await?;
            }
            Ok(())
        }

        fn stm(&self, isolation: Isolation) -> Stm {
            Stm::new(&self.client).with_isolation(isolation)
        }

        fn attempts(&self) -> u32 {
            self.attempts.load(Ordering::SeqCst)
        }

        async fn value(&self, key: &str) -> i64 {
            let resp = self.client.store().range(Range::key(key)).await.unwrap();
            number(resp.kvs.into_iter().next().map(|kv| kv.value))
        }
    }

    /// Read `x`, let another writer change `x`, write `x + 1`: the final `x` and the number
    /// of attempts.
    async fn increment_with_interference(isolation: Isolation) -> (i64, u32) {
        let s = Scenario::new().await;
        s.stm(isolation)
            .run(|tx| {
                let s = &s;
                async move {
                    let x = number(tx.get("x").await?);
                    s.interfere("x", "100").await?;
                    tx.put("x", (x + 1).to_string());
                    Ok::<_, Error>(())
                }
            })
            .await
            .unwrap();
        (s.value("x").await, s.attempts())
    }

    #[tokio::test]
    async fn lost_updates_only_at_read_committed() {
        for iso in [
            Isolation::SerializableSnapshot,
            Isolation::Serializable,
            Isolation::RepeatableReads,
        ] {
            assert_eq!(increment_with_interference(iso).await, (101, 2), "{iso:?}");
        }
        assert_eq!(
            increment_with_interference(Isolation::ReadCommitted).await,
            (11, 1)
        );
    }

    /// Read `a`, let another writer change `b`, read `b`: what each attempt saw.
    async fn read_skew(isolation: Isolation) -> Vec<(i64, i64)> {
        let s = Scenario::new().await;
        let seen = StdMutex::new(Vec::new());
        s.stm(isolation)
            .run(|tx| {
                let (s, seen) = (&s, &seen);
                async move {
                    let a = number(tx.get("a").await?);
                    s.interfere("b", "2").await?;
                    let b = number(tx.get("b").await?);
                    seen.lock().unwrap().push((a, b));
                    tx.put("sum", (a + b).to_string());
                    Ok::<_, Error>(())
                }
            })
            .await
            .unwrap();
        seen.into_inner().unwrap()
    }

    #[tokio::test]
    async fn snapshots() {
        // Snapshot levels see b as it was at the first read; the commit then conflicts
        // (b changed), and the second attempt sees the new b.
        for iso in [Isolation::SerializableSnapshot, Isolation::Serializable] {
            assert_eq!(read_skew(iso).await, [(1, 1), (1, 2)], "{iso:?}");
        }
        // Repeatable reads see the new b at once: no conflict.
        assert_eq!(read_skew(Isolation::RepeatableReads).await, [(1, 2)]);
    }

    /// Read `a` (the snapshot), let another writer change `w`, write `w` without reading
    /// it: the number of attempts.
    async fn blind_write(isolation: Isolation) -> u32 {
        let s = Scenario::new().await;
        s.stm(isolation)
            .run(|tx| {
                let s = &s;
                async move {
                    tx.get("a").await?;
                    s.interfere("w", "other").await?;
                    tx.put("w", "mine");
                    Ok::<_, Error>(())
                }
            })
            .await
            .unwrap();
        s.attempts()
    }

    #[tokio::test]
    async fn blind_writes_conflict_only_at_serializable_snapshot() {
        assert_eq!(blind_write(Isolation::SerializableSnapshot).await, 2);
        assert_eq!(blind_write(Isolation::Serializable).await, 1);
    }

    /// `MAX_TXN_KEYS` keys read and written in one transaction commit at every level (a
    /// key read and written is compared once), and a concurrent write to one of them is
    /// still a conflict wherever it was one.
    #[tokio::test]
    async fn max_keys_read_modify_written() {
        for (iso, attempts, last) in [
            (Isolation::SerializableSnapshot, 2, 101),
            (Isolation::Serializable, 2, 101),
            (Isolation::RepeatableReads, 2, 101),
            (Isolation::ReadCommitted, 1, 2),
        ] {
            let s = Scenario::new().await;
            let keys: Vec<String> = (0..MAX_TXN_KEYS).map(|i| format!("k{i:03}")).collect();
            for k in &keys {
                s.client.store().put(k.as_bytes(), b"1", 0).await.unwrap();
            }
            s.stm(iso)
                .run(|tx| {
                    let (s, keys) = (&s, &keys);
                    async move {
                        let values = tx.get_many(keys.iter().map(String::as_str)).await?;
                        s.interfere("k127", "100").await?;
                        for (k, v) in keys.iter().zip(values) {
                            tx.put(k.as_str(), (number(v) + 1).to_string());
                        }
                        Ok::<_, Error>(())
                    }
                })
                .await
                .unwrap_or_else(|e| panic!("{iso:?}: {e}"));
            assert_eq!(s.attempts(), attempts, "{iso:?}");
            assert_eq!(s.value("k000").await, 2, "{iso:?}");
            assert_eq!(s.value("k127").await, last, "{iso:?}");
        }
    }

    #[tokio::test]
    async fn writes_are_read_back_and_errors_abort() {
        let client = Client::memory();
        let store = client.store().clone();
        let stm = Stm::new(&client);
        let r: Result<(), Error> = stm
            .run(|tx| async move {
                tx.put("k", "v");
                assert_eq!(tx.get("k").await?, Some(b"v".to_vec()));
                tx.delete("k");
                assert_eq!(tx.get("k").await?, None);
                assert_eq!(tx.rev("k").await?, 0);
                tx.put("k", "v2");
                Err(Error::invalid("changed my mind"))
            })
            .await;
        assert!(r.unwrap_err().is_invalid_input());
        assert!(store.range(Range::key("k")).await.unwrap().kvs.is_empty());
        // Too many keys, and oversized values, are refused before the commit is sent.
        let err = stm
            .run(|tx| async move {
                for i in 0..=MAX_TXN_KEYS {
                    tx.put(format!("k{i}"), "");
                }
                Ok::<_, Error>(())
            })
            .await
            .unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        let err = stm
            .run(|tx| async move {
                tx.put("big", vec![0_u8; crate::MAX_VALUE_LEN + 1]);
                Ok::<_, Error>(())
            })
            .await
            .unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        // Prefetch, get_many and a bounded number of attempts.
        store.put(b"p1", b"1", 0).await.unwrap();
        let got = Stm::new(&client)
            .with_prefetch(["p1", "p2"])
            .run(|tx| async move { tx.get_many(["p2", "p1"]).await })
            .await
            .unwrap();
        assert_eq!(got, [None, Some(b"1".to_vec())]);
        let err = Stm::new(&client)
            .with_max_attempts(2)
            .run(|tx| {
                let store = &store;
                async move {
                    let v = number(tx.get("p1").await?);
                    store.put(b"p1", b"9", 0).await?;
                    tx.put("p1", (v + 1).to_string());
                    Ok::<_, Error>(())
                }
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Conflict { attempts: 2 }), "{err}");
        assert!(err.is_retryable());
    }

    /// Review (today3) of entry 76: a closure's error computed from ONE read (a state
    /// that existed: one key at one revision), or returned before the closure read
    /// anything (its reads are only the prefetch), is no "state that never existed"; yet
    /// at RepeatableReads it now runs again whenever that key changed before the check.
    /// On a key another writer keeps changing, `with_max_attempts(5)` turns the closure's
    /// own error into `Conflict`, and with no limit (the default) `run` never returns. Go's
    /// STM (and this crate before the fix) returned the error at once.
    #[tokio::test]
    async fn an_error_from_a_state_that_existed_is_returned_under_contention() {
        for case in ["one read", "prefetch only"] {
            let client = Client::memory();
            let store = client.store().clone();
            store.put(b"x", b"10", 0).await.unwrap();
            let attempts = AtomicU32::new(0);
            let stm = Stm::new(&client).with_isolation(Isolation::RepeatableReads);
            let stm = if case == "prefetch only" {
                stm.with_prefetch(["x"])
            } else {
                stm
            };
            let run = |stm: Stm| {
                let (store, attempts) = (&store, &attempts);
                async move {
                    stm.run(|tx| async move {
                        attempts.fetch_add(1, Ordering::SeqCst);
                        let x = if case == "one read" {
                            number(tx.get("x").await?)
                        } else {
                            // Input checked before reading anything.
                            0
                        };
                        // Another writer updates the (hot) key meanwhile, every attempt.
                        tokio::task::yield_now().await;
                        store.put(b"x", b"10", 0).await?;
                        Err::<(), _>(Error::invalid(format!("x = {x} is too small")))
                    })
                    .await
                }
            };
            let err = run(stm.clone().with_max_attempts(5)).await.unwrap_err();
            assert!(
                err.is_invalid_input(),
                "{case}: the closure's own error became {err:?} after {} attempts",
                attempts.load(Ordering::SeqCst)
            );
            attempts.store(0, Ordering::SeqCst);
            let unlimited = tokio::time::timeout(std::time::Duration::from_secs(2), run(stm)).await;
            assert!(
                unlimited.is_ok(),
                "{case}: run() had not returned the closure's error after 2 s ({} attempts)",
                attempts.load(Ordering::SeqCst)
            );
        }
    }

    /// Review (today3) of entry 76: `run`'s docs say a closure's error (at
    /// RepeatableReads) is returned once a compares-only check showed its reads current.
    /// When that check itself fails (the store unavailable as the closure returns), the
    /// error computed from a state that never existed ("books do not balance") is returned
    /// all the same, unchecked, rather than the check's (retryable) store error.
    #[tokio::test]
    async fn an_unchecked_error_is_not_returned_when_the_check_fails() {
        use crate::store::slow::SlowWatches;
        use std::time::Duration;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(slow.clone());
        let store = client.store().clone();
        store.put(b"a", b"50", 0).await.unwrap();
        store.put(b"b", b"50", 0).await.unwrap();
        let r = Stm::new(&client)
            .with_isolation(Isolation::RepeatableReads)
            .run(|tx| {
                let (store, slow) = (&store, &slow);
                async move {
                    let a = number(tx.get("a").await?);
                    // Another transaction moves 50 from a to b, atomically.
                    store
                        .txn(
                            Txn::new()
                                .and_then([TxnOp::put("a", "0", 0), TxnOp::put("b", "100", 0)]),
                        )
                        .await?;
                    let b = number(tx.get("b").await?);
                    // The store goes down as the closure returns.
                    slow.kv_down.store(true, Ordering::SeqCst);
                    if a + b != 100 {
                        return Err(Error::invalid(format!("books do not balance: {a} + {b}")));
                    }
                    Ok(a + b)
                }
            })
            .await;
        assert!(
            !matches!(&r, Err(Error::InvalidArgument(m)) if m.contains("do not balance")),
            "an error from a state that never existed, unchecked: {r:?}"
        );
    }

    #[tokio::test]
    async fn compacted_snapshot_restarts() {
        let client = Client::memory();
        let store = client.store().clone();
        store.put(b"a", b"1", 0).await.unwrap();
        store.put(b"b", b"1", 0).await.unwrap();
        let attempts = AtomicU32::new(0);
        let sum = Stm::new(&client)
            .run(|tx| {
                let (store, attempts) = (&store, &attempts);
                async move {
                    let a = number(tx.get("a").await?);
                    if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                        let rev = store.put(b"b", b"5", 0).await?;
                        store.compact(rev).await?;
                    }
                    let b = number(tx.get("b").await?);
                    Ok::<_, Error>(a + b)
                }
            })
            .await
            .unwrap();
        assert_eq!((sum, attempts.load(Ordering::SeqCst)), (6, 2));
    }

    /// A snapshot compacted away in every attempt counts toward `with_max_attempts`, as a
    /// conflict does: `run` gives up instead of restarting for ever.
    #[tokio::test]
    async fn compacted_snapshots_count_toward_max_attempts() {
        let client = Client::memory();
        let store = client.store().clone();
        store.put(b"a", b"1", 0).await.unwrap();
        store.put(b"b", b"1", 0).await.unwrap();
        let attempts = AtomicU32::new(0);
        let stm = Stm::new(&client).with_max_attempts(3);
        let run = stm.run(|tx| {
            let (store, attempts) = (&store, &attempts);
            async move {
                let a = number(tx.get("a").await?);
                attempts.fetch_add(1, Ordering::SeqCst);
                let rev = store.put(b"b", b"5", 0).await?;
                store.compact(rev).await?;
                let b = number(tx.get("b").await?);
                Ok::<_, Error>(a + b)
            }
        });
        let err = tokio::time::timeout(std::time::Duration::from_secs(10), run)
            .await
            .expect("run kept restarting past max_attempts")
            .unwrap_err();
        assert!(matches!(err, Error::Conflict { attempts: 3 }), "{err}");
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
    }

    /// On a namespaced client, an empty key read inside a transaction fails the attempt as
    /// it does on a plain client (tests/stm.rs `a_failed_read_fails_the_attempt`), rather
    /// than read the key equal to the namespace's prefix.
    #[tokio::test]
    async fn an_empty_key_read_fails_in_a_namespace_too() {
        let root = Client::memory();
        root.store().put(b"ns/", b"root of ns", 0).await.unwrap();
        let client = root.with_namespace("ns/").unwrap();
        let got = Stm::new(&client)
            .run(|tx| async move { tx.get("").await })
            .await;
        assert!(
            got.as_ref().is_err_and(|e| e.is_invalid_input()),
            "an empty key was read: {got:?}"
        );
    }

    /// The limits, as documented: more than [`MAX_TXN_KEYS`] reads fail where they are
    /// compared at commit (at a snapshot level with a write, and at repeatable reads); a
    /// snapshot transaction that writes nothing sends no commit, and is not limited.
    #[tokio::test]
    async fn more_than_max_reads_fail_where_a_commit_compares_them() {
        let keys: Vec<String> = (0..=MAX_TXN_KEYS).map(|i| format!("r{i:03}")).collect();
        for (iso, write, fails) in [
            (Isolation::SerializableSnapshot, false, false),
            (Isolation::Serializable, false, false),
            (Isolation::SerializableSnapshot, true, true),
            (Isolation::Serializable, true, true),
            (Isolation::RepeatableReads, false, true),
            (Isolation::ReadCommitted, true, false),
        ] {
            let client = Client::memory();
            let r = Stm::new(&client)
                .with_isolation(iso)
                .run(|tx| {
                    let keys = &keys;
                    async move {
                        let n = tx.get_many(keys).await?.len();
                        if write {
                            tx.put("w", "1");
                        }
                        Ok::<_, Error>(n)
                    }
                })
                .await;
            assert_eq!(
                r.as_ref().is_err_and(|e| e.is_invalid_input()),
                fails,
                "{iso:?}, writing: {write}: {} keys read: {r:?}",
                keys.len()
            );
        }
    }

    /// A transaction that conflicts forever is bounded by a timeout around `run`, even on
    /// the embedded store (whose calls never wait).
    #[tokio::test]
    async fn a_timeout_bounds_an_endless_conflict() {
        let client = Client::memory();
        let store = client.store().clone();
        let r = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            Stm::new(&client).run(|tx| {
                let store = &store;
                async move {
                    let x = number(tx.get("x").await?);
                    store.put(b"x", b"other", 0).await?;
                    tx.put("x", (x + 1).to_string());
                    Ok::<_, Error>(())
                }
            }),
        )
        .await;
        assert!(r.is_err(), "{r:?}");
    }
}
