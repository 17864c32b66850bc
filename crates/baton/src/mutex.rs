//! A distributed mutex, wire-compatible with Go's `concurrency.Mutex` and `etcdctl lock`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::names::{is_member, lease_key, validate_name};
use crate::ownership::{delete_if_owned, not_held, release_in_background, Ownership};
use crate::session::{OwnedClaim, Session};
use crate::store::{
    Compare, CompareOp, KeyValue, Range, Revision, SortOrder, Store, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};
use crate::wait::{scan_member, wait_turn};

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
/// A session has one key per name: locking the same name twice through one session fails
/// with [`Error::AlreadyHeld`] instead of deadlocking.
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

    /// The key this session uses for the lock: `NAME/<lease id in hex>`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Wait until the lock is ours.
    ///
    /// Fails with [`Error::SessionLost`] if the session is lost while waiting, and with
    /// [`Error::NotHeld`] if our queued key vanished (for example an admin deleted it): a
    /// waiter is never told it holds a lock it does not hold.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. Dropping the future removes our waiter key (in a task spawned on the
    /// current runtime, after any request still in flight has been answered), so nothing is
    /// left in the queue.
    pub async fn lock(&self) -> Result<MutexGuard> {
        self.acquire(false)
            .instrument(tracing::debug_span!("acquire", lock = %self.name))
            .await
    }

    /// [`lock()`](Mutex::lock), giving up with [`Error::Timeout`] after `timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`lock()`](Mutex::lock). On timeout the waiter key is removed.
    pub async fn lock_timeout(&self, timeout: Duration) -> Result<MutexGuard> {
        match tokio::time::timeout(timeout, self.lock()).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                operation: "lock",
                after: timeout,
            }),
        }
    }

    /// Take the lock if it is free, without waiting.
    ///
    /// Fails with [`Error::Locked`] if another owner holds it; our key is removed before the
    /// error is returned.
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
        let session = &self.session;
        session.check_alive()?;
        let key = self.key.as_bytes();
        let claim = session.claim(key, &self.name).await?;
        let store = session.store().clone();
        let mut pending = Pending {
            store: store.clone(),
            key: key.to_vec(),
            claim: Some(claim),
            inflight: None,
            my_rev: None,
        };

        let first = Range::prefix(self.prefix.as_bytes()).first_created();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(key, "", session.lease_id()),
                TxnOp::get(first.clone()),
            ])
            .or_else([TxnOp::get(Range::key(key)), TxnOp::get(first)]);
        let resp = match pending.send(txn).await {
            Err(Error::LeaseNotFound(_)) => return Err(session.lost_error_or("lease not found")),
            r => r?,
        };
        let my_rev = my_revision(&resp, key)?;
        pending.my_rev = Some(my_rev);

        let mut owner = resp
            .responses
            .get(1)
            .and_then(TxnOpResponse::as_get)
            .and_then(|g| g.kvs.first().cloned());
        if owner.as_ref().is_some_and(|kv| !is_member(self.prefix.as_bytes(), &kv.key)) {
            owner = scan_member(&store, self.prefix.as_bytes(), SortOrder::Ascending, 0)
                .await?
                .1;
        }
        let from = match owner {
            Some(kv) if kv.create_revision != my_rev => {
                if try_only {
                    pending.abandon().await;
                    return Err(Error::Locked {
                        name: self.name.clone(),
                    });
                }
                tracing::debug!(my_rev, "queued");
                let turn = tokio::select! {
                    r = wait_turn(&store, self.prefix.as_bytes(), key, my_rev) => r,
                    _ = session.lost() => Err(session.lost_error()),
                };
                match turn {
                    Ok(t) => t.header_revision + 1,
                    Err(Error::NotHeld { .. }) if session.is_lost() => {
                        return Err(session.lost_error())
                    }
                    Err(e) => return Err(e),
                }
            }
            _ => resp.header_revision + 1,
        };
        let claim = pending.disarm();
        let ownership = Ownership::watch(session, key.to_vec(), my_rev, from);
        tracing::debug!(token = my_rev, "acquired");
        Ok(MutexGuard {
            session: session.clone(),
            name: self.name.clone(),
            key: self.key.clone(),
            rev: my_rev,
            ownership,
            claim,
        })
    }
}

impl Session {
    /// The session's loss reason if it is lost, else a loss error with `fallback`.
    fn lost_error_or(&self, fallback: &str) -> Error {
        if self.is_lost() {
            self.lost_error()
        } else {
            Error::lost(fallback)
        }
    }
}

/// Our revision from the acquire transaction: the header revision if we created the key, or
/// the existing key's create revision.
fn my_revision(resp: &TxnResponse, key: &[u8]) -> Result<Revision> {
    if resp.succeeded {
        return Ok(resp.header_revision);
    }
    resp.responses
        .first()
        .and_then(TxnOpResponse::as_get)
        .and_then(|g| g.kvs.first())
        .map(|kv: &KeyValue| kv.create_revision)
        .ok_or_else(|| not_held(key))
}

/// An acquire in progress. If it is dropped before [`Pending::disarm`], it removes our key:
/// at once if our revision is known, or after the in-flight transaction has been answered.
struct Pending {
    store: Arc<dyn Store>,
    key: Vec<u8>,
    claim: Option<OwnedClaim>,
    inflight: Option<JoinHandle<Result<TxnResponse>>>,
    my_rev: Option<Revision>,
}

impl Pending {
    /// Run the acquire transaction in its own task, so that a cancelled caller can still
    /// learn its outcome and clean up.
    async fn send(&mut self, txn: Txn) -> Result<TxnResponse> {
        let store = self.store.clone();
        let handle = self
            .inflight
            .insert(tokio::spawn(async move { store.txn(txn).await }));
        let res = handle.await;
        self.inflight = None;
        res.map_err(|e| Error::Store(format!("acquire task failed: {e}")))?
    }

    /// Success: keep the key, hand over the claim.
    fn disarm(mut self) -> Option<OwnedClaim> {
        self.my_rev = None;
        self.claim.take()
    }

    /// Give up now (try_lock found the lock held): remove our key before returning.
    async fn abandon(mut self) {
        if let Some(rev) = self.my_rev.take() {
            if let Err(e) = delete_if_owned(&self.store, &self.key, rev).await {
                tracing::debug!(error = %e, "removing our key failed; it expires with the lease");
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else {
            return;
        };
        let store = self.store.clone();
        let key = std::mem::take(&mut self.key);
        match (self.my_rev, self.inflight.take()) {
            (Some(rev), _) => release_in_background(store, key, rev, claim),
            (None, Some(handle)) => {
                claim.releasing();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        if let Ok(Ok(resp)) = handle.await {
                            if let Ok(rev) = my_revision(&resp, &key) {
                                let _ = delete_if_owned(&store, &key, rev).await;
                            }
                        }
                        drop(claim);
                    });
                }
            }
            (None, None) => drop(claim),
        }
    }
}

/// Proof that this process holds a [`Mutex`]. Release it with
/// [`unlock()`](MutexGuard::unlock).
///
/// # Drop behaviour
///
/// Dropping the guard releases the lock in a task spawned on the current tokio runtime
/// (compare-and-delete, best effort). Without a runtime, or if that fails, the key stays until
/// the session's lease ends. Call [`unlock()`](MutexGuard::unlock) to release and see the
/// result.
#[must_use = "if unused the lock is released at once"]
pub struct MutexGuard {
    session: Session,
    name: String,
    key: String,
    rev: Revision,
    ownership: Ownership,
    claim: Option<OwnedClaim>,
}

impl fmt::Debug for MutexGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MutexGuard")
            .field("key", &self.key)
            .field("fencing_token", &self.rev)
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl MutexGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key we hold: `NAME/<lease id in hex>` (`ETCD_LOCK_KEY` in `etcdctl lock`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fencing token: the create revision of our key (`ETCD_LOCK_REV` in `etcdctl lock`).
    ///
    /// Tokens of later grants of the same lock are strictly greater. Give it to the resource
    /// you protect and have it refuse writes with a token lower than one it has seen.
    pub fn fencing_token(&self) -> Revision {
        self.rev
    }

    /// The session the lock is bound to.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// True once the lock is lost. See [`lost()`](MutexGuard::lost).
    pub fn is_lost(&self) -> bool {
        self.ownership.lost.is_cancelled()
    }

    /// Why the lock was lost, if it was.
    pub fn lost_reason(&self) -> Option<String> {
        self.ownership.reason(&self.session)
    }

    /// Completes when the lock is lost: our key was deleted or replaced (by an admin, a revoke
    /// or the lease's expiry), or the session was lost (see [`Session::lost`]).
    ///
    /// A key deleted by anyone is noticed within one watch round trip.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.ownership.lost.cancelled()
    }

    /// A token cancelled when the lock is lost (a child token: cancelling it changes nothing).
    pub fn lost_token(&self) -> CancellationToken {
        self.ownership.lost.child_token()
    }

    /// The compare that holds only while we own the lock (Go's `IsOwner()`).
    pub fn is_owner(&self) -> Compare {
        Compare::create_revision(self.key.as_bytes(), CompareOp::Equal, self.rev)
    }

    /// Run `txn` only while we still hold the lock: its compares get
    /// [`is_owner()`](MutexGuard::is_owner) added.
    ///
    /// Returns [`Error::NotHeld`] if the lock is no longer ours (nothing was applied). If
    /// we hold it but one of `txn`'s own compares failed, returns `Ok` with
    /// `succeeded == false` and the responses of `txn`'s failure branch.
    ///
    /// # Cancel safety
    ///
    /// The transaction may or may not have been applied if the future is dropped.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let user_failure_len = txn.failure.len();
        let txn = Txn {
            compares: std::iter::once(self.is_owner()).chain(txn.compares).collect(),
            success: txn.success,
            failure: txn
                .failure
                .into_iter()
                .chain(std::iter::once(TxnOp::get(Range::key(self.key.as_bytes()))))
                .collect(),
        };
        let mut resp = self.session.store().txn(txn).await?;
        if !resp.succeeded {
            let ours = resp
                .responses
                .pop()
                .as_ref()
                .and_then(TxnOpResponse::as_get)
                .and_then(|g| g.kvs.first())
                .is_some_and(|kv| kv.create_revision == self.rev);
            if !ours {
                return Err(not_held(self.key.as_bytes()));
            }
            debug_assert_eq!(resp.responses.len(), user_failure_len);
        }
        Ok(resp)
    }

    /// Release the lock: delete our key if it is still ours (compare-and-delete on the create
    /// revision, never a plain delete).
    ///
    /// Returns [`Error::NotHeld`] if the lock had already been lost.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the release may or may not have happened; the key expires
    /// with the session's lease at the latest.
    pub async fn unlock(mut self) -> Result<()> {
        self.ownership.stop();
        let store = self.session.store().clone();
        let claim = self.claim.take();
        if let Some(c) = &claim {
            c.releasing();
        }
        let result = delete_if_owned(&store, self.key.as_bytes(), self.rev)
            .instrument(tracing::debug_span!("release", lock = %self.name, token = self.rev))
            .await;
        drop(claim);
        match result {
            Ok(true) => Ok(()),
            Ok(false) => Err(not_held(self.key.as_bytes())),
            Err(e) => Err(e),
        }
    }
}

impl Drop for MutexGuard {
    fn drop(&mut self) {
        self.ownership.stop();
        if let Some(claim) = self.claim.take() {
            release_in_background(
                self.session.store().clone(),
                std::mem::take(&mut self.key).into_bytes(),
                self.rev,
                claim,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
