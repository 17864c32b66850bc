//! Waiting for predecessors in a create-revision queue (etcd's `key.go`, done right).
//!
//! A waiter owns a key created at revision `my_rev`. It may go ahead when no member of the
//! queue it waits on has a smaller create revision. Each waiter watches only
//! its immediate predecessor, so a release wakes exactly one waiter (no thundering herd).
//!
//! Two differences from Go:
//! - Go's watch starts at the read's revision, usually behind etcd's current revision, so
//!   etcd serves it from its unsynced group, which it sweeps every 100 ms. Here a waiter
//!   either registers with its client's long-lived shared watch on the queue (already
//!   synced; see `hub.rs`), or, in a long queue with no shared watch yet, watches its
//!   predecessor's key and its own from the next write and closes the gap with one read.
//!   A waiter whose own key is not a member of the queue (a reader waits on the writers'
//!   keys, and their shared watch would not see its own key go) always waits through its
//!   client's shared watches: the writers' one, and one of its own key's prefix (the
//!   readers');
//! - every read of the predecessor also reads our own key, in one transaction, so a waiter
//!   whose key vanished (its lease expired while it queued: etcd #11456), or was
//!   overwritten with no lease (an operator's `etcdctl put KEY ""`, which frees its place),
//!   fails at once instead of being told it holds the lock. A waiter granted by the shared
//!   watch alone is granted only if that watch saw no delete and no overwrite of its own
//!   key either (the watch hears puts on existing keys too; see `hub.rs`).

use std::sync::Arc;
use std::time::Duration;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::hub::Woken;
use crate::names::Queue;
use crate::store::{KeyValue, LeaseId, Range, Revision, SortOrder, SortTarget, Store, Txn, TxnOp};

/// A waiter with at most this many members ahead of it opens its client's shared watch on
/// the queue if there is none yet; in a longer queue it watches single keys (see
/// `hub::keys_gone`), so that a long queue of separate clients does not send every event
/// to each of them.
const HUB_QUEUE_MAX: usize = 8;

/// Backoff between retries of a failed read or watch while waiting.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// How long a waiter waits on a watch before it reads its turn again anyway (plus up to a
/// quarter more, at random, so that waiters do not read together). A key ahead can stop
/// counting as a member without a delete (overwritten without a lease by an operator's
/// `etcdctl put`, its holder gone: never deleted). The watches hear that too (the client's
/// shared watch on the queue, and a waiter's watches of its predecessor and its own key),
/// and send the waiter to read at once; this read is a safety net for whatever a watch
/// fails to tell. One read per waiter per half minute.
pub(crate) const RECHECK: Duration = Duration::from_secs(30);

/// [`RECHECK`] with its jitter.
pub(crate) fn recheck_after() -> Duration {
    use rand::Rng;
    RECHECK + RECHECK.mul_f64(rand::thread_rng().gen_range(0.0..0.25))
}

/// Wait for `wake`, or answer [`Woken::Reread`] after [`recheck_after`].
async fn or_recheck(
    wake: impl std::future::Future<Output = Result<(usize, Woken)>>,
) -> Result<(usize, Woken)> {
    tokio::time::timeout(recheck_after(), wake)
        .await
        .unwrap_or(Ok((0, Woken::Reread)))
}

/// What [`wait_turn`] found: our key, still ours, with no predecessor left.
#[derive(Debug)]
pub(crate) struct Turn {
    /// The store revision at which we were seen at the head.
    pub(crate) header_revision: Revision,
    /// We waited in a long queue of empty-valued keys (its first read found more than
    /// [`HUB_QUEUE_MAX`] members ahead of us, or could not tell how many), so our successor
    /// most likely waits in one too: our release leaves the queue's handoff mark (see
    /// [`handed_over`]).
    pub(crate) long: bool,
}

/// What one read of the queue found.
#[derive(Debug)]
pub(crate) struct TurnRead {
    pub(crate) header: Revision,
    /// The last member created at or before the bound: the one we wait for.
    pub(crate) pred: Option<KeyValue>,
    /// Our own key.
    pub(crate) mine: Option<KeyValue>,
    /// True if `pred` is also the queue's first member, so nobody else is ahead of us.
    pub(crate) pred_is_head: bool,
    /// Every member created before us, oldest first (`pred` last), when the read is known to
    /// have seen them all.
    pub(crate) ahead: Option<Vec<Vec<u8>>>,
}

/// One read, in one transaction: the last member of `queue` created at or before
/// `max_create_rev`, the queue's first member (if `with_head`: each of these two costs etcd
/// a scan of the whole queue), and our own key.
async fn read_turn(
    store: &Arc<dyn Store>,
    queue: &Queue,
    my_key: &[u8],
    max_create_rev: Revision,
    with_head: bool,
) -> Result<TurnRead> {
    let mut ops = vec![TxnOp::get(
        Range::prefix(queue.prefix.clone())
            .last_created()
            .with_max_create_revision(max_create_rev),
    )];
    if with_head {
        ops.push(TxnOp::get(
            Range::prefix(queue.prefix.clone()).first_created(),
        ));
    }
    ops.push(TxnOp::get(Range::key(my_key)));
    let resp = store.txn(Txn::new().and_then(ops)).await?;
    let mut gets = resp.responses.into_iter().map(|r| match r {
        crate::store::TxnOpResponse::Get(g) => g.kvs.into_iter().next(),
        _ => None,
    });
    let pred = gets.next().flatten();
    let first = if with_head {
        gets.next().flatten()
    } else {
        None
    };
    let mine = gets.next().flatten();
    match pred {
        // The newest older key belongs to a nested name (`a/b/…` under `a/`): scan for ours.
        // The scan reads our key again, in the same transaction: the verdict on the queue
        // and on our key must be of one revision, or a delete of our key between two reads
        // would be missed for good (the loss watch starts after the verdict's revision).
        Some(kv) if !queue.admits(&kv) => {
            let (header, pred, mine) = scan_member(
                store,
                queue,
                SortOrder::Descending,
                max_create_rev,
                Some(my_key),
            )
            .await?;
            Ok(TurnRead {
                header,
                pred,
                mine,
                pred_is_head: false,
                ahead: None,
            })
        }
        pred => Ok(TurnRead {
            header: resp.header_revision,
            pred_is_head: matches!((&pred, &first), (Some(p), Some(f)) if p.key == f.key),
            pred,
            mine,
            ahead: None,
        }),
    }
}

/// The first (ascending) or last (descending) member of `queue`, by create revision,
/// skipping keys of nested names, and `my_key` (if given) as it is at the same revision, in
/// one transaction: `(header revision, member found, our key)`. Reads the whole prefix, so
/// it is only used when the one-key read found a nested name's key.
pub(crate) async fn scan_member(
    store: &Arc<dyn Store>,
    queue: &Queue,
    order: SortOrder,
    max_create_rev: Revision,
    my_key: Option<&[u8]>,
) -> Result<(Revision, Option<KeyValue>, Option<KeyValue>)> {
    let scan = Range::prefix(queue.prefix.clone())
        .sort_by(SortTarget::CreateRevision, order)
        .with_max_create_revision(max_create_rev);
    let mut ops = vec![TxnOp::get(scan)];
    if let Some(key) = my_key {
        ops.push(TxnOp::get(Range::key(key)));
    }
    let resp = store.txn(Txn::new().and_then(ops)).await?;
    let mut gets = resp.responses.into_iter().map(|r| match r {
        crate::store::TxnOpResponse::Get(g) => g.kvs,
        _ => Vec::new(),
    });
    let found = gets
        .next()
        .unwrap_or_default()
        .into_iter()
        .find(|kv| queue.admits(kv));
    let mine = gets.next().unwrap_or_default().into_iter().next();
    Ok((resp.header_revision, found, mine))
}

/// Wait until no member of `queue` has a create revision below `my_rev`, checking each
/// time that `my_key` still exists with create revision `my_rev`, bound to `my_lease`. `hint` is a read already
/// made (by the join transaction), used instead of the first read. Our key need not be in
/// `queue` itself: a reader waits on the writers' queue. With `marks` (a queue of
/// empty-valued keys: a mutex's),
/// handoff marks are read after a predecessor's delete, and [`Turn::long`] may ask for one
/// (see [`handed_over`]).
///
/// Returns [`Error::NotHeld`] as soon as our key is gone or replaced, or no longer bound
/// to our lease: an operator frees a waiter's place by overwriting its key with no lease
/// (`etcdctl put KEY ""`, which keeps its create revision; the key counts in no queue, so
/// whoever comes next may be granted meanwhile). Retries failed reads
/// and watches with backoff, forever: callers bound the wait with a timeout and with the
/// session's loss.
pub(crate) async fn wait_turn(
    client: &Client,
    queue: &Queue,
    my_key: &[u8],
    my_rev: Revision,
    my_lease: LeaseId,
    mut hint: Option<TurnRead>,
    marks: bool,
) -> Result<Turn> {
    let store = client.store();
    let hub = client.hub();
    let mut backoff = RETRY_MIN;
    // A reader's key is not in the queue it waits on (the writers'); it lives under its
    // own prefix (the readers').
    let mine_in_queue = queue.contains(my_key);
    let own_prefix = crate::ownership::parent(my_key);
    let mark = queue.handoff_key().filter(|_| marks && mine_in_queue);
    let mut long = None;
    loop {
        // When this round's wait began: a watch that worked for a while before it broke
        // starts the backoff afresh (see `after_wake`).
        let round = tokio::time::Instant::now();
        let read = match hint.take() {
            Some(read) => Ok(read),
            // The head is only needed for the shared watch's no-read wake-up.
            None => {
                let with_head = mine_in_queue && hub.is_live(&queue.prefix);
                read_turn(store, queue, my_key, my_rev - 1, with_head).await
            }
        };
        let read = match read {
            Ok(r) => r,
            Err(e) if e.is_retryable() => {
                tracing::debug!(error = %e, "read while waiting failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
            Err(e) => return Err(e),
        };
        if !is_mine(read.mine.as_ref(), my_rev, my_lease) {
            return Err(not_held(my_key));
        }
        let long = *long.get_or_insert_with(|| {
            mark.is_some() && read.ahead.as_ref().is_none_or(|a| a.len() > HUB_QUEUE_MAX)
        });
        let Some(pred) = read.pred else {
            return Ok(Turn {
                header_revision: read.header,
                long,
            });
        };
        tracing::trace!(predecessor = %pred.key_str(), "waiting for predecessor");
        // Without a shared watch on the queue, and in a long queue (many waiters, most
        // likely each a client of its own) or when waiting again, watch the predecessor's
        // and our own key alone: opening the shared watch would start it behind etcd's
        // current revision, and every waiting client's shared watch would receive every
        // event of the queue.
        //
        // Not so a reader, whose own key is not in the queue it waits on (the writers'):
        // readers are many and writers few, so each client's readers share two watches
        // (below) rather than hold two each.
        let short = read
            .ahead
            .as_ref()
            .is_some_and(|a| a.len() <= HUB_QUEUE_MAX);
        if mine_in_queue && !short && !hub.is_live(&queue.prefix) {
            use crate::hub::Binding;
            // Our own key bound to another lease is no longer ours: read (and fail).
            let mine: (&[u8], Revision, Binding) = (my_key, my_rev, Binding::Lease(my_lease));
            let keys = [
                (
                    pred.key.as_slice(),
                    pred.create_revision,
                    Binding::SomeLease,
                ),
                mine,
            ];
            let gone = tokio::time::timeout(
                recheck_after(),
                crate::hub::keys_gone(hub, store, &keys, false),
            )
            .await;
            // Our predecessor is gone: if it released as a holder, its handoff mark says so,
            // and two point reads replace the scan of the whole queue.
            if let (Ok(Ok(Some((0, _)))), Some(mark)) = (&gone, &mark) {
                crate::hub::Counters::add(&hub.counters.wakeups);
                if let Some(at) = handed_over(client, mark, &pred, my_key, my_rev, my_lease).await {
                    return Ok(Turn {
                        header_revision: at,
                        long,
                    });
                }
                // Not marked (a Go or `etcdctl` holder, a waiter that gave up, an expired
                // lease), or the read failed: read the queue.
                continue;
            }
            let woken = match gone {
                // Time to read again anyway (see `RECHECK`).
                Err(_) => Ok(Woken::Reread),
                Ok(gone) => {
                    if gone.is_ok() {
                        crate::hub::Counters::add(&hub.counters.wakeups);
                    }
                    // A watch that ended (closed, or compacted) is no delete: read again
                    // after the backoff, or a stream that keeps ending at once would be a
                    // tight loop.
                    gone.map(|g| match g {
                        Some(_) => Woken::Deleted(0),
                        None => Woken::Interrupted,
                    })
                }
            };
            after_wake(woken, &mut backoff, round).await?;
            continue;
        }
        let header = read.header;
        if !mine_in_queue {
            // A reader: the shared watch on the writers' queue does not see our own key go.
            // Wait on it through the client's shared watch of our key's own prefix (the
            // readers'), so that the readers of one client share two watches (opened here
            // if need be), not two each; either delete sends us back to read.
            let (preds, mine): (&[&[u8]], &[&[u8]]) = (&[&pred.key], &[my_key]);
            let answer = or_recheck(async {
                tokio::select! {
                    a = hub.wait_delete(store, &queue.prefix, preds, header) => a,
                    a = hub.wait_delete(store, &own_prefix, mine, header) => a,
                }
            })
            .await;
            if !matches!(answer, Ok((_, Woken::Reread))) {
                crate::hub::Counters::add(&hub.counters.wakeups);
            }
            after_wake(answer.map(|(_, w)| w), &mut backoff, round).await?;
            continue;
        }
        // Our own key is a member of the queue too (a mutex or election queue), so the
        // shared watch reports its delete in the same revision order: if the predecessor's
        // delete comes first, our key still existed at that revision.
        let keys: &[&[u8]] = &[&pred.key, my_key];
        let answer = or_recheck(hub.wait_delete(store, &queue.prefix, keys, header)).await;
        if !matches!(answer, Ok((_, Woken::Reread))) {
            crate::hub::Counters::add(&hub.counters.wakeups);
        }
        let woken = match answer {
            // The predecessor is gone at revision `rev`. If it was the only member ahead of
            // us, or we know every member that was (the rest we wait out on the shared
            // watch), we are at the head with no further read of the queue, once our key has
            // no delete up to then either. One revision can delete both (`etcdctl del
            // --prefix`, a transaction), and its events come in key order, so the answer
            // alone does not tell. Nor must our key have been overwritten (with no lease, it
            // would be freed: see `rest_gone`).
            Ok((0, Woken::Deleted(rev))) if read.pred_is_head || read.ahead.is_some() => {
                let rest = match read.ahead.as_deref() {
                    Some(ahead) if !read.pred_is_head => &ahead[..ahead.len().saturating_sub(1)],
                    _ => &[],
                };
                match rest_gone(client, queue, my_key, header, rest, rev).await {
                    Ok(Some(at)) => {
                        return Ok(Turn {
                            header_revision: at,
                            long,
                        })
                    }
                    Ok(None) => Ok(Woken::Deleted(rev)),
                    Err(e) => Err(e),
                }
            }
            // Ahead of the predecessor were members we do not know: its handoff mark, if
            // it left one, saves the read of the whole queue.
            Ok((0, Woken::Deleted(rev))) if mark.is_some() => {
                let mark = mark.as_deref().unwrap_or_default();
                match handed_over(client, mark, &pred, my_key, my_rev, my_lease).await {
                    Some(at) => {
                        return Ok(Turn {
                            header_revision: at,
                            long,
                        })
                    }
                    None => Ok(Woken::Deleted(rev)),
                }
            }
            other => other.map(|(_, w)| w),
        };
        after_wake(woken, &mut backoff, round).await?;
    }
}

/// Whether `pred`, our predecessor, now gone, released the lock as its holder, as its
/// handoff mark (`mark`: see [`Queue::handoff_key`](crate::names::Queue::handoff_key))
/// tells: read with our own key, in one transaction. Returns the revision at which we are at
/// the head, or `None` if the mark does not name `pred`, our key is not ours as read, or the
/// read failed: the caller then reads the queue, as it would without marks, which decides.
///
/// Why the mark is enough: a holder's release writes the mark (its create revision) in the
/// transaction that deletes its key, so a mark naming `pred` means `pred` was once at the
/// head, when no member created before it was left; none can be created since, as create
/// revisions only grow. And `pred` was the last member created before us. So once `pred` is
/// gone, nobody is ahead of us, at any revision at which our key is still ours. A Go or
/// `etcdctl` holder, a waiter that gave up and a lease that expired leave no mark, and a
/// later release overwrites it: the waiter then reads the queue, as it would without marks.
///
/// The read is linearizable, as every read that grants: a serializable one, answered by a
/// member that has applied the mark but not a later delete or overwrite of our own key,
/// would grant a waiter whose key is gone (found by review).
async fn handed_over(
    client: &Client,
    mark: &[u8],
    pred: &KeyValue,
    my_key: &[u8],
    my_rev: Revision,
    my_lease: LeaseId,
) -> Option<Revision> {
    let refused = &client.hub().marks_refused;
    if refused.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let read = Txn::new().and_then([TxnOp::get(Range::key(mark)), TxnOp::get(Range::key(my_key))]);
    let resp = match client.store().txn(read).await {
        Ok(resp) => resp,
        Err(e) => {
            // The user's roles cover the lock's keys but not its mark: stop reading marks.
            if matches!(e, Error::PermissionDenied(_)) {
                refused.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::debug!(error = %e, "reading the handoff mark failed; reading the queue");
            return None;
        }
    };
    let mut gets = resp.responses.into_iter().map(|r| match r {
        crate::store::TxnOpResponse::Get(g) => g.kvs.into_iter().next(),
        _ => None,
    });
    let (marked, mine) = (gets.next().flatten(), gets.next().flatten());
    let named = marked.is_some_and(|kv| kv.value == handoff_value(pred.create_revision));
    (named && is_mine(mine.as_ref(), my_rev, my_lease)).then_some(resp.header_revision)
}

/// The value of a handoff mark left by the release of the key created at `create_rev`.
pub(crate) fn handoff_value(create_rev: Revision) -> Vec<u8> {
    create_rev.to_string().into_bytes()
}

/// True if `mine` (our key as read) is still ours: our create revision, bound to our lease.
fn is_mine(mine: Option<&KeyValue>, my_rev: Revision, my_lease: LeaseId) -> bool {
    mine.is_some_and(|kv| kv.create_revision == my_rev && kv.lease == my_lease)
}

fn not_held(key: &[u8]) -> Error {
    Error::NotHeld {
        key: String::from_utf8_lossy(key).into_owned(),
    }
}

/// What a wait on the shared watch answered, before the next read: a delete resets the
/// backoff; a watch opened after our read (`Reread`) reads again at once; a broken watch or
/// a retryable error waits the backoff out and doubles it; any other error ends the wait.
///
/// A wait that began at `since`, at least [`RETRY_MAX`] ago, worked until it broke: its
/// backoff starts again from [`RETRY_MIN`], or a few breaks long ago would leave every later
/// one blind for up to `RETRY_MAX`.
async fn after_wake(
    woken: Result<Woken>,
    backoff: &mut Duration,
    since: tokio::time::Instant,
) -> Result<()> {
    if since.elapsed() >= RETRY_MAX {
        *backoff = RETRY_MIN;
    }
    match woken {
        Ok(Woken::Deleted(_)) => *backoff = RETRY_MIN,
        Ok(Woken::Reread) => {}
        Ok(Woken::Interrupted) => {
            tokio::time::sleep(*backoff).await;
            *backoff = (*backoff * 2).min(RETRY_MAX);
        }
        Err(e) if e.is_retryable() => {
            tracing::debug!(error = %e, "watch while waiting failed; retrying");
            tokio::time::sleep(*backoff).await;
            *backoff = (*backoff * 2).min(RETRY_MAX);
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Wait until every key of `rest` (members created before us, oldest first) has been deleted
/// after revision `header`, our own key still there as we read it, using only the client's shared watch
/// on the queue's prefix; `at` is the revision of a delete already seen.
///
/// Returns the revision at which we are at the head, or `None` if the shared watch cannot
/// tell (it does not cover `header`, or broke) or our key went first: then read again.
///
/// Why no read of the queue is needed: `rest` is every member created before us (the join transaction
/// read them all), and no member can be created before us later, since create revisions
/// only grow. The shared watch reports every delete under the prefix in revision order, so
/// once each of them has a delete after `header`, and our key has none up to the latest of
/// those, our key existed at that revision with nobody ahead: the same re-check of our own
/// key that a read would make. Its lease too: an overwrite with no lease (an operator's
/// `etcdctl put KEY ""`, which frees our place, and may have let whoever came next be
/// granted) is no delete, so our key must have no overwrite either, which the shared watch
/// also hears. We wait on the nearest member still there, so a release still wakes only
/// its successor; members deleted already are found in the buffer.
async fn rest_gone(
    client: &Client,
    queue: &Queue,
    my_key: &[u8],
    header: Revision,
    rest: &[Vec<u8>],
    mut at: Revision,
) -> Result<Option<Revision>> {
    let hub = client.hub();
    for key in rest.iter().rev() {
        match hub.deleted_since(&queue.prefix, key, header, header) {
            Some(Some(rev)) => {
                at = at.max(rev);
                continue;
            }
            Some(None) => {}
            None => return Ok(None),
        }
        // Read again anyway now and then (see `RECHECK`): a key ahead overwritten without
        // a lease is no member, and is never deleted.
        let answer =
            or_recheck(hub.wait_delete(client.store(), &queue.prefix, &[key, my_key], header))
                .await?;
        if !matches!(answer, (_, Woken::Reread)) {
            crate::hub::Counters::add(&hub.counters.wakeups);
        }
        match answer {
            (0, Woken::Deleted(rev)) => at = at.max(rev),
            _ => return Ok(None),
        }
    }
    // Our key must have no delete and no overwrite in (header, at], as seen by a watch that
    // has delivered everything up to `at` (the deletes above may have come through an older
    // watch). A waiter never writes its own key: any overwrite is someone else's (read).
    match hub.changed_since(&queue.prefix, my_key, header, at) {
        Some(Some(rev)) if rev <= at => Ok(None),
        Some(_) => Ok(Some(at)),
        None => Ok(None),
    }
}

/// The head of `queue` (its first member by create revision), with the
/// header revision of the read.
pub(crate) async fn head_member(
    store: &Arc<dyn Store>,
    queue: &Queue,
) -> Result<(Revision, Option<KeyValue>)> {
    let resp = store
        .range(Range::prefix(queue.prefix.clone()).first_created())
        .await?;
    match resp.kvs.into_iter().next() {
        Some(kv) if !queue.admits(&kv) => {
            let (header, head, _) =
                scan_member(store, queue, SortOrder::Ascending, 0, None).await?;
            Ok((header, head))
        }
        head => Ok((resp.header_revision, head)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::store::slow::SlowWatches;
    use crate::store::{KeyRange, Range, Store};
    use crate::{Client, Error, Mutex, Session};

    async fn session(client: &Client) -> Session {
        Session::builder(client)
            .with_ttl(Duration::from_secs(10))
            .build()
            .await
            .unwrap()
    }

    /// A client whose store deletes a chosen key right before the next scan of a queue.
    fn trapped() -> (Client, Arc<SlowWatches>) {
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        (Client::from_arc(store.clone()), store)
    }

    /// A waiter deep in a queue (more than `HUB_QUEUE_MAX` ahead, no shared watch) whose
    /// watch of its predecessor ends at once, again and again, with no error (a proxy that
    /// closes streams): it reads and watches again with a backoff, not in a tight loop
    /// (found by review: an ended watch counted as a delete, which resets the backoff).
    #[tokio::test]
    async fn a_watch_that_keeps_ending_is_retried_with_a_backoff() {
        use std::sync::atomic::Ordering;
        let (client, store) = trapped();
        let others = session(&client).await;
        let lease = others.lease_id();
        let mut last = Vec::new();
        for i in 0..(super::HUB_QUEUE_MAX + 1) {
            last = format!("deep/{:x}", lease + 1000 + i as i64).into_bytes();
            store.inner.put(&last, b"", lease).await.unwrap();
        }
        *store.end_watch_on.lock().unwrap() = Some((last, false));
        let mine = session(&client).await;
        let mutex = Mutex::new(&mine, "deep").unwrap();
        let before = store.txns.load(Ordering::Relaxed);
        let waited = mutex.lock_timeout(Duration::from_secs(1)).await;
        assert!(waited.unwrap_err().is_timeout());
        let reads = store.txns.load(Ordering::Relaxed) - before;
        assert!(reads < 30, "{reads} transactions in 1 s of waiting");
    }

    async fn lock_fails_not_held(mutex: Mutex) {
        let locked = tokio::time::timeout(Duration::from_secs(5), mutex.lock())
            .await
            .expect("lock() hung");
        match locked {
            Err(Error::NotHeld { .. }) => {}
            Err(e) => panic!("expected NotHeld, got {e}"),
            Ok(g) => panic!(
                "granted a lock whose key is gone (key {}, is_lost {})",
                g.key(),
                g.is_lost()
            ),
        }
    }

    /// The holder's key and the waiter's go in one revision (`etcdctl del --prefix`): the
    /// shared watch names the holder's delete first (events come in key order), but the
    /// waiter must not take that as its turn.
    #[tokio::test]
    async fn a_waiter_deleted_with_the_head_in_one_revision_is_not_granted() {
        let client = Client::memory();
        let (s1, s2) = (session(&client).await, session(&client).await);
        let (m1, m2) = (
            Mutex::new(&s1, "r/x").unwrap(),
            Mutex::new(&s2, "r/x").unwrap(),
        );
        // The holder's key must sort first.
        let (holder, waiter) = if m1.key() < m2.key() {
            (m1, m2)
        } else {
            (m2, m1)
        };
        let held = holder.lock().await.unwrap();
        let waiting = tokio::spawn(lock_fails_not_held(waiter));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "the waiter did not wait");
        let (deleted, _) = client
            .store()
            .delete(KeyRange::prefix("r/x/"))
            .await
            .unwrap();
        assert_eq!(deleted, 2);
        waiting.await.unwrap();
        // The lock is free for a third session, with nobody else believing they hold it.
        let third = session(&client).await;
        let g = tokio::time::timeout(
            Duration::from_secs(5),
            Mutex::new(&third, "r/x").unwrap().lock(),
        )
        .await
        .expect("third lock() hung")
        .unwrap();
        assert!(held.is_lost());
        g.unlock().await.unwrap();
    }

    /// A waiter woken with a nested name's key (`n/b/…` under `n/`) just ahead of it scans
    /// the queue; its key deleted between its read and that scan must fail the wait, not
    /// grant it a lock whose key is gone.
    #[tokio::test]
    async fn a_waiter_deleted_before_its_scan_of_nested_keys_is_not_granted() {
        let (client, store) = trapped();
        let (a, w) = (session(&client).await, session(&client).await);
        let mw = Mutex::new(&w, "n").unwrap();
        // The waiter's client has the shared watch on the queue, as after earlier holds.
        for _ in 0..3 {
            mw.lock().await.unwrap().unlock().await.unwrap();
        }
        let held = Mutex::new(&a, "n").unwrap().lock().await.unwrap();
        store.put(b"n/b/1f", b"", 0).await.unwrap();
        let key = mw.key().as_bytes().to_vec();
        let waiting = tokio::spawn(lock_fails_not_held(mw));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "the waiter did not wait");
        *store.delete_before_scan.lock().unwrap() = Some(key.clone());
        held.unlock().await.unwrap();
        waiting.await.unwrap();
        assert!(
            store.delete_before_scan.lock().unwrap().is_none(),
            "no scan ran"
        );
        let left = store.range(Range::key(key)).await.unwrap();
        assert!(left.kvs.is_empty());
    }

    /// The join finds a nested name's key among the last keys and scans for the head; our
    /// key deleted before that scan (nobody else in the queue) must fail the join, not find
    /// us "at the head" of a queue we are no longer in.
    #[tokio::test]
    async fn a_join_whose_key_goes_before_its_scan_is_not_granted() {
        let (client, store) = trapped();
        let w = session(&client).await;
        store.put(b"n/b/1f", b"", 0).await.unwrap();
        let mw = Mutex::new(&w, "n").unwrap();
        *store.delete_before_scan.lock().unwrap() = Some(mw.key().as_bytes().to_vec());
        lock_fails_not_held(mw).await;
        assert!(
            store.delete_before_scan.lock().unwrap().is_none(),
            "no scan ran"
        );
    }
}
