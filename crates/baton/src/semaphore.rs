//! A fair distributed counting semaphore: lease-bound permits, granted in FIFO order.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::error::{Error, Result};
use crate::hub::OnEveryDelete;
use crate::names::{lease_key, validate_count, validate_name, Queue};
use crate::ownership::not_held;
use crate::queue::{held_accessors, with_timeout_settled, Entry, Held};
use crate::session::Session;
use crate::store::{
    Compare, CompareOp, KeyValue, Range, Revision, SortOrder, SortTarget, Store, Txn, TxnOp,
};
use crate::watching::{while_alive, Waiter};

/// A fair, distributed counting semaphore: at most `permits` permits are held at once,
/// across every process that uses the same name and permit count.
///
/// Each acquirer puts one key and queues by its create revision, like a [`Mutex`]
/// waiter. A key holds the permits it asked for when the keys created before it, plus its
/// own request, add up to at most `permits`: so permits are granted in strict FIFO order
/// (a large request at the front is not overtaken by small ones behind it), and the holders
/// are always the front of the queue.
///
/// # Liveness
///
/// Keys are bound to the session's lease. A holder whose process dies frees its permits
/// when its lease expires (at most the session's TTL after its last keep-alive), and its
/// [`SemaphorePermit::lost`] fires if it is still alive to hear it. A waiter whose session
/// is lost gets [`Error::SessionLost`], never a permit.
///
/// # No thundering herd
///
/// A waiter reads the queue again only when a change lets it in. After a read it hears
/// the deletes under the name from its client's shared watch (one etcd watch per client
/// and name, as a [`Mutex`](crate::Mutex)'s waiters use), and takes each
/// deleted key's permits off what it read (a key freed by an operator's `etcdctl put KEY
/// ""`, with no lease, counts as deleted): no key can join the queue ahead of it, so it
/// knows when it fits without reading. So a release of one permit makes the first waiter
/// that fits read, and no other. Every waiting task does hear every release, in process.
///
/// A waiter never waits on another waiter: one that is paused, killed or not polled counts
/// as a holder once the keys ahead of it fit (its permits are free again when its key is
/// deleted or its lease expires), and the waiters behind it go on as soon as they fit.
///
/// # Agreeing on the permit count
///
/// Each key's value is `COUNT/PERMITS`: the permits it asks for and the semaphore's size
/// as its owner sees it. An acquirer checks every key queued before its own, and fails with
/// [`Error::Mismatch`] (removing its key) if one of them says another size. So every
/// holder and waiter that queued at the same time agrees on the size; the size can change
/// once everyone has left.
///
/// # Key layout
///
/// `NAME/<lease id in lowercase hex>`, value `COUNT/PERMITS` (ASCII decimal), bound to the
/// session's lease. A session takes part once at a time: to hold several permits, use
/// [`acquire_many`](Semaphore::acquire_many); a second acquire through the same session
/// while the first is held or pending fails with [`Error::AlreadyHeld`]. A key the
/// session's lease already has (a process that resumed its session with
/// [`with_lease`](crate::SessionBuilder::with_lease)) is adopted if it asks for the same
/// count of a semaphore of the same size; otherwise it is removed and the acquire queues
/// afresh, behind everyone (and fails with [`Error::Mismatch`] if the keys there say
/// another size). A key under that name no longer bound to the lease (overwritten with no
/// lease: freed) is never adopted, nor rewritten back under the lease: it is removed and the
/// acquire queues afresh (see [`with_lease`](crate::SessionBuilder::with_lease)). Keys of
/// nested names (`NAME/sub/…`) are not part of this semaphore.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// let (s1, s2) = (baton::Session::new(&client).await?, baton::Session::new(&client).await?);
/// let a = baton::Semaphore::new(&s1, "jobs/encoders", 3)?;
/// let b = baton::Semaphore::new(&s2, "jobs/encoders", 3)?;
///
/// let two = a.acquire_many(2).await?;
/// let one = b.acquire().await?;
/// assert_eq!(a.available().await?, 0);
/// assert!(a.try_acquire().await.is_err()); // this session is already in the queue
/// two.release().await?;
/// assert_eq!(b.available().await?, 2);
/// one.release().await?;
/// # Ok(())
/// # }
/// ```
///
/// [`Mutex`]: crate::Mutex
#[derive(Clone)]
pub struct Semaphore {
    session: Session,
    name: String,
    prefix: String,
    key: String,
    permits: u32,
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("name", &self.name)
            .field("permits", &self.permits)
            .field("key", &self.key)
            .finish()
    }
}

impl Semaphore {
    /// The value a semaphore writes in each waiter's or holder's key, `COUNT/PERMITS` in
    /// ASCII decimal, as `(count, permits)`; `None` if `value` is not one. For tools that
    /// read the keys themselves (`baton status`).
    pub fn decode_value(value: &[u8]) -> Option<(u32, u32)> {
        decode(value)
    }

    /// A semaphore named `name` with `permits` permits, acquired through `session`.
    ///
    /// Fails with [`Error::InvalidArgument`] if `permits` is 0, or if the name is empty,
    /// longer than 1 KiB, or contains a NUL byte.
    pub fn new(session: &Session, name: &str, permits: u32) -> Result<Semaphore> {
        validate_name(name)?;
        validate_count("permits", permits)?;
        let prefix = format!("{name}/");
        Ok(Semaphore {
            session: session.clone(),
            name: name.to_string(),
            key: lease_key(&prefix, session.lease_id()),
            prefix,
            permits,
        })
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of permits.
    pub fn permits(&self) -> u32 {
        self.permits
    }

    /// The key this session queues with: `NAME/<lease id in hex>`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Wait for one permit. See [`acquire_many`](Semaphore::acquire_many).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future removes our key from the queue.
    pub async fn acquire(&self) -> Result<SemaphorePermit> {
        self.acquire_many(1).await
    }

    /// Wait until `count` permits are ours, behind everyone who queued before us.
    ///
    /// Fails with [`Error::InvalidArgument`] before any network call if `count` is 0 or
    /// more than the semaphore has; with [`Error::Mismatch`] if an earlier key says the
    /// semaphore has another number of permits; with [`Error::SessionLost`] if the session
    /// is lost while waiting, and with [`Error::NotHeld`] if our key vanished.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future removes our key (in a task spawned on the current
    /// runtime, after any request in flight has been answered, and retried while the store
    /// cannot be reached, for as long as the session lives), so nothing is left queued.
    pub async fn acquire_many(&self, count: u32) -> Result<SemaphorePermit> {
        self.acquire_inner(count, false)
            .instrument(tracing::debug_span!("acquire", semaphore = %self.name, count))
            .await
    }

    /// [`acquire()`](Semaphore::acquire), giving up with [`Error::Timeout`] after `timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe; on timeout our key is removed.
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<SemaphorePermit> {
        with_timeout_settled(&self.session, &self.key, "acquire", timeout, self.acquire()).await
    }

    /// [`acquire_many()`](Semaphore::acquire_many), giving up with [`Error::Timeout`] after
    /// `timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe; on timeout our key is removed.
    pub async fn acquire_many_timeout(
        &self,
        count: u32,
        timeout: Duration,
    ) -> Result<SemaphorePermit> {
        with_timeout_settled(
            &self.session,
            &self.key,
            "acquire",
            timeout,
            self.acquire_many(count),
        )
        .await
    }

    /// Take one permit if one is free and nobody queues before us, without waiting.
    /// See [`try_acquire_many`](Semaphore::try_acquire_many).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn try_acquire(&self) -> Result<SemaphorePermit> {
        self.try_acquire_many(1).await
    }

    /// Take `count` permits if they are free and nobody queues before us, without waiting;
    /// otherwise fail with [`Error::NoPermits`] (our key is removed before the error is
    /// returned). One attempt: a store that cannot be reached is its (retryable) error at
    /// once.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn try_acquire_many(&self, count: u32) -> Result<SemaphorePermit> {
        self.acquire_inner(count, true)
            .instrument(tracing::debug_span!("try_acquire", semaphore = %self.name, count))
            .await
    }

    /// How many permits are free now: the permits minus those held. A snapshot, already
    /// stale when it returns; waiters queued behind a large request may see free permits
    /// they cannot take yet. Fails with [`Error::Mismatch`] if a key it counts (the queue's,
    /// up to the first that does not fit) says another number of permits, or is no permit.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn available(&self) -> Result<u32> {
        let resp = self.session.store().range(self.members_read()).await?;
        let members: Vec<KeyValue> = self.members(resp.kvs);
        let mut held = 0_u64;
        for kv in &members {
            let (count, _) = self.parse(kv)?;
            if held + u64::from(count) > u64::from(self.permits) {
                break;
            }
            held += u64::from(count);
        }
        Ok(u32::try_from(u64::from(self.permits).saturating_sub(held)).unwrap_or(0))
    }

    fn members_read(&self) -> Range {
        Range::prefix(self.prefix.as_bytes())
            .sort_by(SortTarget::CreateRevision, SortOrder::Ascending)
    }

    fn members(&self, kvs: Vec<KeyValue>) -> Vec<KeyValue> {
        let queue = Queue::direct(&self.prefix);
        kvs.into_iter().filter(|kv| queue.admits(kv)).collect()
    }

    fn check_count(&self, count: u32) -> Result<()> {
        validate_count("count", count)?;
        if count > self.permits {
            return Err(Error::invalid(format!(
                "cannot acquire {count} permits of a semaphore with {}",
                self.permits
            )));
        }
        Ok(())
    }

    async fn acquire_inner(&self, count: u32, try_only: bool) -> Result<SemaphorePermit> {
        self.check_count(count)?;
        let value = encode(count, self.permits);
        let mut attempts = 0;
        let mut entry = loop {
            attempts += 1;
            let entry = Entry::join_reading(
                &self.session,
                &self.name,
                Queue::direct(&self.prefix),
                &self.key,
                value.as_bytes(),
                self.members_read(),
                try_only,
            )
            .await?;
            // A key left with our lease by an earlier acquire of another count or another
            // semaphore size (a process that resumed its session): its place in the queue
            // was earned for that request, and later keys may hold permits since. Give it up
            // and queue afresh (behind keys of another size, that fails with Mismatch).
            match entry.existing_value().map(decode) {
                Some(old) if old != Some((count, self.permits)) => {
                    entry.abandon().await;
                    if attempts >= 2 {
                        return Err(Error::Mismatch {
                            name: self.name.clone(),
                            reason: format!(
                                "this session's key {} still says {}, not {value}, \
                                 and removing it failed",
                                self.key,
                                old.map_or_else(
                                    || "an unreadable COUNT/PERMITS".into(),
                                    |(c, p)| encode(c, p)
                                )
                            ),
                        });
                    }
                }
                _ => break entry,
            }
        };
        match self.hold(&mut entry, count, &value, try_only).await {
            Ok(()) => Ok(SemaphorePermit {
                name: self.name.clone(),
                count,
                held: entry.into_held(),
            }),
            Err(e) => {
                entry.abandon().await;
                Err(e)
            }
        }
    }

    /// Wait until the entry holds its permits (or fail).
    async fn hold(&self, entry: &mut Entry, count: u32, value: &str, try_only: bool) -> Result<()> {
        let my_rev = entry.my_rev();
        // A key left by an earlier process with our lease: make it say what we ask for.
        let resumed = entry.existing_value().is_some();
        // The join's read is dropped here, not held while waiting (each waiter would hold
        // every key before its own: memory quadratic in the queue's length).
        let holds_at_join = {
            let before: Vec<KeyValue> = self
                .members(entry.take_joined())
                .into_iter()
                .filter(|kv| kv.create_revision < my_rev)
                .collect();
            self.fits(count, &before)?
        };
        let mut seen_at = my_rev;
        if !holds_at_join {
            if try_only {
                return Err(Error::NoPermits {
                    name: self.name.clone(),
                });
            }
            tracing::debug!(my_rev, "queued");
            seen_at =
                while_alive(&self.session, self.wait_turn(entry.store(), count, my_rev)).await?;
        }
        if !holds_at_join || resumed {
            // Check that the key is still ours, and tell a waiter of an earlier Baton
            // version behind it, which watches our key for this moment.
            seen_at = self.touch(entry.store(), my_rev, value, try_only).await?;
        }
        entry.reached_head(seen_at);
        tracing::debug!(my_rev, "permits granted");
        Ok(())
    }

    /// Rewrite our key (same value) if it is still ours (our create revision, bound to our
    /// lease: an overwrite with no lease, which frees the permit, keeps the create revision,
    /// and must not be bound to our lease again); the revision of the write.
    ///
    /// A retryable failure is retried for as long as the session lives (unless `try_only`),
    /// as a mutex waiter's read at its grant is: the compare makes a retry safe, and a
    /// waiter must not lose its whole wait, and its place, to a request that failed at its
    /// grant (a connection reset, "request timed out" while etcd elects a leader, an outage
    /// longer than a join's retries).
    async fn touch(
        &self,
        store: &Arc<dyn Store>,
        my_rev: Revision,
        value: &str,
        try_only: bool,
    ) -> Result<Revision> {
        let key = self.key.as_bytes();
        let lease = self.session.lease_id();
        let txn = Txn::new()
            .when([
                Compare::create_revision(key, CompareOp::Equal, my_rev),
                Compare::lease(key, CompareOp::Equal, lease),
            ])
            .and_then([TxnOp::put(key, value, self.session.lease_id())]);
        let retry_for = if try_only {
            Duration::ZERO
        } else {
            Duration::MAX
        };
        let mut retry = crate::queue::Retry::new(retry_for);
        let mut warned = false;
        let resp = loop {
            match store.txn(txn.clone()).await {
                Ok(resp) => break resp,
                Err(e) => {
                    // etcd out of space (its NOSPACE alarm) refuses the write until an
                    // operator frees space: said once, not only at debug level, as the
                    // grant waits for it.
                    if !warned && !try_only && crate::ownership::refused_for_space(&e) {
                        warned = true;
                        tracing::warn!(
                            semaphore = %self.name,
                            error = %e,
                            "the store is out of space: the grant waits until space is freed"
                        );
                    }
                    retry
                        .after(&self.session, e, "rewriting our key at the grant")
                        .await?
                }
            }
        };
        if resp.succeeded {
            Ok(resp.header_revision)
        } else {
            Err(not_held(key))
        }
    }

    /// Wait until the keys before ours leave room for `count` permits; the revision at
    /// which that was seen.
    ///
    /// Whether they do depends only on which keys are before ours: none can be added (a
    /// key created later queues behind us), and each keeps its count. So after a read the
    /// waiter hears every delete under the name from its client's shared watch (one etcd
    /// watch and one event per delete for all the client's waiters), and every key freed
    /// there (overwritten with no lease), takes each such key's permits off what it read,
    /// and reads again only when that leaves room, or when its own key goes. (A key bound
    /// to another lease than its name says is told too: it still holds its permits, as
    /// that lease's, so the count is then low and the read finds it.) It never waits on
    /// another waiter's process
    /// (before, a waiter behind another waited for that one to be granted and rewrite its
    /// key: a waiter paused, killed or not polled held up everyone behind it until its
    /// lease expired, with permits free).
    async fn wait_turn(
        &self,
        store: &Arc<dyn Store>,
        count: u32,
        my_rev: Revision,
    ) -> Result<Revision> {
        let mut waiter = Waiter::new(store).counting(self.session.client().hub());
        let mine = self.key.as_bytes();
        let permits = u64::from(self.permits);
        loop {
            let read = self.members_read().with_max_create_revision(my_rev);
            let resp = waiter.range(read).await?;
            let mut members = self.members(resp.kvs);
            // Ours: our create revision, bound to our lease (bound to another, by an
            // operator's `etcdctl put --lease`, it is that lease's: found by review).
            let lease = self.session.lease_id();
            match members.pop() {
                Some(kv) if kv.key == mine && kv.create_revision == my_rev && kv.lease == lease => {
                }
                _ => return Err(not_held(mine)),
            }
            let header = resp.header_revision;
            // Only a fingerprint and a count per key before ours are kept while waiting (a
            // long queue's waiters each hold one entry per key before theirs), not the keys.
            let fingerprints = RandomState::new();
            let mut before: HashMap<u64, Before> = HashMap::with_capacity(members.len());
            let mut used = 0_u64;
            for kv in members {
                let (permits_asked, _) = self.parse(&kv)?;
                used += u64::from(permits_asked);
                let entry = before.entry(fingerprints.hash_one(&kv.key)).or_default();
                entry.count += u64::from(permits_asked);
                entry.keys += 1;
            }
            if used + u64::from(count) <= permits {
                return Ok(header);
            }
            tracing::trace!(
                before = before.len(),
                used,
                "waiting for permits to be released"
            );
            let (tx, rx) = tokio::sync::oneshot::channel();
            let tally = Tally {
                mine: mine.to_vec(),
                fingerprints,
                before,
                used,
                room: permits - u64::from(count),
                tx: Some(tx),
            };
            let hub = self.session.client().hub();
            match hub
                .subscribe_deletes(store, self.prefix.as_bytes(), header, Box::new(tally))
                .await
            {
                // Heard enough, or the shared watch broke: read again (after a backoff if
                // it broke, so that a watch that keeps ending cannot make a tight loop).
                Ok(true) => match tokio::time::timeout(crate::wait::recheck_after(), rx).await {
                    // Read again anyway now and then (see `wait::RECHECK`), for whatever the
                    // watch could not tell. Dropping the receiver ends the hook.
                    Err(_) => {}
                    Ok(told) => {
                        waiter.woke();
                        match told {
                            Ok(()) => waiter.succeeded(),
                            Err(_) => {
                                let ended = Error::Unavailable("the shared watch ended".into());
                                waiter.retry(ended).await?;
                            }
                        }
                    }
                },
                // The shared watch started after our read: read again at once.
                Ok(false) => {}
                Err(e) => waiter.retry(e).await?,
            }
        }
    }

    /// Whether a request for `count` permits fits behind `before`, the keys created before
    /// it: [`Error::Mismatch`] if one of them is not a permit of a semaphore of this size.
    fn fits(&self, count: u32, before: &[KeyValue]) -> Result<bool> {
        let mut used = 0_u64;
        for kv in before {
            used += u64::from(self.parse(kv)?.0);
        }
        Ok(used + u64::from(count) <= u64::from(self.permits))
    }

    fn parse(&self, kv: &KeyValue) -> Result<(u32, u32)> {
        let mismatch = |reason: String| Error::Mismatch {
            name: self.name.clone(),
            reason,
        };
        let (count, permits) = decode(&kv.value).ok_or_else(|| {
            mismatch(format!(
                "key {:?} is not a semaphore permit (its value is not COUNT/PERMITS)",
                kv.key_str()
            ))
        })?;
        if permits != self.permits {
            return Err(mismatch(format!(
                "key {:?} says it has {permits} permits; this handle says {}",
                kv.key_str(),
                self.permits
            )));
        }
        if count == 0 || count > permits {
            return Err(mismatch(format!(
                "key {:?} asks for {count} of {permits} permits",
                kv.key_str()
            )));
        }
        Ok((count, permits))
    }
}

/// A waiter's count of the permits held or asked for before its key, told of every delete
/// (and every key freed) under the name by its client's shared watch: it tells its waiter when they leave room
/// for its request, or when its own key goes.
struct Tally {
    mine: Vec<u8>,
    /// How the keys before ours are fingerprinted (seeded at random, per wait).
    fingerprints: RandomState,
    /// The keys before ours, by fingerprint, with their counts.
    before: HashMap<u64, Before>,
    /// Their counts added up.
    used: u64,
    /// The most `used` may be for our request to fit.
    room: u64,
    tx: Option<tokio::sync::oneshot::Sender<()>>,
}

impl OnEveryDelete for Tally {
    fn deleted(&mut self, _rev: Revision, key: &[u8]) -> bool {
        let done = if key == self.mine.as_slice() {
            true
        } else {
            let fingerprint = self.fingerprints.hash_one(key);
            match self.before.get(&fingerprint) {
                // One key before ours has this fingerprint: most likely this one, so take
                // its count off. (A key after ours with the same fingerprint, 1 in 2^64, only
                // makes the waiter read again early: the read decides.)
                Some(b) if b.keys == 1 => {
                    self.used -= b.count;
                    self.before.remove(&fingerprint);
                    self.used <= self.room
                }
                // Keys before ours share this fingerprint: which one went is not known here,
                // so read again.
                Some(_) => true,
                None => false,
            }
        };
        if done {
            if let Some(tx) = self.tx.take() {
                let _ = tx.send(());
            }
        }
        done
    }

    fn is_closed(&self) -> bool {
        self.tx.as_ref().is_none_or(|tx| tx.is_closed())
    }
}

/// The keys before a waiter's that share one fingerprint (nearly always one key), with
/// their counts added up.
#[derive(Default)]
struct Before {
    count: u64,
    keys: u32,
}

fn encode(count: u32, permits: u32) -> String {
    format!("{count}/{permits}")
}

fn decode(value: &[u8]) -> Option<(u32, u32)> {
    let text = std::str::from_utf8(value).ok()?;
    let (count, permits) = text.split_once('/')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(count) || !digits(permits) {
        return None;
    }
    Some((count.parse().ok()?, permits.parse().ok()?))
}

/// Permits of a [`Semaphore`], held until released. Release them with
/// [`release()`](SemaphorePermit::release).
///
/// # Drop behaviour
///
/// Dropping it releases the permits in a task spawned on the current tokio runtime
/// (compare-and-delete, best effort). Without a runtime, or if that fails, or if the runtime
/// shuts down before the store answers (a permit dropped as `#[tokio::main]` returns), the
/// key stays until the session's lease ends. Call [`release()`](SemaphorePermit::release)
/// (or [`Session::close`]) to release and see the result.
#[must_use = "if unused the permits are released at once"]
pub struct SemaphorePermit {
    name: String,
    count: u32,
    held: Held,
}

impl fmt::Debug for SemaphorePermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemaphorePermit")
            .field("semaphore", &self.name)
            .field("count", &self.count)
            .field("key", &self.key())
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl SemaphorePermit {
    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many permits this holds.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The create revision of our key: our place in the queue. Permits are granted in
    /// this order. It does not fence: other holders hold permits at the same time.
    pub fn create_revision(&self) -> Revision {
        self.held.rev()
    }

    held_accessors!(@shared "permit");

    /// Give the permits back: delete our key if it is still ours (compare-and-delete).
    ///
    /// Returns [`Error::NotHeld`] if they had already been lost.
    ///
    /// A key an operator freed by overwriting it with no lease (`etcdctl put KEY ""`, which
    /// keeps its create revision; another session may hold the permits since) counts as lost:
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
    pub async fn release(self) -> Result<()> {
        self.held.release("release").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Client;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            ..KeyValue::default()
        }
    }

    /// A resumed lease's permit key, adopted by the join, then overwritten with no lease
    /// (an operator's `etcdctl put`: freed, it counts in no queue; another session may take
    /// its permit) just before the acquire's touch (the rewrite of the key that tells a
    /// waiter of an older Baton version behind it): the touch does not bind it to our lease
    /// again (found by review: it compared only the create revision, which the overwrite
    /// keeps, and the permit was granted, the key back in the queue at its old place).
    /// The acquire fails with `NotHeld`; the key keeps no lease.
    #[tokio::test]
    async fn the_touch_does_not_bind_a_freed_key_to_our_lease_again() {
        use crate::store::{Compare, CompareOp, Range, Txn, TxnOp};
        use std::sync::Arc;
        let store = Arc::new(crate::store::slow::SlowWatches::new(
            "mem",
            Duration::ZERO,
            Duration::ZERO,
        ));
        let client = Client::from_arc(store.clone());
        let old = Session::new(&client).await.unwrap();
        let lease = old.lease_id();
        let permit = Semaphore::new(&old, "s", 1)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        let (key, rev) = (permit.key().to_string(), permit.held.rev());
        std::mem::forget(permit);
        old.orphan();
        drop(old);
        let s = Session::builder(&client)
            .with_lease(lease)
            .build()
            .await
            .unwrap();
        let touch = Compare::create_revision(key.as_bytes(), CompareOp::Equal, rev);
        let free = Txn::new().and_then([TxnOp::put(key.as_bytes(), "1/1", 0)]);
        *store.before_txn_comparing.lock().unwrap() = Some((touch, free));
        let r = Semaphore::new(&s, "s", 1).unwrap().acquire().await;
        assert!(
            store.before_txn_comparing.lock().unwrap().is_none(),
            "no touch"
        );
        let r = r.map(|p| (p.is_lost(), p.key().to_string()));
        assert!(matches!(r, Err(Error::NotHeld { .. })), "{r:?}");
        let kvs = client.store().range(Range::key(key.as_bytes())).await;
        for kv in kvs.unwrap().kvs {
            assert_eq!(kv.lease, 0, "bound again: {kv:?}");
        }
    }

    /// A semaphore of one permit on a store with faults to inject: held by one session, and
    /// another session's `acquire()` waiting (spawned) behind it. Sessions of 120 s.
    async fn a_waiter_behind_a_holder() -> (
        std::sync::Arc<crate::store::slow::SlowWatches>,
        SemaphorePermit,
        tokio::task::JoinHandle<Result<SemaphorePermit>>,
    ) {
        let store = std::sync::Arc::new(crate::store::slow::SlowWatches::new(
            "mem",
            Duration::ZERO,
            Duration::ZERO,
        ));
        let client = Client::from_arc(store.clone());
        let session = || {
            Session::builder(&client)
                .with_ttl(Duration::from_secs(120))
                .build()
        };
        let (s1, s2) = (session().await.unwrap(), session().await.unwrap());
        let p1 = Semaphore::new(&s1, "t", 1)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        let sem2 = Semaphore::new(&s2, "t", 1).unwrap();
        let waiter = tokio::spawn(async move { sem2.acquire().await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        (store, p1, waiter)
    }

    /// A waiter's grant survives one failed request at that moment, as a mutex waiter's
    /// does: the touch (the rewrite of our key once the permits are ours) failing with a
    /// retryable error ("request timed out" while etcd elects a leader, a connection reset:
    /// seen on a real etcd behind a proxy that cuts connections) failed `acquire()` after
    /// its whole wait, where `lock()` retries its requests, and the waiter lost its place.
    /// The touch is safe to retry: it compares our create revision and our lease.
    #[tokio::test]
    async fn a_failed_touch_at_the_grant_is_retried() {
        use std::sync::atomic::Ordering;
        let (store, p1, waiter) = a_waiter_behind_a_holder().await;
        // The release only deletes: the next transaction that puts is the waiter's touch.
        store
            .put_lands_after_next_read
            .store(true, Ordering::Relaxed);
        p1.release().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter hung")
            .unwrap();
        assert!(
            !store.put_lands_after_next_read.load(Ordering::Relaxed),
            "no put failed"
        );
        let p2 = got.expect("acquire() failed on one failed request at its grant");
        assert!(!p2.is_lost(), "{:?}", p2.lost_reason());
        p2.release().await.unwrap();
    }

    /// A waiter's grant outlives an outage longer than a join's retries (15 s), as a mutex
    /// waiter's does: its touch at the grant is retried for as long as its session lives.
    /// It was retried for 15 s only: after a 20 s outage `acquire()` failed with
    /// Unavailable after its whole wait, and the waiter lost its place.
    #[tokio::test(start_paused = true)]
    async fn a_touch_at_the_grant_outlives_a_long_outage() {
        let (store, p1, waiter) = a_waiter_behind_a_holder().await;
        // The release only deletes: the next transaction that puts is the waiter's touch.
        *store.outage_at_next_put.lock().unwrap() = Some(Duration::from_secs(20));
        p1.release().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(60), waiter)
            .await
            .expect("the waiter hung")
            .unwrap();
        assert!(
            store.outage_at_next_put.lock().unwrap().is_none(),
            "no outage began"
        );
        let p2 = got.expect("acquire() failed on an outage at its grant");
        assert!(!p2.is_lost(), "{:?}", p2.lost_reason());
        p2.release().await.unwrap();
    }

    /// A waiter whose client's shared watch of the queue ends at once, again and again,
    /// with no error (a proxy that closes streams): it reads and subscribes again with a
    /// backoff (50 ms doubling to 1 s), not in a tight loop of watch creations.
    #[tokio::test]
    async fn a_shared_watch_that_keeps_ending_is_retried_with_a_backoff() {
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let store = Arc::new(crate::store::slow::SlowWatches::new(
            "mem",
            Duration::ZERO,
            Duration::ZERO,
        ));
        let client = Client::from_arc(store.clone());
        let holder = Session::new(&client).await.unwrap();
        let _held = Semaphore::new(&holder, "s", 1)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        *store.end_watch_on.lock().unwrap() = Some((b"s/".to_vec(), false));
        let waiter = Session::new(&client).await.unwrap();
        let sem = Semaphore::new(&waiter, "s", 1).unwrap();
        let before = store.created_from_now.load(Ordering::Relaxed);
        let err = sem
            .acquire_timeout(Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        let opened = store.created_from_now.load(Ordering::Relaxed) - before;
        assert!(opened < 20, "{opened} watches opened in 1 s of waiting");
    }

    /// A semaphore waiter's watch and its wake-up count in its client's stats, as the
    /// docs of `ClientStats` say (found by review: only lock and election waits counted).
    #[tokio::test]
    async fn a_semaphore_wait_counts_in_the_client_stats() {
        use std::sync::Arc;
        let store: Arc<dyn crate::store::Store> = Arc::new(crate::store::mem::MemStore::new());
        let holding = Client::from_arc(store.clone());
        let waiting = Client::from_arc(store);
        let holder = Session::new(&holding).await.unwrap();
        let waiter = Session::new(&waiting).await.unwrap();
        let permit = Semaphore::new(&holder, "stats", 1)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        let before = waiting.stats();
        let sem = Semaphore::new(&waiter, "stats", 1).unwrap();
        let acquiring = tokio::spawn(async move { sem.acquire().await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Still waiting: the watch counted is the wait's (not the new holder's loss watch).
        let waiting_now = waiting.stats();
        assert!(
            waiting_now.watches_opened > before.watches_opened,
            "{before:?} -> {waiting_now:?}"
        );
        permit.release().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), acquiring)
            .await
            .expect("acquire hung")
            .unwrap()
            .unwrap();
        let after = waiting.stats();
        assert!(after.wakeups > before.wakeups, "{before:?} -> {after:?}");
        got.release().await.unwrap();
    }

    #[test]
    fn values() {
        assert_eq!(encode(2, 5), "2/5");
        assert_eq!(decode(b"2/5"), Some((2, 5)));
        for bad in [
            "",
            "2",
            "2/",
            "/5",
            "a/5",
            "2/5/1",
            "-1/5",
            "2 /5",
            "99999999999/5",
        ] {
            assert_eq!(decode(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn fits() {
        let client = Client::memory();
        let session = Session::new(&client).await.unwrap();
        let sem = Semaphore::new(&session, "s", 3).unwrap();
        let (a, b) = (kv("s/a", "2/3"), kv("s/b", "1/3"));
        assert!(sem.fits(1, &[]).unwrap());
        assert!(sem.fits(3, &[]).unwrap());
        assert!(sem.fits(1, std::slice::from_ref(&a)).unwrap());
        assert!(!sem.fits(2, std::slice::from_ref(&a)).unwrap());
        assert!(!sem.fits(1, &[a.clone(), b.clone()]).unwrap());
        for bad in ["1/2", "0/3", "4/3", ""] {
            let err = sem.fits(1, &[kv("s/x", bad)]).unwrap_err();
            assert!(matches!(err, Error::Mismatch { .. }), "{bad:?}: {err}");
            assert!(err.is_invalid_input());
        }
    }

    /// A process that resumes its session (same lease) and asks for more permits than its
    /// earlier incarnation held queues afresh, behind the holders that came since: its old
    /// key's place was earned for the smaller count.
    #[tokio::test]
    async fn a_resumed_key_asking_for_another_count_queues_again() {
        let client = Client::memory();
        let ttl = Duration::from_secs(30);
        let lease = client.store().lease_grant(ttl).await.unwrap().id;
        let resumed = || Session::builder(&client).with_lease(lease).build();
        let earlier = resumed().await.unwrap();
        let other = Session::new(&client).await.unwrap();
        let old = Semaphore::new(&earlier, "s", 3)
            .unwrap()
            .acquire_many(1)
            .await
            .unwrap();
        let theirs = Semaphore::new(&other, "s", 3)
            .unwrap()
            .acquire_many(2)
            .await
            .unwrap();
        let again = resumed().await.unwrap();
        let sem = Semaphore::new(&again, "s", 3).unwrap();
        let waiting = tokio::spawn(async move { sem.acquire_many(3).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "granted 3 permits while another session holds 2 of 3"
        );
        assert!(!theirs.is_lost());
        theirs.release().await.unwrap();
        let mine = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("never granted")
            .unwrap()
            .unwrap();
        assert_eq!(mine.count(), 3);
        drop(old);
        mine.release().await.unwrap();
    }

    /// A resumed key that says another semaphore size is not adopted: its place was earned
    /// in a semaphore of that size, and adopting it (then rewriting its size) would let a
    /// process into a semaphore of 1 while another holds a permit of the same name.
    #[tokio::test]
    async fn a_resumed_key_of_another_size_is_not_adopted() {
        let client = Client::memory();
        let lease = client
            .store()
            .lease_grant(Duration::from_secs(30))
            .await
            .unwrap()
            .id;
        let earlier = Session::builder(&client)
            .with_lease(lease)
            .build()
            .await
            .unwrap();
        let other = Session::new(&client).await.unwrap();
        let old = Semaphore::new(&earlier, "s", 2)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        let theirs = Semaphore::new(&other, "s", 2)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        std::mem::forget(old);
        let again = Session::builder(&client)
            .with_lease(lease)
            .build()
            .await
            .unwrap();
        let got = Semaphore::new(&again, "s", 1)
            .unwrap()
            .acquire_timeout(Duration::from_millis(500))
            .await;
        assert!(
            got.is_err(),
            "granted the only permit while another session holds one"
        );
        let err = got.unwrap_err();
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
        // Our old key is gone, and nobody's size was rewritten.
        let keys = client.store().range(Range::prefix("s/")).await.unwrap().kvs;
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_eq!(keys[0].value, b"1/2");
        assert!(!theirs.is_lost());
        theirs.release().await.unwrap();
    }

    #[tokio::test]
    async fn bad_input() {
        let client = Client::memory();
        let session = Session::new(&client).await.unwrap();
        for (name, permits) in [("s", 0), ("", 1), ("a\0b", 1)] {
            let err = Semaphore::new(&session, name, permits).unwrap_err();
            assert!(err.is_invalid_input(), "{err}");
        }
        let sem = Semaphore::new(&session, "s", 2).unwrap();
        for count in [0, 3] {
            let err = sem.acquire_many(count).await.unwrap_err();
            assert!(err.is_invalid_input(), "{err}");
        }
        assert!(client
            .store()
            .range(Range::prefix("s/"))
            .await
            .unwrap()
            .kvs
            .is_empty());
    }

    /// A holder's key overwritten without a lease after its holder stopped without
    /// releasing: no longer a member, never deleted. The waiter behind it waited for good;
    /// it reads again now and then while it waits, and gets the permit.
    ///
    /// On a store of its own: the process-wide `mem://` store expires leases by the clock
    /// of whichever test's runtime touches it, and this one's paused clock jumps 30 s ahead
    /// (see `mutex::tests::paused_clock_store`).
    #[tokio::test(start_paused = true)]
    async fn a_waiter_behind_a_key_overwritten_without_a_lease_gets_the_permit() {
        let client = Client::memory();
        let holder = Session::new(&client).await.unwrap();
        let waiter = Session::new(&client).await.unwrap();
        let held = Semaphore::new(&holder, "s", 1)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        let sem = Semaphore::new(&waiter, "s", 1).unwrap();
        let waiting = tokio::spawn(async move { sem.acquire().await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        let key = held.key().to_string();
        std::mem::forget(held);
        client.store().put(key.as_bytes(), b"1/1", 0).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(120), waiting)
            .await
            .expect("the waiter waited for good behind a key that is no member")
            .unwrap();
        assert!(got.is_ok(), "{:?}", got.err());
    }

    /// Two keys before the waiter's with one fingerprint (1 in 2^64): when one goes, which
    /// one is not known, so the waiter reads again rather than miss a delete.
    #[test]
    fn a_shared_fingerprint_makes_the_waiter_read_again() {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let fingerprints = RandomState::new();
        let mut before = HashMap::new();
        before.insert(
            fingerprints.hash_one(b"s/a".as_slice()),
            Before { count: 2, keys: 2 },
        );
        before.insert(
            fingerprints.hash_one(b"s/b".as_slice()),
            Before { count: 1, keys: 1 },
        );
        let mut tally = Tally {
            mine: b"s/me".to_vec(),
            fingerprints,
            before,
            used: 3,
            room: 0,
            tx: Some(tx),
        };
        // A key after ours: nothing to take off.
        assert!(!tally.deleted(5, b"s/later"));
        // One key of its own fingerprint: taken off, still no room.
        assert!(!tally.deleted(6, b"s/b"));
        assert_eq!(tally.used, 2);
        assert!(rx.try_recv().is_err());
        // The shared fingerprint: read again.
        assert!(tally.deleted(7, b"s/a"));
        assert!(rx.try_recv().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn fifo_and_weights() {
        let client = Client::memory();
        let s: Vec<Session> = futures::future::join_all((0..4).map(|_| Session::new(&client)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let sem = |i: usize| Semaphore::new(&s[i], "w", 3).unwrap();
        let a = sem(0).acquire_many(2).await.unwrap();
        // A request for 2 must wait; a later request for 1 must not overtake it.
        let big = tokio::spawn({
            let sem = sem(1);
            async move { sem.acquire_many(2).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let err = sem(2).try_acquire().await.unwrap_err();
        assert!(matches!(err, Error::NoPermits { .. }), "{err}");
        let small = tokio::spawn({
            let sem = sem(2);
            async move { sem.acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!big.is_finished() && !small.is_finished());
        assert_eq!(sem(3).available().await.unwrap(), 1);
        a.release().await.unwrap();
        let big = big.await.unwrap().unwrap();
        let small = small.await.unwrap().unwrap();
        assert_eq!((big.count(), small.count()), (2, 1));
        assert!(big.create_revision() < small.create_revision());
        assert_eq!(sem(3).available().await.unwrap(), 0);
        // A mismatched size is refused and leaves nothing behind.
        let err = Semaphore::new(&s[3], "w", 4)
            .unwrap()
            .acquire()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
        big.release().await.unwrap();
        small.release().await.unwrap();
        let left = client.store().range(Range::prefix("w/")).await.unwrap();
        assert!(left.kvs.is_empty(), "{:?}", left.kvs);
    }

    fn bounds() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Semaphore>();
        check::<SemaphorePermit>();
    }

    #[test]
    fn types_are_send_and_sync() {
        bounds();
    }

    /// A permit key freed by an operator (overwritten with no lease) ahead of a waiter: the
    /// waiter hears it from its client's shared watch and gets its permit at once, as a
    /// mutex waiter does (found by the review of entry 42: it waited for its 30 s re-read).
    #[tokio::test]
    async fn a_waiter_hears_a_freed_key_ahead() {
        let client = Client::memory();
        let (s1, s2) = (
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
        );
        let p1 = Semaphore::new(&s1, "freed-ahead", 1)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        let sem2 = Semaphore::new(&s2, "freed-ahead", 1).unwrap();
        let w = tokio::spawn(async move { sem2.acquire().await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        client
            .store()
            .put(p1.key().as_bytes(), b"1/1", 0)
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("the waiter was not told the key ahead was freed (5 s)")
            .unwrap();
        assert!(got.is_ok(), "{:?}", got.err());
        drop(p1);
    }

    /// A waiter whose own key is freed (overwritten with no lease) ends with `NotHeld` at
    /// once, not at its 30 s re-read (from the review of entry 42's second part).
    #[tokio::test]
    async fn a_waiter_whose_key_is_freed_is_not_held() {
        let client = Client::memory();
        let (s1, s2) = (
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
        );
        let p1 = Semaphore::new(&s1, "freed-own", 1)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        let sem2 = Semaphore::new(&s2, "freed-own", 1).unwrap();
        let k2 = sem2.key().to_string();
        let w = tokio::spawn(async move { sem2.acquire().await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.store().put(k2.as_bytes(), b"1/1", 0).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), w)
            .await
            .expect("own key freed: not told within 2 s")
            .unwrap();
        assert!(
            matches!(got, Err(Error::NotHeld { .. })),
            "{:?}",
            got.map(|p| p.key().to_string())
        );
        drop(p1);
    }

    /// A key ahead freed, then deleted (its holder's release): its permits come off once.
    /// With another holder still there, a waiter for 2 of 2 permits is not granted until
    /// that one releases too (from the review of entry 42's second part).
    #[tokio::test]
    async fn a_key_freed_then_deleted_counts_once() {
        let client = Client::memory();
        let (s1, s2, s3) = (
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
            Session::new(&client).await.unwrap(),
        );
        let p1 = Semaphore::new(&s1, "freed-twice", 2)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        let p2 = Semaphore::new(&s2, "freed-twice", 2)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        let sem3 = Semaphore::new(&s3, "freed-twice", 2).unwrap();
        let w = tokio::spawn(async move { sem3.acquire_many(2).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let k1 = p1.key().to_string();
        client.store().put(k1.as_bytes(), b"1/2", 0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Removes the freed key (or says NotHeld, the key removed in the background).
        let _ = p1.release().await;
        let _ = client
            .store()
            .delete(crate::store::KeyRange::key(k1.as_bytes()))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !w.is_finished(),
            "granted 2 of 2 while another permit is held: {:?}",
            w.await
        );
        p2.release().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(3), w)
            .await
            .expect("not granted after the last release")
            .unwrap();
        assert!(got.is_ok(), "{:?}", got.err());
    }

    /// A holder of the only permit of `name`, and a waiter behind it, each on a session of
    /// `client`, with a third session whose lease an operator binds a key to; the holder's
    /// key and the waiter's, and the waiter's task.
    async fn rebound(
        client: &Client,
        name: &str,
    ) -> (
        SemaphorePermit,
        String,
        Session,
        tokio::task::JoinHandle<Result<SemaphorePermit>>,
    ) {
        let (s1, s2, other) = (
            Session::new(client).await.unwrap(),
            Session::new(client).await.unwrap(),
            Session::new(client).await.unwrap(),
        );
        let p1 = Semaphore::new(&s1, name, 1)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        let sem2 = Semaphore::new(&s2, name, 1).unwrap();
        let k2 = sem2.key().to_string();
        let w = tokio::spawn(async move { sem2.acquire().await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        (p1, k2, other, w)
    }

    /// A waiter whose own key is bound to another lease (`etcdctl put --lease=OTHER KEY`)
    /// is no longer in the queue as itself: `NotHeld` at once. Its read checked the create
    /// revision only, so it waited on, told only when `touch` failed at its grant (found by
    /// review of entry 44).
    #[tokio::test]
    async fn a_waiter_whose_key_is_bound_to_another_lease_is_not_held() {
        let client = Client::memory();
        let (p1, k2, other, w) = rebound(&client, "rebound-own").await;
        client
            .store()
            .put(k2.as_bytes(), b"1/1", other.lease_id())
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), w)
            .await
            .expect("own key bound to another lease: not told within 2 s")
            .unwrap();
        assert!(
            matches!(got, Err(Error::NotHeld { .. })),
            "{:?}",
            got.map(|p| p.key().to_string())
        );
        p1.release().await.unwrap();
    }

    /// A key ahead bound to another lease is still a member (that lease's): its wake-up
    /// grants nobody.
    #[tokio::test]
    async fn a_key_ahead_bound_to_another_lease_grants_nobody() {
        let client = Client::memory();
        let (p1, _, other, w) = rebound(&client, "rebound-ahead").await;
        client
            .store()
            .put(p1.key().as_bytes(), b"1/1", other.lease_id())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !w.is_finished(),
            "granted beside a key bound to another lease"
        );
        w.abort();
    }

    /// Stress: weighted acquires with random timeouts (cancelled mid-wait) and
    /// permits dropped or released; at no time do the holders hold more than the permits,
    /// and no key is left at the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stress_never_more_than_the_permits() {
        use std::sync::atomic::{AtomicI64, Ordering};
        use std::sync::Arc;
        const PERMITS: u32 = 3;
        let client = Client::memory();
        let used = Arc::new(AtomicI64::new(0));
        let grants = Arc::new(AtomicI64::new(0));
        let mut tasks = Vec::new();
        for i in 0..8u64 {
            let client = client.clone();
            let (used, grants) = (used.clone(), grants.clone());
            tasks.push(tokio::spawn(async move {
                let s = Session::new(&client).await.unwrap();
                let sem = Semaphore::new(&s, "st", PERMITS).unwrap();
                for round in 0..60u64 {
                    let x = (i * 7919 + round * 104729) % 97;
                    let count = 1 + (x % PERMITS as u64) as u32;
                    let timeout = Duration::from_millis(1 + x % 15);
                    match sem.acquire_many_timeout(count, timeout).await {
                        Ok(p) => {
                            let now = used.fetch_add(count as i64, Ordering::SeqCst) + count as i64;
                            assert!(now <= PERMITS as i64, "{now} permits held at once");
                            grants.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(x % 3)).await;
                            assert!(!p.is_lost(), "lost: {:?}", p.lost_reason());
                            used.fetch_sub(count as i64, Ordering::SeqCst);
                            if x % 2 == 0 {
                                drop(p);
                            } else {
                                p.release().await.unwrap();
                            }
                        }
                        Err(Error::Timeout { .. }) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
                s.close().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(grants.load(Ordering::SeqCst) > 0);
        let left = client.store().range(Range::prefix("st/")).await.unwrap();
        assert!(left.kvs.is_empty(), "{:?}", left.kvs);
    }
}
