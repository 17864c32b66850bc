//! A distributed count-down latch: waiters go once `count` count-downs have happened.

use std::fmt;
use std::time::Duration;

use tracing::Instrument;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::names::{validate_count, validate_name};
use crate::queue::with_timeout;
use crate::shared_value::update;
use crate::store::{KeyValue, Range};
use crate::watching::{wait_key, Until};

/// A count-down latch shared by every node: [`wait()`](CountDownLatch::wait) blocks until
/// [`count_down()`](CountDownLatch::count_down) has been called `count` times, in any
/// processes. Like Java's `CountDownLatch`, it is one-shot: once at zero, it stays open.
///
/// Each count-down is an atomic read-modify-write (a compare on the key's mod revision,
/// retried on conflict), so concurrent count-downs are never lost, and a count-down on an
/// open latch changes nothing. A count-down whose answer is lost (a timeout) may or may not
/// have happened: retrying it may count twice.
///
/// # Agreeing on the count
///
/// The key holds `REMAINING/COUNT`. A handle whose `count` differs from the stored one gets
/// [`Error::Mismatch`] from every call, instead of counting down a different latch.
///
/// # Key layout
///
/// The key is `NAME` itself, value `REMAINING/COUNT` in ASCII decimal, no lease: the latch
/// outlives the processes that use it. It is created by the first count-down; until then it
/// counts as `COUNT/COUNT`. Delete the key to reuse the name for a new latch.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// let latch = baton::CountDownLatch::new(&client, "boot/services-ready", 2)?;
/// let waiter = tokio::spawn({
///     let latch = latch.clone();
///     async move { latch.wait().await }
/// });
/// assert_eq!(latch.count_down().await?, 1);
/// assert_eq!(latch.count_down().await?, 0);
/// waiter.await.expect("waiter panicked")?;
/// assert_eq!(latch.count_down().await?, 0); // already open
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct CountDownLatch {
    client: Client,
    name: String,
    count: u32,
}

impl fmt::Debug for CountDownLatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountDownLatch")
            .field("name", &self.name)
            .field("count", &self.count)
            .finish()
    }
}

impl CountDownLatch {
    /// The latch named `name`, opening after `count` count-downs.
    ///
    /// Fails with [`Error::InvalidArgument`] if `count` is 0, or if the name is empty,
    /// longer than 1 KiB, or contains a NUL byte.
    pub fn new(client: &Client, name: &str, count: u32) -> Result<CountDownLatch> {
        validate_name(name)?;
        validate_count("count", count)?;
        Ok(CountDownLatch {
            client: client.clone(),
            name: name.to_string(),
            count,
        })
    }

    /// The latch's name, which is also its key.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of count-downs that open the latch.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Count down once. Returns how many count-downs remain (0: the latch is open, and
    /// stays open).
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the count-down may or may not have happened.
    pub async fn count_down(&self) -> Result<u32> {
        let mut remaining = 0;
        update(self.client.store(), self.name.as_bytes(), |kv| {
            remaining = self.remaining_in(kv)?;
            if remaining == 0 {
                return Ok(None);
            }
            remaining -= 1;
            Ok(Some(encode(remaining, self.count).into_bytes()))
        })
        .instrument(tracing::debug_span!("count_down", latch = %self.name))
        .await?;
        Ok(remaining)
    }

    /// How many count-downs remain now.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn remaining(&self) -> Result<u32> {
        let resp = self
            .client
            .store()
            .range(Range::key(self.name.as_bytes()))
            .await?;
        self.remaining_in(resp.kvs.first())
    }

    /// Wait until the latch is open (no count-down remains). Returns at once if it is.
    ///
    /// Every waiter watches the latch's key, so each count-down reaches every waiter (who
    /// goes on only at zero). Failed reads and broken watches are retried with backoff.
    /// Fails with [`Error::Mismatch`] if the key holds a latch of another count or no latch,
    /// also when it is written so while this waits.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: waiting leaves nothing in the store.
    pub async fn wait(&self) -> Result<()> {
        self.wait_open()
            .instrument(tracing::debug_span!("wait", latch = %self.name))
            .await
    }

    /// [`wait()`](CountDownLatch::wait), giving up with [`Error::Timeout`] after `timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait_timeout(&self, timeout: Duration) -> Result<()> {
        with_timeout("latch wait", timeout, self.wait()).await
    }

    async fn wait_open(&self) -> Result<()> {
        // Also woken by a put that no handle of this count wrote (another count, not a
        // latch), to say `Mismatch` rather than wait for a value that never comes.
        let open = Until::ReachedOrUnlike {
            value: encode(0, self.count).into_bytes(),
            suffix: format!("/{}", self.count).into_bytes(),
        };
        wait_key(
            self.client.store(),
            self.client.hub(),
            self.name.as_bytes(),
            open,
            |kv| Ok(self.remaining_in(kv)? == 0),
        )
        .await
    }

    /// The count-downs remaining according to the key (`count` if it does not exist).
    fn remaining_in(&self, kv: Option<&KeyValue>) -> Result<u32> {
        let Some(kv) = kv else {
            return Ok(self.count);
        };
        let mismatch = |reason: String| Error::Mismatch {
            name: self.name.clone(),
            reason,
        };
        let (remaining, count) = decode(&kv.value).ok_or_else(|| {
            mismatch("the key is not a latch (its value is not REMAINING/COUNT)".into())
        })?;
        if count != self.count {
            return Err(mismatch(format!(
                "the latch counts {count} count-downs; this handle says {}",
                self.count
            )));
        }
        if remaining > count {
            return Err(mismatch(format!(
                "the latch has {remaining} count-downs remaining of {count}"
            )));
        }
        Ok(remaining)
    }
}

fn encode(remaining: u32, count: u32) -> String {
    format!("{remaining}/{count}")
}

fn decode(value: &[u8]) -> Option<(u32, u32)> {
    let (remaining, count) = std::str::from_utf8(value).ok()?.split_once('/')?;
    let number = |s: &str| {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    Some((number(remaining)?, number(count)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The waits of a latch, a queue's dequeue and a barrier count in their client's stats
    /// (`watches_opened` while waiting, `wakeups` once woken), as those of locks do. Before,
    /// they counted nothing (found by review).
    #[tokio::test]
    async fn latch_queue_and_barrier_waits_count_in_the_client_stats() {
        let store: std::sync::Arc<dyn crate::store::Store> =
            std::sync::Arc::new(crate::store::mem::MemStore::new());
        let other = Client::from_arc(store.clone());
        for what in ["latch", "queue", "barrier"] {
            let waiting = Client::from_arc(store.clone());
            let before = waiting.stats();
            let name = format!("stats-{what}");
            let barrier = crate::Barrier::new(&other, &name).unwrap();
            let wait: tokio::task::JoinHandle<Result<()>> = match what {
                "latch" => {
                    let latch = CountDownLatch::new(&waiting, &name, 1).unwrap();
                    tokio::spawn(async move { latch.wait().await })
                }
                "queue" => {
                    let queue = crate::Queue::new(&waiting, &name).unwrap();
                    tokio::spawn(async move { queue.dequeue().await.map(drop) })
                }
                _ => {
                    barrier.hold().await.unwrap();
                    let b = crate::Barrier::new(&waiting, &name).unwrap();
                    tokio::spawn(async move { b.wait().await })
                }
            };
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = waiting.stats();
            assert!(
                now.watches_opened > before.watches_opened,
                "{what}: {before:?} -> {now:?}"
            );
            match what {
                "latch" => assert_eq!(
                    CountDownLatch::new(&other, &name, 1)
                        .unwrap()
                        .count_down()
                        .await
                        .unwrap(),
                    0
                ),
                "queue" => crate::Queue::new(&other, &name)
                    .unwrap()
                    .enqueue("x")
                    .await
                    .unwrap(),
                _ => assert!(barrier.release().await.unwrap()),
            }
            tokio::time::timeout(Duration::from_secs(5), wait)
                .await
                .unwrap_or_else(|_| panic!("{what}: the wait hung"))
                .unwrap()
                .unwrap();
            let after = waiting.stats();
            assert!(
                after.wakeups > before.wakeups,
                "{what}: {before:?} -> {after:?}"
            );
        }
    }

    #[tokio::test]
    async fn counts_down_once_per_call_and_stays_open() {
        let client = Client::memory();
        let latch = CountDownLatch::new(&client, "l", 20).unwrap();
        assert_eq!(latch.remaining().await.unwrap(), 20);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let latch = latch.clone();
                tokio::spawn(async move { latch.wait().await })
            })
            .collect();
        let downs: Vec<_> = (0..20)
            .map(|_| {
                let latch = latch.clone();
                tokio::spawn(async move { latch.count_down().await.unwrap() })
            })
            .collect();
        let mut left = Vec::new();
        for d in downs {
            left.push(d.await.unwrap());
        }
        left.sort_unstable();
        assert_eq!(left, (0..20).collect::<Vec<_>>(), "a count-down was lost");
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert_eq!(latch.count_down().await.unwrap(), 0);
        latch.wait().await.unwrap();
    }

    #[tokio::test]
    async fn waits_until_zero_and_checks_the_count() {
        let client = Client::memory();
        let latch = CountDownLatch::new(&client, "l", 2).unwrap();
        latch.count_down().await.unwrap();
        let err = latch
            .wait_timeout(Duration::from_millis(30))
            .await
            .unwrap_err();
        assert!(err.is_timeout());
        let other = CountDownLatch::new(&client, "l", 3).unwrap();
        let err = other.count_down().await.unwrap_err();
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
        assert!(other.wait().await.is_err());
        assert_eq!(latch.remaining().await.unwrap(), 1);
        for bad in [("l", 0), ("", 1)] {
            let err = CountDownLatch::new(&client, bad.0, bad.1).unwrap_err();
            assert!(err.is_invalid_input(), "{err}");
        }
        assert_eq!(decode(b"3/5"), Some((3, 5)));
        assert_eq!(decode(b"-1/5"), None);
    }

    /// A waiter that started before the key existed, when a handle of another count then
    /// creates it, is told `Mismatch` (as every call is, the docs say) instead of waiting
    /// for ever: the other latch's count-downs, its opening included, never put the value
    /// the waiter watched for.
    #[tokio::test]
    async fn a_waiter_is_told_of_a_count_mismatch_made_while_it_waits() {
        let client = Client::memory();
        let mine = CountDownLatch::new(&client, "mm", 3).unwrap();
        let waiter = tokio::spawn(async move { mine.wait().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let theirs = CountDownLatch::new(&client, "mm", 2).unwrap();
        assert_eq!(theirs.count_down().await.unwrap(), 1);
        assert_eq!(theirs.count_down().await.unwrap(), 0);
        let got = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("the waiter hung on a latch of another count")
            .unwrap();
        assert!(matches!(got, Err(Error::Mismatch { .. })), "{got:?}");
        // A value put by hand that is not a latch at all: told too.
        client
            .store()
            .delete(crate::store::KeyRange::key("mm"))
            .await
            .unwrap();
        let mine = CountDownLatch::new(&client, "mm", 3).unwrap();
        let waiter = tokio::spawn(async move { mine.wait().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.store().put(b"mm", b"hello", 0).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("the waiter hung on a key that is not a latch")
            .unwrap();
        assert!(matches!(got, Err(Error::Mismatch { .. })), "{got:?}");
    }

    /// Stress: count-downs from many tasks, waiters on two clients, broken
    /// watches and compactions: every waiter goes, only once the latch is open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latch_stress() {
        for round in 0..20 {
            let store = std::sync::Arc::new(crate::store::slow::CutWatches::default());
            let a = Client::from_arc(store.clone());
            let b = Client::from_arc(store.clone());
            let n = 40;
            let name = format!("sv-latch-{round}");
            let waiters: Vec<_> = (0..6)
                .map(|i| {
                    let latch =
                        CountDownLatch::new(if i % 2 == 0 { &a } else { &b }, &name, n).unwrap();
                    tokio::spawn(async move {
                        latch.wait().await.unwrap();
                        latch.remaining().await.unwrap()
                    })
                })
                .collect();
            let downs: Vec<_> = (0..n)
                .map(|_| {
                    let latch = CountDownLatch::new(&a, &name, n).unwrap();
                    tokio::spawn(async move { latch.count_down().await.unwrap() })
                })
                .collect();
            for i in 0..10 {
                tokio::task::yield_now().await;
                if i % 2 == 0 {
                    store.cut_watches();
                } else {
                    let rev = a.store().put(b"other", b"", 0).await.unwrap();
                    a.store().compact(rev).await.unwrap();
                }
            }
            for d in downs {
                d.await.unwrap();
            }
            for w in waiters {
                let left = tokio::time::timeout(Duration::from_secs(10), w)
                    .await
                    .expect("a waiter never went")
                    .unwrap();
                assert_eq!(left, 0);
            }
        }
    }
}
