//! [`NamespaceStore`]: confine a [`Store`] to the keys under one prefix, like etcd's
//! `clientv3/namespace`.
//!
//! Every key a request names is prefixed on the way in, and the prefix is stripped from
//! every key on the way out: ranges and their results, puts, deletes, transaction compares,
//! operations and results, watch events and their previous key-values. A range or watch over
//! the prefix `""` covers exactly the namespace. Leases, revisions and compaction are shared
//! with the rest of the store, as in etcd.
//!
//! With etcd's authentication, a role granted only the namespace's prefix
//! (`etcdctl role grant-permission ROLE readwrite --prefix NAMESPACE`) is enough for
//! everything Baton does inside it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::{
    Compare, Event, KeyRange, KeyValue, LeaseGrant, LeaseId, Range, RangeResponse, Revision, Store,
    Txn, TxnOp, TxnOpResponse, TxnResponse, Watch, WatchStream,
};
use crate::error::Result;

/// A [`Store`] that sees only the keys under `prefix` of another store, with the prefix
/// removed.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// use std::sync::Arc;
/// use baton::store::mem::MemStore;
/// use baton::store::namespace::NamespaceStore;
/// use baton::store::{Range, Store};
///
/// let shared: Arc<dyn Store> = Arc::new(MemStore::new());
/// let team_a = NamespaceStore::new(shared.clone(), "team-a/");
/// team_a.put(b"locks/x", b"", 0).await?;
/// // team A sees its own key, the shared store sees where it really is
/// assert_eq!(team_a.range(Range::prefix("")).await?.kvs[0].key, b"locks/x");
/// assert_eq!(shared.range(Range::prefix("")).await?.kvs[0].key, b"team-a/locks/x");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct NamespaceStore {
    inner: Arc<dyn Store>,
    prefix: Vec<u8>,
}

impl fmt::Debug for NamespaceStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamespaceStore")
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .field("inner", &self.inner)
            .finish()
    }
}

impl NamespaceStore {
    /// Confine `inner` to the keys that start with `prefix`.
    pub fn new(inner: Arc<dyn Store>, prefix: impl Into<Vec<u8>>) -> Self {
        NamespaceStore {
            inner,
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The store underneath.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }

    fn keys(&self, keys: KeyRange) -> KeyRange {
        match keys {
            KeyRange::Key(k) => KeyRange::Key(self.key(&k)),
            KeyRange::Prefix(p) => KeyRange::Prefix(self.key(&p)),
        }
    }

    fn range_in(&self, range: Range) -> Range {
        Range {
            keys: self.keys(range.keys),
            ..range
        }
    }

    fn op_in(&self, op: TxnOp) -> TxnOp {
        match op {
            TxnOp::Put { key, value, lease } => TxnOp::Put {
                key: self.key(&key),
                value,
                lease,
            },
            TxnOp::Get(range) => TxnOp::Get(self.range_in(range)),
            TxnOp::Delete(keys) => TxnOp::Delete(self.keys(keys)),
        }
    }

    fn compare_in(&self, compare: Compare) -> Compare {
        Compare {
            key: self.key(&compare.key),
            ..compare
        }
    }
}

/// Refuse an empty key as the store underneath would (and etcd's Go `namespace`, with
/// `ErrEmptyKey`): prefixed, it would become the key equal to the prefix.
fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(crate::Error::invalid("key is empty"));
    }
    Ok(())
}

fn check_keys(keys: &KeyRange) -> Result<()> {
    match keys {
        KeyRange::Key(k) => check_key(k),
        KeyRange::Prefix(_) => Ok(()),
    }
}

fn check_txn(txn: &Txn) -> Result<()> {
    for c in &txn.compares {
        check_key(&c.key)?;
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            TxnOp::Put { key, .. } => check_key(key)?,
            TxnOp::Get(range) => check_keys(&range.keys)?,
            TxnOp::Delete(keys) => check_keys(keys)?,
        }
    }
    Ok(())
}

/// Remove `prefix` from a key. Every key the inner store returns for a namespaced request
/// starts with it; anything else is left as it is.
fn strip(prefix: &[u8], mut key: Vec<u8>) -> Vec<u8> {
    if key.starts_with(prefix) {
        key.drain(..prefix.len());
    }
    key
}

fn kv_out(prefix: &[u8], kv: KeyValue) -> KeyValue {
    KeyValue {
        key: strip(prefix, kv.key),
        ..kv
    }
}

fn range_out(prefix: &[u8], resp: RangeResponse) -> RangeResponse {
    RangeResponse {
        kvs: resp.kvs.into_iter().map(|kv| kv_out(prefix, kv)).collect(),
        ..resp
    }
}

fn event_out(prefix: &[u8], event: Event) -> Event {
    Event {
        kind: event.kind,
        kv: kv_out(prefix, event.kv),
        prev_kv: event.prev_kv.map(|kv| kv_out(prefix, kv)),
    }
}

impl NamespaceStore {
    /// `stream`'s events with our prefix stripped from their keys.
    fn stream_out(&self, stream: WatchStream) -> WatchStream {
        let prefix = self.prefix.clone();
        Box::pin(stream.map(move |item| {
            item.map(|mut batch| {
                batch.events = std::mem::take(&mut batch.events)
                    .into_iter()
                    .map(|e| event_out(&prefix, e))
                    .collect();
                batch
            })
        }))
    }
}

#[async_trait]
impl Store for NamespaceStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn range(&self, range: Range) -> Result<RangeResponse> {
        check_keys(&range.keys)?;
        let resp = self.inner.range(self.range_in(range)).await?;
        Ok(range_out(&self.prefix, resp))
    }

    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision> {
        check_key(key)?;
        self.inner.put(&self.key(key), value, lease).await
    }

    async fn delete(&self, keys: KeyRange) -> Result<(i64, Revision)> {
        check_keys(&keys)?;
        self.inner.delete(self.keys(keys)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        check_txn(&txn)?;
        let txn = Txn {
            compares: txn
                .compares
                .into_iter()
                .map(|c| self.compare_in(c))
                .collect(),
            success: txn.success.into_iter().map(|op| self.op_in(op)).collect(),
            failure: txn.failure.into_iter().map(|op| self.op_in(op)).collect(),
        };
        let resp = self.inner.txn(txn).await?;
        Ok(TxnResponse {
            responses: resp
                .responses
                .into_iter()
                .map(|r| match r {
                    TxnOpResponse::Get(range) => TxnOpResponse::Get(range_out(&self.prefix, range)),
                    other => other,
                })
                .collect(),
            ..resp
        })
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

    fn lease_keep_alive_done(&self, id: LeaseId) {
        self.inner.lease_keep_alive_done(id);
    }

    fn request_timeout(&self) -> Option<Duration> {
        self.inner.request_timeout()
    }

    async fn lease_time_to_live(&self, id: LeaseId) -> Result<Option<Duration>> {
        self.inner.lease_time_to_live(id).await
    }

    async fn watch(&self, watch: Watch) -> Result<WatchStream> {
        let watch = Watch {
            keys: self.keys(watch.keys),
            ..watch
        };
        let stream = self.inner.watch(watch).await?;
        Ok(self.stream_out(stream))
    }

    async fn watch_from_now(&self, watch: Watch) -> Result<(Revision, WatchStream)> {
        let watch = Watch {
            keys: self.keys(watch.keys),
            ..watch
        };
        let (at, stream) = self.inner.watch_from_now(watch).await?;
        Ok((at, self.stream_out(stream)))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.inner.compact(revision).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::MemStore;
    use crate::store::{CompareOp, EventKind};

    fn pair() -> (Arc<dyn Store>, NamespaceStore, NamespaceStore) {
        let shared: Arc<dyn Store> = Arc::new(MemStore::new());
        let a = NamespaceStore::new(shared.clone(), "a/");
        let b = NamespaceStore::new(shared.clone(), "b/");
        (shared, a, b)
    }

    #[tokio::test]
    async fn keys_are_prefixed_and_stripped() {
        let (shared, a, b) = pair();
        a.put(b"x", b"1", 0).await.unwrap();
        b.put(b"x", b"2", 0).await.unwrap();
        let all = shared.range(Range::prefix("")).await.unwrap();
        let keys: Vec<_> = all.kvs.iter().map(|kv| kv.key_str().into_owned()).collect();
        assert_eq!(keys, ["a/x", "b/x"]);
        let mine = a.range(Range::prefix("")).await.unwrap();
        assert_eq!(mine.kvs.len(), 1);
        assert_eq!(
            (&mine.kvs[0].key[..], &mine.kvs[0].value[..]),
            (&b"x"[..], &b"1"[..])
        );
        assert_eq!(a.delete(KeyRange::prefix("")).await.unwrap().0, 1);
        assert_eq!(b.range(Range::key("x")).await.unwrap().kvs.len(), 1);
    }

    #[tokio::test]
    async fn txn_compares_ops_and_results_are_namespaced() {
        let (shared, a, _b) = pair();
        shared.put(b"k", b"outside", 0).await.unwrap();
        // `k` does not exist inside the namespace, though it does outside.
        let resp = a
            .txn(
                Txn::new()
                    .when([Compare::create_revision("k", CompareOp::Equal, 0)])
                    .and_then([TxnOp::put("k", "in", 0), TxnOp::get(Range::prefix(""))])
                    .or_else([TxnOp::get(Range::key("k"))]),
            )
            .await
            .unwrap();
        assert!(resp.succeeded);
        let got = resp.responses[1].as_get().unwrap();
        assert_eq!(got.kvs[0].key, b"k");
        assert_eq!(got.kvs[0].value, b"in");
        let outside = shared.range(Range::key("k")).await.unwrap();
        assert_eq!(outside.kvs[0].value, b"outside");
    }

    #[tokio::test]
    async fn watch_events_and_prev_kvs_are_stripped() {
        let (_shared, a, b) = pair();
        let mut stream = a.watch(Watch::prefix("").with_prev_kv()).await.unwrap();
        b.put(b"x", b"other", 0).await.unwrap();
        a.put(b"x", b"1", 0).await.unwrap();
        a.delete(KeyRange::key("x")).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let batch = stream.next().await.unwrap().unwrap();
            seen.extend(batch.events);
        }
        assert_eq!(seen[0].kind, EventKind::Put);
        assert_eq!(seen[0].kv.key, b"x");
        assert_eq!(seen[1].kind, EventKind::Delete);
        assert_eq!(seen[1].kv.key, b"x");
        assert_eq!(seen[1].prev_kv.as_ref().unwrap().key, b"x");
    }

    /// As on the store underneath (and etcd's Go `namespace` package, `ErrEmptyKey`), an
    /// empty key is bad input: it must not silently become the key equal to the prefix.
    #[tokio::test]
    async fn empty_keys_are_refused_as_outside_a_namespace() {
        let (shared, a, _b) = pair();
        let invalid = |r: Result<()>| r.is_err_and(|e| e.is_invalid_input());
        assert!(invalid(shared.put(b"", b"v", 0).await.map(drop)));
        assert!(
            invalid(a.put(b"", b"v", 0).await.map(drop)),
            "put of an empty key"
        );
        assert!(
            invalid(a.range(Range::key("")).await.map(drop)),
            "get of an empty key"
        );
        assert!(
            invalid(a.delete(KeyRange::key("")).await.map(drop)),
            "delete of an empty key"
        );
        assert!(
            invalid(
                a.txn(Txn::new().when([Compare::version("", CompareOp::Equal, 0)]))
                    .await
                    .map(drop)
            ),
            "compare on an empty key"
        );
        assert!(
            shared.range(Range::key("a/")).await.unwrap().kvs.is_empty(),
            "the key equal to the prefix was written"
        );
    }
}
