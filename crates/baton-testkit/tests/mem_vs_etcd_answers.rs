//! The same operations (about 120: revisions, ranges, transactions, leases, watches,
//! compaction) on the embedded store and on a real etcd 3.4, directly and through a
//! namespace: every answer must agree (from the second review of the store layer).

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use baton::store::etcd::{EtcdOptions, EtcdStore};
use baton::store::mem::MemStore;
use baton::store::namespace::NamespaceStore;
use baton::store::{
    Compare, CompareOp, KeyRange, Range, Revision, SortOrder, SortTarget, Store, Txn, TxnOp,
    TxnOpResponse, Watch, WatchStream,
};
use baton::Error;
use baton_testkit::EtcdServer;
use futures::StreamExt;

async fn etcd_store(server: &EtcdServer) -> EtcdStore {
    EtcdStore::connect(&[server.endpoint()], EtcdOptions::default())
        .await
        .unwrap()
}

fn outcome<T: std::fmt::Debug>(r: baton::Result<T>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e @ Error::InvalidArgument(_)) => {
            let m = e.to_string();
            let kind = [
                "duplicate key",
                "too large",
                "too many",
                "must be positive",
                "future",
                "empty",
                "not provided",
            ]
            .into_iter()
            .find(|k| m.contains(k))
            .unwrap_or(&m);
            let kind = if kind == "not provided" {
                "empty"
            } else {
                kind
            };
            format!("invalid: {kind}")
        }
        Err(Error::Compacted {
            requested,
            compact_revision,
        }) => format!("compacted {requested} (at {compact_revision})"),
        Err(Error::LeaseNotFound(_)) => "lease not found".into(),
        Err(e) => format!("{e:?}"),
    }
}

async fn batches(w: &mut WatchStream, base: Revision) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(Some(b)) = tokio::time::timeout(Duration::from_millis(700), w.next()).await {
        let b = match b {
            Ok(b) => b,
            Err(e) => {
                out.push(format!("error {}", outcome::<()>(Err(e))));
                continue;
            }
        };
        let events: Vec<String> = b
            .events
            .iter()
            .map(|e| {
                let prev = e.prev_kv.as_ref().map(|p| {
                    (
                        p.key_str().into_owned(),
                        p.value_str().into_owned(),
                        p.mod_revision - base,
                    )
                });
                let rev = e.kv.mod_revision - base;
                format!(
                    "{:?} {:?}={:?}@{rev} c{} v{} prev {prev:?}",
                    e.kind,
                    e.kv.key_str(),
                    e.kv.value_str(),
                    if e.kv.create_revision == 0 {
                        0
                    } else {
                        e.kv.create_revision - base
                    },
                    e.kv.version
                )
            })
            .collect();
        out.push(format!("header {}: {events:?}", b.header_revision - base));
    }
    out
}

fn kvs(kvs: &[baton::store::KeyValue], base: Revision) -> String {
    kvs.iter()
        .map(|kv| {
            format!(
                "{}={}(c{} m{} v{} l{})",
                kv.key_str(),
                kv.value_str(),
                kv.create_revision - base,
                kv.mod_revision - base,
                kv.version,
                (kv.lease != 0) as u8
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

async fn range(s: &dyn Store, r: Range, base: Revision) -> String {
    match s.range(r).await {
        Ok(resp) => format!(
            "h{} [{}] more={}",
            resp.header_revision - base,
            kvs(&resp.kvs, base),
            resp.more
        ),
        Err(e) => outcome::<()>(Err(e)),
    }
}

async fn txn(s: &dyn Store, t: Txn, base: Revision) -> String {
    match s.txn(t).await {
        Ok(resp) => {
            let rs: Vec<String> = resp
                .responses
                .iter()
                .map(|r| match r {
                    TxnOpResponse::Put => "put".to_string(),
                    TxnOpResponse::Delete { deleted } => format!("del {deleted}"),
                    TxnOpResponse::Get(g) => format!(
                        "get h{} [{}] more={}",
                        g.header_revision - base,
                        kvs(&g.kvs, base),
                        g.more
                    ),
                })
                .collect();
            format!("{} h{} {rs:?}", resp.succeeded, resp.header_revision - base)
        }
        Err(e) => outcome::<()>(Err(e)),
    }
}

/// The operations, logged relative to the first revision read.
async fn probe(s: &dyn Store) -> Vec<String> {
    let mut log = Vec::new();
    let base = s.range(Range::key("x")).await.unwrap().header_revision;
    macro_rules! note {
        ($what:expr, $v:expr) => {{
            log.push(format!("{}: {}", $what, $v));
        }};
    }

    // revisions
    let t = Txn::new().and_then([
        TxnOp::put("r/a", "1", 0),
        TxnOp::put("r/b", "1", 0),
        TxnOp::put("r/c", "1", 0),
    ]);
    note!("txn of 3 puts", txn(s, t, base).await);
    let t = Txn::new()
        .when([Compare::version("r/a", CompareOp::Equal, 0)])
        .and_then([TxnOp::put("r/a", "x", 0)]);
    note!("failed txn", txn(s, t, base).await);
    note!(
        "delete missing",
        outcome(
            s.delete(KeyRange::key("r/zz"))
                .await
                .map(|(n, r)| (n, r - base))
        )
    );
    note!(
        "delete prefix missing",
        outcome(
            s.delete(KeyRange::prefix("r/zz"))
                .await
                .map(|(n, r)| (n, r - base))
        )
    );
    s.delete(KeyRange::key("r/b")).await.unwrap();
    s.put(b"r/b", b"2", 0).await.unwrap();
    s.put(b"r/b", b"3", 0).await.unwrap();
    note!("recreated", range(s, Range::prefix("r/"), base).await);

    // sorting and limits
    for (k, v) in [
        ("s/c", "1"),
        ("s/a", "2"),
        ("s/e", "3"),
        ("s/b", "4"),
        ("s/d", "5"),
    ] {
        s.put(k.as_bytes(), v.as_bytes(), 0).await.unwrap();
    }
    s.put(b"s/a", b"6", 0).await.unwrap();
    let t = Txn::new().and_then([TxnOp::put("s/f", "7", 0), TxnOp::put("s/0", "7", 0)]);
    s.txn(t).await.unwrap();
    for target in [
        SortTarget::Key,
        SortTarget::CreateRevision,
        SortTarget::ModRevision,
    ] {
        for order in [SortOrder::Ascending, SortOrder::Descending] {
            for limit in [0, 1, 2, 7, 8] {
                let r = Range::prefix("s/").sort_by(target, order).with_limit(limit);
                note!(
                    format!("sort {target:?} {order:?} limit {limit}"),
                    range(s, r, base).await
                );
            }
        }
    }
    note!(
        "limit 3",
        range(s, Range::prefix("s/").with_limit(3), base).await
    );
    note!(
        "limit 7",
        range(s, Range::prefix("s/").with_limit(7), base).await
    );
    note!(
        "limit -1",
        range(s, Range::prefix("s/").with_limit(-1), base).await
    );
    note!(
        "keys only",
        range(s, Range::prefix("s/").keys_only().with_limit(2), base).await
    );
    let cur = s.range(Range::key("x")).await.unwrap().header_revision;
    note!(
        "max mod + limit",
        range(
            s,
            Range::prefix("s/")
                .with_max_mod_revision(cur - 3)
                .with_limit(2),
            base
        )
        .await
    );
    note!(
        "max create + sort desc + limit",
        range(
            s,
            Range::prefix("s/")
                .with_max_create_revision(cur - 3)
                .sort_by(SortTarget::ModRevision, SortOrder::Descending)
                .with_limit(2),
            base
        )
        .await
    );
    note!(
        "at revision + limit",
        range(
            s,
            Range::prefix("s/").at_revision(cur - 2).with_limit(2),
            base
        )
        .await
    );
    note!(
        "future rev",
        range(s, Range::key("s/a").at_revision(cur + 1), base).await
    );
    note!("empty key", range(s, Range::key(""), base).await);

    // txn checks
    let dup = |ops: Vec<TxnOp>| Txn::new().and_then(ops);
    note!(
        "dup put",
        txn(
            s,
            dup(vec![TxnOp::put("d/a", "1", 0), TxnOp::put("d/a", "2", 0)]),
            base
        )
        .await
    );
    note!(
        "put+del",
        txn(
            s,
            dup(vec![TxnOp::put("d/a", "1", 0), TxnOp::delete("d/a")]),
            base
        )
        .await
    );
    note!(
        "del+put",
        txn(
            s,
            dup(vec![TxnOp::delete("d/a"), TxnOp::put("d/a", "1", 0)]),
            base
        )
        .await
    );
    note!(
        "del+del",
        txn(
            s,
            dup(vec![TxnOp::delete("d/a"), TxnOp::delete("d/a")]),
            base
        )
        .await
    );
    note!(
        "put+delprefix",
        txn(
            s,
            dup(vec![
                TxnOp::put("d/a", "1", 0),
                TxnOp::Delete(KeyRange::prefix("d/"))
            ]),
            base
        )
        .await
    );
    note!(
        "dup in failure branch, success taken",
        txn(
            s,
            Txn::new()
                .and_then([TxnOp::put("d/b", "1", 0)])
                .or_else([TxnOp::put("d/c", "1", 0), TxnOp::put("d/c", "1", 0)]),
            base
        )
        .await
    );
    let many = |n: usize| {
        (0..n)
            .map(|i| TxnOp::put(format!("m/{i}"), "", 0))
            .collect::<Vec<_>>()
    };
    note!("128 ops", !txn(s, dup(many(128)), base).await.is_empty());
    note!("129 ops", txn(s, dup(many(129)), base).await);
    let cmps = |n: usize| {
        (0..n)
            .map(|i| Compare::version(format!("m/{i}"), CompareOp::Equal, 1))
            .collect::<Vec<_>>()
    };
    note!(
        "129 compares",
        txn(s, Txn::new().when(cmps(129)), base).await
    );
    note!(
        "128 compares",
        txn(s, Txn::new().when(cmps(128)), base).await
    );
    note!(
        "value compare missing !=",
        txn(
            s,
            Txn::new().when([Compare::value("nope", CompareOp::NotEqual, "x")]),
            base
        )
        .await
    );
    note!(
        "lease compare missing == 0",
        txn(
            s,
            Txn::new().when([Compare::lease("nope", CompareOp::Equal, 0)]),
            base
        )
        .await
    );
    // gets inside a write txn
    let cur = s.range(Range::key("x")).await.unwrap().header_revision;
    note!(
        "gets around a put",
        txn(
            s,
            Txn::new().and_then([
                TxnOp::get(Range::key("g/a")),
                TxnOp::put("g/a", "1", 0),
                TxnOp::get(Range::key("g/a")),
                TxnOp::get(Range::key("g/a").at_revision(cur)),
                TxnOp::Delete(KeyRange::key("g/none")),
                TxnOp::get(Range::prefix("g/").with_limit(1)),
            ]),
            base
        )
        .await
    );
    note!(
        "get at next revision in txn",
        txn(
            s,
            Txn::new().and_then([
                TxnOp::put("g/b", "1", 0),
                TxnOp::get(Range::key("g/a").at_revision(cur + 2))
            ]),
            base
        )
        .await
    );
    note!(
        "empty key in txn get",
        txn(s, Txn::new().and_then([TxnOp::get(Range::key(""))]), base).await
    );
    note!(
        "empty key in failure branch",
        txn(s, Txn::new().or_else([TxnOp::get(Range::key(""))]), base).await
    );

    // leases
    note!(
        "put missing lease",
        outcome(s.put(b"l/x", b"", 0x1234).await.map(drop))
    );
    note!(
        "txn put missing lease",
        txn(
            s,
            Txn::new().and_then([TxnOp::put("l/x", "", 0x1234)]),
            base
        )
        .await
    );
    note!(
        "txn put missing lease, other branch",
        txn(
            s,
            Txn::new()
                .and_then([TxnOp::put("l/y", "", 0)])
                .or_else([TxnOp::put("l/x", "", 0x1234)]),
            base
        )
        .await
    );
    let lease = s.lease_grant(Duration::from_secs(30)).await.unwrap();
    let (_, mut w) = s
        .watch_from_now(Watch::prefix("l/").with_prev_kv())
        .await
        .unwrap();
    s.txn(Txn::new().and_then([
        TxnOp::put("l/a", "1", lease.id),
        TxnOp::put("l/b", "1", lease.id),
    ]))
    .await
    .unwrap();
    s.put(b"l/c", b"1", lease.id).await.unwrap();
    s.put(b"l/c", b"2", 0).await.unwrap(); // detached
    s.put(b"l/d", b"1", lease.id).await.unwrap();
    s.delete(KeyRange::key("l/d")).await.unwrap();
    s.put(b"l/d", b"2", 0).await.unwrap(); // a new key, no lease
    note!("revoke", outcome(s.lease_revoke(lease.id).await));
    note!("after revoke", range(s, Range::prefix("l/"), base).await);
    log.extend(batches(&mut w, base).await);
    note!(
        "ttl after revoke",
        outcome(s.lease_time_to_live(lease.id).await)
    );
    note!(
        "keep-alive after revoke",
        outcome(s.lease_keep_alive(lease.id).await)
    );
    note!("revoke again", outcome(s.lease_revoke(lease.id).await));
    let empty = s.lease_grant(Duration::from_secs(30)).await.unwrap();
    let before = s.range(Range::key("x")).await.unwrap().header_revision;
    s.lease_revoke(empty.id).await.unwrap();
    let after = s.range(Range::key("x")).await.unwrap().header_revision;
    note!("revoke of a lease without keys bumps", after - before);

    // expiry
    let short = s.lease_grant(Duration::from_secs(1)).await.unwrap();
    note!("granted ttl for 1s", short.ttl.as_secs());
    let (_, mut w) = s
        .watch_from_now(Watch::prefix("e/").with_prev_kv())
        .await
        .unwrap();
    s.txn(Txn::new().and_then([
        TxnOp::put("e/a", "1", short.id),
        TxnOp::put("e/b", "1", short.id),
    ]))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    note!("after expiry", range(s, Range::prefix("e/"), base).await);
    log.extend(batches(&mut w, base).await);
    note!(
        "ttl of expired",
        outcome(s.lease_time_to_live(short.id).await)
    );
    note!(
        "keep-alive of expired",
        outcome(s.lease_keep_alive(short.id).await)
    );
    note!("revoke of expired", outcome(s.lease_revoke(short.id).await));

    // watches and compaction
    let c1 = s.put(b"w/a", b"1", 0).await.unwrap();
    let c2 = s.put(b"w/a", b"2", 0).await.unwrap();
    s.delete(KeyRange::key("w/a")).await.unwrap();
    let c4 = s.put(b"w/a", b"3", 0).await.unwrap();
    let mut w = s
        .watch(Watch::key("w/a").from_revision(c1).with_prev_kv())
        .await
        .unwrap();
    log.extend(batches(&mut w, base).await);
    drop(w);
    let mut w = s
        .watch(
            Watch::prefix("w/")
                .from_revision(c1)
                .deletes_only()
                .with_prev_kv(),
        )
        .await
        .unwrap();
    log.extend(batches(&mut w, base).await);
    drop(w);
    note!("compact", outcome(s.compact(c2).await));
    tokio::time::sleep(Duration::from_secs(1)).await;
    note!(
        "compact again",
        outcome(s.compact(c2).await.map_err(|e| match e {
            Error::Compacted {
                requested,
                compact_revision,
            } => Error::Compacted {
                requested: requested - base,
                compact_revision: compact_revision - base
            },
            e => e,
        }))
    );
    let cur = s.range(Range::key("x")).await.unwrap().header_revision;
    note!("compact future", outcome(s.compact(cur + 5).await));
    let mut w = s.watch(Watch::key("w/a").from_revision(c1)).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(3), w.next()).await {
        Ok(Some(Err(Error::Compacted {
            requested,
            compact_revision,
        }))) => {
            note!(
                "watch compacted",
                format!("{} at {}", requested - base, compact_revision - base)
            )
        }
        other => note!("watch compacted", format!("{other:?}")),
    }
    let mut w = s
        .watch(Watch::key("w/a").from_revision(c2).with_prev_kv())
        .await
        .unwrap();
    log.extend(batches(&mut w, base).await);
    match s.range(Range::key("w/a").at_revision(c1)).await {
        Err(Error::Compacted {
            requested,
            compact_revision,
        }) => {
            note!(
                "read compacted",
                format!("{} at {}", requested - base, compact_revision - base)
            )
        }
        other => note!("read compacted", format!("{other:?}")),
    }
    note!(
        "read at compact rev",
        range(s, Range::key("w/a").at_revision(c2), base).await
    );
    note!(
        "read at c4-1",
        range(s, Range::key("w/a").at_revision(c4 - 1), base).await
    );

    // a future start revision
    let cur = s.range(Range::key("x")).await.unwrap().header_revision;
    let mut w = s
        .watch(Watch::prefix("f/").from_revision(cur + 2))
        .await
        .unwrap();
    s.put(b"f/a", b"1", 0).await.unwrap();
    s.put(b"f/a", b"2", 0).await.unwrap();
    s.put(b"f/a", b"3", 0).await.unwrap();
    log.extend(batches(&mut w, base).await);

    // more
    let l2 = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    note!("grant 2s", l2.ttl.as_secs());
    note!("ttl 2s", outcome(s.lease_time_to_live(l2.id).await));
    note!("keep-alive 2s", outcome(s.lease_keep_alive(l2.id).await));
    note!(
        "grant 0s",
        s.lease_grant(Duration::ZERO).await.unwrap().ttl.as_secs()
    );
    note!(
        "grant huge",
        outcome(
            s.lease_grant(Duration::from_secs(9_000_000_001))
                .await
                .map(|g| g.ttl)
        )
    );
    note!(
        "grant max",
        outcome(
            s.lease_grant(Duration::from_secs(9_000_000_000))
                .await
                .map(|g| g.ttl)
        )
    );
    s.put(b"\xff", b"1", 0).await.unwrap();
    s.put(b"\xff\xff", b"2", 0).await.unwrap();
    s.put(b"\xfe\xff", b"3", 0).await.unwrap();
    note!(
        "prefix ff",
        range(s, Range::prefix(b"\xff".to_vec()), base).await
    );
    note!(
        "prefix fe ff",
        range(s, Range::prefix(b"\xfe\xff".to_vec()), base).await
    );
    note!(
        "delete prefix ff",
        outcome(
            s.delete(KeyRange::prefix(b"\xff".to_vec()))
                .await
                .map(|(n, _)| n)
        )
    );
    for op in [
        CompareOp::Greater,
        CompareOp::Less,
        CompareOp::Equal,
        CompareOp::NotEqual,
    ] {
        note!(
            format!("value {op:?}"),
            txn(
                s,
                Txn::new().when([Compare::value(b"\xfe\xff".to_vec(), op, "2")]),
                base
            )
            .await
        );
        note!(
            format!("version missing {op:?}"),
            txn(
                s,
                Txn::new().when([Compare::version("w/none", op, 0)]),
                base
            )
            .await
        );
    }
    let (_, mut w) = s
        .watch_from_now(Watch::prefix("k/").deletes_only().with_prev_kv())
        .await
        .unwrap();
    s.put(b"k/a", b"1", 0).await.unwrap();
    s.txn(Txn::new().and_then([TxnOp::put("k/b", "1", 0), TxnOp::delete("k/a")]))
        .await
        .unwrap();
    log.extend(batches(&mut w, base).await);
    note!(
        "sorted get in write txn",
        txn(
            s,
            Txn::new().and_then([
                TxnOp::put("k/c", "1", 0),
                TxnOp::get(
                    Range::prefix("k/")
                        .sort_by(SortTarget::ModRevision, SortOrder::Descending)
                        .with_limit(1)
                ),
                TxnOp::get(Range::prefix("k/").last_created()),
                TxnOp::Delete(KeyRange::prefix("k/b")),
                TxnOp::get(Range::prefix("k/").keys_only()),
            ]),
            base
        )
        .await
    );

    log
}

fn diff(a: &[String], b: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i), b.get(i));
        if x != y {
            out.push(format!("#{i}\n  etcd: {x:?}\n  mem:  {y:?}"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_answers_as_etcd() {
    let server = EtcdServer::start_async().await;
    let etcd = etcd_store(&server).await;
    let mem = MemStore::new();
    let (e, m) = tokio::join!(probe(&etcd), probe(&mem));
    for l in &e {
        eprintln!("{l}");
    }
    let d = diff(&e, &m);
    assert!(d.is_empty(), "differences:\n{}", d.join("\n"));
}

/// The same, each through a namespace, with keys outside it that must not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_mem_answers_as_namespaced_etcd() {
    let server = EtcdServer::start_async().await;
    let etcd: Arc<dyn Store> = Arc::new(etcd_store(&server).await);
    let mem: Arc<dyn Store> = Arc::new(MemStore::new());
    let outside: [&[u8]; 6] = [b"m", b"n", b"n0", b"n/", b"o", b"\xff\xff"];
    let mut logs = Vec::new();
    for inner in [etcd, mem] {
        for k in outside {
            inner.put(k, b"outside", 0).await.unwrap();
        }
        let before = inner.range(Range::prefix("")).await.unwrap().kvs;
        let ns = NamespaceStore::new(inner.clone(), "n/");
        let log = probe(&ns).await;
        let after = inner.range(Range::prefix("")).await.unwrap().kvs;
        for kv in before {
            assert!(after.contains(&kv), "{:?} changed", kv.key_str());
        }
        for l in &log {
            assert!(!l.contains("n/"), "a key with the namespace: {l}");
        }
        logs.push(log);
    }
    let d = diff(&logs[0], &logs[1]);
    assert!(d.is_empty(), "differences:\n{}", d.join("\n"));
}

/// etcd watches `"\0"` (its smallest key) for a watch of the empty key
/// (`v3rpc/watch.go`: "\x00 is the smallest key"); the embedded store watched `""`, which
/// no key can be, and heard nothing (found by review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_watches_the_empty_key_as_etcd() {
    let server = EtcdServer::start_async().await;
    let etcd = etcd_store(&server).await;
    let mem = MemStore::new();
    let mut heard = Vec::new();
    for s in [&etcd as &dyn Store, &mem] {
        let mut w = s.watch(Watch::key("")).await.unwrap();
        s.put(b"\0", b"zero", 0).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), w.next()).await;
        heard.push(match got {
            Ok(Some(Ok(b))) => format!(
                "{:?}",
                b.events
                    .iter()
                    .map(|e| e.kv.key.clone())
                    .collect::<Vec<_>>()
            ),
            other => format!("nothing ({})", other.is_err()),
        });
    }
    assert_eq!(heard[1], heard[0], "mem (left) vs etcd (right)");
}

/// Transactions wrong in two or three ways at once (entry 100's second look): the same
/// error as etcd in every order of the faults, in either branch.
async fn two_faults(s: &dyn Store) -> Vec<String> {
    let mut log = Vec::new();
    for i in 0..5 {
        s.put(format!("tf/{i}").as_bytes(), b"v", 0).await.unwrap();
    }
    let now = s.range(Range::key("x")).await.unwrap().header_revision;
    s.compact(now - 2).await.unwrap();
    let base = now;
    let compacted = || TxnOp::get(Range::key("tf/0").at_revision(now - 4));
    let future = || TxnOp::get(Range::key("tf/0").at_revision(now + 100));
    let past = || TxnOp::get(Range::key("tf/0").at_revision(now - 1));
    let unknown = |k: &str| TxnOp::put(k, "", 0x7777);
    let cases: Vec<(&str, Vec<TxnOp>)> = vec![
        ("future, lease", vec![future(), unknown("tf/a")]),
        ("lease, future", vec![unknown("tf/a"), future()]),
        ("compacted, lease", vec![compacted(), unknown("tf/a")]),
        ("lease, compacted", vec![unknown("tf/a"), compacted()]),
        ("compacted, future", vec![compacted(), future()]),
        ("future, compacted", vec![future(), compacted()]),
        ("past ok, lease", vec![past(), unknown("tf/a")]),
        (
            "del, future, lease",
            vec![TxnOp::delete("tf/1"), future(), unknown("tf/b")],
        ),
        (
            "dup key, lease",
            vec![unknown("tf/a"), TxnOp::put("tf/a", "", 0)],
        ),
        (
            "dup key, future",
            vec![
                TxnOp::put("tf/a", "", 0),
                future(),
                TxnOp::put("tf/a", "", 0),
            ],
        ),
        (
            "empty key, lease",
            vec![TxnOp::put("", "", 0), unknown("tf/a")],
        ),
        (
            "lease, empty key",
            vec![unknown("tf/a"), TxnOp::put("", "", 0)],
        ),
        ("future, empty key", vec![future(), TxnOp::put("", "", 0)]),
        (
            "del dup put, lease",
            vec![TxnOp::delete("tf/2"), TxnOp::put("tf/2", "", 0x7777)],
        ),
    ];
    for (what, ops) in cases {
        let taken = txn(s, Txn::new().and_then(ops.clone()), base).await;
        log.push(format!("{what} (taken): {taken}"));
        // In the branch not taken, and in the failure branch when it is taken.
        let other = txn(
            s,
            Txn::new()
                .when([Compare::value(
                    b"tf/3".to_vec(),
                    CompareOp::Equal,
                    b"v".to_vec(),
                )])
                .or_else(ops.clone()),
            base,
        )
        .await;
        log.push(format!("{what} (not taken): {other}"));
        let failure = txn(
            s,
            Txn::new()
                .when([Compare::value(
                    b"tf/3".to_vec(),
                    CompareOp::Equal,
                    b"w".to_vec(),
                )])
                .or_else(ops),
            base,
        )
        .await;
        log.push(format!("{what} (failure branch): {failure}"));
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_fails_two_fault_txns_as_etcd() {
    let server = EtcdServer::start_async().await;
    let etcd = etcd_store(&server).await;
    let mem = MemStore::new();
    let (e, m) = tokio::join!(two_faults(&etcd), two_faults(&mem));
    for l in &e {
        eprintln!("{l}");
    }
    let d = diff(&e, &m);
    assert!(d.is_empty(), "differences:\n{}", d.join("\n"));
}
