//! `Stm` against a real etcd: the cases of `crates/baton/tests/stm.rs` that depend on what
//! etcd accepts and how it fails.
//!
//! Each test starts its own etcd on free loopback ports. Without etcd these tests fail with
//! a message saying so; set `BATON_SKIP_ETCD=1` to skip them instead.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use baton::store::{KeyRange, Range};
use baton::{Client, Error, Isolation, Stm};
use baton_testkit::proxy::{Direction, Fault, FaultProxy};
use baton_testkit::{etcd_available, EtcdServer};

/// False (after saying why) if etcd is missing and `BATON_SKIP_ETCD=1`; panics if it is
/// missing otherwise.
fn require_etcd() -> bool {
    // RUST_LOG=baton=debug shows retries.
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

async fn client(etcd: &EtcdServer, request_timeout: Duration) -> Client {
    connect(&etcd.endpoint(), request_timeout).await
}

async fn connect(endpoint: &str, request_timeout: Duration) -> Client {
    Client::builder(endpoint)
        .with_dial_timeout(Duration::from_secs(3))
        .with_request_timeout(request_timeout)
        .connect()
        .await
        .unwrap()
}

async fn value(client: &Client, key: &str) -> Option<Vec<u8>> {
    let resp = client.store().range(Range::key(key)).await.unwrap();
    resp.kvs.into_iter().next().map(|kv| kv.value)
}

/// At `ReadCommitted` nothing is compared, so the commit cannot fail: 200 keys read and
/// one written commit (etcd would refuse a failure branch of 200 re-reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_committed_many_reads_one_write() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let client = client(&etcd, Duration::from_secs(5)).await;
    let keys: Vec<String> = (0..200).map(|i| format!("rc/{i:03}")).collect();
    let stm = Stm::new(&client).with_isolation(Isolation::ReadCommitted);
    let with_write = stm
        .run(|tx| {
            let keys = keys.clone();
            async move {
                let n = tx.get_many(keys.iter()).await?.len();
                tx.put("rc/count", n.to_string());
                Ok::<_, Error>(n)
            }
        })
        .await;
    assert!(with_write.is_ok(), "{}", with_write.unwrap_err());
    assert_eq!(
        value(&client, "rc/count").await.as_deref(),
        Some(&b"200"[..])
    );
}

/// At `SerializableSnapshot`: read `a` (the snapshot), let another client put or delete `w`
/// during the first attempt, write `w` without reading it. The number of attempts.
async fn blind_write_attempts(client: &Client, other: &Client, delete: bool) -> u32 {
    let store = other.store().clone();
    store.put(b"a", b"1", 0).await.unwrap();
    store.put(b"w", b"old", 0).await.unwrap();
    let attempts = AtomicU32::new(0);
    Stm::new(client)
        .run(|tx| {
            let (store, attempts) = (&store, &attempts);
            async move {
                tx.get("a").await?;
                if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                    if delete {
                        store.delete(KeyRange::key("w")).await?;
                    } else {
                        store.put(b"w", b"theirs", 0).await?;
                    }
                }
                tx.put("w", "mine");
                Ok::<_, Error>(())
            }
        })
        .await
        .unwrap();
    assert_eq!(value(client, "w").await.as_deref(), Some(&b"mine"[..]));
    attempts.load(Ordering::SeqCst)
}

/// As documented on `Isolation::SerializableSnapshot`: a blind write conflicts with a
/// concurrent put of its key, not with a concurrent delete (a deleted key has no mod
/// revision to compare with the snapshot; Go has the same blind spot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_write_conflicts_with_a_put_not_a_delete() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let (a, b) = (
        client(&etcd, Duration::from_secs(5)).await,
        client(&etcd, Duration::from_secs(5)).await,
    );
    assert_eq!(blind_write_attempts(&a, &b, false).await, 2);
    assert_eq!(blind_write_attempts(&a, &b, true).await, 1);
}

/// All the writes of a transaction go in one request, which etcd limits to 1.5 MiB
/// (`--max-request-bytes`): one value of `MAX_VALUE_LEN` commits, two are refused at the
/// commit with `InvalidArgument`, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_share_one_request_size_limit() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let client = client(&etcd, Duration::from_secs(5)).await;
    let err = Stm::new(&client)
        .run(|tx| async move {
            tx.put("big/1", vec![b'x'; baton::MAX_VALUE_LEN]);
            tx.put("big/2", vec![b'x'; baton::MAX_VALUE_LEN]);
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    assert!(err.to_string().contains("request is too large"), "{err}");
    assert_eq!(value(&client, "big/1").await, None);
    Stm::new(&client)
        .run(|tx| async move {
            tx.put("big/1", vec![b'x'; baton::MAX_VALUE_LEN]);
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
}

fn number(v: Option<Vec<u8>>) -> i64 {
    v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// Add one to `x` in a transaction of its own (at the default level).
async fn increment(client: &Client) {
    Stm::new(client)
        .run(|tx| async move {
            let x = number(tx.get("x").await?);
            tx.put("x", (x + 1).to_string());
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
}

/// Two increments of `x = 10` at the default level. The first one's read of `x` fails,
/// made to fail by `read`, and its body swallows the error (`unwrap_or(None)`: as if `x`
/// did not exist); the second commits before the first does. Returns what the first `run`
/// returned and the final `x`.
///
/// The first read left `x` out of the read set, so a commit would not guard it: the first
/// increment would overwrite the second (x = 1, both `Ok`). It must fail instead.
async fn increment_after_a_failed_read<R, Fut>(
    slow: &Client,
    other: &Client,
    read: R,
) -> (Result<(), Error>, i64)
where
    R: Fn(baton::StmTx) -> Fut,
    Fut: std::future::Future<Output = Result<Option<Vec<u8>>, Error>>,
{
    other.store().put(b"x", b"10", 0).await.unwrap();
    let failed = AtomicU32::new(0);
    let result = Stm::new(slow)
        .run(|tx| {
            let (read, failed) = (&read, &failed);
            async move {
                let got = read(tx.clone()).await;
                if got.is_err() {
                    failed.fetch_add(1, Ordering::SeqCst);
                    increment(other).await;
                }
                let x = number(got.unwrap_or(None));
                tx.put("x", (x + 1).to_string());
                Ok::<_, Error>(())
            }
        })
        .await;
    assert_eq!(
        failed.load(Ordering::SeqCst),
        1,
        "the read did not fail once"
    );
    (result, number(value(other, "x").await))
}

/// A read that fails (here: it times out while etcd is paused) fails the attempt, even if
/// the body swallows the error: nothing is written and `run` returns the read's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_fails_the_attempt() {
    if !require_etcd() {
        return;
    }
    let etcd = Arc::new(StdMutex::new(EtcdServer::start_async().await));
    let endpoint = etcd.lock().unwrap().endpoint();
    let slow = connect(&endpoint, Duration::from_millis(500)).await;
    let other = connect(&endpoint, Duration::from_secs(5)).await;
    let (result, x) = increment_after_a_failed_read(&slow, &other, |tx| {
        let etcd = etcd.clone();
        async move {
            etcd.lock().unwrap().stop();
            let got = tx.get("x").await;
            etcd.lock().unwrap().cont();
            got
        }
    })
    .await;
    assert_eq!(x, 11, "the concurrent increment was lost ({result:?})");
    let err = result.unwrap_err();
    eprintln!("run returned: {err}");
    assert!(err.is_retryable(), "{err}");
}

/// A read dropped before it finished (here: by a timeout around it, while etcd is paused)
/// fails the attempt: nothing is written and `run` returns `InvalidArgument`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_read_fails_the_attempt() {
    if !require_etcd() {
        return;
    }
    let etcd = Arc::new(StdMutex::new(EtcdServer::start_async().await));
    let endpoint = etcd.lock().unwrap().endpoint();
    let slow = connect(&endpoint, Duration::from_secs(5)).await;
    let other = connect(&endpoint, Duration::from_secs(5)).await;
    let (result, x) = increment_after_a_failed_read(&slow, &other, |tx| {
        let etcd = etcd.clone();
        async move {
            etcd.lock().unwrap().stop();
            let got = tokio::time::timeout(Duration::from_millis(200), tx.get("x")).await;
            etcd.lock().unwrap().cont();
            got.map_err(|_| Error::InvalidArgument("timed out".into()))?
        }
    })
    .await;
    assert_eq!(x, 11, "the concurrent increment was lost ({result:?})");
    let err = result.unwrap_err();
    eprintln!("run returned: {err}");
    assert!(err.is_invalid_input(), "{err}");
}

/// A read still running when the body returns (in a task the body gave up waiting for,
/// which a timeout on its `JoinHandle` does not cancel) fails the attempt too: its key was
/// not in the read set at the commit. Before, the commit went ahead unguarded and the
/// concurrent increment was lost (x = 1, 3 runs of 3; found by a second-look review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_left_running_fails_the_attempt() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let proxy = FaultProxy::start(etcd.client_port()).await;
    let slow = connect(&proxy.url("http"), Duration::from_secs(5)).await;
    let other = client(&etcd, Duration::from_secs(5)).await;
    let (result, x) = increment_after_a_failed_read(&slow, &other, |tx| {
        let proxy = &proxy;
        async move {
            proxy.set(
                Direction::ServerToClient,
                Fault::Delay(Duration::from_secs(1)),
            );
            let read = tokio::spawn(async move { tx.get("x").await });
            match tokio::time::timeout(Duration::from_millis(200), read).await {
                Ok(joined) => joined.unwrap(),
                Err(_) => Err(Error::InvalidArgument("gave up on the read".into())),
            }
        }
    })
    .await;
    proxy.heal();
    assert_eq!(x, 11, "the concurrent increment was lost ({result:?})");
    let err = result.unwrap_err();
    eprintln!("run returned: {err}");
    assert!(err.is_invalid_input(), "{err}");
}

/// A commit whose answer is lost fails with a retryable error although it was applied:
/// running the transaction again would add one twice. As `Stm::run` documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_timed_out_may_have_been_applied() {
    if !require_etcd() {
        return;
    }
    let etcd = EtcdServer::start_async().await;
    let proxy = FaultProxy::start(etcd.client_port()).await;
    let slow = connect(&proxy.url("http"), Duration::from_millis(500)).await;
    let other = client(&etcd, Duration::from_secs(5)).await;
    other.store().put(b"x", b"10", 0).await.unwrap();
    let result = Stm::new(&slow)
        .run(|tx| {
            let proxy = &proxy;
            async move {
                let x = number(tx.get("x").await?);
                tx.put("x", (x + 1).to_string());
                // The commit reaches etcd; its answer does not come back.
                proxy.set(Direction::ServerToClient, Fault::Blackhole);
                Ok::<_, Error>(())
            }
        })
        .await;
    proxy.heal();
    let err = result.unwrap_err();
    eprintln!("run returned: {err}");
    assert!(err.is_retryable(), "{err}");
    assert_eq!(
        number(value(&other, "x").await),
        11,
        "the commit was not applied"
    );
}
