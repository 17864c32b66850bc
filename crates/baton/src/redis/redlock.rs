//! The quorum engine: acquire, extend, release, proclaim and read over N servers.
//!
//! A single Redis server is the case N = 1, quorum 1, with a fencing counter. Redlock is
//! N independent masters, quorum N/2+1, no fencing counter:
//!
//! - **acquire**: set the key on every node in parallel. Succeed when a quorum granted it
//!   and the validity `TTL − elapsed − drift` (drift = 1% TTL + 2 ms) is still positive.
//!   Stop waiting for nodes once the outcome is decided, or once the validity is gone
//!   (waiting longer could not succeed). On failure, compare-and-delete on **every** node,
//!   including those that did not answer, before returning;
//! - **extend**: compare-and-`PEXPIRE` on every node; held while a quorum extended it, lost
//!   once more than N − quorum nodes no longer hold our token;
//! - **release**: compare-and-delete on every node.
//!
//! Release, proclaim and reads stop waiting for the nodes that have not answered once the
//! answers of a quorum settle the outcome (see [`gather`]): one hung node of a majority
//! that is up holds nothing up by a request timeout. Writes still in flight then finish in
//! the background, as stragglers that `close()` does not wait for past a straggler wait.
//! Cleanups (deletions whose count nobody reads: a failed acquire's, a dropped guard's)
//! are settled by any answer (see [`ClientInner::clean_up`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use super::node::{is_refused_duplicate, Keys, NodeAcquire, NodeExtend, NodeRecord, NodeRelease};
use super::{drift, ClientInner};
use crate::error::{Error, Result};
use crate::race::Race;

/// The least time an attempt that found the lock held waits for the nodes that have not
/// answered, after the last answer (see [`ClientInner::try_acquire`]).
const STRAGGLER_MIN: Duration = Duration::from_millis(10);

/// How long a failed `try_lock` attempt waits for its deletion to be confirmed before it
/// returns; the deletion goes on in the background after that (see
/// [`ClientInner::try_acquire`]).
const CLEANUP_GRACE: Duration = Duration::from_millis(500);

/// How long an operation waits for the nodes that have not answered once the answers so far
/// settle its outcome: 1% of `ttl`, at least [`STRAGGLER_MIN`] (see [`gather`]).
pub(crate) fn straggle(ttl: Duration) -> Duration {
    (ttl / 100).max(STRAGGLER_MIN)
}

/// The answers of `calls` (one per node) as they come, and the calls still in flight.
///
/// Every answer; or fewer, once `stop` says the answers so far settle the outcome, or once
/// `settled` says they do and the others stayed silent past the straggler wait: `straggle`,
/// or as long as those answers took if longer (a slow network is not taken for a hung
/// node). A node left out this way counts as one that failed: one hung node of a majority
/// that is up must not hold an operation up by a request timeout. The answers of a quorum
/// do not settle every outcome (one node without the key, another with it: the third
/// decides), and until they do every node is waited for, each up to its request timeout.
/// The caller drops the calls still in flight (reads) or lets them finish in the
/// background (writes).
pub(crate) async fn gather<T, F>(
    mut calls: Race<F>,
    mut settled: impl FnMut(&[Result<T>]) -> bool,
    straggle: Duration,
    mut stop: impl FnMut(&[Result<T>]) -> bool,
) -> (Vec<Result<T>>, Race<F>)
where
    F: Future<Output = Result<T>>,
{
    let start = Instant::now();
    let mut answers = Vec::with_capacity(calls.len());
    let mut until: Option<Instant> = None;
    loop {
        tokio::select! {
            r = calls.next() => match r {
                None => break,
                Some(r) => answers.push(r),
            },
            () = tokio::time::sleep_until(until.unwrap_or(start)), if until.is_some() => break,
        }
        if stop(&answers) {
            break;
        }
        if until.is_none() && settled(&answers) {
            let now = Instant::now();
            until = Some(now + straggle.max(now - start));
        }
    }
    (answers, calls)
}

/// A `stop` for [`gather`]: true once more than `nodes − quorum` calls failed (no quorum
/// can answer any more).
pub(crate) fn too_many_failed<T>(nodes: usize, quorum: usize) -> impl Fn(&[Result<T>]) -> bool {
    move |answers| answers.iter().filter(|r| r.is_err()).count() > nodes - quorum
}

/// A `settled` for [`gather`] where any success will do (connecting, listing keys): true
/// once `quorum` calls succeeded.
pub(crate) fn quorum_succeeded<T>(quorum: usize) -> impl Fn(&[Result<T>]) -> bool {
    move |answers| answers.iter().filter(|r| r.is_ok()).count() >= quorum
}

/// A `settled` for [`gather`] over reads of one key: true once `quorum` answers agree on a
/// holder (`same`; an answer that holds nothing, as one without the key, is the same as
/// none), or once a quorum has answered and no holder can reach a quorum any more, even
/// with every call still in flight agreeing with it. Failures are not answers: with one
/// node failed and one saying "free", the third is waited for (else, cut off by the
/// straggler wait, it would count as failed too, and the read as no quorum).
pub(crate) fn holder_settled<T>(
    nodes: usize,
    quorum: usize,
    same: impl Fn(&T, &T) -> bool,
) -> impl Fn(&[Result<T>]) -> bool {
    move |answers| {
        let best = most_agreeing(answers, &same);
        let answered = answers.iter().filter(|a| a.is_ok()).count();
        best >= quorum || (answered >= quorum && best + (nodes - answers.len()) < quorum)
    }
}

/// How many answers agree on the holder most of them agree on (0 if none holds anything).
fn most_agreeing<T>(answers: &[Result<T>], same: impl Fn(&T, &T) -> bool) -> usize {
    let held: Vec<&T> = answers.iter().flatten().collect();
    held.iter()
        .map(|a| held.iter().filter(|b| same(a, b)).count())
        .max()
        .unwrap_or(0)
}

/// Keep `e` as the failure to report, unless one is kept already. A refused duplicate's
/// (a master that is another under a second name) gives way to any other master's, which
/// says more: which masters are down.
pub(crate) fn keep_error(kept: &mut Option<Error>, e: Error) {
    if kept.as_ref().is_none_or(is_refused_duplicate) {
        *kept = Some(e);
    }
}

/// The failure to report among `errors`: the first, unless it is a refused duplicate's and
/// another master failed too (see [`keep_error`]).
pub(crate) fn reported_error(errors: impl IntoIterator<Item = Error>) -> Option<Error> {
    let mut kept = None;
    for e in errors {
        keep_error(&mut kept, e);
    }
    kept
}

/// The outcome of one acquisition attempt. On anything but `Acquired`, whatever was set has
/// been deleted again.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Ours: the local deadline is `start + TTL − drift`.
    Acquired { fence: Option<i64>, start: Instant },
    /// Held by another owner; its key expires in `retry_in` (if known).
    Busy { retry_in: Option<Duration> },
    /// No quorum within the validity (slow or partly failing nodes).
    TooSlow { reached: usize },
    /// A majority of nodes failed.
    Failed(Error),
    /// A majority of nodes failed, each in a way that trying again later can cure (a lost
    /// or refused connection, a timeout, a server loading its data: see
    /// [`is_transient`](super::node::is_transient)).
    Unavailable(Error),
}

/// What the nodes answered to a compare-and-delete.
struct Released {
    /// How many deleted our token (or handed the lock on).
    deleted: usize,
    /// How many answered that the key did not hold our token.
    not_ours: usize,
    /// The first failure, if a node failed.
    error: Option<Error>,
}

/// The outcome of one extension.
#[derive(Debug)]
pub(crate) enum Extended {
    /// Extended on a quorum; the request was sent at this instant.
    Held(Instant),
    /// No longer ours: why.
    Lost(&'static str),
    /// Not decided (errors, timeouts): try again before the deadline.
    Retry(Error),
}

impl ClientInner {
    pub(crate) fn no_quorum(&self, reached: usize, reason: impl Into<String>) -> Error {
        Error::NoQuorum {
            reached,
            needed: self.quorum,
            nodes: self.nodes.len(),
            reason: reason.into(),
        }
    }

    /// Try once to take the lock (and write the election record, if `record` is given).
    ///
    /// `gated` (Redlock only, for attempts woken by a release): ask the first node alone,
    /// and go on to the others only if it was ours. When a release wakes several waiters
    /// at once, asking every node in parallel splits the votes (each gets a minority, all
    /// clean up, all retry); the first node settles who goes on. If it fails (down), or
    /// has not answered within 1% of the TTL (hung), the attempt asks every node, within
    /// the same validity. A gate held by a stale minority key cannot block anyone for long:
    /// attempts after the fallback poll are not gated, nor is `try_lock`'s one attempt.
    ///
    /// Once a node answered "held by another owner", nodes that stay silent for 1% of the
    /// TTL after the last answer are not waited for: the attempt fails as busy, and the
    /// caller tries again on a release or at its fallback poll.
    ///
    /// A failed attempt deletes what it may have set before it returns if `wait_cleanup`
    /// (`try_lock`, whose error promises it) or if it failed for good; else the deletion
    /// runs in the background (a hung node would otherwise delay the next attempt by a
    /// request timeout), and the caller's next attempt must use another token. Either way
    /// it is a [`clean_up`](Self::clean_up): once a node answered it, the nodes silent past
    /// the straggler wait are not waited for (with a majority hung, the attempt itself
    /// waits for them until `give_up`, and the deletion does not wait for them again).
    pub(crate) async fn try_acquire(
        self: &Arc<Self>,
        keys: &Keys,
        token: &str,
        record: Option<&[u8]>,
        gated: bool,
        wait_cleanup: bool,
    ) -> Attempt {
        let ttl = self.opts.ttl;
        let drift = drift(ttl);
        let n = self.nodes.len();
        let q = self.quorum;
        let fence = !self.redlock;
        let start = Instant::now();
        let give_up = start + ttl.saturating_sub(drift).min(self.opts.request_timeout);
        let ttl_ms = self.opts.ttl_ms;
        let (mut ok, mut busy, mut failed) = (0, 0, 0);
        let mut token_value = None;
        let mut skip_first = false;
        if gated && self.redlock && n > 1 {
            // A node that does not answer must not eat the attempt's validity: the others
            // are asked after a short wait (a majority may well be up).
            let gate_until = (start + ttl / 100).min(give_up);
            let gate = tokio::time::timeout_at(
                gate_until,
                self.nodes[0].acquire(keys, token, ttl_ms, fence, record),
            )
            .await;
            match gate {
                Ok(Ok(NodeAcquire::Taken(f))) => {
                    ok = 1;
                    token_value = Some(f);
                    skip_first = true;
                }
                Ok(Ok(NodeAcquire::Held(pttl))) => {
                    return Attempt::Busy {
                        retry_in: u64::try_from(pttl).ok().map(Duration::from_millis),
                    };
                }
                // Down, slow or hung: ask every node (a late SET on the gate is cleaned up
                // with the rest if the attempt fails).
                _ => {}
            }
        }
        let mut calls: Race<_> = self
            .nodes
            .iter()
            .skip(usize::from(skip_first))
            .map(|node| {
                // Owned, so that the requests still in flight after a success can finish
                // in the background.
                let (node, keys, token) = (node.clone(), keys.clone(), token.to_string());
                let record = record.map(<[u8]>::to_vec);
                let inner = self.clone();
                async move {
                    let taken = node
                        .acquire(&keys, &token, ttl_ms, fence, record.as_deref())
                        .await;
                    // A straggler (see `finish_acquire_in_background`) that took the key
                    // after the hold's release began: the release may have reached this
                    // master first, so take the key back (compare-and-delete: only ours).
                    if matches!(taken, Ok(NodeAcquire::Taken(_)))
                        && inner.stray_acquire_released(&token)
                    {
                        tracing::debug!(key = %keys.lock, "an acquire landed after its release: deleting it");
                        if let Err(e) = node.release(&keys, &token).await {
                            tracing::debug!(error = %e, "deleting a late acquire failed; it expires with its ttl");
                        }
                    }
                    taken
                }
            })
            .collect();
        let mut retry_in: Option<Duration> = None;
        let mut first_error = None;
        let mut all_transient = true;
        // Once a node said "held by another owner", the lock is taken or being released
        // (or a stale minority key holds it): a node that has not answered within 1% of the
        // TTL of the last answer is not waited for until `give_up` (a hung master would
        // otherwise hold up, by a request timeout, a waiter that raced a release).
        let straggle = straggle(ttl);
        let mut last_answer = Instant::now();
        loop {
            tokio::select! {
                r = calls.next() => match r {
                    None => break,
                    Some(Ok(NodeAcquire::Taken(f))) => {
                        ok += 1;
                        token_value = Some(f);
                        if ok >= q {
                            break;
                        }
                    }
                    Some(Ok(NodeAcquire::Held(pttl))) => {
                        busy += 1;
                        if let Ok(ms) = u64::try_from(pttl) {
                            let d = Duration::from_millis(ms);
                            retry_in = Some(retry_in.map_or(d, |r| r.min(d)));
                        }
                        if busy + failed > n - q {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        failed += 1;
                        tracing::debug!(error = %e, "acquire failed on a node");
                        all_transient &= super::node::is_transient(&e);
                        keep_error(&mut first_error, e);
                        if busy + failed > n - q {
                            break;
                        }
                    }
                },
                _ = tokio::time::sleep_until(give_up) => break,
                _ = tokio::time::sleep_until(last_answer + straggle), if busy > 0 => break,
            }
            last_answer = Instant::now();
        }
        let elapsed = start.elapsed();
        if ok >= q && elapsed + drift < ttl {
            // Let the other nodes' requests finish: holding the key on more than a bare
            // quorum makes the lock survive a node's loss. (Extends cover them too.) They
            // are stragglers of the client, as a release's are, so that `close()` waits
            // for them (for a straggler wait) and no write is left running unseen.
            if !calls.is_empty() {
                self.finish_acquire_in_background(calls, token);
            }
            return Attempt::Acquired {
                fence: if fence { token_value } else { None },
                start,
            };
        }
        // Requests in flight now were sent, or will never be: the release below follows
        // them on the same connections. So a failed attempt needs no mark, as a successful
        // one's stragglers do (see `finish_acquire_in_background`): a take still on its way
        // to a slow master reaches it ahead of the deletion (one connection per master,
        // in order), and a take whose answer was NOSCRIPT is not sent again once dropped
        // (test: `leak_growth.rs` `redlock_failed_acquires_leave_no_key_on_a_slow_master`).
        drop(calls);
        // Unless every node said "held by another owner", some node may hold our token.
        if busy < n {
            // (`lock()`'s next attempt after too many failures reuses the token: its
            // deletion must have ended. `try_lock` makes no next attempt.)
            if failed > n - q && !wait_cleanup {
                if let Err(e) = self.clean_up(keys, token).await {
                    tracing::debug!(error = %e, "cleaning up a failed acquire failed; keys expire with their ttl");
                }
            } else if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let (client, keys, token) = (self.clone(), keys.clone(), token.to_string());
                let task = self.cleanups.spawn_on(
                    async move {
                        if let Err(e) = client.clean_up(&keys, &token).await {
                            tracing::debug!(error = %e, "cleaning up a failed acquire failed; keys expire with their ttl");
                        }
                    }
                    .instrument(tracing::debug_span!("failed_acquire")),
                    &handle,
                );
                // `try_lock` waits for the deletion, but not a second request timeout for
                // nodes that answered nothing: the deletion was sent on their connections
                // after the take, and finishes in the background.
                if wait_cleanup {
                    let _ = tokio::time::timeout(CLEANUP_GRACE, task).await;
                }
            } else if wait_cleanup {
                let _ = tokio::time::timeout(CLEANUP_GRACE, self.clean_up(keys, token)).await;
            }
        }
        if failed > n - q {
            let e = first_error.unwrap_or(Error::Closed);
            let e = if self.redlock {
                self.no_quorum(ok, format!("{failed} nodes failed: {e}"))
            } else {
                e
            };
            return if all_transient {
                Attempt::Unavailable(e)
            } else {
                Attempt::Failed(e)
            };
        }
        if busy > 0 {
            return Attempt::Busy { retry_in };
        }
        Attempt::TooSlow { reached: ok }
    }

    /// Extend the key on every node, giving up at `until` (the local deadline).
    pub(crate) async fn extend(
        &self,
        keys: &Keys,
        token: &str,
        election: bool,
        until: Instant,
    ) -> Extended {
        let n = self.nodes.len();
        let q = self.quorum;
        let sent = Instant::now();
        let ttl_ms = self.opts.ttl_ms;
        let mut calls: Race<_> = self
            .nodes
            .iter()
            .map(|node| {
                // Owned, so that the extends still in flight once a quorum answered can
                // finish in the background.
                let (node, keys, token) = (node.clone(), keys.clone(), token.to_string());
                async move { node.extend(&keys, &token, ttl_ms, election).await }
            })
            .collect();
        let (mut ok, mut foreign, mut gone, mut record_gone) = (0, 0, 0, 0);
        let mut first_error = None;
        loop {
            tokio::select! {
                r = calls.next() => match r {
                    None => break,
                    Some(Ok(NodeExtend::Extended)) => {
                        ok += 1;
                        if ok >= q {
                            // The other masters' extends finish as stragglers: cut off,
                            // a master slower than the quorum (one that must load the
                            // script first, say) would never be extended, and its key,
                            // which lets the lock survive a master's loss, would expire.
                            self.finish_in_background(calls, "extend");
                            return Extended::Held(sent);
                        }
                    }
                    Some(Ok(NodeExtend::Foreign)) => foreign += 1,
                    Some(Ok(NodeExtend::Gone)) => gone += 1,
                    Some(Ok(NodeExtend::RecordGone)) => record_gone += 1,
                    Some(Err(e)) => keep_error(&mut first_error, e),
                },
                _ = tokio::time::sleep_until(until) => {
                    return Extended::Retry(Error::Timeout {
                        operation: "extend",
                        after: until.saturating_duration_since(sent),
                    });
                }
            }
            if foreign + gone + record_gone > n - q {
                return Extended::Lost(if foreign > 0 {
                    "the lock key holds another owner's token"
                } else if gone > 0 {
                    "the lock key was deleted or expired"
                } else {
                    super::watchdog::RECORD_GONE
                });
            }
        }
        Extended::Retry(
            first_error.unwrap_or_else(|| self.no_quorum(ok, "not enough nodes extended the key")),
        )
    }

    /// Compare-and-delete on every node; how many nodes held our token. Wakes this process's
    /// waiters as soon as the key is free on a quorum.
    ///
    /// Returns once every node answered, or the answers settle the outcome — a quorum
    /// deleted the key, or too many did not (did not hold it, or failed) for a quorum to —
    /// and the others stayed silent past the straggler wait (see [`gather`]); their
    /// deletions then finish in a task tracked by the client's stragglers (which
    /// [`close()`](super::RedisClient::close) waits for only for a straggler wait: each was
    /// sent on its node's connection, or never will be), and they do not count as having
    /// held our token.
    ///
    /// Fails if every node that answered failed, and (Redlock) if the answers leave open
    /// whether a quorum held our token: fewer than a quorum deleted it, but the nodes that
    /// failed or did not answer could have made one ([`Error::NoQuorum`]). A count below
    /// the quorum therefore means that a quorum did not hold our token.
    pub(crate) async fn release(&self, keys: &Keys, token: &str) -> Result<usize> {
        let released = self.release_settled(keys, token, false).await?;
        let (n, q) = (self.nodes.len(), self.quorum);
        let unknown = n - released.deleted - released.not_ours;
        if released.deleted < q && released.deleted + unknown >= q {
            let why = match released.error {
                Some(e) => format!("{unknown} of {n} masters failed or did not answer: {e}"),
                None => format!("{unknown} of {n} masters did not answer"),
            };
            return Err(self.no_quorum(
                released.deleted,
                format!(
                    "release not confirmed ({why}); where the key is left, it expires with its TTL"
                ),
            ));
        }
        Ok(released.deleted)
    }

    /// Compare-and-delete on every node, where how many held our token does not matter (a
    /// failed or cancelled acquire, a dropped guard, a waiter leaving, `close()`): as
    /// [`release`](Self::release), but settled too once any node answered, so that the
    /// nodes that stay silent past the straggler wait after it are not waited for. One
    /// answer that leaves the count open (our key deleted on one master, another owner's
    /// found on another) then holds nothing up by a request timeout when the last master
    /// hangs, nor does a majority that hangs: their deletions follow the acquire's writes on
    /// their connections (or neither is ever sent), and finish in the background.
    pub(crate) async fn clean_up(&self, keys: &Keys, token: &str) -> Result<usize> {
        Ok(self.release_settled(keys, token, true).await?.deleted)
    }

    /// [`release`](Self::release), or [`clean_up`](Self::clean_up) if `cleanup`. Fails only
    /// if every node that answered failed.
    async fn release_settled(&self, keys: &Keys, token: &str, cleanup: bool) -> Result<Released> {
        let (n, q) = (self.nodes.len(), self.quorum);
        // Before any delete is sent: an acquire of this token still in flight that takes its
        // master's key after this point deletes it again (see `finish_acquire_in_background`).
        if let Some(released) = self
            .stray_acquires
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(token)
        {
            *released = true;
        }
        let calls: Race<_> = self
            .nodes
            .iter()
            .map(|node| {
                // Owned, so that the deletions still in flight can finish in the background.
                let (node, keys, token) = (node.clone(), keys.clone(), token.to_string());
                async move { node.release(&keys, &token).await }
            })
            .collect();
        let deleted = |results: &[Result<NodeRelease>]| {
            results
                .iter()
                .filter(|r| matches!(r, Ok(NodeRelease::Freed | NodeRelease::HandedOff(_))))
                .count()
        };
        let settled = |results: &[Result<NodeRelease>]| {
            let deleted = deleted(results);
            deleted >= q
                || results.len() - deleted > n - q
                || (cleanup && results.iter().any(|r| r.is_ok()))
        };
        let mut woken = false;
        let (results, rest) = gather(calls, settled, straggle(self.opts.ttl), |results| {
            if !woken && deleted(results) >= q {
                self.wake_released(keys, token, results);
                woken = true;
            }
            false
        })
        .await;
        let deleted = deleted(&results);
        if !woken && deleted > 0 {
            self.wake_released(keys, token, &results);
        }
        if !rest.is_empty() {
            self.finish_in_background(rest, "release");
        }
        if results.iter().all(|r| r.is_err()) {
            if let Some(Err(e)) = results.first() {
                return Err(e.clone());
            }
        }
        let not_ours = results
            .iter()
            .filter(|r| matches!(r, Ok(NodeRelease::NotOurs)))
            .count();
        Ok(Released {
            deleted,
            not_ours,
            error: reported_error(results.into_iter().filter_map(Result::err)),
        })
    }

    /// Tell this process's waiters that `token` released `keys`, without waiting for the
    /// message to come back from Redis: the new holder (if it is here), or everyone.
    fn wake_released(&self, keys: &Keys, token: &str, results: &[Result<NodeRelease>]) {
        if let Some(Ok(NodeRelease::HandedOff(grant))) = results
            .iter()
            .find(|r| matches!(r, Ok(NodeRelease::HandedOff(_))))
        {
            self.hub.wake_local(&keys.channel, grant);
        } else {
            self.hub
                .wake_local(&keys.channel, format!("{token}:0").as_bytes());
        }
    }

    /// [`finish_in_background`](Self::finish_in_background) for the acquires still in flight
    /// after a quorum took the key for `token`: until they end, a release of `token` marks
    /// them (see [`stray_acquire_released`](Self::stray_acquire_released)), and one that
    /// then takes its master's key deletes it again.
    ///
    /// Their requests may not have been sent yet when the attempt returned (a future polled
    /// once is not a request queued on its connection), so the hold's release could reach
    /// such a master before its acquire: the key was then set again after the release, for
    /// a whole TTL, under a token no one holds (about 1% of lock cycles on three masters;
    /// that name then had one master fewer to lose before no one could lock it).
    fn finish_acquire_in_background<F>(self: &Arc<Self>, mut calls: Race<F>, token: &str)
    where
        F: Future + Send + 'static,
        F::Output: Send,
    {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.stray_acquires
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string(), false);
        // Unmarked when the task ends, or is dropped unfinished (its runtime shut down): a
        // client may outlive the runtime, and would keep the mark for good.
        struct Unmark(Arc<ClientInner>, String);
        impl Drop for Unmark {
            fn drop(&mut self) {
                self.0
                    .stray_acquires
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&self.1);
            }
        }
        let unmark = Unmark(self.clone(), token.to_string());
        self.stragglers.spawn_on(
            async move {
                let _unmark = unmark;
                while calls.next().await.is_some() {}
            }
            .instrument(tracing::debug_span!("stragglers", what = "acquire")),
            &handle,
        );
    }

    /// True if a release of `token` began while acquires of it were still in flight (see
    /// [`finish_acquire_in_background`](Self::finish_acquire_in_background)).
    fn stray_acquire_released(&self, token: &str) -> bool {
        self.stray_acquires
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .copied()
            .unwrap_or(false)
    }

    /// Let `calls` (writes a quorum no longer waits for) finish in a task tracked by the
    /// client's stragglers, on the current runtime if there is one (else they are dropped:
    /// the requests already sent run anyway).
    fn finish_in_background<F>(&self, mut calls: Race<F>, what: &'static str)
    where
        F: Future + Send + 'static,
        F::Output: Send,
    {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            self.stragglers.spawn_on(
                async move { while calls.next().await.is_some() {} }
                    .instrument(tracing::debug_span!("stragglers", what)),
                &handle,
            );
        }
    }

    /// Publish a new value as version `ver` (higher than any this leader used before);
    /// `Some(ver)` once a quorum wrote it, or `None` if we no longer lead.
    ///
    /// Returns once the answers decide it whatever the nodes that have not answered yet say
    /// (a node that has not answered is no failure), else once every node answered, or the
    /// write can no longer reach a quorum and the others stayed silent past the straggler
    /// wait (see [`gather`]); their writes then finish in the background.
    pub(crate) async fn proclaim(
        &self,
        keys: &Keys,
        token: &str,
        value: &[u8],
        ver: i64,
    ) -> Result<Option<i64>> {
        let n = self.nodes.len();
        let q = self.quorum;
        let calls: Race<_> = self
            .nodes
            .iter()
            .map(|node| {
                // Owned, so that the writes still in flight can finish in the background.
                let (node, keys, token) = (node.clone(), keys.clone(), token.to_string());
                let value = value.to_vec();
                async move { node.proclaim(&keys, &token, &value, ver).await }
            })
            .collect();
        let wrote = |results: &[Result<Option<i64>>]| {
            results
                .iter()
                .filter(|r| matches!(r, Ok(Some(v)) if *v == ver))
                .count()
        };
        // Settled once too many did not write it for a quorum to: the others may still say
        // whether we lead, for a straggler wait.
        let settled = |results: &[Result<Option<i64>>]| results.len() - wrote(results) > n - q;
        // Decided by the answers so far whatever the others answer (a node that has not
        // answered is no failure): a quorum wrote it, too many refused it for a quorum to
        // (we no longer lead), or it cannot reach a quorum and the refusals cannot become
        // too many.
        let stop = |results: &[Result<Option<i64>>]| {
            let pending = n - results.len();
            let wrote = wrote(results);
            let refused = results.iter().filter(|r| matches!(r, Ok(None))).count();
            wrote >= q || refused > n - q || (wrote + pending < q && refused + pending <= n - q)
        };
        let (results, rest) = gather(calls, settled, straggle(self.opts.ttl), stop).await;
        if !rest.is_empty() {
            self.finish_in_background(rest, "proclaim");
        }
        let vers: Vec<i64> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied().flatten())
            .filter(|v| *v == ver)
            .collect();
        if vers.len() >= self.quorum {
            return Ok(Some(ver));
        }
        let refused = results.iter().filter(|r| matches!(r, Ok(None))).count();
        if refused > n - self.quorum {
            return Ok(None);
        }
        match reported_error(results.into_iter().filter_map(Result::err)) {
            Some(e) if !self.redlock => Err(e),
            Some(e) => Err(self.no_quorum(vers.len(), format!("proclaim failed: {e}"))),
            None => Err(self.no_quorum(vers.len(), "proclaim not confirmed")),
        }
    }

    /// The leader as a quorum of nodes sees it: `None` if the key is free, if no token is
    /// held by a quorum, or if its holder wrote no election record (a plain lock of the same
    /// name, or another library's).
    ///
    /// Returns as soon as the answers settle it whatever the nodes that have not answered
    /// yet say — a quorum holds the same record (no other token, nor another version, can
    /// then be held by a quorum), a quorum answered and no token can be held by a quorum
    /// any more (a quorum has the key free, say), or so many nodes failed that no quorum
    /// can answer (and those refusing access are, or cannot become, too many for a quorum
    /// to answer) — else once every node answered, or a quorum holds the same token (with
    /// versions that differ: a proclaim under way) and the others stayed silent past the
    /// straggler wait (see [`gather`]): those count as failed. A node that has not answered
    /// yet never counts as failed before: with one master of three down, a free election
    /// reads as free, not as no quorum.
    ///
    /// Too few answers fail with [`Error::NoQuorum`] (worth retrying), except when so many
    /// nodes refused access that no quorum can answer: then with one of their errors
    /// ([`Error::is_access_denied`]), as on a single server. So do answers that leave open
    /// whether a leader holds a quorum (its record on some nodes, no answer from enough of
    /// the others to complete a quorum): "no leader" would be a guess.
    pub(crate) async fn read_leader(&self, keys: &Keys) -> Result<Option<NodeRecord>> {
        let n = self.nodes.len();
        let q = self.quorum;
        let calls: Race<_> = self.nodes.iter().map(|node| node.leader(keys)).collect();
        let same_token = |a: &Option<NodeRecord>, b: &Option<NodeRecord>| matches!((a, b), (Some(a), Some(b)) if a.token == b.token);
        let same_record = |a: &Option<NodeRecord>, b: &Option<NodeRecord>| matches!((a, b), (Some(a), Some(b)) if a.token == b.token && a.ver == b.ver);
        // The leader is known once a quorum holds its token: the others may still confirm
        // which version a quorum holds, for a straggler wait.
        let settled =
            |results: &[Result<Option<NodeRecord>>]| most_agreeing(results, same_token) >= q;
        // Decided by the answers so far whatever the others answer. A node that has not
        // answered is no failure: it may still answer (a quorum's answers then say there is
        // no leader), or refuse access (too many refusals are the error).
        let stop = |results: &[Result<Option<NodeRecord>>]| {
            let pending = n - results.len();
            let answered = results.iter().filter(|r| r.is_ok()).count();
            let failed = results.len() - answered;
            let denied = results
                .iter()
                .filter(|r| r.as_ref().is_err_and(Error::is_access_denied))
                .count();
            most_agreeing(results, same_record) >= q
                || (answered >= q && most_agreeing(results, same_token) + pending < q)
                || denied > n - q
                || (failed > n - q && denied + pending <= n - q)
        };
        let (results, _) = gather(calls, settled, straggle(self.opts.ttl), stop).await;
        let failed = n - results.iter().filter(|r| r.is_ok()).count();
        if failed > n - self.quorum {
            // So many nodes refuse access (an ACL, a password) that no quorum can answer
            // whatever the others do: retrying cannot help, so that is the error, not `no
            // quorum` (which callers retry, as `observe` does).
            let denied = results
                .iter()
                .filter(|r| r.as_ref().is_err_and(Error::is_access_denied))
                .count();
            let denied_for_good = self.redlock && denied > n - self.quorum;
            let mut errors = results.into_iter().filter_map(|r| r.err());
            let error = if denied_for_good {
                errors.find(Error::is_access_denied)
            } else {
                reported_error(errors)
            };
            return match error {
                Some(e) if !self.redlock || denied_for_good => Err(e),
                Some(e) => Err(self.no_quorum(n - failed, format!("read failed: {e}"))),
                None => Err(Error::Closed),
            };
        }
        // No token on a quorum among the answers, but the nodes that did not answer could
        // complete one for an election record seen: whether there is a leader is not known
        // (saying "none" would report a leader that a quorum still holds as gone).
        let same_leader = |a: &Option<NodeRecord>, b: &Option<NodeRecord>| matches!((a, b), (Some(a), Some(b)) if a.token == b.token && a.ver > 0 && b.ver > 0);
        let best = most_agreeing(&results, same_leader);
        if best < self.quorum && best + failed >= self.quorum {
            let errors = results.into_iter().filter_map(|r| r.err());
            let reason = match reported_error(errors) {
                Some(e) => format!("a leader may hold a quorum; read failed: {e}"),
                None => "a leader may hold a quorum; some masters did not answer".to_string(),
            };
            return Err(self.no_quorum(n - failed, reason));
        }
        let mut votes: HashMap<Vec<u8>, Vec<NodeRecord>> = HashMap::new();
        for rec in results.into_iter().flatten().flatten() {
            votes.entry(rec.token.clone()).or_default().push(rec);
        }
        let quorum = self.quorum;
        let Some(mut recs) = votes.into_values().find(|recs| recs.len() >= quorum) else {
            return Ok(None);
        };
        // A holder of the key without its record (version 0) is no leader there: a leader
        // is one whose record a quorum holds.
        recs.retain(|r| r.ver > 0);
        if recs.len() < quorum {
            return Ok(None);
        }
        if failed > 0 && !version_confirmed(&recs, quorum) {
            // No version of the value on a quorum among the answers, and some masters did
            // not answer: the newest version here may be a proclaim that failed (it reached
            // too few masters), or an older one may be the latest that a quorum holds.
            return Err(self.no_quorum(
                n - failed,
                "no version of the leader's value is on a quorum of the masters that answered",
            ));
        }
        // A campaign writes version 1: version 0 is a holder without a record.
        Ok(leader_value(recs, quorum).filter(|rec| rec.ver > 0))
    }
}

/// True if a quorum of `recs` (one leader's records) holds the same version.
fn version_confirmed(recs: &[NodeRecord], quorum: usize) -> bool {
    recs.iter()
        .any(|r| recs.iter().filter(|o| o.ver == r.ver).count() >= quorum)
}

/// The record to report of a leader held by a quorum: the newest version that a quorum of
/// nodes holds (a proclaim that reached fewer nodes failed, and its value is not reported);
/// if none is held that widely while every node answered, the newest there is: a proclaim
/// on its way to a quorum (the usual case), or one that failed after reaching a minority
/// (which this then reports until the leader's next proclaim: the nodes' versions alone
/// cannot tell the two apart; see the `redis` module's Redlock limits). (With nodes missing,
/// `read_leader` says `NoQuorum`.)
fn leader_value(mut recs: Vec<NodeRecord>, quorum: usize) -> Option<NodeRecord> {
    recs.sort_by_key(|r| std::cmp::Reverse(r.ver));
    let confirmed = recs
        .iter()
        .position(|r| recs.iter().filter(|o| o.ver == r.ver).count() >= quorum);
    match confirmed {
        Some(i) => Some(recs.swap_remove(i)),
        None => recs.into_iter().next(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The acquires left in flight after a quorum took the key are marked under their token
    /// until they end; if the runtime they run on shuts down first (the task is dropped
    /// unfinished), the mark must go too, or a client that outlives a runtime (one per
    /// test, say) keeps one entry per such hold for good.
    #[test]
    fn stray_acquire_marks_do_not_outlive_their_runtime() {
        let client = ClientInner::unconnected(Duration::from_secs(5));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let calls: Race<_> = std::iter::once(std::future::pending::<()>()).collect();
            client.finish_acquire_in_background(calls, "tok");
            tokio::task::yield_now().await;
        });
        assert_eq!(client.stray_acquires.lock().unwrap().len(), 1);
        drop(rt);
        assert!(
            client.stray_acquires.lock().unwrap().is_empty(),
            "a mark left after its runtime shut down"
        );
    }

    fn rec(ver: i64, value: &str) -> NodeRecord {
        NodeRecord {
            token: b"t".to_vec(),
            fence: 0,
            ver,
            value: value.as_bytes().to_vec(),
        }
    }

    /// A node that stays silent is not waited for once the answers settle the outcome (here:
    /// a quorum answered) and the straggler wait passed; `stop` ends the wait at once.
    #[tokio::test]
    async fn gather_stops_waiting_for_a_silent_node() {
        let calls = || -> Race<_> {
            [Some(1), Some(5), None]
                .into_iter()
                .map(|ms| async move {
                    match ms {
                        Some(ms) => {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            Ok(ms)
                        }
                        None => std::future::pending().await,
                    }
                })
                .collect()
        };
        let started = Instant::now();
        let never = |_: &[Result<u64>]| false;
        let (answers, rest) = gather(
            calls(),
            quorum_succeeded(2),
            Duration::from_millis(20),
            never,
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            answers.iter().flatten().copied().collect::<Vec<_>>(),
            [1, 5]
        );
        assert_eq!(rest.len(), 1);
        let first = |a: &[Result<u64>]| !a.is_empty();
        let (answers, rest) = gather(
            calls(),
            quorum_succeeded(2),
            Duration::from_secs(3600),
            first,
        )
        .await;
        assert_eq!((answers.len(), rest.len()), (1, 2));
        let failed = too_many_failed(3, 2);
        assert!(!failed(&[Err(Error::Closed), Ok(1)]));
        assert!(failed(&[Err(Error::Closed), Ok(1), Err(Error::Closed)]));
    }

    /// Two quick answers that disagree (one node holds the key, one does not) settle
    /// nothing: the third node is waited for past the straggler wait, and decides.
    #[tokio::test]
    async fn gather_waits_for_a_slow_node_while_the_outcome_is_open() {
        // (delay in ms, what the node holds)
        let calls: Race<_> = [(1, None), (2, Some("t")), (200, Some("t"))]
            .into_iter()
            .map(|(ms, held)| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(held)
            })
            .collect();
        let same = |a: &Option<&str>, b: &Option<&str>| a.is_some() && a == b;
        let never = |_: &[Result<Option<&str>>]| false;
        let settled = holder_settled(3, 2, same);
        let (answers, rest) = gather(calls, settled, Duration::from_millis(10), never).await;
        assert_eq!((answers.len(), rest.len()), (3, 0));
        // Settled: a quorum agrees, or none can have a quorum any more.
        let settled = holder_settled(3, 2, same);
        assert!(!settled(&[Ok(None), Ok(Some("t"))]));
        assert!(settled(&[Ok(Some("t")), Ok(Some("t"))]));
        assert!(settled(&[Ok(None), Ok(None)]));
        assert!(settled(&[Ok(Some("u")), Err(Error::Closed), Ok(Some("t"))]));
        assert!(!settled(&[Ok(Some("u")), Ok(Some("t"))]));
        // One failed and one free: the third decides (free, or no quorum), so it is waited
        // for rather than cut off by the straggler wait and counted as failed.
        assert!(!settled(&[Ok(None), Err(Error::Closed)]));
        assert!(settled(&[Ok(None), Err(Error::Closed), Ok(None)]));
    }

    /// A refused duplicate's error gives way to any other master's, whichever came first.
    #[test]
    fn a_refused_duplicates_error_is_reported_last() {
        let node = super::super::node::Node::new(
            &crate::client::RedisNode::from("127.0.0.1:1"),
            Duration::from_secs(1),
            Duration::from_secs(1),
            None,
        )
        .unwrap();
        let dup = node.refused_as("127.0.0.1:1 and localhost:1 are one server");
        assert!(is_refused_duplicate(&dup) && super::super::node::is_transient(&dup));
        let down = Error::Unavailable("redis 127.0.0.1:2: connection refused".into());
        assert!(!is_refused_duplicate(&down));
        let got = reported_error([dup.clone(), down.clone(), dup.clone()]).unwrap();
        assert_eq!(got.to_string(), down.to_string());
        let got = reported_error([dup.clone()]).unwrap();
        assert_eq!(got.to_string(), dup.to_string());
        assert!(reported_error([]).is_none());
    }

    /// The newest version a quorum holds wins over a newer one that reached a minority.
    #[test]
    fn the_leader_value_is_the_newest_a_quorum_holds() {
        // The three nodes' (version, value), and what is reported.
        type Case = ([(i64, &'static str); 3], (i64, &'static str));
        let cases: [Case; 4] = [
            ([(4, "x"), (3, "ok"), (3, "ok")], (3, "ok")),
            ([(3, "ok"), (4, "x"), (3, "ok")], (3, "ok")),
            ([(5, "y"), (5, "y"), (3, "ok")], (5, "y")),
            // Nothing held by a quorum: the newest there is.
            ([(4, "x"), (5, "y"), (3, "ok")], (5, "y")),
        ];
        for (recs, (ver, value)) in cases {
            let got = leader_value(recs.iter().map(|(v, s)| rec(*v, s)).collect(), 2);
            assert_eq!(
                got.map(|r| (r.ver, r.value)),
                Some((ver, value.as_bytes().to_vec())),
                "{recs:?}"
            );
        }
        assert_eq!(leader_value(vec![], 2), None);
    }
}
