//! A barrier: one key that holds waiters back until it is deleted (Go's `recipe.Barrier`).

use std::fmt;
use std::time::Duration;

use tracing::Instrument;

use crate::client::Client;
use crate::error::Result;
use crate::names::validate_name;
use crate::queue::with_timeout;
use crate::session::Session;
use crate::store::{Compare, CompareOp, KeyRange, LeaseId, Range, Txn, TxnOp};
use crate::watching::{wait_key, Until};

/// A barrier: while it is held (its key exists), [`wait()`](Barrier::wait) blocks; when it
/// is released (its key is deleted), every waiter goes on.
///
/// A coordinator [`hold`](Barrier::hold)s the barrier, workers [`wait`](Barrier::wait) at
/// it, and the coordinator [`release`](Barrier::release)s them all at once. To hold workers
/// back until a number of them have arrived, use a
/// [`DoubleBarrier`](crate::DoubleBarrier) instead.
///
/// # Waiting never hangs
///
/// A waiter reads the key and watches it from the revision after that read, so a release
/// between the two is not missed. If the watch breaks or its start is compacted, the waiter
/// reads the key again. A release that is followed at once by a new hold still lets the
/// waiters of the first hold go: they saw the delete, or, reading again, a hold other than
/// the one they waited at (another create revision). Go 3.4's `Barrier.Wait` can hang: it
/// watches from the read's revision for a put *and then* a delete, and the put it waits for
/// usually happened before.
///
/// # A holder that dies
///
/// [`hold()`](Barrier::hold) writes a key without a lease, like Go: it stays until someone
/// releases it, even if the holder's process is gone.
/// [`hold_while(session)`](Barrier::hold_while) binds the key to a session's lease instead,
/// so the barrier is released when the holder's session ends.
///
/// # Key layout
///
/// The key is `NAME` itself, with an empty value: the key of Go's
/// `recipe.NewBarrier(client, NAME)`, so Go and Baton hold and wait at one barrier.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// let barrier = baton::Barrier::new(&client, "deploy/gate")?;
/// assert!(barrier.hold().await?);
///
/// let worker = tokio::spawn({
///     let barrier = barrier.clone();
///     async move { barrier.wait().await }
/// });
/// barrier.release().await?;
/// worker.await.expect("worker panicked")?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Barrier {
    client: Client,
    name: String,
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier").field("name", &self.name).finish()
    }
}

impl Barrier {
    /// The barrier named `name` (its key is `name`).
    ///
    /// Fails with [`Error::InvalidArgument`](crate::Error::InvalidArgument) if the name is
    /// empty, longer than 1 KiB, or contains a NUL byte.
    pub fn new(client: &Client, name: &str) -> Result<Barrier> {
        validate_name(name)?;
        Ok(Barrier {
            client: client.clone(),
            name: name.to_string(),
        })
    }

    /// The barrier's name, which is also its key.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hold the barrier: create its key, with no lease, if it does not exist. Returns
    /// `true` if this call raised it, `false` if it was already held.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the barrier may or may not have been raised.
    pub async fn hold(&self) -> Result<bool> {
        self.raise(0).await
    }

    /// Hold the barrier while `session` lives: like [`hold()`](Barrier::hold), but the key
    /// is bound to the session's lease, so the barrier is released when the session ends
    /// (closed, dropped, or its process dead and its lease expired).
    ///
    /// If the barrier was already held, it is left as it is and `false` is returned.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the barrier may or may not have been raised.
    pub async fn hold_while(&self, session: &Session) -> Result<bool> {
        session.check_alive()?;
        self.raise(session.lease_id()).await
    }

    async fn raise(&self, lease: LeaseId) -> Result<bool> {
        let key = self.name.as_bytes();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, "", lease)]);
        let raised = self
            .client
            .store()
            .txn(txn)
            .instrument(tracing::debug_span!("hold", barrier = %self.name))
            .await?
            .succeeded;
        tracing::debug!(barrier = %self.name, raised, "hold");
        Ok(raised)
    }

    /// Release the barrier: delete its key, letting every waiter go. Returns `true` if it
    /// was held.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the barrier may or may not have been released.
    pub async fn release(&self) -> Result<bool> {
        let (deleted, _) = self
            .client
            .store()
            .delete(KeyRange::key(self.name.as_bytes()))
            .instrument(tracing::debug_span!("release", barrier = %self.name))
            .await?;
        Ok(deleted > 0)
    }

    /// True if the barrier is held now.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn is_held(&self) -> Result<bool> {
        let resp = self
            .client
            .store()
            .range(Range::key(self.name.as_bytes()))
            .await?;
        Ok(!resp.kvs.is_empty())
    }

    /// Wait until the barrier is released. Returns at once if it is not held.
    ///
    /// Failed reads and broken watches are retried with backoff until the barrier is seen
    /// released; bound the wait with [`wait_timeout`](Barrier::wait_timeout).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: waiting leaves nothing in the store.
    pub async fn wait(&self) -> Result<()> {
        self.wait_released()
            .instrument(tracing::debug_span!("wait", barrier = %self.name))
            .await
    }

    /// [`wait()`](Barrier::wait), giving up with
    /// [`Error::Timeout`](crate::Error::Timeout) after `timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait_timeout(&self, timeout: Duration) -> Result<()> {
        with_timeout("barrier wait", timeout, self.wait()).await
    }

    async fn wait_released(&self) -> Result<()> {
        let key = self.name.as_bytes();
        // The hold we wait at is the first one read: a key held again since (another
        // create revision) means it was released meanwhile, seen only by a read made after
        // a broken watch or before a watch that started late (found by review: such a
        // waiter waited for the next release, which may never come).
        let mut first = None;
        wait_key(
            self.client.store(),
            self.client.hub(),
            key,
            Until::Deleted,
            |kv| {
                Ok(kv.is_none_or(|kv| {
                    *first.get_or_insert(kv.create_revision) != kv.create_revision
                }))
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hold_release_wait() {
        let client = Client::memory();
        let b = Barrier::new(&client, "b").unwrap();
        b.wait().await.unwrap(); // not held: at once
        assert!(b.hold().await.unwrap());
        assert!(!b.hold().await.unwrap());
        assert!(b.is_held().await.unwrap());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.wait().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        let err = b.wait_timeout(Duration::from_millis(10)).await.unwrap_err();
        assert!(err.is_timeout());
        // Released and held again at once: the waiters of the first hold still go.
        assert!(b.release().await.unwrap());
        assert!(b.hold().await.unwrap());
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert!(b.release().await.unwrap());
        assert!(!b.release().await.unwrap());
    }

    #[tokio::test]
    async fn hold_while_a_session_lives() {
        let client = Client::memory();
        let session = Session::new(&client).await.unwrap();
        let b = Barrier::new(&client, "b").unwrap();
        assert!(b.hold_while(&session).await.unwrap());
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.wait().await }
        });
        session.close().await.unwrap();
        waiter.await.unwrap().unwrap();
        assert!(!b.is_held().await.unwrap());
        let err = b.hold_while(&session).await.unwrap_err();
        assert!(err.is_lost(), "{err}");
    }

    #[tokio::test]
    async fn wait_survives_compaction() {
        let client = Client::memory();
        let b = Barrier::new(&client, "b").unwrap();
        b.hold().await.unwrap();
        let store = client.store().clone();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Churn and compact everything the waiter's watch started from, then release.
        let mut rev = 0;
        for i in 0..5 {
            rev = store
                .put(b"other", format!("{i}").as_bytes(), 0)
                .await
                .unwrap();
        }
        store.compact(rev).await.unwrap();
        b.release().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("wait hung")
            .unwrap()
            .unwrap();
        assert!(Barrier::new(&client, "").is_err());
    }

    /// The waiter's watch breaks (a dropped stream); while it backs off, the barrier is
    /// released and held again. Its next read finds a hold, but not the one it waited at:
    /// it goes, as the waiters of a first hold do. It waited for the next release before
    /// (found by review).
    #[tokio::test]
    async fn a_release_while_the_watch_is_broken_is_not_missed() {
        use crate::store::slow::SlowWatches;
        let store = std::sync::Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        *store.end_watch_on.lock().unwrap() = Some((b"b".to_vec(), false));
        let client = Client::from_arc(store.clone());
        let b = Barrier::new(&client, "b").unwrap();
        assert!(b.hold().await.unwrap());
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.wait().await }
        });
        // Read, watch broken, backing off.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(b.release().await.unwrap());
        assert!(b.hold().await.unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
        *store.end_watch_on.lock().unwrap() = None;
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("the first hold was released, but the waiter still waits")
            .unwrap()
            .unwrap();
    }
}
