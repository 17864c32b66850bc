//! Watching a held key, so that its holder learns at once when it stops being the holder.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::hub::Woken;
use crate::session::{OwnedClaim, Session, WeakSession};
use crate::store::{Compare, CompareOp, LeaseId, Range, Revision, Store, Txn, TxnOp};

const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// The liveness of one held key: a token cancelled when the key is deleted or replaced, or
/// when the session is lost; and a background watch that does the cancelling.
#[derive(Debug)]
pub(crate) struct Ownership {
    /// Cancelled on loss. A child of the session's token.
    pub(crate) lost: CancellationToken,
    /// Cancelled to stop the watch (on release).
    stop: CancellationToken,
    reason: Arc<StdMutex<Option<String>>>,
}

impl Ownership {
    /// Start watching `key`, created at `create_rev`, for changes after revision `from - 1`.
    ///
    /// With a live shared watch on the key's prefix (a client that locks the same name
    /// again and again), the watch is a registration with it, told of the delete in place;
    /// otherwise, or once that watch breaks, a task of its own watches the key.
    pub(crate) fn watch(
        session: &Session,
        key: Vec<u8>,
        create_rev: Revision,
        from: Revision,
    ) -> Self {
        let lost = session.lost_token();
        let stop = CancellationToken::new();
        let reason = Arc::new(StdMutex::new(None));
        let prefix = parent(&key);
        let watcher = Arc::new(Watcher {
            runtime: tokio::runtime::Handle::try_current().ok(),
            key,
            create_rev,
            lease: session.lease_id(),
            after: from - 1,
            loss: Loss {
                session: session.downgrade(),
                lost: lost.clone(),
                stop: stop.clone(),
                reason: reason.clone(),
            },
        });
        let hub = session.client().hub();
        let held_again = hub.held_again(&prefix);
        if !hub.watch_deletes(&prefix, &watcher.key, watcher.after, watcher.clone()) {
            if held_again {
                // Held again: the shared watch should serve the next holds, even if this
                // one ends before its task has run.
                hub.open_soon(session.client().store(), &prefix);
            }
            watcher.spawn(prefix, held_again, false);
        }
        Ownership { lost, stop, reason }
    }

    /// Why ownership was lost, if it was.
    pub(crate) fn reason(&self, session: &Session) -> Option<String> {
        if let Some(r) = self
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Some(r);
        }
        if self.lost.is_cancelled() {
            return Some(
                session
                    .lost_reason()
                    .unwrap_or_else(|| "session lost".into()),
            );
        }
        None
    }

    /// Report a loss the holder found itself (a write guarded by its hold failed, and the
    /// key read in the same transaction is gone, replaced or no longer bound to our lease),
    /// as the watch would have: the reason is kept, the token cancelled, the session told
    /// to check its lease. Nothing if the watch was stopped or the loss already reported.
    pub(crate) fn report(&self, session: &Session, why: &'static str) {
        let loss = Loss {
            session: session.downgrade(),
            lost: self.lost.clone(),
            stop: self.stop.clone(),
            reason: self.reason.clone(),
        };
        loss.report(why);
    }

    /// Stop watching (the key is being released on purpose).
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The prefix a key's queue lives under: up to and including its last `/`.
pub(crate) fn parent(key: &[u8]) -> Vec<u8> {
    match key.iter().rposition(|b| *b == b'/') {
        Some(i) => key[..=i].to_vec(),
        None => Vec::new(),
    }
}

/// What watches one held key: a hook registered with the client's shared watch, or
/// (see [`Watcher::spawn`]) a task.
///
/// It holds the session weakly: the hub keeps a registration until the next delete under
/// the prefix (or its idle check) after the watch is stopped, and must not keep the
/// session, whose last handle's drop revokes the lease, alive meanwhile.
struct Watcher {
    /// The holder's runtime: the hub may tell the hook from another one (or from a task
    /// being dropped as its runtime shuts down), and a task spawned there might never run.
    runtime: Option<tokio::runtime::Handle>,
    key: Vec<u8>,
    create_rev: Revision,
    /// The holder's lease: the key must stay bound to it.
    lease: LeaseId,
    /// Changes after this revision count.
    after: Revision,
    loss: Loss,
}

/// What a loss is reported to, whether the hook or its task finds it.
#[derive(Clone)]
struct Loss {
    session: WeakSession,
    lost: CancellationToken,
    stop: CancellationToken,
    reason: Arc<StdMutex<Option<String>>>,
}

impl Loss {
    /// Record the loss, cancel the token, and have the session check its lease now (a
    /// vanished key often means a revoked lease). Nothing if the watch was stopped (a
    /// release) or the loss already reported.
    fn report(&self, why: &'static str) {
        if self.is_closed() {
            return;
        }
        tracing::info!(reason = why, "ownership lost");
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
        self.lost.cancel();
        if let Some(session) = self.session.upgrade() {
            session.poke();
        }
    }

    fn is_closed(&self) -> bool {
        self.stop.is_cancelled() || self.lost.is_cancelled()
    }
}

impl Watcher {
    /// Watch the key in a task of its own, until it is lost or the watch is stopped. With
    /// the session gone there is nothing to watch for: its lease was revoked, and the lost
    /// token, a child of the session's, cancelled.
    ///
    /// With `read_first` (the shared watch that served the hook broke), the task reads the
    /// key before it waits: `after` is as old as the hold, and a new shared watch can vouch
    /// only for what follows a recent read. The task runs on the holder's runtime. Without
    /// one, nothing can watch: the holder learns of a loss from the session only.
    fn spawn(&self, prefix: Vec<u8>, held_again: bool, read_first: bool) {
        let Some(session) = self.loss.session.upgrade() else {
            return;
        };
        let Some(runtime) = self
            .runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
        else {
            return;
        };
        let task = watch_key(
            session.client().clone(),
            prefix,
            self.key.clone(),
            self.create_rev,
            self.lease,
            self.after,
            held_again,
            read_first,
        );
        drop(session);
        let loss = self.loss.clone();
        runtime.spawn(
            async move {
                tokio::select! {
                    _ = loss.stop.cancelled() => {}
                    _ = loss.lost.cancelled() => {}
                    why = task => loss.report(why),
                }
            }
            .instrument(self.span()),
        );
    }

    fn span(&self) -> tracing::Span {
        tracing::debug_span!("watch_ownership", key = %String::from_utf8_lossy(&self.key))
    }
}

impl crate::hub::OnDelete for Watcher {
    fn woken(&self, woken: Woken) {
        match woken {
            Woken::Deleted(_) => self.span().in_scope(|| self.loss.report("key deleted")),
            // The shared watch broke: a task takes over (it reads the key first).
            _ if self.is_closed() => {}
            _ => self.spawn(parent(&self.key), true, true),
        }
    }

    fn is_closed(&self) -> bool {
        self.loss.is_closed()
    }
}

/// Wait until `key` is deleted (or re-created, which needs a delete first), or overwritten
/// so that it is no longer bound to `lease`; returns why.
///
/// Uses the client's shared watch on the key's parent prefix, so holding many keys costs no
/// watch stream each. Survives broken watches and compaction by re-reading the key.
///
/// An overwrite that unbinds the key from our lease (`etcdctl put KEY ""`) takes it out of
/// its queue (a member needs a lease), so another waiter may be granted: it is a loss, as a
/// delete is. So is an overwrite that binds it to another lease (`etcdctl put --lease`):
/// the key is then that lease's. The key's own watch sees both. The shared watch sends
/// either (an overwrite with no lease, or with a lease other than the one the key is named
/// after) to the waiter here as a reason to read the key (the read finds the loss), and to
/// a hook (see [`Watcher`]) as a broken watch, which starts this task to read it.
#[allow(clippy::too_many_arguments)]
async fn watch_key(
    client: Client,
    prefix: Vec<u8>,
    key: Vec<u8>,
    create_rev: Revision,
    lease: LeaseId,
    mut after: Revision,
    held_again: bool,
    mut read_first: bool,
) -> &'static str {
    let store = client.store();
    let mut backoff = RETRY_MIN;
    loop {
        // A watch that worked for a while before it broke starts the backoff afresh: else
        // a few breaks long ago left every later one blind for up to RETRY_MAX.
        let watching_since = tokio::time::Instant::now();
        let fresh = |backoff: &mut Duration| {
            if watching_since.elapsed() >= RETRY_MAX {
                *backoff = RETRY_MIN;
            }
        };
        if std::mem::take(&mut read_first) {
            // Straight to the read below.
        } else if !(client.hub().is_live(&prefix) || held_again) {
            // Without a shared watch on the prefix (this client is not waiting on it, and
            // did not hold a key under it a moment ago), watch the key alone: a shared watch
            // opened now would start behind etcd's current revision (served only by its
            // 100 ms sweep at first) and receive every event of the prefix.
            let binding = crate::hub::Binding::Lease(lease);
            match crate::hub::keys_gone(client.hub(), store, &[(&key, create_rev, binding)], true)
                .await
            {
                Ok(Some((_, why))) => return why,
                Ok(None) => {}
                Err(e) if e.is_access_denied() => {
                    return "the key can no longer be read (access denied)"
                }
                Err(e) => tracing::debug!(error = %e, "ownership watch failed; retrying"),
            }
            fresh(&mut backoff);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX);
            continue;
        } else {
            match client
                .hub()
                .wait_delete(store, &prefix, &[&key], after)
                .await
            {
                Ok((_, Woken::Deleted(_))) => return "key deleted",
                // The shared watch was opened after `after`: read the key now.
                Ok((_, Woken::Reread)) => {}
                Ok((_, Woken::Interrupted)) => {
                    fresh(&mut backoff);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "ownership watch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
        // The watch broke, its start was compacted, or it started after `after`: read the
        // key to learn where we stand.
        match store.range(Range::key(key.clone())).await {
            Ok(resp) => match crate::hub::gone_why(
                resp.kvs.first(),
                create_rev,
                crate::hub::Binding::Lease(lease),
            ) {
                Some(why) => return why,
                None => after = resp.header_revision,
            },
            // Refused credentials or roles do not pass with time: the key cannot be watched
            // any more, so its loss could go unseen.
            Err(e) if e.is_access_denied() => {
                return "the key can no longer be read (access denied)"
            }
            Err(e) => {
                tracing::debug!(error = %e, "ownership check failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
                // Read again before waiting: `after` is as old as before the read.
                read_first = true;
            }
        }
    }
}

/// A queue's handoff mark, left by the release of a holder that waited in a long queue
/// (see [`Queue::handoff_key`](crate::names::Queue::handoff_key)): its successor, woken by
/// the delete, reads the mark and its own key instead of the whole queue. The mark is bound
/// to the session's lease, so it goes with the session.
#[derive(Clone)]
pub(crate) struct Mark {
    pub(crate) key: Vec<u8>,
    /// The client's hub, which remembers that the store refused a mark.
    pub(crate) hub: Arc<crate::hub::Hub>,
}

/// Delete `key` if it is still ours: its create revision is still `create_rev` and it is
/// still bound to `lease`. Never a plain delete: the same session may since have created a
/// newer key under the same name (etcd #22082). Returns whether the key was ours to delete.
///
/// An operator frees a key by overwriting it with no lease (`etcdctl put KEY ""`: it then
/// counts in no queue, and another session may be granted the name), which keeps its create
/// revision: such a key is no longer ours (`false`), but nobody else's either, and is
/// removed all the same (if it was not written again since; it would never expire). A key
/// bound to another lease is another owner's, and left alone. The common case is still one
/// transaction: the key is read only in its failure branch.
///
/// With `mark`, the same transaction also leaves the queue's handoff mark (see [`Mark`]).
pub(crate) async fn delete_if_owned(
    store: &Arc<dyn Store>,
    key: &[u8],
    create_rev: Revision,
    lease: LeaseId,
    mark: Option<&Mark>,
) -> Result<bool> {
    let mark = mark.filter(|m| !m.hub.marks_refused.load(Ordering::Relaxed));
    let txn = |mark: Option<&Mark>| {
        let mut then = vec![TxnOp::delete(key)];
        if let Some(m) = mark {
            then.push(TxnOp::put(
                m.key.clone(),
                crate::wait::handoff_value(create_rev),
                lease,
            ));
        }
        Txn::new()
            .when([
                Compare::create_revision(key, CompareOp::Equal, create_rev),
                Compare::lease(key, CompareOp::Equal, lease),
            ])
            .and_then(then)
            .or_else([TxnOp::get(Range::key(key))])
    };
    let resp = match (store.txn(txn(mark)).await, mark) {
        // The user's roles cover the lock's keys (`NAME/`) but not its mark (outside every
        // prefix of the name): nothing was applied. Release without, and leave no more marks.
        (Err(e @ Error::PermissionDenied(_)), Some(m)) => {
            m.hub.marks_refused.store(true, Ordering::Relaxed);
            tracing::info!(
                error = %e,
                "the store refused a handoff mark; releasing without (waiters in long queues read the whole queue instead)"
            );
            store.txn(txn(None)).await?
        }
        // etcd's space quota is exceeded (its NOSPACE alarm): it refuses, whole, every
        // transaction that puts, but still applies deletes. Release without the mark, or
        // the queue would stop until an operator frees space (found by review).
        (Err(e), Some(_)) if refused_for_space(&e) => {
            tracing::info!(error = %e, "the store is out of space; releasing without a handoff mark");
            store.txn(txn(None)).await?
        }
        (resp, _) => resp?,
    };
    if resp.succeeded {
        return Ok(true);
    }
    let freed = resp
        .responses
        .first()
        .and_then(crate::store::TxnOpResponse::as_get)
        .and_then(|g| g.kvs.first())
        .filter(|kv| kv.create_revision == create_rev && kv.lease == 0);
    if let Some(kv) = freed {
        tracing::info!(
            key = %kv.key_str(),
            "our key was overwritten with no lease (freed): removing it"
        );
        let remove = Txn::new()
            .when([
                Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision),
                Compare::lease(key, CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::delete(key)]);
        // Best effort: the answer (not ours) is known, and a removal that lands late
        // cannot touch a later key of ours (bound to our lease, with a new mod revision).
        if let Err(e) = store.txn(remove).await {
            tracing::debug!(error = %e, "removing our freed key failed; it stays");
        }
    }
    Ok(false)
}

/// True if etcd refused a request that writes because its space quota is exceeded (its
/// `NOSPACE` alarm: "mvcc: database space exceeded"), which it applies in no part.
pub(crate) fn refused_for_space(e: &Error) -> bool {
    matches!(e, Error::Store(reason) if reason.contains("database space exceeded"))
}

/// [`delete_if_owned`], retried until the store gives a definite answer, so that the key's
/// claim is freed only once the delete is known to have happened or not.
///
/// A delete that failed (timed out, say) may still be applied later, by a member that
/// received it. If the claim were freed at once, the same session could take the same name
/// again, find its old key still there and adopt it — same create revision — and the late
/// delete would then take that new hold away while another waiter is granted. Retrying is
/// safe (the compare is on the create revision), and once a retry has answered, the old
/// request can no longer match anything: a deleted key's revision never comes back.
///
/// Gives up when the session is lost (its lease takes the key), or on an error that
/// retrying cannot cure.
pub(crate) async fn settle_delete(
    store: &Arc<dyn Store>,
    key: &[u8],
    create_rev: Revision,
    lease: LeaseId,
    claim: &OwnedClaim,
    mark: Option<&Mark>,
) -> Result<bool> {
    let mut backoff = RETRY_MIN;
    let mut mark = mark;
    loop {
        match delete_if_owned(store, key, create_rev, lease, mark).await {
            Ok(deleted) => return Ok(deleted),
            Err(e) if e.is_retryable() && !claim.session_lost() => {
                // The retries leave no mark: it only saves the successor a read, and a
                // release must not wait on anything a plain one would not.
                mark = None;
                tracing::debug!(error = %e, "release failed; retrying until the store answers");
                claim.release_failed();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Release `key` in the background (guard drop, or an unlock whose outcome is unknown):
/// compare-and-delete until the store answers ([`settle_delete`]), then free the claim.
/// Without a tokio runtime the key is left to expire with the session's lease.
pub(crate) fn release_in_background(
    store: Arc<dyn Store>,
    key: Vec<u8>,
    create_rev: Revision,
    lease: LeaseId,
    claim: OwnedClaim,
    mark: Option<Mark>,
) {
    claim.releasing();
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(
            async move {
                match settle_delete(&store, &key, create_rev, lease, &claim, mark.as_ref()).await {
                    Ok(_) => {}
                    // The session's loss takes the key with its lease: nothing to warn of.
                    Err(e) if claim.session_lost() => {
                        tracing::debug!(error = %e, "release failed; the session is lost, and its lease takes the key");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "release failed; the key stays until the session's lease ends");
                    }
                }
                drop(claim);
            }
            .instrument(tracing::debug_span!("release")),
        );
    }
}

/// The error for "this key is no longer ours".
pub(crate) fn not_held(key: &[u8]) -> Error {
    Error::NotHeld {
        key: String::from_utf8_lossy(key).into_owned(),
    }
}
