//! The store layer: the narrow waist between Baton's primitives and its backends.
//!
//! [`Store`] carries exactly the part of etcd v3's data model that the primitives need:
//! a revisioned key-value space, leases, multi-key transactions and watches. Two
//! implementations ship with Baton:
//!
//! - [`MemStore`](crate::store::mem::MemStore): the embedded, in-process store (`mem://`).
//!   It is a faithful single-node implementation of these semantics, not a mock.
//! - [`EtcdStore`](crate::store::etcd::EtcdStore) (feature `etcd`): a real etcd cluster
//!   (`http://`, `https://` and `etcd://`).
//!
//! [`NamespaceStore`](crate::store::namespace::NamespaceStore) wraps either to confine it
//! to the keys under a prefix.
//!
//! The semantics are etcd's:
//! - every write bumps one global revision; a transaction's writes share one revision;
//! - each key carries its `create_revision`, `mod_revision`, `version` and `lease`;
//! - a key bound to a lease is deleted when the lease is revoked or expires;
//! - a watch from a start revision first replays the history since then, and fails with
//!   [`Error::Compacted`](crate::Error::Compacted) if that history has been compacted.

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

use crate::error::Result;

pub mod mem;
pub mod namespace;
#[cfg(test)]
pub(crate) mod slow;

#[cfg(feature = "etcd")]
pub mod etcd;

/// A store revision. Revisions start at 1 and increase by one with every write transaction.
pub type Revision = i64;

/// A lease identifier. `0` means "no lease".
pub type LeaseId = i64;

/// One key and its metadata, as etcd reports it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The revision of the write that created the key (since its last deletion).
    pub create_revision: Revision,
    /// The revision of the last write to the key.
    pub mod_revision: Revision,
    /// How many times the key was written since it was created (1 after the first put).
    pub version: i64,
    /// The lease the key is bound to, or 0.
    pub lease: LeaseId,
}

impl KeyValue {
    /// The key as UTF-8 text, with invalid bytes replaced.
    pub fn key_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.key)
    }

    /// The value as UTF-8 text, with invalid bytes replaced.
    pub fn value_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }
}

impl fmt::Debug for KeyValue {
    // Values are never printed: they may be secrets. Only their length is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &self.key_str())
            .field("value_len", &self.value.len())
            .field("create_revision", &self.create_revision)
            .field("mod_revision", &self.mod_revision)
            .field("version", &self.version)
            .field("lease", &format_args!("{:x}", self.lease))
            .finish()
    }
}

/// Which keys an operation covers: one key, or every key that starts with a prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyRange {
    /// Exactly this key.
    Key(Vec<u8>),
    /// Every key starting with these bytes. An empty prefix covers every key.
    Prefix(Vec<u8>),
}

impl KeyRange {
    /// One key.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        KeyRange::Key(key.into())
    }

    /// Every key under a prefix.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        KeyRange::Prefix(prefix.into())
    }

    /// True if `key` falls in this range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeyRange::Key(k) => k.as_slice() == key,
            KeyRange::Prefix(p) => key.starts_with(p),
        }
    }

    /// The key, or the prefix.
    pub fn bytes(&self) -> &[u8] {
        match self {
            KeyRange::Key(k) | KeyRange::Prefix(k) => k,
        }
    }
}

/// What a range is sorted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SortTarget {
    /// The key bytes.
    Key,
    /// The create revision.
    CreateRevision,
    /// The mod revision.
    ModRevision,
}

/// Sort direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SortOrder {
    /// Smallest first.
    Ascending,
    /// Largest first.
    Descending,
}

/// A read of one key or a prefix.
///
/// Without a sort, results come in key order, as in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// The keys to read.
    pub keys: KeyRange,
    /// How to sort; `None` means key order.
    pub sort: Option<(SortTarget, SortOrder)>,
    /// At most this many results; 0 means no limit.
    pub limit: i64,
    /// Only keys whose create revision is at most this; 0 means no bound.
    pub max_create_revision: Revision,
    /// Only keys whose mod revision is at most this; 0 means no bound.
    pub max_mod_revision: Revision,
    /// Read the keys as they were at this revision; 0 means the latest (etcd's `WithRev`).
    ///
    /// As in etcd, the response's header revision is still the store's current revision;
    /// a revision that has been compacted fails with
    /// [`Error::Compacted`](crate::Error::Compacted), and one beyond the current revision
    /// with [`Error::InvalidArgument`](crate::Error::InvalidArgument). The compact revision
    /// itself can still be read.
    pub revision: Revision,
    /// Leave the values out (empty in the results), as etcd's `keys_only`: keys, revisions,
    /// versions and leases only, for a read that needs no value (a count, say).
    pub keys_only: bool,
}

impl Range {
    /// Read one key.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        Self::new(KeyRange::key(key))
    }

    /// Read every key under a prefix.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        Self::new(KeyRange::prefix(prefix))
    }

    fn new(keys: KeyRange) -> Self {
        Range {
            keys,
            sort: None,
            limit: 0,
            max_create_revision: 0,
            max_mod_revision: 0,
            revision: 0,
            keys_only: false,
        }
    }

    /// Sort the results.
    pub fn sort_by(mut self, target: SortTarget, order: SortOrder) -> Self {
        self.sort = Some((target, order));
        self
    }

    /// Return at most `limit` results (0: no limit).
    pub fn with_limit(mut self, limit: i64) -> Self {
        self.limit = limit;
        self
    }

    /// Only keys created at or before `revision`.
    pub fn with_max_create_revision(mut self, revision: Revision) -> Self {
        self.max_create_revision = revision;
        self
    }

    /// Only keys last modified at or before `revision`.
    pub fn with_max_mod_revision(mut self, revision: Revision) -> Self {
        self.max_mod_revision = revision;
        self
    }

    /// Read the keys as they were at `revision` (0: the latest). See [`Range::revision`].
    pub fn at_revision(mut self, revision: Revision) -> Self {
        self.revision = revision;
        self
    }

    /// Leave the values out (see [`Range::keys_only`]).
    pub fn keys_only(mut self) -> Self {
        self.keys_only = true;
        self
    }

    /// The first-created key: sort by create revision ascending, limit 1
    /// (Go's `WithFirstCreate`).
    pub fn first_created(self) -> Self {
        self.sort_by(SortTarget::CreateRevision, SortOrder::Ascending)
            .with_limit(1)
    }

    /// The last-created key: sort by create revision descending, limit 1
    /// (Go's `WithLastCreate`).
    pub fn last_created(self) -> Self {
        self.sort_by(SortTarget::CreateRevision, SortOrder::Descending)
            .with_limit(1)
    }
}

/// The answer to a [`Range`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RangeResponse {
    /// The store's revision when the read was served.
    pub header_revision: Revision,
    /// The keys found, after sorting and the limit.
    pub kvs: Vec<KeyValue>,
    /// True if the limit cut off more results.
    pub more: bool,
}

/// What a [`Compare`] looks at, and the value to compare with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's create revision (0 if the key does not exist).
    CreateRevision(Revision),
    /// The key's mod revision (0 if the key does not exist).
    ModRevision(Revision),
    /// The key's version (0 if the key does not exist).
    Version(i64),
    /// The key's value. A compare on the value of a missing key is false.
    Value(Vec<u8>),
    /// The key's lease (0 if the key does not exist or has no lease).
    Lease(LeaseId),
}

/// How a [`Compare`] compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CompareOp {
    /// `==`
    Equal,
    /// `!=`
    NotEqual,
    /// `>`
    Greater,
    /// `<`
    Less,
}

/// One guard of a [`Txn`]: `target(key) op value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: Vec<u8>,
    /// What is compared, and with which value.
    pub target: CompareTarget,
    /// The comparison.
    pub op: CompareOp,
}

impl Compare {
    /// Compare the key's create revision.
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: Revision) -> Self {
        Compare {
            key: key.into(),
            target: CompareTarget::CreateRevision(revision),
            op,
        }
    }

    /// Compare the key's mod revision.
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: Revision) -> Self {
        Compare {
            key: key.into(),
            target: CompareTarget::ModRevision(revision),
            op,
        }
    }

    /// Compare the key's version.
    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: i64) -> Self {
        Compare {
            key: key.into(),
            target: CompareTarget::Version(version),
            op,
        }
    }

    /// Compare the key's value.
    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Compare {
            key: key.into(),
            target: CompareTarget::Value(value.into()),
            op,
        }
    }

    /// Compare the key's lease.
    pub fn lease(key: impl Into<Vec<u8>>, op: CompareOp, lease: LeaseId) -> Self {
        Compare {
            key: key.into(),
            target: CompareTarget::Lease(lease),
            op,
        }
    }
}

/// One operation inside a [`Txn`].
#[derive(Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Write a key, bound to `lease` (0: no lease).
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease to bind the key to, or 0.
        lease: LeaseId,
    },
    /// Read, as [`Store::range`] does.
    Get(Range),
    /// Delete a key or every key under a prefix.
    Delete(KeyRange),
}

impl TxnOp {
    /// A put.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: LeaseId) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    /// A get.
    pub fn get(range: Range) -> Self {
        TxnOp::Get(range)
    }

    /// A delete of one key.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        TxnOp::Delete(KeyRange::key(key))
    }
}

impl fmt::Debug for TxnOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TxnOp::Put { key, value, lease } => f
                .debug_struct("Put")
                .field("key", &String::from_utf8_lossy(key))
                .field("value_len", &value.len())
                .field("lease", &format_args!("{lease:x}"))
                .finish(),
            TxnOp::Get(r) => f.debug_tuple("Get").field(r).finish(),
            TxnOp::Delete(k) => f.debug_tuple("Delete").field(k).finish(),
        }
    }
}

/// The result of one [`TxnOp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOpResponse {
    /// A put was applied.
    Put,
    /// The result of a get.
    Get(RangeResponse),
    /// How many keys a delete removed.
    Delete {
        /// The number of keys deleted.
        deleted: i64,
    },
}

impl TxnOpResponse {
    /// The range response, if this was a get.
    pub fn as_get(&self) -> Option<&RangeResponse> {
        match self {
            TxnOpResponse::Get(r) => Some(r),
            _ => None,
        }
    }
}

/// An atomic transaction: if every compare holds, run `success`, else run `failure`.
///
/// All writes of one transaction share one revision.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Txn {
    /// The guards; all must hold for `success` to run.
    pub compares: Vec<Compare>,
    /// The operations run when every compare holds.
    pub success: Vec<TxnOp>,
    /// The operations run otherwise.
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// An empty transaction (it succeeds and does nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Add guards.
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.compares.extend(compares);
        self
    }

    /// Add operations to run when the guards hold.
    pub fn and_then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.success.extend(ops);
        self
    }

    /// Add operations to run when a guard fails.
    pub fn or_else(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.failure.extend(ops);
        self
    }
}

/// The result of a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TxnResponse {
    /// True if every compare held and `success` ran.
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub header_revision: Revision,
    /// One response per operation that ran, in order.
    pub responses: Vec<TxnOpResponse>,
}

/// A granted lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    /// The lease's id.
    pub id: LeaseId,
    /// The TTL the store actually granted (etcd raises TTLs below its minimum).
    pub ttl: Duration,
}

/// What a watch covers and where it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watch {
    /// The keys to watch.
    pub keys: KeyRange,
    /// Deliver every event at or after this revision; 0 means "from the next write".
    pub start_revision: Revision,
    /// Include each event's previous key-value.
    pub prev_kv: bool,
    /// Deliver delete events only (etcd's `NOPUT` filter): the server drops every put
    /// before sending it, so a watcher that only waits for deletes does not pay for them.
    pub deletes_only: bool,
}

impl Watch {
    /// Watch one key from the next write.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        Watch {
            keys: KeyRange::key(key),
            start_revision: 0,
            prev_kv: false,
            deletes_only: false,
        }
    }

    /// Watch a prefix from the next write.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        Watch {
            keys: KeyRange::prefix(prefix),
            start_revision: 0,
            prev_kv: false,
            deletes_only: false,
        }
    }

    /// Start at this revision (replaying history since then).
    pub fn from_revision(mut self, revision: Revision) -> Self {
        self.start_revision = revision;
        self
    }

    /// Ask for previous key-values on events.
    pub fn with_prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }

    /// Deliver delete events only (etcd's `NOPUT` filter).
    pub fn deletes_only(mut self) -> Self {
        self.deletes_only = true;
        self
    }
}

/// The kind of a watch [`Event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The key was written.
    Put,
    /// The key was deleted (by a delete, or by its lease ending).
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change. For a delete, only `key` and `mod_revision` (the revision
    /// of the delete) are set.
    pub kv: KeyValue,
    /// The key before the change, if asked for and if it existed.
    pub prev_kv: Option<KeyValue>,
}

/// A batch of events from a watch. Events of one revision always arrive in one batch.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct WatchResponse {
    /// The store's revision when the batch was sent.
    pub header_revision: Revision,
    /// The events, in revision order.
    pub events: Vec<Event>,
}

/// A stream of watch batches.
///
/// It yields `Err(Error::Compacted { .. })` and ends if its start revision was compacted.
/// It may end (`None`) or yield another error if the connection to the store is lost;
/// the consumer then watches again from the revision after the last one it saw.
/// Dropping the stream cancels the watch.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse>> + Send>>;

/// The operations of etcd v3 that Baton's primitives are written against.
///
/// Implementations must be linearizable: every call observes every write that completed
/// before it started.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// A short name for the backend, such as `"mem"` or `"etcd"`.
    fn backend(&self) -> &'static str;

    /// Read keys.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a read changes nothing.
    async fn range(&self, range: Range) -> Result<RangeResponse>;

    /// Write one key, bound to `lease` (0: none). Returns the revision of the write.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the write may or may not have been applied.
    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision>;

    /// Delete a key or a prefix. Returns the number of keys deleted and the revision after.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the write may or may not have been applied.
    async fn delete(&self, keys: KeyRange) -> Result<(i64, Revision)>;

    /// Run a transaction.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, a transaction with writes may or may not have been applied
    /// (whole or not at all); a read-only one changes nothing.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse>;

    /// Grant a lease. The TTL is rounded up to whole seconds; the store may raise it to its
    /// minimum and reports the TTL granted.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, a lease may have been granted; it expires after its TTL.
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseGrant>;

    /// Refresh a lease once. Returns the TTL it was refreshed to, or `None` if the lease
    /// no longer exists (revoked or expired).
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the lease may or may not have been refreshed.
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<Option<Duration>>;

    /// Revoke a lease, deleting every key bound to it in one revision.
    /// Fails with [`Error::LeaseNotFound`](crate::Error::LeaseNotFound) if it does not exist
    /// (a store that sent the revoke again after a lost answer counts "not found" then as
    /// revoked).
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the lease may or may not have been revoked.
    async fn lease_revoke(&self, id: LeaseId) -> Result<()>;

    /// The time a lease has left, or `None` if it does not exist.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a read changes nothing.
    async fn lease_time_to_live(&self, id: LeaseId) -> Result<Option<Duration>>;

    /// This process stops keeping lease `id` alive (its session was closed, orphaned or
    /// lost): free what the store keeps for its keep-alives (on etcd, the lease's
    /// keep-alive stream and its reader task). The lease itself is not touched; a later
    /// [`lease_keep_alive`](Store::lease_keep_alive) sets them up again. Does nothing by
    /// default.
    fn lease_keep_alive_done(&self, id: LeaseId) {
        let _ = id;
    }

    /// How long one request may take, retries included, if the store bounds it (etcd's
    /// [`EtcdOptions::request_timeout`](crate::store::etcd::EtcdOptions::request_timeout));
    /// `None` (the default) for a store whose requests cannot hang, such as the embedded
    /// one. Primitives that resend a request whose answer was lost use it to bound how long
    /// they keep trying.
    fn request_timeout(&self) -> Option<Duration> {
        None
    }

    /// Watch keys. The stream is registered before this returns.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a watch whose creation is dropped is cancelled with it.
    async fn watch(&self, watch: Watch) -> Result<WatchStream>;

    /// [`watch`](Store::watch) from the next write (`watch.start_revision` is ignored), and
    /// the revision it starts after: it delivers every event above that revision.
    ///
    /// etcd serves a watch that starts at a revision already passed from its "unsynced"
    /// group, swept every 100 ms; one that starts at the next write is synced at once. A
    /// caller that read at an older revision closes the gap with one more read.
    ///
    /// The default reads the current revision, then watches from the next one: correct, but
    /// on etcd a write in between would send the watch to the sweep.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`watch`](Store::watch).
    async fn watch_from_now(&self, watch: Watch) -> Result<(Revision, WatchStream)> {
        // Any read gives the revision; the watch's own key is one the caller may read. A
        // watch of the whole keyspace (the empty prefix) reads a key that is not empty.
        let key = match watch.keys.bytes() {
            [] => b"\0".to_vec(),
            key => key.to_vec(),
        };
        let read = Range::key(key).with_limit(1);
        let revision = self.range(read).await?.header_revision;
        let stream = self.watch(watch.from_revision(revision + 1)).await?;
        Ok((revision, stream))
    }

    /// Discard the history before `revision`. Watches from earlier revisions then fail with
    /// [`Error::Compacted`](crate::Error::Compacted).
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the history may or may not have been compacted.
    async fn compact(&self, revision: Revision) -> Result<()>;
}
