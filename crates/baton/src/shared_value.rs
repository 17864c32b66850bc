//! Values shared by every node through one key: read, compare-and-set, and a stream of
//! changes (Curator's `SharedValue` and `SharedCount`).

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tracing::Instrument;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::names::{validate_name, validate_value};
use crate::store::{
    Compare, CompareOp, EventKind, KeyRange, KeyValue, Range, Revision, Store, Txn, TxnOp,
    TxnOpResponse, TxnResponse, Watch, WatchStream,
};
use crate::watching::Backoff;

/// A value as stored, with what versions it.
#[derive(Clone, PartialEq, Eq)]
pub struct Versioned<T = Vec<u8>> {
    /// The value.
    pub value: T,
    /// How many times the key was written since it was created: 1 after the first write,
    /// 0 if the key does not exist. It starts again at 1 when the key is deleted and written
    /// again, so compare-and-set compares `mod_revision`, not this.
    pub version: i64,
    /// The revision of the last write (0 if the key does not exist).
    pub mod_revision: Revision,
    /// The revision that created the key (0 if it does not exist).
    pub create_revision: Revision,
}

impl<T> Versioned<T> {
    fn from_kv(kv: KeyValue, value: T) -> Versioned<T> {
        Versioned {
            value,
            version: kv.version,
            mod_revision: kv.mod_revision,
            create_revision: kv.create_revision,
        }
    }
}

// Values are never printed: they may be secrets. Counts are.
impl fmt::Debug for Versioned<Vec<u8>> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Versioned")
            .field("value_len", &self.value.len())
            .field("version", &self.version)
            .field("mod_revision", &self.mod_revision)
            .finish()
    }
}

impl fmt::Debug for Versioned<i64> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Versioned")
            .field("value", &self.value)
            .field("version", &self.version)
            .field("mod_revision", &self.mod_revision)
            .finish()
    }
}

/// What a compare-and-set did.
#[derive(Clone, PartialEq, Eq)]
pub enum CompareAndSet<T = Vec<u8>> {
    /// The key was as read and the value was written; this is the key as written.
    Set(Versioned<T>),
    /// Someone else wrote first (or the key does not exist): nothing was written; this is
    /// the key as it is now (`None` if it does not exist).
    Conflict(Option<Versioned<T>>),
}

impl<T> CompareAndSet<T> {
    /// True if the value was written.
    pub fn is_set(&self) -> bool {
        matches!(self, CompareAndSet::Set(_))
    }
}

impl<T> fmt::Debug for CompareAndSet<T>
where
    Versioned<T>: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompareAndSet::Set(v) => f.debug_tuple("Set").field(v).finish(),
            CompareAndSet::Conflict(v) => f.debug_tuple("Conflict").field(v).finish(),
        }
    }
}

/// A value shared by every node through one key, like Curator's `SharedValue`.
///
/// Every node reads it with [`get()`](SharedValue::get), writes it with
/// [`set()`](SharedValue::set) or, to not overwrite a concurrent change,
/// [`compare_and_set()`](SharedValue::compare_and_set) on the mod revision it read, and follows
/// it with [`watch()`](SharedValue::watch): distributed synchronisation through an etcd
/// watch.
///
/// # Key layout
///
/// The key is `KEY` itself, holding the value as is, with no lease: any etcd client reads
/// and writes the same value (`etcdctl get KEY`).
///
/// # Examples
///
/// ```
/// use futures::StreamExt;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// let config = baton::SharedValue::new(&client, "config/feature-x")?;
/// let mut changes = config.watch();
/// assert_eq!(changes.next().await, Some(None)); // not set yet
///
/// let first = config.set("on").await?;
/// assert_eq!(changes.next().await.flatten().map(|v| v.value), Some(b"on".to_vec()));
/// // Only if nobody wrote since:
/// assert!(config.compare_and_set(first.mod_revision, "off").await?.is_set());
/// assert!(!config.compare_and_set(first.mod_revision, "again").await?.is_set());
/// assert_eq!(config.get().await?.map(|v| v.value), Some(b"off".to_vec()));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SharedValue {
    client: Client,
    key: String,
}

impl fmt::Debug for SharedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedValue")
            .field("key", &self.key)
            .finish()
    }
}

impl SharedValue {
    /// The value stored at `key`.
    ///
    /// Fails with [`Error::InvalidArgument`] if the key is empty, longer than 1 KiB, or
    /// contains a NUL byte.
    pub fn new(client: &Client, key: &str) -> Result<SharedValue> {
        validate_name(key)?;
        Ok(SharedValue {
            client: client.clone(),
            key: key.to_string(),
        })
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    fn store(&self) -> &Arc<dyn Store> {
        self.client.store()
    }

    /// The value now, or `None` if the key does not exist.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn get(&self) -> Result<Option<Versioned>> {
        let resp = self.store().range(Range::key(self.key.as_bytes())).await?;
        Ok(resp.kvs.into_iter().next().map(bytes))
    }

    /// Write `value`, whatever is there. Returns the key as written.
    ///
    /// Fails with [`Error::InvalidArgument`] before any network call if the value is over
    /// [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN).
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the value may or may not have been written.
    pub async fn set(&self, value: impl Into<Vec<u8>>) -> Result<Versioned> {
        let value = value.into();
        validate_value(&value)?;
        let resp = self.write(None, value).await?;
        written(&resp, self.key.as_bytes()).map(bytes)
    }

    /// Write `value` only if the key is still as read: its mod revision is still
    /// `mod_revision` ([`Versioned::mod_revision`]; 0: only if the key does not exist).
    /// Returns [`CompareAndSet::Set`] with the key as written, or
    /// [`CompareAndSet::Conflict`] with the key as it is.
    ///
    /// The mod revision, not the version, because a version comes back: a key deleted and
    /// written again starts again at version 1, so a compare on the version would overwrite
    /// a value written meanwhile by someone else. A mod revision is never reused.
    ///
    /// Fails with [`Error::InvalidArgument`] before any network call if the value is over
    /// [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN) or `mod_revision` is negative.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the value may or may not have been written.
    pub async fn compare_and_set(
        &self,
        mod_revision: Revision,
        value: impl Into<Vec<u8>>,
    ) -> Result<CompareAndSet> {
        let value = value.into();
        validate_value(&value)?;
        if mod_revision < 0 {
            return Err(Error::invalid(format!(
                "a mod revision is 0 or more, not {mod_revision}"
            )));
        }
        let resp = self.write(Some(mod_revision), value).await?;
        let found = last_get(&resp).map(bytes);
        Ok(match (resp.succeeded, found) {
            (true, Some(v)) => CompareAndSet::Set(v),
            (true, None) => return Err(Error::Store("the written key was not found".into())),
            (false, current) => CompareAndSet::Conflict(current),
        })
    }

    /// Delete the key. Returns `true` if it existed.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the key may or may not have been deleted.
    pub async fn delete(&self) -> Result<bool> {
        let (deleted, _) = self
            .store()
            .delete(KeyRange::key(self.key.as_bytes()))
            .await?;
        Ok(deleted > 0)
    }

    /// Put `value` (if the mod revision is `mod_revision`; 0 for a key that does not
    /// exist), and read the key back in the same txn.
    async fn write(&self, mod_revision: Option<Revision>, value: Vec<u8>) -> Result<TxnResponse> {
        let key = self.key.as_bytes();
        let read = TxnOp::get(Range::key(key));
        let txn = Txn::new()
            .when(mod_revision.map(|r| Compare::mod_revision(key, CompareOp::Equal, r)))
            .and_then([TxnOp::put(key, value, 0), read.clone()])
            .or_else([read]);
        self.store()
            .txn(txn)
            .instrument(tracing::debug_span!("set", key = %self.key, mod_revision))
            .await
    }

    /// The value now, then every change to it: `Some(value)` for a write, `None` when the key
    /// does not exist or is deleted.
    ///
    /// The stream never misses the latest value: after a broken connection or a compaction
    /// of the revisions it was following, it reads the key again and yields it if it changed
    /// since the last item, then follows from there. Intermediate values written while it
    /// was cut off are skipped; it never yields the same write twice in a row. It retries
    /// failed reads and watches with backoff for as long as it is polled, except when the
    /// backend refuses access (the user's roles do not cover the key, or its credentials
    /// or TLS handshake are refused: [`Error::is_access_denied`]): then it ends, and
    /// [`Changes::take_error`] says why.
    ///
    /// Nothing happens until the stream is first polled.
    pub fn watch(&self) -> Changes {
        let failure = Arc::default();
        Changes {
            inner: changes(
                self.store().clone(),
                self.key.clone().into_bytes(),
                Arc::clone(&failure),
            )
            .boxed(),
            failure,
        }
    }
}

fn bytes(kv: KeyValue) -> Versioned {
    let value = kv.value.clone();
    Versioned::from_kv(kv, value)
}

/// The key as read by the last get of a txn.
fn last_get(resp: &TxnResponse) -> Option<KeyValue> {
    resp.responses
        .iter()
        .rev()
        .find_map(TxnOpResponse::as_get)
        .and_then(|g| g.kvs.first().cloned())
}

fn written(resp: &TxnResponse, key: &[u8]) -> Result<KeyValue> {
    last_get(resp).ok_or_else(|| {
        Error::Store(format!(
            "key {:?} was not found right after it was written",
            String::from_utf8_lossy(key)
        ))
    })
}

/// Read-modify-write `key` until it sticks. `next` gets the key as it is (`None` if it does
/// not exist) and returns the value to write, or `None` to write nothing. Each write is
/// guarded by the mod revision read (or by the key's absence), and a lost race reads the key
/// back in the same transaction. Returns the key as written, or as found if nothing was
/// written.
pub(crate) async fn update<F>(
    store: &Arc<dyn Store>,
    key: &[u8],
    mut next: F,
) -> Result<Option<KeyValue>>
where
    F: FnMut(Option<&KeyValue>) -> Result<Option<Vec<u8>>>,
{
    let mut current = store.range(Range::key(key)).await?.kvs.into_iter().next();
    loop {
        let Some(value) = next(current.as_ref())? else {
            return Ok(current);
        };
        let guard = match &current {
            Some(kv) => Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision),
            None => Compare::create_revision(key, CompareOp::Equal, 0),
        };
        let read = TxnOp::get(Range::key(key));
        let txn = Txn::new()
            .when([guard])
            .and_then([TxnOp::put(key, value, 0), read.clone()])
            .or_else([read]);
        let resp = store.txn(txn).await?;
        if resp.succeeded {
            return written(&resp, key).map(Some);
        }
        current = last_get(&resp);
    }
}

/// A stream of a key's values: [`SharedValue::watch`] yields `Option<Versioned>` (`None`
/// when the key does not exist), [`SharedCount::watch`] yields `Versioned<i64>`. Dropping
/// it stops watching.
pub struct Changes<T = Option<Versioned>> {
    inner: Pin<Box<dyn Stream<Item = T> + Send>>,
    /// Why the stream ended, if the backend refused access.
    failure: Arc<std::sync::Mutex<Option<Error>>>,
}

impl<T> Changes<T> {
    /// Why the stream ended, if the backend refused access
    /// ([`Error::is_access_denied`]); `None` otherwise.
    pub fn take_error(&mut self) -> Option<Error> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

impl<T> fmt::Debug for Changes<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Changes").finish_non_exhaustive()
    }
}

impl<T> Stream for Changes<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The state of a [`Changes`] stream.
struct Follow {
    store: Arc<dyn Store>,
    key: Vec<u8>,
    watch: Option<WatchStream>,
    /// The last state yielded: the mod revision of the value, or 0 for "no key".
    last: Option<Revision>,
    ready: VecDeque<Option<Versioned>>,
    backoff: Backoff,
    /// Set when the backend refused access: the stream ends (after what is ready).
    failure: Arc<std::sync::Mutex<Option<Error>>>,
    denied: bool,
}

impl Follow {
    /// Give up on `e` if it says access is refused (retrying would be refused again);
    /// true if so.
    fn refused(&mut self, e: &Error) -> bool {
        if !e.is_access_denied() {
            return false;
        }
        tracing::warn!(error = %e, "watching a shared value stopped: access refused");
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
        self.denied = true;
        true
    }

    /// Queue `kv` (or its absence) unless it is what was yielded last.
    fn offer(&mut self, kv: Option<KeyValue>) {
        let id = kv.as_ref().map_or(0, |kv| kv.mod_revision);
        if self.last != Some(id) {
            self.last = Some(id);
            self.ready.push_back(kv.map(bytes));
        }
    }

    /// Read the key and start watching after the read.
    async fn resync(&mut self) {
        let resp = match self.store.range(Range::key(self.key.clone())).await {
            Ok(resp) => resp,
            Err(e) if self.refused(&e) => return,
            Err(e) => {
                tracing::debug!(error = %e, "reading a shared value failed; retrying");
                return self.backoff.sleep().await;
            }
        };
        self.offer(resp.kvs.into_iter().next());
        let watch = Watch::key(self.key.clone()).from_revision(resp.header_revision + 1);
        match self.store.watch(watch).await {
            Ok(stream) => self.watch = Some(stream),
            Err(e) if self.refused(&e) => {}
            Err(e) => {
                tracing::debug!(error = %e, "watching a shared value failed; retrying");
                self.backoff.sleep().await;
            }
        }
    }

    async fn next(mut self) -> Option<(Option<Versioned>, Follow)> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some((item, self));
            }
            if self.denied {
                return None;
            }
            let Some(stream) = self.watch.as_mut() else {
                self.resync().await;
                continue;
            };
            match stream.next().await {
                Some(Ok(batch)) => {
                    self.backoff.reset();
                    for event in batch.events {
                        match event.kind {
                            EventKind::Put => self.offer(Some(event.kv)),
                            EventKind::Delete => self.offer(None),
                        }
                    }
                }
                // Compacted: read again at once; broken: after a pause.
                Some(Err(Error::Compacted { .. })) => self.watch = None,
                Some(Err(e)) if self.refused(&e) => self.watch = None,
                Some(Err(_)) | None => {
                    self.watch = None;
                    self.backoff.sleep().await;
                }
            }
        }
    }
}

fn changes(
    store: Arc<dyn Store>,
    key: Vec<u8>,
    failure: Arc<std::sync::Mutex<Option<Error>>>,
) -> impl Stream<Item = Option<Versioned>> + Send {
    let span = tracing::debug_span!("watch", key = %String::from_utf8_lossy(&key));
    let start = Follow {
        store,
        key,
        watch: None,
        last: None,
        ready: VecDeque::new(),
        backoff: Backoff::new(),
        failure,
        denied: false,
    };
    futures::stream::unfold(start, move |follow| follow.next().instrument(span.clone()))
}

/// A 64-bit count shared by every node through one key, like Curator's `SharedCount`.
///
/// The count is stored as ASCII decimal text. A key that does not exist counts as 0 (with
/// version 0). [`add()`](SharedCount::add) is an atomic read-modify-write: concurrent
/// additions are never lost.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// let hits = baton::SharedCount::new(&client, "stats/hits")?;
/// assert_eq!(hits.get().await?.value, 0);
/// hits.add(5).await?;
/// let now = hits.add(-2).await?;
/// assert_eq!(now.value, 3);
/// assert!(hits.compare_and_set(now.mod_revision, 10).await?.is_set());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct SharedCount {
    value: SharedValue,
}

impl SharedCount {
    /// The count stored at `key`.
    ///
    /// Fails with [`Error::InvalidArgument`] if the key is empty, longer than 1 KiB, or
    /// contains a NUL byte.
    pub fn new(client: &Client, key: &str) -> Result<SharedCount> {
        Ok(SharedCount {
            value: SharedValue::new(client, key)?,
        })
    }

    /// The key.
    pub fn key(&self) -> &str {
        self.value.key()
    }

    /// The count now (0, version 0, if the key does not exist).
    ///
    /// Fails with [`Error::InvalidData`] if the key holds something other than an integer.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn get(&self) -> Result<Versioned<i64>> {
        count_of(self.key(), self.value.get().await?)
    }

    /// Set the count, whatever it was.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the count may or may not have been written.
    pub async fn set(&self, count: i64) -> Result<Versioned<i64>> {
        count_of(self.key(), Some(self.value.set(count.to_string()).await?))
    }

    /// Set the count only if the key is still as read: its mod revision is still
    /// `mod_revision` (0: only if the key does not exist). See
    /// [`SharedValue::compare_and_set`].
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the count may or may not have been written.
    pub async fn compare_and_set(
        &self,
        mod_revision: Revision,
        count: i64,
    ) -> Result<CompareAndSet<i64>> {
        Ok(
            match self
                .value
                .compare_and_set(mod_revision, count.to_string())
                .await?
            {
                CompareAndSet::Set(v) => CompareAndSet::Set(count_of(self.key(), Some(v))?),
                CompareAndSet::Conflict(None) => CompareAndSet::Conflict(None),
                CompareAndSet::Conflict(v) => {
                    CompareAndSet::Conflict(Some(count_of(self.key(), v)?))
                }
            },
        )
    }

    /// Add `delta` (which may be negative) atomically, retrying on concurrent changes.
    /// Returns the count as written.
    ///
    /// Fails with [`Error::InvalidData`] if the key holds something other than an integer,
    /// and with [`Error::InvalidArgument`] if the sum would overflow.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the addition may or may not have been applied.
    pub async fn add(&self, delta: i64) -> Result<Versioned<i64>> {
        let key = self.key();
        let written = update(self.value.store(), key.as_bytes(), |kv| {
            let now = match kv {
                Some(kv) => parse_count(key, &kv.value)?,
                None => 0,
            };
            let sum = now.checked_add(delta).ok_or_else(|| {
                Error::invalid(format!("adding {delta} to count {key:?} overflows"))
            })?;
            Ok(Some(sum.to_string().into_bytes()))
        })
        .instrument(tracing::debug_span!("add", key = %key, delta))
        .await?;
        count_of(key, written.map(bytes))
    }

    /// The count now, then every change, as [`SharedValue::watch`] (a deleted key counts
    /// as 0; the stream ends if the backend refuses access, and
    /// [`take_error`](Changes::take_error) says why). Values that are not integers are
    /// skipped.
    ///
    /// Nothing happens until the stream is first polled.
    pub fn watch(&self) -> Changes<Versioned<i64>> {
        let key = self.key().to_string();
        let values = self.value.watch();
        let failure = Arc::clone(&values.failure);
        let counts = values.filter_map(move |v| {
            let count = count_of(&key, v);
            if let Err(e) = &count {
                tracing::warn!(error = %e, "skipping a value that is not a count");
            }
            futures::future::ready(count.ok())
        });
        Changes {
            inner: counts.boxed(),
            failure,
        }
    }
}

fn parse_count(key: &str, value: &[u8]) -> Result<i64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::InvalidData {
            key: key.to_string(),
            reason: "not a decimal 64-bit integer".into(),
        })
}

fn count_of(key: &str, value: Option<Versioned>) -> Result<Versioned<i64>> {
    Ok(match value {
        Some(v) => Versioned {
            value: parse_count(key, &v.value)?,
            version: v.version,
            mod_revision: v.mod_revision,
            create_revision: v.create_revision,
        },
        None => Versioned {
            value: 0,
            version: 0,
            mod_revision: 0,
            create_revision: 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn next<S: Stream + Unpin>(s: &mut S) -> S::Item {
        tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("stream hung")
            .expect("stream ended")
    }

    #[tokio::test]
    async fn cas_and_versions() {
        let client = Client::memory();
        let v = SharedValue::new(&client, "v").unwrap();
        assert_eq!(v.get().await.unwrap(), None);
        let CompareAndSet::Set(a) = v.compare_and_set(0, "a").await.unwrap() else {
            panic!("create failed")
        };
        assert_eq!((a.version, a.value.as_slice()), (1, &b"a"[..]));
        match v.compare_and_set(0, "again").await.unwrap() {
            CompareAndSet::Conflict(Some(now)) => assert_eq!(now, a),
            other => panic!("{other:?}"),
        }
        let b = v.set("b").await.unwrap();
        assert_eq!(b.version, 2);
        assert!(!v
            .compare_and_set(a.mod_revision, "c")
            .await
            .unwrap()
            .is_set());
        let CompareAndSet::Set(c) = v.compare_and_set(b.mod_revision, "c").await.unwrap() else {
            panic!("the compare-and-set on the latest read failed")
        };
        assert!(v.delete().await.unwrap());
        assert!(matches!(
            v.compare_and_set(c.mod_revision, "d").await.unwrap(),
            CompareAndSet::Conflict(None)
        ));
        assert!(v
            .compare_and_set(-1, "e")
            .await
            .unwrap_err()
            .is_invalid_input());
        // Deleted and written again by someone else: back at version 1, but a compare on
        // what we read of the first write must not overwrite it.
        let first = v.set("one").await.unwrap();
        assert!(v.delete().await.unwrap());
        let other = v.set("theirs").await.unwrap();
        assert_eq!((first.version, other.version), (1, 1));
        match v.compare_and_set(first.mod_revision, "mine").await.unwrap() {
            CompareAndSet::Conflict(Some(now)) => assert_eq!(now.value, b"theirs"),
            got => panic!("a delete and re-create went unnoticed: {got:?}"),
        }
        let big = vec![0_u8; crate::MAX_VALUE_LEN + 1];
        assert!(v.set(big.clone()).await.unwrap_err().is_invalid_input());
        assert!(v
            .compare_and_set(0, big)
            .await
            .unwrap_err()
            .is_invalid_input());
        assert!(format!("{b:?}").contains("value_len"));
    }

    #[tokio::test]
    async fn watch_yields_latest_across_compaction() {
        let client = Client::memory();
        let v = SharedValue::new(&client, "w").unwrap();
        v.set("0").await.unwrap();
        let mut changes = v.watch();
        assert_eq!(next(&mut changes).await.unwrap().value, b"0");
        v.set("1").await.unwrap();
        v.delete().await.unwrap();
        assert_eq!(next(&mut changes).await.unwrap().value, b"1");
        assert_eq!(next(&mut changes).await, None);
        // Writes the stream has not read yet, then a compaction of them.
        for i in 2..6 {
            v.set(format!("{i}")).await.unwrap();
        }
        let rev = client.store().put(b"other", b"", 0).await.unwrap();
        client.store().compact(rev).await.unwrap();
        let mut seen = Vec::new();
        while seen.last().map(Vec::as_slice) != Some(&b"5"[..]) {
            seen.push(next(&mut changes).await.unwrap().value);
        }
        v.set("6").await.unwrap();
        assert_eq!(next(&mut changes).await.unwrap().value, b"6");
    }

    #[tokio::test]
    async fn counts() {
        let client = Client::memory();
        let c = SharedCount::new(&client, "c").unwrap();
        assert_eq!(c.get().await.unwrap().value, 0);
        let mut changes = c.watch();
        assert_eq!(next(&mut changes).await.value, 0);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    for _ in 0..10 {
                        c.add(1).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let now = c.get().await.unwrap();
        assert_eq!(now.value, 80);
        assert_eq!(now.version, 80);
        let mut last = 0;
        while last != 80 {
            let v = next(&mut changes).await.value;
            assert!(v > last, "counts go backwards: {last} then {v}");
            last = v;
        }
        assert!(!c.compare_and_set(1, 0).await.unwrap().is_set());
        assert!(c
            .compare_and_set(now.mod_revision, -3)
            .await
            .unwrap()
            .is_set());
        assert_eq!(c.set(i64::MAX).await.unwrap().value, i64::MAX);
        assert!(c.add(1).await.unwrap_err().is_invalid_input());
        client.store().put(b"c", b"x", 0).await.unwrap();
        let err = c.get().await.unwrap_err();
        assert!(matches!(err, Error::InvalidData { .. }), "{err}");
        assert!(c.add(1).await.is_err());
    }

    /// The embedded store, refusing reads and watches of one key as etcd does once the
    /// user's role no longer covers it (`PermissionDenied`: retrying cannot cure it).
    #[derive(Debug, Default)]
    struct Denying {
        inner: crate::store::mem::MemStore,
        denied: std::sync::atomic::AtomicBool,
        /// Cancelled: every watch open now ends (a broken connection).
        cut: tokio_util::sync::CancellationToken,
        refused: std::sync::atomic::AtomicU64,
    }

    impl Denying {
        fn check(&self) -> Result<()> {
            if self.denied.load(std::sync::atomic::Ordering::Relaxed) {
                self.refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(Error::PermissionDenied(
                    "etcdserver: permission denied".into(),
                ));
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl crate::store::slow::Hooks for Denying {
        fn inner(&self) -> &dyn Store {
            &self.inner
        }
        async fn range(&self, range: Range) -> Result<crate::store::RangeResponse> {
            self.check()?;
            self.inner.range(range).await
        }
        async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
            self.check()?;
            self.inner.txn(txn).await
        }
        async fn watch(&self, watch: Watch) -> Result<WatchStream> {
            self.check()?;
            let cut = self.cut.clone().cancelled_owned();
            Ok(self.inner.watch(watch).await?.take_until(cut).boxed())
        }
    }

    /// Once the backend refuses access for good (a revoked role), the stream ends, and
    /// `take_error` says why, as `Election::observe`'s does; a count's stream too. Before,
    /// it retried the refused requests for ever, silently.
    #[tokio::test]
    async fn a_watch_refused_access_ends_and_says_why() {
        let store = Arc::new(Denying::default());
        let client = Client::from_arc(store.clone());
        let v = SharedValue::new(&client, "secret").unwrap();
        v.set("0").await.unwrap();
        let c = SharedCount::new(&client, "secret").unwrap();
        let mut changes = v.watch();
        let mut counts = c.watch();
        assert_eq!(next(&mut changes).await.unwrap().value, b"0");
        assert_eq!(counts.next().await.unwrap().value, 0);
        store
            .denied
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(v.get().await, Err(Error::PermissionDenied(_))));
        // Break the watches: a new watch, or a read, is refused from now on.
        store.cut.cancel();
        for (what, ended) in [
            (
                "value",
                tokio::time::timeout(Duration::from_secs(3), changes.next())
                    .await
                    .map(|n| n.is_none()),
            ),
            (
                "count",
                tokio::time::timeout(Duration::from_secs(3), counts.next())
                    .await
                    .map(|n| n.is_none()),
            ),
        ] {
            assert_eq!(
                ended,
                Ok(true),
                "the {what} stream did not end within 3 s ({} refused requests)",
                store.refused.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        assert!(matches!(
            changes.take_error(),
            Some(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            counts.take_error(),
            Some(Error::PermissionDenied(_))
        ));
        assert!(changes.take_error().is_none(), "taken once");
    }

    /// Stress: writes, deletes, compactions and broken watches under a
    /// value's and a count's change streams: every item is a newer write than the last
    /// (never twice, never backwards), and the last write is always seen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_stress() {
        let store = Arc::new(crate::store::slow::CutWatches::default());
        let client = Client::from_arc(store.clone());
        let v = SharedValue::new(&client, "sv").unwrap();
        let c = SharedCount::new(&client, "sv").unwrap();
        let values = v.watch();
        let mut counts = c.watch();
        let reader = |mut s: Changes| {
            tokio::spawn(async move {
                let mut last: Option<(Revision, bool)> = None;
                let mut n = 0;
                loop {
                    let Some(item) = s.next().await else { return n };
                    n += 1;
                    let rev = item.as_ref().map_or(0, |v| v.mod_revision);
                    let present = item.is_some();
                    if let Some((lrev, lpresent)) = last {
                        assert!(
                            (present && rev > lrev) || (!present && lpresent),
                            "item out of order or repeated: {last:?} then {item:?}"
                        );
                    }
                    last = Some((
                        if present {
                            rev
                        } else {
                            last.map_or(0, |l| l.0)
                        },
                        present,
                    ));
                    if item.as_ref().is_some_and(|v| v.value == b"-1") {
                        return n;
                    }
                }
            })
        };
        let vr = reader(values);
        let cr = tokio::spawn(async move {
            let mut last = 0;
            loop {
                let item = counts.next().await.unwrap();
                if item.mod_revision != 0 {
                    assert!(
                        item.mod_revision > last,
                        "count out of order: {last} then {item:?}"
                    );
                    last = item.mod_revision;
                }
                if item.value == -1 {
                    return;
                }
            }
        });
        let mut seed = 99_u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        for i in 0..3000_i64 {
            match rnd() % 10 {
                0 => {
                    v.delete().await.unwrap();
                }
                1 => {
                    store.cut_watches();
                }
                2 => {
                    let rev = client.store().put(b"other", b"", 0).await.unwrap();
                    client.store().compact(rev).await.unwrap();
                }
                _ => {
                    v.set(i.to_string()).await.unwrap();
                }
            }
            if rnd() % 4 == 0 {
                tokio::task::yield_now().await;
            }
        }
        v.set("-1").await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), vr)
            .await
            .expect("value stream missed the last write")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), cr)
            .await
            .expect("count stream missed the last write")
            .unwrap();
    }
}
