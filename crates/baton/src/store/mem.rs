//! [`MemStore`]: the embedded, in-process store behind `mem://` URLs.
//!
//! It is a faithful single-node implementation of the [`Store`] semantics, modelled on
//! etcd 3.4, not a mock:
//!
//! - one global revision, 1 for an empty store; every write transaction that changes
//!   something bumps it by exactly one, and all of its writes share that revision;
//! - each key carries its `create_revision`, `mod_revision`, `version` and `lease`;
//! - MVCC history: every put and delete is logged with its revision, so a watch from an
//!   old revision replays everything since then and continues live, with no gap and no
//!   duplicate. As on etcd, the replay comes in batches of up to 1000 revisions, each
//!   stamped with the store's revision when sent; a live batch holds one revision. A
//!   read at a past revision ([`Range::revision`]) is served from the same history: the
//!   current keys with every later change undone. [`Store::compact`] discards the
//!   history before a revision, and the deletes at that revision: once etcd's
//!   compaction has run (in the background, after it answers), it keeps no deletion at
//!   the compact revision, so a watch from it misses them, and it sends the puts at it
//!   without their previous keys. Reads and watches before the compact revision then
//!   fail with [`Error::Compacted`], as in etcd. Like etcd without auto-compaction, the
//!   history grows until it is compacted;
//! - a lease expires 20 ms after its TTL has run from its grant or last keep-alive (as
//!   etcd's expire late too: a holder's local deadline always passes first), on
//!   [`tokio::time`], so tests with a paused clock
//!   (`#[tokio::test(start_paused = true)]` and `tokio::time::advance`) drive expiry.
//!   A lease past its deadline is also expired by the next operation on the store, so
//!   the store stays correct even where no lease timer task can run. Like etcd, it
//!   reports the time a lease has left in whole seconds, rounded down. That operation
//!   reads the clock of the runtime it runs on: a store shared by runtimes whose clocks
//!   differ (a process-wide [`MemStore::shared`] store, `mem://`, used by tests with
//!   paused clocks that run at once) expires the leases of one by the clock of another,
//!   so such tests each need a store of their own ([`MemStore::new`]);
//! - the request checks of etcd's server: empty keys, writes over 1.5 MiB and reads (and
//!   read-only transactions) over 2 MiB, counted as etcd counts them (encoded; a write in
//!   its raft entry, to within a byte or two on the safe side), more than 128 operations
//!   in one branch of a transaction, and a key written twice (or written and deleted) in
//!   one branch are refused before anything is applied. As on etcd, a delete of a
//!   prefix with no end (the empty prefix, or one of 0xff bytes only) clashes with no
//!   write.
//!
//! Every operation takes one mutex once, so all operations are linearizable. Watchers
//! are fed through unbounded channels: a slow watcher never blocks a writer.
//!
//! # Examples
//!
//! ```
//! use baton::store::mem::MemStore;
//! use baton::store::{Range, Store};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> baton::Result<()> {
//! let store = MemStore::new();
//! let rev = store.put(b"greeting", b"hello", 0).await?;
//! assert_eq!(rev, 2); // an empty store is at revision 1
//! let got = store.range(Range::key("greeting")).await?;
//! assert_eq!(got.kvs[0].value, b"hello");
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    Compare, CompareOp, CompareTarget, Event, EventKind, KeyRange, KeyValue, LeaseGrant, LeaseId,
    Range, RangeResponse, Revision, SortOrder, SortTarget, Store, Txn, TxnOp, TxnOpResponse,
    TxnResponse, Watch, WatchResponse, WatchStream,
};
use crate::error::{Error, Result};

/// The largest write etcd accepts by default (`--max-request-bytes`): 1.5 MiB, counted
/// as its raft entry (see [`encoded`]).
const MAX_REQUEST_BYTES: usize = 1024 * 1024 * 3 / 2;

/// The largest read (or read-only transaction) etcd accepts: gRPC's limit, 512 KiB more.
const MAX_GRPC_REQUEST_BYTES: usize = MAX_REQUEST_BYTES + 512 * 1024;

/// The most revisions in one batch of a watch's replay (etcd's `watchBatchMaxRevs`).
const REPLAY_BATCH_REVISIONS: usize = 1000;

/// The most operations etcd accepts in one branch of a transaction (`--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

/// The shortest lease etcd grants on one node with default timing (1.5 s, rounded up).
const MIN_LEASE_TTL_SECS: u64 = 2;

/// The longest lease etcd grants.
const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;

/// How long after its TTL (from its grant or last keep-alive) a lease expires. etcd expires
/// a lease later than its TTL too (its leader looks for expired leases every 500 ms, and
/// the revoke goes through raft); a client's local deadline, counted from the send time of
/// its request, is then always passed first. Expiring at the TTL exactly, the embedded
/// store's timer fired on the same tick as the holder's deadline, and the next holder
/// could be granted before the old one's `lost()` fired.
pub(crate) const EXPIRY_MARGIN: Duration = Duration::from_millis(20);

/// The embedded, in-process store: etcd v3's data model on one node.
///
/// Clones share the same store. [`MemStore::new`] makes a private store;
/// [`MemStore::shared`] returns the process-wide store of a name (what `mem://NAME` uses).
///
/// See the [module documentation](self) for the semantics.
#[derive(Clone)]
pub struct MemStore {
    inner: Arc<Inner>,
}

impl MemStore {
    /// A new, empty, independent store at revision 1.
    pub fn new() -> MemStore {
        MemStore {
            inner: Arc::new(Inner::new(None)),
        }
    }

    /// The process-wide store called `name`: every call with the same name, in any
    /// thread, returns a handle to the same store. It lives until the process exits.
    ///
    /// This is the store behind the URL `mem://NAME` (`mem://` uses the empty name).
    pub fn shared(name: &str) -> MemStore {
        static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<Inner>>>> = OnceLock::new();
        let registry = REGISTRY.get_or_init(|| Mutex::new(HashMap::new()));
        let mut registry = registry.lock().unwrap_or_else(|e| e.into_inner());
        let inner = registry
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Inner::new(Some(name.to_owned()))))
            .clone();
        MemStore { inner }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// Locks the state and expires every lease past its deadline first, so that every
    /// operation observes expiries that are due, timer task or not.
    fn lock_current(&self) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        state.expire_due(Instant::now());
        state
    }
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

impl fmt::Debug for MemStore {
    // Counts only: never keys' values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemStore")
            .field("name", &self.inner.name)
            .field("revision", &state.revision)
            .field("compact_revision", &state.compact_revision)
            .field("keys", &state.kvs.len())
            .field("history_events", &state.history.len())
            .field("leases", &state.leases.len())
            .field("watchers", &state.watchers.len())
            .finish()
    }
}

struct Inner {
    /// The name given to [`MemStore::shared`], if any.
    name: Option<String>,
    state: Mutex<State>,
}

impl Inner {
    fn new(name: Option<String>) -> Inner {
        // Lease ids look like etcd's: positive, 16 hex digits, random per store.
        let base = rand::thread_rng().gen_range(0x1000_0000_0000_0000_i64..0x7000_0000_0000_0000);
        Inner {
            name,
            state: Mutex::new(State {
                revision: 1,
                compact_revision: 0,
                kvs: BTreeMap::new(),
                history: VecDeque::new(),
                leases: HashMap::new(),
                deadlines: BTreeSet::new(),
                next_lease_id: base,
                watchers: Vec::new(),
                next_watcher_id: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written in a way
        // that matters more than losing the store, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One logged change. The revision is `kv.mod_revision` (for a delete too).
#[derive(Clone)]
struct HistEvent {
    kind: EventKind,
    kv: Arc<KeyValue>,
    /// The key before the change, as a watch reports it: etcd reads it at the revision
    /// before the event, and reports none for a put that creates the key, or once the
    /// revision before is compacted. Undoing the events of a revision above the compact
    /// revision newest first gives back the keys as they were before it.
    prev: Option<Arc<KeyValue>>,
}

impl HistEvent {
    fn revision(&self) -> Revision {
        self.kv.mod_revision
    }

    fn to_event(&self, with_prev: bool) -> Event {
        Event {
            kind: self.kind,
            kv: KeyValue::clone(&self.kv),
            prev_kv: if with_prev {
                self.prev.as_deref().cloned()
            } else {
                None
            },
        }
    }
}

struct Lease {
    /// The granted TTL (whole seconds).
    ttl: Duration,
    deadline: Instant,
    /// The keys bound to this lease.
    keys: BTreeSet<Vec<u8>>,
}

struct Watcher {
    id: u64,
    keys: KeyRange,
    /// Deliver only events at or after this revision.
    min_revision: Revision,
    prev_kv: bool,
    deletes_only: bool,
    tx: mpsc::UnboundedSender<WatchResponse>,
}

impl Watcher {
    /// False for a put this watcher filters out.
    fn wants(&self, e: &HistEvent) -> bool {
        !self.deletes_only || e.kind == EventKind::Delete
    }
}

struct State {
    revision: Revision,
    /// History before this revision is gone; 0 if never compacted.
    compact_revision: Revision,
    kvs: BTreeMap<Vec<u8>, Arc<KeyValue>>,
    /// Every change since the compact revision, in revision order.
    history: VecDeque<HistEvent>,
    leases: HashMap<LeaseId, Lease>,
    /// The leases ordered by deadline, for cheap expiry checks.
    deadlines: BTreeSet<(Instant, LeaseId)>,
    next_lease_id: LeaseId,
    watchers: Vec<Watcher>,
    next_watcher_id: u64,
}

impl State {
    // ---- reads ----

    /// Serve `range` at `header_revision`. `pending` holds the events of the transaction in
    /// progress, already applied to `kvs` (a read at an older revision undoes them too).
    fn range(
        &self,
        range: &Range,
        header_revision: Revision,
        pending: &[HistEvent],
    ) -> RangeResponse {
        if range.revision > 0 && range.revision < header_revision {
            let past = self.view_at(&range.keys, range.revision, pending);
            return select(past.into_values(), range, header_revision);
        }
        match &range.keys {
            KeyRange::Key(key) => select(self.kvs.get(key.as_slice()), range, header_revision),
            KeyRange::Prefix(prefix) => select(self.prefix_iter(prefix), range, header_revision),
        }
    }

    /// The keys of `keys` as they were at `revision`, in key order: the current keys with
    /// every later change undone, newest first. Each logged event carries the key as it
    /// was before the change, so undoing one is a lookup. The caller has checked that the
    /// history since `revision` is still there.
    fn view_at<'a>(
        &'a self,
        keys: &'a KeyRange,
        revision: Revision,
        pending: &'a [HistEvent],
    ) -> BTreeMap<&'a [u8], &'a Arc<KeyValue>> {
        let mut undone: BTreeMap<&[u8], Option<&Arc<KeyValue>>> = BTreeMap::new();
        let later = self
            .history
            .iter()
            .rev()
            .take_while(|e| e.revision() > revision);
        for e in pending.iter().rev().chain(later) {
            if keys.contains(&e.kv.key) {
                undone.insert(e.kv.key.as_slice(), e.prev.as_ref());
            }
        }
        let current: Box<dyn Iterator<Item = &Arc<KeyValue>>> = match keys {
            KeyRange::Key(key) => Box::new(self.kvs.get(key.as_slice()).into_iter()),
            KeyRange::Prefix(prefix) => Box::new(self.prefix_iter(prefix)),
        };
        let mut view: BTreeMap<&[u8], &Arc<KeyValue>> = current
            .filter(|kv| !undone.contains_key(kv.key.as_slice()))
            .map(|kv| (kv.key.as_slice(), kv))
            .collect();
        view.extend(
            undone
                .into_iter()
                .filter_map(|(key, before)| before.map(|kv| (key, kv))),
        );
        view
    }

    /// Check a read's revision as etcd does: not beyond the current revision, not compacted.
    fn check_read_revision(&self, range: &Range) -> Result<()> {
        let requested = range.revision;
        if requested > self.revision {
            return Err(Error::invalid(format!(
                "required revision is a future revision: {requested} (current revision {})",
                self.revision
            )));
        }
        if requested > 0 && requested < self.compact_revision {
            return Err(Error::Compacted {
                requested,
                compact_revision: self.compact_revision,
            });
        }
        Ok(())
    }

    fn prefix_iter<'a>(&'a self, prefix: &'a [u8]) -> impl Iterator<Item = &'a Arc<KeyValue>> + 'a {
        self.kvs
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
    }

    fn keys_in(&self, keys: &KeyRange) -> Vec<Vec<u8>> {
        match keys {
            KeyRange::Key(key) => self
                .kvs
                .get_key_value(key.as_slice())
                .map(|(k, _)| k.clone())
                .into_iter()
                .collect(),
            KeyRange::Prefix(prefix) => self.prefix_iter(prefix).map(|kv| kv.key.clone()).collect(),
        }
    }

    fn compare_holds(&self, compare: &Compare) -> bool {
        let kv = self.kvs.get(compare.key.as_slice());
        let field = |f: fn(&KeyValue) -> i64| kv.map_or(0, |kv| f(kv));
        let ord = match &compare.target {
            // etcd: a value compare on a missing key always fails.
            CompareTarget::Value(value) => match kv {
                Some(kv) => kv.value.as_slice().cmp(value.as_slice()),
                None => return false,
            },
            CompareTarget::CreateRevision(r) => field(|kv| kv.create_revision).cmp(r),
            CompareTarget::ModRevision(r) => field(|kv| kv.mod_revision).cmp(r),
            CompareTarget::Version(v) => field(|kv| kv.version).cmp(v),
            CompareTarget::Lease(l) => field(|kv| kv.lease).cmp(l),
        };
        match compare.op {
            CompareOp::Equal => ord.is_eq(),
            CompareOp::NotEqual => ord.is_ne(),
            CompareOp::Greater => ord.is_gt(),
            CompareOp::Less => ord.is_lt(),
        }
    }

    // ---- writes ----
    //
    // `apply_*` change the key space at the pending revision `rev` (current + 1) and log
    // their events into `events`; `commit` then makes the revision current, feeds the
    // watchers and appends the events to the history. Nothing is committed (and the
    // revision does not move) if nothing changed.

    fn check_lease(&self, lease: LeaseId) -> Result<()> {
        if lease == 0 || self.leases.contains_key(&lease) {
            Ok(())
        } else {
            Err(Error::LeaseNotFound(lease))
        }
    }

    fn apply_put(
        &mut self,
        rev: Revision,
        key: Vec<u8>,
        value: Vec<u8>,
        lease: LeaseId,
        events: &mut Vec<HistEvent>,
    ) {
        let prev = self.kvs.get(key.as_slice()).cloned();
        let (create_revision, version, old_lease) = match &prev {
            Some(p) => (p.create_revision, p.version.saturating_add(1), p.lease),
            None => (rev, 1, 0),
        };
        if old_lease != lease {
            if let Some(old) = self.leases.get_mut(&old_lease) {
                old.keys.remove(key.as_slice());
            }
            if let Some(new) = self.leases.get_mut(&lease) {
                new.keys.insert(key.clone());
            }
        }
        let kv = Arc::new(KeyValue {
            key: key.clone(),
            value,
            create_revision,
            mod_revision: rev,
            version,
            lease,
        });
        self.kvs.insert(key, Arc::clone(&kv));
        events.push(HistEvent {
            kind: EventKind::Put,
            kv,
            prev,
        });
    }

    fn apply_delete_key(&mut self, rev: Revision, key: &[u8], events: &mut Vec<HistEvent>) -> bool {
        let Some(current) = self.kvs.remove(key) else {
            return false;
        };
        if current.lease != 0 {
            if let Some(lease) = self.leases.get_mut(&current.lease) {
                lease.keys.remove(key);
            }
        }
        // etcd reads an event's previous key at the revision before the event: for a key
        // written earlier in this transaction, the key before the transaction, which the
        // first event of that key holds (a put cannot follow a put of the same key).
        let prev = if current.mod_revision == rev {
            events
                .iter()
                .find(|e| e.kv.key == key)
                .and_then(|e| e.prev.clone())
        } else {
            Some(current)
        };
        events.push(HistEvent {
            kind: EventKind::Delete,
            kv: Arc::new(KeyValue {
                key: key.to_vec(),
                mod_revision: rev,
                ..KeyValue::default()
            }),
            prev,
        });
        true
    }

    fn apply_delete(&mut self, rev: Revision, keys: &KeyRange, events: &mut Vec<HistEvent>) -> i64 {
        let mut deleted = 0;
        for key in self.keys_in(keys) {
            if self.apply_delete_key(rev, &key, events) {
                deleted += 1;
            }
        }
        deleted
    }

    fn commit(&mut self, rev: Revision, events: Vec<HistEvent>) {
        if events.is_empty() {
            return;
        }
        self.revision = rev;
        self.notify(rev, &events);
        self.history.extend(events);
    }

    fn notify(&mut self, rev: Revision, events: &[HistEvent]) {
        self.watchers.retain(|w| {
            if rev < w.min_revision {
                return !w.tx.is_closed();
            }
            let batch: Vec<Event> = events
                .iter()
                .filter(|e| w.keys.contains(&e.kv.key) && w.wants(e))
                .map(|e| e.to_event(w.prev_kv))
                .collect();
            if batch.is_empty() {
                return !w.tx.is_closed();
            }
            w.tx.send(WatchResponse {
                header_revision: rev,
                events: batch,
            })
            .is_ok()
        });
    }

    fn txn(&mut self, txn: Txn) -> Result<TxnResponse> {
        let succeeded = txn.compares.iter().all(|c| self.compare_holds(c));
        let ops = if succeeded { txn.success } else { txn.failure };
        // Like etcd, check the leases of the branch taken before applying any of it,
        // then the revisions of its reads (a compacted or future one fails the whole txn):
        // etcd checks every put before any read, so a branch with both faults fails with
        // the unknown lease, wherever it comes.
        for op in &ops {
            if let TxnOp::Put { lease, .. } = op {
                self.check_lease(*lease)?;
            }
        }
        for op in &ops {
            if let TxnOp::Get(range) = op {
                self.check_read_revision(range)?;
            }
        }
        let rev = self.revision + 1;
        let mut events = Vec::new();
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match op {
                TxnOp::Put { key, value, lease } => {
                    self.apply_put(rev, key, value, lease, &mut events);
                    TxnOpResponse::Put
                }
                // A read sees this transaction's earlier writes, at the pending revision.
                TxnOp::Get(range) => {
                    let header = if events.is_empty() {
                        self.revision
                    } else {
                        rev
                    };
                    TxnOpResponse::Get(self.range(&range, header, &events))
                }
                TxnOp::Delete(keys) => TxnOpResponse::Delete {
                    deleted: self.apply_delete(rev, &keys, &mut events),
                },
            };
            responses.push(response);
        }
        self.commit(rev, events);
        Ok(TxnResponse {
            succeeded,
            header_revision: self.revision,
            responses,
        })
    }

    // ---- leases ----

    /// Removes a lease and deletes its keys in one revision. False if it did not exist.
    fn revoke(&mut self, id: LeaseId) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        self.deadlines.remove(&(lease.deadline, id));
        let rev = self.revision + 1;
        let mut events = Vec::with_capacity(lease.keys.len());
        // In key order, as etcd does.
        for key in &lease.keys {
            self.apply_delete_key(rev, key, &mut events);
        }
        self.commit(rev, events);
        true
    }

    /// Revokes every lease whose deadline is at or before `now`, earliest first, each in
    /// its own revision.
    fn expire_due(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if !self.revoke(id) {
                // Cannot happen (the index mirrors `leases`), but never loop forever.
                self.deadlines.remove(&(deadline, id));
            }
        }
    }

    fn lease_deadline(&self, id: LeaseId) -> Option<Instant> {
        self.leases.get(&id).map(|l| l.deadline)
    }
}

/// Filter, sort and limit the keys of a range, given its candidate keys in key order.
fn select<'a>(
    candidates: impl IntoIterator<Item = &'a Arc<KeyValue>>,
    range: &Range,
    header_revision: Revision,
) -> RangeResponse {
    let max_create = range.max_create_revision;
    let max_mod = range.max_mod_revision;
    let keep = |kv: &&Arc<KeyValue>| {
        (max_create <= 0 || kv.create_revision <= max_create)
            && (max_mod <= 0 || kv.mod_revision <= max_mod)
    };
    let limit = usize::try_from(range.limit).ok().filter(|l| *l > 0);
    let candidates = candidates.into_iter().filter(keep);
    let mut hits: Vec<&Arc<KeyValue>> = match (range.sort, limit) {
        // Key order, limited: stop after one more than the limit (for `more`).
        (None, Some(limit)) => candidates.take(limit.saturating_add(1)).collect(),
        _ => candidates.collect(),
    };

    if let Some((target, order)) = range.sort {
        let cmp = |a: &&Arc<KeyValue>, b: &&Arc<KeyValue>| {
            let ord = match target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::CreateRevision => a.create_revision.cmp(&b.create_revision),
                SortTarget::ModRevision => a.mod_revision.cmp(&b.mod_revision),
            };
            match order {
                SortOrder::Ascending => ord,
                SortOrder::Descending => ord.reverse(),
            }
        };
        if limit == Some(1) && hits.len() > 1 {
            // The common "first/last created" read: one pass, no sort. `min_by`
            // keeps the first of equal elements, as the stable sort would.
            let best = hits.iter().copied().min_by(cmp);
            return RangeResponse {
                header_revision,
                kvs: best.map(|kv| copy(kv, range)).into_iter().collect(),
                more: true,
            };
        }
        hits.sort_by(cmp);
    }

    let more = limit.is_some_and(|l| hits.len() > l);
    if let Some(l) = limit {
        hits.truncate(l);
    }
    RangeResponse {
        header_revision,
        kvs: hits.into_iter().map(|kv| copy(kv, range)).collect(),
        more,
    }
}

/// A key as `range` returns it: without its value if the range is keys only.
fn copy(kv: &KeyValue, range: &Range) -> KeyValue {
    if range.keys_only {
        KeyValue {
            key: kv.key.clone(),
            value: Vec::new(),
            ..*kv
        }
    } else {
        kv.clone()
    }
}

/// Checks that the requests of etcd's server refuses before applying anything.
fn validate_txn(txn: &Txn) -> Result<()> {
    if txn
        .compares
        .len()
        .max(txn.success.len())
        .max(txn.failure.len())
        > MAX_TXN_OPS
    {
        return Err(Error::invalid(format!(
            "too many operations in txn request (limit {MAX_TXN_OPS})"
        )));
    }
    for ops in [&txn.success, &txn.failure] {
        validate_branch(ops)?;
    }
    // etcd refuses a compare without a key ("key is not provided").
    for c in &txn.compares {
        check_key(&c.key)?;
    }
    let size = encoded::txn(txn);
    let read_only = txn
        .success
        .iter()
        .chain(&txn.failure)
        .all(|op| matches!(op, TxnOp::Get(_)));
    if read_only {
        check_size(size, MAX_GRPC_REQUEST_BYTES)
    } else {
        check_size(encoded::raft_entry(size), MAX_REQUEST_BYTES)
    }
}

/// Empty keys, and (like etcd) a key put twice or put and deleted in one branch.
///
/// etcd checks each put against the branch's deletes as key intervals. A prefix with no
/// end (the empty prefix, or one of 0xff bytes only) goes to etcd as the range from the
/// prefix (`"\0"` for the empty one) to `"\0"`, which that check takes for an empty
/// interval: deleting such a prefix clashes with no put, though it deletes every key under
/// it. Which of the put and the delete wins then depends on their order, as on etcd.
fn validate_branch(ops: &[TxnOp]) -> Result<()> {
    let mut puts: HashSet<&[u8]> = HashSet::new();
    let mut deletes: Vec<&KeyRange> = Vec::new();
    for op in ops {
        match op {
            TxnOp::Put { key, .. } => {
                check_key(key)?;
                if !puts.insert(key) {
                    return Err(duplicate_key());
                }
            }
            TxnOp::Get(range) => check_key_range(&range.keys)?,
            TxnOp::Delete(keys) => {
                check_key_range(keys)?;
                let no_end = matches!(keys, KeyRange::Prefix(p) if p.iter().all(|b| *b == 0xff));
                if !no_end {
                    deletes.push(keys);
                }
            }
        }
    }
    if puts
        .iter()
        .any(|key| deletes.iter().any(|d| d.contains(key)))
    {
        return Err(duplicate_key());
    }
    Ok(())
}

fn duplicate_key() -> Error {
    Error::invalid("duplicate key given in txn request")
}

fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        Err(Error::invalid("key is empty"))
    } else {
        Ok(())
    }
}

fn check_key_range(keys: &KeyRange) -> Result<()> {
    match keys {
        KeyRange::Key(key) => check_key(key),
        // An empty prefix means every key.
        KeyRange::Prefix(_) => Ok(()),
    }
}

/// Refuses a request of `size` bytes, encoded as etcd gets it, over `limit`.
fn check_size(size: usize, limit: usize) -> Result<()> {
    if size > limit {
        Err(Error::invalid(format!(
            "request is too large: {size} bytes encoded (limit {limit})"
        )))
    } else {
        Ok(())
    }
}

/// The sizes of requests as etcd gets them from EtcdStore, protobuf-encoded, for its
/// request size limits.
///
/// etcd refuses a write whose raft entry is over `--max-request-bytes`: the request in an
/// `InternalRaftRequest`, with a request header. It serves reads and read-only
/// transactions without raft, and gRPC refuses those over that limit plus 512 KiB.
mod encoded {
    use super::{Compare, CompareOp, CompareTarget, KeyRange, Range, SortOrder, SortTarget};
    use super::{Txn, TxnOp};

    /// What a raft entry adds to a request besides its own field: the request header
    /// (a 2-byte tag, its length, and the request id with its tag). The id takes 10 bytes
    /// at most; its top 16 bits are etcd's member id's low 16, so on half of all members
    /// it takes 10 and on nearly all others 9. Counting 10 bytes, MemStore refuses every
    /// write etcd refuses, and may refuse one that is 1 byte (rarely 2 or 3) smaller than
    /// the largest a given etcd member takes. etcd with authentication also puts the user
    /// name in the header: MemStore has no users.
    const RAFT_HEADER: usize = 2 + 1 + 1 + 10;

    /// The bytes of `n` as a varint.
    pub(super) fn varint_len(n: u64) -> usize {
        let bits = 64 - n.leading_zeros() as usize;
        bits.max(1).div_ceil(7)
    }

    /// A length-delimited field (bytes, or a message) with a one-byte tag.
    fn field(len: usize) -> usize {
        1 + varint_len(len as u64) + len
    }

    /// A bytes field, left out when empty (proto3).
    fn bytes(len: usize) -> usize {
        if len == 0 {
            0
        } else {
            field(len)
        }
    }

    /// An integer or enum field, left out when 0 (proto3); a negative one takes 10 bytes.
    fn int(n: i64) -> usize {
        if n == 0 {
            0
        } else {
            one_of(n)
        }
    }

    /// An integer field of a `oneof`: sent even when 0.
    fn one_of(n: i64) -> usize {
        1 + varint_len(n as u64)
    }

    /// The raft entry of a write request of `len` bytes.
    pub(super) fn raft_entry(len: usize) -> usize {
        RAFT_HEADER + field(len)
    }

    /// `key` and `range_end`. A prefix's end is the prefix with its last byte below 0xff
    /// raised by one and the rest cut; a prefix with no end goes as the range from it
    /// (`"\0"` for the empty prefix) to `"\0"`.
    fn key_range(keys: &KeyRange) -> usize {
        match keys {
            KeyRange::Key(key) => bytes(key.len()),
            KeyRange::Prefix(prefix) => {
                let end = prefix.iter().rposition(|b| *b < 0xff).map_or(1, |i| i + 1);
                bytes(prefix.len().max(1)) + bytes(end)
            }
        }
    }

    /// A `RangeRequest`: only the options that are set (etcd-client sends the default
    /// order for keys in ascending order).
    pub(super) fn range(range: &Range) -> usize {
        let (order, target) = match range.sort {
            None | Some((SortTarget::Key, SortOrder::Ascending)) => (0, 0),
            Some((target, order)) => (
                match order {
                    SortOrder::Ascending => 1,
                    SortOrder::Descending => 2,
                },
                match target {
                    SortTarget::Key => 0,
                    SortTarget::CreateRevision => 2,
                    SortTarget::ModRevision => 3,
                },
            ),
        };
        key_range(&range.keys)
            + int(range.limit.max(0))
            + int(range.revision.max(0))
            + int(order)
            + int(target)
            + int(range.max_mod_revision.max(0))
            + int(range.max_create_revision.max(0))
            + if range.keys_only { 2 } else { 0 }
    }

    /// A `PutRequest`.
    pub(super) fn put(key: &[u8], value: &[u8], lease: i64) -> usize {
        bytes(key.len()) + bytes(value.len()) + int(lease)
    }

    /// A `DeleteRangeRequest`.
    pub(super) fn delete(keys: &KeyRange) -> usize {
        key_range(keys)
    }

    fn compare(c: &Compare) -> usize {
        let result = match c.op {
            CompareOp::Equal => 0,
            CompareOp::Greater => 1,
            CompareOp::Less => 2,
            CompareOp::NotEqual => 3,
        };
        let (target, union) = match &c.target {
            CompareTarget::Version(v) => (0, one_of(*v)),
            CompareTarget::CreateRevision(r) => (1, one_of(*r)),
            CompareTarget::ModRevision(r) => (2, one_of(*r)),
            CompareTarget::Value(v) => (3, field(v.len())),
            CompareTarget::Lease(l) => (4, one_of(*l)),
        };
        int(result) + int(target) + bytes(c.key.len()) + union
    }

    /// A `RequestOp`: its request, as the field of a `oneof`.
    fn op(op: &TxnOp) -> usize {
        field(match op {
            TxnOp::Put { key, value, lease } => put(key, value, *lease),
            TxnOp::Get(r) => range(r),
            TxnOp::Delete(keys) => delete(keys),
        })
    }

    /// A `TxnRequest`.
    pub(super) fn txn(txn: &Txn) -> usize {
        let compares = txn.compares.iter().map(|c| field(compare(c)));
        let ops = txn.success.iter().chain(&txn.failure).map(|o| field(op(o)));
        compares.chain(ops).fold(0, usize::saturating_add)
    }
}

/// Sleeps until the lease's deadline, re-checks it (keep-alives move it) and expires it.
/// Holds only a weak reference, so dropping the store ends the task at its next wake-up.
async fn lease_timer(inner: Weak<Inner>, id: LeaseId) {
    loop {
        let deadline = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let mut state = inner.lock();
            state.expire_due(Instant::now());
            match state.lease_deadline(id) {
                Some(deadline) => deadline,
                None => return,
            }
        };
        tokio::time::sleep_until(deadline).await;
    }
}

/// The stream returned by [`MemStore::watch`]. Dropping it unregisters the watcher.
struct MemWatchStream {
    rx: mpsc::UnboundedReceiver<WatchResponse>,
    id: u64,
    inner: Weak<Inner>,
}

impl Stream for MemWatchStream {
    type Item = Result<WatchResponse>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|r| r.map(Ok))
    }
}

impl Drop for MemWatchStream {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            let id = self.id;
            inner.lock().watchers.retain(|w| w.id != id);
        }
    }
}

#[async_trait]
impl Store for MemStore {
    fn backend(&self) -> &'static str {
        "mem"
    }

    async fn range(&self, range: Range) -> Result<RangeResponse> {
        check_key_range(&range.keys)?;
        check_size(encoded::range(&range), MAX_GRPC_REQUEST_BYTES)?;
        let state = self.lock_current();
        state.check_read_revision(&range)?;
        Ok(state.range(&range, state.revision, &[]))
    }

    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision> {
        check_key(key)?;
        check_size(
            encoded::raft_entry(encoded::put(key, value, lease)),
            MAX_REQUEST_BYTES,
        )?;
        let mut state = self.lock_current();
        state.check_lease(lease)?;
        let rev = state.revision + 1;
        let mut events = Vec::with_capacity(1);
        state.apply_put(rev, key.to_vec(), value.to_vec(), lease, &mut events);
        state.commit(rev, events);
        Ok(rev)
    }

    async fn delete(&self, keys: KeyRange) -> Result<(i64, Revision)> {
        check_key_range(&keys)?;
        check_size(
            encoded::raft_entry(encoded::delete(&keys)),
            MAX_REQUEST_BYTES,
        )?;
        let mut state = self.lock_current();
        let rev = state.revision + 1;
        let mut events = Vec::new();
        let deleted = state.apply_delete(rev, &keys, &mut events);
        state.commit(rev, events);
        Ok((deleted, state.revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        validate_txn(&txn)?;
        self.lock_current().txn(txn)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseGrant> {
        let secs = ttl
            .as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0));
        if secs > MAX_LEASE_TTL_SECS {
            return Err(Error::invalid(format!(
                "lease TTL is too large: {secs} s (limit {MAX_LEASE_TTL_SECS} s)"
            )));
        }
        let ttl = Duration::from_secs(secs.max(MIN_LEASE_TTL_SECS));
        let id = {
            let mut state = self.lock_current();
            let mut id = state.next_lease_id;
            while id <= 0 || state.leases.contains_key(&id) {
                id = id.checked_add(1).unwrap_or(1);
            }
            state.next_lease_id = id.checked_add(1).unwrap_or(1);
            let now = Instant::now();
            let deadline = now
                .checked_add(ttl.saturating_add(EXPIRY_MARGIN))
                .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
                .unwrap_or(now);
            state.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline,
                    keys: BTreeSet::new(),
                },
            );
            state.deadlines.insert((deadline, id));
            id
        };
        // Without a Tokio runtime there is no timer; the lease then expires at the next
        // operation on the store after its deadline.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(lease_timer(Arc::downgrade(&self.inner), id));
        }
        Ok(LeaseGrant { id, ttl })
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<Option<Duration>> {
        let mut state = self.lock_current();
        let state = &mut *state;
        let Some(lease) = state.leases.get_mut(&id) else {
            return Ok(None);
        };
        let now = Instant::now();
        let deadline = now
            .checked_add(lease.ttl.saturating_add(EXPIRY_MARGIN))
            .unwrap_or(lease.deadline);
        state.deadlines.remove(&(lease.deadline, id));
        state.deadlines.insert((deadline, id));
        lease.deadline = deadline;
        Ok(Some(lease.ttl))
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<()> {
        if self.lock_current().revoke(id) {
            Ok(())
        } else {
            Err(Error::LeaseNotFound(id))
        }
    }

    /// In whole seconds, rounded down, as etcd reports it.
    async fn lease_time_to_live(&self, id: LeaseId) -> Result<Option<Duration>> {
        let state = self.lock_current();
        let now = Instant::now();
        Ok(state.lease_deadline(id).map(|deadline| {
            let left = deadline.saturating_duration_since(now);
            Duration::from_secs(left.saturating_sub(EXPIRY_MARGIN).as_secs())
        }))
    }

    async fn watch(&self, watch: Watch) -> Result<WatchStream> {
        Ok(self.watch_at(watch, false).1)
    }

    async fn watch_from_now(&self, watch: Watch) -> Result<(Revision, WatchStream)> {
        Ok(self.watch_at(watch, true))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.compact_to(revision)
    }
}

impl MemStore {
    /// Register a watch (from the next write if `from_now`); returns the store's revision
    /// at registration with the stream.
    fn watch_at(&self, mut watch: Watch, from_now: bool) -> (Revision, WatchStream) {
        // As etcd's server: a watch of the empty key watches "\0", its smallest key.
        if let KeyRange::Key(key) = &mut watch.keys {
            if key.is_empty() {
                key.push(0);
            }
        }
        let mut state = self.lock_current();
        if from_now {
            watch.start_revision = 0;
        }
        let at = state.revision;
        let requested = watch.start_revision;
        if requested > 0 && requested < state.compact_revision {
            let compact_revision = state.compact_revision;
            let failed = futures::stream::once(async move {
                Err(Error::Compacted {
                    requested,
                    compact_revision,
                })
            });
            return (at, failed.boxed());
        }
        let min_revision = if requested > 0 {
            requested
        } else {
            state.revision + 1
        };
        let (tx, rx) = mpsc::unbounded_channel();

        // Replay, then register, under the same lock: no gap, no duplicate. Like etcd, the
        // replay goes in batches of whole revisions, at most `REPLAY_BATCH_REVISIONS` each,
        // stamped with the current revision.
        let start = state
            .history
            .partition_point(|e| e.revision() < min_revision);
        let new_batch = || WatchResponse {
            header_revision: at,
            events: Vec::new(),
        };
        let mut batch = new_batch();
        let (mut revisions, mut last) = (0, 0);
        for e in state.history.range(start..) {
            if !watch.keys.contains(&e.kv.key)
                || (watch.deletes_only && e.kind != EventKind::Delete)
            {
                continue;
            }
            if e.revision() != last {
                if revisions == REPLAY_BATCH_REVISIONS {
                    let _ = tx.send(std::mem::replace(&mut batch, new_batch()));
                    revisions = 0;
                }
                revisions += 1;
                last = e.revision();
            }
            batch.events.push(e.to_event(watch.prev_kv));
        }
        if !batch.events.is_empty() {
            let _ = tx.send(batch);
        }

        let id = state.next_watcher_id;
        state.next_watcher_id += 1;
        state.watchers.push(Watcher {
            id,
            keys: watch.keys,
            min_revision,
            prev_kv: watch.prev_kv,
            deletes_only: watch.deletes_only,
            tx,
        });
        drop(state);
        let stream = MemWatchStream {
            rx,
            id,
            inner: Arc::downgrade(&self.inner),
        };
        (at, stream.boxed())
    }

    /// Discard the history before `revision`, and the deletes at it (see [`Store::compact`]).
    fn compact_to(&self, revision: Revision) -> Result<()> {
        // As EtcdStore refuses it, before asking etcd.
        if revision <= 0 {
            return Err(Error::invalid("compact revision must be positive"));
        }
        let mut state = self.lock_current();
        if revision > state.revision {
            return Err(Error::invalid(format!(
                "required revision is a future revision: {revision} (current revision {})",
                state.revision
            )));
        }
        if revision <= state.compact_revision {
            // As etcd answers a compaction at or below the compact revision.
            return Err(Error::Compacted {
                requested: revision,
                compact_revision: state.compact_revision,
            });
        }
        state.compact_revision = revision;
        // etcd keeps each key's last version at or before the compact revision, unless it
        // is a deletion: the deletes at the compact revision go too, its puts stay. They
        // lose their previous keys: etcd reads those at the revision before, now compacted
        // (and no read before the compact revision needs them to undo the puts).
        let past = state.history.partition_point(|e| e.revision() <= revision);
        let kept: Vec<HistEvent> = state
            .history
            .drain(..past)
            .filter(|e| e.revision() == revision && e.kind == EventKind::Put)
            .map(|e| HistEvent { prev: None, ..e })
            .collect();
        for e in kept.into_iter().rev() {
            state.history.push_front(e);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use futures::FutureExt;

    const SEC: Duration = Duration::from_secs(1);

    async fn get(store: &MemStore, key: &str) -> Option<KeyValue> {
        store.range(Range::key(key)).await.unwrap().kvs.pop()
    }

    async fn next(stream: &mut WatchStream) -> WatchResponse {
        tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("watch timed out")
            .expect("watch ended")
            .unwrap()
    }

    fn assert_idle(stream: &mut WatchStream) {
        let pending = stream.next().now_or_never();
        assert!(pending.is_none(), "unexpected watch item: {pending:?}");
    }

    fn keys(kvs: &[KeyValue]) -> Vec<String> {
        kvs.iter().map(|kv| kv.key_str().into_owned()).collect()
    }

    fn revisions(resp: &WatchResponse) -> Vec<Revision> {
        resp.events.iter().map(|e| e.kv.mod_revision).collect()
    }

    #[tokio::test]
    async fn revision_bumps_once_per_changing_write() {
        let s = MemStore::new();
        assert_eq!(s.range(Range::prefix("")).await.unwrap().header_revision, 1);
        assert_eq!(s.put(b"a", b"1", 0).await.unwrap(), 2);
        assert_eq!(s.put(b"b", b"2", 0).await.unwrap(), 3);
        // Deleting nothing does not bump.
        assert_eq!(s.delete(KeyRange::key("zzz")).await.unwrap(), (0, 3));
        assert_eq!(s.delete(KeyRange::key("a")).await.unwrap(), (1, 4));
        // Read-only txn.
        let r = s
            .txn(Txn::new().and_then([TxnOp::get(Range::key("b"))]))
            .await
            .unwrap();
        assert_eq!(r.header_revision, 4);
        // A txn whose only write deletes nothing.
        let r = s
            .txn(Txn::new().and_then([TxnOp::delete("nope")]))
            .await
            .unwrap();
        assert_eq!(r.header_revision, 4);
        assert_eq!(r.responses, vec![TxnOpResponse::Delete { deleted: 0 }]);
        // All writes of a txn share one revision.
        let r = s
            .txn(Txn::new().and_then([
                TxnOp::put("x", "1", 0),
                TxnOp::put("y", "2", 0),
                TxnOp::delete("b"),
            ]))
            .await
            .unwrap();
        assert_eq!(r.header_revision, 5);
        assert_eq!(get(&s, "x").await.unwrap().mod_revision, 5);
        assert_eq!(get(&s, "y").await.unwrap().create_revision, 5);
        assert!(get(&s, "b").await.is_none());
        // Prefix delete: one revision for all keys.
        assert_eq!(s.delete(KeyRange::prefix("")).await.unwrap(), (2, 6));
        assert_eq!(s.range(Range::prefix("")).await.unwrap().kvs, vec![]);
    }

    #[tokio::test]
    async fn create_mod_version_semantics() {
        let s = MemStore::new();
        s.put(b"k", b"v1", 0).await.unwrap();
        let kv = get(&s, "k").await.unwrap();
        assert_eq!(
            (kv.create_revision, kv.mod_revision, kv.version, kv.lease),
            (2, 2, 1, 0)
        );
        assert_eq!(kv.value, b"v1");
        s.put(b"other", b"", 0).await.unwrap();
        s.put(b"k", b"v2", 0).await.unwrap();
        let kv = get(&s, "k").await.unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 4, 2));
        s.delete(KeyRange::key("k")).await.unwrap();
        s.put(b"k", b"v3", 0).await.unwrap();
        let kv = get(&s, "k").await.unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (6, 6, 1));
    }

    #[tokio::test]
    async fn range_sort_limit_and_filters() {
        let s = MemStore::new();
        s.put(b"p/b", b"", 0).await.unwrap(); // 2
        s.put(b"p/a", b"", 0).await.unwrap(); // 3
        s.put(b"q", b"", 0).await.unwrap(); // 4
        s.put(b"p/c", b"", 0).await.unwrap(); // 5
        s.put(b"p/b", b"again", 0).await.unwrap(); // 6: p/b mod 6, create 2
        s.put(b"p", b"", 0).await.unwrap(); // 7: "p" is under prefix "p" but not "p/"

        let r = s.range(Range::prefix("p/")).await.unwrap();
        assert_eq!(keys(&r.kvs), ["p/a", "p/b", "p/c"]);
        assert!(!r.more);
        assert_eq!(r.header_revision, 7);
        assert_eq!(
            keys(&s.range(Range::prefix("")).await.unwrap().kvs),
            ["p", "p/a", "p/b", "p/c", "q"]
        );
        assert_eq!(
            keys(&s.range(Range::prefix("p")).await.unwrap().kvs),
            ["p", "p/a", "p/b", "p/c"]
        );
        assert_eq!(
            keys(&s.range(Range::prefix("r")).await.unwrap().kvs),
            Vec::<String>::new()
        );

        // Key order with a limit.
        let r = s.range(Range::prefix("p/").with_limit(2)).await.unwrap();
        assert_eq!(keys(&r.kvs), ["p/a", "p/b"]);
        assert!(r.more);
        let r = s.range(Range::prefix("p/").with_limit(3)).await.unwrap();
        assert_eq!(r.kvs.len(), 3);
        assert!(!r.more);

        let sorted = |t, o| Range::prefix("p/").sort_by(t, o);
        let r = s
            .range(sorted(SortTarget::CreateRevision, SortOrder::Ascending))
            .await
            .unwrap();
        assert_eq!(keys(&r.kvs), ["p/b", "p/a", "p/c"]);
        let r = s
            .range(sorted(SortTarget::CreateRevision, SortOrder::Descending))
            .await
            .unwrap();
        assert_eq!(keys(&r.kvs), ["p/c", "p/a", "p/b"]);
        let r = s
            .range(sorted(SortTarget::ModRevision, SortOrder::Ascending))
            .await
            .unwrap();
        assert_eq!(keys(&r.kvs), ["p/a", "p/c", "p/b"]);
        let r = s
            .range(sorted(SortTarget::Key, SortOrder::Descending))
            .await
            .unwrap();
        assert_eq!(keys(&r.kvs), ["p/c", "p/b", "p/a"]);
        let r = s
            .range(sorted(SortTarget::ModRevision, SortOrder::Descending).with_limit(2))
            .await
            .unwrap();
        assert_eq!(keys(&r.kvs), ["p/b", "p/c"]);
        assert!(r.more);

        let r = s.range(Range::prefix("p/").first_created()).await.unwrap();
        assert_eq!(keys(&r.kvs), ["p/b"]);
        assert!(r.more);
        let r = s.range(Range::prefix("p/").last_created()).await.unwrap();
        assert_eq!(keys(&r.kvs), ["p/c"]);
        assert!(r.more);
        let r = s.range(Range::key("p/c").first_created()).await.unwrap();
        assert_eq!(keys(&r.kvs), ["p/c"]);
        assert!(!r.more);

        // Filters apply before sort and limit (the wait-for-predecessor read).
        let r = s
            .range(
                Range::prefix("p/")
                    .with_max_create_revision(4)
                    .last_created(),
            )
            .await
            .unwrap();
        assert_eq!(keys(&r.kvs), ["p/a"]);
        assert!(r.more);
        let r = s
            .range(
                Range::prefix("p/")
                    .with_max_create_revision(2)
                    .last_created(),
            )
            .await
            .unwrap();
        assert_eq!(keys(&r.kvs), ["p/b"]);
        assert!(!r.more);
        let r = s
            .range(Range::prefix("p/").with_max_create_revision(1))
            .await
            .unwrap();
        assert!(r.kvs.is_empty());
        let r = s
            .range(Range::prefix("p/").with_max_mod_revision(5))
            .await
            .unwrap();
        assert_eq!(keys(&r.kvs), ["p/a", "p/c"]);
        let r = s
            .range(Range::prefix("p/").with_max_mod_revision(5).with_limit(1))
            .await
            .unwrap();
        assert_eq!(keys(&r.kvs), ["p/a"]);
        assert!(r.more);
        // Keys only: the same keys and revisions, no values; also for the one-pass
        // "last created" read.
        let full = s.range(Range::prefix("p/")).await.unwrap();
        assert!(full.kvs.iter().any(|kv| !kv.value.is_empty()));
        let r = s.range(Range::prefix("p/").keys_only()).await.unwrap();
        assert_eq!(keys(&r.kvs), keys(&full.kvs));
        for (k, f) in r.kvs.iter().zip(&full.kvs) {
            assert!(k.value.is_empty());
            assert_eq!(
                (k.create_revision, k.mod_revision, k.version, k.lease),
                (f.create_revision, f.mod_revision, f.version, f.lease)
            );
        }
        let r = s
            .range(Range::prefix("p/").last_created().keys_only())
            .await
            .unwrap();
        assert_eq!(r.kvs.len(), 1);
        assert!(r.kvs[0].value.is_empty());
    }

    #[tokio::test]
    async fn ties_in_sort_keep_key_order() {
        let s = MemStore::new();
        s.txn(Txn::new().and_then([TxnOp::put("t/b", "", 0), TxnOp::put("t/a", "", 0)]))
            .await
            .unwrap();
        let r = s.range(Range::prefix("t/").first_created()).await.unwrap();
        assert_eq!(keys(&r.kvs), ["t/a"]);
        let r = s.range(Range::prefix("t/").last_created()).await.unwrap();
        assert_eq!(keys(&r.kvs), ["t/a"]);
    }

    #[tokio::test]
    async fn txn_compares() {
        let s = MemStore::new();
        let check = |c: Compare| {
            let s = s.clone();
            async move { s.txn(Txn::new().when([c])).await.unwrap().succeeded }
        };
        // Missing key: numeric targets compare against 0; value compares fail.
        assert!(check(Compare::create_revision("m", CompareOp::Equal, 0)).await);
        assert!(check(Compare::mod_revision("m", CompareOp::Equal, 0)).await);
        assert!(check(Compare::version("m", CompareOp::Less, 1)).await);
        assert!(check(Compare::lease("m", CompareOp::Equal, 0)).await);
        assert!(!check(Compare::value("m", CompareOp::Equal, "")).await);
        assert!(!check(Compare::value("m", CompareOp::NotEqual, "x")).await);

        s.put(b"k", b"b", 0).await.unwrap(); // 2
        s.put(b"k", b"b", 0).await.unwrap(); // 3
        assert!(check(Compare::create_revision("k", CompareOp::Equal, 2)).await);
        assert!(check(Compare::create_revision("k", CompareOp::NotEqual, 0)).await);
        assert!(!check(Compare::create_revision("k", CompareOp::Equal, 0)).await);
        assert!(check(Compare::mod_revision("k", CompareOp::Greater, 2)).await);
        assert!(!check(Compare::mod_revision("k", CompareOp::Less, 3)).await);
        assert!(check(Compare::version("k", CompareOp::Equal, 2)).await);
        assert!(check(Compare::value("k", CompareOp::Equal, "b")).await);
        assert!(check(Compare::value("k", CompareOp::Greater, "a")).await);
        assert!(check(Compare::value("k", CompareOp::Less, "ba")).await);
        assert!(check(Compare::value("k", CompareOp::NotEqual, "c")).await);
        assert!(check(Compare::lease("k", CompareOp::Equal, 0)).await);

        // All compares must hold; the failure branch runs otherwise.
        let r = s
            .txn(
                Txn::new()
                    .when([
                        Compare::version("k", CompareOp::Equal, 2),
                        Compare::value("k", CompareOp::Equal, "nope"),
                    ])
                    .and_then([TxnOp::put("yes", "", 0)])
                    .or_else([TxnOp::put("no", "", 0), TxnOp::get(Range::key("k"))]),
            )
            .await
            .unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.header_revision, 4);
        assert_eq!(r.responses.len(), 2);
        assert_eq!(r.responses[0], TxnOpResponse::Put);
        assert_eq!(keys(&r.responses[1].as_get().unwrap().kvs), ["k"]);
        assert!(get(&s, "yes").await.is_none());
        assert!(get(&s, "no").await.is_some());
    }

    #[tokio::test]
    async fn mutex_acquire_txn_shape() {
        // The lock protocol: put-if-absent plus the first-created read, in one txn.
        let s = MemStore::new();
        let acquire = |key: &'static str| {
            let s = s.clone();
            async move {
                s.txn(
                    Txn::new()
                        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                        .and_then([
                            TxnOp::put(key, "", 0),
                            TxnOp::get(Range::prefix("lock/").first_created()),
                        ])
                        .or_else([
                            TxnOp::get(Range::key(key)),
                            TxnOp::get(Range::prefix("lock/").first_created()),
                        ]),
                )
                .await
                .unwrap()
            }
        };
        let a = acquire("lock/a").await;
        assert!(a.succeeded);
        assert_eq!(a.header_revision, 2);
        let first = a.responses[1].as_get().unwrap();
        assert_eq!(first.kvs[0].create_revision, 2);
        assert_eq!(first.header_revision, 2);
        let b = acquire("lock/b").await;
        assert_eq!(b.responses[1].as_get().unwrap().kvs[0].key, b"lock/a");
        let again = acquire("lock/b").await;
        assert!(!again.succeeded);
        assert_eq!(again.header_revision, 3);
        assert_eq!(
            again.responses[0].as_get().unwrap().kvs[0].create_revision,
            3
        );
    }

    #[tokio::test]
    async fn txn_get_sees_earlier_writes() {
        let s = MemStore::new();
        s.put(b"gone", b"x", 0).await.unwrap();
        let r = s
            .txn(Txn::new().and_then([
                TxnOp::get(Range::prefix("")),
                TxnOp::put("new", "v", 0),
                TxnOp::delete("gone"),
                TxnOp::get(Range::prefix("")),
            ]))
            .await
            .unwrap();
        assert_eq!(r.header_revision, 3);
        let before = r.responses[0].as_get().unwrap();
        assert_eq!(keys(&before.kvs), ["gone"]);
        assert_eq!(before.header_revision, 2);
        assert_eq!(r.responses[2], TxnOpResponse::Delete { deleted: 1 });
        let after = r.responses[3].as_get().unwrap();
        assert_eq!(keys(&after.kvs), ["new"]);
        assert_eq!(after.kvs[0].mod_revision, 3);
        assert_eq!(after.header_revision, 3);
    }

    #[tokio::test]
    async fn unknown_lease_fails_and_applies_nothing() {
        let s = MemStore::new();
        assert!(matches!(
            s.put(b"k", b"v", 42).await,
            Err(Error::LeaseNotFound(42))
        ));
        let err = s
            .txn(Txn::new().and_then([TxnOp::put("a", "", 0), TxnOp::put("b", "", 42)]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LeaseNotFound(42)), "{err:?}");
        let r = s.range(Range::prefix("")).await.unwrap();
        assert!(r.kvs.is_empty());
        assert_eq!(r.header_revision, 1);
        // Only the branch taken is checked, as in etcd.
        let r = s
            .txn(
                Txn::new()
                    .and_then([TxnOp::put("a", "", 0)])
                    .or_else([TxnOp::put("b", "", 42)]),
            )
            .await
            .unwrap();
        assert!(r.succeeded);
        assert_eq!(r.header_revision, 2);
    }

    /// etcd checks a txn branch's puts' leases before its reads' revisions (found by a
    /// random differential against etcd: a future read ahead of a put with an unknown
    /// lease failed as "future revision" here, "lease not found" on etcd).
    #[tokio::test]
    async fn txn_checks_leases_before_read_revisions() {
        let store = MemStore::new();
        let err = store
            .txn(Txn::new().and_then([
                TxnOp::get(Range::key("a").at_revision(100)),
                TxnOp::put("b", "", 0x1234),
            ]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LeaseNotFound(0x1234)), "{err:?}");
    }

    #[tokio::test]
    async fn request_checks() {
        let s = MemStore::new();
        fn invalid<T>(r: Result<T>) -> bool {
            matches!(r, Err(Error::InvalidArgument(_)))
        }
        assert!(invalid(s.put(b"", b"v", 0).await));
        assert!(invalid(s.range(Range::key("")).await));
        assert!(invalid(s.delete(KeyRange::key("")).await));
        assert!(invalid(
            s.txn(Txn::new().and_then([TxnOp::put("", "", 0)])).await
        ));

        // The limits: request_sizes_are_counted_as_etcd_counts_them.
        let big = vec![0_u8; MAX_REQUEST_BYTES];
        let err = s.put(b"k", &big, 0).await.unwrap_err();
        assert!(err.to_string().contains("request is too large"), "{err}");
        assert!(err.is_invalid_input());
        assert!(invalid(
            s.txn(Txn::new().and_then([TxnOp::put("k", big.clone(), 0)]))
                .await
        ));

        // Same key twice, or put and delete of the same key, in one branch.
        let dup = s
            .txn(Txn::new().and_then([TxnOp::put("a", "", 0), TxnOp::put("a", "", 0)]))
            .await
            .unwrap_err();
        assert!(dup.to_string().contains("duplicate key"), "{dup}");
        let dup = Txn::new().or_else([
            TxnOp::Delete(KeyRange::prefix("a")),
            TxnOp::put("ab", "", 0),
        ]);
        assert!(invalid(s.txn(dup).await));
        // Across branches is fine.
        s.txn(
            Txn::new()
                .and_then([TxnOp::put("a", "", 0)])
                .or_else([TxnOp::delete("a")]),
        )
        .await
        .unwrap();

        let many = (0..=MAX_TXN_OPS).map(|i| TxnOp::put(format!("k{i}"), "", 0));
        assert!(invalid(s.txn(Txn::new().and_then(many)).await));
        let ok = (0..MAX_TXN_OPS).map(|i| TxnOp::put(format!("k{i}"), "", 0));
        s.txn(Txn::new().and_then(ok)).await.unwrap();
    }

    /// etcd checks a branch's puts against its deletes as key intervals, and sends a prefix
    /// with no end (the empty one, or one of 0xff bytes only) as a range ending at "\0",
    /// which that check treats as empty: deleting such a prefix clashes with no put. Each
    /// event's previous key is the key before the transaction, as etcd reads it.
    #[tokio::test]
    async fn deleting_a_prefix_with_no_end_clashes_with_no_put() {
        let s = MemStore::new();
        s.put(b"a", b"old", 0).await.unwrap(); // 2
        s.put(b"\xff\xffb", b"old", 0).await.unwrap(); // 3
        let mut w = s.watch(Watch::prefix("").with_prev_kv()).await.unwrap();
        let put_then_delete = [
            TxnOp::put("a", "new", 0),
            TxnOp::Delete(KeyRange::prefix("")),
        ];
        let r = s.txn(Txn::new().and_then(put_then_delete)).await.unwrap();
        assert_eq!(r.header_revision, 4);
        assert!(s.range(Range::prefix("")).await.unwrap().kvs.is_empty());
        let events: Vec<_> = next(&mut w)
            .await
            .events
            .into_iter()
            .map(|e| {
                (
                    e.kind,
                    e.kv.key,
                    e.prev_kv.map(|p| (p.value, p.mod_revision)),
                )
            })
            .collect();
        let old = |rev| Some((b"old".to_vec(), rev));
        assert_eq!(
            events,
            [
                (EventKind::Put, b"a".to_vec(), old(2)),
                (EventKind::Delete, b"a".to_vec(), old(2)),
                (EventKind::Delete, b"\xff\xffb".to_vec(), old(3)),
            ]
        );
        // Before the put: it stays.
        let delete_then_put = [TxnOp::Delete(KeyRange::prefix("")), TxnOp::put("a", "1", 0)];
        s.txn(Txn::new().and_then(delete_then_put)).await.unwrap(); // 5
        assert_eq!(get(&s, "a").await.unwrap().create_revision, 5);
        let prefix = KeyRange::prefix(b"\xff".to_vec());
        s.txn(Txn::new().and_then([TxnOp::put(b"\xffc".to_vec(), "", 0), TxnOp::Delete(prefix)]))
            .await
            .unwrap();
        assert_eq!(keys(&s.range(Range::prefix("")).await.unwrap().kvs), ["a"]);
        // A prefix with an end still clashes with a put under it.
        let clash = [
            TxnOp::put("p/x", "", 0),
            TxnOp::Delete(KeyRange::prefix("p/")),
        ];
        let err = s.txn(Txn::new().and_then(clash)).await.unwrap_err();
        assert!(err.to_string().contains("duplicate key"), "{err}");
    }

    /// etcd counts a write's encoded raft entry, not its keys and values; it serves reads
    /// and read-only transactions without raft, where only gRPC's limit (2 MiB) applies.
    /// The boundaries here are those measured on etcd 3.4.23 (with a request id of 10
    /// bytes, the longest) through EtcdStore.
    #[tokio::test]
    async fn request_sizes_are_counted_as_etcd_counts_them() {
        let s = MemStore::new();
        let x = |n: usize| vec![b'x'; n];
        let too_large = |r: Result<()>| match r {
            Err(Error::InvalidArgument(m)) => m.contains("request is too large"),
            _ => false,
        };
        let m = MAX_REQUEST_BYTES;
        let put = |value: Vec<u8>, lease| {
            let s = s.clone();
            async move { s.put(b"k", &value, lease).await.map(drop) }
        };
        put(x(m - 25), 0).await.unwrap();
        assert!(too_large(put(x(m - 24), 0).await));
        // A lease id of 9 bytes, like etcd's and ours.
        let lease = s.lease_grant(100 * SEC).await.unwrap().id;
        assert_eq!(encoded::varint_len(lease as u64), 9);
        put(x(m - 35), lease).await.unwrap();
        assert!(too_large(put(x(m - 34), lease).await));

        let delete = |keys: KeyRange| {
            let s = s.clone();
            async move { s.delete(keys).await.map(drop) }
        };
        delete(KeyRange::key(x(m - 22))).await.unwrap();
        assert!(too_large(delete(KeyRange::key(x(m - 21))).await));
        // etcd gets the range end too: "xx..xy", as long as the prefix.
        let most = (m - 26) / 2;
        delete(KeyRange::prefix(x(most))).await.unwrap();
        assert!(too_large(delete(KeyRange::prefix(x(most + 1))).await));

        let txn = |txn: Txn| {
            let s = s.clone();
            async move { s.txn(txn).await.map(drop) }
        };
        let one_put = |n| Txn::new().and_then([TxnOp::put("k", x(n), 0)]);
        txn(one_put(m - 33)).await.unwrap();
        assert!(too_large(txn(one_put(m - 32)).await));
        let mixed = |n| {
            Txn::new()
                .when([
                    Compare::version("k", CompareOp::Greater, 0),
                    Compare::mod_revision("k", CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put("k", x(n), 0),
                    TxnOp::get(Range::prefix("").with_limit(1)),
                ])
                .or_else([TxnOp::delete("zz")])
        };
        txn(mixed(m - 71)).await.unwrap();
        assert!(too_large(txn(mixed(m - 70)).await));

        // Read-only: gRPC's limit.
        let grpc = m + 512 * 1024;
        let read_only = |n| {
            Txn::new()
                .when([Compare::value("k", CompareOp::Equal, x(n))])
                .and_then([TxnOp::get(Range::key("k"))])
        };
        txn(read_only(grpc - 20)).await.unwrap();
        assert!(too_large(txn(read_only(grpc - 19)).await));
        let range = |key| {
            let s = s.clone();
            async move { s.range(Range::key(key)).await.map(drop) }
        };
        range(x(grpc - 4)).await.unwrap();
        assert!(too_large(range(x(grpc - 3)).await));
    }

    #[tokio::test(start_paused = true)]
    async fn lease_grant_ttls_and_ids() {
        let s = MemStore::new();
        let g = s.lease_grant(Duration::ZERO).await.unwrap();
        assert_eq!(g.ttl, 2 * SEC);
        assert_eq!(s.lease_grant(SEC).await.unwrap().ttl, 2 * SEC);
        assert_eq!(
            s.lease_grant(Duration::from_millis(2500))
                .await
                .unwrap()
                .ttl,
            3 * SEC
        );
        assert_eq!(s.lease_grant(60 * SEC).await.unwrap().ttl, 60 * SEC);
        assert!(s
            .lease_grant(Duration::from_secs(MAX_LEASE_TTL_SECS))
            .await
            .is_ok());
        let err = s
            .lease_grant(Duration::from_secs(MAX_LEASE_TTL_SECS + 1))
            .await
            .unwrap_err();
        assert!(err.is_invalid_input());
        assert!(s.lease_grant(Duration::MAX).await.is_err());

        let mut ids = HashSet::new();
        for _ in 0..100 {
            let id = s.lease_grant(10 * SEC).await.unwrap().id;
            assert!(id > 0);
            assert!(ids.insert(id));
        }
        assert_eq!(s.lease_time_to_live(g.id).await.unwrap(), Some(2 * SEC));
        assert_eq!(s.lease_time_to_live(12345).await.unwrap(), None);
        assert!(matches!(
            s.lease_revoke(12345).await,
            Err(Error::LeaseNotFound(12345))
        ));
        assert_eq!(s.lease_keep_alive(12345).await.unwrap(), None);
        // An independent store draws its own ids.
        let other = MemStore::new().lease_grant(SEC).await.unwrap().id;
        assert!(!ids.contains(&other));
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expiry_deletes_keys_in_one_revision() {
        let s = MemStore::new();
        let lease = s.lease_grant(SEC).await.unwrap(); // raised to 2 s
        s.put(b"l/a", b"1", lease.id).await.unwrap(); // 2
        s.put(b"l/b", b"2", lease.id).await.unwrap(); // 3
        s.put(b"l/free", b"3", 0).await.unwrap(); // 4
        assert_eq!(get(&s, "l/a").await.unwrap().lease, lease.id);
        let mut w = s.watch(Watch::prefix("l/").with_prev_kv()).await.unwrap();

        tokio::time::advance(Duration::from_millis(1500)).await;
        // 500 ms left: whole seconds, rounded down.
        assert_eq!(
            s.lease_time_to_live(lease.id).await.unwrap(),
            Some(Duration::ZERO)
        );
        assert!(get(&s, "l/a").await.is_some());
        assert_idle(&mut w);

        tokio::time::advance(SEC).await;
        // The lease timer revokes it; the watch sees both deletes in one batch.
        let resp = next(&mut w).await;
        assert_eq!(resp.header_revision, 5);
        assert_eq!(revisions(&resp), [5, 5]);
        let e = &resp.events[0];
        assert_eq!(e.kind, EventKind::Delete);
        assert_eq!(
            e.kv,
            KeyValue {
                key: b"l/a".to_vec(),
                mod_revision: 5,
                ..KeyValue::default()
            }
        );
        assert_eq!(e.prev_kv.as_ref().unwrap().value, b"1");
        assert_eq!(resp.events[1].kv.key, b"l/b");
        assert!(get(&s, "l/a").await.is_none());
        assert!(get(&s, "l/free").await.is_some());
        assert_eq!(s.lease_keep_alive(lease.id).await.unwrap(), None);
        assert_eq!(s.lease_time_to_live(lease.id).await.unwrap(), None);
        assert!(matches!(
            s.lease_revoke(lease.id).await,
            Err(Error::LeaseNotFound(_))
        ));
        assert!(matches!(
            s.put(b"x", b"", lease.id).await,
            Err(Error::LeaseNotFound(_))
        ));
        assert_idle(&mut w);
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_is_seen_by_the_next_operation() {
        // Even before the timer task runs, an operation after the deadline sees it expired;
        // the deadline is `EXPIRY_MARGIN` after the TTL.
        let s = MemStore::new();
        let lease = s.lease_grant(2 * SEC).await.unwrap();
        s.put(b"k", b"", lease.id).await.unwrap();
        tokio::time::advance(2 * SEC).await;
        assert_eq!(s.range(Range::key("k")).await.unwrap().kvs.len(), 1);
        assert_eq!(
            s.lease_time_to_live(lease.id).await.unwrap(),
            Some(Duration::ZERO)
        );
        tokio::time::advance(EXPIRY_MARGIN).await;
        let r = s.range(Range::key("k")).await.unwrap();
        assert!(r.kvs.is_empty());
        assert_eq!(r.header_revision, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_extends() {
        let s = MemStore::new();
        let lease = s.lease_grant(5 * SEC).await.unwrap();
        s.put(b"k", b"", lease.id).await.unwrap();
        tokio::time::advance(4 * SEC).await;
        assert_eq!(s.lease_keep_alive(lease.id).await.unwrap(), Some(5 * SEC));
        assert_eq!(s.lease_time_to_live(lease.id).await.unwrap(), Some(5 * SEC));
        tokio::time::advance(4 * SEC).await;
        tokio::task::yield_now().await;
        assert!(get(&s, "k").await.is_some());
        assert_eq!(s.lease_time_to_live(lease.id).await.unwrap(), Some(SEC));
        let mut w = s.watch(Watch::key("k")).await.unwrap();
        tokio::time::advance(2 * SEC).await;
        let resp = next(&mut w).await;
        assert_eq!(resp.events[0].kind, EventKind::Delete);
        assert_eq!(s.lease_keep_alive(lease.id).await.unwrap(), None);
    }

    /// etcd reports the time a lease has left in whole seconds, rounded down.
    #[tokio::test(start_paused = true)]
    async fn time_to_live_is_in_whole_seconds_rounded_down() {
        let s = MemStore::new();
        let lease = s.lease_grant(10 * SEC).await.unwrap();
        assert_eq!(
            s.lease_time_to_live(lease.id).await.unwrap(),
            Some(10 * SEC)
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(s.lease_time_to_live(lease.id).await.unwrap(), Some(9 * SEC));
        tokio::time::advance(Duration::from_millis(9_500)).await;
        assert_eq!(
            s.lease_time_to_live(lease.id).await.unwrap(),
            Some(Duration::ZERO)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn revoke_deletes_all_keys_in_one_revision() {
        let s = MemStore::new();
        let lease = s.lease_grant(60 * SEC).await.unwrap();
        let other = s.lease_grant(60 * SEC).await.unwrap();
        for k in ["r/c", "r/a", "r/b"] {
            s.put(k.as_bytes(), b"v", lease.id).await.unwrap();
        }
        s.put(b"r/other", b"v", other.id).await.unwrap();
        // Re-binding detaches from the old lease: lease 0, then another lease.
        s.put(b"r/detached", b"v", lease.id).await.unwrap();
        s.put(b"r/detached", b"v", 0).await.unwrap();
        s.put(b"r/moved", b"v", lease.id).await.unwrap();
        s.put(b"r/moved", b"v", other.id).await.unwrap(); // revision 9
                                                          // A key deleted and re-created without the lease is not deleted by the revoke.
        s.put(b"r/recreated", b"v", lease.id).await.unwrap();
        s.delete(KeyRange::key("r/recreated")).await.unwrap();
        s.put(b"r/recreated", b"v", 0).await.unwrap(); // revision 12

        let mut w = s.watch(Watch::prefix("r/")).await.unwrap();
        s.lease_revoke(lease.id).await.unwrap();
        let resp = next(&mut w).await;
        assert_eq!(resp.header_revision, 13);
        assert_eq!(revisions(&resp), [13, 13, 13]);
        let deleted: Vec<_> = resp
            .events
            .iter()
            .map(|e| e.kv.key_str().into_owned())
            .collect();
        assert_eq!(deleted, ["r/a", "r/b", "r/c"]);
        assert!(resp
            .events
            .iter()
            .all(|e| e.kind == EventKind::Delete && e.prev_kv.is_none()));
        let left = s.range(Range::prefix("r/")).await.unwrap();
        assert_eq!(
            keys(&left.kvs),
            ["r/detached", "r/moved", "r/other", "r/recreated"]
        );
        assert_eq!(left.header_revision, 13);
        assert!(matches!(
            s.lease_revoke(lease.id).await,
            Err(Error::LeaseNotFound(_))
        ));

        // Revoking a lease without keys does not bump the revision.
        let empty = s.lease_grant(60 * SEC).await.unwrap();
        s.lease_revoke(empty.id).await.unwrap();
        assert_eq!(
            s.range(Range::key("r/a")).await.unwrap().header_revision,
            13
        );
        assert_idle(&mut w);
    }

    #[tokio::test]
    async fn watch_replays_history_then_continues_live() {
        let s = MemStore::new();
        s.put(b"w", b"1", 0).await.unwrap(); // 2
        s.put(b"w", b"2", 0).await.unwrap(); // 3
        s.put(b"unrelated", b"", 0).await.unwrap(); // 4
        s.delete(KeyRange::key("w")).await.unwrap(); // 5
        s.put(b"w", b"3", 0).await.unwrap(); // 6

        let mut w = s
            .watch(Watch::key("w").from_revision(3).with_prev_kv())
            .await
            .unwrap();
        // The replay: one batch at the current revision.
        let r = next(&mut w).await;
        assert_eq!((r.header_revision, revisions(&r)), (6, vec![3, 5, 6]));
        assert_eq!(r.events[0].kind, EventKind::Put);
        assert_eq!(r.events[0].kv.value, b"2");
        assert_eq!(r.events[0].kv.version, 2);
        assert_eq!(r.events[0].prev_kv.as_ref().unwrap().value, b"1");
        assert_eq!(r.events[1].kind, EventKind::Delete);
        assert_eq!(r.events[1].kv.version, 0);
        assert_eq!(r.events[1].prev_kv.as_ref().unwrap().value, b"2");
        assert_eq!(r.events[2].kv.create_revision, 6);
        assert!(r.events[2].prev_kv.is_none());
        assert_idle(&mut w);

        s.put(b"w", b"4", 0).await.unwrap(); // 7
        let r = next(&mut w).await;
        assert_eq!(revisions(&r), [7]);
        assert_idle(&mut w);

        // From revision 1 on a fresh store's history: everything.
        let mut all = s.watch(Watch::prefix("").from_revision(1)).await.unwrap();
        assert_eq!(revisions(&next(&mut all).await), [2, 3, 4, 5, 6, 7]);
        assert_idle(&mut all);
    }

    /// Like etcd, a replay comes in batches of up to 1000 revisions, stamped with the
    /// store's revision when sent; a revision is never split across batches.
    #[tokio::test]
    async fn replay_batches_carry_the_current_revision() {
        let s = MemStore::new();
        s.put(b"r/a", b"", 0).await.unwrap(); // 2
        s.put(b"r/b", b"", 0).await.unwrap(); // 3
        s.put(b"other", b"", 0).await.unwrap(); // 4
        let mut w = s.watch(Watch::prefix("r/").from_revision(2)).await.unwrap();
        let r = next(&mut w).await;
        assert_eq!((r.header_revision, revisions(&r)), (4, vec![2, 3]));
        assert_idle(&mut w);

        let writes = REPLAY_BATCH_REVISIONS + 500;
        for i in 0..writes {
            let key = format!("r/{}", i % 7);
            s.txn(Txn::new().and_then([
                TxnOp::put(key.clone(), "", 0),
                TxnOp::put(format!("{key}/x"), "", 0),
            ]))
            .await
            .unwrap();
        }
        let now = s.range(Range::key("r/a")).await.unwrap().header_revision;
        let mut w = s.watch(Watch::prefix("r/").from_revision(5)).await.unwrap();
        let mut sizes = Vec::new();
        let mut all = Vec::new();
        while let Some(Some(Ok(batch))) = w.next().now_or_never() {
            assert_eq!(batch.header_revision, now);
            let revs = revisions(&batch);
            sizes.push(revs.len());
            all.extend(revs);
        }
        assert_eq!(sizes, [2 * REPLAY_BATCH_REVISIONS, 2 * 500]);
        let expected: Vec<Revision> = (5..=now).flat_map(|r| [r, r]).collect();
        assert_eq!(all, expected);
    }

    #[tokio::test]
    async fn a_deletes_only_watch_skips_puts_in_replay_and_live() {
        let s = MemStore::new();
        s.put(b"d/a", b"1", 0).await.unwrap(); // 2
        s.delete(KeyRange::key("d/a")).await.unwrap(); // 3
        s.put(b"d/b", b"1", 0).await.unwrap(); // 4
        let mut w = s
            .watch(Watch::prefix("d/").from_revision(1).deletes_only())
            .await
            .unwrap();
        let r = next(&mut w).await;
        assert_eq!(revisions(&r), [3]);
        assert_eq!(r.events[0].kind, EventKind::Delete);
        assert_idle(&mut w);
        s.put(b"d/b", b"2", 0).await.unwrap(); // 5
        assert_idle(&mut w);
        s.delete(KeyRange::key("d/b")).await.unwrap(); // 6
        let r = next(&mut w).await;
        assert_eq!(revisions(&r), [6]);
        assert_eq!(r.events[0].kind, EventKind::Delete);
        assert_idle(&mut w);
    }

    #[tokio::test]
    async fn live_key_and_prefix_watches() {
        let s = MemStore::new();
        s.put(b"a/old", b"", 0).await.unwrap(); // 2
        let mut key = s.watch(Watch::key("a/1")).await.unwrap();
        let mut prefix = s.watch(Watch::prefix("a/")).await.unwrap();
        assert_idle(&mut key);
        assert_idle(&mut prefix);

        s.put(b"b/1", b"", 0).await.unwrap(); // 3: neither
        s.put(b"a/2", b"x", 0).await.unwrap(); // 4: prefix
        s.txn(Txn::new().and_then([
            TxnOp::put("a/1", "y", 0),
            TxnOp::put("a/3", "", 0),
            TxnOp::put("c", "", 0),
        ]))
        .await
        .unwrap(); // 5: both; one batch for prefix

        let r = next(&mut key).await;
        assert_eq!(r.header_revision, 5);
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].kv.value, b"y");
        assert!(r.events[0].prev_kv.is_none());
        assert_idle(&mut key);

        let r = next(&mut prefix).await;
        assert_eq!(
            (r.header_revision, r.events[0].kv.key.as_slice()),
            (4, &b"a/2"[..])
        );
        let r = next(&mut prefix).await;
        assert_eq!(r.header_revision, 5);
        assert_eq!(
            r.events
                .iter()
                .map(|e| e.kv.key.clone())
                .collect::<Vec<_>>(),
            [b"a/1".to_vec(), b"a/3".to_vec()]
        );
        assert_idle(&mut prefix);

        s.delete(KeyRange::prefix("a/")).await.unwrap(); // 6
        let r = next(&mut prefix).await;
        assert_eq!(revisions(&r), [6, 6, 6, 6]);
        assert!(r.events.iter().all(|e| e.kind == EventKind::Delete));
        let r = next(&mut key).await;
        assert_eq!(revisions(&r), [6]);
    }

    #[tokio::test]
    async fn watch_from_a_future_revision_waits_for_it() {
        let s = MemStore::new();
        let mut w = s.watch(Watch::key("f").from_revision(4)).await.unwrap();
        s.put(b"f", b"2", 0).await.unwrap();
        s.put(b"f", b"3", 0).await.unwrap();
        assert_idle(&mut w);
        s.put(b"f", b"4", 0).await.unwrap();
        assert_eq!(revisions(&next(&mut w).await), [4]);
    }

    #[tokio::test]
    async fn dropping_the_stream_cancels_the_watch() {
        let s = MemStore::new();
        let w1 = s.watch(Watch::key("k")).await.unwrap();
        let _w2 = s.watch(Watch::key("k")).await.unwrap();
        assert_eq!(s.lock().watchers.len(), 2);
        drop(w1);
        assert_eq!(s.lock().watchers.len(), 1);
        s.put(b"k", b"", 0).await.unwrap();
        assert_eq!(s.lock().watchers.len(), 1);
    }

    #[tokio::test]
    async fn reads_at_a_past_revision() {
        let s = MemStore::new();
        s.put(b"h/a", b"a1", 0).await.unwrap(); // 2
        s.put(b"h/b", b"b1", 0).await.unwrap(); // 3
        s.put(b"h/a", b"a2", 0).await.unwrap(); // 4
        s.delete(KeyRange::key("h/b")).await.unwrap(); // 5
        s.put(b"h/c", b"c1", 0).await.unwrap(); // 6
        s.put(b"h/b", b"b2", 0).await.unwrap(); // 7
        s.put(b"other", b"", 0).await.unwrap(); // 8

        let at = |rev: Revision| {
            let s = s.clone();
            async move { s.range(Range::prefix("h/").at_revision(rev)).await.unwrap() }
        };
        let r = at(3).await;
        assert_eq!(
            r.header_revision, 8,
            "the header is the current revision, as in etcd"
        );
        assert_eq!(keys(&r.kvs), ["h/a", "h/b"]);
        assert_eq!(r.kvs[0].value, b"a1");
        assert_eq!((r.kvs[0].mod_revision, r.kvs[0].version), (2, 1));
        let r = at(4).await;
        assert_eq!(r.kvs[0].value, b"a2");
        assert_eq!(r.kvs[0].version, 2);
        assert_eq!(keys(&at(5).await.kvs), ["h/a"]);
        assert_eq!(keys(&at(6).await.kvs), ["h/a", "h/c"]);
        let r = at(7).await;
        assert_eq!(keys(&r.kvs), ["h/a", "h/b", "h/c"]);
        assert_eq!(r.kvs[1].create_revision, 7);
        assert_eq!(at(1).await.kvs, vec![]);
        // The current revision, or 0, is a plain read.
        assert_eq!(at(8).await, s.range(Range::prefix("h/")).await.unwrap());
        // One key, sorts and filters apply to the past view.
        let r = s.range(Range::key("h/b").at_revision(4)).await.unwrap();
        assert_eq!(r.kvs[0].value, b"b1");
        let r = s
            .range(Range::prefix("h/").at_revision(6).last_created())
            .await
            .unwrap();
        assert_eq!(keys(&r.kvs), ["h/c"]);
        let r = s
            .range(Range::prefix("h/").at_revision(7).with_max_mod_revision(4))
            .await
            .unwrap();
        assert_eq!(keys(&r.kvs), ["h/a"]);

        // A future revision is refused; so is a compacted one, but not the compact
        // revision itself.
        let err = s.range(Range::key("h/a").at_revision(9)).await.unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        assert!(err.to_string().contains("future revision"), "{err}");
        s.compact(4).await.unwrap();
        let err = s.range(Range::key("h/a").at_revision(3)).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Compacted {
                    requested: 3,
                    compact_revision: 4
                }
            ),
            "{err:?}"
        );
        assert_eq!(at(4).await.kvs[0].value, b"a2");
        assert_eq!(keys(&at(4).await.kvs), ["h/a", "h/b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn past_reads_see_lease_expiry_and_txns() {
        let s = MemStore::new();
        let lease = s.lease_grant(2 * SEC).await.unwrap();
        s.put(b"e/k", b"v", lease.id).await.unwrap(); // 2
        tokio::time::advance(3 * SEC).await;
        let now = s.range(Range::key("e/k")).await.unwrap();
        assert!(now.kvs.is_empty());
        assert_eq!(now.header_revision, 3);
        let then = s.range(Range::key("e/k").at_revision(2)).await.unwrap();
        assert_eq!(then.kvs[0].lease, lease.id);

        // Inside a txn, a past read does not see the txn's own writes; a compacted read
        // fails the whole txn and applies nothing.
        let r = s
            .txn(Txn::new().and_then([
                TxnOp::put("e/new", "1", 0),
                TxnOp::get(Range::prefix("e/").at_revision(2)),
                TxnOp::get(Range::prefix("e/")),
            ]))
            .await
            .unwrap();
        assert_eq!(r.header_revision, 4);
        assert_eq!(keys(&r.responses[1].as_get().unwrap().kvs), ["e/k"]);
        assert_eq!(keys(&r.responses[2].as_get().unwrap().kvs), ["e/new"]);
        s.compact(3).await.unwrap();
        let err = s
            .txn(Txn::new().and_then([
                TxnOp::put("e/never", "1", 0),
                TxnOp::get(Range::key("e/k").at_revision(2)),
            ]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Compacted { .. }), "{err:?}");
        assert!(get(&s, "e/never").await.is_none());
        let err = s
            .txn(Txn::new().and_then([TxnOp::get(Range::key("e/k").at_revision(99))]))
            .await
            .unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        // etcd refuses a compare without a key.
        let err = s
            .txn(Txn::new().when([Compare::version("", CompareOp::Equal, 0)]))
            .await
            .unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
    }

    #[tokio::test]
    async fn compaction() {
        let s = MemStore::new();
        for v in ["1", "2", "3", "4"] {
            s.put(b"c", v.as_bytes(), 0).await.unwrap(); // 2..=5
        }
        let mut live = s.watch(Watch::key("c")).await.unwrap();

        let err = s.compact(6).await.unwrap_err();
        assert!(err.to_string().contains("future revision"), "{err}");
        s.compact(4).await.unwrap();
        // As etcd answers: the revision is compacted already.
        let err = s.compact(4).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Compacted {
                    requested: 4,
                    compact_revision: 4
                }
            ),
            "{err:?}"
        );
        assert!(matches!(
            s.compact(3).await,
            Err(Error::Compacted { requested: 3, .. })
        ));
        // Current keys are untouched.
        assert_eq!(get(&s, "c").await.unwrap().value, b"4");

        let mut old = s.watch(Watch::key("c").from_revision(3)).await.unwrap();
        match old.next().await {
            Some(Err(Error::Compacted {
                requested: 3,
                compact_revision: 4,
            })) => {}
            other => panic!("expected a compaction error, got {other:?}"),
        }
        assert!(old.next().await.is_none());

        // Watching from the compact revision itself still works.
        let mut w = s.watch(Watch::key("c").from_revision(4)).await.unwrap();
        assert_eq!(revisions(&next(&mut w).await), [4, 5]);
        assert_idle(&mut w);
        // A watch from 0 is never compacted.
        let mut now = s.watch(Watch::key("c")).await.unwrap();

        s.compact(5).await.unwrap();
        s.put(b"c", b"5", 0).await.unwrap(); // 6
        assert_eq!(revisions(&next(&mut live).await), [6]);
        assert_eq!(revisions(&next(&mut w).await), [6]);
        assert_eq!(revisions(&next(&mut now).await), [6]);
        assert_eq!(s.lock().history.len(), 2);
    }

    /// As EtcdStore answers: a revision that is not positive is an invalid argument.
    #[tokio::test]
    async fn compacting_a_revision_below_one_is_invalid() {
        let s = MemStore::new();
        s.put(b"k", b"", 0).await.unwrap();
        for revision in [0, -1] {
            let err = s.compact(revision).await.unwrap_err();
            assert!(err.is_invalid_input(), "{err:?}");
            assert!(err.to_string().contains("must be positive"), "{err}");
        }
    }

    /// etcd's compaction keeps each key's last version at or before the compact revision,
    /// but not a deletion: a watch from the compact revision misses the deletes made at
    /// that revision, and still sees its puts.
    #[tokio::test]
    async fn compaction_drops_the_deletes_at_the_compact_revision() {
        let s = MemStore::new();
        s.put(b"c/a", b"1", 0).await.unwrap(); // 2
        s.put(b"c/b", b"1", 0).await.unwrap(); // 3
        let r = s
            .txn(Txn::new().and_then([TxnOp::delete("c/a"), TxnOp::put("c/c", "1", 0)]))
            .await
            .unwrap();
        assert_eq!(r.header_revision, 4);
        s.delete(KeyRange::key("c/b")).await.unwrap(); // 5
        s.compact(4).await.unwrap();
        let mut w = s.watch(Watch::prefix("c/").from_revision(4)).await.unwrap();
        let mut seen = Vec::new();
        while let Some(Some(Ok(batch))) = w.next().now_or_never() {
            seen.extend(batch.events.into_iter().map(|e| (e.kind, e.kv.key)));
        }
        assert_eq!(
            seen,
            [
                (EventKind::Put, b"c/c".to_vec()),
                (EventKind::Delete, b"c/b".to_vec())
            ]
        );
        // Reads at the compact revision are unchanged.
        let at = s.range(Range::prefix("c/").at_revision(4)).await.unwrap();
        assert_eq!(keys(&at.kvs), ["c/b", "c/c"]);
    }

    /// etcd reads an event's previous key at the revision before the event: once that is
    /// compacted, the event comes without it.
    #[tokio::test]
    async fn no_prev_kv_once_the_revision_before_is_compacted() {
        let s = MemStore::new();
        s.put(b"k", b"1", 0).await.unwrap(); // 2
        s.put(b"k", b"2", 0).await.unwrap(); // 3
        s.put(b"k", b"3", 0).await.unwrap(); // 4
        s.compact(3).await.unwrap();
        let mut w = s
            .watch(Watch::key("k").from_revision(3).with_prev_kv())
            .await
            .unwrap();
        let mut prevs = Vec::new();
        while let Some(Some(Ok(batch))) = w.next().now_or_never() {
            for e in batch.events {
                prevs.push((e.kv.mod_revision, e.prev_kv.map(|p| p.value)));
            }
        }
        assert_eq!(prevs, [(3, None), (4, Some(b"2".to_vec()))]);
    }

    #[tokio::test]
    async fn shared_stores_by_name() {
        let a = MemStore::shared("mem-rs-test-shared");
        let b = MemStore::shared("mem-rs-test-shared");
        let other = MemStore::shared("mem-rs-test-other");
        let private = MemStore::new();
        a.put(b"k", b"v", 0).await.unwrap();
        assert_eq!(get(&b, "k").await.unwrap().value, b"v");
        assert!(get(&other, "k").await.is_none());
        assert!(get(&private, "k").await.is_none());
        // Clones share too.
        let c = private.clone();
        c.put(b"p", b"", 0).await.unwrap();
        assert!(get(&private, "p").await.is_some());
        let d = MemStore::default();
        assert!(get(&d, "p").await.is_none());
    }

    #[tokio::test]
    async fn watch_across_shared_handles() {
        let a = MemStore::shared("mem-rs-test-watch");
        let b = MemStore::shared("mem-rs-test-watch");
        let mut w = a.watch(Watch::key("x")).await.unwrap();
        let rev = b.put(b"x", b"", 0).await.unwrap();
        assert_eq!(revisions(&next(&mut w).await), [rev]);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_store_frees_it() {
        let s = MemStore::new();
        let weak = Arc::downgrade(&s.inner);
        let lease = s.lease_grant(60 * SEC).await.unwrap();
        s.put(b"k", b"", lease.id).await.unwrap();
        let mut w = s.watch(Watch::key("k")).await.unwrap();
        tokio::task::yield_now().await; // let the lease timer start and sleep
        drop(s);
        assert!(weak.upgrade().is_none());
        assert!(w.next().await.is_none());
    }

    #[tokio::test]
    async fn debug_never_prints_values() {
        let s = MemStore::new();
        s.put(b"key", b"secret-value", 0).await.unwrap();
        let text = format!("{s:?}");
        assert!(text.contains("MemStore"));
        assert!(!text.contains("secret"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_get_distinct_revisions() {
        let s = MemStore::new();
        let mut w = s.watch(Watch::prefix("n/")).await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut revs = Vec::new();
                    for i in 0..50 {
                        revs.push(
                            s.put(format!("n/{t}/{i}").as_bytes(), b"", 0)
                                .await
                                .unwrap(),
                        );
                    }
                    revs
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (2..402).collect::<Vec<_>>());
        let mut seen = Vec::new();
        while seen.len() < 400 {
            seen.extend(revisions(&next(&mut w).await));
        }
        assert_eq!(seen, (2..402).collect::<Vec<_>>());
    }
}
