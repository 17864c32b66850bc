//! A double barrier: `count` participants enter together and leave together (Go's
//! `recipe.DoubleBarrier`, with its defects fixed).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::error::{Error, Result};
use crate::names::{lease_key, validate_count, validate_name, Queue};
use crate::ownership::not_held;
use crate::queue::{held_accessors, with_timeout, with_timeout_settled, Entry, Held};
use crate::session::Session;
use crate::store::{
    Compare, CompareOp, KeyValue, Range, Revision, SortOrder, SortTarget, Store, Txn, TxnOp,
    TxnOpResponse,
};
use crate::watching::{while_alive, Until, Wait, Waiter};

/// A double barrier: [`enter()`](DoubleBarrier::enter) returns once `count` participants
/// have entered, and [`leave()`](DoubleBarrierGuard::leave) returns once all of them have
/// left. Use it to start a phase of work together and to finish it together.
///
/// # Rounds
///
/// The participants' keys queue under `NAME/waiters/`. When `count` of them are there, one
/// of them writes `NAME/ready`: the barrier is open, and the first `count` keys at that
/// moment are this round's participants. `NAME/ready` holds the create revision of the
/// last of them, so the round is fixed when it opens: a key created before `NAME/ready` but
/// after that one is not let in, even once a participant has left. A participant that
/// arrives while a round is open (or one beyond `count` that raced in) gets
/// [`Error::BarrierFull`]. When the last participant leaves, `NAME/ready` is deleted and
/// the name can be used for the next round. (A `ready` written by Go's recipe holds no
/// revision: its round is the first `count` live keys created before it.)
///
/// # Agreeing on the count
///
/// Each participant's key holds its `count`. The count of the barrier is the one of the
/// first participant (by create revision) whose key says one: a participant that says
/// another fails with [`Error::Mismatch`] (removing its key). If that first participant
/// leaves before the round opens, the next one whose key says a count decides, so a
/// participant that agreed with the first may fail with `Mismatch` later. A Baton
/// participant opens a round only when each of its participants says the same count (or
/// none), so among Baton participants nobody passes with fewer participants than it asked
/// for.
///
/// A participant of Go's recipe writes no count (an empty value): it agrees with any, and
/// does not check the others'. This is the limit of the check: a round that Go's recipe
/// opens (its `ready` says no count) is opened with Go's count, and a Baton participant
/// in it passes once it is among the round's first keys, even with fewer participants
/// than its own count (with a Go participant for 2 and a Baton one for 3, both pass with
/// two).
///
/// # A participant whose session dies
///
/// Keys are bound to their sessions' leases, so a dead participant's key expires with its
/// lease (at most its TTL after its last keep-alive):
/// - **before the barrier opens**, it no longer counts: the others keep waiting for
///   `count` live participants, so the barrier opens when a replacement enters (bound the
///   wait with [`enter_timeout`](DoubleBarrier::enter_timeout)). The write that opens the
///   barrier checks that each of the round's participants is still there, so one that
///   leaves just before it is not counted either (for rounds of up to 127 participants:
///   etcd's limit on a transaction's compares; in a larger round, only the first 127 are
///   checked);
/// - **after it opened**, it counts as having left: the others' `leave()` returns once its
///   lease has expired, never later.
///
/// A participant whose own session is lost gets [`Error::SessionLost`] from `enter()` or
/// `leave()` (while it still had a key to hold), and its guard's `lost()` fires.
///
/// # Defects of Go 3.4's recipe, fixed here
///
/// - calls could not be cancelled (it stores `context.TODO()`): here every wait is cancel
///   safe and has a timeout variant;
/// - the participant that completes the count must write `ready` for anyone to enter, and a
///   waiter whose session died was still counted; here any participant that sees `count`
///   keys writes it, and a re-read after every change counts only live keys;
/// - a stale `ready` left by a round whose participants all died blocks the name forever;
///   here it is recognised (no participant of its round is left) and removed;
/// - `Leave` orders participants by mod revision and deletes `ready` even when the one key
///   left is not its own; here they are ordered by create revision and only the last
///   participant of the round deletes `ready`, guarded by its create revision;
/// - participants created with different counts were not noticed (some passed with too
///   few, or nobody passed); here the odd one out fails with [`Error::Mismatch`].
///
/// # Key layout
///
/// `NAME/waiters/<lease id in lowercase hex>` (bound to the session's lease; its value,
/// which Go ignores and leaves empty, is the participant's `count` in ASCII decimal) and
/// `NAME/ready` (no lease; its value, which Go ignores, is the create revision of the
/// round's last participant in ASCII decimal): Go's prefixes, so Go and Baton participants
/// count each other.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// let mut workers = Vec::new();
/// for _ in 0..3 {
///     let session = baton::Session::new(&client).await?;
///     workers.push(tokio::spawn(async move {
///         let barrier = baton::DoubleBarrier::new(&session, "batch/42", 3)?;
///         let inside = barrier.enter().await?; // all three are in
///         /* the work */
///         inside.leave().await // all three are out
///     }));
/// }
/// for w in workers {
///     w.await.expect("worker panicked")?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DoubleBarrier {
    session: Session,
    name: String,
    count: u32,
    waiters: String,
    ready: String,
    key: String,
}

impl fmt::Debug for DoubleBarrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DoubleBarrier")
            .field("name", &self.name)
            .field("count", &self.count)
            .field("key", &self.key)
            .finish()
    }
}

impl DoubleBarrier {
    /// The double barrier named `name` for `count` participants, entered through
    /// `session`.
    ///
    /// Fails with [`Error::InvalidArgument`] if `count` is 0, or if the name is empty,
    /// longer than 1 KiB, or contains a NUL byte.
    pub fn new(session: &Session, name: &str, count: u32) -> Result<DoubleBarrier> {
        validate_name(name)?;
        validate_count("count", count)?;
        let waiters = format!("{name}/waiters/");
        Ok(DoubleBarrier {
            session: session.clone(),
            name: name.to_string(),
            count,
            key: lease_key(&waiters, session.lease_id()),
            waiters,
            ready: format!("{name}/ready"),
        })
    }

    /// The barrier's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many participants the barrier waits for.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The count a participant's key says (its value: the count in ASCII decimal), or
    /// `None` if it says none (Go's recipe writes an empty value). For tools that read the
    /// keys themselves (`baton status`).
    pub fn decode_value(value: &[u8]) -> Option<u32> {
        let text = std::str::from_utf8(value).ok()?;
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok().filter(|&count| count > 0)
    }

    /// Enter, and wait until `count` participants have entered.
    ///
    /// Fails with [`Error::BarrierFull`] if a round is already open with its `count`
    /// participants inside, with [`Error::Mismatch`] if the first participant whose key
    /// says a count says another (see
    /// [Agreeing on the count](DoubleBarrier#agreeing-on-the-count)), with [`Error::SessionLost`] if the session is lost while waiting, and with
    /// [`Error::AlreadyHeld`] if this session is already in the barrier.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future removes our key, so we no longer count, in a task
    /// spawned on the current runtime: a participant that reads the members before that
    /// task has run counts us (and a round it completes with us may leave a later one
    /// [`Error::BarrierFull`]). [`enter_timeout()`](DoubleBarrier::enter_timeout) waits
    /// for the removal before it returns.
    pub async fn enter(&self) -> Result<DoubleBarrierGuard> {
        self.enter_inner()
            .instrument(tracing::debug_span!("enter", barrier = %self.name, count = self.count))
            .await
    }

    /// [`enter()`](DoubleBarrier::enter), giving up with [`Error::Timeout`] after `timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe; on timeout our key is removed before the error is returned (if the
    /// store does not confirm it within 500 ms, the removal goes on in the background).
    pub async fn enter_timeout(&self, timeout: Duration) -> Result<DoubleBarrierGuard> {
        with_timeout_settled(&self.session, &self.key, "enter", timeout, self.enter()).await
    }

    async fn enter_inner(&self) -> Result<DoubleBarrierGuard> {
        let queue = Queue::direct(&self.waiters);
        let count = self.count.to_string();
        let mut entry = Entry::join(
            &self.session,
            &self.name,
            queue,
            &self.key,
            count.as_bytes(),
            false,
        )
        .await?;
        // Our key from before (a resumed session) that says another count: others would
        // count us for that one.
        if let Some(old) = entry.existing_value().and_then(DoubleBarrier::decode_value) {
            if old != self.count {
                let err = self.mismatch(&self.key, old);
                entry.abandon().await;
                return Err(err);
            }
        }
        let my_rev = entry.my_rev();
        let store = entry.store().clone();
        match while_alive(&self.session, self.wait_open(&store, my_rev)).await {
            Ok((round, seen_at)) => {
                entry.reached_head(seen_at);
                tracing::debug!(round = round.opened, "entered");
                Ok(DoubleBarrierGuard {
                    barrier: self.clone(),
                    held: entry.into_held(),
                    round,
                })
            }
            Err(e) => {
                entry.abandon().await;
                Err(e)
            }
        }
    }

    /// The members under `NAME/waiters/` in create order, optionally only those created
    /// before `before`.
    fn members_read(&self, before: Option<Revision>) -> Range {
        let read = Range::prefix(self.waiters.as_bytes())
            .sort_by(SortTarget::CreateRevision, SortOrder::Ascending);
        match before {
            Some(rev) => read.with_max_create_revision(rev - 1),
            None => read,
        }
    }

    fn members(&self, kvs: Vec<KeyValue>) -> Vec<KeyValue> {
        let queue = Queue::direct(&self.waiters);
        kvs.into_iter().filter(|kv| queue.admits(kv)).collect()
    }

    /// The read of `round`'s participants still there (see [`Round`]).
    fn round_read(&self, round: &Round) -> Range {
        self.members_read(Some(round.last.map_or(round.opened, |last| last + 1)))
    }

    /// `round`'s participants among the keys `round_read` found.
    fn round_members(&self, kvs: Vec<KeyValue>, round: &Round) -> Vec<KeyValue> {
        let members = self.members(kvs);
        match round.last {
            Some(_) => members,
            None => members.into_iter().take(self.count as usize).collect(),
        }
    }

    fn is_mine(&self, kv: &KeyValue, my_rev: Revision) -> bool {
        kv.key == self.key.as_bytes() && kv.create_revision == my_rev
    }

    fn full(&self) -> Error {
        Error::BarrierFull {
            name: self.name.clone(),
        }
    }

    /// The first of `kvs` whose key says a count other than ours, with that count.
    fn disagreeing<'a>(
        &self,
        kvs: impl IntoIterator<Item = &'a KeyValue>,
    ) -> Option<(&'a KeyValue, u32)> {
        kvs.into_iter()
            .filter_map(|kv| Some((kv, DoubleBarrier::decode_value(&kv.value)?)))
            .find(|&(_, count)| count != self.count)
    }

    fn mismatch(&self, key: impl AsRef<[u8]>, theirs: u32) -> Error {
        Error::Mismatch {
            name: self.name.clone(),
            reason: format!(
                "participant {} waits for a count of {theirs}, this one for {}",
                String::from_utf8_lossy(key.as_ref()),
                self.count
            ),
        }
    }

    /// Wait until a round opens with us among its participants: the round, and the
    /// revision at which that was seen.
    async fn wait_open(
        &self,
        store: &Arc<dyn Store>,
        my_rev: Revision,
    ) -> Result<(Round, Revision)> {
        let ready = self.ready.as_bytes();
        let mut waiter = Waiter::new(store).counting(self.session.client().hub());
        loop {
            let read = Txn::new().and_then([
                TxnOp::get(Range::key(ready)),
                TxnOp::get(self.members_read(None)),
            ]);
            let resp = waiter.read_txn(read).await?;
            let header = resp.header_revision;
            let mut gets = resp.responses.into_iter().filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs),
                _ => None,
            });
            let open = gets.next().and_then(|kvs| kvs.into_iter().next());
            let members = self.members(gets.next().unwrap_or_default());
            if !members.iter().any(|kv| self.is_mine(kv, my_rev)) {
                return Err(not_held(self.key.as_bytes()));
            }
            // The count is the one of the first participant whose key says one: if it is
            // not ours, we are the odd one out.
            let first_count = members
                .iter()
                .take_while(|kv| kv.create_revision < my_rev)
                .find_map(|kv| Some((kv, DoubleBarrier::decode_value(&kv.value)?)));
            if let Some((kv, theirs)) = first_count.filter(|&(_, c)| c != self.count) {
                return Err(self.mismatch(&kv.key, theirs));
            }
            match open {
                // Opened after we entered: are we among the first `count`?
                Some(r) if r.create_revision > my_rev => {
                    let round = Round::of(&r);
                    let participants: Vec<&KeyValue> = match round.last {
                        Some(last) => members
                            .iter()
                            .take_while(|kv| kv.create_revision <= last)
                            .collect(),
                        None => members
                            .iter()
                            .filter(|kv| kv.create_revision < r.create_revision)
                            .take(self.count as usize)
                            .collect(),
                    };
                    if !participants.iter().any(|kv| self.is_mine(kv, my_rev)) {
                        return Err(self.full());
                    }
                    // Baton opens only rounds whose participants agree; Go's recipe does
                    // not look.
                    if let Some((kv, theirs)) = self.disagreeing(participants) {
                        return Err(self.mismatch(&kv.key, theirs));
                    }
                    return Ok((round, header));
                }
                // Opened before we came: a round in progress, or a stale one.
                Some(r) => {
                    if members
                        .iter()
                        .any(|kv| kv.create_revision < r.create_revision)
                    {
                        return Err(self.full());
                    }
                    tracing::debug!(round = r.create_revision, "removing a stale ready key");
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            ready,
                            CompareOp::Equal,
                            r.mod_revision,
                        )])
                        .and_then([TxnOp::delete(ready)]);
                    if let Err(e) = store.txn(txn).await {
                        waiter.retry(e).await?;
                    }
                }
                None if members.len() >= self.count as usize => {
                    // The round is the first `count` keys now: say which is its last. Each
                    // of them must still be there when `ready` is written (one may leave
                    // between our read and this write, and must not be counted), as far as
                    // etcd's limit on a transaction's compares allows; if one has gone, the
                    // write fails and the next read sees who is left.
                    let round = &members[..self.count as usize];
                    // One of them waits for another count (and, entered after the first
                    // participant that says one, is failing with Mismatch): it must not be
                    // counted. Read again once its key is gone, or once the key whose count
                    // we agreed with is: the odd one may not have read yet, and with that
                    // key gone, its count may be the barrier's (then we are the odd one,
                    // and it waits for our key to go).
                    if let Some((odd, _)) = self.disagreeing(round) {
                        let mine = self.key.as_bytes().to_vec();
                        let mut keys = vec![ready.to_vec(), mine, odd.key.clone()];
                        keys.extend(first_count.map(|(kv, _)| kv.key.clone()));
                        waiter
                            .wait(Wait::keys(keys, header, Until::Changed))
                            .await?;
                        continue;
                    }
                    let last = round[round.len() - 1].create_revision;
                    let present = round.iter().take(MAX_GUARDED).map(|kv| {
                        Compare::create_revision(
                            kv.key.clone(),
                            CompareOp::Equal,
                            kv.create_revision,
                        )
                    });
                    let txn = Txn::new()
                        .when([Compare::create_revision(ready, CompareOp::Equal, 0)])
                        .when(present)
                        .and_then([TxnOp::put(ready, last.to_string(), 0)]);
                    if let Err(e) = store.txn(txn).await {
                        waiter.retry(e).await?;
                    }
                }
                None => {
                    // Read again also once the key whose count we agreed with is gone: the
                    // next one that says a count decides then, and it may not be ours.
                    let mine = self.key.as_bytes().to_vec();
                    let mut keys = vec![ready.to_vec(), mine];
                    keys.extend(first_count.map(|(kv, _)| kv.key.clone()));
                    waiter
                        .wait(Wait::keys(keys, header, Until::Changed))
                        .await?;
                }
            }
        }
    }
}

/// Delete our key as we leave. A retryable failure (the store not reached, or its answer
/// lost: "request timed out" while etcd elects a leader) leaves the delete to the
/// background, retried until the store answers (see `Held::release`), and we count as
/// gone, as a leave cut short does: one failed request must not fail a leave after the
/// whole wait (nor end it before the round is empty), with nothing left to call again.
async fn release_ours(held: Held) -> Result<()> {
    match held.release("leave").await {
        Err(e) if e.is_retryable() => {
            tracing::debug!(error = %e, "deleting our key failed; it is deleted in the background");
            Ok(())
        }
        r => r,
    }
}

/// How many of a round's participants the write of `NAME/ready` checks are still there:
/// etcd allows 128 compares in a transaction (`--max-txn-ops`), one of which checks
/// `ready` itself.
const MAX_GUARDED: usize = 127;

/// A participant inside a [`DoubleBarrier`]. Leave with
/// [`leave()`](DoubleBarrierGuard::leave).
///
/// # Drop behaviour
///
/// Dropping it leaves without waiting for the others: our key is deleted in a task spawned
/// on the current tokio runtime (best effort; otherwise, as when the runtime shuts down
/// first, it expires with the session's lease), and the others count us as gone.
/// `NAME/ready`, which has no lease, is then deleted by the last participant to see the
/// round empty in its own [`leave()`](DoubleBarrierGuard::leave); with nobody else
/// leaving (a barrier of one), it stays until the next round on the name removes it.
#[must_use = "if unused the participant leaves at once, without waiting for the others"]
pub struct DoubleBarrierGuard {
    barrier: DoubleBarrier,
    held: Held,
    round: Round,
}

/// A round of a double barrier, as `NAME/ready` says.
#[derive(Clone, Copy, Debug)]
struct Round {
    /// The create revision of `NAME/ready`.
    opened: Revision,
    /// The create revision of the round's last participant (`NAME/ready`'s value): its
    /// participants are the keys created at or before it. `None` for a `ready` without one
    /// (written by Go): then they are the first `count` keys created before `opened`.
    last: Option<Revision>,
}

impl Round {
    fn of(ready: &KeyValue) -> Round {
        let last = std::str::from_utf8(&ready.value)
            .ok()
            .and_then(|v| v.parse::<Revision>().ok())
            .filter(|last| (1..ready.create_revision).contains(last));
        Round {
            opened: ready.create_revision,
            last,
        }
    }
}

impl fmt::Debug for DoubleBarrierGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DoubleBarrierGuard")
            .field("barrier", &self.barrier.name)
            .field("key", &self.key())
            .field("round", &self.round.opened)
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl DoubleBarrierGuard {
    /// The barrier's name.
    pub fn name(&self) -> &str {
        &self.barrier.name
    }

    /// The round we entered: the create revision of `NAME/ready`. Every participant of a
    /// round sees the same number, and later rounds have greater ones.
    pub fn round(&self) -> Revision {
        self.round.opened
    }

    held_accessors!(@shared "place in the barrier");

    /// Leave, and wait until every participant of the round has left (or has had its
    /// session end).
    ///
    /// The first participant by create revision leaves last: it waits for the others' keys
    /// to go, then deletes its own and `NAME/ready`. Every other participant deletes its
    /// key and waits for the first one's key to go, so each waits on one key at a time.
    ///
    /// Fails with [`Error::SessionLost`] if the session is lost before our key is deleted.
    /// A retryable failure of that delete (the store not reached, or its answer lost) does
    /// not fail it: the delete is retried in the background until the store answers, and
    /// we count as gone, as when the future is dropped.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped before our key was deleted, it is deleted in the
    /// background (we count as gone); after, nothing of ours is left to clean up.
    /// `NAME/ready` (no lease) may be left if the future is dropped as the last of the
    /// round leaves: another participant still in `leave()` deletes it when it sees the
    /// round empty, or else the next round on the name does.
    pub async fn leave(self) -> Result<()> {
        let span =
            tracing::debug_span!("leave", barrier = %self.barrier.name, round = self.round.opened);
        self.leave_inner(None).instrument(span).await
    }

    /// [`leave()`](DoubleBarrierGuard::leave), giving up with [`Error::Timeout`] after
    /// `timeout`. Our key has been deleted (or will be, in the background) either way; a
    /// timeout means some other participant has not left yet.
    ///
    /// # Cancel safety
    ///
    /// As [`leave()`](DoubleBarrierGuard::leave).
    pub async fn leave_timeout(self, timeout: Duration) -> Result<()> {
        // Set once the round is seen complete: a timeout after that (during the
        // best-effort close of `ready`, which goes on in the background) is no timeout.
        let complete = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let span =
            tracing::debug_span!("leave", barrier = %self.barrier.name, round = self.round.opened);
        let leave = self.leave_inner(Some(complete.clone())).instrument(span);
        match with_timeout("leave", timeout, leave).await {
            Err(Error::Timeout { .. }) if complete.load(std::sync::atomic::Ordering::SeqCst) => {
                Ok(())
            }
            r => r,
        }
    }

    async fn leave_inner(self, complete: Option<Arc<std::sync::atomic::AtomicBool>>) -> Result<()> {
        let DoubleBarrierGuard {
            barrier,
            held,
            round,
        } = self;
        let store = held.session().store().clone();
        let session = held.session().clone();
        let left = while_alive(
            &session,
            barrier.leave_first(&store, held, &round, complete.as_ref()),
        )
        .await?;
        if left {
            // We were the last: nothing more to wait for.
            return Ok(());
        }
        barrier.wait_all_left(&store, &round, complete).await
    }
}

impl DoubleBarrier {
    /// Leave while we still hold our key: returns `true` if we were the round's last
    /// participant (and have deleted `NAME/ready`), `false` once our key is deleted and
    /// others remain.
    async fn leave_first(
        &self,
        store: &Arc<dyn Store>,
        held: Held,
        round: &Round,
        complete: Option<&Arc<std::sync::atomic::AtomicBool>>,
    ) -> Result<bool> {
        let my_rev = held.rev();
        let mut waiter = Waiter::new(store).counting(self.session.client().hub());
        loop {
            let resp = waiter.range(self.round_read(round)).await?;
            let members = self.round_members(resp.kvs, round);
            if !members.iter().any(|kv| self.is_mine(kv, my_rev)) {
                return Err(not_held(self.key.as_bytes()));
            }
            let last_other = members
                .iter()
                .rfind(|kv| !self.is_mine(kv, my_rev))
                .map(|kv| kv.key.clone());
            let first_is_mine = members.first().is_some_and(|kv| self.is_mine(kv, my_rev));
            match last_other {
                None => {
                    // Every other participant is gone: the round is complete (our key, if
                    // cut short, is deleted in the background).
                    if let Some(complete) = complete {
                        complete.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    release_ours(held).await?;
                    self.close_round(store, round.opened).await;
                    return Ok(true);
                }
                Some(other) if first_is_mine => {
                    let mine = self.key.as_bytes().to_vec();
                    tracing::trace!(other = %String::from_utf8_lossy(&other), "waiting for the others to leave");
                    waiter
                        .wait(Wait::keys(
                            [other, mine],
                            resp.header_revision,
                            // A put too: a key freed by an operator (no lease) counts in
                            // no round, and is never deleted by its lease.
                            Until::Changed,
                        ))
                        .await?;
                }
                Some(_) => {
                    release_ours(held).await?;
                    return Ok(false);
                }
            }
        }
    }

    /// Delete `NAME/ready` if it still opens our round. A failure only leaves it stale,
    /// which the next round's participants remove.
    async fn close_round(&self, store: &Arc<dyn Store>, round: Revision) {
        let ready = self.ready.as_bytes();
        let txn = Txn::new()
            .when([Compare::create_revision(ready, CompareOp::Equal, round)])
            .and_then([TxnOp::delete(ready)]);
        if let Err(e) = store.txn(txn).await {
            tracing::debug!(error = %e, "deleting the ready key failed; the next round removes it");
        }
    }

    /// After we left: wait until no participant of the round is left, watching the first
    /// one (who leaves last).
    async fn wait_all_left(
        &self,
        store: &Arc<dyn Store>,
        round: &Round,
        complete: Option<Arc<std::sync::atomic::AtomicBool>>,
    ) -> Result<()> {
        let mut waiter = Waiter::new(store).counting(self.session.client().hub());
        loop {
            let resp = waiter.range(self.round_read(round)).await?;
            let Some(first) = self.round_members(resp.kvs, round).into_iter().next() else {
                // The last one may have gone without closing the round (its guard dropped,
                // its `leave()` cut short): `NAME/ready` has no lease, and would stay.
                if let Some(complete) = &complete {
                    complete.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                // Usually the last one closed it already: a read, not a write (a raft
                // proposal on etcd, for each of the round's participants).
                // A read that fails: the compare-and-delete, which is safe either way.
                let still_open = waiter
                    .range(Range::key(self.ready.as_bytes()))
                    .await
                    .map_or(true, |ready| {
                        ready
                            .kvs
                            .iter()
                            .any(|kv| kv.create_revision == round.opened)
                    });
                if still_open {
                    // Goes on if we are cut short.
                    let (barrier, store, opened) = (self.clone(), store.clone(), round.opened);
                    let closing =
                        tokio::spawn(async move { barrier.close_round(&store, opened).await });
                    let _ = closing.await;
                }
                return Ok(());
            };
            waiter
                .wait(Wait::key(first.key, resp.header_revision, Until::Changed))
                .await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Client;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A queue item of the same shape as a participant's key (queue `db/waiters`, no
    /// lease) is no participant: one participant of two does not pass.
    #[tokio::test]
    async fn a_queue_item_is_no_participant() {
        let client = Client::memory();
        crate::Queue::new(&client, "db/waiters")
            .unwrap()
            .enqueue("item")
            .await
            .unwrap();
        let s = Session::new(&client).await.unwrap();
        let barrier = DoubleBarrier::new(&s, "db", 2).unwrap();
        let err = barrier
            .enter_timeout(Duration::from_millis(200))
            .await
            .expect_err("entered with one participant of two");
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
    }

    /// A participant that leaves between another's read of the participants and its write
    /// of `ready` must not be counted: the barrier must not open with one live participant
    /// of two.
    #[tokio::test]
    async fn a_participant_gone_just_before_ready_is_written_is_not_counted() {
        use crate::store::slow::SlowWatches;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(store.clone());
        let (a, b) = (
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
        );
        let in_b = DoubleBarrier::new(&b, "db", 2).unwrap();
        let b_key = in_b.key.clone();
        let b_enter = tokio::spawn(async move { in_b.enter().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // B's key goes right before A writes `ready` (after A read both keys).
        *store.before_txn_putting.lock().unwrap() = Some((
            b"db/ready".to_vec(),
            Txn::new().and_then([TxnOp::delete(b_key.as_bytes())]),
        ));
        let in_a = DoubleBarrier::new(&a, "db", 2).unwrap();
        let entered = in_a.enter_timeout(Duration::from_millis(300)).await;
        assert!(
            store.before_txn_putting.lock().unwrap().is_none(),
            "the trap did not spring"
        );
        match entered {
            Err(Error::Timeout { .. }) => {}
            Ok(g) => panic!("entered a barrier of 2 alone (round {})", g.round()),
            Err(e) => panic!("unexpected error: {e}"),
        }
        assert!(b_enter.await.unwrap().is_err(), "B entered without its key");
        // Once A's timed-out key is gone (removed in the background), two others enter
        // together and leave together.
        let started = tokio::time::Instant::now();
        while !client
            .store()
            .range(Range::prefix("db/"))
            .await
            .unwrap()
            .kvs
            .is_empty()
        {
            assert!(started.elapsed() < Duration::from_secs(5), "A's key stayed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let c = Session::new(&client).await.unwrap();
        let in_a = DoubleBarrier::new(&a, "db", 2).unwrap();
        let in_c = DoubleBarrier::new(&c, "db", 2).unwrap();
        let (ga, gc) = tokio::join!(in_a.enter(), in_c.enter());
        let (ga, gc) = (ga.unwrap(), gc.unwrap());
        let (la, lc) = tokio::join!(ga.leave(), gc.leave());
        la.unwrap();
        lc.unwrap();
    }

    /// The keys under `prefix`.
    async fn keys_under(client: &Client, prefix: &str) -> Vec<KeyValue> {
        client
            .store()
            .range(Range::prefix(prefix))
            .await
            .unwrap()
            .kvs
    }

    /// `n` sessions on `client`.
    async fn sessions(client: &Client, n: usize) -> Vec<Session> {
        futures::future::join_all((0..n).map(|_| Session::new(client)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect()
    }

    /// Wait until `n` participants' keys are under `prefix`.
    async fn until_keys(client: &Client, prefix: &str, n: usize) {
        for _ in 0..500 {
            if keys_under(client, prefix).await.len() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never {n} keys under {prefix}");
    }

    /// Participants that disagree on the count: the later one fails with Mismatch and
    /// leaves no key, and nobody passes with fewer participants than it asked for.
    #[tokio::test]
    async fn participants_that_disagree_on_the_count_fail_with_mismatch() {
        let client = Client::memory();
        let s = sessions(&client, 4).await;
        let enter = |i: usize, name: &'static str, count: u32| {
            let barrier = DoubleBarrier::new(&s[i], name, count).unwrap();
            tokio::spawn(async move { barrier.enter_timeout(Duration::from_secs(5)).await })
        };
        // 3, 3, then 2: the first two do not pass with two; the third gets Mismatch (not
        // BarrierFull); a third with 3 opens the barrier.
        let a = enter(0, "db", 3);
        let b = enter(1, "db", 3);
        until_keys(&client, "db/waiters/", 2).await;
        let err = enter(2, "db", 2).await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !a.is_finished() && !b.is_finished(),
            "passed a barrier of 3 with two"
        );
        until_keys(&client, "db/waiters/", 2).await;
        let c = enter(3, "db", 3);
        let (ga, gb, gc) = (a.await.unwrap(), b.await.unwrap(), c.await.unwrap());
        let (ga, gb, gc) = (ga.unwrap(), gb.unwrap(), gc.unwrap());
        let (la, lb, lc) = tokio::join!(ga.leave(), gb.leave(), gc.leave());
        la.unwrap();
        lb.unwrap();
        lc.unwrap();

        // 2, then 3: the second gets Mismatch at once instead of both waiting for ever.
        let a = enter(0, "db2", 2);
        until_keys(&client, "db2/waiters/", 1).await;
        let err = enter(1, "db2", 3).await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("count"), "{err}");
        let b = enter(2, "db2", 2);
        let (ga, gb) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        let (la, lb) = tokio::join!(ga.leave(), gb.leave());
        la.unwrap();
        lb.unwrap();
        assert!(keys_under(&client, "db").await.is_empty());
    }

    /// A first participant F of `s[0]` for `count`, which gives up after 300 ms, and once
    /// its key is there, the key of `s[1]` with count 2 put by hand (a participant whose
    /// put landed and whose first read has not): F's task.
    async fn first_and_an_odd_key(
        client: &Client,
        s: &[Session],
        count: u32,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let f = DoubleBarrier::new(&s[0], "db", count).unwrap();
        let f_task = tokio::spawn(async move {
            f.enter_timeout(Duration::from_millis(300))
                .await
                .map(|_| ())
        });
        until_keys(client, "db/waiters/", 1).await;
        let key = lease_key("db/waiters/", s[1].lease_id());
        client
            .store()
            .put(key.as_bytes(), b"2", s[1].lease_id())
            .await
            .unwrap();
        f_task
    }

    /// The first participant F, whose count the opener O agreed with, leaves before the
    /// odd one X (another count) first reads: X then finds no count ahead of it and is the
    /// one whose count holds. O, waiting for X's key to go, must notice that F's went: O
    /// fails with Mismatch, and X goes on waiting for participants of its count (instead
    /// of X and O waiting for each other until both time out).
    #[tokio::test]
    async fn review_opener_and_odd_one_wait_for_each_other() {
        let client = Client::memory();
        let s = sessions(&client, 4).await;
        let f_task = first_and_an_odd_key(&client, &s, 3).await;
        let o = DoubleBarrier::new(&s[2], "db", 3).unwrap();
        let started = tokio::time::Instant::now();
        let o_task = tokio::spawn(async move {
            o.enter_timeout(Duration::from_secs(3))
                .await
                .map(|g| g.round())
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!o_task.is_finished(), "O did not wait for X's key to go");
        // F times out.
        let f_result = f_task.await.unwrap();
        assert!(
            matches!(f_result, Err(Error::Timeout { .. })),
            "{f_result:?}"
        );
        // X, whose count now holds, waits; O fails with Mismatch at once.
        let x = DoubleBarrier::new(&s[1], "db", 2).unwrap();
        let x_task = tokio::spawn(async move {
            x.enter_timeout(Duration::from_secs(3))
                .await
                .map(|g| g.round())
        });
        let o_result = o_task.await.unwrap();
        match &o_result {
            Err(e @ Error::Mismatch { .. }) => assert!(e.to_string().contains("count of 2"), "{e}"),
            other => panic!("O: expected Mismatch, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "O failed only after {:?}",
            started.elapsed()
        );
        until_keys(&client, "db/waiters/", 1).await;
        assert!(!x_task.is_finished(), "X passed a barrier of 2 alone");
        // A second participant with X's count: both pass together.
        let y = DoubleBarrier::new(&s[3], "db", 2).unwrap();
        let y_round = y
            .enter_timeout(Duration::from_secs(3))
            .await
            .map(|g| g.round())
            .unwrap();
        let x_round = x_task.await.unwrap().unwrap();
        assert_eq!(x_round, y_round);
    }

    /// Like the above, but the participant P that agreed with F's count is not opening the
    /// round (too few keys yet): when F's key goes, G's count decides, and P must notice at
    /// once and fail with Mismatch, instead of P and G waiting for each other until both
    /// time out.
    #[tokio::test]
    async fn a_waiting_participant_sees_the_deciding_count_change() {
        let client = Client::memory();
        let s = sessions(&client, 3).await;
        let f_task = first_and_an_odd_key(&client, &s, 4).await;
        let p = DoubleBarrier::new(&s[2], "db", 4).unwrap();
        let started = tokio::time::Instant::now();
        let p_task = tokio::spawn(async move {
            p.enter_timeout(Duration::from_secs(3))
                .await
                .map(|g| g.round())
        });
        until_keys(&client, "db/waiters/", 3).await;
        let f_result = f_task.await.unwrap();
        assert!(
            matches!(f_result, Err(Error::Timeout { .. })),
            "{f_result:?}"
        );
        let g = DoubleBarrier::new(&s[1], "db", 2).unwrap();
        let g_task = tokio::spawn(async move {
            g.enter_timeout(Duration::from_secs(3))
                .await
                .map(|g| g.round())
        });
        let p_result = p_task.await.unwrap();
        match &p_result {
            Err(e @ Error::Mismatch { .. }) => assert!(e.to_string().contains("count of 2"), "{e}"),
            other => panic!("P: expected Mismatch, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "P failed only after {:?}",
            started.elapsed()
        );
        // G, whose count now holds, waits for a second participant.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!g_task.is_finished(), "G passed a barrier of 2 alone");
        g_task.abort();
    }

    /// A participant's key that holds no count (Go's recipe writes an empty value) agrees
    /// with any count.
    #[tokio::test]
    async fn a_key_without_a_count_agrees_with_any() {
        let client = Client::memory();
        let (go, baton) = (
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
        );
        let go_key = lease_key("db/waiters/", go.lease_id());
        client
            .store()
            .put(go_key.as_bytes(), b"", go.lease_id())
            .await
            .unwrap();
        let inside = DoubleBarrier::new(&baton, "db", 2)
            .unwrap()
            .enter_timeout(Duration::from_secs(2))
            .await
            .unwrap();
        client
            .store()
            .delete(crate::store::KeyRange::key(go_key))
            .await
            .unwrap();
        inside.leave().await.unwrap();
    }

    #[tokio::test]
    async fn bad_input() {
        let client = Client::memory();
        let s = Session::new(&client).await.unwrap();
        for (name, count) in [("b", 0), ("", 2)] {
            let err = DoubleBarrier::new(&s, name, count).unwrap_err();
            assert!(err.is_invalid_input(), "{err}");
        }
    }

    /// A key created before `ready` but after the round's last participant is never let
    /// in, not even once a participant has left (a slow participant whose first read comes
    /// late): it gets BarrierFull.
    #[tokio::test]
    async fn the_round_is_fixed_when_it_opens() {
        let client = Client::memory();
        let (a, b, c) = (
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
        );
        let entering_a = {
            let a = a.clone();
            tokio::spawn(async move { DoubleBarrier::new(&a, "db", 2).unwrap().enter().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // B's and C's keys are put (C's first read comes late).
        let key = |s: &Session| lease_key("db/waiters/", s.lease_id());
        for s in [&b, &c] {
            client
                .store()
                .put(key(s).as_bytes(), b"", s.lease_id())
                .await
                .unwrap();
        }
        let inside_b = DoubleBarrier::new(&b, "db", 2)
            .unwrap()
            .enter()
            .await
            .unwrap();
        let inside_a = entering_a.await.unwrap().unwrap();
        assert_eq!(inside_a.round(), inside_b.round());
        let leaving_b = tokio::spawn(inside_b.leave());
        for _ in 0..100 {
            let left = client.store().range(Range::key(key(&b))).await.unwrap();
            if left.kvs.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let err = DoubleBarrier::new(&c, "db", 2)
            .unwrap()
            .enter()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::BarrierFull { .. }), "{err}");
        inside_a.leave().await.unwrap();
        leaving_b.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn enter_and_leave_together_twice() {
        const N: usize = 4;
        let client = Client::memory();
        let entered = Arc::new(AtomicUsize::new(0));
        let left = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..N {
            let s = Session::new(&client).await.unwrap();
            let (entered, left) = (entered.clone(), left.clone());
            tasks.push(tokio::spawn(async move {
                let b = DoubleBarrier::new(&s, "db", N as u32).unwrap();
                let mut rounds = Vec::new();
                for round in 0..2 {
                    entered.fetch_add(1, Ordering::SeqCst);
                    let g = b.enter().await.unwrap();
                    assert!(
                        entered.load(Ordering::SeqCst) >= N * (round + 1),
                        "entered early"
                    );
                    rounds.push(g.round());
                    left.fetch_add(1, Ordering::SeqCst);
                    g.leave().await.unwrap();
                    assert!(left.load(Ordering::SeqCst) >= N * (round + 1), "left early");
                }
                rounds
            }));
        }
        let mut rounds = Vec::new();
        for t in tasks {
            rounds.push(t.await.unwrap());
        }
        assert!(rounds.windows(2).all(|w| w[0] == w[1]), "{rounds:?}");
        assert!(rounds[0][0] < rounds[0][1]);
        let left = client.store().range(Range::prefix("db/")).await.unwrap();
        assert!(left.kvs.is_empty(), "{:?}", left.kvs);
    }

    #[tokio::test]
    async fn full_and_stale() {
        let client = Client::memory();
        let s = sessions(&client, 3).await;
        let b = |i: usize| DoubleBarrier::new(&s[i], "full", 1).unwrap();
        let g = b(0).enter().await.unwrap();
        let err = b(1).enter().await.unwrap_err();
        assert!(matches!(err, Error::BarrierFull { .. }), "{err}");
        // The participant vanishes without deleting `ready`: the next one removes it.
        std::mem::forget(g);
        s[0].close().await.unwrap();
        let g = b(2).enter().await.unwrap();
        g.leave().await.unwrap();
        let left = client.store().range(Range::prefix("full/")).await.unwrap();
        assert!(left.kvs.is_empty(), "{:?}", left.kvs);
    }

    /// Two participants inside barrier `db` of two: the first created (the one who leaves
    /// last), then the other.
    async fn two_inside(client: &Client) -> (DoubleBarrierGuard, DoubleBarrierGuard) {
        let s = sessions(client, 2).await;
        let a = DoubleBarrier::new(&s[0], "db", 2).unwrap();
        let b = DoubleBarrier::new(&s[1], "db", 2).unwrap();
        let a_task = tokio::spawn(async move { a.enter().await });
        until_keys(client, "db/waiters/", 1).await;
        let gb = b.enter().await.unwrap();
        let ga = a_task.await.unwrap().unwrap();
        (ga, gb)
    }

    /// A participant of an open round whose process hangs, freed by an operator
    /// (`etcdctl put KEY ""`: bound to no lease, it counts in no round, and will never
    /// expire) while the others leave: the others' `leave()` must not wait for that key's
    /// delete, which never comes. Case "other": the first participant (who leaves last)
    /// waits for the hung one; case "first": the hung one is the first participant, and the
    /// other waits for it in `wait_all_left`.
    #[tokio::test]
    async fn a_freed_participant_does_not_hold_up_the_leave() {
        for case in ["other", "first"] {
            let client = Client::memory();
            let (ga, gb) = two_inside(&client).await;
            // `ga` is the first participant (created first).
            let (leaver, hung) = if case == "other" { (ga, gb) } else { (gb, ga) };
            let hung_key = hung.key().to_string();
            // The hung participant: no leave, no drop.
            std::mem::forget(hung);
            let leave = tokio::spawn(leaver.leave_timeout(Duration::from_secs(3)));
            tokio::time::sleep(Duration::from_millis(200)).await;
            // The operator frees the hung participant's key.
            client
                .store()
                .put(hung_key.as_bytes(), b"", 0)
                .await
                .unwrap();
            let left = leave.await.unwrap();
            assert!(
                left.is_ok(),
                "case {case}: leave() waited for a freed participant's key: {left:?}"
            );
        }
    }

    /// The last participant of a round to go drops its guard (or its `leave()`
    /// is cancelled, as `baton barrier --timeout` does) while another waits in `leave()`:
    /// that other's `leave()` returns, and `NAME/ready`, which has no lease, must not stay
    /// in the store for ever.
    #[tokio::test]
    async fn a_dropped_last_participant_leaves_no_ready_key() {
        use crate::store::slow::SlowWatches;
        for case in ["drop", "cancelled leave"] {
            let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
            let client = Client::from_arc(store.clone());
            let (ga, gb) = two_inside(&client).await;
            // B leaves and waits for A, the first participant, who leaves last.
            let b_leave = tokio::spawn(gb.leave_timeout(Duration::from_secs(3)));
            tokio::time::sleep(Duration::from_millis(100)).await;
            if case == "drop" {
                drop(ga);
            } else {
                // A waits for nobody (B's key is gone): every transaction takes 200 ms,
                // and A's leave is cut short after its key's delete, during the delete of
                // `ready`.
                *store.delay_txns.lock().unwrap() = Some(Duration::from_millis(200));
                // The round is complete (B's key is gone): no Timeout (today3's review;
                // this asserted Timeout before).
                let r = ga.leave_timeout(Duration::from_millis(300)).await;
                assert!(r.is_ok(), "{r:?}");
            }
            b_leave.await.unwrap().unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let left: Vec<_> = keys_under(&client, "db/")
                .await
                .into_iter()
                .map(|kv| kv.key_str().into_owned())
                .collect();
            assert!(left.is_empty(), "case {case}: keys left behind: {left:?}");
        }
    }

    /// A round complete (every participant's key gone at ~1 s) is no timeout for the other
    /// participant's `leave_timeout(1.5 s)`, though closing `ready` is slow (every
    /// transaction takes 1 s): after entry 67 `wait_all_left` awaited that write, and a
    /// completed round was reported as a Timeout, which the docs say means "some other
    /// participant has not left yet".
    #[tokio::test]
    async fn a_completed_round_is_no_leave_timeout() {
        use crate::store::slow::SlowWatches;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(store.clone());
        let (ga, gb) = two_inside(&client).await;
        let b_leave = tokio::spawn(gb.leave_timeout(Duration::from_millis(1500)));
        until_keys(&client, "db/waiters/", 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        *store.delay_txns.lock().unwrap() = Some(Duration::from_millis(1000));
        let started = tokio::time::Instant::now();
        let a_leave = tokio::spawn(ga.leave());
        until_keys(&client, "db/waiters/", 0).await;
        let gone_at = started.elapsed();
        let b = b_leave.await.unwrap();
        assert!(
            b.is_ok(),
            "every key of the round gone after {gone_at:?}, yet B's leave: {b:?}"
        );
        a_leave.await.unwrap().unwrap();
    }

    /// Entry 77's fix covers the participants that wait in
    /// `wait_all_left`, not the first one (who leaves last). B has left; A, alone in the
    /// round (complete: every other key gone), deletes its key and closes `ready`, each
    /// transaction taking 1 s, under `leave_timeout(1.5 s)`: its key is gone at ~1 s, yet
    /// it is told Timeout ("some other participant has not left yet"), as `baton barrier
    /// --timeout` would exit 124 for it while the others pass.
    #[tokio::test]
    async fn a_completed_round_is_no_leave_timeout_for_the_last_to_leave() {
        use crate::store::slow::SlowWatches;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(store.clone());
        let (ga, gb) = two_inside(&client).await;
        // B (not the first) leaves and waits for A in the background.
        let b_leave = tokio::spawn(gb.leave());
        until_keys(&client, "db/waiters/", 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        *store.delay_txns.lock().unwrap() = Some(Duration::from_millis(1000));
        let started = tokio::time::Instant::now();
        let a_key = ga.key().to_string();
        let a_leave = tokio::spawn(ga.leave_timeout(Duration::from_millis(1500)));
        until_keys(&client, "db/waiters/", 0).await;
        let gone_at = started.elapsed();
        let a = a_leave.await.unwrap();
        assert!(
            a.is_ok(),
            "A ({a_key}) alone in a complete round, its key gone after {gone_at:?}, yet its \
             leave_timeout: {a:?}"
        );
        b_leave.await.unwrap().unwrap();
    }

    /// The leave stage of a round of N writes N deletes of keys and one of `ready`: after
    /// entry 67 each of the N-1 others also sent a compare-and-delete of `ready` (a raft
    /// proposal on etcd, even when the compare fails); they now read it first.
    #[tokio::test]
    async fn the_leave_stage_writes_once_per_participant_and_ready_once() {
        use crate::store::slow::SlowWatches;
        const N: usize = 10;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(store.clone());
        let s = sessions(&client, N).await;
        let tasks: Vec<_> = s
            .iter()
            .map(|s| {
                let b = DoubleBarrier::new(s, "db", N as u32).unwrap();
                tokio::spawn(async move { b.enter().await.unwrap() })
            })
            .collect();
        let mut guards = Vec::new();
        for t in tasks {
            guards.push(t.await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = store.txns.load(std::sync::atomic::Ordering::SeqCst);
        let leaves = futures::future::join_all(guards.into_iter().map(|g| g.leave())).await;
        for l in leaves {
            l.unwrap();
        }
        let txns = store.txns.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert!(
            txns <= N as u64 + 1,
            "{txns} transactions in the leave stage of a round of {N} (N deletes + 1 expected)"
        );
    }

    /// Stress of entry 67's close: 3 participants, 12 rounds, some
    /// dropping their guard instead of leaving, some leaving with a short timeout: nobody's
    /// leave() returns Ok before every participant of its round has started to leave, no
    /// hang, and no key left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rounds_with_drops_and_timeouts_never_pass_early_or_hang() {
        use std::sync::Mutex as M;
        const N: usize = 3;
        const ROUNDS: usize = 12;
        let client = Client::memory();
        let s = sessions(&client, N).await;
        let started: Arc<Vec<AtomicUsize>> =
            Arc::new((0..ROUNDS).map(|_| AtomicUsize::new(0)).collect());
        let rounds_seen = Arc::new(M::new(vec![Vec::new(); N]));
        let mut tasks = Vec::new();
        for (i, s) in s.iter().enumerate() {
            let s = s.clone();
            let started = started.clone();
            let client = client.clone();
            let rounds_seen = rounds_seen.clone();
            tasks.push(tokio::spawn(async move {
                let b = DoubleBarrier::new(&s, "db", N as u32).unwrap();
                let mut seed = i as u64 * 7919 + 17;
                let mut rnd = move || {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    seed >> 33
                };
                for r in 0..ROUNDS {
                    let g = loop {
                        match b.enter_timeout(Duration::from_secs(10)).await {
                            Ok(g) => break g,
                            Err(Error::BarrierFull { .. }) => {
                                tokio::time::sleep(Duration::from_millis(5)).await
                            }
                            Err(e) => panic!("participant {i} round {r}: {e}"),
                        }
                    };
                    rounds_seen.lock().unwrap()[i].push(g.round());
                    if rnd() % 2 == 0 {
                        tokio::time::sleep(Duration::from_millis(rnd() % 5)).await;
                    }
                    started[r].fetch_add(1, Ordering::SeqCst);
                    match if r == ROUNDS - 1 { 1 } else { rnd() % 5 } {
                        0 => {
                            let key = g.key().to_string();
                            drop(g);
                            // Wait for our key to go before entering again.
                            for _ in 0..500 {
                                let left = client
                                    .store()
                                    .range(Range::key(key.as_bytes()))
                                    .await
                                    .unwrap();
                                if left.kvs.is_empty() {
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                        }
                        _ => {
                            g.leave_timeout(Duration::from_secs(10)).await.unwrap();
                            assert_eq!(
                                started[r].load(Ordering::SeqCst),
                                N,
                                "participant {i} left round {r} before all started to leave"
                            );
                        }
                    }
                }
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("hung")
                .unwrap();
        }
        let seen = rounds_seen.lock().unwrap().clone();
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let left: Vec<_> = keys_under(&client, "db/")
            .await
            .into_iter()
            .map(|kv| kv.key_str().into_owned())
            .collect();
        assert!(left.is_empty(), "keys left behind: {left:?}");
    }

    /// A leave whose key's delete fails with a retryable error (a reply
    /// lost: "connection reset", "request timed out" while etcd elects a leader) failed
    /// the whole `leave()`, as the semaphore's grant did before entry 82's fix: the first
    /// participant (who leaves last), alone in a complete round, was told the retryable
    /// error though its key was deleted and every other participant passed; any other
    /// participant returned the error at once, without waiting for the round to empty.
    /// The delete is retried, as a release is in the background: `leave()` goes on.
    #[tokio::test]
    async fn a_lost_reply_to_the_leaves_delete_does_not_fail_the_leave() {
        use crate::store::slow::SlowWatches;
        use std::sync::atomic::Ordering;
        for case in ["first", "other"] {
            let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
            let client = Client::from_arc(store.clone());
            let (ga, gb) = two_inside(&client).await;
            if case == "first" {
                // B (not the first) leaves and waits for A, the first participant.
                let b_leave = tokio::spawn(gb.leave_timeout(Duration::from_secs(5)));
                until_keys(&client, "db/waiters/", 1).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                store.lose_next_reply.store(true, Ordering::SeqCst);
                let a = tokio::time::timeout(Duration::from_secs(5), ga.leave())
                    .await
                    .expect("A's leave hung");
                assert!(
                    a.is_ok(),
                    "case {case}: A's leave of a complete round: {a:?}"
                );
                b_leave.await.unwrap().unwrap();
            } else {
                // B's delete is applied but its reply lost: B must still wait for A.
                store.lose_next_reply.store(true, Ordering::SeqCst);
                let b_leave = tokio::spawn(gb.leave_timeout(Duration::from_secs(5)));
                tokio::time::sleep(Duration::from_millis(300)).await;
                assert!(
                    !b_leave.is_finished(),
                    "case {case}: B's leave ended before A left: {:?}",
                    b_leave.await
                );
                ga.leave().await.unwrap();
                let b = b_leave.await.unwrap();
                assert!(b.is_ok(), "case {case}: B's leave: {b:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let left: Vec<_> = keys_under(&client, "db/")
                .await
                .into_iter()
                .map(|kv| kv.key_str().into_owned())
                .collect();
            assert!(left.is_empty(), "case {case}: keys left behind: {left:?}");
        }
    }
}
