//! The create-revision queue shared by [`Mutex`](crate::Mutex) and
//! [`Election`](crate::Election): joining it, waiting for our turn, and holding the head.
//!
//! Joining is Go's acquire transaction: if our key (`prefix + hex(lease)`) does not exist,
//! put it (bound to the session's lease) and read the queue's head; otherwise read our key
//! and the head. Our revision is the header revision, or our existing key's create revision
//! if that key is still bound to our lease (a session that resumed the lease of a process
//! that stopped adopts the key it left). A key under our name that is no longer bound to our
//! lease is never adopted (Go's `Mutex` does adopt it): overwritten with no lease (an
//! operator's `etcdctl put`, which frees the name: the key counts in no queue), it is
//! removed if unchanged and the join made afresh, behind the queue as it is; bound to
//! another lease, it is another owner's, and the join fails with
//! [`Error::InvalidData`](crate::Error::InvalidData), leaving it alone.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::names::Queue;
use crate::ownership::{
    delete_if_owned, not_held, release_in_background, settle_delete, Mark, Ownership,
};
use crate::session::{OwnedClaim, Session, WeakSession};
use crate::store::{
    Compare, CompareOp, KeyValue, LeaseId, Range, Revision, SortOrder, Store, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};
use crate::wait::{scan_member, wait_turn, TurnRead};

/// How many keys the join transaction of a queue of empty-valued keys (a mutex) reads back:
/// ours and up to `AHEAD - 1` created before it. A queue shorter than that is known whole.
const AHEAD: i64 = 64;

/// How many times a join removes a key of ours found bound to no lease before giving up
/// with [`Error::Conflict`]: each removal is of a key written again since the last one
/// (someone keeps overwriting it).
const FOREIGN_REMOVALS: u32 = 3;

/// How long a join whose outcome is unknown is retried (an etcd leader election takes a
/// few seconds).
pub(crate) const JOIN_RETRY_FOR: Duration = Duration::from_secs(15);

/// The retries of a join's requests: a retryable failure is tried again after a backoff
/// (50 ms, doubling up to 1 s) while the session lives, until `retry_for` has passed
/// (`Duration::MAX`: for as long as the session lives).
pub(crate) struct Retry {
    /// `None`: never, while the session lives.
    give_up: Option<tokio::time::Instant>,
    backoff: Duration,
}

impl Retry {
    pub(crate) fn new(retry_for: Duration) -> Retry {
        Retry {
            give_up: tokio::time::Instant::now().checked_add(retry_for),
            backoff: Duration::from_millis(50),
        }
    }

    /// After `what` failed with `e`: `Ok` once the backoff has passed, to try again, or the
    /// error to end with. Once the session is lost, that is why we stop
    /// ([`Error::SessionLost`]): the store's error would read as "try again".
    pub(crate) async fn after(&mut self, session: &Session, e: Error, what: &str) -> Result<()> {
        if !e.is_retryable() {
            return Err(e);
        }
        if session.is_lost() {
            tracing::debug!(error = %e, "{what} failed, and the session is lost");
            return Err(session.lost_error());
        }
        if self
            .give_up
            .is_some_and(|give_up| tokio::time::Instant::now() + self.backoff >= give_up)
        {
            return Err(e);
        }
        tracing::debug!(error = %e, "{what} failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(self.backoff) => {}
            _ = session.lost() => return Err(session.lost_error()),
        }
        self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
        Ok(())
    }
}

/// Our key in a queue, not yet at its head (or not yet known to be).
///
/// Dropping it before [`Entry::into_held`] removes our key: at once if our revision is known,
/// or after the in-flight join transaction has been answered, or (a join whose outcome is
/// unknown) once a read has found the key; in that last case, on a store whose requests can
/// hang (etcd), the key is looked for once more a request timeout later, for a join request
/// applied late by a server that had stopped answering (see `look_again`). A key of ours
/// that was there before a join refused by [`Entry::join_excluding`] is not its key, and is
/// left alone (see `Leftover`). While the store cannot be reached, the removal is retried for as long as the
/// session lives, however long that is: a key left behind would stay ahead of every later
/// waiter until the session ends. This is what makes `lock()` and `campaign()` cancel safe.
pub(crate) struct Entry {
    session: Session,
    store: Arc<dyn Store>,
    queue: Queue,
    key: Vec<u8>,
    claim: Option<OwnedClaim>,
    /// The join transaction while it is in flight: polled by `send`, and finished in a task
    /// of its own if the entry is dropped first.
    inflight: Option<InFlight>,
    /// A join request was sent whose outcome is not known (it failed in a way that may
    /// have been applied: a lost reply, a timeout): our key may exist though `my_rev` is
    /// unknown. Dropping the entry then looks for it and removes it.
    maybe_applied: bool,
    /// [`join_excluding`](Entry::join_excluding)'s key of the other mode, which the
    /// clean-up of an unknown outcome reads with ours (see [`Leftover`]).
    other: Option<Vec<u8>>,
    /// A key of ours created at or before this revision is not this join's to remove: the
    /// header revision of a refused join (see [`Leftover`]).
    floor: Revision,
    /// How long a join that failed retryably is retried ([`JOIN_RETRY_FOR`], or zero for a
    /// `try_lock`, which makes one attempt).
    retry_for: Duration,
    my_rev: Option<Revision>,
    /// The revision after which changes to our key must be watched, once at the head.
    head_at: Option<Revision>,
    /// Our key as the join transaction found or wrote it.
    existing_value: Option<Vec<u8>>,
    /// What the join transaction's read found (see [`Entry::join_reading`]).
    joined: Vec<KeyValue>,
    /// Our predecessor as the join transaction saw it, for the first step of the wait.
    hint: Option<TurnRead>,
    /// We waited in a long queue: our release leaves the handoff mark (see [`Mark`]).
    long: bool,
    /// This queue uses handoff marks (one of empty-valued keys: see [`Mark`]).
    marks: bool,
}

impl Entry {
    /// Put `key` (holding `value`) and wait behind the members of `queue` created before it.
    ///
    /// With `try_only` (a `try_lock`), a failed join is not retried: the caller wanted an
    /// answer now, and gets the store's retryable error at once, as on Redis.
    pub(crate) async fn join(
        session: &Session,
        name: &str,
        queue: Queue,
        key: &str,
        value: &[u8],
        try_only: bool,
    ) -> Result<Entry> {
        Self::join_excluding(session, name, queue, key, value, None, try_only).await
    }

    /// [`join`](Entry::join), refused with [`Error::AlreadyHeld`] (naming `other.1`) if the
    /// key `other.0` exists bound to this session's lease, and our key `key` either does not
    /// exist or was created after it: a key of ours that ours would wait behind forever (a
    /// read-write lock's key of the other mode, left by an earlier process on the lease this
    /// session resumed). Our key, if created before `other.0`, is adopted as by
    /// [`join`](Entry::join): it is not behind the other. The store is asked in the join
    /// transaction itself (a compare, and a read in its failure branch): no extra round
    /// trip. A refused join leaves the store as it was (our own key too, if it existed).
    pub(crate) async fn join_excluding(
        session: &Session,
        name: &str,
        queue: Queue,
        key: &str,
        value: &[u8],
        other: Option<(&str, &str)>,
        try_only: bool,
    ) -> Result<Entry> {
        // A queue of empty-valued keys that ours belongs to (a mutex): the join's read of the
        // last few keys also tells the head whenever the queue is short, so the read of the
        // head is left out (one range fewer per lock, in etcd's serial apply path).
        let read = if value.is_empty() && queue.contains(key.as_bytes()) {
            None
        } else {
            Some(Range::prefix(queue.prefix.clone()).first_created())
        };
        Self::join_inner(session, name, queue, key, value, read, other, try_only).await
    }

    /// [`join`](Entry::join), reading `read` in the join transaction instead of only the
    /// queue's head: the keys it finds are in [`joined`](Entry::joined), as they were when
    /// our key was put. `read` must be sorted by create revision, ascending (its first key
    /// is taken for the head).
    pub(crate) async fn join_reading(
        session: &Session,
        name: &str,
        queue: Queue,
        key: &str,
        value: &[u8],
        read: Range,
        try_only: bool,
    ) -> Result<Entry> {
        Self::join_inner(session, name, queue, key, value, Some(read), None, try_only).await
    }

    /// [`join_reading`](Entry::join_reading); with no `read`, the head is found from the
    /// last keys created (see [`join`](Entry::join)); with `other`, see
    /// [`join_excluding`](Entry::join_excluding).
    #[allow(clippy::too_many_arguments)]
    async fn join_inner(
        session: &Session,
        name: &str,
        queue: Queue,
        key: &str,
        value: &[u8],
        read: Option<Range>,
        other: Option<(&str, &str)>,
        try_only: bool,
    ) -> Result<Entry> {
        session.check_alive()?;
        let claim = session.claim(key.as_bytes(), name, try_only).await?;
        let store = session.store().clone();
        let mut entry = Entry {
            session: session.clone(),
            store,
            queue,
            key: key.as_bytes().to_vec(),
            claim: Some(claim),
            inflight: None,
            maybe_applied: false,
            other: other.map(|(other_key, _)| other_key.as_bytes().to_vec()),
            floor: 0,
            retry_for: if try_only {
                Duration::ZERO
            } else {
                JOIN_RETRY_FOR
            },
            my_rev: None,
            head_at: None,
            existing_value: None,
            joined: Vec::new(),
            hint: None,
            long: false,
            // A queue of empty-valued keys (a mutex's, or an election's campaigned with an
            // empty value): its join learns how long the queue is (see `AHEAD`). A
            // candidate with a value reads only its predecessor, so every one that waited
            // would count as in a long queue and leave a mark (found by review). A
            // read-write lock's queues have no mark (see `Queue::handoff_key`).
            marks: value.is_empty() && read.is_none(),
        };
        let k = entry.key.clone();
        // The last keys created: right after our put, ours and those just ahead of us. Knowing
        // the predecessor now saves the first read of the wait; knowing every key ahead (in a
        // queue of keys without values, up to AHEAD of them) lets the wait finish without any
        // read at all (see `wait_turn`). Keys with values (candidates) may be large: read
        // only ours and the predecessor.
        let depth = if value.is_empty() { AHEAD } else { 2 };
        let last_few = Range::prefix(entry.queue.prefix.clone())
            .last_created()
            .with_limit(depth);
        let first = || Range::prefix(entry.queue.prefix.clone()).first_created();
        let mut then = vec![TxnOp::put(k.clone(), value, session.lease_id())];
        if let Some(read) = &read {
            then.push(TxnOp::get(read.clone()));
        }
        then.push(TxnOp::get(last_few));
        let mut when = vec![Compare::create_revision(k.clone(), CompareOp::Equal, 0)];
        let mut or_else = vec![
            TxnOp::get(Range::key(k)),
            TxnOp::get(read.clone().unwrap_or_else(first)),
        ];
        if let Some((other_key, _)) = other {
            // A missing key's lease compares as 0, as a key bound to no lease: neither
            // counts in a queue, nor refuses us. The read comes last in the failure branch
            // (see `refused_by_other`).
            when.push(Compare::lease(
                other_key.as_bytes(),
                CompareOp::NotEqual,
                session.lease_id(),
            ));
            or_else.push(TxnOp::get(Range::key(other_key.as_bytes())));
        }
        let txn = Txn::new().when(when).and_then(then).or_else(or_else);
        let lease = session.lease_id();
        let mut removed = 0;
        let resp = loop {
            let resp = match entry.send(txn.clone()).await {
                Err(Error::LeaseNotFound(_)) => return Err(session.lease_gone()),
                r => r?,
            };
            if let Some((_, other_name)) = other.filter(|_| refused_by_other(&resp, lease)) {
                // Nothing was put; a key of ours that existed is not adopted, and stays. An
                // earlier attempt whose outcome is unknown may still land, once the other
                // key is gone: `Drop` looks for the key it would put, created after this
                // answer.
                entry.floor = resp.header_revision;
                return Err(Error::AlreadyHeld {
                    name: other_name.to_string(),
                });
            }
            match foreign_key(&resp, lease) {
                None => break resp,
                // Overwritten with no lease (an operator's `etcdctl put`, which frees the
                // name): it counts in no queue, and holds nobody's place. Remove it, unless
                // it was written again since, and join afresh behind the queue as it is.
                Some(kv) if kv.lease == 0 && removed < FOREIGN_REMOVALS => {
                    removed += 1;
                    tracing::info!(
                        key = %kv.key_str(),
                        "our key is bound to no lease (freed by an overwrite): removing it and joining afresh"
                    );
                    entry.remove_freed(kv).await?;
                }
                Some(kv) if kv.lease == 0 => {
                    return Err(Error::Conflict { attempts: removed });
                }
                Some(kv) => {
                    return Err(Error::InvalidData {
                        key: kv.key_str().into_owned(),
                        reason: format!(
                            "bound to lease {:x}, not to this session's lease {lease:x}: \
                             another owner's key under this session's name",
                            kv.lease
                        ),
                    });
                }
            }
        };
        let my_rev = my_revision(&resp, &entry.key, lease)?;
        entry.my_rev = Some(my_rev);
        if !resp.succeeded {
            entry.existing_value = first_kv(&resp, 0).map(|kv| kv.value);
        }
        // Where the read of the last few keys is, if made (we created our key).
        let last_few_at = resp.succeeded.then_some(if read.is_some() { 2 } else { 1 });
        let last_few = last_few_at
            .and_then(|i| resp.responses.get(i))
            .and_then(TxnOpResponse::as_get)
            .map(|g| g.kvs.as_slice())
            .unwrap_or_default();
        let seen = if resp.succeeded && read.is_none() {
            head_of_last_few(&entry.queue, last_few, depth)
        } else {
            if read.is_some() {
                entry.joined = resp
                    .responses
                    .get(1)
                    .and_then(TxnOpResponse::as_get)
                    .map(|g| g.kvs.clone())
                    .unwrap_or_default();
            }
            match first_kv(&resp, 1) {
                Some(kv) if !entry.queue.admits(&kv) => HeadSeen::Unknown,
                head => HeadSeen::Exact(head),
            }
        };
        // The revision at which `head` was read: the scan's, if one was made (a waiter
        // ahead of us may have been granted and gone since the join: our grant is seen at
        // the scan, not before).
        let mut head_read_at = resp.header_revision;
        // `head` decides whether we are at the head; `head_key` is only ever the true head.
        let (head, head_key) = match seen {
            HeadSeen::Exact(head) => {
                let key = head.as_ref().map(|kv| kv.key.clone());
                (head, key)
            }
            HeadSeen::NotUs(older) => (Some(older), None),
            // The scan reads our key too: it may have gone since the join (an operator's
            // delete, the lease), and a verdict of "at the head" must be of a revision at
            // which our key still existed.
            HeadSeen::Unknown => {
                let (scanned_at, head, mine) = scan_member(
                    &entry.store,
                    &entry.queue,
                    SortOrder::Ascending,
                    0,
                    Some(&entry.key),
                )
                .await?;
                // Ours only while bound to our lease (see `wait_turn`).
                if mine.is_none_or(|kv| kv.create_revision != my_rev || kv.lease != lease) {
                    return Err(if session.is_lost() {
                        session.lost_error()
                    } else {
                        not_held(&entry.key)
                    });
                }
                head_read_at = scanned_at;
                let key = head.as_ref().map(|kv| kv.key.clone());
                (head, key)
            }
        };
        // Nobody was created before us: for a mutex the head is us; for a reader it may be
        // a later writer.
        if head.is_none_or(|kv| kv.create_revision >= my_rev) {
            entry.head_at = Some(head_read_at + 1);
        } else if resp.succeeded {
            if let [mine, pred, ..] = last_few {
                if mine.key == entry.key && entry.queue.admits(pred) {
                    // Fewer keys than asked for: the read saw every key created before ours.
                    let complete = i64::try_from(last_few.len()).is_ok_and(|n| n < depth);
                    let ahead = complete.then(|| {
                        last_few[1..]
                            .iter()
                            .rev()
                            .filter(|kv| entry.queue.admits(kv))
                            .map(|kv| kv.key.clone())
                            .collect()
                    });
                    entry.hint = Some(TurnRead {
                        header: resp.header_revision,
                        pred_is_head: head_key.as_deref() == Some(pred.key.as_slice()),
                        pred: Some(pred.clone()),
                        mine: Some(mine.clone()),
                        ahead,
                    });
                }
            }
        }
        Ok(entry)
    }

    /// Our revision: the fencing token once we are at the head.
    pub(crate) fn my_rev(&self) -> Revision {
        self.my_rev.unwrap_or_default()
    }

    /// The value our key had if it already existed when we joined (a resumed candidacy).
    pub(crate) fn existing_value(&self) -> Option<&[u8]> {
        self.existing_value.as_deref()
    }

    /// The keys the join transaction read, as they were when our key was put, taken out of
    /// the entry (a waiter that kept them while waiting held its whole read: a long queue's
    /// waiters together held memory quadratic in its length).
    pub(crate) fn take_joined(&mut self) -> Vec<KeyValue> {
        std::mem::take(&mut self.joined)
    }

    /// Our turn came, as seen by a read at `header_revision` (a primitive that waits with
    /// its own rule instead of [`wait`](Entry::wait)): watch our key from the next revision.
    pub(crate) fn reached_head(&mut self, header_revision: Revision) {
        self.head_at = Some(header_revision + 1);
    }

    /// True if the join found us at the head already.
    pub(crate) fn at_head(&self) -> bool {
        self.head_at.is_some()
    }

    /// The store this entry lives in.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Wait until we are at the head, or fail: the session was lost, or our key vanished.
    pub(crate) async fn wait(&mut self) -> Result<()> {
        if self.head_at.is_some() {
            return Ok(());
        }
        let my_rev = self.my_rev();
        tracing::debug!(my_rev, "queued");
        let session = &self.session;
        let turn = tokio::select! {
            r = wait_turn(self.session.client(), &self.queue, &self.key, my_rev, self.session.lease_id(), self.hint.take(), self.marks) => r,
            _ = session.lost() => Err(session.lost_error()),
        };
        match turn {
            Ok(t) => {
                self.head_at = Some(t.header_revision + 1);
                self.long = t.long;
                Ok(())
            }
            Err(e) => Err(session.explain_not_held(e).await),
        }
    }

    /// Remove our key found bound to no lease (freed by an operator's overwrite; see
    /// `join_inner`), unless it was written again since (compare: its mod revision, and
    /// lease 0). A retryable failure is retried as [`send`](Entry::send) retries the join
    /// (same backoff, for at most `retry_for`, not at all for a try):
    /// the compare makes a retry safe, and a removal that lands late cannot touch a key
    /// joined since (bound to our lease, with a new mod revision).
    async fn remove_freed(&mut self, kv: KeyValue) -> Result<()> {
        let txn = Txn::new()
            .when([
                Compare::mod_revision(kv.key.clone(), CompareOp::Equal, kv.mod_revision),
                Compare::lease(kv.key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::delete(kv.key)]);
        let mut retry = Retry::new(self.retry_for);
        loop {
            match self.store.txn(txn.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    retry
                        .after(&self.session, e, "removing our freed key")
                        .await?
                }
            }
        }
    }

    /// Run the join transaction, so that a cancelled caller can still learn its outcome and
    /// clean up: the request's future is kept in the entry while it is polled, and if the
    /// entry is dropped before it is answered, finished in a task of its own (see `Drop`).
    /// The common case, a join that is not cancelled, spawns no task.
    ///
    /// A failure whose outcome is unknown and that may pass (etcd's "request timed out"
    /// while a new leader is elected, a lost connection) is retried while the session
    /// lives, for at most [`JOIN_RETRY_FOR`] (not at all for a `try_lock`); once the session
    /// is lost, the error is [`Error::SessionLost`], not the store's. The join is
    /// idempotent (it creates our key only if it does not exist, else reads it), so a retry
    /// after a join that did apply finds our key and its revision.
    async fn send(&mut self, txn: Txn) -> Result<TxnResponse> {
        let mut retry = Retry::new(self.retry_for);
        loop {
            let store = self.store.clone();
            let attempt = txn.clone();
            let request = self
                .inflight
                .insert(InFlight(Box::pin(async move { store.txn(attempt).await })));
            // A request that panics is not finished again by `Drop`, and fails the join as
            // a failed task did.
            let res = std::panic::AssertUnwindSafe(&mut request.0)
                .catch_unwind()
                .await;
            self.inflight = None;
            let res = res.map_err(|_| Error::Store("queue join request panicked".into()))?;
            // A failure the store may have applied anyway: if nothing later tells our
            // revision, `Drop` looks for our key.
            if matches!(&res, Err(e) if e.is_retryable()) {
                self.maybe_applied = true;
            }
            match res {
                Err(e) => retry.after(&self.session, e, "joining the queue").await?,
                ok => return ok,
            }
        }
    }

    /// Leave the queue now and wait for our key to be removed. A try-only entry makes one
    /// attempt: if the store does not answer it, the removal is retried in the background.
    ///
    /// If this future is dropped before the store answers, the entry's `Drop` finishes the
    /// removal in the background, holding the claim until then (our revision is forgotten
    /// only once the delete is settled).
    pub(crate) async fn abandon(mut self) {
        if let (Some(rev), Some(claim)) = (self.my_rev, &self.claim) {
            if self.retry_for.is_zero() {
                // A try-only acquire makes one attempt: if the store does not answer, the
                // removal goes on in the background (this entry's `Drop`), and a try of
                // the same name by this session fails at once meanwhile.
                match delete_if_owned(&self.store, &self.key, rev, self.session.lease_id(), None)
                    .await
                {
                    Err(e) if e.is_retryable() => {
                        tracing::debug!(error = %e, "removing our key failed; retrying in the background");
                        claim.release_failed();
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "removing our key failed; it stays until the session's lease ends");
                    }
                    Ok(_) => {}
                }
            } else if let Err(e) = settle_delete(
                &self.store,
                &self.key,
                rev,
                self.session.lease_id(),
                claim,
                None,
            )
            .await
            {
                tracing::debug!(error = %e, "removing our key failed; it stays until the session's lease ends");
            }
        }
        self.my_rev = None;
        self.maybe_applied = false;
    }

    /// We are at the head: start watching our key and hand over the claim.
    pub(crate) fn into_held(mut self) -> Held {
        let rev = self.my_rev.take().unwrap_or_default();
        let from = self.head_at.unwrap_or(rev + 1);
        let key = std::mem::take(&mut self.key);
        let ownership = Ownership::watch(&self.session, key.clone(), rev, from);
        let mark = self
            .queue
            .handoff_key()
            .filter(|_| self.long)
            .map(|key| Mark {
                key,
                hub: self.session.client().hub().clone(),
            });
        tracing::debug!(token = rev, "at the head");
        Held {
            session: self.session.clone(),
            key: String::from_utf8_lossy(&key).into_owned(),
            rev,
            granted_at: from - 1,
            ownership,
            claim: self.claim.take(),
            mark,
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else {
            return;
        };
        let store = self.store.clone();
        let key = std::mem::take(&mut self.key);
        match (self.my_rev, self.inflight.take()) {
            (Some(rev), _) => {
                release_in_background(store, key, rev, self.session.lease_id(), claim, None)
            }
            // The join is in flight, or failed in a way that may have applied: learn our
            // revision (from its answer, else by looking for our key) and remove the key.
            (None, inflight) if inflight.is_some() || self.maybe_applied => {
                claim.releasing();
                let mut unknown = self.maybe_applied;
                let lease = self.session.lease_id();
                let mut left = Leftover {
                    key,
                    other: self.other.take(),
                    lease,
                    floor: self.floor,
                };
                let session = self.session.downgrade();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let answer = match inflight {
                            Some(handle) => handle.0.await.ok(),
                            None => None,
                        };
                        unknown |= answer.is_none();
                        let rev = match answer {
                            // Refused: our key, if it existed, was not adopted. An earlier
                            // attempt whose outcome is unknown may have landed since.
                            Some(resp) if refused_by_other(&resp, lease) => {
                                left.floor = left.floor.max(resp.header_revision);
                                match unknown {
                                    true => find_own_key(&store, &mut left, &claim).await,
                                    false => None,
                                }
                            }
                            Some(resp) => my_revision(&resp, &left.key, lease).ok(),
                            None => find_own_key(&store, &mut left, &claim).await,
                        };
                        if let Some(rev) = rev {
                            let _ = settle_delete(&store, &left.key, rev, left.lease, &claim, None)
                                .await;
                        }
                        let again = store
                            .request_timeout()
                            .filter(|_| unknown && !claim.session_lost());
                        drop(claim);
                        if let Some(after) = again {
                            tokio::time::sleep(after).await;
                            look_again(&store, &mut left, &session).await;
                        }
                    });
                }
            }
            (None, _) => drop(claim),
        }
    }
}

/// Our key as the clean-up of a join whose outcome is unknown sees it: what it may remove.
///
/// A key of ours found is the one the join may have put (it names our session's lease, and
/// the claim keeps this session from joining with it meanwhile), unless it was there before:
/// - a join of [`Entry::join_excluding`] refused with its answer known (`floor` is that
///   answer's header revision): a key created at or before then existed when it was
///   refused, and is not ours to remove; a key created later can only be an earlier attempt
///   of this join, applied late (once `other` was gone);
/// - a key found behind `other` bound to our lease (created after it) cannot have been put
///   by such a join either (its compare forbids it): a resumed key that the join refused,
///   not removed, and `floor` is raised to it.
struct Leftover {
    key: Vec<u8>,
    /// The key of the other mode of [`Entry::join_excluding`], if the join was one.
    other: Option<Vec<u8>>,
    lease: LeaseId,
    floor: Revision,
}

impl Leftover {
    /// Read our key (and `other`, in one transaction): the create revision of a key this
    /// join may have put.
    async fn read(&mut self, store: &Arc<dyn Store>) -> Result<Option<Revision>> {
        let (mine, other) = match &self.other {
            None => {
                let resp = store.range(Range::key(self.key.clone())).await?;
                (resp.kvs.into_iter().next(), None)
            }
            Some(other) => {
                let resp = store
                    .txn(Txn::new().and_then([
                        TxnOp::get(Range::key(self.key.clone())),
                        TxnOp::get(Range::key(other.clone())),
                    ]))
                    .await?;
                (first_kv(&resp, 0), first_kv(&resp, 1))
            }
        };
        // A key no longer bound to our lease is not one a join of ours put (it puts keys
        // bound to it), or not ours any more: never removed here.
        let Some(mine) =
            mine.filter(|kv| kv.create_revision > self.floor && kv.lease == self.lease)
        else {
            return Ok(None);
        };
        if other.is_some_and(|o| o.lease == self.lease && o.create_revision < mine.create_revision)
        {
            self.floor = mine.create_revision;
            return Ok(None);
        }
        Ok(Some(mine.create_revision))
    }
}

/// The create revision of our key, if it exists and this join may have put it (see
/// [`Leftover`]): after a join whose outcome is unknown.
///
/// Reads again, with backoff and for as long as it takes, while the store fails retryably
/// and the session lives (as [`settle_delete`] does): a key left behind here would stay in
/// the queue, ahead of every later waiter, for as long as the session lives, which may be
/// far longer than any outage. Gives up (`None`) once the session is lost or closed (its
/// lease takes the key), or on an error retrying cannot cure (access denied), when the key
/// stays until the session ends.
async fn find_own_key(
    store: &Arc<dyn Store>,
    left: &mut Leftover,
    claim: &OwnedClaim,
) -> Option<Revision> {
    let mut backoff = Duration::from_millis(50);
    loop {
        match left.read(store).await {
            Ok(rev) => return rev,
            Err(e) if e.is_retryable() && !claim.session_lost() => {
                tracing::debug!(error = %e, "looking for a key a failed join may have put failed; retrying");
                claim.release_failed();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) if claim.session_lost() => {
                tracing::debug!(error = %e, "looking for a key a failed join may have put failed; the session is lost, and its lease takes the key");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "looking for a key a failed join may have put failed; if it was put, it stays until the session ends");
                return None;
            }
        }
    }
}

/// Look once more for our key and remove it, a request timeout after a join whose outcome
/// was unknown was settled: a join request that went unanswered may have waited at a server
/// that stopped answering, and be applied when it answers again, which is just when our own
/// requests get through (so the first look may have come first). Nothing if the session is
/// gone or lost (its lease takes the key), or if it has claimed the key again meanwhile: a
/// new join of the same name adopts a key found (same lease, same name) and removes it in
/// its turn. A request held longer than that (by a member paused for longer, in a cluster)
/// can still put the key later; it then stays until the session ends. A key of ours that
/// was there before the join is left alone (see [`Leftover`]).
async fn look_again(store: &Arc<dyn Store>, left: &mut Leftover, session: &WeakSession) {
    let Some(claim) = session
        .upgrade()
        .filter(|s| !s.is_lost())
        .and_then(|s| s.claim_if_free(&left.key))
    else {
        return;
    };
    claim.releasing();
    if let Some(rev) = find_own_key(store, left, &claim).await {
        tracing::debug!(rev, "removing a key a join put late");
        let _ = settle_delete(store, &left.key, rev, left.lease, &claim, None).await;
    }
}

/// An in-flight join request. Only ever used through `&mut` (polled by [`Entry::send`],
/// or moved into a task by `Drop`).
struct InFlight(BoxFuture<'static, Result<TxnResponse>>);

/// What `last_few` (the last keys created under `queue`'s prefix, newest first, read with
/// limit `depth`, ours among them) tells of the queue's head.
enum HeadSeen {
    /// The read saw every key: this is the head (`None`: the queue is empty).
    Exact(Option<KeyValue>),
    /// The read saw only the newest keys, a member older than ours among them: we are not
    /// at the head, and which key is, is not known.
    NotUs(KeyValue),
    /// Read the head instead (the queue is longer than the read with no other member in
    /// it, or a key of a nested name is among the keys).
    Unknown,
}

fn head_of_last_few(queue: &Queue, last_few: &[KeyValue], depth: i64) -> HeadSeen {
    let complete = i64::try_from(last_few.len()).is_ok_and(|n| n < depth);
    if last_few.iter().any(|kv| !queue.admits(kv)) {
        return HeadSeen::Unknown;
    }
    match last_few {
        _ if complete => HeadSeen::Exact(last_few.last().cloned()),
        [_, older, ..] => HeadSeen::NotUs(older.clone()),
        _ => HeadSeen::Unknown,
    }
}

fn first_kv(resp: &TxnResponse, index: usize) -> Option<KeyValue> {
    resp.responses
        .get(index)
        .and_then(TxnOpResponse::as_get)
        .and_then(|g| g.kvs.first().cloned())
}

/// True if a join of [`Entry::join_excluding`] failed because the key it must not wait
/// behind exists bound to our `lease`, ahead of our own key: its failure branch reads our
/// key first and that key last (a third read, which no other join has). Our key, if it
/// exists and was created before that one, is not behind it: the join adopts ours then, as
/// every join adopts its key (a lease whose two keys of a read-write lock are both in the
/// store can take the older one's mode, release it, then take the other).
fn refused_by_other(resp: &TxnResponse, lease: LeaseId) -> bool {
    if resp.succeeded {
        return false;
    }
    let Some(other) = first_kv(resp, 2).filter(|kv| kv.lease == lease) else {
        return false;
    };
    first_kv(resp, 0)
        .filter(|mine| mine.lease == lease)
        .is_none_or(|mine| other.create_revision < mine.create_revision)
}

/// Our key as a join that did not put it found it, if it is not ours any more: it is no
/// longer bound to our `lease` (overwritten with no lease or another one). Such a key is
/// never adopted: a key with no lease counts in no queue (another session may hold the
/// name now), and its create revision, kept by the overwrite, is a place in the queue (a
/// fencing token) that is not ours.
fn foreign_key(resp: &TxnResponse, lease: LeaseId) -> Option<KeyValue> {
    if resp.succeeded {
        return None;
    }
    first_kv(resp, 0).filter(|kv| kv.lease != lease)
}

/// Our revision from the join transaction: the header revision if we created the key, or
/// the existing key's create revision if it is bound to our `lease` (see [`foreign_key`]).
fn my_revision(resp: &TxnResponse, key: &[u8], lease: LeaseId) -> Result<Revision> {
    if resp.succeeded {
        return Ok(resp.header_revision);
    }
    first_kv(resp, 0)
        .filter(|kv| kv.lease == lease)
        .map(|kv| kv.create_revision)
        .ok_or_else(|| not_held(key))
}

/// The head of a queue, held: our key, its create revision (the fencing token), and the
/// watch that tells us when it stops being ours.
///
/// Dropping it releases the key in the background (compare-and-delete).
pub(crate) struct Held {
    session: Session,
    key: String,
    rev: Revision,
    /// The store revision at which we were seen at the head (see
    /// [`granted_revision`](Held::granted_revision)).
    granted_at: Revision,
    ownership: Ownership,
    claim: Option<OwnedClaim>,
    /// The handoff mark its release leaves, if it waited in a long queue (see [`Mark`]).
    mark: Option<Mark>,
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("key", &self.key)
            .field("fencing_token", &self.rev)
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl Held {
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn rev(&self) -> Revision {
        self.rev
    }

    /// The store revision at which we were seen at the head: the join's, if we were at
    /// once, else that of the read or event that showed every predecessor gone (so later
    /// than their deletes, and than the revisions at which they were granted).
    pub(crate) fn granted_revision(&self) -> Revision {
        self.granted_at
    }

    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    /// True once the key is lost. Checks the session's local deadline first
    /// ([`Session::is_lost`]): if it has passed, the session is marked lost now, which cancels
    /// our token (a child of the session's) before this returns.
    pub(crate) fn is_lost(&self) -> bool {
        self.session.is_lost();
        self.ownership.lost.is_cancelled()
    }

    pub(crate) fn lost_reason(&self) -> Option<String> {
        self.session.is_lost();
        self.ownership.reason(&self.session)
    }

    /// The token cancelled on loss, after checking the session's local deadline.
    pub(crate) fn lost_token(&self) -> &CancellationToken {
        self.session.is_lost();
        &self.ownership.lost
    }

    /// `CreateRevision(key) == rev` (Go's `IsOwner()`): false once the key is deleted or
    /// replaced, but not once it is overwritten with no lease (see
    /// [`ownership_compares`](Held::ownership_compares)).
    pub(crate) fn is_owner(&self) -> Compare {
        Compare::create_revision(self.key.as_bytes(), CompareOp::Equal, self.rev)
    }

    /// [`is_owner`](Held::is_owner) and `Lease(key) == our lease`: both hold only while we
    /// hold the key. An overwrite with no lease (`etcdctl put KEY ""`, which frees the name:
    /// the key counts in no queue) keeps the create revision; a key deleted and created
    /// again by a later hold of this session has our lease but a new create revision.
    pub(crate) fn ownership_compares(&self) -> [Compare; 2] {
        let lease = self.session.lease_id();
        [
            self.is_owner(),
            Compare::lease(self.key.as_bytes(), CompareOp::Equal, lease),
        ]
    }

    /// Run `txn` guarded by [`ownership_compares`](Held::ownership_compares); NotHeld if
    /// they failed (the hold is then marked lost: the failure branch's read of the key
    /// shows it gone, replaced or no longer bound to our lease, which no watch may have
    /// told yet), or at once if the key is known lost (the session's local deadline may
    /// have passed while the server still counts the lease alive: a lost holder sends no
    /// more writes).
    pub(crate) async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        if self.is_lost() {
            return Err(not_held(self.key.as_bytes()));
        }
        let txn = Txn {
            compares: self
                .ownership_compares()
                .into_iter()
                .chain(txn.compares)
                .collect(),
            success: txn.success,
            failure: txn
                .failure
                .into_iter()
                .chain(std::iter::once(TxnOp::get(Range::key(self.key.as_bytes()))))
                .collect(),
        };
        let mut resp = self.session.store().txn(txn).await?;
        if !resp.succeeded {
            let read = resp.responses.pop();
            let kv = read
                .as_ref()
                .and_then(TxnOpResponse::as_get)
                .and_then(|g| g.kvs.first());
            let lease = crate::hub::Binding::Lease(self.session.lease_id());
            if let Some(why) = crate::hub::gone_why(kv, self.rev, lease) {
                // Lost as of this transaction's revision, whatever a watch says later: the
                // watch may not have told us yet.
                self.ownership.report(&self.session, why);
                return Err(not_held(self.key.as_bytes()));
            }
        }
        Ok(resp)
    }

    /// Delete our key if it is still ours (create revision and lease: see
    /// [`delete_if_owned`]). NotHeld if it was not; a key freed by an overwrite with no
    /// lease is removed all the same.
    ///
    /// The claim on the key is freed only once the store has answered: if this future is
    /// dropped with the delete in flight, or the delete fails, it is finished in the
    /// background first. Otherwise this session could take the same name again, adopt the
    /// old key (same create revision), and lose that new hold to the late delete.
    pub(crate) async fn release(mut self, what: &'static str) -> Result<()> {
        if self.is_lost() {
            // Known lost: say so at once, whether or not the store answers (a store gone
            // made this a retryable Unavailable after a request timeout). The
            // compare-and-delete still runs, in the background (see `Drop`).
            return Err(not_held(self.key.as_bytes()));
        }
        self.ownership.stop();
        let store = self.session.store().clone();
        let mut pending = PendingRelease {
            store: store.clone(),
            key: self.key.as_bytes().to_vec(),
            rev: self.rev,
            lease: self.session.lease_id(),
            claim: self.claim.take(),
            mark: self.mark.take(),
        };
        if let Some(c) = &pending.claim {
            c.releasing();
        }
        let mark = pending.mark.as_ref();
        let result = delete_if_owned(&store, self.key.as_bytes(), self.rev, pending.lease, mark)
            .instrument(tracing::debug_span!("release", what, key = %self.key, token = self.rev))
            .await;
        match result {
            Ok(deleted) => {
                // Answered: the claim can go.
                drop(pending.claim.take());
                if deleted {
                    Ok(())
                } else {
                    Err(not_held(self.key.as_bytes()))
                }
            }
            // The delete may still land: `pending` keeps the claim until the store answers.
            Err(e) => {
                if let Some(c) = pending.claim.as_ref().filter(|_| e.is_retryable()) {
                    c.release_failed();
                }
                Err(e)
            }
        }
    }
}

/// A release whose delete has not been answered yet: dropped before it is (the caller's
/// future dropped, or the delete failed), it settles the delete in the background and
/// frees the claim after.
struct PendingRelease {
    store: Arc<dyn Store>,
    key: Vec<u8>,
    rev: Revision,
    lease: LeaseId,
    claim: Option<OwnedClaim>,
    mark: Option<Mark>,
}

impl Drop for PendingRelease {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            release_in_background(
                self.store.clone(),
                std::mem::take(&mut self.key),
                self.rev,
                self.lease,
                claim,
                self.mark.take(),
            );
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.ownership.stop();
        if let Some(claim) = self.claim.take() {
            release_in_background(
                self.session.store().clone(),
                std::mem::take(&mut self.key).into_bytes(),
                self.rev,
                self.session.lease_id(),
                claim,
                self.mark.take(),
            );
        }
    }
}

/// Run `fut`, failing with [`Error::Timeout`] after `timeout` (dropping `fut`, which cleans up).
pub(crate) async fn with_timeout<T>(
    operation: &'static str,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            operation,
            after: timeout,
        }),
    }
}

/// [`with_timeout`] for a wait that queues `key` in `session`: on timeout, the removal of
/// our key (spawned by the dropped future) is waited for, at most 500 ms, before the error
/// is returned, as Redis's `lock_timeout` does: the others no longer see us queued (or
/// count us) once the caller has its `Timeout`, and a process that exits right after
/// leaves nothing (found by review: 12 of 20 etcd timeouts returned with the key there).
pub(crate) async fn with_timeout_settled<T>(
    session: &Session,
    key: &str,
    operation: &'static str,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let r = with_timeout(operation, timeout, fut).await;
    if matches!(r, Err(Error::Timeout { .. })) {
        settle(session, key, operation).await;
    }
    r
}

/// After a wait that queued `key` in `session` was dropped: wait, at most
/// [`SETTLE_FOR`], until its removal is done (see [`with_timeout_settled`]).
pub(crate) async fn settle(session: &Session, key: &str, operation: &str) {
    let settled = session.unclaimed(key.as_bytes(), operation, true);
    let _ = tokio::time::timeout(SETTLE_FOR, settled).await;
}

/// How long a `*_timeout` that timed out waits for its key's removal before it returns.
pub(crate) const SETTLE_FOR: Duration = Duration::from_millis(500);

/// The accessors every guard over a [`Held`] key shares (lock guards, leadership). The type
/// must have a field `held: Held`; `$what` names what is held in the docs ("lock").
///
/// `held_accessors!(@shared "permit")` gives all of them but `fencing_token`, for what many
/// holders share at once (a semaphore's permits), where a token cannot fence.
macro_rules! held_accessors {
    ($what:literal) => {
        #[doc = concat!("The fencing token of the ", $what, ": the create revision of our key.")]
        ///
        /// Later grants get strictly greater tokens. Give it to the resource you protect and
        /// have it refuse writes with a token lower than one it has seen.
        pub fn fencing_token(&self) -> $crate::store::Revision {
            self.held.rev()
        }

        #[doc = concat!("The store revision at which the ", $what, " was granted: the join's, if it was free,")]
        /// else that of the read or event that showed every key ahead gone. It is what Go's
        /// `Mutex.Header().Revision` gives, and `etcdctl lock` exports as `ETCD_LOCK_REV`
        /// (`baton lock` too). Later grants on the name get strictly greater ones, also
        /// when Go or `etcdctl` clients take turns with Baton: each is seen after the
        /// previous holder's delete. [`fencing_token`](Self::fencing_token) (the key's
        /// create revision) rises from grant to grant among Baton holders, but a Baton
        /// holder that queued behind a Go one may get a smaller token than Go's header
        /// revision: fence on this one where both kinds of clients take the lock.
        pub fn granted_revision(&self) -> $crate::store::Revision {
            self.held.granted_revision()
        }

        $crate::queue::held_accessors!(@shared $what);
    };
    (@shared $what:literal) => {
        #[doc = concat!("The key we hold for the ", $what, ": `…/<lease id in hex>`.")]
        pub fn key(&self) -> &str {
            self.held.key()
        }

        #[doc = concat!("The session the ", $what, " is bound to.")]
        pub fn session(&self) -> &$crate::Session {
            self.held.session()
        }

        #[doc = concat!("True once the ", $what, " is lost. See `lost()`.")]
        ///
        /// True at once when the session's local deadline has passed, even if its keep-alive
        /// task has not run since (a paused process): see
        /// [`Session::is_lost`](crate::Session::is_lost).
        pub fn is_lost(&self) -> bool {
            self.held.is_lost()
        }

        #[doc = concat!("Why the ", $what, " was lost, if it was (checking the local deadline first, as `is_lost()` does).")]
        pub fn lost_reason(&self) -> Option<String> {
            self.held.lost_reason()
        }

        #[doc = concat!("Completes when the ", $what, " is lost: our key was deleted or replaced")]
        /// (by an admin, a revoke or the lease's expiry), or overwritten so that it is no
        /// longer bound to our lease (it then no longer counts in the queue: a waiter may be
        /// granted), or the session was lost (see [`Session::lost`](crate::Session::lost)).
        /// A deleted key, or one overwritten with no lease (`etcdctl put KEY ""`), is noticed
        /// within one watch round trip (plus a read); a key overwritten bound to another
        /// lease (`etcdctl put --lease`), by the key's own watch as fast, but by a holder that
        /// watches through its client's shared watch (it held the name a moment before) only
        /// when it next reads the key (a write through the guard, or the release). The session's local deadline is checked when this is called: if it has
        /// passed, the future is ready at once.
        ///
        /// # Cancel safety
        ///
        /// Cancel safe.
        pub fn lost(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
            self.held.lost_token().cancelled()
        }

        #[doc = concat!("A token cancelled when the ", $what, " is lost (a child token: cancelling it changes nothing).")]
        ///
        /// Already cancelled if the session's local deadline has passed when this is called;
        /// later, cancelled by the session's keep-alive task or by the first `is_lost()` that
        /// finds the deadline passed.
        pub fn lost_token(&self) -> tokio_util::sync::CancellationToken {
            self.held.lost_token().child_token()
        }

        #[doc = concat!("A compare on our key's create revision, as Go's `IsOwner()`: it fails once the key of the ", $what, " is deleted or replaced.")]
        ///
        #[doc = concat!("It does not catch every loss of the ", $what, ": an operator who overwrites the key with no lease (`etcdctl put KEY \"\"`) frees it")]
        /// (the key counts in no queue; another session may be granted it), but the key keeps
        /// its create revision, so this compare still holds. Guard your own transactions with
        /// [`ownership_compares()`](Self::ownership_compares), or send them through
        /// [`txn()`](Self::txn), which adds those.
        pub fn is_owner(&self) -> $crate::store::Compare {
            self.held.is_owner()
        }

        #[doc = concat!("The compares that all hold only while we hold the ", $what, ": [`is_owner()`](Self::is_owner) (our")]
        /// create revision) and `Lease(key) == our session's lease`. Add both to a
        /// transaction's compares to make it apply only while the hold is ours.
        ///
        /// Neither is enough alone: an overwrite with no lease (an operator's `etcdctl put`,
        /// which frees the name) keeps the create revision; a key deleted and created again by
        /// a later hold of the same session has the same lease but a new create revision.
        pub fn ownership_compares(&self) -> [$crate::store::Compare; 2] {
            self.held.ownership_compares()
        }

        #[doc = concat!("Run `txn` only while we still hold the ", $what, ": its compares get [`ownership_compares()`](Self::ownership_compares) added.")]
        ///
        /// Returns [`Error::NotHeld`](crate::Error::NotHeld) if it is no longer ours (nothing
        /// was applied; nothing is sent if `is_lost()` already says so), and marks it lost:
        /// the key was deleted, replaced, or overwritten so that it is no longer bound to our
        /// lease (which frees it; a watch may not have told yet). If it is ours but one of
        /// `txn`'s own compares failed, returns `Ok` with `succeeded == false` and the
        /// responses of `txn`'s failure branch.
        ///
        /// # Cancel safety
        ///
        /// The transaction may or may not have been applied if the future is dropped.
        pub async fn txn(
            &self,
            txn: $crate::store::Txn,
        ) -> $crate::Result<$crate::store::TxnResponse> {
            self.held.txn(txn).await
        }
    };
}
pub(crate) use held_accessors;
