//! `Stm` on the embedded store: the limits of one transaction, and what each isolation
//! level checks. The same cases run on a real etcd in baton-testkit's `tests/stm_etcd.rs`.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::sync::atomic::{AtomicU32, Ordering};

use baton::store::{KeyRange, Range};
use baton::{Client, Error, Isolation, Stm};

async fn value(client: &Client, key: &str) -> Option<Vec<u8>> {
    let resp = client.store().range(Range::key(key)).await.unwrap();
    resp.kvs.into_iter().next().map(|kv| kv.value)
}

/// At `ReadCommitted` nothing is compared, so the commit cannot fail: the keys read are
/// neither re-read on failure nor counted against etcd's 128 operations per branch.
#[tokio::test]
async fn read_committed_many_reads_one_write() {
    let client = Client::memory();
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
async fn blind_write_attempts(client: &Client, delete: bool) -> u32 {
    let store = client.store().clone();
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
#[tokio::test]
async fn blind_write_conflicts_with_a_put_not_a_delete() {
    assert_eq!(blind_write_attempts(&Client::memory(), false).await, 2);
    assert_eq!(blind_write_attempts(&Client::memory(), true).await, 1);
}

/// All the writes of a transaction go in one request, which etcd limits to 1.5 MiB
/// (`--max-request-bytes`): one value of `MAX_VALUE_LEN` commits, two are refused at the
/// commit with `InvalidArgument`, and nothing is written.
#[tokio::test]
async fn writes_share_one_request_size_limit() {
    let client = Client::memory();
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

/// Two increments of `x = 10` at the default level. The first one reads `x` together with
/// a key the store refuses (an empty one), so the whole read fails, and its body swallows
/// the error (as if `x` did not exist); the second commits before the first does.
///
/// The failed read left `x` out of the read set, so a commit would not guard it: the first
/// increment would overwrite the second (x = 1, both `Ok`). It must fail instead, with the
/// read's error, and write nothing.
#[tokio::test]
async fn a_failed_read_fails_the_attempt() {
    let client = Client::memory();
    client.store().put(b"x", b"10", 0).await.unwrap();
    let attempts = AtomicU32::new(0);
    let result = Stm::new(&client)
        .run(|tx| {
            let (client, attempts) = (&client, &attempts);
            async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                let got = tx.get_many(["x", ""]).await;
                assert!(got.is_err(), "an empty key was read");
                Stm::new(client)
                    .run(|tx| async move {
                        let x = number(tx.get("x").await?);
                        tx.put("x", (x + 1).to_string());
                        Ok::<_, Error>(())
                    })
                    .await?;
                let x = number(got.unwrap_or_default().into_iter().next().flatten());
                tx.put("x", (x + 1).to_string());
                Ok::<_, Error>(())
            }
        })
        .await;
    let x = number(value(&client, "x").await);
    assert_eq!(x, 11, "the concurrent increment was lost ({result:?})");
    let err = result.unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}

/// `Stm` and `SharedValue` are built on a `Client`, which Redis cannot back: the refusal
/// says what they need, and sends to `Coordinator` only for what it offers.
#[tokio::test]
async fn redis_urls_are_refused_with_an_accurate_message() {
    for url in ["redis://127.0.0.1:6379", "redlock://a:1,b:2,c:3"] {
        let err = Client::connect(url).await.unwrap_err();
        assert!(err.is_invalid_input(), "{url}: {err}");
        let msg = err.to_string();
        for needed in [
            "Stm",
            "SharedValue",
            "etcd",
            "mem://",
            "locks and elections",
        ] {
            assert!(msg.contains(needed), "{url}: {needed:?} not in {msg:?}");
        }
    }
}
