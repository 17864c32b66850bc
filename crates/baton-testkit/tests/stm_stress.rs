//! `Stm` under stress at every isolation level, on the embedded store, a real etcd and a
//! 3-member cluster (lost updates, write skew, deletes, prefetch), a snapshot compacted on
//! etcd, a commit cut short, and an error from a state that never existed.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton::store::Range;
use baton::{Client, Error, Isolation, Stm};
use baton_testkit::bank::{number, Rng};
use baton_testkit::{EtcdCluster, EtcdServer};

const SAFE: [Isolation; 3] = [
    Isolation::SerializableSnapshot,
    Isolation::Serializable,
    Isolation::RepeatableReads,
];

async fn total(client: &Client, prefix: &str) -> i64 {
    let resp = client.store().range(Range::prefix(prefix)).await.unwrap();
    resp.kvs.into_iter().map(|kv| number(Some(kv.value))).sum()
}

/// `tasks` clients each run `rounds` transactions over 4 of 12 accounts: each account
/// gives a random part of its balance to the next one (a rotation), an account left at 0
/// is deleted (read back as 0), and some transactions prefetch or use `get_many`. The total
/// must be conserved at every level that checks reads.
async fn rotations(endpoint: &str, isolation: Isolation, tasks: u64, rounds: u64) {
    const ACCOUNTS: u64 = 12;
    const START: i64 = 100;
    let prefix = format!("bank-{isolation:?}/");
    let admin = Client::connect(endpoint).await.unwrap();
    for i in 0..ACCOUNTS {
        admin
            .store()
            .put(
                format!("{prefix}{i:02}").as_bytes(),
                START.to_string().as_bytes(),
                0,
            )
            .await
            .unwrap();
    }
    let attempts = Arc::new(AtomicU32::new(0));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let endpoint = endpoint.to_string();
        let prefix = prefix.clone();
        let attempts = attempts.clone();
        handles.push(tokio::spawn(async move {
            let client = Client::connect(&endpoint).await.unwrap();
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t * 7919 + 1));
            for r in 0..rounds {
                let mut keys: Vec<String> = Vec::new();
                while keys.len() < 4 {
                    let k = format!("{prefix}{:02}", rng.below(ACCOUNTS));
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
                let parts: Vec<i64> = (0..4).map(|_| rng.below(4) as i64 + 1).collect();
                let mut stm = Stm::new(&client).with_isolation(isolation);
                if r % 3 == 0 {
                    stm = stm.with_prefetch(keys[..2].to_vec());
                }
                let batched = r % 2 == 0;
                stm.run(|tx| {
                    let (keys, parts, attempts) = (&keys, &parts, &attempts);
                    async move {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        let mut balances = Vec::new();
                        if batched {
                            for v in tx.get_many(keys.iter()).await? {
                                balances.push(number(v));
                            }
                        } else {
                            for k in keys {
                                balances.push(number(tx.get(k).await?));
                                tokio::task::yield_now().await;
                            }
                        }
                        let gifts: Vec<i64> = balances
                            .iter()
                            .zip(parts)
                            .map(|(b, p)| if *p == 1 { *b } else { b / p })
                            .collect();
                        let mut after = balances.clone();
                        for i in 0..4 {
                            after[i] -= gifts[i];
                            after[(i + 1) % 4] += gifts[i];
                        }
                        for (k, v) in keys.iter().zip(&after) {
                            if *v == 0 {
                                tx.delete(k.as_str());
                            } else {
                                tx.put(k.as_str(), v.to_string());
                            }
                        }
                        // Read-your-writes.
                        let back: Vec<i64> = tx
                            .get_many(keys.iter())
                            .await?
                            .into_iter()
                            .map(number)
                            .collect();
                        assert_eq!(back, after, "read-your-writes");
                        Ok::<_, Error>(())
                    }
                })
                .await
                .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let got = total(&admin, &prefix).await;
    let left = admin
        .store()
        .range(Range::prefix(prefix.as_str()))
        .await
        .unwrap()
        .kvs
        .len();
    eprintln!(
        "{isolation:?}: {left} of {ACCOUNTS} accounts left (the others were emptied and deleted)"
    );
    eprintln!(
        "{isolation:?}: {} attempts for {} transactions, total {got}",
        attempts.load(Ordering::Relaxed),
        tasks * rounds
    );
    assert_eq!(
        got,
        START * ACCOUNTS as i64,
        "{isolation:?}: total not conserved"
    );
}

/// Write skew: alice and bob are on call; each transaction reads both and, if both are on,
/// takes itself off. Both read before either commits. At every level that compares reads
/// one of them must see a conflict, run again and stay on.
async fn write_skew(endpoint: &str, isolation: Isolation) -> (i64, i64) {
    let prefix = format!("oncall-{isolation:?}/");
    let (alice, bob) = (format!("{prefix}alice"), format!("{prefix}bob"));
    let admin = Client::connect(endpoint).await.unwrap();
    admin.store().put(alice.as_bytes(), b"1", 0).await.unwrap();
    admin.store().put(bob.as_bytes(), b"1", 0).await.unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let mut handles = Vec::new();
    for me in [alice.clone(), bob.clone()] {
        let (endpoint, alice, bob, barrier) = (
            endpoint.to_string(),
            alice.clone(),
            bob.clone(),
            barrier.clone(),
        );
        handles.push(tokio::spawn(async move {
            let client = Client::connect(&endpoint).await.unwrap();
            let first = AtomicU32::new(0);
            Stm::new(&client)
                .with_isolation(isolation)
                .run(|tx| {
                    let (alice, bob, me, barrier, first) = (&alice, &bob, &me, &barrier, &first);
                    async move {
                        let a = number(tx.get(alice).await?);
                        let b = number(tx.get(bob).await?);
                        if first.fetch_add(1, Ordering::SeqCst) == 0 {
                            barrier.wait().await;
                        }
                        if a + b == 2 {
                            tx.put(me.as_str(), "0");
                        }
                        Ok::<_, Error>(())
                    }
                })
                .await
                .unwrap();
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let get = |k: String| {
        let admin = admin.clone();
        async move {
            number(
                admin
                    .store()
                    .range(Range::key(k))
                    .await
                    .unwrap()
                    .kvs
                    .into_iter()
                    .next()
                    .map(|kv| kv.value),
            )
        }
    };
    (get(alice).await, get(bob).await)
}

async fn check_all(endpoint: &str, tasks: u64, rounds: u64) {
    for iso in SAFE {
        rotations(endpoint, iso, tasks, rounds).await;
        let (a, b) = write_skew(endpoint, iso).await;
        assert_eq!(a + b, 1, "{iso:?}: write skew ({a}, {b})");
    }
    // Read committed allows write skew, as documented.
    let (a, b) = write_skew(endpoint, Isolation::ReadCommitted).await;
    eprintln!("ReadCommitted write skew: ({a}, {b})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_mem() {
    let endpoint = format!("mem://stm-review-{}", std::process::id());
    check_all(&endpoint, 8, 150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_etcd() {
    let etcd = EtcdServer::start_async().await;
    check_all(&etcd.endpoint(), 8, 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_etcd_cluster() {
    let cluster = EtcdCluster::start_async(3).await;
    check_all(&cluster.endpoints_url(), 6, 25).await;
}

/// A snapshot compacted away in the middle of a transaction restarts it on etcd too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_snapshot_restarts_on_etcd() {
    let etcd = EtcdServer::start_async().await;
    let client = Client::connect(&etcd.endpoint()).await.unwrap();
    let store = client.store().clone();
    store.put(b"a", b"1", 0).await.unwrap();
    store.put(b"b", b"1", 0).await.unwrap();
    for iso in [Isolation::SerializableSnapshot, Isolation::Serializable] {
        let attempts = AtomicU32::new(0);
        let sum = Stm::new(&client)
            .with_isolation(iso)
            .run(|tx| {
                let (store, attempts) = (&store, &attempts);
                async move {
                    let a = number(tx.get("a").await?);
                    if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                        let rev = store.put(b"b", b"5", 0).await?;
                        store.compact(rev).await?;
                        store.put(b"b", b"5", 0).await?;
                    }
                    let b = number(tx.get("b").await?);
                    tx.put("c", (a + b).to_string());
                    Ok::<_, Error>(a + b)
                }
            })
            .await
            .unwrap();
        assert_eq!((sum, attempts.load(Ordering::SeqCst)), (6, 2), "{iso:?}");
    }
}

/// `Isolation::RepeatableReads` says a closure that saw a state that never existed "fails
/// at commit and runs again". A closure that returned `Err` on what it saw (an invariant
/// check, "insufficient funds") was not committed, so not checked: `run` returned an error
/// computed from a state that never existed. Its reads are now checked first.
#[tokio::test]
async fn an_error_from_a_state_that_never_existed_runs_again_at_repeatable_reads() {
    let client = Client::memory();
    let store = client.store().clone();
    store.put(b"a", b"50", 0).await.unwrap();
    store.put(b"b", b"50", 0).await.unwrap();
    let attempts = AtomicU32::new(0);
    let r = Stm::new(&client)
        .with_isolation(Isolation::RepeatableReads)
        .run(|tx| {
            let (store, attempts) = (&store, &attempts);
            async move {
                let a = number(tx.get("a").await?);
                if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                    // Another transaction moves 50 from a to b, atomically.
                    store
                        .txn(baton::store::Txn::new().and_then([
                            baton::store::TxnOp::put("a", "0", 0),
                            baton::store::TxnOp::put("b", "100", 0),
                        ]))
                        .await?;
                }
                let b = number(tx.get("b").await?);
                if a + b != 100 {
                    return Err(Error::InvalidArgument(format!(
                        "books do not balance: {a} + {b}"
                    )));
                }
                Ok(a + b)
            }
        })
        .await;
    assert_eq!(
        r.as_ref().ok(),
        Some(&100),
        "run returned {r:?} after {} attempt(s): an error from a state that never existed",
        attempts.load(Ordering::SeqCst)
    );
}

/// Dropping `run` while its commit is in flight (the answer delayed by a proxy): the commit
/// is applied whole or not at all, and nothing is left behind (a later transaction on the
/// same keys commits at once, in one attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_mid_commit() {
    use baton_testkit::proxy::{Direction, Fault, FaultProxy};
    let etcd = EtcdServer::start_async().await;
    let proxy = FaultProxy::start(etcd.client_port()).await;
    let slow = Client::builder(&proxy.url("http"))
        .with_request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let other = Client::connect(&etcd.endpoint()).await.unwrap();
    other.store().put(b"a", b"10", 0).await.unwrap();
    other.store().put(b"b", b"10", 0).await.unwrap();
    let proxy_ref = &proxy;
    let stm = Stm::new(&slow);
    let run = stm.run(|tx| async move {
        let a = number(tx.get("a").await?);
        let b = number(tx.get("b").await?);
        tx.put("a", (a - 5).to_string());
        tx.put("b", (b + 5).to_string());
        proxy_ref.set(
            Direction::ServerToClient,
            Fault::Delay(Duration::from_secs(2)),
        );
        Ok::<_, Error>(())
    });
    assert!(tokio::time::timeout(Duration::from_millis(500), run)
        .await
        .is_err());
    proxy.heal();
    let t = total(&other, "").await;
    assert_eq!(t, 20, "a half-applied commit");
    let attempts = AtomicU32::new(0);
    Stm::new(&other)
        .run(|tx| {
            let attempts = &attempts;
            async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                let a = number(tx.get("a").await?);
                tx.put("a", (a + 1).to_string());
                Ok::<_, Error>(())
            }
        })
        .await
        .unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}
