//! STM under faults: bank transfers at every safe isolation level through fault proxies that cut
//! connections, with compactions and an etcd restart. Each transfer also increments a
//! counter and writes a key unique to the operation, read first in the transaction (as
//! `Stm::run` recommends): the total must be conserved and the counter must equal the
//! number of operation keys, whatever errors came back.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton::store::Range;
use baton::{Client, Error, Isolation, Stm};
use baton_testkit::bank::{number, Rng};
use baton_testkit::proxy::FaultProxy;
use baton_testkit::EtcdServer;

async fn connect(endpoint: &str) -> Client {
    Client::builder(endpoint)
        .with_dial_timeout(Duration::from_secs(3))
        .with_request_timeout(Duration::from_millis(1500))
        .connect()
        .await
        .unwrap()
}

async fn bank_under_faults(isolation: Isolation) {
    const ACCOUNTS: u64 = 8;
    const START: i64 = 1000;
    const TASKS: u64 = 6;
    const OPS: u64 = 60;
    let mut etcd = EtcdServer::start_async().await;
    let prefix = format!("bank-{isolation:?}/");
    let admin = connect(&etcd.endpoint()).await;
    for i in 0..ACCOUNTS {
        admin
            .store()
            .put(
                format!("{prefix}acct/{i}").as_bytes(),
                START.to_string().as_bytes(),
                0,
            )
            .await
            .unwrap();
    }
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(Arc::new(FaultProxy::start(etcd.client_port()).await));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let url = proxies[(t % 3) as usize].url("http");
        let prefix = prefix.clone();
        let errors = errors.clone();
        handles.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t * 7919 + 1));
            for op in 0..OPS {
                let from = rng.below(ACCOUNTS);
                let to = (from + 1 + rng.below(ACCOUNTS - 1)) % ACCOUNTS;
                let amount = rng.below(50) as i64 + 1;
                let op_key = format!("{prefix}op/{t}-{op}");
                let mut tries = 0;
                loop {
                    tries += 1;
                    let stm = Stm::new(&client).with_isolation(isolation);
                    let (prefix, op_key) = (&prefix, &op_key);
                    let r = stm
                        .run(|tx| async move {
                            if tx.get(op_key).await?.is_some() {
                                return Ok::<_, Error>(());
                            }
                            let fk = format!("{prefix}acct/{from}");
                            let tk = format!("{prefix}acct/{to}");
                            let ck = format!("{prefix}count");
                            let f = number(tx.get(&fk).await?);
                            let g = number(tx.get(&tk).await?);
                            let c = number(tx.get(&ck).await?);
                            let a = amount.min(f);
                            if a == f {
                                tx.delete(fk.as_str());
                            } else {
                                tx.put(fk.as_str(), (f - a).to_string());
                            }
                            tx.put(tk.as_str(), (g + a).to_string());
                            tx.put(ck.as_str(), (c + 1).to_string());
                            tx.put(op_key.as_str(), "1");
                            Ok(())
                        })
                        .await;
                    match r {
                        Ok(()) => break,
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            if !e.is_retryable() {
                                eprintln!("task {t} op {op}: not retryable: {e:?}");
                            }
                            if tries > 200 {
                                panic!("task {t} op {op}: {e}");
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        }));
    }
    // Chaos: cut connections, compact, and restart etcd once.
    let chaos = {
        let proxies = proxies.clone();
        let stop = stop.clone();
        let endpoint = etcd.endpoint();
        tokio::spawn(async move {
            let admin = connect(&endpoint).await;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(150)).await;
                i += 1;
                proxies[(i % 3) as usize].reset_all();
                if i.is_multiple_of(4) {
                    if let Ok(r) = admin.store().range(Range::key("nothing")).await {
                        let _ = admin.store().compact(r.header_revision).await;
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    eprintln!("restarting etcd");
    tokio::task::block_in_place(|| etcd.restart());
    for h in handles {
        h.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    chaos.await.unwrap();
    let admin = connect(&etcd.endpoint()).await;
    let accts = admin
        .store()
        .range(Range::prefix(format!("{prefix}acct/")))
        .await
        .unwrap();
    let total: i64 = accts
        .kvs
        .iter()
        .map(|kv| number(Some(kv.value.clone())))
        .sum();
    let ops = admin
        .store()
        .range(Range::prefix(format!("{prefix}op/")))
        .await
        .unwrap()
        .kvs
        .len();
    let count = number(
        admin
            .store()
            .range(Range::key(format!("{prefix}count")))
            .await
            .unwrap()
            .kvs
            .into_iter()
            .next()
            .map(|kv| kv.value),
    );
    eprintln!(
        "{isolation:?}: total {total}, ops {ops}, count {count}, errors {}",
        errors.load(Ordering::Relaxed)
    );
    assert_eq!(
        total,
        START * ACCOUNTS as i64,
        "{isolation:?}: total not conserved"
    );
    assert_eq!(ops as u64, TASKS * OPS);
    assert_eq!(
        count, ops as i64,
        "{isolation:?}: a transfer applied twice or lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_faults_serializable_snapshot() {
    bank_under_faults(Isolation::SerializableSnapshot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_faults_serializable() {
    bank_under_faults(Isolation::Serializable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_faults_repeatable_reads() {
    bank_under_faults(Isolation::RepeatableReads).await;
}

/// A commit whose answer is cut by a connection reset (not a timeout) is reported as an
/// error and the closure is not run again, which would apply its increment a second time:
/// at every level, the counter ends at 11 at most, after one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_cut_by_a_reset_is_not_run_again() {
    use baton_testkit::proxy::{Direction, Fault};
    use std::sync::atomic::AtomicU32;
    let etcd = EtcdServer::start_async().await;
    let other = connect(&etcd.endpoint()).await;
    for iso in [
        Isolation::SerializableSnapshot,
        Isolation::Serializable,
        Isolation::RepeatableReads,
        Isolation::ReadCommitted,
    ] {
        let proxy = FaultProxy::start(etcd.client_port()).await;
        let c = baton_testkit::connect_client(&proxy.url("http"), Duration::from_secs(2)).await;
        let key = format!("x-{iso:?}");
        other.store().put(key.as_bytes(), b"10", 0).await.unwrap();
        let calls = AtomicU32::new(0);
        let result = Stm::new(&c)
            .with_isolation(iso)
            .run(|tx| {
                let (proxy, calls, key) = (&proxy, &calls, &key);
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let x = number(tx.get(key).await?);
                    tx.put(key.as_str(), (x + 1).to_string());
                    // The commit, sent next, goes; its answer is cut.
                    proxy.set(Direction::ServerToClient, Fault::Reset);
                    Ok::<_, Error>(())
                }
            })
            .await;
        proxy.heal();
        let resp = other.store().range(Range::key(key.clone())).await.unwrap();
        let x = number(resp.kvs.into_iter().next().map(|kv| kv.value));
        let calls = calls.load(Ordering::SeqCst);
        assert!(
            result.is_err(),
            "{iso:?}: the cut answer reported as {result:?}"
        );
        assert_eq!(calls, 1, "{iso:?}: closure run again (x = {x})");
        assert!(x == 10 || x == 11, "{iso:?}: x = {x}");
    }
}
