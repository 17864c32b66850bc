//! A distributed mutex, wire-compatible with Go's `concurrency.Mutex` and `etcdctl lock`.

use std::fmt;
use std::time::Duration;

use tracing::Instrument;

use crate::error::{Error, Result};
use crate::names::{lease_key, validate_name, Queue};
use crate::queue::{held_accessors, with_timeout_settled, Entry, Held};
use crate::session::Session;

/// A fair, distributed mutual-exclusion lock.
///
/// Waiters queue by the create revision of their key and each waits only for its
/// predecessor, so a release wakes exactly one waiter. Every grant carries a
/// [fencing token](MutexGuard::fencing_token) that increases with every grant.
///
/// # Which lock, and what it guarantees
///
/// At most one [`MutexGuard`] for a name is live at a time, as long as every holder stops
/// acting when its guard's [`lost()`](MutexGuard::lost) fires. A holder that is paused (GC,
/// SIGSTOP, swapping) past its TTL cannot know it lost the lock: pass the fencing token to the
/// resource you protect, or use [`MutexGuard::txn`], so a stale holder's writes are refused.
///
/// # Key layout
///
/// The key is `NAME/` followed by the session's lease id in lowercase hex, with an empty
/// value, bound to the lease: the same key Go's `concurrency.NewMutex(session, NAME)` and
/// `etcdctl lock NAME` create, so Go services, `etcdctl` and Baton can share one lock. Keys of
/// nested names (`NAME/sub/…`) are not part of this lock's queue, so locks `a` and `a/b` are
/// independent (Go's Mutex would make `a` wait for `a/b`).
///
/// With Go or `etcdctl` clients on the name, free a stuck Go holder by deleting its key
/// (`etcdctl del KEY`), not by overwriting it with no lease (`etcdctl put KEY ""`): Baton
/// counts such a key in no queue, but Go's waiters still wait for it. Free no Go waiter's
/// place, by either: Go's `Mutex` (etcd 3.4) does not look at its own key after waiting, so
/// it takes the lock beside the Baton waiter granted behind it.
///
/// A session has one key per name: locking the same name twice through one session fails
/// with [`Error::AlreadyHeld`] instead of deadlocking.
///
/// A session that resumed a lease ([`with_lease`](crate::SessionBuilder::with_lease)) adopts
/// the key it finds under its name if the key is still bound to that lease (same fencing
/// token), as Go does. Unlike Go, it never adopts one overwritten with no lease (freed by an
/// operator: another session may hold the lock since); see `with_lease`.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// let session = baton::Session::new(&client).await?;
/// let mutex = baton::Mutex::new(&session, "jobs/nightly-report")?;
///
/// let guard = mutex.lock().await?;
/// println!("holding {} with token {}", guard.key(), guard.fencing_token());
/// guard.unlock().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Mutex {
    session: Session,
    name: String,
    prefix: String,
    key: String,
}

impl fmt::Debug for Mutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mutex")
            .field("name", &self.name)
            .field("key", &self.key)
            .finish()
    }
}

impl Mutex {
    /// A mutex named `name`, acquired through `session`.
    ///
    /// Fails with [`Error::InvalidArgument`] if the name is empty, longer than 1 KiB, or
    /// contains a NUL byte.
    pub fn new(session: &Session, name: &str) -> Result<Mutex> {
        validate_name(name)?;
        let prefix = format!("{name}/");
        let key = lease_key(&prefix, session.lease_id());
        Ok(Mutex {
            session: session.clone(),
            name: name.to_string(),
            prefix,
            key,
        })
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// After a [`lock()`](Mutex::lock) of this handle was dropped (a timeout around it):
    /// wait, at most 500 ms, until our key's removal is done.
    pub(crate) async fn settle(&self) {
        crate::queue::settle(&self.session, &self.key, "lock").await;
    }

    /// The key this session uses for the lock: `NAME/<lease id in hex>`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Wait until the lock is ours.
    ///
    /// Fails with [`Error::SessionLost`] if the session is lost while waiting, and with
    /// [`Error::NotHeld`] if our queued key vanished (for example an admin deleted it), or
    /// was overwritten with no lease (`etcdctl put KEY ""`, which frees its place): a waiter
    /// is never told it holds a lock it does not hold.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. Dropping the future removes our waiter key (in a task spawned on the
    /// current runtime, after any request still in flight has been answered), so nothing is
    /// left in the queue. If the store cannot be reached, that removal is retried in the
    /// background until it can, or until the session is lost or closed (its lease then takes
    /// the key); meanwhile this session's `try_lock()` of the same name fails at once with a
    /// retryable error, and its `lock()` waits for the removal.
    pub async fn lock(&self) -> Result<MutexGuard> {
        self.acquire(false)
            .instrument(tracing::debug_span!("acquire", lock = %self.name))
            .await
    }

    /// [`lock()`](Mutex::lock), giving up with [`Error::Timeout`] after `timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`lock()`](Mutex::lock). On timeout the waiter key is removed
    /// before the error is returned (if the store does not confirm it within 500 ms, the
    /// removal goes on in the background, as for a dropped [`lock()`](Mutex::lock)).
    pub async fn lock_timeout(&self, timeout: Duration) -> Result<MutexGuard> {
        with_timeout_settled(&self.session, &self.key, "lock", timeout, self.lock()).await
    }

    /// Take the lock if it is free, without waiting.
    ///
    /// Fails with [`Error::Locked`] if another owner holds it; our key is removed before the
    /// error is returned. It makes one attempt: if the store cannot be reached, it fails at
    /// once with the store's (retryable) error, where [`lock()`](Mutex::lock) retries.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`lock()`](Mutex::lock).
    pub async fn try_lock(&self) -> Result<MutexGuard> {
        self.acquire(true)
            .instrument(tracing::debug_span!("try_acquire", lock = %self.name))
            .await
    }

    async fn acquire(&self, try_only: bool) -> Result<MutexGuard> {
        let queue = Queue::direct(&self.prefix);
        let mut entry =
            Entry::join(&self.session, &self.name, queue, &self.key, b"", try_only).await?;
        if !entry.at_head() {
            if try_only {
                entry.abandon().await;
                return Err(Error::Locked {
                    name: self.name.clone(),
                });
            }
            entry.wait().await?;
        }
        Ok(MutexGuard {
            name: self.name.clone(),
            held: entry.into_held(),
        })
    }
}

/// Proof that this process holds a [`Mutex`]. Release it with
/// [`unlock()`](MutexGuard::unlock).
///
/// # Drop behaviour
///
/// Dropping the guard releases the lock in a task spawned on the current tokio runtime
/// (compare-and-delete, best effort). Without a runtime, or if that fails, the key stays until
/// the session's lease ends, and so it does if the runtime shuts down first (a guard dropped
/// as `#[tokio::main]` returns). Call [`unlock()`](MutexGuard::unlock) to release and see the
/// result.
#[must_use = "if unused the lock is released at once"]
pub struct MutexGuard {
    name: String,
    held: Held,
}

impl fmt::Debug for MutexGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MutexGuard")
            .field("key", &self.key())
            .field("fencing_token", &self.fencing_token())
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl MutexGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    held_accessors!("lock");

    /// Release the lock: delete our key if it is still ours (compare-and-delete on the create
    /// revision and the lease, never a plain delete).
    ///
    /// Returns [`Error::NotHeld`] if the lock had already been lost.
    ///
    /// A key an operator freed by overwriting it with no lease (`etcdctl put KEY ""`, which
    /// keeps its create revision; another session may hold the lock since) counts as lost:
    /// `NotHeld`, and the freed key is removed (it would never expire). A key bound to another
    /// lease is another owner's and left alone.
    ///
    /// A retryable error ([`Error::is_retryable`]: the store could not be reached, or its
    /// answer was lost) leaves the outcome unknown: the release is finished in the
    /// background, retried until the store answers (our key is deleted then if it is still
    /// ours), and the key expires with the session's lease at the latest. There is nothing
    /// to call again.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the release may or may not have happened; the key expires
    /// with the session's lease at the latest.
    pub async fn unlock(self) -> Result<()> {
        self.held.release("unlock").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client on a store of its own, for a test with a paused clock. Not `mem://`: that
    /// store is shared by every test of the process, which run at once on runtimes with
    /// clocks of their own, and it expires leases by the clock of whichever runtime
    /// touches it. A paused clock that has jumped ahead (a test that waits out a 30 s
    /// re-read, twice) thus expired the 60 s leases of the tests running beside it: a
    /// holder's key deleted early granted its waiter the lock (shown by an operation from a
    /// thread with a paused clock 2 minutes ahead, between the lock and the overwrite of
    /// the test below: it failed every time); and its own sessions were lost.
    fn paused_clock_store() -> crate::Client {
        crate::Client::memory()
    }

    fn bounds() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Mutex>();
        check::<MutexGuard>();
        check::<Session>();
    }

    #[test]
    fn types_are_send_and_sync() {
        bounds();
    }

    /// `granted_revision()`: the join's revision when the lock was free (the key's create
    /// revision), else one after the predecessor's release; it rises from grant to grant.
    #[tokio::test]
    async fn granted_revisions_rise_from_holder_to_holder() {
        let client = crate::Client::memory();
        let mut sessions = Vec::new();
        for _ in 0..3 {
            sessions.push(Session::new(&client).await.unwrap());
        }
        let first = Mutex::new(&sessions[0], "granted")
            .unwrap()
            .lock()
            .await
            .unwrap();
        assert_eq!(first.granted_revision(), first.fencing_token());
        let mut waiting = Vec::new();
        for s in &sessions[1..] {
            let m = Mutex::new(s, "granted").unwrap();
            waiting.push(tokio::spawn(async move { m.lock().await }));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mut last = first.granted_revision();
        first.unlock().await.unwrap();
        for w in waiting {
            let g = w.await.unwrap().unwrap();
            assert!(
                g.granted_revision() > last,
                "{} <= {last}",
                g.granted_revision()
            );
            assert!(g.granted_revision() > g.fencing_token());
            last = g.granted_revision();
            g.unlock().await.unwrap();
        }
    }

    /// The embedded store, with the next scan of a queue (a sorted range with no limit, in
    /// a transaction) held while `armed`, until the test lets it go: the scan a join makes
    /// when a nested name's key is among the last keys created (`HeadSeen::Unknown`).
    #[derive(Debug)]
    struct GatedScan {
        inner: crate::store::mem::MemStore,
        armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
        reached: std::sync::Arc<tokio::sync::Notify>,
        proceed: std::sync::Arc<tokio::sync::Notify>,
    }

    #[async_trait::async_trait]
    impl crate::store::slow::Hooks for GatedScan {
        fn inner(&self) -> &dyn crate::store::Store {
            &self.inner
        }
        async fn txn(&self, txn: crate::store::Txn) -> Result<crate::store::TxnResponse> {
            let scans = txn.success.iter().any(|op| {
                matches!(op, crate::store::TxnOp::Get(r)
                    if matches!(r.sort, Some((crate::store::SortTarget::CreateRevision, _)))
                        && r.limit == 0)
            });
            if scans && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                self.reached.notify_one();
                self.proceed.notified().await;
            }
            crate::store::Store::txn(&self.inner, txn).await
        }
    }

    /// Found by the second review of entry 69: a join that has to scan for the head (a
    /// nested name's key among the last keys created) and finds itself at the head took the
    /// join's header revision for its grant, not the scan's. A waiter ahead of it that was
    /// granted (and released) between the join and the scan has a greater
    /// `granted_revision()` than ours, though granted before us.
    #[tokio::test]
    async fn granted_revision_rises_when_the_join_scans_for_the_head() {
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reached = std::sync::Arc::new(tokio::sync::Notify::new());
        let proceed = std::sync::Arc::new(tokio::sync::Notify::new());
        let client = crate::Client::from_store(GatedScan {
            inner: crate::store::mem::MemStore::new(),
            armed: armed.clone(),
            reached: reached.clone(),
            proceed: proceed.clone(),
        });
        let mut s = Vec::new();
        for _ in 0..4 {
            s.push(Session::new(&client).await.unwrap());
        }
        let holder = Mutex::new(&s[0], "g").unwrap().lock().await.unwrap();
        let waiter = Mutex::new(&s[1], "g").unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<i64>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let waiting = tokio::spawn(async move {
            let g = waiter.lock().await.unwrap();
            let _ = tx.send(g.granted_revision());
            let _ = done_rx.await;
            g.unlock().await.unwrap();
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A nested name's key, created after the waiter's: among the last keys created.
        let _nested = Mutex::new(&s[2], "g/sub").unwrap().lock().await.unwrap();
        armed.store(true, std::sync::atomic::Ordering::SeqCst);
        let ours = Mutex::new(&s[3], "g").unwrap();
        let ours = tokio::spawn(async move { ours.lock().await });
        // Our join is done and its scan waits: the holder goes, the waiter is granted and
        // goes too.
        reached.notified().await;
        holder.unlock().await.unwrap();
        let waiters = rx.await.unwrap();
        let _ = done_tx.send(());
        waiting.await.unwrap();
        proceed.notify_one();
        let ours = ours.await.unwrap().unwrap();
        assert!(
            ours.granted_revision() > waiters,
            "granted after the waiter, at {} <= the waiter's {waiters}",
            ours.granted_revision()
        );
    }

    /// A key under our name (`NAME/<our lease>`) that is bound to another lease is
    /// another owner's (an operator's `etcdctl put --lease`): it counts in the queue as
    /// theirs. `lock()` neither adopts it (before the fix it did, with its create revision as
    /// our fencing token) nor removes it: `InvalidData` at once, naming the lease, and the key
    /// is left as it was.
    #[tokio::test]
    async fn a_key_of_ours_bound_to_another_lease_is_neither_adopted_nor_removed() {
        use crate::store::Range;
        use std::time::Duration;
        let client = crate::Client::connect("mem://").await.unwrap();
        let session = Session::new(&client).await.unwrap();
        let theirs = client
            .store()
            .lease_grant(Duration::from_secs(30))
            .await
            .unwrap()
            .id;
        let key = format!("foreign/{:x}", session.lease_id());
        client
            .store()
            .put(key.as_bytes(), b"", theirs)
            .await
            .unwrap();
        let before = client.store().range(Range::key(key.as_bytes())).await;
        let m = Mutex::new(&session, "foreign").unwrap();
        for try_only in [false, true] {
            let r = match try_only {
                false => m.lock_timeout(Duration::from_secs(2)).await,
                true => m.try_lock().await,
            };
            match r {
                Err(e @ crate::Error::InvalidData { .. }) => {
                    assert!(e.to_string().contains(&format!("{theirs:x}")), "{e}");
                    assert!(e.is_invalid_input());
                }
                other => panic!("try: {try_only}: {other:?}"),
            }
        }
        let after = client.store().range(Range::key(key.as_bytes())).await;
        assert_eq!(after.unwrap().kvs, before.unwrap().kvs);
        client.store().lease_revoke(theirs).await.unwrap();
        m.try_lock().await.unwrap().unlock().await.unwrap();
        session.close().await.unwrap();
    }

    /// A key of ours bound to no lease is removed (it was freed) and the join made afresh,
    /// a few times at most: a key written again with no lease before each removal (a
    /// writer that keeps overwriting it) fails the lock with `Conflict`, not a loop for
    /// ever; the key is left as the writer left it.
    #[tokio::test]
    async fn a_key_of_ours_rewritten_without_a_lease_again_and_again_gives_up() {
        use crate::store::slow::SlowWatches;
        use crate::store::{Range, Store, Txn, TxnOp};
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        use std::time::Duration;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = crate::Client::from_arc(store.clone());
        let session = Session::new(&client).await.unwrap();
        let key = format!("busy/{:x}", session.lease_id());
        let overwrite = Txn::new().and_then([TxnOp::put(key.as_bytes(), b"", 0)]);
        *store.before_every_txn.lock().unwrap() = Some(overwrite);
        let sent = store.txns.load(Ordering::Relaxed);
        let r = Mutex::new(&session, "busy").unwrap().lock().await;
        assert!(
            matches!(r, Err(crate::Error::Conflict { attempts: 3 })),
            "{r:?}"
        );
        // Three joins and three removals that found the key rewritten, and the last join.
        assert_eq!(store.txns.load(Ordering::Relaxed) - sent, 7);
        *store.before_every_txn.lock().unwrap() = None;
        let kvs = store.range(Range::key(key.as_bytes())).await.unwrap().kvs;
        assert_eq!(kvs.len(), 1);
        assert_eq!(kvs[0].lease, 0);
        // Left alone, it is removed and the lock taken, in three transactions.
        let sent = store.txns.load(Ordering::Relaxed);
        let g = Mutex::new(&session, "busy").unwrap().lock().await.unwrap();
        assert_eq!(store.txns.load(Ordering::Relaxed) - sent, 3);
        assert!(g.fencing_token() > kvs[0].mod_revision);
        g.unlock().await.unwrap();
        session.close().await.unwrap();
    }

    /// A lock given up (its timeout) while its join is retried after a failure that was in
    /// fact applied (the reply lost) leaves no key behind: nobody else is locked out.
    #[tokio::test]
    async fn a_join_applied_but_unanswered_leaves_no_key() {
        use crate::store::slow::SlowWatches;
        use crate::store::Store;
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        use std::time::Duration;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = crate::Client::from_arc(store.clone());
        let (mine, theirs) = (
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
        );
        store.lose_next_reply.store(true, Ordering::Relaxed);
        let gave_up = Mutex::new(&mine, "m")
            .unwrap()
            .lock_timeout(Duration::from_millis(20))
            .await;
        assert!(gave_up.unwrap_err().is_timeout());
        let other = Mutex::new(&theirs, "m").unwrap();
        let mut got = None;
        for _ in 0..100 {
            if let Ok(g) = other.try_lock().await {
                got = Some(g);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let g = got.expect("the abandoned join's key still locks everyone out");
        let keys = store
            .range(crate::store::Range::prefix("m/"))
            .await
            .unwrap();
        assert_eq!(keys.kvs.len(), 1);
        g.unlock().await.unwrap();
    }

    /// A lock given up after a join that was applied but not answered, while the store's
    /// key-value service stays down for longer than the join is retried (15 s) but the
    /// session lives (its keep-alives work): the key the join put is still removed once the
    /// store is back, so another session gets the lock. (Found by review: the search for
    /// the key gave up after 15 s of errors, and the key stayed as long as the session.)
    #[tokio::test(start_paused = true)]
    async fn a_join_applied_but_unanswered_is_removed_after_a_long_outage() {
        abandoned_join_is_removed("orphan", |store| &store.lose_next_reply).await;
    }

    /// As above, but the join request that went unanswered is applied late: it waited at a
    /// server that stopped answering and lands just after the first read that gets through
    /// once the server answers again, so that read finds no key. The key is looked for again
    /// a request timeout later and removed.
    #[tokio::test(start_paused = true)]
    async fn a_join_applied_late_is_removed() {
        abandoned_join_is_removed("late", |store| &store.put_lands_after_next_read).await;
    }

    /// A `lock_timeout` on `name` whose join meets the fault `armed` sets (cleared once it
    /// happened) is given up while the store's key-value service is down for 20 s (longer
    /// than a join is retried) and the session lives: 5 s after the store is back, the key is
    /// gone and another session gets the lock.
    async fn abandoned_join_is_removed(
        name: &str,
        armed: fn(&crate::store::slow::SlowWatches) -> &std::sync::atomic::AtomicBool,
    ) {
        use crate::store::slow::SlowWatches;
        use crate::store::Store;
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        use std::time::Duration;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        *store.request_timeout.lock().unwrap() = Some(Duration::from_secs(1));
        let client = crate::Client::from_arc(store.clone());
        let mine = Session::new(&client).await.unwrap();
        let theirs = Session::new(&client).await.unwrap();
        armed(&store).store(true, Ordering::Relaxed);
        let m = Mutex::new(&mine, name).unwrap();
        let locking =
            tokio::spawn(async move { m.lock_timeout(Duration::from_secs(5)).await.map(|_| ()) });
        while armed(&store).load(Ordering::Relaxed) {
            tokio::task::yield_now().await;
        }
        // Reads and writes fail; the leases keep working.
        store.kv_down.store(true, Ordering::Relaxed);
        assert!(locking.await.unwrap().is_err());
        tokio::time::sleep(Duration::from_secs(20)).await;
        store.kv_down.store(false, Ordering::Relaxed);
        // Well within the session's TTL of the outage's end.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!mine.is_lost());
        let keys = store
            .range(crate::store::Range::prefix(format!("{name}/")))
            .await
            .unwrap();
        assert!(keys.kvs.is_empty(), "{name}: the join's key is still there");
        let got = Mutex::new(&theirs, name)
            .unwrap()
            .lock_timeout(Duration::from_secs(60))
            .await;
        assert!(got.is_ok(), "{name}: {:?}", got.err());
        got.unwrap().unlock().await.unwrap();
    }

    /// An admin overwrites a held key without a lease (`etcdctl put NAME/<lease> ""`): the
    /// key stops counting as a member of the queue (`Queue::admits` needs a lease), so a
    /// second session is granted the lock. The holder is told it lost the lock (found by
    /// review: it was never told, and two sessions held the lock for good). Its key's own
    /// watch (a client that holds the name once) sees the overwrite; so does its client's
    /// shared watch on the name (`warm`: a client that held the name a moment ago), which
    /// heard deletes only before: such a holder was not told until its next write or unlock.
    #[tokio::test]
    async fn a_held_key_overwritten_without_a_lease_is_lost() {
        for warm in [false, true] {
            held_key_overwritten_without_a_lease_is_lost(warm).await;
        }
    }

    /// Lock and unlock `name` twice on `session`, then let its client's shared watch of the
    /// name open: the next hold's loss is watched through it.
    async fn warm_up(session: &Session, name: &str) {
        for _ in 0..2 {
            let m = Mutex::new(session, name).unwrap();
            m.lock().await.unwrap().unlock().await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }

    async fn held_key_overwritten_without_a_lease_is_lost(warm: bool) {
        use std::time::Duration;
        let client = crate::Client::connect("mem://").await.unwrap();
        let holder = Session::new(&client).await.unwrap();
        let other = Session::new(&client).await.unwrap();
        let name = format!("own-{warm}");
        if warm {
            warm_up(&holder, &name).await;
        }
        let held = Mutex::new(&holder, &name).unwrap().lock().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        client
            .store()
            .put(held.key().as_bytes(), b"", 0)
            .await
            .unwrap();
        let got = Mutex::new(&other, &name)
            .unwrap()
            .lock_timeout(Duration::from_secs(2))
            .await;
        assert!(got.is_ok(), "{:?}", got.err());
        tokio::time::timeout(Duration::from_secs(2), held.lost())
            .await
            .expect("a second holder, and the first never told");
        assert_eq!(held.lost_reason().as_deref(), Some("key overwritten"));
        assert!(!holder.is_lost());
        // Its unlock says it was lost, and the key is still removed (same create
        // revision), in the background.
        let key = held.key().to_string();
        assert!(matches!(
            held.unlock().await,
            Err(crate::Error::NotHeld { .. })
        ));
        let removed = async {
            while !client
                .store()
                .range(crate::store::Range::key(key.as_bytes()))
                .await
                .unwrap()
                .kvs
                .is_empty()
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(2), removed)
            .await
            .expect("the overwritten key was not removed");
    }

    /// A waiter deep in a long queue, on a client with no shared watch of the name (it
    /// watches its predecessor's key and its own), whose own key is overwritten with no
    /// lease or bound to another lease: `NotHeld` at once. Bound to another lease, it was
    /// not told (found by review of entry 44: its own key was watched as a predecessor's is,
    /// gone only without a lease).
    #[tokio::test]
    async fn a_long_queue_waiter_whose_key_is_overwritten_is_not_held() {
        for rebind in [false, true] {
            let store: std::sync::Arc<dyn crate::store::Store> =
                std::sync::Arc::new(crate::store::mem::MemStore::new());
            let others = crate::Client::from_arc(store.clone());
            let name = format!("overwritten-long-{rebind}");
            let holder = Session::new(&others).await.unwrap();
            let _held = Mutex::new(&holder, &name).unwrap().lock().await.unwrap();
            let mut queued = Vec::new();
            for _ in 0..10 {
                let s = Session::new(&others).await.unwrap();
                let m = Mutex::new(&s, &name).unwrap();
                queued.push(tokio::spawn(async move { (m.lock().await.map(|_| ()), s) }));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let lone = crate::Client::from_arc(store.clone());
            let me = Session::new(&lone).await.unwrap();
            let m = Mutex::new(&me, &name).unwrap();
            let key = m.key().to_string();
            let w = tokio::spawn(async move { m.lock().await.map(|g| g.key().to_string()) });
            tokio::time::sleep(Duration::from_millis(300)).await;
            let prefix = format!("{name}/");
            assert!(!lone.hub().is_live(prefix.as_bytes()), "on a shared watch");
            let other = Session::new(&others).await.unwrap();
            let lease = if rebind { other.lease_id() } else { 0 };
            store.put(key.as_bytes(), b"", lease).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(2), w)
                .await
                .unwrap_or_else(|_| panic!("rebind {rebind}: not told within 2 s"))
                .unwrap();
            assert!(matches!(got, Err(crate::Error::NotHeld { .. })), "{got:?}");
            for q in queued {
                q.abort();
            }
        }
    }

    /// A holder's key bound to another lease by an operator (`etcdctl put --lease=OTHER
    /// KEY`): the key is no longer the holder's (the other lease's end takes it, and
    /// `etcdctl` may delete it as that lease's), and the holder hears of it at once, also
    /// through its client's shared watch on the name (a name it held a moment before),
    /// which sent it nothing: it learned only at its next write or release (found by a
    /// review of entry 42).
    #[tokio::test]
    async fn a_held_key_bound_to_another_lease_is_lost() {
        for warm in [false, true] {
            let client = crate::Client::connect("mem://").await.unwrap();
            let holder = Session::new(&client).await.unwrap();
            let other = Session::new(&client).await.unwrap();
            let name = format!("rebound-{warm}");
            if warm {
                warm_up(&holder, &name).await;
                assert!(client.hub().is_live(format!("{name}/").as_bytes()));
            }
            let held = Mutex::new(&holder, &name).unwrap().lock().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!held.is_lost());
            client
                .store()
                .put(held.key().as_bytes(), b"", other.lease_id())
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(2), held.lost())
                .await
                .unwrap_or_else(|_| panic!("warm {warm}: never told"));
            assert_eq!(held.lost_reason().as_deref(), Some("key overwritten"));
            assert!(!holder.is_lost());
            assert!(matches!(
                held.unlock().await,
                Err(crate::Error::NotHeld { .. })
            ));
            // Another owner's key: left alone.
            let kvs = client
                .store()
                .range(crate::store::Range::prefix(format!("{name}/")))
                .await
                .unwrap()
                .kvs;
            assert_eq!(kvs.len(), 1);
            assert_eq!(kvs[0].lease, other.lease_id());
        }
    }

    /// The holder's key overwritten without a lease (an operator's `etcdctl put`) after its
    /// holder stopped without releasing (crashed, or its task hung): the key no longer
    /// counts as a member, but is never deleted, and the waiter behind it, which waits for
    /// its delete, waited for good (found by a review, for elections). The waiter reads
    /// again now and then while it waits, and takes the lock.
    ///
    /// Like every test with a paused clock, it uses a store of its own (see
    /// [`paused_clock_store`]).
    #[tokio::test(start_paused = true)]
    async fn a_waiter_behind_a_key_overwritten_without_a_lease_gets_the_lock() {
        use std::time::Duration;
        for shared in [false, true] {
            let client = paused_clock_store();
            let holder = Session::new(&client).await.unwrap();
            let waiter = Session::new(&client).await.unwrap();
            let name = if shared { "shared" } else { "own" };
            let held = Mutex::new(&holder, name).unwrap().lock().await.unwrap();
            if shared {
                // The client's shared watch on the queue is live (a second hold of the name).
                let again = Mutex::new(&waiter, name).unwrap();
                assert!(again.try_lock().await.is_err());
            }
            let mutex = Mutex::new(&waiter, name).unwrap();
            let waiting = tokio::spawn(async move { mutex.lock().await });
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!waiting.is_finished());
            // The holder stops without releasing; an operator overwrites its key.
            let key = held.key().to_string();
            std::mem::forget(held);
            client.store().put(key.as_bytes(), b"x", 0).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(120), waiting)
                .await
                .expect("the waiter waited for good behind a key that is no member")
                .unwrap();
            assert!(got.is_ok(), "shared {shared}: {:?}", got.err());
            drop(got);
        }
    }

    /// The same, with a waiter between them that leaves: the last waiter, which saw the
    /// whole queue when it joined, waits on the shared watch for each key ahead to go, the
    /// overwritten one too (found by a second look: it waited for good there). It now
    /// hears the overwrite on that watch, and gets the lock well within the 30 s after
    /// which it would read again anyway (`wait::RECHECK`), where it used to wait for that
    /// read. On the process-wide `mem://` store it failed now and then: see
    /// [`paused_clock_store`].
    #[tokio::test(start_paused = true)]
    async fn a_waiter_behind_a_leaver_and_a_key_overwritten_without_a_lease_gets_the_lock() {
        use std::time::Duration;
        let client = paused_clock_store();
        let a = Session::new(&client).await.unwrap();
        let b = Session::new(&client).await.unwrap();
        let c = Session::new(&client).await.unwrap();
        let held = Mutex::new(&a, "m").unwrap().lock().await.unwrap();
        let mb = Mutex::new(&b, "m").unwrap();
        let b_waiting = tokio::spawn(async move { mb.lock_timeout(Duration::from_secs(1)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mc = Mutex::new(&c, "m").unwrap();
        let c_waiting = tokio::spawn(async move { mc.lock().await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let key = held.key().to_string();
        std::mem::forget(held);
        // B gives up: its key is deleted. C now waits for A's key alone.
        let b_got = b_waiting.await.unwrap();
        assert!(b_got.unwrap_err().is_timeout());
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.store().put(key.as_bytes(), b"x", 0).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), c_waiting)
            .await
            .expect("the last waiter did not hear that the key ahead was freed")
            .unwrap();
        assert!(got.is_ok(), "{:?}", got.err());
    }

    /// The session is lost while `lock()` retries a join the store does not answer: the
    /// error is `SessionLost`, as documented, not the store's retryable error (found by
    /// review: it was the last store error, "store down").
    #[tokio::test(start_paused = true)]
    async fn a_session_lost_while_the_join_is_retried_is_session_lost() {
        use crate::store::slow::SlowWatches;
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        use std::time::Duration;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = crate::Client::from_arc(store.clone());
        let session = Session::new(&client).await.unwrap();
        store.kv_down.store(true, Ordering::Relaxed);
        let mutex = Mutex::new(&session, "gone").unwrap();
        let locking = tokio::spawn(async move { mutex.lock().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_secs(2)).await;
        session.close().await.unwrap();
        let err = locking.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::SessionLost { .. }), "{err:?}");
    }

    /// An unlock given up with its delete in flight (a timeout around it) keeps the key
    /// claimed until the delete is settled: the same session locking the name again gets a
    /// new key, which the late delete cannot take.
    #[tokio::test]
    async fn a_cancelled_unlock_cannot_take_the_next_hold() {
        use crate::store::slow::SlowWatches;
        use crate::store::Store;
        use std::sync::Arc;
        use std::time::Duration;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = crate::Client::from_arc(store.clone());
        let session = Session::new(&client).await.unwrap();
        let mutex = Mutex::new(&session, "l").unwrap();
        let first = mutex.lock().await.unwrap();
        *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(300));
        let gave_up = tokio::time::timeout(Duration::from_millis(20), first.unlock()).await;
        assert!(gave_up.is_err(), "the unlock was not in flight");
        *store.delay_deletes.lock().unwrap() = None;
        let again = tokio::time::timeout(Duration::from_secs(5), mutex.lock())
            .await
            .expect("lock() hung")
            .unwrap();
        // The late delete has landed by now.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!again.is_lost(), "{:?}", again.lost_reason());
        let now = store
            .range(crate::store::Range::key(again.key()))
            .await
            .unwrap();
        assert_eq!(
            now.kvs.first().map(|kv| kv.create_revision),
            Some(again.fencing_token())
        );
        again.unlock().await.unwrap();
    }
    /// `try_lock` makes one attempt, also right after a release of the same name by the
    /// same session that the store did not answer (a dropped guard, a failed `unlock()`):
    /// it fails at once with a retryable error instead of waiting, for as long as the store
    /// is down, for that release to settle. Once the store is back, the release settles and
    /// `try_lock` succeeds. A `drop(guard); try_lock()` with the store up still succeeds
    /// (it waits for the release's one round trip).
    #[tokio::test]
    async fn try_lock_does_not_wait_for_a_release_the_store_did_not_answer() {
        use crate::store::slow::SlowWatches;
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        use std::time::Duration;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = crate::Client::from_arc(store.clone());
        let session = Session::new(&client).await.unwrap();
        let mutex = Mutex::new(&session, "t").unwrap();

        let guard = mutex.lock().await.unwrap();
        drop(guard);
        let again = tokio::time::timeout(Duration::from_secs(5), mutex.try_lock())
            .await
            .expect("try_lock hung")
            .expect("try_lock right after a drop, store up");

        store.kv_down.store(true, Ordering::Relaxed);
        let unlocked = again.unlock().await;
        assert!(unlocked.unwrap_err().is_retryable());
        let tried = tokio::time::timeout(Duration::from_secs(2), mutex.try_lock())
            .await
            .expect("try_lock waited for the unanswered release");
        let err = tried.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");

        let guard = {
            store.kv_down.store(false, Ordering::Relaxed);
            mutex.lock().await.unwrap()
        };
        store.kv_down.store(true, Ordering::Relaxed);
        drop(guard);
        // The background release's first attempt fails at once; give it that moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let tried = tokio::time::timeout(Duration::from_secs(2), mutex.try_lock())
            .await
            .expect("try_lock waited for the dropped guard's unanswered release");
        assert!(tried.unwrap_err().is_retryable());

        store.kv_down.store(false, Ordering::Relaxed);
        let back = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match mutex.try_lock().await {
                    Ok(g) => return g,
                    Err(e) => assert!(e.is_retryable(), "{e:?}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the release never settled once the store was back");
        back.unlock().await.unwrap();
    }
    /// `try_lock` that finds the lock held leaves the queue with one attempt: if the store
    /// goes down right then, it still answers `Locked` at once (the removal of its key goes
    /// on in the background) instead of waiting for the store (found by review: it waited
    /// as long as the store was down). Once the store is back, the key is removed and the
    /// waiter's session can take the lock after the holder.
    #[tokio::test]
    async fn try_lock_leaves_the_queue_with_one_attempt() {
        use crate::store::slow::SlowWatches;
        use crate::store::Store;
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        use std::time::Duration;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = crate::Client::from_arc(store.clone());
        let holder = Session::new(&client).await.unwrap();
        let held = Mutex::new(&holder, "t").unwrap().lock().await.unwrap();
        let other = Session::new(&client).await.unwrap();
        let mutex = Mutex::new(&other, "t").unwrap();
        store.down_at_next_delete.store(true, Ordering::Relaxed);
        let tried = tokio::time::timeout(Duration::from_secs(5), mutex.try_lock())
            .await
            .expect("try_lock waited for the store");
        assert!(
            matches!(tried, Err(crate::Error::Locked { .. })),
            "{tried:?}"
        );
        assert!(
            store.kv_down.load(Ordering::Relaxed),
            "the store never went down"
        );
        store.kv_down.store(false, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let keys = store
                    .range(crate::store::Range::prefix("t/"))
                    .await
                    .unwrap();
                if keys.kvs.len() == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the abandoned key was never removed");
        held.unlock().await.unwrap();
        let g = tokio::time::timeout(Duration::from_secs(5), mutex.lock())
            .await
            .expect("lock hung")
            .unwrap();
        g.unlock().await.unwrap();
    }

    /// An unlock after the key was freed by an operator's overwrite with no lease, and
    /// another session took the lock, says `NotHeld` (found by review: it said `Ok`, as its
    /// compare-and-delete compared the create revision alone, which an overwrite keeps; the
    /// holder, watched through its client's shared watch, which then heard deletes only, was
    /// never told). The freed key (no lease) is removed, by the unlock or (the holder told
    /// of its loss first: it now is, by that watch) by the release that a lost guard still
    /// runs in the background; one bound to another lease is left alone.
    #[tokio::test]
    async fn unlock_after_the_key_was_overwritten_says_not_held() {
        use crate::store::Range;
        use std::time::Duration;
        for bound_to_other in [false, true] {
            let client = crate::Client::memory();
            let s = Session::new(&client).await.unwrap();
            let other = Session::new(&client).await.unwrap();
            let m = Mutex::new(&s, "rv-unlock").unwrap();
            for _ in 0..2 {
                m.lock().await.unwrap().unlock().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let g = m.lock().await.unwrap();
            let lease = if bound_to_other { other.lease_id() } else { 0 };
            client
                .store()
                .put(g.key().as_bytes(), b"", lease)
                .await
                .unwrap();
            let theirs = match bound_to_other {
                // Bound to another lease, the key is a member of the queue: theirs.
                true => None,
                false => Some(
                    tokio::time::timeout(
                        Duration::from_secs(5),
                        Mutex::new(&other, "rv-unlock").unwrap().lock(),
                    )
                    .await
                    .unwrap()
                    .unwrap(),
                ),
            };
            tokio::time::sleep(Duration::from_millis(500)).await;
            let key = g.key().to_string();
            let r = g.unlock().await;
            assert!(
                matches!(r, Err(crate::Error::NotHeld { .. })),
                "{bound_to_other}: {r:?}"
            );
            let mut left = Vec::new();
            for _ in 0..100 {
                left = client
                    .store()
                    .range(Range::key(key.as_bytes()))
                    .await
                    .unwrap()
                    .kvs;
                if bound_to_other || left.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            match bound_to_other {
                true => assert_eq!(left.first().map(|kv| kv.lease), Some(other.lease_id())),
                false => assert!(left.is_empty(), "the freed key stays: {left:?}"),
            }
            if let Some(t) = theirs {
                assert!(!t.is_lost());
                t.unlock().await.unwrap();
            }
        }
    }

    /// A waiter whose key an operator overwrote with no lease (which frees its place: the
    /// key counts in no queue) is not granted when its predecessor goes (found by review:
    /// it was, woken by its client's shared watch, which then heard deletes only, beside a
    /// session that took the lock meanwhile, and neither was ever lost): `NotHeld`.
    #[tokio::test]
    async fn an_overwritten_waiter_is_not_granted() {
        use std::time::Duration;
        let client = crate::Client::memory();
        let (s1, s2, s3) = (
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
        );
        let g1 = Mutex::new(&s1, "rv-wait").unwrap().lock().await.unwrap();
        let m2 = Mutex::new(&s2, "rv-wait").unwrap();
        let w2 = tokio::spawn(async move { m2.lock().await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let k2 = format!("rv-wait/{:x}", s2.lease_id());
        client.store().put(k2.as_bytes(), b"", 0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        g1.unlock().await.unwrap();
        let g2 = tokio::time::timeout(Duration::from_secs(3), w2)
            .await
            .unwrap()
            .unwrap();
        let g3 = Mutex::new(&s3, "rv-wait").unwrap().try_lock().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let both = matches!((&g2, &g3), (Ok(a), Ok(b)) if !a.is_lost() && !b.is_lost());
        assert!(!both, "two holders, neither lost");
        assert!(
            matches!(g2, Err(crate::Error::NotHeld { .. })),
            "{:?}",
            g2.map(|g| g.fencing_token())
        );
        assert!(g3.is_ok());
    }

    /// The removal of a key of ours freed by an overwrite (no lease) before a join is
    /// retried as the join is, when the store fails it retryably (found by review: a
    /// "request timed out" failed `lock()` at once).
    #[tokio::test]
    async fn the_removal_of_a_freed_key_of_ours_is_retried() {
        use crate::store::slow::SlowWatches;
        use crate::store::Store;
        use std::sync::Arc;
        use std::time::Duration;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = crate::Client::from_arc(store.clone());
        let session = Session::new(&client).await.unwrap();
        let key = format!("freed/{:x}", session.lease_id());
        store.put(key.as_bytes(), b"", 0).await.unwrap();
        *store.fail_then_land.lock().unwrap() = Some(Duration::from_millis(100));
        let m = Mutex::new(&session, "freed").unwrap();
        let g = tokio::time::timeout(Duration::from_secs(5), m.lock())
            .await
            .expect("lock() hung")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!g.is_lost(), "{:?}", g.lost_reason());
        g.unlock().await.unwrap();
    }

    /// The predecessor's delete and the waiter's key freed (overwritten with no lease) in
    /// one revision, the delete first (one transaction): the waiter's registration is
    /// answered by the delete, so only the check that the shared watch saw no overwrite of
    /// its own key (`hub::changed_since`) keeps it from being granted beside a third session
    /// (found by the review of entry 42: with that check counting deletes only, "two
    /// holders, neither lost").
    #[tokio::test]
    async fn a_predecessor_deleted_and_a_waiter_freed_in_one_revision_grant_one_holder() {
        use crate::store::{Txn, TxnOp};
        use std::time::Duration;
        let client = crate::Client::memory();
        let (s1, s2, s3) = (
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
        );
        // Warm: the shared watch on the name is live for s2's client.
        for _ in 0..2 {
            let g = Mutex::new(&s2, "one-rev").unwrap().lock().await.unwrap();
            g.unlock().await.unwrap();
        }
        let g1 = Mutex::new(&s1, "one-rev").unwrap().lock().await.unwrap();
        let m2 = Mutex::new(&s2, "one-rev").unwrap();
        let w2 = tokio::spawn(async move { m2.lock().await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let k1 = g1.key().to_string();
        let k2 = format!("one-rev/{:x}", s2.lease_id());
        let txn = Txn::new().and_then([
            TxnOp::delete(k1.as_bytes()),
            TxnOp::put(k2.as_bytes(), b"", 0),
        ]);
        client.store().txn(txn).await.unwrap();
        let g2 = tokio::time::timeout(Duration::from_secs(3), w2)
            .await
            .expect("the waiter hung")
            .unwrap();
        let g3 = Mutex::new(&s3, "one-rev").unwrap().try_lock().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let both = matches!((&g2, &g3), (Ok(a), Ok(b)) if !a.is_lost() && !b.is_lost());
        assert!(!both, "two holders, neither lost");
        assert!(
            matches!(g2, Err(crate::Error::NotHeld { .. })),
            "{:?}",
            g2.map(|g| g.fencing_token())
        );
        assert!(g3.is_ok(), "{:?}", g3.err());
        drop(g1);
    }

    /// A session of its own client (no shared watch: a waiter in a long queue watches single
    /// keys) on `store`, and `n` of them queued on `name` behind a holder, in order: each
    /// task sends its index and fencing token once granted, then unlocks.
    async fn long_queue(
        store: &std::sync::Arc<crate::store::slow::SlowWatches>,
        name: &str,
        n: usize,
    ) -> (
        MutexGuard,
        Vec<Session>,
        tokio::sync::mpsc::UnboundedReceiver<(usize, crate::store::Revision)>,
    ) {
        use crate::store::{Range, Store};
        let own = || crate::Client::from_arc(store.clone());
        let first = Session::new(&own()).await.unwrap();
        let held = Mutex::new(&first, name).unwrap().lock().await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut sessions = vec![first];
        for i in 0..n {
            let session = Session::new(&own()).await.unwrap();
            let mutex = Mutex::new(&session, name).unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(g) = mutex.lock().await {
                    let _ = tx.send((i, g.fencing_token()));
                    g.unlock().await.unwrap();
                }
            });
            // Joined before the next one joins: in this order.
            let prefix = format!("{name}/");
            while store
                .inner
                .range(Range::prefix(prefix.as_bytes()))
                .await
                .unwrap()
                .kvs
                .len()
                < i + 2
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            sessions.push(session);
        }
        // Each waiter sets its watches up.
        tokio::time::sleep(Duration::from_millis(100)).await;
        (held, sessions, rx)
    }

    /// In a long queue of separate clients, a holder that waited in it leaves the queue's
    /// handoff mark in its release (its create revision, bound to its lease), and its
    /// successor is granted on reading that mark and its own key: the queue is read once in
    /// the whole handoff (by the successor of the last holder that waited in a short queue),
    /// where each waiter used to read it (the read that costs etcd 3.4 a fetch of every key
    /// under the prefix). Order and fencing tokens are as before; the mark goes with the
    /// session.
    #[tokio::test]
    async fn a_long_queue_hands_over_by_its_marks_without_reading_the_queue() {
        use crate::store::{Range, Store};
        use std::sync::atomic::Ordering;
        let store = std::sync::Arc::new(crate::store::slow::SlowWatches::new(
            "mem",
            Duration::ZERO,
            Duration::ZERO,
        ));
        let n = 16;
        // The first waiter that joins behind more than 8 (`HUB_QUEUE_MAX`): a long queue.
        const LONG_FROM: usize = 8;
        let (held, sessions, mut granted) = long_queue(&store, "marked", n).await;
        held.unlock().await.unwrap();
        let mut order = Vec::new();
        let mut reads_from = 0;
        for i in 0..n {
            let got = tokio::time::timeout(Duration::from_secs(10), granted.recv())
                .await
                .expect("a waiter hung")
                .unwrap();
            order.push(got);
            if i == LONG_FROM {
                // Every read of the queue by those ahead, and by this first waiter that
                // joined behind more than 8 (its predecessor left no mark), is done. The
                // first 8 waiters may read more than once on a loaded machine (each opens a
                // shared watch of its own, which may start after its read: read again).
                reads_from = store.queue_reads.load(Ordering::Relaxed);
            }
        }
        let indices: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, (0..n).collect::<Vec<_>>());
        assert!(order.windows(2).all(|w| w[0].1 < w[1].1), "{order:?}");
        let reads = store.queue_reads.load(Ordering::Relaxed) - reads_from;
        let handoffs = n - 1 - LONG_FROM;
        assert_eq!(
            reads, 0,
            "{reads} reads of the queue for {handoffs} marked handoffs"
        );
        // The last holder sends its token before its release (which writes its mark).
        let mark = Range::key(b"marked\0baton-handoff".to_vec());
        let (_, last_token) = order[n - 1];
        let last_mark = last_token.to_string().into_bytes();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let kv = loop {
            let kv = store.inner.range(mark.clone()).await.unwrap().kvs;
            if kv.first().is_some_and(|kv| kv.value == last_mark) {
                break kv;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no last mark: {kv:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(kv[0].lease, sessions[n].lease_id());
        for s in sessions {
            s.close().await.unwrap();
        }
        assert!(store.inner.range(mark).await.unwrap().kvs.is_empty());
    }

    /// A mark left by an earlier release names that release's key: it grants nobody else.
    /// Here the last waiter of a long queue loses its predecessor to a give-up (a delete
    /// that leaves no mark), with holders still ahead: it reads the queue, finds the one
    /// ahead, and waits on, granted only after everyone ahead.
    #[tokio::test]
    async fn a_waiter_whose_predecessor_gave_up_is_not_granted_by_an_old_mark() {
        let store = std::sync::Arc::new(crate::store::slow::SlowWatches::new(
            "mem",
            Duration::ZERO,
            Duration::ZERO,
        ));
        // An earlier long queue leaves a mark.
        let (held, sessions, mut granted) = long_queue(&store, "old-mark", 10).await;
        held.unlock().await.unwrap();
        for _ in 0..10 {
            granted.recv().await.unwrap();
        }
        // A new queue on the same name: 10 waiters, one that gives up, then the last.
        let (held, mut more, mut granted) = long_queue(&store, "old-mark", 10).await;
        let quitter = Session::new(&crate::Client::from_arc(store.clone()))
            .await
            .unwrap();
        let quitting = Mutex::new(&quitter, "old-mark").unwrap();
        let gave_up =
            tokio::spawn(async move { quitting.lock_timeout(Duration::from_millis(300)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let last = Session::new(&crate::Client::from_arc(store.clone()))
            .await
            .unwrap();
        let mutex = Mutex::new(&last, "old-mark").unwrap();
        let mut waiting = tokio::spawn(async move { mutex.lock().await });
        assert!(gave_up.await.unwrap().unwrap_err().is_timeout());
        let early = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
        assert!(early.is_err(), "granted with 11 holders ahead");
        held.unlock().await.unwrap();
        for i in 0..10 {
            assert_eq!(granted.recv().await.unwrap().0, i);
        }
        let guard = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the last waiter hung")
            .unwrap()
            .unwrap();
        guard.unlock().await.unwrap();
        more.extend(sessions);
        more.extend([quitter, last]);
        for s in more {
            s.close().await.unwrap();
        }
    }

    /// A future that ends when a hold's `lost()` fires, and one that ends when the next is
    /// granted (the tests below).
    type Step = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

    /// Take `kind` (a mutex, a read-write lock read then written, an election, a semaphore
    /// of one permit) on `holder`, then queue for it on `next`.
    async fn held_then_queued(
        kind: &str,
        holder: &Session,
        next: &Session,
        name: &str,
    ) -> (Step, Step) {
        match kind {
            "mutex" => {
                let held = Mutex::new(holder, name).unwrap().lock().await.unwrap();
                let m = Mutex::new(next, name).unwrap();
                (
                    Box::pin(async move { held.lost().await }),
                    Box::pin(async move { drop(m.lock().await.unwrap()) }),
                )
            }
            "rwlock" => {
                let held = crate::RwLock::new(holder, name)
                    .unwrap()
                    .read()
                    .await
                    .unwrap();
                let rw = crate::RwLock::new(next, name).unwrap();
                (
                    Box::pin(async move { held.lost().await }),
                    Box::pin(async move { drop(rw.write().await.unwrap()) }),
                )
            }
            "election" => {
                let held = crate::Election::new(holder, name)
                    .unwrap()
                    .campaign("a")
                    .await
                    .unwrap();
                let e = crate::Election::new(next, name).unwrap();
                (
                    Box::pin(async move { held.lost().await }),
                    Box::pin(async move { drop(e.campaign("b").await.unwrap()) }),
                )
            }
            _ => {
                let held = crate::Semaphore::new(holder, name, 1)
                    .unwrap()
                    .acquire()
                    .await
                    .unwrap();
                let sem = crate::Semaphore::new(next, name, 1).unwrap();
                (
                    Box::pin(async move { held.lost().await }),
                    Box::pin(async move { drop(sem.acquire().await.unwrap()) }),
                )
            }
        }
    }

    /// A holder whose keep-alives stop (its session orphaned, as a holder cut off from the
    /// store) hears of its loss before the one queued behind it is granted: its `lost()`
    /// fires at its local deadline, and the embedded store expires the lease after that
    /// deadline, not on the same tick (found by review: on a runtime of two threads the
    /// next was granted first, by up to half a millisecond, 3 runs in 4). Eight at once, on
    /// the real clock: mutexes, read-write locks (a reader, then a writer), elections (the
    /// second look's) and semaphores.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expiring_holder_is_told_before_the_next_is_granted() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::time::Duration;
        let client = crate::Client::from_arc(Arc::new(crate::store::mem::MemStore::new()));
        let mut runs = Vec::new();
        for i in 0..8 {
            let client = client.clone();
            runs.push(tokio::spawn(async move {
                let kind = ["mutex", "rwlock", "election", "semaphore"][i % 4];
                let name = format!("{kind}{i}");
                let holder = Session::builder(&client)
                    .with_ttl(Duration::from_secs(2))
                    .build()
                    .await
                    .unwrap();
                let next = Session::new(&client).await.unwrap();
                let (lost, granted) = held_then_queued(kind, &holder, &next, &name).await;
                let order = Arc::new(AtomicUsize::new(0));
                let (o1, o2) = (order.clone(), order.clone());
                let lost = tokio::spawn(async move {
                    lost.await;
                    o1.fetch_add(1, Ordering::SeqCst)
                });
                let waiting = tokio::spawn(async move {
                    granted.await;
                    o2.fetch_add(1, Ordering::SeqCst)
                });
                tokio::time::sleep(Duration::from_millis(700)).await;
                assert!(!waiting.is_finished(), "{name}");
                holder.orphan();
                let (lost_at, granted_at) = (lost.await.unwrap(), waiting.await.unwrap());
                (name, lost_at < granted_at)
            }));
        }
        let mut first = Vec::new();
        for run in runs {
            let (name, told_first) = run.await.unwrap();
            if !told_first {
                first.push(name);
            }
        }
        assert!(
            first.is_empty(),
            "the next was granted before the holder's lost() fired: {first:?}"
        );
    }

    /// A join refused because the session's lease is gone (revoked by an operator, before
    /// its keep-alives learn it) fails with `SessionLost`, and the session says it is lost
    /// too (found by a CI run: `lock()` said `SessionLost` while `is_lost()` said no, until
    /// the next keep-alive).
    #[tokio::test]
    async fn a_join_refused_for_a_gone_lease_marks_the_session_lost() {
        let client = paused_clock_store();
        let session = Session::new(&client).await.unwrap();
        client
            .store()
            .lease_revoke(session.lease_id())
            .await
            .unwrap();
        let err = Mutex::new(&session, "m").unwrap().lock().await.unwrap_err();
        assert!(matches!(err, Error::SessionLost { .. }), "{err}");
        assert!(session.is_lost(), "lock() said {err}, is_lost() said no");
    }
}
