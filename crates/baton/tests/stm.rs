//! `Stm` on the embedded store: a failed read fails the attempt, and Redis URLs are
//! refused. The limits of one transaction and what each isolation level checks are
//! conformance cases (baton-testkit), on the embedded store and on etcd.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::sync::atomic::{AtomicU32, Ordering};

use baton::store::Range;
use baton::{Client, Error, Stm};

async fn value(client: &Client, key: &str) -> Option<Vec<u8>> {
    let resp = client.store().range(Range::key(key)).await.unwrap();
    resp.kvs.into_iter().next().map(|kv| kv.value)
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
