//! `EtcdStore` against real etcd: one member, and a 3-member cluster that loses members.
//!
//! Each test starts its own etcd on free loopback ports. Without etcd these tests fail with
//! a message saying so; set `BATON_SKIP_ETCD=1` to skip them instead.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton::store::etcd::{EtcdOptions, EtcdStore};
use baton::store::{
    Compare, CompareOp, EventKind, KeyRange, Range, SortOrder, SortTarget, Store, Txn, TxnOp,
    TxnOpResponse, Watch, WatchStream,
};
use baton::Error;
use baton_testkit::{etcd_available, free_port, EtcdCluster, EtcdServer};
use futures::StreamExt;

/// False (after saying why) if etcd is missing and `BATON_SKIP_ETCD=1`; panics if it is
/// missing otherwise.
fn require_etcd() -> bool {
    // RUST_LOG=baton=debug shows retries and stream reopenings.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    if etcd_available() {
        return true;
    }
    let bin = baton_testkit::etcd_bin();
    if std::env::var_os("BATON_SKIP_ETCD").is_some_and(|v| v == "1") {
        eprintln!("skipping: etcd not available ({bin:?}); BATON_SKIP_ETCD=1");
        return false;
    }
    panic!(
        "etcd is not available ({bin:?}): install it (Debian: etcd-server) or set \
         BATON_ETCD_BIN; set BATON_SKIP_ETCD=1 to skip these tests"
    );
}

fn options() -> EtcdOptions {
    EtcdOptions {
        dial_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(5),
        ..EtcdOptions::default()
    }
}

async fn connect(endpoints: &[String]) -> EtcdStore {
    EtcdStore::connect(endpoints, options()).await.unwrap()
}

async fn next(stream: &mut WatchStream) -> baton::store::WatchResponse {
    match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
        Ok(Some(Ok(batch))) => batch,
        other => panic!("expected a watch batch, got {other:?}"),
    }
}

/// Retry `op` until it succeeds or `within` passes; the time it took.
async fn retry<T, F, Fut>(what: &str, within: Duration, mut op: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = baton::Result<T>>,
{
    let started = Instant::now();
    loop {
        match op().await {
            Ok(v) => return (v, started.elapsed()),
            Err(e) if started.elapsed() < within => {
                eprintln!("{what}: retrying after {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what} still failing after {within:?}: {e}"),
        }
    }
}

fn acquire_txn(prefix: &str, key: &str, lease: i64) -> Txn {
    Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([
            TxnOp::put(key, "", lease),
            TxnOp::get(Range::prefix(prefix).first_created()),
        ])
        .or_else([
            TxnOp::get(Range::key(key)),
            TxnOp::get(Range::prefix(prefix).first_created()),
        ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_nothing_fails_within_the_dial_timeout() {
    let port = free_port();
    let dial = Duration::from_secs(1);
    let opts = EtcdOptions {
        dial_timeout: dial,
        request_timeout: Duration::from_secs(5),
        ..EtcdOptions::default()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let err = EtcdStore::connect(&[endpoint], opts.clone())
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("nothing listening: {err} after {took:?}");
    match &err {
        Error::Connect {
            endpoints,
            timeout,
            reason,
        } => {
            assert!(endpoints.contains(&port.to_string()), "{err}");
            assert_eq!(*timeout, dial);
            assert!(!reason.is_empty());
            assert_eq!(reason, &reason.to_lowercase());
        }
        other => panic!("expected Error::Connect, got {other:?}"),
    }
    assert!(err.is_retryable());
    assert!(took < dial + Duration::from_secs(1), "took {took:?}");

    // A listener that accepts connections but never speaks HTTP/2 must not hang either.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let started = Instant::now();
    let err = EtcdStore::connect(&[endpoint], opts.clone())
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("silent listener: {err} after {took:?}");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(took < dial + Duration::from_secs(1), "took {took:?}");

    // Bad input is refused at once.
    let err = EtcdStore::connect(&[], opts.clone()).await.unwrap_err();
    assert!(err.is_invalid_input(), "{err:?}");
    let err = EtcdStore::connect(&["http://bad host:1".to_string()], opts)
        .await
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_put_delete() {
    if !require_etcd() {
        return;
    }
    let mut etcd = EtcdServer::start();
    let store = connect(&[etcd.endpoint()]).await;
    assert_eq!(store.backend(), "etcd");
    let debug = format!("{store:?}");
    assert!(debug.contains(&etcd.endpoint()), "{debug}");

    let ra = store.put(b"r/a", b"1", 0).await.unwrap();
    let rb = store.put(b"r/b", b"2", 0).await.unwrap();
    let rc = store.put(b"r/c", b"3", 0).await.unwrap();
    let ra2 = store.put(b"r/a", b"4", 0).await.unwrap();
    store.put(b"r0", b"outside", 0).await.unwrap();
    assert!(ra < rb && rb < rc && rc < ra2);

    let all = store.range(Range::prefix("r/")).await.unwrap();
    let keys: Vec<_> = all.kvs.iter().map(|kv| kv.key_str().into_owned()).collect();
    assert_eq!(keys, ["r/a", "r/b", "r/c"]);
    assert_eq!(all.header_revision, ra2 + 1);
    assert!(!all.more);
    let a = &all.kvs[0];
    assert_eq!(
        (a.create_revision, a.mod_revision, a.version, a.lease),
        (ra, ra2, 2, 0)
    );
    assert_eq!(a.value, b"4");
    assert!(format!("{a:?}").contains("value_len: 1"));

    let by_mod = store
        .range(Range::prefix("r/").sort_by(SortTarget::ModRevision, SortOrder::Descending))
        .await
        .unwrap();
    assert_eq!(by_mod.kvs[0].key, b"r/a");
    let limited = store
        .range(Range::prefix("r/").with_limit(2))
        .await
        .unwrap();
    assert_eq!(limited.kvs.len(), 2);
    assert!(limited.more);
    let first = store
        .range(Range::prefix("r/").first_created())
        .await
        .unwrap();
    assert_eq!(first.kvs[0].key, b"r/a");
    let last = store
        .range(Range::prefix("r/").last_created())
        .await
        .unwrap();
    assert_eq!(last.kvs[0].key, b"r/c");
    let by_key_desc = store
        .range(Range::prefix("r/").sort_by(SortTarget::Key, SortOrder::Descending))
        .await
        .unwrap();
    assert_eq!(by_key_desc.kvs[0].key, b"r/c");
    let created_before_c = store
        .range(Range::prefix("r/").with_max_create_revision(rb))
        .await
        .unwrap();
    assert_eq!(created_before_c.kvs.len(), 2);
    let modified_by_c = store
        .range(Range::prefix("r/").with_max_mod_revision(rc))
        .await
        .unwrap();
    let keys: Vec<_> = modified_by_c.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, [b"r/b".to_vec(), b"r/c".to_vec()]);
    // Keys only: no values, everything else as in a full read.
    let keys_only = store.range(Range::prefix("r/").keys_only()).await.unwrap();
    assert_eq!(keys_only.kvs.len(), 3);
    for (k, full) in keys_only.kvs.iter().zip(&all.kvs) {
        assert!(k.value.is_empty(), "{k:?}");
        assert_eq!(
            (
                &k.key,
                k.create_revision,
                k.mod_revision,
                k.version,
                k.lease
            ),
            (
                &full.key,
                full.create_revision,
                full.mod_revision,
                full.version,
                full.lease
            )
        );
    }

    let none = store.range(Range::key("missing")).await.unwrap();
    assert!(none.kvs.is_empty());
    assert_eq!(none.header_revision, ra2 + 1);

    let (deleted, rev) = store.delete(KeyRange::prefix("r/")).await.unwrap();
    assert_eq!((deleted, rev), (3, ra2 + 2));
    let (deleted, rev) = store.delete(KeyRange::key("r/a")).await.unwrap();
    assert_eq!((deleted, rev), (0, ra2 + 2));
    assert_eq!(store.range(Range::prefix("r")).await.unwrap().kvs.len(), 1);
    // An empty prefix covers every key.
    assert_eq!(store.range(Range::prefix("")).await.unwrap().kvs.len(), 1);

    // Oversized requests are the caller's mistake.
    let big = vec![b'x'; 1_600_000];
    let err = store.put(b"big", &big, 0).await.unwrap_err();
    eprintln!("1.6 MB value: {err}");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let huge = vec![b'x'; 2_500_000];
    let err = store.put(b"huge", &huge, 0).await.unwrap_err();
    eprintln!("2.5 MB value: {err}");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(!err.to_string().contains("xxx"));
    let err = store.range(Range::key("")).await.unwrap_err();
    eprintln!("empty key: {err}");
    assert!(err.is_invalid_input(), "{err:?}");

    // etcdctl sees the same data.
    let out = etcd.etcdctl(["get", "r0", "--print-value-only"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "outside");

    // A paused server: requests fail with Error::Timeout in time, and work again after.
    let after = Duration::from_millis(500);
    let quick = EtcdStore::connect(
        &[etcd.endpoint()],
        EtcdOptions {
            dial_timeout: Duration::from_secs(1),
            request_timeout: after,
            ..EtcdOptions::default()
        },
    )
    .await
    .unwrap();
    etcd.stop();
    let started = Instant::now();
    let err = quick.range(Range::key("r0")).await.unwrap_err();
    let took = started.elapsed();
    etcd.cont();
    eprintln!("paused server: {err} after {took:?}");
    assert!(
        matches!(err, Error::Timeout { operation: "range", after: a } if a == after),
        "{err:?}"
    );
    assert!(took < after + Duration::from_millis(500), "took {took:?}");
    let (found, _) = retry("after SIGCONT", Duration::from_secs(5), || {
        quick.range(Range::key("r0"))
    })
    .await;
    assert_eq!(found.kvs.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_implements_the_mutex_protocol() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start();
    let store = connect(&[etcd.endpoint()]).await;
    let prefix = "lock/m/";
    let l1 = store.lease_grant(Duration::from_secs(30)).await.unwrap().id;
    let l2 = store.lease_grant(Duration::from_secs(30)).await.unwrap().id;
    let k1 = format!("{prefix}{l1:x}");
    let k2 = format!("{prefix}{l2:x}");

    // Session 1 acquires: its put and the first-created get run in one txn.
    let r1 = store.txn(acquire_txn(prefix, &k1, l1)).await.unwrap();
    assert!(r1.succeeded);
    assert_eq!(r1.responses.len(), 2);
    assert_eq!(r1.responses[0], TxnOpResponse::Put);
    let my_rev1 = r1.header_revision;
    let first = r1.responses[1].as_get().unwrap();
    // etcd 3.4: a range inside a txn sees a put made earlier in the same txn.
    assert_eq!(first.kvs.len(), 1, "the txn's get must see its own put");
    assert_eq!(first.kvs[0].key_str(), k1);
    assert_eq!(first.kvs[0].create_revision, my_rev1);
    assert_eq!(first.kvs[0].lease, l1);

    // Session 2 queues behind it.
    let r2 = store.txn(acquire_txn(prefix, &k2, l2)).await.unwrap();
    assert!(r2.succeeded);
    let my_rev2 = r2.header_revision;
    assert!(my_rev2 > my_rev1);
    let first = r2.responses[1].as_get().unwrap();
    assert_eq!(first.kvs[0].create_revision, my_rev1);
    // Its predecessor: the last key created before it.
    let pred = store
        .range(
            Range::prefix(prefix)
                .last_created()
                .with_max_create_revision(my_rev2 - 1),
        )
        .await
        .unwrap();
    assert_eq!(pred.kvs[0].key_str(), k1);

    // Session 1 tries again: the else branch reports its existing key.
    let again = store.txn(acquire_txn(prefix, &k1, l1)).await.unwrap();
    assert!(!again.succeeded);
    let mine = again.responses[0].as_get().unwrap();
    assert_eq!(mine.kvs[0].create_revision, my_rev1);
    assert_eq!(mine.kvs[0].version, 1);
    assert!(mine.kvs[0].value.is_empty());
    assert_eq!(again.header_revision, my_rev2);

    // A fenced write: guarded by the lock key's create revision.
    let fenced = |rev: i64| {
        Txn::new()
            .when([Compare::create_revision(k1.clone(), CompareOp::Equal, rev)])
            .and_then([TxnOp::put("resource", "written", 0)])
    };
    assert!(!store.txn(fenced(my_rev1 + 100)).await.unwrap().succeeded);
    assert!(store.txn(fenced(my_rev1)).await.unwrap().succeeded);

    // Unlock is a compare-and-delete.
    let unlock = |rev: i64| {
        Txn::new()
            .when([Compare::create_revision(k1.clone(), CompareOp::Equal, rev)])
            .and_then([TxnOp::delete(k1.clone())])
    };
    let stale = store.txn(unlock(my_rev1 + 100)).await.unwrap();
    assert!(!stale.succeeded);
    assert!(stale.responses.is_empty());
    let done = store.txn(unlock(my_rev1)).await.unwrap();
    assert!(done.succeeded);
    assert_eq!(done.responses, [TxnOpResponse::Delete { deleted: 1 }]);
    let first = store
        .range(Range::prefix(prefix).first_created())
        .await
        .unwrap();
    assert_eq!(first.kvs[0].key_str(), k2);

    // Every compare target and operator.
    let rev = store.put(b"cmp", b"v1", l2).await.unwrap();
    let all_hold = Txn::new().when([
        Compare::value("cmp", CompareOp::Equal, "v1"),
        Compare::value("cmp", CompareOp::NotEqual, "v2"),
        Compare::value("cmp", CompareOp::Greater, "v0"),
        Compare::value("cmp", CompareOp::Less, "v2"),
        Compare::version("cmp", CompareOp::Equal, 1),
        Compare::version("cmp", CompareOp::Less, 2),
        Compare::create_revision("cmp", CompareOp::Equal, rev),
        Compare::create_revision("cmp", CompareOp::Greater, 0),
        Compare::mod_revision("cmp", CompareOp::Equal, rev),
        Compare::mod_revision("cmp", CompareOp::NotEqual, rev + 1),
        Compare::lease("cmp", CompareOp::Equal, l2),
        Compare::lease("cmp", CompareOp::NotEqual, 0),
    ]);
    let resp = store.txn(all_hold).await.unwrap();
    assert!(resp.succeeded);
    assert_eq!(
        resp.header_revision, rev,
        "a read-only txn does not bump the revision"
    );
    for fails in [
        Compare::value("cmp", CompareOp::Equal, "v2"),
        Compare::version("cmp", CompareOp::Greater, 1),
        Compare::lease("cmp", CompareOp::Equal, 0),
        // A value compare on a missing key is false, whatever the operator.
        Compare::value("nokey", CompareOp::NotEqual, "x"),
    ] {
        let resp = store.txn(Txn::new().when([fails.clone()])).await.unwrap();
        assert!(!resp.succeeded, "{fails:?}");
    }
    // The other targets of a missing key compare as zero.
    let zeros = Txn::new().when([
        Compare::create_revision("nokey", CompareOp::Equal, 0),
        Compare::mod_revision("nokey", CompareOp::Equal, 0),
        Compare::version("nokey", CompareOp::Equal, 0),
        Compare::lease("nokey", CompareOp::Equal, 0),
    ]);
    assert!(store.txn(zeros).await.unwrap().succeeded);

    // All writes of a txn share one revision; a prefix delete inside a txn counts keys.
    let multi = Txn::new().and_then([
        TxnOp::put("t/1", "a", 0),
        TxnOp::put("t/2", "b", 0),
        TxnOp::get(Range::prefix("t/")),
    ]);
    let resp = store.txn(multi).await.unwrap();
    let got = resp.responses[2].as_get().unwrap();
    assert_eq!(got.kvs.len(), 2);
    assert!(got
        .kvs
        .iter()
        .all(|kv| kv.create_revision == resp.header_revision));
    let del = store
        .txn(Txn::new().and_then([TxnOp::Delete(KeyRange::prefix("t/"))]))
        .await
        .unwrap();
    assert_eq!(del.responses, [TxnOpResponse::Delete { deleted: 2 }]);

    // Each get of a txn sees the writes before it, and reports the revision it saw.
    let g = store.put(b"h/gone", b"x", 0).await.unwrap();
    let resp = store
        .txn(Txn::new().and_then([
            TxnOp::get(Range::prefix("h/")),
            TxnOp::put("h/new", "v", 0),
            TxnOp::delete("h/gone"),
            TxnOp::get(Range::prefix("h/")),
        ]))
        .await
        .unwrap();
    assert_eq!(resp.header_revision, g + 1);
    let before = resp.responses[0].as_get().unwrap();
    assert_eq!(before.kvs[0].key, b"h/gone");
    assert_eq!(before.header_revision, g);
    assert_eq!(resp.responses[2], TxnOpResponse::Delete { deleted: 1 });
    let after = resp.responses[3].as_get().unwrap();
    assert_eq!(after.kvs.len(), 1);
    assert_eq!(after.kvs[0].key, b"h/new");
    assert_eq!(after.kvs[0].mod_revision, g + 1);
    assert_eq!(after.header_revision, g + 1);

    // etcd refuses a txn that writes one key twice.
    let dup = Txn::new().and_then([TxnOp::put("d", "1", 0), TxnOp::put("d", "2", 0)]);
    let err = store.txn(dup).await.unwrap_err();
    eprintln!("duplicate key: {err}");
    assert!(err.is_invalid_input(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_grant_keep_alive_revoke() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start();
    let store = connect(&[etcd.endpoint()]).await;

    let short = store.lease_grant(Duration::from_secs(1)).await.unwrap();
    eprintln!("TTL 1 s was granted as {:?}", short.ttl);
    assert!(short.ttl >= Duration::from_secs(2), "{:?}", short.ttl);
    let rounded = store
        .lease_grant(Duration::from_millis(4200))
        .await
        .unwrap();
    assert_eq!(rounded.ttl, Duration::from_secs(5));
    let err = store
        .lease_grant(Duration::from_secs(9_000_000_001))
        .await
        .unwrap_err();
    eprintln!("TTL too large: {err}");
    assert!(err.is_invalid_input(), "{err:?}");
    // The largest Duration is refused too (its whole seconds, rounded up, overflowed).
    let err = store.lease_grant(Duration::MAX).await.unwrap_err();
    assert!(err.is_invalid_input(), "{err:?}");

    let lease = rounded.id;
    store.put(b"leased", b"v", lease).await.unwrap();
    let kv = &store.range(Range::key("leased")).await.unwrap().kvs[0];
    assert_eq!(kv.lease, lease);
    for _ in 0..3 {
        let ttl = store.lease_keep_alive(lease).await.unwrap();
        assert_eq!(ttl, Some(Duration::from_secs(5)));
    }
    let left = store.lease_time_to_live(lease).await.unwrap().unwrap();
    assert!(
        left <= Duration::from_secs(5) && left >= Duration::from_secs(3),
        "{left:?}"
    );

    store.lease_revoke(lease).await.unwrap();
    assert!(store
        .range(Range::key("leased"))
        .await
        .unwrap()
        .kvs
        .is_empty());
    assert_eq!(store.lease_keep_alive(lease).await.unwrap(), None);
    assert_eq!(store.lease_time_to_live(lease).await.unwrap(), None);
    let err = store.lease_revoke(lease).await.unwrap_err();
    assert!(
        matches!(err, Error::LeaseNotFound(id) if id == lease),
        "{err:?}"
    );
    let err = store.put(b"leased", b"v", lease).await.unwrap_err();
    assert!(
        matches!(err, Error::LeaseNotFound(id) if id == lease),
        "{err:?}"
    );
    let err = store
        .txn(acquire_txn("lock/x/", "lock/x/1", lease))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::LeaseNotFound(id) if id == lease),
        "{err:?}"
    );
    assert_eq!(store.lease_keep_alive(12345).await.unwrap(), None);
    assert_eq!(store.lease_time_to_live(12345).await.unwrap(), None);

    // Expiry: the key goes, a watch sees the delete, the cached keep-alive stream says
    // the lease is gone.
    let expiring = short.id;
    assert!(store.lease_keep_alive(expiring).await.unwrap().is_some());
    store.put(b"expiring", b"v", expiring).await.unwrap();
    let mut watch = store.watch(Watch::key("expiring")).await.unwrap();
    let started = Instant::now();
    let batch = next(&mut watch).await;
    eprintln!(
        "lease of {:?} expired after {:?}",
        short.ttl,
        started.elapsed()
    );
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].kind, EventKind::Delete);
    assert_eq!(store.lease_keep_alive(expiring).await.unwrap(), None);
    assert_eq!(store.lease_time_to_live(expiring).await.unwrap(), None);
}

/// A revoke applied by etcd whose answer is lost (the connection reset as etcd replies) is
/// sent again, and the second attempt's "lease not found" counts as revoked: before, it was
/// sent once (`Retry::Unsent`) and `lease_revoke` (so `Session::close()`) failed with the
/// reset although the lease was gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_whose_answer_is_lost_is_sent_again() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let proxy = baton_testkit::proxy::FaultProxy::start(etcd.client_port()).await;
    let store = connect(&[proxy.url("http")]).await;
    let direct = connect(&[etcd.endpoint()]).await;
    let lease = store.lease_grant(Duration::from_secs(30)).await.unwrap().id;
    store.put(b"revoked-once", b"v", lease).await.unwrap();
    // Let the background keep-alive stream of the new lease settle before the fault.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set(
        baton_testkit::proxy::Direction::ServerToClient,
        baton_testkit::proxy::Fault::Reset,
    );
    let revoke = tokio::spawn({
        let store = store.clone();
        async move { store.lease_revoke(lease).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.heal();
    let result = tokio::time::timeout(Duration::from_secs(10), revoke)
        .await
        .expect("revoke hung")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(proxy.stats().resets > 0, "the fault never fired");
    assert_eq!(direct.lease_time_to_live(lease).await.unwrap(), None);
    assert!(direct
        .range(Range::key("revoked-once"))
        .await
        .unwrap()
        .kvs
        .is_empty());
    // A lease that never existed is still reported as such.
    let err = store.lease_revoke(lease + 12345).await.unwrap_err();
    assert!(matches!(err, Error::LeaseNotFound(_)), "{err:?}");
}

/// Keep-alives of one lease are pipelined on one stream: many at once each get their own
/// answer (the TTL), a lease granted by another client (whose TTL this store does not know)
/// too, and once the lease is revoked every later one says it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_keep_alives_are_each_answered() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start();
    let store = connect(&[etcd.endpoint()]).await;
    let other = connect(&[etcd.endpoint()]).await;
    let mine = store.lease_grant(Duration::from_secs(7)).await.unwrap();
    let foreign = other.lease_grant(Duration::from_secs(9)).await.unwrap();
    for (lease, ttl) in [(mine.id, mine.ttl), (foreign.id, foreign.ttl)] {
        let calls = (0..32).map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.lease_keep_alive(lease).await })
        });
        for answer in futures::future::join_all(calls).await {
            assert_eq!(answer.unwrap().unwrap(), Some(ttl));
        }
    }
    other.lease_revoke(mine.id).await.unwrap();
    let calls = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.lease_keep_alive(mine.id).await })
    });
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.unwrap().unwrap(), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_streams_and_cancels() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start();
    let store = connect(&[etcd.endpoint()]).await;

    let r1 = store.put(b"w/a", b"v1", 0).await.unwrap();
    let r2 = store.put(b"w/a", b"v2", 0).await.unwrap();
    let r3 = store.put(b"w/b", b"v1", 0).await.unwrap();
    let (_, r4) = store.delete(KeyRange::key("w/a")).await.unwrap();

    // From an old revision, history is replayed in order.
    let mut replay = store
        .watch(Watch::prefix("w/").from_revision(r1).with_prev_kv())
        .await
        .unwrap();
    let mut events = Vec::new();
    while events.len() < 4 {
        events.extend(next(&mut replay).await.events);
    }
    let revs: Vec<_> = events.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(revs, [r1, r2, r3, r4]);
    assert_eq!(events[0].kind, EventKind::Put);
    assert!(events[0].prev_kv.is_none());
    assert_eq!(events[1].prev_kv.as_ref().unwrap().value, b"v1");
    assert_eq!(events[1].kv.version, 2);
    assert_eq!(events[3].kind, EventKind::Delete);
    assert_eq!(events[3].kv.key, b"w/a");
    assert_eq!(events[3].prev_kv.as_ref().unwrap().value, b"v2");

    // From now: registered when watch() returns, so an immediate write is seen.
    let mut live = store.watch(Watch::key("w/b")).await.unwrap();
    let r5 = store.put(b"w/b", b"v2", 0).await.unwrap();
    let batch = next(&mut live).await;
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].kv.mod_revision, r5);
    assert_eq!(batch.events[0].kv.value, b"v2");
    assert!(batch.header_revision >= r5);
    // The replaying watch keeps going too.
    let batch = next(&mut replay).await;
    assert_eq!(batch.events[0].kv.mod_revision, r5);

    // From now: the revision etcd registered the watch at, and every event after it.
    let (at, mut now) = store
        .watch_from_now(Watch::prefix("w/").from_revision(1))
        .await
        .unwrap();
    assert_eq!(at, r5, "the start revision given is ignored");
    let r6 = store.put(b"w/b", b"v3", 0).await.unwrap();
    let batch = next(&mut now).await;
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].kv.mod_revision, r6);

    // Deletes only (NOPUT): the replay skips the puts, and so does the live stream.
    let mut deletes = store
        .watch(Watch::prefix("w/").from_revision(r1).deletes_only())
        .await
        .unwrap();
    let batch = next(&mut deletes).await;
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].kind, EventKind::Delete);
    assert_eq!(batch.events[0].kv.mod_revision, r4);
    store.put(b"w/c", b"", 0).await.unwrap();
    let (_, r7) = store.delete(KeyRange::key("w/c")).await.unwrap();
    let batch = next(&mut deletes).await;
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].kind, EventKind::Delete);
    assert_eq!(batch.events[0].kv.mod_revision, r7);

    // A revoke deletes every leased key in one revision: one batch.
    let lease = store.lease_grant(Duration::from_secs(30)).await.unwrap().id;
    let mut leased = store.watch(Watch::prefix("l/")).await.unwrap();
    store.put(b"l/1", b"", lease).await.unwrap();
    store.put(b"l/2", b"", lease).await.unwrap();
    next(&mut leased).await;
    next(&mut leased).await;
    store.lease_revoke(lease).await.unwrap();
    let batch = next(&mut leased).await;
    assert_eq!(batch.events.len(), 2);
    assert!(batch.events.iter().all(|e| e.kind == EventKind::Delete));
    assert_eq!(
        batch.events[0].kv.mod_revision,
        batch.events[1].kv.mod_revision
    );

    // Dropping the streams cancels the watches on the server.
    let watchers = || etcd.metric("etcd_debugging_mvcc_watcher_total").unwrap();
    assert_eq!(watchers(), 5.0);
    drop(now);
    drop(deletes);
    drop(replay);
    drop(live);
    drop(leased);
    let started = Instant::now();
    while watchers() != 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "watchers left on the server: {}",
            watchers()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "watches cancelled on the server {:?} after drop",
        started.elapsed()
    );
}

/// Replies larger than tonic's default 4 MiB limit (a range over many large values, a
/// watch catching up over them) are read, as etcd sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_over_four_mebibytes_are_read() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start();
    let store = connect(&[etcd.endpoint()]).await;
    let value = vec![b'v'; 900 * 1024];
    let before = store.put(b"big/start", b"", 0).await.unwrap();
    for i in 0..6 {
        store
            .put(format!("big/{i}").as_bytes(), &value, 0)
            .await
            .unwrap();
    }
    let all = store.range(Range::prefix("big/")).await.unwrap();
    assert_eq!(all.kvs.len(), 7);
    let read = store
        .txn(Txn::new().and_then([TxnOp::get(Range::prefix("big/"))]))
        .await
        .unwrap();
    assert!(read.succeeded);
    let mut stream = store
        .watch(Watch::prefix("big/").from_revision(before + 1))
        .await
        .unwrap();
    let mut events = 0;
    while events < 6 {
        let batch = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("no watch batch")
            .expect("the watch ended")
            .unwrap();
        events += batch.events.len();
    }
    assert_eq!(events, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_fails() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start();
    let store = connect(&[etcd.endpoint()]).await;

    let mut revs = Vec::new();
    for i in 0..5 {
        revs.push(store.put(b"c", format!("{i}").as_bytes(), 0).await.unwrap());
    }
    let compact_at = revs[3];
    store.compact(compact_at).await.unwrap();

    let started = Instant::now();
    let mut stream = store
        .watch(Watch::key("c").from_revision(revs[1]))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap();
    eprintln!("compacted watch: {first:?} after {:?}", started.elapsed());
    match first {
        Some(Err(Error::Compacted {
            requested,
            compact_revision,
        })) => {
            assert_eq!(requested, revs[1]);
            assert_eq!(compact_revision, compact_at);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(
        stream.next().await.is_none(),
        "the stream ends after Compacted"
    );

    // From the compact revision itself, history is still there.
    let mut ok = store
        .watch(Watch::key("c").from_revision(compact_at))
        .await
        .unwrap();
    let batch = next(&mut ok).await;
    assert_eq!(batch.events[0].kv.mod_revision, compact_at);

    // Compacting again at or below the compact revision.
    let err = store.compact(revs[2]).await.unwrap_err();
    eprintln!("compact again: {err}");
    assert!(
        matches!(err, Error::Compacted { requested, compact_revision } if requested == revs[2] && compact_revision == compact_at),
        "{err:?}"
    );
    let err = store.compact(revs[4] + 100).await.unwrap_err();
    eprintln!("compact in the future: {err}");
    assert!(err.is_invalid_input(), "{err:?}");
}

/// Reads at a past revision (etcd's `WithRev`), alone and inside a txn; a compacted
/// revision gives `Compacted` with both revisions, a future one `InvalidArgument`: the
/// answers MemStore gives too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_at_a_past_revision() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let store = connect(&[etcd.endpoint()]).await;
    let r1 = store.put(b"h/a", b"a1", 0).await.unwrap();
    let r2 = store.put(b"h/b", b"b1", 0).await.unwrap();
    let r3 = store.put(b"h/a", b"a2", 0).await.unwrap();
    let (_, r4) = store.delete(KeyRange::key("h/b")).await.unwrap();
    let r5 = store.put(b"h/c", b"c1", 0).await.unwrap();

    let at = |rev| Range::prefix("h/").at_revision(rev);
    let r = store.range(at(r2)).await.unwrap();
    assert_eq!(r.header_revision, r5, "the header is the current revision");
    let seen: Vec<_> = r.kvs.iter().map(|kv| kv.value_str().into_owned()).collect();
    assert_eq!(seen, ["a1", "b1"]);
    assert_eq!(r.kvs[0].mod_revision, r1);
    let r = store.range(at(r4)).await.unwrap();
    let seen: Vec<_> = r.kvs.iter().map(|kv| kv.value_str().into_owned()).collect();
    assert_eq!(seen, ["a2"]);
    assert_eq!(r.kvs[0].version, 2);
    let r = store
        .txn(Txn::new().and_then([
            TxnOp::put("h/d", "d1", 0),
            TxnOp::get(at(r3).last_created()),
        ]))
        .await
        .unwrap();
    let got = r.responses[1].as_get().unwrap();
    assert_eq!(got.kvs[0].key, b"h/b");

    let err = store.range(at(r5 + 100)).await.unwrap_err();
    eprintln!("read in the future: {err}");
    assert!(err.is_invalid_input(), "{err:?}");
    store.compact(r3).await.unwrap();
    let err = store.range(at(r2)).await.unwrap_err();
    eprintln!("read at a compacted revision: {err}");
    assert!(
        matches!(err, Error::Compacted { requested, compact_revision } if requested == r2 && compact_revision == r3),
        "{err:?}"
    );
    let err = store
        .txn(Txn::new().and_then([TxnOp::put("h/e", "", 0), TxnOp::get(at(r1))]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Compacted { requested, .. } if requested == r1),
        "{err:?}"
    );
    assert!(store.range(Range::key("h/e")).await.unwrap().kvs.is_empty());
    // The compact revision itself can still be read.
    assert_eq!(store.range(at(r3)).await.unwrap().kvs.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_losing_a_member() {
    if !require_etcd() {
        return;
    }
    let mut cluster = EtcdCluster::start_async(3).await;
    let store = connect(&cluster.endpoints()).await;

    // Hold a lock: a leased key, kept alive in the background.
    let grant = store.lease_grant(Duration::from_secs(5)).await.unwrap();
    let lease = grant.id;
    let prefix = "lock/c/";
    let key = format!("{prefix}{lease:x}");
    let acquired = store.txn(acquire_txn(prefix, &key, lease)).await.unwrap();
    assert!(acquired.succeeded);
    let my_rev = acquired.header_revision;

    let failures = Arc::new(AtomicUsize::new(0));
    let lost = Arc::new(AtomicUsize::new(0));
    let keeper = {
        let (store, failures, lost) = (store.clone(), failures.clone(), lost.clone());
        tokio::spawn(async move {
            loop {
                match store.lease_keep_alive(lease).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        lost.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        eprintln!("background keep-alive: {e}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    let check = |round: &'static str| {
        let store = store.clone();
        let key = key.clone();
        async move {
            let (held, took) = retry(round, Duration::from_secs(10), || async {
                store.range(Range::key(key.as_str())).await
            })
            .await;
            eprintln!("{round}: range ok after {took:?}");
            assert_eq!(held.kvs.len(), 1, "{round}: the lock key is gone");
            assert_eq!(held.kvs[0].create_revision, my_rev);
            let (_, took) = retry(round, Duration::from_secs(10), || async {
                store.put(b"after-kill", round.as_bytes(), 0).await
            })
            .await;
            eprintln!("{round}: put ok after {took:?}");
            let (ttl, took) = retry(round, Duration::from_secs(10), || async {
                store.lease_keep_alive(lease).await
            })
            .await;
            eprintln!("{round}: keep-alive ok after {took:?}");
            assert!(ttl.is_some(), "{round}: the lease is gone");
            let (mut watch, _) = retry(round, Duration::from_secs(10), || async {
                store.watch(Watch::key("after-kill")).await
            })
            .await;
            store.put(b"after-kill", b"seen", 0).await.unwrap();
            let batch = next(&mut watch).await;
            assert_eq!(batch.events[0].kv.value, b"seen");
        }
    };

    // A follower dies, then comes back.
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).unwrap();
    let follower = (leader + 1) % 3;
    cluster.kill(follower);
    check("follower killed").await;
    tokio::task::block_in_place(|| cluster.restart(follower));

    // The leader dies: an election, and the client moves on to the others.
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).unwrap();
    let mut across = store.watch(Watch::key("across")).await.unwrap();
    let killed_at = Instant::now();
    cluster.kill(leader);
    check("leader killed").await;
    // A watch open during the kill either keeps going (its member survived) or reports
    // the broken stream (error or end) so that the consumer watches again; it never
    // goes silent.
    store.put(b"across", b"after", 0).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), across.next()).await {
        Ok(Some(Ok(batch))) => {
            assert_eq!(batch.events[0].kv.value, b"after");
            eprintln!("the watch open during the leader kill kept going");
        }
        Ok(Some(Err(e))) => eprintln!("the watch open during the leader kill failed: {e}"),
        Ok(None) => eprintln!("the watch open during the leader kill ended"),
        Err(_) => panic!("the watch open during the leader kill went silent"),
    }
    let new_leader =
        tokio::task::block_in_place(|| cluster.wait_for_leader(Duration::from_secs(10)));
    eprintln!(
        "new leader {new_leader:?} (old {leader}) {:?} after the kill",
        killed_at.elapsed()
    );
    assert!(new_leader.is_some_and(|l| l != leader));

    // The lock survived both: same key, same lease, never reported lost.
    tokio::time::sleep(Duration::from_secs(1)).await;
    keeper.abort();
    let held = store.range(Range::key(key.as_str())).await.unwrap();
    assert_eq!(held.kvs[0].create_revision, my_rev);
    assert!(store.lease_time_to_live(lease).await.unwrap().is_some());
    assert_eq!(
        lost.load(Ordering::SeqCst),
        0,
        "the lease was reported lost"
    );
    eprintln!(
        "background keep-alive failures during the kills: {}",
        failures.load(Ordering::SeqCst)
    );
}

/// Keep-alive streams open on etcd (started and not yet handled).
fn open_keep_alive_streams(etcd: &EtcdServer) -> f64 {
    let method = "grpc_method=\"LeaseKeepAlive\"";
    let started = etcd.metric_sum("grpc_server_started_total", &[method]);
    let handled = etcd.metric_sum("grpc_server_handled_total", &[method]);
    started.unwrap() - handled.unwrap()
}

/// Poll until etcd has `want` more keep-alive streams open than `before` (within 5 s).
async fn keep_alive_streams_become(etcd: &EtcdServer, before: f64, want: f64) {
    let started = Instant::now();
    loop {
        let open = open_keep_alive_streams(etcd) - before;
        if open == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{open} keep-alive streams open, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A session that ends (orphaned, closed or lost) frees its lease's keep-alive stream: 20
/// orphaned sessions left 20 streams (and 40 tasks) open for the life of the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_close_their_keep_alive_streams() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let client = baton::Client::connect(&etcd.endpoint()).await.unwrap();
    let before = open_keep_alive_streams(&etcd);
    let mut sessions = Vec::new();
    for _ in 0..20 {
        let s = baton::Session::builder(&client)
            .with_ttl(Duration::from_secs(30))
            .build()
            .await
            .unwrap();
        sessions.push(s);
    }
    // Each session's stream is open (it is opened in the background after the grant).
    keep_alive_streams_become(&etcd, before, 20.0).await;
    for s in &sessions[..10] {
        s.orphan();
    }
    keep_alive_streams_become(&etcd, before, 10.0).await;
    for s in &sessions[10..] {
        s.close().await.unwrap();
    }
    keep_alive_streams_become(&etcd, before, 0.0).await;
}

/// Readers of one client waiting behind a writer share its watch streams (one on the
/// writers' keys, one on the readers'), rather than holding two streams each: 100 waiting
/// readers held 200 streams open on one HTTP/2 connection, and an etcd limiting concurrent
/// streams starved the client's other requests. Both when the readers' client also writes
/// (its shared watch on the writers' keys is open already) and when it only reads. All of
/// them get the lock when the writer leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_readers_of_one_client_share_its_watch_streams() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    for writes_too in [true, false] {
        let client = baton::Client::connect(&etcd.endpoint()).await.unwrap();
        let other = baton::Client::connect(&etcd.endpoint()).await.unwrap();
        let writers = if writes_too { &client } else { &other };
        readers_share_streams(&etcd, &client, writers, writes_too).await;
    }
}

async fn readers_share_streams(
    etcd: &EtcdServer,
    client: &baton::Client,
    writers: &baton::Client,
    writes_too: bool,
) {
    const READERS: usize = 100;
    let name = format!("rw-{writes_too}");
    let session = |c: baton::Client| async move {
        baton::Session::builder(&c)
            .with_ttl(Duration::from_secs(30))
            .build()
            .await
            .unwrap()
    };
    let writer = session(writers.clone()).await;
    // Writes by a client leave its shared watch on the writers' keys open.
    for _ in 0..3 {
        let rw = baton::RwLock::new(&writer, &name).unwrap();
        rw.write().await.unwrap().unlock().await.unwrap();
    }
    let w = baton::RwLock::new(&writer, &name)
        .unwrap()
        .write()
        .await
        .unwrap();
    let streams = || {
        etcd.metric("etcd_debugging_mvcc_watch_stream_total")
            .unwrap()
    };
    let before = streams();
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let s = session(client.clone()).await;
        let name = name.clone();
        readers.push(tokio::spawn(async move {
            let rw = baton::RwLock::new(&s, &name).unwrap();
            rw.read().await.unwrap().unlock().await.unwrap();
        }));
    }
    let prefix = format!("{name}/read/");
    let queued = || async {
        client
            .store()
            .range(Range::prefix(prefix.clone()))
            .await
            .unwrap()
            .kvs
            .len()
    };
    while queued().await < READERS {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = streams() - before;
    assert!(
        open <= 3.0,
        "{open} more watch streams open with {READERS} waiting readers (their client writes \
         too: {writes_too})"
    );
    w.unlock().await.unwrap();
    for r in readers {
        tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .expect("a reader did not get the lock after the writer left")
            .unwrap();
    }
}

/// On etcd, one release (a permit released, an item queued) counts one wake-up in the
/// waiting client's stats, as a lock's release does: the wait's own re-reads (its doubts
/// 30 and 70 ms after a watch starts) are not wake-ups. (Before: 2 while waiting, 3 after
/// one release.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_release_counts_one_wakeup() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let holding = baton::Client::connect(&etcd.endpoint()).await.unwrap();
    let waiting = baton::Client::connect(&etcd.endpoint()).await.unwrap();
    let hs = baton::Session::new(&holding).await.unwrap();
    let ws = baton::Session::new(&waiting).await.unwrap();
    for what in ["semaphore", "queue", "mutex"] {
        let name = format!("wake/{what}");
        let before = waiting.stats();
        let (release, wait): (
            std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
            tokio::task::JoinHandle<()>,
        ) = match what {
            "semaphore" => {
                let p = baton::Semaphore::new(&hs, &name, 1)
                    .unwrap()
                    .acquire()
                    .await
                    .unwrap();
                let s = baton::Semaphore::new(&ws, &name, 1).unwrap();
                let wait = tokio::spawn(async move { s.acquire().await.map(drop).unwrap() });
                (Box::pin(async move { p.release().await.unwrap() }), wait)
            }
            "queue" => {
                let q = baton::Queue::new(&waiting, &name).unwrap();
                let wait = tokio::spawn(async move { q.dequeue().await.map(drop).unwrap() });
                let q = baton::Queue::new(&holding, &name).unwrap();
                (Box::pin(async move { q.enqueue("x").await.unwrap() }), wait)
            }
            _ => {
                let g = baton::Mutex::new(&hs, &name).unwrap().lock().await.unwrap();
                let m = baton::Mutex::new(&ws, &name).unwrap();
                let wait = tokio::spawn(async move { m.lock().await.map(drop).unwrap() });
                (Box::pin(async move { g.unlock().await.unwrap() }), wait)
            }
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let waited = waiting.stats().wakeups - before.wakeups;
        assert_eq!(waited, 0, "{what}: wake-ups counted before any release");
        release.await;
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .unwrap_or_else(|_| panic!("{what}: the wait hung"))
            .unwrap();
        let woken = waiting.stats().wakeups - before.wakeups;
        assert_eq!(woken, 1, "{what}: wake-ups for one release");
    }
}

/// Open watch streams on etcd, and watches.
fn watch_streams(etcd: &EtcdServer) -> f64 {
    etcd.metric("etcd_debugging_mvcc_watch_stream_total")
        .unwrap()
}

fn watchers(etcd: &EtcdServer) -> f64 {
    etcd.metric("etcd_debugging_mvcc_watcher_total").unwrap()
}

/// Wait until `what` of etcd is `want`, for at most `within`.
async fn becomes(etcd: &EtcdServer, what: fn(&EtcdServer) -> f64, want: f64, within: Duration) {
    let started = Instant::now();
    while what(etcd) != want {
        assert!(
            started.elapsed() < within,
            "still {} after {within:?}, want {want}",
            what(etcd)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Watches share gRPC streams (up to 64 on one), created together or one by one, and each
/// gets its own events, and only them. Before, each watch opened a stream of its own: 300
/// watches, 300 streams (and 26 KB of client heap per held lock in `bench scale`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_share_streams_and_each_gets_its_own_events() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let store = connect(&[etcd.endpoint()]).await;
    let writer = connect(&[etcd.endpoint()]).await;
    const N: usize = 300;
    let key = |i: usize| {
        if i.is_multiple_of(2) {
            format!("mux/{i}")
        } else {
            format!("mux/{i}/x")
        }
    };
    let before = watch_streams(&etcd);
    // Half created at once, half one after the other.
    let mut watches = futures::future::try_join_all((0..N / 2).map(|i| {
        let store = store.clone();
        async move { store.watch(Watch::key(format!("mux/{}", 2 * i))).await }
    }))
    .await
    .unwrap();
    for i in 0..N / 2 {
        watches.push(
            store
                .watch(Watch::prefix(format!("mux/{}/", 2 * i + 1)))
                .await
                .unwrap(),
        );
    }
    let index = |n: usize| {
        if n < N / 2 {
            2 * n
        } else {
            2 * (n - N / 2) + 1
        }
    };
    let opened = watch_streams(&etcd) - before;
    eprintln!("{opened} streams for {N} watches");
    assert!(opened <= 7.0, "{opened} streams opened for {N} watches");
    assert_eq!(watchers(&etcd), N as f64);
    for i in 0..N {
        writer
            .put(key(i).as_bytes(), i.to_string().as_bytes(), 0)
            .await
            .unwrap();
    }
    for (n, watch) in watches.iter_mut().enumerate() {
        let batch = next(watch).await;
        assert_eq!(batch.events.len(), 1);
        assert_eq!(batch.events[0].kv.key, key(index(n)).into_bytes());
    }
    // Dropping a watch cancels it on the server; the others on its stream go on.
    let kept: Vec<(usize, WatchStream)> = watches
        .into_iter()
        .enumerate()
        .filter(|(n, _)| n.is_multiple_of(3))
        .collect();
    becomes(&etcd, watchers, kept.len() as f64, Duration::from_secs(5)).await;
    for (n, _) in &kept {
        writer
            .put(key(index(*n)).as_bytes(), b"again", 0)
            .await
            .unwrap();
    }
    for (n, mut watch) in kept {
        let batch = next(&mut watch).await;
        assert_eq!(batch.events.len(), 1, "watch {n}");
        assert_eq!(batch.events[0].kv.value, b"again");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), watch.next())
                .await
                .is_err(),
            "watch {n} got another's event"
        );
    }
    // All dropped: the streams close once idle for 10 s.
    becomes(&etcd, watchers, 0.0, Duration::from_secs(5)).await;
    becomes(&etcd, watch_streams, before, Duration::from_secs(20)).await;
    // And a new watch opens a stream again.
    let mut again = store.watch(Watch::key("mux/after")).await.unwrap();
    writer.put(b"mux/after", b"1", 0).await.unwrap();
    assert_eq!(next(&mut again).await.events[0].kv.value, b"1");
}

/// A watch whose creation is given up (its future dropped while etcd creates it) leaves no
/// watch on the server, and the stream it was asked on serves the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_watch_creations_leave_nothing_on_the_server() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let store = connect(&[etcd.endpoint()]).await;
    let mut kept = store.watch(Watch::key("kept")).await.unwrap();
    let mut created = 0;
    for i in 0..200u64 {
        let watch = store.watch(Watch::key(format!("abandoned/{i}")));
        if tokio::time::timeout(Duration::from_micros(50 * (i % 8)), watch)
            .await
            .is_ok()
        {
            created += 1;
        }
    }
    eprintln!("{created} of 200 created before their futures were dropped");
    becomes(&etcd, watchers, 1.0, Duration::from_secs(5)).await;
    store.put(b"kept", b"still", 0).await.unwrap();
    assert_eq!(next(&mut kept).await.events[0].kv.value, b"still");
}

/// A shared stream that breaks (etcd restarted) ends every watch on it, with an error or
/// an end, never silence; watches created afterwards get a new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_shared_stream_ends_every_watch_on_it() {
    if !require_etcd() {
        return;
    }
    let mut etcd = EtcdServer::start_async().await;
    let store = connect(&[etcd.endpoint()]).await;
    let mut watches = Vec::new();
    for i in 0..20 {
        watches.push(store.watch(Watch::key(format!("b/{i}"))).await.unwrap());
    }
    tokio::task::block_in_place(|| etcd.restart());
    for (i, watch) in watches.iter_mut().enumerate() {
        match tokio::time::timeout(Duration::from_secs(15), watch.next()).await {
            Ok(Some(Err(e))) => assert!(e.is_retryable(), "watch {i}: {e}"),
            Ok(None) => {}
            other => panic!("watch {i}: expected an error or an end, got {other:?}"),
        }
    }
    let (mut watch, _) = retry("after restart", Duration::from_secs(10), || async {
        store.watch(Watch::key("b/after")).await
    })
    .await;
    let (_, _) = retry("put", Duration::from_secs(10), || async {
        store.put(b"b/after", b"1", 0).await
    })
    .await;
    assert_eq!(next(&mut watch).await.events[0].kv.value, b"1");
}

/// With a member paused (SIGSTOP), watches are still created within the request timeout
/// and see events, whichever member carries the shared stream: a creation that gets no
/// reply on it retires the stream and opens another.
///
/// Each member is made a follower before it is paused: pausing the leader starts an
/// election, and a member with no leader refuses watch creations until it ends, which
/// under load took over 5 s once (a CI run) and is not what this test is about (see
/// `etcd_failures.rs` for elections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_created_past_a_paused_member() {
    if !require_etcd() {
        return;
    }
    let mut cluster = EtcdCluster::start_async(3).await;
    let store = connect(&cluster.endpoints()).await;
    let _first = store.watch(Watch::key("p/first")).await.unwrap();
    for paused in 0..3 {
        let writer = connect(&[cluster.member((paused + 1) % 3).endpoint()]).await;
        tokio::task::block_in_place(|| cluster.move_leader((paused + 1) % 3));
        cluster.member_mut(paused).stop();
        for i in 0..4 {
            let key = format!("p/{paused}/{i}");
            let started = Instant::now();
            let mut watch = store.watch(Watch::key(key.as_str())).await.unwrap();
            let took = started.elapsed();
            eprintln!("member {paused} paused: watch {i} created in {took:?}");
            assert!(took < Duration::from_secs(5), "{took:?}");
            // The paused member may have been the leader: a put waits for the election,
            // and a member without a leader ends its watch streams (require-leader): such a
            // watch fails with a retryable error, and is created again from the put.
            let (rev, _) = retry("put", Duration::from_secs(10), || async {
                writer.put(key.as_bytes(), b"seen", 0).await
            })
            .await;
            let batch = loop {
                match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
                    Ok(Some(Ok(batch))) => break batch,
                    Ok(Some(Err(e))) if e.is_retryable() => {
                        eprintln!("watch {i} failed ({e}); watching again from {rev}");
                        watch = retry("watch", Duration::from_secs(10), || {
                            store.watch(Watch::key(key.as_str()).from_revision(rev))
                        })
                        .await
                        .0;
                    }
                    other => panic!("watch {i}: expected a batch, got {other:?}"),
                }
            };
            assert_eq!(batch.events[0].kv.value, b"seen");
        }
        cluster.member_mut(paused).cont();
    }
}

/// The member that carries the client's one watch stream, made a follower (so that pausing
/// it starts no election), and another member, the leader.
fn carrier_made_follower(cluster: &EtcdCluster) -> (usize, usize) {
    let carrier = (0..3)
        .find(|&i| watch_streams(cluster.member(i)) == 1.0)
        .expect("one member carries the shared stream");
    let other = (carrier + 1) % 3;
    tokio::task::block_in_place(|| cluster.move_leader(other));
    (carrier, other)
}

/// With a member paused, requests go to the others: each request goes to the member with
/// the fewest requests unanswered, and a member that left one unanswered is passed over.
/// Before, etcd-client's channel picked a member at random for each request and each of
/// its hedged copies: a third of the writes waited out the request timeout and failed, and
/// a read failed when all its copies went to the paused member (1 in 81).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pass_over_a_paused_member() {
    if !require_etcd() {
        return;
    }
    let mut cluster = EtcdCluster::start_async(3).await;
    let store = connect(&cluster.endpoints()).await;
    let leader = tokio::task::block_in_place(|| cluster.wait_for_leader(Duration::from_secs(10)))
        .expect("a leader");
    let paused = (leader + 1) % 3;
    cluster.member_mut(paused).stop();
    let (mut slow_reads, mut failed_writes, mut slow_writes) = (0, 0, 0);
    for i in 0..200 {
        let started = Instant::now();
        store
            .range(Range::key(format!("p/{}", i % 7)))
            .await
            .unwrap_or_else(|e| panic!("read {i}: {e}"));
        if started.elapsed() > Duration::from_secs(1) {
            slow_reads += 1;
        }
    }
    for i in 0..30 {
        let started = Instant::now();
        if let Err(e) = store.put(format!("p/{i}").as_bytes(), b"v", 0).await {
            eprintln!("write {i} failed after {:?}: {e}", started.elapsed());
            failed_writes += 1;
        } else if started.elapsed() > Duration::from_secs(1) {
            slow_writes += 1;
        }
    }
    eprintln!(
        "a member paused: {slow_reads} of 200 reads slow, {failed_writes} of 30 writes \
         failed, {slow_writes} slow"
    );
    cluster.member_mut(paused).cont();
    // The first request after the pause may go to the paused member: one of each at most.
    assert!(slow_reads <= 1, "{slow_reads} slow reads");
    assert!(
        failed_writes + slow_writes <= 1,
        "{failed_writes} failed, {slow_writes} slow writes"
    );
}

/// A listener that never accepts, its queue full: a connect to it gets no answer (its SYN
/// is dropped, as by a powered-off host). Keep the returned sockets alive.
async fn unanswering_endpoint() -> (String, Vec<tokio::net::TcpStream>, tokio::net::TcpListener) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    // Fill the accept queue (backlog 0 takes one or two).
    for _ in 0..4 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => queued.push(s),
            _ => break,
        }
    }
    (format!("http://{addr}"), queued, listener)
}

/// A listed endpoint that does not answer TCP gets no request while a member is connected:
/// requests go to members whose connection is made, as with tonic's own balancer. The first
/// channel that spread requests by unanswered counts (9e413b5, reverted) sent them there
/// too: 6 of 20 puts took ~5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_does_not_answer_tcp_gets_no_requests() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let (dead, _queued, _listener) = unanswering_endpoint().await;
    // A long dial timeout: the connect must not wait for any share of it (a probe copy
    // sent to the dead endpoint first cost dial/16: 1.9 s here).
    let long_dial = EtcdOptions {
        dial_timeout: Duration::from_secs(30),
        ..options()
    };
    let started = Instant::now();
    let store = EtcdStore::connect(&[dead, etcd.endpoint()], long_dial)
        .await
        .unwrap();
    let took = started.elapsed();
    eprintln!("connected in {took:?}");
    assert!(took < Duration::from_secs(1), "connected in {took:?}");
    let (mut slow, mut failed) = (0, 0);
    for i in 0..60 {
        let started = Instant::now();
        let result = if i % 2 == 0 {
            store
                .put(format!("d/{i}").as_bytes(), b"v", 0)
                .await
                .map(drop)
        } else {
            store.range(Range::key("d/0")).await.map(drop)
        };
        match result {
            Err(e) => {
                eprintln!("request {i} failed after {:?}: {e}", started.elapsed());
                failed += 1;
            }
            Ok(()) if started.elapsed() > Duration::from_millis(500) => slow += 1,
            Ok(()) => {}
        }
    }
    assert_eq!((slow, failed), (0, 0), "slow, failed of 60 requests");
}

/// With an endpoint that does not answer TCP listed first, a store with credentials still
/// connects at once: a request waits for the first member connected, as with tonic's
/// balancer. Before (the first version of the store's channel), the unhedged authenticate
/// request went to the first endpoint while no member was connected, and the connect failed
/// after its dial timeout ("no member answered"), every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_connect_past_an_unanswering_first_endpoint() {
    if !require_etcd() {
        return;
    }
    let etcd = tokio::task::spawn_blocking(|| {
        let e = EtcdServer::start();
        e.enable_auth("root-pw-1", &[("app", "app-pw-1", "ok/")]);
        e
    })
    .await
    .unwrap();
    let (dead, _queued, _listener) = unanswering_endpoint().await;
    let with_user = EtcdOptions {
        credentials: Some(baton::Credentials::new("app", "app-pw-1")),
        ..options()
    };
    for round in 0..3 {
        let started = Instant::now();
        let store = EtcdStore::connect(&[dead.clone(), etcd.endpoint()], with_user.clone())
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e} after {:?}", started.elapsed()));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "round {round}: {took:?}");
        store.put(b"ok/x", b"v", 0).await.unwrap();
    }
}

/// A request made while the only member that answers restarts, with an endpoint that does
/// not answer TCP listed, goes to the member once it is back, not to the dead endpoint: no
/// member connected, it waits for the first one connected. Before (the first version of
/// the store's channel), it went to the dead endpoint, which was never passed over, and
/// waited out its connect timeout (put done 0.9-1.7 s after etcd was healthy again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_during_a_restart_waits_for_the_member_not_a_dead_endpoint() {
    if !require_etcd() {
        return;
    }
    let mut etcd = EtcdServer::start_async().await;
    let (dead, _queued, _listener) = unanswering_endpoint().await;
    let long_dial = EtcdOptions {
        dial_timeout: Duration::from_secs(8),
        request_timeout: Duration::from_secs(10),
        ..options()
    };
    let store = EtcdStore::connect(&[dead, etcd.endpoint()], long_dial)
        .await
        .unwrap();
    for i in 0..10 {
        store
            .put(format!("r/{i}").as_bytes(), b"v", 0)
            .await
            .unwrap();
    }
    for round in 0..2 {
        tokio::task::block_in_place(|| etcd.kill());
        let killed = Instant::now();
        let restarter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            etcd.restart();
            (etcd, Instant::now())
        });
        let put = store.put(b"r/x", b"v", 0).await;
        let done = Instant::now();
        let (back, healthy) = restarter.join().unwrap();
        etcd = back;
        let late = done.saturating_duration_since(healthy);
        eprintln!(
            "round {round}: etcd healthy {:?} after the kill; put {:?} {late:?} after that",
            healthy - killed,
            put.as_ref().map(drop)
        );
        // A put sent before the restart may fail (its connection reset); none may wait
        // for the dead endpoint's connect timeout.
        assert!(late < Duration::from_secs(1), "round {round}: {late:?}");
    }
}

/// With a member of three killed, requests are not drawn to it: it fails at once, so it is
/// never busy, and the first channel that spread requests by unanswered counts (9e413b5,
/// reverted) sent it more than its share (`bench distinct` ~350 ops/s against ~600). A
/// member whose request failed is passed over, and connected again in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_draws_no_requests() {
    if !require_etcd() {
        return;
    }
    let mut cluster = EtcdCluster::start_async(3).await;
    let store = connect(&cluster.endpoints()).await;
    let rate = |store: EtcdStore| async move {
        let started = Instant::now();
        let mut errors = 0;
        for i in 0..300 {
            let key = format!("k/{}", i % 10);
            if store.put(key.as_bytes(), b"v", 0).await.is_err() {
                errors += 1;
            }
        }
        (300.0 / started.elapsed().as_secs_f64(), errors)
    };
    let (before, _) = rate(store.clone()).await;
    let leader = tokio::task::block_in_place(|| cluster.wait_for_leader(Duration::from_secs(10)))
        .expect("a leader");
    tokio::task::block_in_place(|| cluster.kill((leader + 1) % 3));
    let (after, errors) = rate(store.clone()).await;
    eprintln!("puts/s: {before:.0} with 3 members, {after:.0} with one killed ({errors} errors)");
    assert_eq!(errors, 0);
    assert!(after > before * 0.6, "{after:.0}/s against {before:.0}/s");
}

/// Watches created together while the member that carries their shared stream is paused
/// open one new stream between them, not one each: the creations that find the stream
/// silent wait for the one opening a stream and join it. Before, each opened a stream of
/// its own (20 creations, 20 streams), each kept as long as its watch, so a pause undid the
/// sharing for every lock held through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creations_that_find_their_stream_silent_open_one_stream_between_them() {
    if !require_etcd() {
        return;
    }
    let mut cluster = EtcdCluster::start_async(3).await;
    let store = connect(&cluster.endpoints()).await;
    let _first = store.watch(Watch::key("s/first")).await.unwrap();
    let (carrier, other) = carrier_made_follower(&cluster);
    let before: f64 = (0..3)
        .filter(|&i| i != carrier)
        .map(|i| watch_streams(cluster.member(i)))
        .sum();
    cluster.member_mut(carrier).stop();
    const N: usize = 20;
    let started = Instant::now();
    let watches = futures::future::join_all(
        (0..N).map(|i| store.watch(Watch::key(format!("s/{i}").as_str()))),
    )
    .await;
    let took = started.elapsed();
    let mut watches: Vec<_> = watches.into_iter().map(|w| w.unwrap()).collect();
    let after: f64 = (0..3)
        .filter(|&i| i != carrier)
        .map(|i| watch_streams(cluster.member(i)))
        .sum();
    eprintln!("{N} watches created in {took:?}; streams on running members {before} -> {after}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(
        after - before <= 2.0,
        "{} new streams for {N} watches created together",
        after - before
    );
    let writer = connect(&[cluster.member(other).endpoint()]).await;
    for (i, watch) in watches.iter_mut().enumerate() {
        writer
            .put(format!("s/{i}").as_bytes(), b"seen", 0)
            .await
            .unwrap();
        assert_eq!(next(watch).await.events[0].kv.value, b"seen", "watch {i}");
    }
    cluster.member_mut(carrier).cont();
}

/// A watch whose shared stream sits on a member that goes silent ends with a retryable
/// error once a progress request on the stream goes unanswered (a second of quiet, then a
/// hedging share: ~2.5 s here), and watched again from the last revision it read, it gets
/// the events. Before, it heard nothing until the connection's keep-alive pings gave up
/// (~11 s): a holder was not told its key was deleted, a waiter not told of a release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_silent_member_ends_soon() {
    if !require_etcd() {
        return;
    }
    let mut cluster = EtcdCluster::start_async(3).await;
    let store = connect(&cluster.endpoints()).await;
    let (rev, mut watch) = store.watch_from_now(Watch::key("q/k")).await.unwrap();
    let (carrier, other) = carrier_made_follower(&cluster);
    cluster.member_mut(carrier).stop();
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_secs(8), watch.next()).await {
        Ok(Some(Err(e))) => assert!(e.is_retryable(), "{e}"),
        other => panic!(
            "expected a retryable error, got {other:?} after {:?}",
            started.elapsed()
        ),
    }
    let took = started.elapsed();
    eprintln!("the watch on the paused member ended after {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    let writer = connect(&[cluster.member(other).endpoint()]).await;
    writer.put(b"q/k", b"after", 0).await.unwrap();
    let mut watch = store
        .watch(Watch::key("q/k").from_revision(rev + 1))
        .await
        .unwrap();
    assert_eq!(next(&mut watch).await.events[0].kv.value, b"after");
    cluster.member_mut(carrier).cont();
}

/// A watch creation given up after etcd's reply reached it, but before its future was
/// polled again (a `select!` whose other branch won in the same wake-up, a timeout that
/// fired at that moment), must leave no watch on the server (the trait promises "a watch
/// whose creation is dropped is cancelled with it").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_dropped_after_its_reply_leaves_no_watcher() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let store = connect(&[etcd.endpoint()]).await;
    let streams_before = watch_streams(&etcd);
    let kept = store.watch(Watch::key("kept")).await.unwrap();
    let mut abandoned = 0;
    for i in 0..10 {
        let mut creating = store.watch(Watch::key(format!("leak/{i}")));
        // First poll: the create request goes out on the shared stream.
        if let std::task::Poll::Ready(r) = futures::poll!(&mut creating) {
            // Not the case under test (seen once under load, in a full-file run).
            eprintln!("watch {i} done at its first poll: {:?}", r.map(|_| ()));
            continue;
        }
        abandoned += 1;
        // etcd's reply comes meanwhile; the creator is not polled again, and gives up.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(creating);
    }
    let leaked = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        watchers(&etcd)
    }
    .await;
    eprintln!("watchers on the server after 3 s: {leaked} (want 1: the kept one)");
    assert!(
        abandoned >= 5,
        "only {abandoned} of 10 creations were pending at once"
    );
    assert_eq!(
        leaked, 1.0,
        "abandoned creations left watchers on the server"
    );
    drop(kept);
    becomes(&etcd, watchers, 0.0, Duration::from_secs(5)).await;
    becomes(
        &etcd,
        watch_streams,
        streams_before,
        Duration::from_secs(20),
    )
    .await;
}

/// A watch that etcd ends for compaction is cancelled on the server, which keeps it
/// registered until then (its stream lives on with the other watches on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_watches_are_cancelled_on_the_server() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let store = connect(&[etcd.endpoint()]).await;
    let _kept = store.watch(Watch::key("kept")).await.unwrap();
    let first = store.put(b"c/a", b"1", 0).await.unwrap();
    let last = store.put(b"c/a", b"2", 0).await.unwrap();
    store.compact(last).await.unwrap();
    for _ in 0..20 {
        let mut w = store
            .watch(Watch::key("c/a").from_revision(first))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
            Ok(Some(Err(Error::Compacted { .. }))) => {}
            other => panic!("expected Compacted, got {other:?}"),
        }
        drop(w);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = watchers(&etcd);
    eprintln!("watchers on the server: {n} (want 1: the kept one)");
    assert_eq!(n, 1.0, "compacted watches still registered on the server");
}

/// A multi-thread runtime of `workers` threads.
fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// A watch created on one runtime may join a stream first opened from another. When that
/// other runtime shuts down, the watch must not go silent (found by a review: the stream's
/// tasks ran there); it goes on, or ends so that its consumer watches again.
#[test]
fn a_watch_is_not_silenced_by_the_runtime_that_opened_its_stream() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start();
    let main = runtime(2);
    let store = main.block_on(connect(&[etcd.endpoint()]));
    // Another runtime (a helper component's, a test's) opens a watch first.
    let helper = runtime(1);
    let theirs = helper
        .block_on(store.watch(Watch::key("rt/theirs")))
        .unwrap();
    // The main runtime's watch joins the stream the helper's runtime serves.
    let mut mine = main.block_on(store.watch(Watch::key("rt/mine"))).unwrap();
    drop(theirs);
    drop(helper); // the helper's runtime shuts down
    main.block_on(async {
        store.put(b"rt/mine", b"1", 0).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(10), mine.next()).await {
            Ok(Some(Ok(batch))) => assert_eq!(batch.events[0].kv.value, b"1"),
            Ok(Some(Err(e))) => eprintln!("ended with an error (acceptable): {e}"),
            Ok(None) => eprintln!("ended (acceptable)"),
            Err(_) => panic!("the watch is silent 10 s after a put on its key"),
        }
    });
}

/// The same at the lock level: a holder on the main runtime whose loss watch joined a
/// stream another runtime opened is still told its key was deleted once that runtime is
/// gone.
#[test]
fn a_holder_is_told_of_a_delete_after_another_runtime_shut_down() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start();
    let main = runtime(2);
    let store = main.block_on(connect(&[etcd.endpoint()]));
    let client = baton::Client::from_store(store.clone());
    let helper = runtime(1);
    let theirs = helper
        .block_on(store.watch(Watch::key("rt/theirs")))
        .unwrap();
    main.block_on(async {
        let session = baton::Session::builder(&client).build().await.unwrap();
        let guard = baton::Mutex::new(&session, "rtlock")
            .unwrap()
            .lock()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(theirs);
        tokio::task::block_in_place(|| drop(helper));
        store
            .delete(baton::store::KeyRange::key(guard.key().as_bytes()))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(10), guard.lost()).await {
            Ok(_) => eprintln!("lost: {:?}", guard.lost_reason()),
            Err(_) => panic!(
                "holder not told within 10 s that its key was deleted (is_lost = {})",
                guard.is_lost()
            ),
        }
    });
}

/// A watch refused for lack of permission (its key outside the user's role: not the
/// stream's token) does not retire the shared stream it was asked on: the other watches
/// keep sharing one stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_watch_does_not_retire_the_shared_stream() {
    if !require_etcd() {
        return;
    }
    let etcd = tokio::task::spawn_blocking(|| {
        let etcd = EtcdServer::start();
        etcd.enable_auth("root-pw-1", &[("app", "app-pw-1", "ok/")]);
        etcd
    })
    .await
    .unwrap();
    let store = EtcdStore::connect(
        &[etcd.endpoint()],
        EtcdOptions {
            credentials: Some(baton::Credentials::new("app", "app-pw-1")),
            ..options()
        },
    )
    .await
    .unwrap();
    let before = watch_streams(&etcd);
    let mut held = Vec::new();
    for i in 0..10 {
        held.push(store.watch(Watch::key(format!("ok/{i}"))).await.unwrap());
        let Err(err) = store.watch(Watch::key(format!("denied/{i}"))).await else {
            panic!("watch on denied/ created");
        };
        assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    }
    let open = watch_streams(&etcd) - before;
    eprintln!("{open} streams open for 10 watches");
    assert!(open <= 2.0, "{open} streams for 10 watches");
}

/// Resident memory of this process, in MB.
fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024.0
}

/// `n` puts of 1 MB under `prefix`, by etcdctl (another process: none of our heap).
fn write_mb(etcd: &EtcdServer, prefix: &str, n: usize) {
    // One file per call: tests of this file run at once in one process.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let file = std::env::temp_dir().join(format!(
        "watch-value-{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&file, vec![b'x'; 1 << 20]).unwrap();
    for i in 0..n {
        let out = std::process::Command::new(baton_testkit::etcdctl_bin().unwrap())
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", etcd.endpoint()))
            .args(["put", &format!("{prefix}{i}")])
            .stdin(std::fs::File::open(&file).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_file(&file);
}

/// A watch that is not read (or read slowly) does not hold every reply etcd sends it in
/// client memory: past 16 MiB queued it ends with a retryable error (found by a review: +203
/// MB for 200 MB written). With a stream per watch, HTTP/2 flow control stopped etcd after
/// a window's worth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_watch_does_not_buffer_without_bound() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let store = connect(&[etcd.endpoint()]).await;
    let unread = store.watch(Watch::prefix("big/")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_mb();
    let e = &etcd;
    tokio::task::block_in_place(|| write_mb(e, "big/", 200));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mb();
    eprintln!(
        "RSS before {before:.1} MB, after 200 MB written to an unread watch {after:.1} MB (+{:.1} MB)",
        after - before
    );
    assert!(
        after - before < 50.0,
        "an unread watch grew the client by {:.1} MB",
        after - before
    );
    // The watch ends after what was queued, with a retryable error: its reader watches
    // again from the last revision it read.
    let mut unread = unread;
    let mut read = 0;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), unread.next()).await {
            Ok(Some(Ok(batch))) => read += batch.events.len(),
            other => break other,
        }
    };
    eprintln!("read {read} events, then {end:?}");
    assert!(
        matches!(&end, Ok(Some(Err(e))) if e.is_retryable()),
        "{end:?}"
    );
    assert!(read > 0 && read < 200, "{read} events read before the end");
}

/// A watch opened from a current-thread runtime that then idles (not shut down) does not
/// silence the watches that joined its stream from other runtimes: a lock holder is still
/// told its key was deleted (found by a review: the stream's tasks ran on that runtime).
#[test]
fn a_holder_is_told_of_a_delete_while_another_runtime_that_opened_the_stream_idles() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start();
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = main.block_on(connect(&[etcd.endpoint()]));
    let client = baton::Client::from_store(store.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let (end_tx, end_rx) = std::sync::mpsc::channel::<()>();
    let theirs_store = store.clone();
    let helper = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let theirs = rt.block_on(async {
            let w = theirs_store.watch(Watch::key("ct/theirs")).await.unwrap();
            ready_tx.send(()).unwrap();
            let _ = done_rx.await;
            w
        });
        // The runtime stays, idle (as a current-thread runtime between block_on calls).
        let _ = end_rx.recv();
        drop(theirs);
        drop(rt);
    });
    ready_rx.recv().unwrap();
    main.block_on(async {
        let session = baton::Session::builder(&client).build().await.unwrap();
        let guard = baton::Mutex::new(&session, "ctlock")
            .unwrap()
            .lock()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        done_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        store
            .delete(baton::store::KeyRange::key(guard.key().as_bytes()))
            .await
            .unwrap();
        let told = tokio::time::timeout(Duration::from_secs(10), guard.lost()).await;
        end_tx.send(()).unwrap();
        match told {
            Ok(_) => eprintln!("lost: {:?}", guard.lost_reason()),
            Err(_) => panic!(
                "holder not told within 10 s that its key was deleted (is_lost = {})",
                guard.is_lost()
            ),
        }
    });
    helper.join().unwrap();
}

/// An auth token that expired while a shared stream was open (its watch kept): the next
/// watch is refused on the shared stream, and must still be created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_after_the_token_expired_on_a_shared_stream_is_created() {
    if !require_etcd() {
        return;
    }
    let etcd = tokio::task::spawn_blocking(|| {
        let etcd = EtcdServer::start_with(
            baton_testkit::EtcdServerOptions::new().with_auth_token_ttl(Duration::from_secs(2)),
        );
        etcd.enable_auth("root-pw-1", &[("app", "app-pw-1", "ok/")]);
        etcd
    })
    .await
    .unwrap();
    let store = EtcdStore::connect(
        &[etcd.endpoint()],
        EtcdOptions {
            credentials: Some(baton::Credentials::new("app", "app-pw-1")),
            ..options()
        },
    )
    .await
    .unwrap();
    let mut kept = store.watch(Watch::key("ok/kept")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let streams = watch_streams(&etcd);
    let started = Instant::now();
    let second = store.watch(Watch::key("ok/second")).await;
    eprintln!(
        "second watch after expiry: {:?} in {:?}; streams {} -> {}; reauthentications {}",
        second.as_ref().err(),
        started.elapsed(),
        streams,
        watch_streams(&etcd),
        store.reauthentications()
    );
    let mut second = second.unwrap();
    store.put(b"ok/kept", b"1", 0).await.unwrap();
    store.put(b"ok/second", b"1", 0).await.unwrap();
    next(&mut kept).await;
    next(&mut second).await;
}

/// One watch on a key too large for etcd's request limit (2 MiB with the default
/// --max-request-bytes) fails: etcd ends the gRPC stream it was sent on. Other watches,
/// and lock holders, of the same client are not ended with it (found by a review: they got
/// a non-retryable "request is too large").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_large_watch_key_does_not_end_the_other_watches() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let store = connect(&[etcd.endpoint()]).await;
    let client = baton::Client::from_store(store.clone());
    let session = baton::Session::builder(&client).build().await.unwrap();
    let guard = baton::Mutex::new(&session, "hugelock")
        .unwrap()
        .lock()
        .await
        .unwrap();
    let waiter_session = baton::Session::builder(&client).build().await.unwrap();
    let waiter_lock = baton::Mutex::new(&waiter_session, "hugelock").unwrap();
    let waiting = tokio::spawn(async move { waiter_lock.lock().await.map(|g| g.fencing_token()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut kept = store.watch(Watch::key("kept")).await.unwrap();
    let huge = store.watch(Watch::key(vec![b'k'; 3 << 20])).await;
    eprintln!("the huge watch: {:?}", huge.as_ref().err());
    store.put(b"kept", b"1", 0).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), kept.next()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "the other watch got: {got:?}; lock holder lost: {} ({:?})",
        guard.is_lost(),
        guard.lost_reason()
    );
    assert!(!waiting.is_finished(), "waiter: {:?}", waiting.await);
    assert!(
        matches!(got, Ok(Some(Ok(_)))),
        "the other watch got {got:?}"
    );
    assert!(!guard.is_lost(), "lock lost: {:?}", guard.lost_reason());
}

/// A watch ended for falling behind catches up when created again from the last revision
/// read, even when etcd's catch-up reply alone is over the 16 MiB bound (found by a
/// review: every later attempt was ended before reading anything, for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_fell_behind_catches_up() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let store = connect(&[etcd.endpoint()]).await;
    let start = store.put(b"mark", b"1", 0).await.unwrap();
    let mut watch = store.watch(Watch::prefix("big/")).await.unwrap();
    let e = &etcd;
    tokio::task::block_in_place(|| write_mb(e, "big/", 40));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut last, mut read) = (start, 0);
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
            Ok(Some(Ok(b))) => {
                for ev in &b.events {
                    last = last.max(ev.kv.mod_revision);
                    read += 1;
                }
            }
            other => break other,
        }
    };
    eprintln!("first watch: read {read} events (up to revision {last}), then {end:?}");
    assert!(
        matches!(&end, Ok(Some(Err(e))) if e.is_retryable()),
        "{end:?}"
    );
    let mut progress = Vec::new();
    for attempt in 0..5 {
        let mut again = store
            .watch(Watch::prefix("big/").from_revision(last + 1))
            .await
            .unwrap();
        let mut got = 0;
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(5), again.next()).await {
                Ok(Some(Ok(b))) => {
                    for ev in &b.events {
                        last = last.max(ev.kv.mod_revision);
                        got += 1;
                    }
                    if read + got >= 40 {
                        break None;
                    }
                }
                other => break Some(other),
            }
        };
        eprintln!("attempt {attempt}: {got} events read, then {end:?}");
        progress.push(got);
        read += got;
        if end.is_none() {
            break;
        }
    }
    assert!(
        read >= 40,
        "never caught up: events read per attempt after falling behind: {progress:?}"
    );
}

/// One revision whose reply alone is over the 16 MiB bound (a prefix of 20 MB deleted,
/// watched with previous values) is delivered, not ended again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reply_over_the_queue_bound_is_delivered() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let store = connect(&[etcd.endpoint()]).await;
    let e = &etcd;
    tokio::task::block_in_place(|| write_mb(e, "big/", 20));
    let from = store.put(b"mark", b"1", 0).await.unwrap() + 1;
    let mut w = store
        .watch(Watch::prefix("big/").with_prev_kv().from_revision(from))
        .await
        .unwrap();
    store.delete(KeyRange::prefix("big/")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Ok(batch))) => assert_eq!(batch.events.len(), 20),
        other => panic!("the delete was not delivered: {other:?}"),
    }
}

/// A transaction of compares only is linearizable: sent to a follower right after a write
/// through the leader, it sees the write. etcd 3.4 serves a transaction with no operation
/// as a serializable read (`isTxnSerializable` is true for no operations), from the
/// member's own state, which may not have applied the write yet: a user's "do I still hold
/// it" check (`Txn::new().when(guard.ownership_compares())`) could pass on a stale member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_of_compares_only_is_linearizable() {
    if !require_etcd() {
        return;
    }
    let cluster = EtcdCluster::start_async(3).await;
    let leader = tokio::task::block_in_place(|| cluster.wait_for_leader(Duration::from_secs(10)))
        .expect("a leader");
    let writer = connect(&[cluster.member(leader).endpoint()]).await;
    let follower = connect(&[cluster.member((leader + 1) % 3).endpoint()]).await;
    let mut stale = 0;
    for i in 0..300u32 {
        let value = i.to_string();
        writer.put(b"lin/k", value.as_bytes(), 0).await.unwrap();
        let resp = follower
            .txn(Txn {
                compares: vec![Compare::value(
                    "lin/k",
                    CompareOp::Equal,
                    value.as_bytes().to_vec(),
                )],
                success: vec![],
                failure: vec![],
            })
            .await
            .unwrap();
        assert!(resp.responses.is_empty());
        if !resp.succeeded {
            stale += 1;
        }
    }
    assert_eq!(
        stale, 0,
        "compares-only transactions that missed the write before them"
    );
}
