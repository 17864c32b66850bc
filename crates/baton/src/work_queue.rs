//! A distributed FIFO work queue (Go's `recipe.Queue`): many producers, many consumers,
//! each item taken by exactly one consumer.
//!
//! The claiming machinery here ([`Items`]) also serves
//! [`PriorityQueue`](crate::PriorityQueue).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::MaybeDone;
use tracing::Instrument;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::names::{is_item, validate_name, validate_value};
use crate::store::{
    Compare, CompareOp, KeyValue, Range, RangeResponse, SortOrder, SortTarget, Store, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};
use crate::watching::{Until, Wait, Waiter};

/// How many items one read fetches as candidates to claim: their keys and revisions only,
/// not their values (which may be up to [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN) each). The
/// item taken comes back with its claim.
const BATCH: i64 = 16;

/// The taking methods of a queue over [`Items`] ([`Queue`], [`PriorityQueue`]). The type
/// must have the fields `name: String` and `items: Items`; `$which` names the item taken.
///
/// [`PriorityQueue`]: crate::PriorityQueue
macro_rules! take_methods {
    ($which:literal) => {
        #[doc = concat!("Take ", $which, ", waiting for one if the queue is empty.")]
        ///
        /// Failed reads and broken watches are retried with backoff; bound the wait with
        /// `dequeue_timeout`.
        ///
        /// # Cancel safety
        ///
        /// Cancel safe: dropping this future (under `tokio::time::timeout`, in `select!`)
        /// loses no item, and gives none twice. A claim (a compare-and-delete) sent is
        /// applied by the server whatever this future does, so it runs in a task of its own
        /// and finishes; if it wins after the future was dropped, its item is handed back:
        /// the next dequeue of this handle or a clone (which first waits for such claims, up
        /// to two request timeouts, as long as a claim whose first send timed out may take)
        /// returns it first if it comes within 200 ms, else it is
        /// put back in the store, by a task, retried until it is there. A priority queue's
        /// item is put back under its own key and keeps its place among the items still
        /// there; if its level emptied meanwhile, items enqueued at the level since then
        /// (numbered from 0 again) come before it, and if they took its key it goes under
        /// the first free key after theirs; a FIFO queue's goes to the back of the queue (the
        /// order is by create revision). `len` counts it meanwhile. It is lost only if the
        /// runtime shuts down (the process exits) before then; the handle still works on
        /// another runtime. The put-back also writes a marker under `__NAME/` (see the
        /// security docs' roles): if the store refuses it (a role that does not cover that
        /// prefix, an item near etcd's request limit), the item goes back without it;
        /// refused again, it stays held for this handle's dequeues (one waiting takes it at
        /// once), an error is logged, and it is sent again 1 s later, then twice as long
        /// after each refusal, up to a minute (even if the handle is dropped); it is lost
        /// if the process exits before it is taken or back. A claim that fails in flight
        /// once its future is gone is resent as below; if its outcome stays unknown, the
        /// item may have been taken, and a warning is logged.
        ///
        /// A claim's first send is waited for up to the request timeout, as any request. If
        /// it fails in flight (no answer: the server may have applied it), it is sent again
        /// until answered, for about one request timeout in all (the first send included;
        /// one more if the first send itself took the whole request timeout).
        /// A resend that finds the item gone reads the claim's marker (a key
        /// `__NAME/claimed/<random>.marker` the claim writes beside its delete, under a
        /// lease of the handle's, deleted afterwards): if our first send took the item, its
        /// value is read as it was just before, and returned; if someone else did, the
        /// next item is claimed. Only if this cannot be told within that time (or the
        /// item's old value was compacted away in between, or the role does not cover
        /// `__NAME/`: then claims go without a marker) this fails with
        /// [`Error::Store`](crate::Error::Store), saying the item may have been taken.
        pub async fn dequeue(&self) -> $crate::Result<Vec<u8>> {
            match self
                .items
                .take_or_wait(
                    &self.name,
                    std::future::pending::<std::convert::Infallible>(),
                )
                .await?
            {
                Ok(value) => Ok(value),
                Err(never) => match never {},
            }
        }

        /// `dequeue()`, giving up with [`Error::Timeout`](crate::Error::Timeout) if no
        /// item was claimed within `timeout`.
        ///
        /// The timeout bounds reading and waiting. The answer to a claim sent before it
        /// passes is waited for (up to the request timeout, as any request), and the item
        /// returned if the claim won, even if that is after `timeout`: an item claimed is
        /// never lost to the timeout when the store answers the claim. A claim that failed in
        /// flight is sent again (as by `dequeue()`), but not once `timeout` has passed: this
        /// then fails at once with [`Error::Store`](crate::Error::Store), saying the item may
        /// have been taken. So this returns by `timeout` or, if a claim is in flight then,
        /// within about one request timeout of that claim's first send (two if that send
        /// timed out).
        ///
        /// # Cancel safety
        ///
        /// As `dequeue()`: cancel safe. Letting the timeout pass loses an item only if the
        /// claim failed in flight (and then says so).
        pub async fn dequeue_timeout(
            &self,
            timeout: std::time::Duration,
        ) -> $crate::Result<Vec<u8>> {
            self.items
                .take_or_wait(&self.name, tokio::time::sleep(timeout))
                .await?
                .map_err(|()| $crate::Error::Timeout {
                    operation: "dequeue",
                    after: timeout,
                })
        }

        /// `dequeue()`, giving up with `Ok(None)` when `stop` completes first (a shutdown
        /// signal, say).
        ///
        /// `stop` is polled while reading and waiting, not while a claim's first send is in
        /// flight: its answer is waited for (up to the request timeout, as any request), and
        /// its item returned if the claim won, even if `stop` is ready by then: an item
        /// claimed is never lost to `stop` when the store answers the claim. A claim that
        /// failed in flight is sent again (as by `dequeue()`), and `stop` is polled between
        /// its resends: when it completes, this fails at once with
        /// [`Error::Store`](crate::Error::Store), saying the item may have been taken.
        ///
        /// # Cancel safety
        ///
        /// As `dequeue()`: cancel safe. Letting `stop` complete loses an item only if the
        /// claim failed in flight (and then says so).
        pub async fn dequeue_until(
            &self,
            stop: impl std::future::Future<Output = ()>,
        ) -> $crate::Result<Option<Vec<u8>>> {
            Ok(self.items.take_or_wait(&self.name, stop).await?.ok())
        }

        #[doc = concat!("Take ", $which, ", or return `None` at once if the queue is empty.")]
        ///
        /// # Cancel safety
        ///
        /// As `dequeue()`.
        pub async fn try_dequeue(&self) -> $crate::Result<Option<Vec<u8>>> {
            self.items.try_take(&self.name).await
        }

        /// The number of items now, counting those a dropped dequeue of this handle claimed
        /// and that are on their way back (see `dequeue()`); it first waits for such claims
        /// still in flight (each is settled within about one request timeout, two if its
        /// first send timed out; waited for up to two).
        ///
        /// # Cancel safety
        ///
        /// Cancel safe.
        pub async fn len(&self) -> $crate::Result<usize> {
            self.items.count().await
        }

        /// Done with this handle: revoke the lease under which its claims put their
        /// markers (see `dequeue()`; one per handle and its clones, 60 s), deleting the
        /// markers left. Dropping the handle and its clones does it too, in the background,
        /// which a process that exits right away does not wait for. A lease that a claim
        /// still being settled holds (of this handle or a clone) is left to it: revoked once
        /// it is. The queue and its items are not touched, and clones of this handle still
        /// work (their next dequeue asks for a new lease).
        ///
        /// # Errors
        ///
        /// The store's error if the revoke fails: the lease then expires by itself.
        ///
        /// # Cancel safety
        ///
        /// If dropped, the lease is revoked in the background (or expires).
        pub async fn close(self) -> $crate::Result<()> {
            self.items.close().await
        }

        /// True if the queue has no item now.
        ///
        /// # Cancel safety
        ///
        /// Cancel safe.
        pub async fn is_empty(&self) -> $crate::Result<bool> {
            Ok(self.len().await? == 0)
        }
    };
}
pub(crate) use take_methods;

/// A distributed FIFO queue: [`enqueue`](Queue::enqueue) from any process,
/// [`dequeue`](Queue::dequeue) from any other. Each item is given to exactly one consumer,
/// in the order the items were enqueued.
///
/// # Exactly one consumer, in order
///
/// A consumer reads the oldest items' keys (not their values) and claims the first one
/// with a transaction that reads and deletes it only if its mod revision is still the one
/// read: a dequeue downloads the item it takes, and no other. Of several consumers racing
/// for an item, one wins; the others try the next item read, then read again. An item is
/// never given twice, and a consumer never skips an older item that is still there, so
/// items are taken in enqueue order (by create revision): one producer's items come out in
/// the order it enqueued them. (One exception, as in Go: an item overwritten in place since
/// it was read, by something other than a queue, fails the claim, and the next item is
/// taken first; the overwritten one stays, and is taken later.)
///
/// # Items do not vanish
///
/// Items are written without a lease: they stay when their producer exits, until a consumer
/// takes them. Taking is the only delete. An item belongs to its consumer from the moment
/// `dequeue` returns it, so an item is processed at most once: if the consumer dies before
/// it is done, the item is gone with it (re-enqueue it if it must be retried). If the
/// connection fails while a claim is in flight, the claim is sent again, and a marker the
/// claim writes (`__NAME/claimed/<random>.marker`, under a lease, deleted once the claim's
/// outcome is known) tells whether the first send took the item: then its value is read
/// as it was just before (etcd keeps it until a compaction) and returned. Only if that
/// cannot be told in time (about one request timeout, two if the first send timed out),
/// `dequeue` returns an error rather
/// than an item it may not own, and the item may be lost. An `enqueue` whose answer is
/// lost may or may not have happened.
///
/// A claim sent is applied by the server whatever the consumer does next, so
/// [`dequeue_timeout`](Queue::dequeue_timeout) and [`dequeue_until`](Queue::dequeue_until)
/// wait for the answer to a claim in flight when their deadline passes (up to the request
/// timeout), and return its item. A claim that fails in flight is sent again until it is
/// answered (and its marker read), for about one request timeout in all (two if the first
/// send timed out), and by these two
/// only until their deadline: then they fail saying the item may have been taken. Dropping a `dequeue`
/// future during a claim (under `tokio::time::timeout`, say) loses nothing: the claim runs
/// on in a task, and an item it wins goes to the handle's next dequeue, or back into the
/// queue (at the back: a FIFO queue orders by create revision); see
/// [`dequeue`](Queue::dequeue). Putting an item back writes, with it, a marker key
/// `__NAME/returned/<lease>.marker` under a lease of its own (deleted once the item is
/// back), so that a put-back whose answer is lost is not sent twice. Each claim writes a
/// marker too, `__NAME/claimed/<random>.marker` (see above; one more request every 30 s
/// per handle for its lease, none per dequeue): a role for a queue wants `__NAME/` as well
/// as `NAME/` (without it, claims go without a marker, and an item whose claim loses its
/// answer may be lost, as before).
///
/// # Waiting
///
/// An idle consumer watches the queue from the revision after its read: every enqueue wakes
/// every idle consumer, and one of them gets the item.
///
/// # Key layout
///
/// `NAME/<nanoseconds since the Unix epoch>` (decimal, zero-padded to 19 digits, which
/// every time from 2001 to 2262 has; the next free number if two producers pick the same),
/// the item as the value, no lease: the layout of Go's
/// `recipe.NewQueue(client, NAME)`, so Go and Baton producers and consumers share one
/// queue. Keys of nested names (`NAME/sub/…`) are not items of this queue.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> baton::Result<()> {
/// let client = baton::Client::connect("mem://").await?;
/// let jobs = baton::Queue::new(&client, "jobs/thumbnails")?;
/// jobs.enqueue("img-1.png").await?;
/// jobs.enqueue("img-2.png").await?;
/// assert_eq!(jobs.len().await?, 2);
/// assert_eq!(jobs.dequeue().await?, b"img-1.png");
/// assert_eq!(jobs.try_dequeue().await?.as_deref(), Some(&b"img-2.png"[..]));
/// assert_eq!(jobs.try_dequeue().await?, None);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Queue {
    client: Client,
    name: String,
    items: Items,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue").field("name", &self.name).finish()
    }
}

impl Queue {
    /// The queue named `name`.
    ///
    /// Fails with [`Error::InvalidArgument`] if the name is empty, longer than 1 KiB, or
    /// contains a NUL byte.
    pub fn new(client: &Client, name: &str) -> Result<Queue> {
        validate_name(name)?;
        let prefix = format!("{name}/");
        Ok(Queue {
            client: client.clone(),
            name: name.to_string(),
            items: Items {
                store: client.store().clone(),
                hub: client.hub().clone(),
                what: "queue",
                prefix,
                order: SortTarget::CreateRevision,
                is_item,
                hand_back: Default::default(),
                marks: Default::default(),
            },
        })
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Add an item at the tail.
    ///
    /// Fails with [`Error::InvalidArgument`] before any network call if the value is over
    /// [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN).
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the item may or may not have been enqueued.
    pub async fn enqueue(&self, value: impl Into<Vec<u8>>) -> Result<()> {
        self.enqueue_at(value.into(), now_nanos()).await
    }

    /// Enqueue `value` with the first free id from `id` (nanoseconds since the epoch).
    async fn enqueue_at(&self, value: Vec<u8>, mut id: u128) -> Result<()> {
        validate_value(&value)?;
        let store = self.client.store();
        async {
            loop {
                let key = item_key(&self.items.prefix, id);
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        key.as_bytes(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then([TxnOp::put(key.as_bytes(), value.clone(), 0)]);
                if store.txn(txn).await?.succeeded {
                    return Ok(());
                }
                // Another producer took this number: the next one.
                id += 1;
            }
        }
        .instrument(tracing::debug_span!("enqueue", queue = %self.name))
        .await
    }

    take_methods!("the item at the head");
}

/// `PREFIX<id>`, the id zero-padded to 19 digits: as many as Go's `time.Now().UnixNano()`
/// has from 2001 to 2262, so our keys have the shape of Go's and sort among them by time,
/// and an id from a clock near 1970 still has the [`ITEM_DIGITS`](crate::names::ITEM_DIGITS)
/// an item needs.
fn item_key(prefix: &str, id: u128) -> String {
    format!("{prefix}{id:019}")
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The items under a prefix, taken one at a time by compare-and-delete, in `order`.
#[derive(Clone)]
pub(crate) struct Items {
    pub(crate) store: Arc<dyn Store>,
    /// The client's hub, whose counters ([`ClientStats`](crate::ClientStats)) count the
    /// waits for items.
    pub(crate) hub: Arc<crate::hub::Hub>,
    /// What kind of queue, for spans.
    pub(crate) what: &'static str,
    /// `NAME/`.
    pub(crate) prefix: String,
    /// The order items are taken in (ascending).
    pub(crate) order: SortTarget,
    /// True if a key under the prefix is an item (not a nested name's key, nor a lock's
    /// or another leased key).
    pub(crate) is_item: fn(&[u8], &KeyValue) -> bool,
    /// The items won by claims whose dequeue was dropped, shared by the handle's clones.
    pub(crate) hand_back: Arc<HandBack>,
    /// The markers of the handle's claims, shared by its clones (see
    /// [`claim_here`](Items::claim_here)).
    pub(crate) marks: Arc<ClaimMarks>,
}

/// A caller's `stop`, kept once it has completed: polled again, it is ready at once, without
/// polling the future it wraps (an `async` block panics if polled after it completed). A
/// claim may see it complete ([`Items::claim`]) and [`unless`] report it afterwards.
type Stop<F> = MaybeDone<F>;

/// `fut`, unless `stop` completes first (or has completed): then `Err(what stop gave)`.
/// `stop` is polled first, so one that has completed wins over a `fut` that is ready too.
async fn unless<F: Future, T>(
    mut stop: Pin<&mut Stop<F>>,
    fut: impl Future<Output = T>,
) -> std::result::Result<T, F::Output> {
    let mut fut = std::pin::pin!(fut);
    // `Gone`: what it gave was reported already; it stops nothing more.
    if !matches!(&*stop, MaybeDone::Gone) {
        tokio::select! {
            biased;
            () = stop.as_mut() => {}
            r = fut.as_mut() => return Ok(r),
        }
        if let Some(s) = stop.as_mut().take_output() {
            return Err(s);
        }
    }
    Ok(fut.await)
}

/// What a claim of one item found.
enum Claim {
    /// We took it: its value, read by the claim itself.
    Won(Vec<u8>),
    /// Someone else did (or it changed since it was read).
    Lost,
    /// It failed in flight: the item may be ours or not, and is gone or may be.
    Unknown,
}

/// What one attempt to take an item found.
enum Taken<S> {
    Item(Vec<u8>),
    /// No item; the read's revision.
    Empty(crate::store::Revision),
    /// A claim failed in flight: the item may be ours or not. Reported, never retried.
    Unknown(Error),
    /// `stop` completed before a claim was sent.
    Stopped(S),
}

impl Items {
    fn is_item(&self, kv: &KeyValue) -> bool {
        (self.is_item)(self.prefix.as_bytes(), kv)
    }

    /// The first `limit` keys under the prefix (0: all), in order, without their values:
    /// [`is_item`](Items::is_item) needs only the key and lease, and a claim reads the
    /// value of the one item it takes.
    fn read(&self, limit: i64) -> Range {
        Range::prefix(self.prefix.as_bytes())
            .sort_by(self.order, SortOrder::Ascending)
            .with_limit(limit)
            .keys_only()
    }

    pub(crate) async fn try_take(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let span = tracing::debug_span!("try_dequeue", kind = self.what, queue = %name);
        let never = std::pin::pin!(futures::future::maybe_done(std::future::pending::<
            std::convert::Infallible,
        >()));
        match self.take_once(never).instrument(span).await? {
            Taken::Item(value) => Ok(Some(value)),
            Taken::Empty(_) => Ok(None),
            Taken::Unknown(e) => Err(e),
            Taken::Stopped(never) => match never {},
        }
    }

    /// Take an item, waiting for one, until `stop` completes: then `Ok(Err(what stop
    /// gave))`. `stop` is polled while reading and waiting, not while a claim's first send
    /// is in flight, so an item claimed is returned when the store answers the claim. A
    /// claim that fails in flight is sent again until `stop` completes or about one request
    /// timeout has passed; then this fails saying the item may have been taken.
    pub(crate) async fn take_or_wait<S>(
        &self,
        name: &str,
        stop: impl Future<Output = S>,
    ) -> Result<std::result::Result<Vec<u8>, S>> {
        let span = tracing::debug_span!("dequeue", kind = self.what, queue = %name);
        let mut stop = std::pin::pin!(futures::future::maybe_done(stop));
        async {
            let mut waiter = Waiter::new(&self.store).counting(&self.hub);
            loop {
                let failed = match self.take_once(stop.as_mut()).await {
                    Ok(Taken::Item(value)) => return Ok(Ok(value)),
                    Ok(Taken::Unknown(e)) => return Err(e),
                    Ok(Taken::Stopped(s)) => return Ok(Err(s)),
                    Ok(Taken::Empty(read_at)) => {
                        let wait = Wait::prefix(self.prefix.as_bytes(), read_at, Until::Put);
                        // Or until an item is held for this handle with no task to put it
                        // back (the store refused it): it is ours to take.
                        let wait = async {
                            tokio::select! {
                                r = waiter.wait(wait) => r,
                                () = self.held_for_us() => Ok(None),
                            }
                        };
                        match unless(stop.as_mut(), wait).await {
                            Ok(r) => r,
                            Err(s) => return Ok(Err(s)),
                        }
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = failed {
                    match unless(stop.as_mut(), waiter.retry(e)).await {
                        Ok(r) => r?,
                        Err(s) => return Ok(Err(s)),
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Read the first items' keys and claim the first one still there, which gives its
    /// value; `Stopped` if `stop` completes first. `stop` is polled during reads and before
    /// each claim. While a claim's first send is in flight it is watched but not obeyed:
    /// the claim's answer is awaited, and `stop` is reported only if the claim lost (a
    /// `Stop` keeps its output, so it is never polled again once complete); if that send
    /// fails in flight, between its resends (see [`claim`](Items::claim)), where it gives
    /// `Unknown`.
    async fn take_once<F: Future>(&self, mut stop: Pin<&mut Stop<F>>) -> Result<Taken<F::Output>> {
        macro_rules! or_stop {
            ($fut:expr) => {
                match unless(stop.as_mut(), $fut).await {
                    Ok(r) => r,
                    Err(s) => return Ok(Taken::Stopped(s)),
                }
            };
        }
        // An item claimed for a dequeue of this handle that was dropped comes first.
        if let Some(value) = or_stop!(self.handed_back()) {
            return Ok(Taken::Item(value));
        }
        loop {
            // The lease of the claims' markers (granted once in a while, see
            // `claim_here`), asked for beside the read rather than before the claim, which
            // would add a round trip to the first dequeue of a handle (`baton queue pop`'s
            // only one); `stop` ends a grant that hangs, as a read.
            let (resp, _granted) = or_stop!(futures::future::join(
                self.store.range(self.read(BATCH)),
                self.mark_lease(false)
            ));
            let mut resp = resp?;
            if resp.more && !resp.kvs.iter().any(|kv| self.is_item(kv)) {
                // A nested name's keys fill the batch: read everything.
                resp = or_stop!(self.store.range(self.read(0)))?;
            }
            let RangeResponse {
                header_revision,
                kvs,
                ..
            } = resp;
            let items: Vec<KeyValue> = kvs.into_iter().filter(|kv| self.is_item(kv)).collect();
            if items.is_empty() {
                return Ok(Taken::Empty(header_revision));
            }
            for item in items {
                // The lease again, for each claim: it is reused only while young enough
                // for the marker to outlive the claim (see `mark_lease`), and the read,
                // then the claims that lost before this one, may have taken long (a slow
                // store). No request unless it has aged.
                let lease = or_stop!(self.mark_lease(false));
                // The last moment to give up with nothing taken: once sent, a claim is
                // applied whatever we do, so its answer is awaited.
                or_stop!(std::future::ready(()));
                tracing::debug!(key = %item.key_str(), "claiming");
                match self.claim(&item, lease, stop.as_mut()).await? {
                    Claim::Won(value) => {
                        tracing::debug!(key = %item.key_str(), "dequeued");
                        return Ok(Taken::Item(value));
                    }
                    // In create order, an item added since our read comes after every
                    // candidate, so the next one is still the first. In key order (a
                    // priority queue) a new item may come first: read again, as Go does.
                    Claim::Lost if self.order == SortTarget::Key => break,
                    Claim::Lost => {}
                    Claim::Unknown => {
                        return Ok(Taken::Unknown(Error::Store(format!(
                            "the claim of {:?} failed in flight; it may have been taken \
                             without being returned",
                            item.key_str()
                        ))))
                    }
                }
            }
            // Every candidate was taken by someone else: read again.
        }
    }

    /// [`claim_here`](Items::claim_here), run in a task of its own, so that it finishes even
    /// if this future is dropped: a claim sent is applied by the server whatever we do, and
    /// the item it wins must not be lost with the future. If the caller is gone when the
    /// claim wins, the item is handed back (see [`HandBack`]). `stop` is passed on to the
    /// task (polled between resends); once the caller is gone, nothing stops the task but
    /// the claim's own deadline.
    async fn claim<F: Future>(
        &self,
        item: &KeyValue,
        lease: Option<Arc<MarkLease>>,
        mut stop: Pin<&mut Stop<F>>,
    ) -> Result<Claim> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to run a task on (nor, then, to drop this future under a timer).
            return self.claim_here(item, lease, stop).await;
        };
        let (answer, answered) = tokio::sync::oneshot::channel::<Result<Claim>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let items = self.clone();
        let kv = item.clone();
        let task_runtime = runtime.clone();
        // Made here, not in the task: a task dropped before it first runs drops it too.
        let mut answer = Unanswered {
            answer: Some(answer),
            hand_back: self.hand_back.clone(),
        };
        runtime.spawn(
            async move {
                // A caller gone drops `stop_tx`: that stops nothing.
                let stop = std::pin::pin!(futures::future::maybe_done(async move {
                    if stop_rx.await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }));
                let claimed = items.claim_here(&kv, lease, stop).await;
                let Some(answer) = answer.answer.take() else {
                    return;
                };
                if let Err(claimed) = answer.send(claimed) {
                    items
                        .hand_back
                        .orphaned(&items, &kv, claimed, true, &task_runtime);
                }
            }
            .in_current_span(),
        );
        let mut waiting = Answer {
            answered: Some(answered),
            items: self,
            key: item.key.clone(),
        };
        let mut stop_tx = Some(stop_tx);
        let Some(answered) = waiting.answered.as_mut() else {
            return Err(Error::Store("a claim's answer was taken twice".into()));
        };
        let claimed = loop {
            // A `stop` that has given its output (never so here) cannot be polled again.
            if stop_tx.is_none() || matches!(&*stop, MaybeDone::Gone) {
                break answered.await;
            }
            tokio::select! {
                biased;
                claimed = &mut *answered => break claimed,
                () = stop.as_mut() => {
                    // Completed (kept: `take_once` reports it if the claim lost), polled
                    // no more here: tell the claim to send no more once it failed.
                    if let Some(tx) = stop_tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        };
        waiting.answered = None;
        claimed.unwrap_or_else(|_| {
            Err(Error::Store(format!(
                "the claim of {:?} ended without an answer (its runtime is shutting down); \
                 it may have been taken without being returned",
                item.key_str()
            )))
        })
    }

    /// Delete `item` if it is still the one read: `Won` with its value if we took it,
    /// `Lost` if someone else did, `Unknown` if the claim failed in flight and whether the
    /// item is ours cannot be told (see below).
    ///
    /// The claim reads the item's value in the same transaction, before deleting it: the
    /// candidates were read without values, and this read costs no extra request. It runs
    /// only if the compare held, so it reads exactly the item compared.
    ///
    /// A claim that fails in flight may still be applied later (etcd applies a request it
    /// received even if its caller gave up): reading the item and finding it unchanged
    /// proves nothing. The same compare-and-delete is sent again until it is answered: it
    /// matches only the item as read, so "succeeded" means ours, and "failed" means the
    /// item is gone, by our first request or someone else's. To tell which, the claim also
    /// puts a marker key of its own, `__NAME/claimed/<random 128 bits in hex>.marker`
    /// (the item's key as its value; outside the queue's items, where the put-back markers
    /// are), and the failed resend reads it: there, our first send took the item, whose
    /// value is then read as it was just before (at the revision before the marker's), as
    /// etcd keeps it until a compaction; absent (and its lease still alive), someone
    /// else's did: `Lost`. Only a claim whose outcome the deadline below cuts off, or
    /// whose item's old value was compacted away, is `Unknown` (a warning says so).
    ///
    /// Cost: no extra request on a claim answered at once; its transaction writes the
    /// marker beside the delete (one revision), and deletes the markers of the handle's
    /// earlier claims whose outcome is known (so each dequeue writes 3 keys where it wrote
    /// one). The markers are under `lease`, the handle's, granted beside the read before
    /// its first claim (by [`take_once`](Items::take_once): no extra round trip, and
    /// `stop` ends a grant that hangs; a handle that only finds its queue empty grants one
    /// all the same; looked at again before each claim, so that a claim late in a slow
    /// dequeue does not go under a lease too old to outlive it) and
    /// again every `ttl - 3 × request timeout` (`ttl` = 60 s, or 5 request timeouts if
    /// longer: a request every 30 s by default), never kept alive, and revoked by a task
    /// (one request) once no longer used: replaced by a newer one, or the handle and its
    /// clones dropped, and no claim under it being settled (see [`MarkLease`]); at once by
    /// the queue's `close()`. A process that exits before then leaves its markers for at
    /// most a minute. The last markers of a handle that stops
    /// claiming are deleted by a task after 1 s of quiet (one request). After a lost
    /// answer: the resend as before, then one read (the item's old value, or the lease's
    /// time to live).
    ///
    /// A role that does not cover `__NAME/` (the store refuses the claim with its marker
    /// for permission) claims without one from then on, for the handle and its clones: a
    /// failed resend is then `Unknown`, as a bare claim cannot tell. Under etcd's NOSPACE
    /// alarm (which refuses puts and lease grants, not deletes) claims go without a marker
    /// too, while it lasts (a failed grant is not asked again for a second).
    ///
    /// The first send is awaited, whatever `stop` does (within the store's request timeout,
    /// as any request). Once it has failed in flight, `stop` is polled between resends (and
    /// reads of the outcome; the first resend is sent even if `stop` has completed, as with
    /// the marker it tells whether the first send took the item, which giving up before it
    /// would lose), and the claim gives up (`Unknown`) when it completes or when
    /// about one request timeout has passed since the first send: the store's request
    /// timeout ([`DEFAULT_REQUEST_TIMEOUT`](crate::DEFAULT_REQUEST_TIMEOUT) for a store
    /// without one). A first send that failed with the store's own timeout (etcd may have
    /// applied it, its answer not come within the request timeout) has used all of that:
    /// the resends and the marker's read then get one more timeout (the store's, or the
    /// one above if shorter) from its failure, as they alone tell whether it took the item.
    /// A resend or read in flight is cut off at that deadline, not by `stop`.
    async fn claim_here<F: Future>(
        &self,
        item: &KeyValue,
        lease: Option<Arc<MarkLease>>,
        mut stop: Pin<&mut Stop<F>>,
    ) -> Result<Claim> {
        let bound = self
            .store
            .request_timeout()
            .unwrap_or(crate::client::DEFAULT_REQUEST_TIMEOUT);
        // Claim with a marker unless the store refused one; a lease gone (the process was
        // paused past it) is granted again once. Held until the claim is settled: it is not
        // revoked before (see `MarkLease`).
        let mut lease = lease;
        let mut regranted = false;
        let mut refused_marker = None;
        let (txn, mark, deleting, deadline) = loop {
            let mark = lease
                .as_ref()
                .map(|lease| (claim_marker_key(&self.prefix), lease.id));
            let deleting = if mark.is_some() {
                self.marks.to_delete()
            } else {
                Vec::new()
            };
            let txn = claim_txn(item, mark.as_ref(), &deleting);
            let started = tokio::time::Instant::now();
            let deadline = started + bound;
            match self.store.txn(txn.clone()).await {
                Ok(resp) => {
                    if let Some(e) = refused_marker.take() {
                        // Claimed bare after the marker was refused: the role does not
                        // cover `__NAME/`. Said once per handle.
                        tracing::warn!(
                            error = %e,
                            "the store refuses a queue claim's marker (does the role cover the \
                             marker's prefix `__NAME/`?); this handle claims without one, so \
                             an item whose claim loses its answer may be lost"
                        );
                        self.marks.lock().bare = true;
                    }
                    // A claim that lost wrote no marker.
                    let written = mark.filter(|_| resp.succeeded).map(|(m, _)| m);
                    self.settle_marks(written, &deleting);
                    return Ok(claim_won(item, resp));
                }
                Err(Error::LeaseNotFound(_)) if mark.is_some() && !regranted => {
                    // Not applied: the marker's lease expired (a process paused past it).
                    regranted = true;
                    lease = self.mark_lease(true).await;
                }
                Err(e) if mark.is_some() && crate::ownership::refused_for_space(&e) => {
                    // Not applied: etcd's NOSPACE alarm refuses puts (the marker's), not
                    // deletes, and draining a queue is a way out of it. This claim goes
                    // without a marker; the next tries one again.
                    tracing::debug!(error = %e, "a claim's marker was refused for space; claiming without one");
                    lease = None;
                }
                Err(e @ Error::PermissionDenied(_)) if mark.is_some() => {
                    // Not applied: try without the marker.
                    lease = None;
                    refused_marker = Some(e);
                }
                // Refused (access, bad input): not applied.
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => {
                    let mut deadline = deadline;
                    if let Error::Timeout { after, .. } = &e {
                        // The store's request timeout: the first send has had it all, and
                        // may have been applied. One more request timeout (the store's, or
                        // ours if shorter) for a resend and the marker's read, which tell.
                        deadline = tokio::time::Instant::now() + (*after).min(bound);
                    }
                    tracing::debug!(error = %e, "a claim failed in flight");
                    break (txn, mark, deleting, deadline);
                }
            }
        };
        // Whatever the outcome, the marker is not needed past this claim.
        // `written`: false once the marker is known never to be written (no send of ours
        // took the item, nor can one now).
        let settle = |answered: bool, written: bool| {
            let deleted: &[Vec<u8>] = if answered { &deleting } else { &[] };
            let marker = mark.as_ref().filter(|_| written).map(|(m, _)| m.clone());
            self.settle_marks(marker, deleted);
        };
        let mut backoff = crate::watching::Backoff::new();
        let mut resent = false;
        let failed = loop {
            match unless(
                stop.as_mut(),
                tokio::time::timeout_at(deadline, backoff.sleep()),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    tracing::debug!("a claim failed in flight: its time is up");
                    settle(false, true);
                    return Ok(Claim::Unknown);
                }
                // Stopped before any resend: one is sent all the same (within the
                // deadline), as it (with the marker) tells whether the first send took
                // the item, which is lost if we give up now.
                Err(_) if !resent => {}
                Err(_) => {
                    tracing::debug!("a claim failed in flight: stopped, sending it no more");
                    settle(false, true);
                    return Ok(Claim::Unknown);
                }
            }
            resent = true;
            match tokio::time::timeout_at(deadline, self.store.txn(txn.clone())).await {
                // Ours: the first send was not applied, this one was.
                Ok(Ok(resp)) if resp.succeeded => {
                    settle(true, true);
                    return Ok(claim_won(item, resp));
                }
                // Failed: the item is gone, by our first send or someone else's.
                Ok(Ok(resp)) => break resp,
                Ok(Err(e)) if e.is_retryable() => {
                    tracing::debug!(error = %e, "a claim failed in flight again");
                }
                Ok(Err(_)) | Err(_) => {
                    settle(false, true);
                    return Ok(Claim::Unknown);
                }
            }
        };
        let Some((marker, lease)) = mark.clone() else {
            settle(true, true);
            // A bare claim cannot tell.
            return Ok(Claim::Unknown);
        };
        // The else branch read our marker: there, the first send took the item, in the
        // revision that wrote the marker.
        let found = failed
            .responses
            .first()
            .and_then(|r| r.as_get())
            .and_then(|get| get.kvs.first())
            .map(|kv| kv.mod_revision);
        // Absent: no send of ours took the item, unless the lease is gone (below); absent
        // for good, as a send still in flight fails its compare too.
        settle(true, found.is_some());
        let key = item.key_str();
        let Some(claimed_at) = found else {
            // Absent: someone else took it, unless the marker's lease is gone (the process
            // was paused past it), which would have deleted it.
            let alive = retried(deadline, stop.as_mut(), || {
                self.store.lease_time_to_live(lease)
            })
            .await;
            return Ok(match alive {
                Ok(Some(_)) => {
                    tracing::debug!(key = %key, "a claim failed in flight; its item was taken by another");
                    Claim::Lost
                }
                Ok(None) => {
                    tracing::warn!(key = %key, marker = %String::from_utf8_lossy(&marker), "a claim failed in flight and its marker's lease is gone: whether it took the item cannot be told");
                    Claim::Unknown
                }
                Err(why) => {
                    tracing::warn!(key = %key, %why, "a claim failed in flight: cannot tell whether it took the item");
                    Claim::Unknown
                }
            });
        };
        // Ours: its value as it was just before our claim deleted it.
        let read = Range::key(item.key.clone()).at_revision(claimed_at - 1);
        let value = retried(deadline, stop.as_mut(), || self.store.range(read.clone())).await;
        match value.map(|resp| resp.kvs.into_iter().next()) {
            Ok(Some(kv)) => {
                tracing::debug!(key = %key, "a claim failed in flight; its first send took the item");
                Ok(Claim::Won(kv.value))
            }
            Ok(None) => {
                tracing::warn!(key = %key, "a claim failed in flight and took the item, but its value was not found");
                Ok(Claim::Unknown)
            }
            Err(why) => {
                tracing::warn!(key = %key, %why, "a claim failed in flight and took the item, but cannot read its value (compacted?)");
                Ok(Claim::Unknown)
            }
        }
    }

    /// The lease for the markers of this handle's claims ([`claim_here`](Items::claim_here)),
    /// granted if there is none young enough (or `again`: the last one was not found);
    /// `None` to claim without a marker (the store refused one, or no lease was granted).
    /// The lease replaced, if any, is revoked once no claim holds it (see [`MarkLease`]).
    async fn mark_lease(&self, again: bool) -> Option<Arc<MarkLease>> {
        let bound = self
            .store
            .request_timeout()
            .unwrap_or(crate::client::DEFAULT_REQUEST_TIMEOUT);
        let ttl = CLAIM_MARK_TTL.max(bound * 5);
        // A marker outlives its claim's deadline (two request timeouts after its first
        // send, if that timed out) with time to spare.
        let reuse = ttl - bound * 3;
        {
            let state = self.marks.lock();
            if state.bare {
                return None;
            }
            if let Some((lease, at)) = &state.lease {
                if !again && at.elapsed() < reuse {
                    return Some(lease.clone());
                }
            }
            if state
                .no_grant_until
                .is_some_and(|until| tokio::time::Instant::now() < until)
            {
                // A grant failed just now (etcd's NOSPACE alarm refuses them): not one
                // more round trip per claim.
                return None;
            }
        }
        // Granted in a task where there is a runtime: a grant whose caller is dropped
        // meanwhile (a dequeue under a timeout) still gives the handle its lease, which
        // the handle's drop revokes, rather than leaving it on the server for its TTL.
        let granting = Granting::new(&self.marks);
        let items = self.clone();
        let grant = async move {
            let lease = items.grant_mark_lease(ttl).await;
            drop(granting);
            lease
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime.spawn(grant.in_current_span()).await.unwrap_or(None),
            Err(_) => grant.await,
        }
    }

    /// Grant a lease of `ttl` for the markers of this handle's claims, and make it the one
    /// they are put under ([`mark_lease`](Items::mark_lease)).
    async fn grant_mark_lease(self, ttl: std::time::Duration) -> Option<Arc<MarkLease>> {
        let asked = tokio::time::Instant::now();
        match self.store.lease_grant(ttl).await {
            Ok(grant) => {
                let lease = Arc::new(MarkLease {
                    id: grant.id,
                    store: self.store.clone(),
                    revoked: false,
                });
                let mut state = self.marks.lock();
                let replaced = state.lease.replace((lease.clone(), asked));
                state.no_grant_until = None;
                drop(state);
                drop(replaced);
                Some(lease)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot grant a lease for claim markers; claiming without one");
                self.marks.lock().no_grant_until =
                    Some(tokio::time::Instant::now() + CLAIM_MARKS_FLUSH_AFTER);
                None
            }
        }
    }

    /// A claim is over: `marker` (if it had one) is to be deleted, by the handle's next
    /// claim or, after a quiet second, by a task; `deleted`, the markers its answered
    /// transaction deleted, are gone.
    fn settle_marks(&self, marker: Option<Vec<u8>>, deleted: &[Vec<u8>]) {
        let mut state = self.marks.lock();
        state.done.retain(|m| !deleted.contains(m));
        state.done.extend(marker);
        state.last_claim = Some(tokio::time::Instant::now());
        if state.done.is_empty() || state.flushing {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Left to the next claim, or to the lease.
            return;
        };
        state.flushing = true;
        drop(state);
        runtime.spawn(self.clone().flush_marks().in_current_span());
    }

    /// Delete the markers of claims whose outcome is known once the handle has claimed
    /// nothing for [`CLAIM_MARKS_FLUSH_AFTER`] (a claim deletes them meanwhile). One task at
    /// a time (`flushing`). A failure leaves them to their lease.
    async fn flush_marks(self) {
        /// Dropped with its runtime, the task is no longer flushing.
        struct Flushing(Option<Arc<ClaimMarks>>);
        impl Drop for Flushing {
            fn drop(&mut self) {
                if let Some(marks) = self.0.take() {
                    marks.lock().flushing = false;
                }
            }
        }
        let mut flushing = Flushing(Some(self.marks.clone()));
        loop {
            let quiet = self
                .marks
                .lock()
                .last_claim
                .map(|at| at + CLAIM_MARKS_FLUSH_AFTER);
            if let Some(quiet) = quiet {
                if tokio::time::Instant::now() < quiet {
                    tokio::time::sleep_until(quiet).await;
                    continue;
                }
            }
            let done: Vec<Vec<u8>> = {
                let mut state = self.marks.lock();
                if state.done.is_empty() {
                    // Under the lock: a claim settled later starts a new task.
                    state.flushing = false;
                    flushing.0 = None;
                    return;
                }
                state.to_delete()
            };
            let txn = Txn::new().and_then(done.iter().map(|m| TxnOp::delete(m.clone())));
            if let Err(e) = self.store.txn(txn).await {
                tracing::debug!(error = %e, "cannot delete claim markers; their lease will");
            }
            self.marks.lock().done.retain(|m| !done.contains(m));
        }
    }

    /// Revoke the lease of this handle's claim markers now (see the queues' `close`),
    /// unless a claim being settled holds it: that claim's end revokes it.
    pub(crate) async fn close(&self) -> Result<()> {
        // A grant in flight (for a dequeue stopped or dropped meanwhile) gives the handle a
        // lease when it ends: waited for (bounded by the store's request timeout), so that
        // its lease is revoked here too.
        loop {
            let mut granted = std::pin::pin!(self.marks.granted.notified());
            granted.as_mut().enable();
            if self.marks.lock().granting == 0 {
                break;
            }
            granted.await;
        }
        let Some((lease, _)) = self.marks.lock().lease.take() else {
            return Ok(());
        };
        let Ok(lease) = Arc::try_unwrap(lease) else {
            return Ok(());
        };
        lease.revoke().await?;
        // No claim holds a lease of ours that is not revoked, or soon (when it is
        // settled): the markers of settled claims are gone with them.
        self.marks.lock().done.clear();
        Ok(())
    }

    pub(crate) async fn count(&self) -> Result<usize> {
        // Items claimed for a dequeue of this handle that was dropped are still queued: they
        // go to the handle's next dequeue, or back into the store.
        self.settled().await;
        // `read` asks for keys only: a count needs no value, and items may be 1 MiB each.
        let resp = self.store.range(self.read(0)).await?;
        let handed_back = {
            let state = self.hand_back.lock();
            state.held.len() + state.sending
        };
        Ok(resp.kvs.iter().filter(|kv| self.is_item(kv)).count() + handed_back)
    }
}

/// The least TTL of the lease under which a handle's claim markers are put (see
/// [`Items::claim_here`]); five request timeouts if that is longer. The lease is never kept
/// alive: a new one is granted when the marker of a claim sent under the old one could
/// expire before the claim's deadline. It is revoked before its TTL when it is no longer
/// used (see [`MarkLease`]).
const CLAIM_MARK_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// The markers of earlier claims one claim (or the task that deletes them) deletes at most.
const CLAIM_MARKS_PER_TXN: usize = 16;

/// How long a handle claims nothing before a task deletes its last claims' markers.
const CLAIM_MARKS_FLUSH_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The markers of a queue handle's claims ([`Items::claim_here`]), shared by its clones.
#[derive(Default)]
pub(crate) struct ClaimMarks {
    state: std::sync::Mutex<MarksState>,
    /// Told when a lease grant ends (`MarksState::granting`).
    granted: tokio::sync::Notify,
}

/// A lease grant of [`Items::mark_lease`] in flight, counted in `MarksState::granting`
/// until it ends or its task is dropped.
struct Granting(Arc<ClaimMarks>);

impl Granting {
    fn new(marks: &Arc<ClaimMarks>) -> Granting {
        marks.lock().granting += 1;
        Granting(marks.clone())
    }
}

impl Drop for Granting {
    fn drop(&mut self) {
        {
            let mut state = self.0.lock();
            state.granting = state.granting.saturating_sub(1);
        }
        self.0.granted.notify_waiters();
    }
}

#[derive(Default)]
struct MarksState {
    /// The lease the markers are put under, and when it was asked for.
    lease: Option<(Arc<MarkLease>, tokio::time::Instant)>,
    /// The store refused a claim's marker (a role that does not cover `__NAME/`): the
    /// handle claims without one.
    bare: bool,
    /// Markers of claims whose outcome is known: deleted by the next claim, or by a task.
    done: Vec<Vec<u8>>,
    /// When the last claim ended.
    last_claim: Option<tokio::time::Instant>,
    /// A lease grant failed: none is asked for before this.
    no_grant_until: Option<tokio::time::Instant>,
    /// True while a task waits to delete `done`.
    flushing: bool,
    /// Lease grants in flight (their caller may be gone): `close` waits for them, or the
    /// lease they give would be left on the server for its TTL.
    granting: usize,
}

/// The lease of a handle's claim markers ([`Items::mark_lease`]), held by the handle's
/// [`ClaimMarks`] while new claims use it, and by each claim that used it until that claim
/// is settled (its marker may tell its outcome until then). Dropped by the last of them (the
/// handle and its clones dropped, and their tasks done; or a newer lease granted, and the
/// claims under this one settled), it is revoked by a task, which deletes the markers still
/// under it; without a runtime, or if the revoke fails, it expires with its TTL. So a
/// short-lived handle leaves no lease behind for a minute (one per `baton queue pop`).
pub(crate) struct MarkLease {
    id: crate::store::LeaseId,
    store: Arc<dyn Store>,
    /// True once revoked (by [`revoke`](MarkLease::revoke)).
    revoked: bool,
}

impl MarkLease {
    /// Revoke the lease now; if this fails (or is dropped), the drop tries again.
    async fn revoke(mut self) -> Result<()> {
        match self.store.lease_revoke(self.id).await {
            Ok(()) | Err(Error::LeaseNotFound(_)) => {
                self.revoked = true;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for MarkLease {
    fn drop(&mut self) {
        if self.revoked {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, id) = (self.store.clone(), self.id);
        runtime.spawn(
            async move {
                if let Err(e) = store.lease_revoke(id).await {
                    tracing::debug!(lease = %format_args!("{id:x}"), error = %e, "cannot revoke the claim markers' lease; it will expire");
                }
            }
            .in_current_span(),
        );
    }
}

impl ClaimMarks {
    fn lock(&self) -> std::sync::MutexGuard<'_, MarksState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The markers the next claim deletes.
    fn to_delete(&self) -> Vec<Vec<u8>> {
        self.lock().to_delete()
    }
}

impl MarksState {
    /// The markers one transaction deletes: the first [`CLAIM_MARKS_PER_TXN`] of `done`.
    fn to_delete(&self) -> Vec<Vec<u8>> {
        self.done
            .iter()
            .take(CLAIM_MARKS_PER_TXN)
            .cloned()
            .collect()
    }
}

/// The marker of one claim of the queue `NAME/`: `__NAME/claimed/<128 random bits in
/// hex>.marker`, outside the queue's items, and not shaped as a lock's key (which ends in
/// its lease in hex) nor as an item (digits).
fn claim_marker_key(prefix: &str) -> Vec<u8> {
    format!("__{prefix}claimed/{:032x}.marker", rand::random::<u128>()).into_bytes()
}

/// The claim of `item`: if its mod revision is still the one read, read it and delete it,
/// and put `mark` (a marker key and its lease), if any; else read the marker. Both delete
/// the markers of earlier claims, `done`.
fn claim_txn(
    item: &KeyValue,
    mark: Option<&(Vec<u8>, crate::store::LeaseId)>,
    done: &[Vec<u8>],
) -> Txn {
    let deletes = || done.iter().map(|m| TxnOp::delete(m.clone()));
    let mut then = vec![
        // Before the delete: a read in a transaction sees its earlier writes.
        TxnOp::get(Range::key(item.key.clone())),
        TxnOp::delete(item.key.clone()),
    ];
    let mut otherwise = Vec::new();
    if let Some((marker, lease)) = mark {
        then.push(TxnOp::put(marker.clone(), item.key.clone(), *lease));
        otherwise.push(TxnOp::get(Range::key(marker.clone()).keys_only()));
    }
    then.extend(deletes());
    otherwise.extend(deletes());
    Txn::new()
        .when([Compare::mod_revision(
            item.key.clone(),
            CompareOp::Equal,
            item.mod_revision,
        )])
        .and_then(then)
        .or_else(otherwise)
}

/// What an answered claim of `item` says: `Won` with the value it read, or `Lost`.
fn claim_won(item: &KeyValue, resp: TxnResponse) -> Claim {
    if !resp.succeeded {
        return Claim::Lost;
    }
    let value = resp
        .responses
        .into_iter()
        .next()
        .and_then(|r| match r {
            TxnOpResponse::Get(get) => get.kvs.into_iter().next(),
            _ => None,
        })
        .map(|kv| kv.value);
    match value {
        Some(value) => Claim::Won(value),
        // The compare held, so the key was there: a store that does not say so took the
        // item without giving it.
        None => {
            tracing::warn!(key = %item.key_str(), "a claim won but read no item");
            Claim::Unknown
        }
    }
}

/// `read`, sent again after a failure in flight (with backoff, `stop` polled between
/// sends) until `deadline`, where a read in flight is cut off: `Err` saying why it gave up
/// (refused, compacted, the deadline, `stop`).
async fn retried<F: Future, T, R: Future<Output = Result<T>>>(
    deadline: tokio::time::Instant,
    mut stop: Pin<&mut Stop<F>>,
    read: impl Fn() -> R,
) -> std::result::Result<T, String> {
    let mut backoff = crate::watching::Backoff::new();
    loop {
        match tokio::time::timeout_at(deadline, read()).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) if e.is_retryable() => {
                tracing::debug!(error = %e, "a read of a claim's outcome failed; will retry");
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("its time is up".into()),
        }
        match unless(
            stop.as_mut(),
            tokio::time::timeout_at(deadline, backoff.sleep()),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("its time is up".into()),
            Err(_) => return Err("stopped".into()),
        }
    }
}

/// How long the marker of a put-back lives (see [`Items::put_back`]): its lease is kept
/// alive while the put-back's outcome is unknown, so this bounds only a put-back the store
/// stops answering for that long.
const MARKER_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// An item whose put-back the store refused (a role that does not cover the queue) is sent
/// again this long after, then twice as long after each refusal, up to
/// [`REFUSED_RETRY_MAX`]; it is held for the handle's dequeues meanwhile.
const REFUSED_RETRY_MIN: std::time::Duration = std::time::Duration::from_secs(1);
const REFUSED_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// How long an item claimed for a dequeue that was dropped is held for the handle's next
/// dequeue before it is put back in the store.
const HOLD_FOR: std::time::Duration = std::time::Duration::from_millis(200);

/// The items won by claims whose dequeue future was dropped while they were in flight (a
/// `tokio::time::timeout` or a `select!` around `dequeue()`), shared by a queue handle and
/// its clones.
///
/// A claim runs in a task of its own ([`Items::claim`]), so it finishes when its caller is
/// gone. If it wins then, its item is held here: a dequeue of the handle that is waiting
/// for such claims (every dequeue first waits for those in flight) takes it; otherwise it is
/// put back in the store ([`Items::put_back`]) at once, by a task, retried until it is.
#[derive(Default)]
pub(crate) struct HandBack {
    state: std::sync::Mutex<HandState>,
    /// Told on every change of `state`.
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct HandState {
    /// Claims in flight whose caller is gone.
    orphans: usize,
    /// Dequeues waiting for those claims.
    waiting: usize,
    /// Items won by those claims, given to no dequeue and not yet put back.
    held: std::collections::VecDeque<Held>,
    /// Items being put back now.
    sending: usize,
    /// True while a task puts the held items back.
    returning: bool,
    /// True while the item being sent is resent after a send that failed (the store is
    /// unreachable, or out of space, past a lost answer): `len` does not wait for it to
    /// end, which may take as long as the outage (it counts the item in `sending`).
    resending: bool,
}

/// An item taken from the store for nobody.
struct Held {
    key: Vec<u8>,
    value: Vec<u8>,
}

impl HandBack {
    fn lock(&self) -> std::sync::MutexGuard<'_, HandState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the item being sent as resent after a failure (see `HandState::resending`).
    fn resending(&self) {
        self.lock().resending = true;
        self.changed.notify_waiters();
    }

    /// The answer of a claim whose caller is gone; `counted` if it was counted in
    /// `orphans`. An item won is held, and put back unless a dequeue waits for it.
    fn orphaned(
        &self,
        items: &Items,
        kv: &KeyValue,
        claimed: Result<Claim>,
        counted: bool,
        runtime: &tokio::runtime::Handle,
    ) {
        let mut state = self.lock();
        if counted {
            state.orphans = state.orphans.saturating_sub(1);
        }
        match claimed {
            Ok(Claim::Won(value)) => {
                tracing::debug!(key = %kv.key_str(), "claimed for a dequeue that is gone: handing it back");
                state.held.push_back(Held {
                    key: kv.key.clone(),
                    value,
                });
            }
            Ok(Claim::Unknown) => tracing::warn!(
                key = %kv.key_str(),
                "the claim of an item failed in flight after its dequeue was dropped; the item \
                 may have been taken without being returned"
            ),
            Ok(Claim::Lost) | Err(_) => {}
        }
        let start = state.waiting == 0 && !state.held.is_empty() && !state.returning;
        if start {
            state.returning = true;
        }
        drop(state);
        self.changed.notify_waiters();
        if start {
            runtime.spawn(items.clone().return_held());
        }
    }
}

/// The answer awaited by a claim's caller. Dropped before it came, it leaves the claim to
/// [`HandBack`].
struct Answer<'a> {
    answered: Option<tokio::sync::oneshot::Receiver<Result<Claim>>>,
    items: &'a Items,
    key: Vec<u8>,
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        let Some(mut answered) = self.answered.take() else {
            return;
        };
        let hand = &self.items.hand_back;
        let mut state = hand.lock();
        let claimed = match answered.try_recv() {
            Ok(claimed) => claimed,
            // The task ended without answering (its runtime shut down).
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => return,
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                // Under the lock: the task sees the channel closed only after this, and
                // then takes the state's lock to count the claim out.
                answered.close();
                match answered.try_recv() {
                    Ok(claimed) => claimed,
                    Err(_) => {
                        state.orphans += 1;
                        return;
                    }
                }
            }
        };
        drop(state);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            if matches!(claimed, Ok(Claim::Won(_))) {
                tracing::error!(
                    key = %String::from_utf8_lossy(&self.key),
                    "an item claimed for a dequeue dropped outside a runtime is lost"
                );
            }
            return;
        };
        let kv = KeyValue {
            key: self.key.clone(),
            ..Default::default()
        };
        hand.orphaned(self.items, &kv, claimed, false, &runtime);
    }
}

/// The sending end of a claim's answer, held by the claim's task until it answers. A task
/// dropped before then (its runtime shut down) drops this: if the caller was gone by then,
/// the claim was counted in `orphans` ([`Answer`]'s drop), and is counted out here, or the
/// handle's dequeues would wait for it forever.
struct Unanswered {
    answer: Option<tokio::sync::oneshot::Sender<Result<Claim>>>,
    hand_back: Arc<HandBack>,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some(answer) = self.answer.take() else {
            return;
        };
        let mut state = self.hand_back.lock();
        // Closed: the caller's `Answer` was dropped, and counted the claim, under this lock;
        // still open, it sees the channel closed (the sender dropped under this lock) and
        // counts nothing.
        if answer.is_closed() {
            state.orphans = state.orphans.saturating_sub(1);
        }
        drop(answer);
        drop(state);
        self.hand_back.changed.notify_waiters();
    }
}

/// The task that puts held items back ([`Items::return_held`]): when it ends, or is dropped,
/// no task returns them any more, and an item it was sending is no longer being sent (if
/// the task was dropped, the item is lost with its runtime).
struct Returning {
    hand: Arc<HandBack>,
    /// True while an item is being put back (counted in `sending`).
    sending: bool,
}

impl Returning {
    /// Says whether an item is being put back (counted in `sending`).
    fn set_sending(&mut self, sending: bool) {
        self.sending = sending;
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        let mut state = self.hand.lock();
        state.returning = false;
        state.resending = false;
        if self.sending {
            state.sending = state.sending.saturating_sub(1);
        }
        drop(state);
        self.hand.changed.notify_waiters();
    }
}

/// A dequeue waiting for the claims in flight whose caller is gone; if it leaves with items
/// held, they are put back.
struct Waiting<'a>(&'a Items);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let hand = &self.0.hand_back;
        let mut state = hand.lock();
        state.waiting = state.waiting.saturating_sub(1);
        let mut start = None;
        if state.waiting == 0 && !state.held.is_empty() && !state.returning {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                state.returning = true;
                start = Some(runtime);
            }
        }
        // Spawned outside the lock: on a runtime shutting down the task is dropped at once,
        // and its drop (`Returning`) takes the lock.
        drop(state);
        if let Some(runtime) = start {
            runtime.spawn(self.0.clone().return_held());
        }
    }
}

impl Items {
    /// How long [`handed_back`](Items::handed_back) and [`settled`](Items::settled) wait
    /// for the claims in flight whose dequeue is gone: two request timeouts, the most a
    /// claim takes (its first send may take one and time out, its resend and the marker's
    /// read one more; see [`claim_here`](Items::claim_here)).
    fn orphans_bound(&self) -> std::time::Duration {
        self.store
            .request_timeout()
            .unwrap_or(crate::client::DEFAULT_REQUEST_TIMEOUT)
            .saturating_mul(2)
    }

    /// An item won for a dequeue that is gone, if any; waits first for the claims in flight
    /// whose dequeue is gone (each ends within about one request timeout, two if its first
    /// send timed out), so that a dequeue retried at once after a timeout gets the item its
    /// predecessor claimed, first. The wait is bounded by
    /// [`orphans_bound`](Items::orphans_bound): then `None`, and the dequeue reads the store.
    async fn handed_back(&self) -> Option<Vec<u8>> {
        tokio::time::timeout(self.orphans_bound(), self.handed_back_unbounded())
            .await
            .unwrap_or(None)
    }

    async fn handed_back_unbounded(&self) -> Option<Vec<u8>> {
        let hand = &self.hand_back;
        let mut waiting = None;
        loop {
            let mut notified = std::pin::pin!(hand.changed.notified());
            notified.as_mut().enable();
            {
                let mut state = hand.lock();
                if let Some(held) = state.held.pop_front() {
                    drop(state);
                    tracing::debug!(key = %String::from_utf8_lossy(&held.key), "dequeued (handed back)");
                    return Some(held.value);
                }
                if state.orphans == 0 {
                    return None;
                }
                if waiting.is_none() {
                    state.waiting += 1;
                    waiting = Some(Waiting(self));
                }
            }
            notified.await;
        }
    }

    /// Wait until an item is held for this handle's dequeues with no task putting it back:
    /// one the store refused to take back (see [`put_back`](Items::put_back)).
    async fn held_for_us(&self) {
        let hand = &self.hand_back;
        loop {
            let mut notified = std::pin::pin!(hand.changed.notified());
            notified.as_mut().enable();
            {
                let state = hand.lock();
                // Whatever the task does: a held item is in no send (one being put back is
                // not held), and the task may be resending another for long (NOSPACE).
                if !state.held.is_empty() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Wait (up to [`orphans_bound`](Items::orphans_bound)) until no claim for a dequeue of
    /// this handle that is gone is in flight, and no item is being put back.
    async fn settled(&self) {
        let hand = &self.hand_back;
        let _ = tokio::time::timeout(self.orphans_bound(), async {
            loop {
                let mut notified = std::pin::pin!(hand.changed.notified());
                notified.as_mut().enable();
                {
                    let state = hand.lock();
                    if state.orphans == 0 && (state.sending == 0 || state.resending) {
                        return;
                    }
                }
                notified.await;
            }
        })
        .await;
    }

    /// Put the held items back in the store, one at a time, until none is left or a
    /// dequeue waits for them. Run by one task at a time (`returning`).
    ///
    /// The task's state is reset if it is dropped (its runtime shut down) before it ends,
    /// even before it first runs: else no later item would be put back, and `len` would
    /// wait for an item being sent forever.
    fn return_held(self) -> impl Future<Output = ()> + Send + 'static {
        let mut task = Returning {
            hand: self.hand_back.clone(),
            sending: false,
        };
        async move {
            let hand = task.hand.clone();
            // A dequeue retried at once (the loop around a `timeout`) takes them first.
            tokio::time::sleep(HOLD_FOR).await;
            let mut backoff = crate::watching::Backoff::new();
            // How long a refused item waits to be sent again: doubled after each refusal.
            let mut refused_wait = REFUSED_RETRY_MIN;
            loop {
                let held = {
                    let mut state = hand.lock();
                    let next = if state.waiting == 0 {
                        state.held.pop_front()
                    } else {
                        None
                    };
                    match next {
                        Some(held) => {
                            state.sending += 1;
                            task.set_sending(true);
                            held
                        }
                        None => {
                            // `task`'s drop: no longer returning.
                            drop(state);
                            return;
                        }
                    }
                };
                let left = self.put_back(held).await;
                let (failed, refused) = {
                    let mut state = hand.lock();
                    task.set_sending(false);
                    state.sending -= 1;
                    state.resending = false;
                    match left {
                        PutBack::Done => (false, false),
                        PutBack::Unsent(held) => {
                            // Nothing was sent: the item is only ours, the dequeues' to
                            // take while this task waits to try again.
                            state.held.push_front(held);
                            (true, false)
                        }
                        PutBack::Refused(held) => {
                            state.held.push_front(held);
                            (true, true)
                        }
                    }
                };
                hand.changed.notify_waiters();
                if refused {
                    // It stays held, for this handle's dequeues, and is sent again later
                    // (a role given back): this task keeps it if the handle is dropped.
                    tokio::time::sleep(refused_wait).await;
                    refused_wait = (refused_wait * 2).min(REFUSED_RETRY_MAX);
                    continue;
                }
                if failed {
                    backoff.sleep().await;
                } else {
                    backoff.reset();
                    refused_wait = REFUSED_RETRY_MIN;
                }
            }
        }
    }

    /// Put an item taken for nobody back in the store: under its own key if that is free
    /// (a priority queue orders by key, so the item keeps its place; a FIFO queue orders by
    /// create revision, so it goes to the back), else under the next free key (the key's
    /// number plus one, and so on: a priority queue's item taken meanwhile by a newer one
    /// goes after it). [`PutBack::Unsent`] with the item if nothing was sent (the item is
    /// still only ours: a dequeue may take it); once sent, resent until it is known to be
    /// back.
    ///
    /// A priority queue's put-back also rewrites the level's bookkeeping key
    /// (`__NAME/PPPPP`), as an enqueue does, so that a producer that read the level before
    /// it (Go's guards its put on that key alone) reads again rather than overwrite it.
    ///
    /// A put-back whose answer is lost may have landed, and its item been taken since: a
    /// plain resend could queue it twice. So each writes, in the same transaction, a marker
    /// key (`__NAME/returned/<lease>.marker`, under a lease of its own, which is kept alive while
    /// the outcome is unknown, and revoked at the end), and is sent only while the marker
    /// does not exist: if it does, an earlier send landed.
    ///
    /// A first send the store refuses (a role that does not cover the marker's `__NAME/`,
    /// an item too large for etcd's request limit once the marker is added) was not
    /// applied: the item is put back with no marker ([`put_back_bare`](Items::put_back_bare)).
    /// Refused again, it is given back ([`PutBack::Refused`]), to stay held for the handle's
    /// dequeues, and an error is logged. It is not resent: it would be refused again, and
    /// an item being resent is in no one's reach. (After a lost answer, the bare put-back
    /// first looks for the item under its key, and a look-up that fails otherwise than by
    /// a refusal is tried again: given to the dequeues, an item already back would be
    /// delivered twice.)
    async fn put_back(&self, held: Held) -> PutBack {
        let key_str = String::from_utf8_lossy(&held.key).into_owned();
        let mut lease = match self.store.lease_grant(MARKER_TTL).await {
            Ok(grant) => grant.id,
            Err(e) => {
                tracing::warn!(key = %key_str, error = %e, "cannot put back an item taken for a dequeue that is gone; will retry");
                return PutBack::Unsent(held);
            }
        };
        let mut key = held.key.clone();
        let mut backoff = crate::watching::Backoff::new();
        // Whether a send's outcome is unknown: then a refusal of a later one does not say
        // the item is not back.
        let mut unknown = false;
        loop {
            let marker = marker_key(&self.prefix, lease);
            let mut puts = vec![
                TxnOp::put(key.clone(), held.value.clone(), 0),
                TxnOp::put(marker.clone(), "", lease),
            ];
            if let Some(bookkeeping) = self.bookkeeping(&key) {
                // As an enqueue does: a Go producer that read the level before this put
                // guards its own only on this key, and must read again.
                puts.push(TxnOp::put(bookkeeping, "", 0));
            }
            let txn = Txn::new()
                .when([
                    Compare::create_revision(marker.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                ])
                .and_then(puts)
                .or_else([TxnOp::get(Range::key(marker.clone()).keys_only())]);
            match self.store.txn(txn).await {
                Ok(resp) if resp.succeeded => break,
                Ok(resp) => {
                    let landed = resp
                        .responses
                        .first()
                        .and_then(|r| r.as_get())
                        .is_some_and(|get| !get.kvs.is_empty());
                    if landed {
                        break;
                    }
                    // A new item has the key: the next one.
                    match next_key(&key) {
                        Some(next) => key = next,
                        None => {
                            tracing::error!(key = %key_str, "cannot put back an item: its key is taken and has no next");
                            let _ = self.store.lease_revoke(lease).await;
                            return PutBack::Unsent(held);
                        }
                    }
                }
                Err(e) if !unknown && crate::ownership::refused_for_space(&e) => {
                    // etcd's space quota is exceeded (its NOSPACE alarm): this send was not
                    // applied, nor will any put be until space is freed, and no earlier
                    // send was sent. After a send whose answer was lost, it is resent as
                    // any failure: a read of the marker could not tell, as that send may
                    // still land after the read (found by review: delivered twice).
                    tracing::warn!(key = %key_str, error = %e, "cannot put back an item taken for a dequeue that is gone (etcd is out of space); it is held for this handle's dequeues, and sent again later");
                    let _ = self.store.lease_revoke(lease).await;
                    return PutBack::Unsent(held);
                }
                Err(e) if refused(&e) => {
                    if unknown {
                        // This send was not applied; an earlier one, whose answer was lost,
                        // may have been: its marker says so, if it may be read. A read
                        // refused too: the earlier sends wrote the same marker, refused so.
                        match self
                            .store
                            .range(Range::key(marker.clone()).keys_only())
                            .await
                        {
                            Ok(read) if !read.kvs.is_empty() => break,
                            Ok(_) => {}
                            Err(e) if refused(&e) => {}
                            Err(_) => {
                                backoff.sleep().await;
                                continue;
                            }
                        }
                    }
                    tracing::warn!(
                        key = %key_str,
                        marker = %String::from_utf8_lossy(&marker),
                        error = %e,
                        "the store refuses to put back an item with a marker (does the role \
                         cover the marker's prefix?); putting it back without one"
                    );
                    let _ = self.store.lease_revoke(lease).await;
                    // After a lost answer the marker read may have been overtaken by that
                    // send, or refused though the send landed (a role cut down since): the
                    // bare put-back looks for it under its key, as after its own.
                    return self.put_back_bare(held, key, unknown).await;
                }
                Err(e) => {
                    // Refused for space after a lost answer: the marker, if there, says
                    // that send landed (its absence says nothing: it may land later). A
                    // read is served during the alarm; the resends never are.
                    if unknown && crate::ownership::refused_for_space(&e) {
                        if let Ok(read) = self
                            .store
                            .range(Range::key(marker.clone()).keys_only())
                            .await
                        {
                            if !read.kvs.is_empty() {
                                break;
                            }
                        }
                    }
                    unknown = true;
                    self.hand_back.resending();
                    tracing::warn!(key = %key_str, error = %e, "putting back an item taken for a dequeue that is gone failed; will retry");
                    // The marker tells whether this send landed, as long as it lives.
                    loop {
                        backoff.sleep().await;
                        match self.store.lease_keep_alive(lease).await {
                            Ok(Some(_)) => break,
                            Ok(None) => {
                                tracing::error!(
                                    key = %key_str,
                                    "the outcome of putting back an item is unknown past its \
                                     marker's lifetime; it is sent again, and may be queued twice"
                                );
                                match self.store.lease_grant(MARKER_TTL).await {
                                    Ok(grant) => {
                                        lease = grant.id;
                                        break;
                                    }
                                    Err(e) => tracing::warn!(error = %e, "cannot grant a lease"),
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot keep a lease alive"),
                        }
                    }
                }
            }
        }
        tracing::debug!(key = %String::from_utf8_lossy(&key), "put back an item taken for a dequeue that is gone");
        let _ = self.store.lease_revoke(lease).await;
        PutBack::Done
    }

    /// [`put_back`](Items::put_back) with no marker, under `key` or the next free one, for
    /// a store that refused the marker (a role without `__NAME/`, an item near etcd's
    /// request limit: this send is no larger than Go's enqueue of the item). A send whose
    /// answer is lost is looked for under its key (the item's value with no lease): found,
    /// it landed; not found, it is sent again, and is queued twice if it had landed and
    /// been taken meanwhile (a warning says it may be). A first send refused too gives the
    /// item back ([`PutBack::Refused`]). `unknown`: an earlier send (with the marker) lost
    /// its answer, and is looked for the same way.
    async fn put_back_bare(&self, held: Held, mut key: Vec<u8>, mut unknown: bool) -> PutBack {
        let key_str = String::from_utf8_lossy(&held.key).into_owned();
        let mut backoff = crate::watching::Backoff::new();
        loop {
            let mut puts = vec![TxnOp::put(key.clone(), held.value.clone(), 0)];
            if let Some(bookkeeping) = self.bookkeeping(&key) {
                puts.push(TxnOp::put(bookkeeping, "", 0));
            }
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then(puts);
            match self.store.txn(txn).await {
                Ok(resp) if resp.succeeded => {
                    if unknown {
                        tracing::warn!(
                            key = %String::from_utf8_lossy(&key),
                            "put back an item with no marker after a send whose answer was \
                             lost: if that send landed and its item was taken since, it is \
                             queued twice"
                        );
                    }
                    return PutBack::Done;
                }
                Ok(_) => {
                    // After a lost answer, the item found under the key is ours if it has
                    // our value and no lease, in a FIFO queue, whose keys are unique to
                    // their item (the time of its enqueue). In a priority queue a newer
                    // item of the same value may have taken the key, the level's next:
                    // taking it for ours would lose ours, so the item goes under the next
                    // key (queued twice if the lost send landed: warned on success).
                    if unknown && self.order != SortTarget::Key {
                        match self.store.range(Range::key(key.clone())).await {
                            Ok(read)
                                if read
                                    .kvs
                                    .first()
                                    .is_some_and(|kv| kv.lease == 0 && kv.value == held.value) =>
                            {
                                return PutBack::Done;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(key = %key_str, error = %e, "cannot read whether an item was put back; will retry");
                                backoff.sleep().await;
                                continue;
                            }
                        }
                    }
                    // A new item has the key: the next one.
                    match next_key(&key) {
                        Some(next) => key = next,
                        None => {
                            tracing::error!(key = %key_str, "cannot put back an item: its key is taken and has no next");
                            return PutBack::Unsent(held);
                        }
                    }
                }
                Err(e) if !unknown && crate::ownership::refused_for_space(&e) => {
                    // Not applied (etcd is out of space), and no earlier send was sent.
                    tracing::warn!(key = %key_str, error = %e, "cannot put back an item taken for a dequeue that is gone (etcd is out of space); it is held for this handle's dequeues, and sent again later");
                    return PutBack::Unsent(held);
                }
                Err(e) if refused(&e) => {
                    // After a lost answer the item may be back (a role cut down since that
                    // send landed): looked for as above, before the dequeues get it too.
                    if unknown && self.order != SortTarget::Key {
                        match self.store.range(Range::key(key.clone())).await {
                            Ok(read)
                                if read
                                    .kvs
                                    .first()
                                    .is_some_and(|kv| kv.lease == 0 && kv.value == held.value) =>
                            {
                                return PutBack::Done;
                            }
                            Ok(_) => {}
                            // Not readable at all: as before, given to the dequeues.
                            Err(e) if refused(&e) => {}
                            Err(e) => {
                                // Not known to be absent: given to the dequeues, it may be
                                // delivered twice. Sent again (refused: looked for again).
                                tracing::warn!(key = %key_str, error = %e, "cannot read whether an item was put back; will retry");
                                backoff.sleep().await;
                                continue;
                            }
                        }
                    }
                    tracing::error!(
                        key = %key_str,
                        error = %e,
                        "the store refuses to put back an item taken for a dequeue that is \
                         gone; it is held for this handle's dequeues, and sent again later"
                    );
                    if unknown {
                        tracing::warn!(
                            key = %key_str,
                            "an earlier send of this item lost its answer: if it landed, \
                             the item is queued twice"
                        );
                    }
                    return PutBack::Refused(held);
                }
                Err(e) => {
                    unknown = true;
                    self.hand_back.resending();
                    tracing::warn!(key = %key_str, error = %e, "putting back an item taken for a dequeue that is gone failed; will retry");
                    backoff.sleep().await;
                }
            }
        }
    }
}

/// How [`Items::put_back`] ended.
enum PutBack {
    /// The item is in the store.
    Done,
    /// Nothing was sent: try again later.
    Unsent(Held),
    /// The store refused it, and would refuse it again.
    Refused(Held),
}

/// Whether `e` says the store refused a request without applying it, and would refuse it
/// again: not a failure whose outcome is unknown.
fn refused(e: &Error) -> bool {
    matches!(
        e,
        Error::PermissionDenied(_) | Error::InvalidArgument(_) | Error::Unauthenticated(_)
    )
}

impl Items {
    /// A priority queue's bookkeeping key for its item `key` (`NAME/PPPPP/SSSS…`):
    /// `__NAME/PPPPP`, which every enqueue at the level rewrites, and on which Go's
    /// `newSequentialKV` guards its put (see [`PriorityQueue`](crate::PriorityQueue));
    /// `None` for a FIFO queue (ordered by create revision), which has none.
    fn bookkeeping(&self, key: &[u8]) -> Option<Vec<u8>> {
        if self.order != SortTarget::Key {
            return None;
        }
        let slash = key.iter().rposition(|&b| b == b'/')?;
        let mut bookkeeping = b"__".to_vec();
        bookkeeping.extend_from_slice(&key[..slash]);
        Some(bookkeeping)
    }
}

/// The marker of a put-back under `lease` for the queue `NAME/` (see [`Items::put_back`]).
fn marker_key(prefix: &str, lease: crate::store::LeaseId) -> Vec<u8> {
    // Not ending in the lease in hex, as a lock's key does: tools that tell locks by that
    // shape (`baton status`) would list the marker as one.
    format!("__{prefix}returned/{lease:016x}.marker").into_bytes()
}

/// `key` with its trailing decimal number plus one, at the same width; `None` if it has no
/// trailing digit or they are all nines.
fn next_key(key: &[u8]) -> Option<Vec<u8>> {
    let mut next = key.to_vec();
    for b in next.iter_mut().rev() {
        match *b {
            b'9' => *b = b'0',
            b'0'..=b'8' => {
                *b += 1;
                return Some(next);
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;

    /// A runtime of its own, to be shut down by a test.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A queue on the embedded store, whose deletes the test can delay.
    fn slow_queue() -> (Arc<crate::store::slow::SlowWatches>, Queue) {
        let store = Arc::new(crate::store::slow::SlowWatches::new(
            "mem",
            Duration::ZERO,
            Duration::ZERO,
        ));
        let client = Client::from_arc(store.clone());
        (store, Queue::new(&client, "jobs").unwrap())
    }

    /// The embedded store, counting the bytes of the values its answers carry (ranges, and
    /// the reads inside transactions): what a consumer downloads.
    #[derive(Debug, Default)]
    struct ValueBytes {
        inner: crate::store::mem::MemStore,
        received: std::sync::atomic::AtomicUsize,
    }

    impl ValueBytes {
        fn count(&self, kvs: &[KeyValue]) {
            let n: usize = kvs.iter().map(|kv| kv.value.len()).sum();
            self.received
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }

        /// The value bytes received since the last call.
        fn take(&self) -> usize {
            self.received.swap(0, std::sync::atomic::Ordering::Relaxed)
        }
    }

    #[async_trait::async_trait]
    impl crate::store::slow::Hooks for ValueBytes {
        fn inner(&self) -> &dyn Store {
            &self.inner
        }
        async fn range(&self, range: Range) -> Result<RangeResponse> {
            let resp = self.inner.range(range).await?;
            self.count(&resp.kvs);
            Ok(resp)
        }
        async fn txn(&self, txn: Txn) -> Result<crate::store::TxnResponse> {
            let resp = self.inner.txn(txn).await?;
            for r in &resp.responses {
                if let Some(get) = r.as_get() {
                    self.count(&get.kvs);
                }
            }
            Ok(resp)
        }
    }

    /// A dequeue downloads the item it takes, not the values of every candidate it reads:
    /// with 16 large items queued (more than one read's worth of candidates), each dequeue,
    /// of a FIFO or a priority queue, and `try_dequeue` too, receives one item's bytes, and
    /// the items still come out whole and in order. Through a namespace too.
    #[tokio::test]
    async fn a_dequeue_downloads_only_the_item_it_takes() {
        const SIZE: usize = 256 * 1024;
        let item = |i: usize| vec![b'a' + i as u8; SIZE];
        for namespaced in [false, true] {
            let store = Arc::new(ValueBytes::default());
            let client = if namespaced {
                Client::from_arc(Arc::new(crate::store::namespace::NamespaceStore::new(
                    store.clone(),
                    "team/",
                )))
            } else {
                Client::from_arc(store.clone())
            };
            let q = Queue::new(&client, "jobs").unwrap();
            let pq = crate::PriorityQueue::new(&client, "pq").unwrap();
            for i in 0..20 {
                q.enqueue(item(i)).await.unwrap();
                pq.enqueue(item(i), 7).await.unwrap();
            }
            store.take();
            for i in 0..20 {
                let got = if i % 2 == 0 {
                    q.dequeue().await.unwrap()
                } else {
                    q.try_dequeue().await.unwrap().unwrap()
                };
                assert!(got == item(i), "fifo item {i} (namespaced: {namespaced})");
                assert_eq!(
                    store.take(),
                    SIZE,
                    "fifo dequeue {i} received (namespaced: {namespaced})"
                );
                let got = pq.dequeue().await.unwrap();
                assert!(
                    got == item(i),
                    "priority item {i} (namespaced: {namespaced})"
                );
                assert_eq!(
                    store.take(),
                    SIZE,
                    "priority dequeue {i} received (namespaced: {namespaced})"
                );
            }
            assert_eq!(q.try_dequeue().await.unwrap(), None);
            assert_eq!(pq.try_dequeue().await.unwrap(), None);
        }
    }

    /// A priority enqueue reads the last item at its level for its sequence number: its key,
    /// not its value. With large items at the level, and with a nested name's keys after
    /// them (then every key of the level is read), an enqueue downloads no value, and the
    /// items still come out in order.
    #[tokio::test]
    async fn a_priority_enqueue_downloads_no_item() {
        const SIZE: usize = 256 * 1024;
        let store = Arc::new(ValueBytes::default());
        let client = Client::from_arc(store.clone());
        let pq = crate::PriorityQueue::new(&client, "pq").unwrap();
        let nested = Queue::new(&client, "pq/00002/jobs").unwrap();
        for i in 0..4 {
            let item = vec![b'a' + i; SIZE];
            pq.enqueue(item.clone(), 1).await.unwrap();
            pq.enqueue(item.clone(), 2).await.unwrap();
            nested.enqueue(item).await.unwrap();
            assert_eq!(store.take(), 0, "enqueue {i}");
        }
        for level in [1, 2] {
            for i in 0..4 {
                let got = pq.dequeue().await.unwrap();
                assert!(got == vec![b'a' + i; SIZE], "level {level}, item {i}");
            }
        }
        assert_eq!(nested.len().await.unwrap(), 4);
    }

    /// A claim that fails in flight but is applied later (etcd applies a request whose
    /// caller gave up on it) must not be taken for "not applied": the item would be gone
    /// unreturned and the next one returned as if nothing happened. Either the item comes
    /// back or the dequeue fails saying so; the next item stays queued.
    #[tokio::test]
    async fn a_claim_applied_after_its_failure_loses_nothing_silently() {
        use crate::store::slow::SlowWatches;
        for order in ["fifo", "priority"] {
            let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
            let client = Client::from_arc(store.clone());
            let got = if order == "fifo" {
                let q = Queue::new(&client, "q").unwrap();
                q.enqueue("A").await.unwrap();
                q.enqueue("B").await.unwrap();
                *store.fail_then_land.lock().unwrap() = Some(Duration::from_millis(20));
                q.dequeue_timeout(Duration::from_secs(2)).await
            } else {
                let q = crate::PriorityQueue::new(&client, "pq").unwrap();
                q.enqueue("A", 1).await.unwrap();
                q.enqueue("B", 2).await.unwrap();
                *store.fail_then_land.lock().unwrap() = Some(Duration::from_millis(20));
                q.dequeue_timeout(Duration::from_secs(2)).await
            };
            match &got {
                Ok(v) => assert_eq!(v.as_slice(), b"A", "{order}: A vanished, got {got:?}"),
                Err(e) => assert!(
                    e.to_string().contains("may have been taken"),
                    "{order}: {e}"
                ),
            }
            let left = store
                .inner
                .range(crate::store::Range::prefix(if order == "fifo" {
                    "q/"
                } else {
                    "pq/"
                }))
                .await
                .unwrap();
            assert_eq!(left.kvs.len(), 1, "{order}: B is still queued");
            assert_eq!(left.kvs[0].value, b"B", "{order}");
        }
    }

    /// A deadline that passes while a claim is in flight must not lose the item: the claim
    /// lands on the server all the same, so its answer is awaited and the item returned.
    #[tokio::test]
    async fn a_timeout_during_a_claim_returns_the_item() {
        use crate::store::slow::SlowWatches;
        for order in ["fifo", "priority"] {
            let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
            let client = Client::from_arc(store.clone());
            let (prefix, got) = if order == "fifo" {
                let q = Queue::new(&client, "jobs").unwrap();
                q.enqueue("precious").await.unwrap();
                *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(200));
                ("jobs/", q.dequeue_timeout(Duration::from_millis(100)).await)
            } else {
                let q = crate::PriorityQueue::new(&client, "pq").unwrap();
                q.enqueue("precious", 1).await.unwrap();
                *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(200));
                ("pq/", q.dequeue_timeout(Duration::from_millis(100)).await)
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            let left = store
                .inner
                .range(crate::store::Range::prefix(prefix))
                .await
                .unwrap()
                .kvs
                .len();
            assert!(
                got.is_ok() || left == 1,
                "{order}: item lost: {got:?}, {left} left"
            );
            assert_eq!(got.unwrap(), b"precious", "{order}");
        }
    }

    /// A dequeue dropped while its claim is in flight (under `tokio::time::timeout`) loses
    /// nothing: the claim finishes, and its item goes to the handle's next dequeue (within
    /// [`HOLD_FOR`]), first, and counts in `len` meanwhile. FIFO and priority queues.
    #[tokio::test]
    async fn a_dropped_dequeue_hands_its_item_to_the_next() {
        use crate::store::slow::SlowWatches;
        for order in ["fifo", "priority"] {
            let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
            let client = Client::from_arc(store.clone());
            let q = Queue::new(&client, "jobs").unwrap();
            let pq = crate::PriorityQueue::new(&client, "pq").unwrap();
            let dropped = if order == "fifo" {
                q.enqueue("A").await.unwrap();
                q.enqueue("B").await.unwrap();
                *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
                tokio::time::timeout(Duration::from_millis(20), q.dequeue()).await
            } else {
                pq.enqueue("A", 1).await.unwrap();
                pq.enqueue("B", 1).await.unwrap();
                *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
                tokio::time::timeout(Duration::from_millis(20), pq.dequeue()).await
            };
            assert!(dropped.is_err(), "{order}: the dequeue was not dropped");
            // The claim lands (at 100 ms), for nobody.
            tokio::time::sleep(Duration::from_millis(150)).await;
            *store.delay_deletes.lock().unwrap() = None;
            let bound = Duration::from_secs(1);
            let (len, first, second, last) = if order == "fifo" {
                (
                    q.len().await.unwrap(),
                    q.dequeue_timeout(bound).await,
                    q.dequeue_timeout(bound).await,
                    q.try_dequeue().await.unwrap(),
                )
            } else {
                (
                    pq.len().await.unwrap(),
                    pq.dequeue_timeout(bound).await,
                    pq.dequeue_timeout(bound).await,
                    pq.try_dequeue().await.unwrap(),
                )
            };
            assert_eq!(len, 2, "{order}: the item claimed is still queued");
            assert_eq!(first.unwrap(), b"A", "{order}");
            assert_eq!(second.unwrap(), b"B", "{order}");
            assert_eq!(last, None, "{order}");
        }
    }

    /// An item claimed for a dequeue that was dropped, when no dequeue follows, is put back
    /// in the store (a priority queue's under its own key, so it keeps its place; a FIFO
    /// queue's at the back), once, even if the put-back's answer is lost after it landed
    /// (its marker tells), and the marker is gone afterwards.
    #[tokio::test]
    async fn a_dropped_dequeue_puts_its_item_back_once() {
        use crate::store::slow::SlowWatches;
        for order in ["fifo", "priority"] {
            for lose_reply in [false, true] {
                let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
                let client = Client::from_arc(store.clone());
                let q = Queue::new(&client, "jobs").unwrap();
                let pq = crate::PriorityQueue::new(&client, "pq").unwrap();
                let prefix = if order == "fifo" {
                    q.enqueue("A").await.unwrap();
                    q.enqueue("B").await.unwrap();
                    "jobs/"
                } else {
                    pq.enqueue("A", 1).await.unwrap();
                    pq.enqueue("B", 1).await.unwrap();
                    "pq/"
                };
                let keys = |store: Arc<SlowWatches>| async move {
                    let kvs = store.inner.range(Range::prefix(prefix)).await.unwrap().kvs;
                    let mut kvs: Vec<(Vec<u8>, Vec<u8>)> =
                        kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
                    kvs.sort();
                    kvs
                };
                let before = keys(store.clone()).await;
                *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
                let dropped = if order == "fifo" {
                    tokio::time::timeout(Duration::from_millis(20), q.dequeue())
                        .await
                        .is_err()
                } else {
                    tokio::time::timeout(Duration::from_millis(20), pq.dequeue())
                        .await
                        .is_err()
                };
                assert!(dropped, "{order}: the dequeue was not dropped");
                // The claim lands at 100 ms; the put-back is sent after HOLD_FOR more.
                tokio::time::sleep(Duration::from_millis(150)).await;
                *store.delay_deletes.lock().unwrap() = None;
                assert_eq!(keys(store.clone()).await.len(), 1, "{order}: A is held");
                if lose_reply {
                    store
                        .lose_next_reply
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(HOLD_FOR + Duration::from_millis(500)).await;
                let after = keys(store.clone()).await;
                let values: Vec<&[u8]> = after.iter().map(|(_, v)| &v[..]).collect();
                assert_eq!(values.len(), 2, "{order} {lose_reply}: {after:?}");
                if order == "priority" {
                    assert_eq!(after, before, "{order} {lose_reply}: A kept its key");
                    assert_eq!(pq.dequeue().await.unwrap(), b"A");
                    assert_eq!(pq.dequeue().await.unwrap(), b"B");
                } else {
                    assert_eq!(q.dequeue().await.unwrap(), b"B");
                    assert_eq!(q.dequeue().await.unwrap(), b"A");
                }
                let markers = store.inner.range(Range::prefix("__")).await.unwrap().kvs;
                assert!(
                    markers.iter().all(|kv| !kv.key_str().contains("returned")),
                    "{order} {lose_reply}: a marker is left"
                );
            }
        }
    }

    /// `dequeue_until` gives up when `stop` completes while waiting, but not while a claim
    /// is in flight: a `stop` that completes then is seen only if the claim lost.
    #[tokio::test]
    async fn dequeue_until_stops_only_while_waiting() {
        use crate::store::slow::SlowWatches;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(store.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        let stop = tokio::time::sleep(Duration::from_millis(50));
        assert_eq!(q.dequeue_until(stop).await.unwrap(), None);
        q.enqueue("precious").await.unwrap();
        *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(200));
        let stop = tokio::time::sleep(Duration::from_millis(50));
        let got = q.dequeue_until(stop).await.unwrap();
        assert_eq!(got.as_deref(), Some(&b"precious"[..]));
    }

    /// A priority queue's item put back after a dropped dequeue rewrites its level's
    /// bookkeeping key, as an enqueue does: a Go producer (`newSequentialKV`, whose put is
    /// guarded by that key's mod revision only) that read the level before the put-back
    /// must fail its put and read again, not overwrite the item put back.
    #[tokio::test]
    async fn a_put_back_fences_a_go_producer_that_read_before_it() {
        use crate::store::slow::SlowWatches;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(store.clone());
        let pq = crate::PriorityQueue::new(&client, "pq").unwrap();
        pq.enqueue("A", 1).await.unwrap();
        *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
        let dropped = tokio::time::timeout(Duration::from_millis(20), pq.dequeue()).await;
        assert!(dropped.is_err(), "the dequeue was not dropped");
        // The claim lands at 100 ms: A is held, the level is empty.
        tokio::time::sleep(Duration::from_millis(150)).await;
        *store.delay_deletes.lock().unwrap() = None;
        // Go's newSequentialKV, step 1: read the last key at the level (none: sequence 0).
        let read = store
            .inner
            .range(
                Range::prefix("pq/00001/")
                    .sort_by(SortTarget::Key, SortOrder::Descending)
                    .with_limit(1),
            )
            .await
            .unwrap();
        assert!(read.kvs.is_empty(), "A is held, not in the store");
        // The put-back lands.
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(300)).await;
        // Step 2: the put, guarded by the bookkeeping key's mod revision only.
        let go = Txn::new()
            .when([Compare::mod_revision(
                "__pq/00001",
                CompareOp::Less,
                read.header_revision + 1,
            )])
            .and_then([
                TxnOp::put("__pq/00001", "", 0),
                TxnOp::put("pq/00001/0000000000000000", "G", 0),
            ]);
        let go = store.inner.txn(go).await.unwrap();
        let left = store.inner.range(Range::prefix("pq/")).await.unwrap().kvs;
        let values: Vec<&[u8]> = left.iter().map(|kv| &kv.value[..]).collect();
        assert_eq!(values, [&b"A"[..]], "the item put back was overwritten");
        assert!(!go.succeeded, "Go's producer was not fenced");
    }

    /// A runtime that shuts down while a claim whose dequeue was dropped is in flight drops
    /// the claim's task: that must not leave the claim counted as in flight, or every later
    /// dequeue of the handle waits for it forever. Here the handle is used on a second
    /// runtime: `try_dequeue` answers (the item is lost with the first runtime, as
    /// documented, or still queued).
    #[test]
    fn a_claim_dropped_with_its_runtime_blocks_no_later_dequeue() {
        let (store, q) = slow_queue();
        let first = runtime();
        first.block_on(async {
            q.enqueue("A").await.unwrap();
            *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
            let dropped = tokio::time::timeout(Duration::from_millis(20), q.dequeue()).await;
            assert!(dropped.is_err(), "the dequeue was not dropped");
        });
        drop(first);
        *store.delay_deletes.lock().unwrap() = None;
        let second = runtime();
        second.block_on(async {
            let got = tokio::time::timeout(Duration::from_secs(10), q.try_dequeue()).await;
            let got = got.expect("try_dequeue hangs on a claim its runtime dropped");
            assert!(
                matches!(got.as_ref().map(|v| v.as_deref()), Ok(None | Some(b"A"))),
                "{got:?}"
            );
            let len = tokio::time::timeout(Duration::from_secs(10), q.len()).await;
            assert!(len.expect("len hangs").unwrap() <= 1);
        });
    }

    /// A runtime that shuts down while an item held for a dropped dequeue waits to be put
    /// back drops the task that would put it back: that must not leave the handle thinking
    /// one runs, or no later item it holds is ever put back. On a second runtime, the held
    /// item goes to the next dequeue, and an item claimed there for a dequeue that is
    /// dropped is put back in the store.
    #[test]
    fn a_put_back_dropped_with_its_runtime_stops_no_later_one() {
        let (store, q) = slow_queue();
        let first = runtime();
        first.block_on(async {
            q.enqueue("A").await.unwrap();
            q.enqueue("B").await.unwrap();
            *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
            let dropped = tokio::time::timeout(Duration::from_millis(20), q.dequeue()).await;
            assert!(dropped.is_err(), "the dequeue was not dropped");
            // The claim lands at 100 ms: A is held, to be put back after HOLD_FOR.
            tokio::time::sleep(Duration::from_millis(150)).await;
        });
        drop(first);
        *store.delay_deletes.lock().unwrap() = None;
        let second = runtime();
        second.block_on(async {
            assert_eq!(q.try_dequeue().await.unwrap().as_deref(), Some(&b"A"[..]));
            *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
            let dropped = tokio::time::timeout(Duration::from_millis(20), q.dequeue()).await;
            assert!(dropped.is_err(), "the dequeue was not dropped");
            tokio::time::sleep(Duration::from_millis(150)).await;
            *store.delay_deletes.lock().unwrap() = None;
            // B is held; after HOLD_FOR it is back in the store.
            tokio::time::sleep(HOLD_FOR + Duration::from_millis(500)).await;
            let left = store.inner.range(Range::prefix("jobs/")).await.unwrap().kvs;
            let values: Vec<&[u8]> = left.iter().map(|kv| &kv.value[..]).collect();
            assert_eq!(values, [&b"B"[..]], "B was not put back");
            let len = tokio::time::timeout(Duration::from_secs(10), q.len()).await;
            assert_eq!(len.expect("len hangs").unwrap(), 1);
        });
    }

    /// A `stop` that completes while a claim's first send is in flight, a claim that then
    /// loses to another consumer: `stop` must not be polled again after it completed (an
    /// `async` block panics "resumed after completion"). The dequeue gives up with `None`,
    /// and the other consumer has the item.
    #[tokio::test]
    async fn dequeue_until_polls_a_completed_stop_no_more() {
        use crate::store::slow::SlowWatches;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(store.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        let other = Queue::new(&client, "jobs").unwrap();
        q.enqueue("X").await.unwrap();
        *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
        let b = tokio::spawn(async move { other.dequeue().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let got = q
            .dequeue_until(async {
                tokio::time::sleep(Duration::from_millis(20)).await;
            })
            .await;
        assert_eq!(got.unwrap(), None);
        assert_eq!(b.await.unwrap().unwrap(), b"X");
    }

    /// A put-back's marker does not end in its lease in hex, as a lock's key does
    /// (`NAME/<lease>`): `baton status` and other tools that tell locks by that shape must
    /// not list a marker as a lock.
    #[test]
    fn a_put_back_marker_is_not_shaped_as_a_lock_key() {
        for lease in [1_i64, 0x2a, 0x694d_7a1b_2c3d_4e5f, i64::MAX] {
            let marker = String::from_utf8(marker_key("jobs/", lease)).unwrap();
            assert!(marker.starts_with("__jobs/returned/"), "{marker}");
            let suffix = marker.rsplit('/').next().unwrap();
            assert_ne!(suffix, format!("{lease:x}"), "{marker}");
            assert_ne!(suffix, format!("{lease:016x}"), "{marker}");
        }
    }

    /// The embedded store whose claims (transactions that delete) are never answered: each
    /// fails after `lag`, as etcd's request timeout `lag` if `timed_out`, else as a reset
    /// connection; none is applied. Counts the claims sent.
    #[derive(Debug)]
    struct UnansweredClaims {
        inner: crate::store::mem::MemStore,
        lag: Duration,
        timed_out: bool,
        sent: std::sync::atomic::AtomicUsize,
        /// The store's own request timeout, if it has one.
        request_timeout: Option<Duration>,
    }

    impl UnansweredClaims {
        fn new(lag: Duration, timed_out: bool) -> Arc<UnansweredClaims> {
            Self::with_request_timeout(lag, timed_out, None)
        }

        fn with_request_timeout(
            lag: Duration,
            timed_out: bool,
            request_timeout: Option<Duration>,
        ) -> Arc<UnansweredClaims> {
            Arc::new(UnansweredClaims {
                inner: crate::store::mem::MemStore::new(),
                lag,
                timed_out,
                sent: Default::default(),
                request_timeout,
            })
        }

        fn sent(&self) -> usize {
            self.sent.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    #[async_trait::async_trait]
    impl Store for UnansweredClaims {
        fn backend(&self) -> &'static str {
            "mem"
        }
        fn request_timeout(&self) -> Option<Duration> {
            self.request_timeout
        }
        async fn range(&self, range: Range) -> Result<RangeResponse> {
            self.inner.range(range).await
        }
        async fn put(
            &self,
            key: &[u8],
            value: &[u8],
            lease: crate::store::LeaseId,
        ) -> Result<crate::store::Revision> {
            self.inner.put(key, value, lease).await
        }
        async fn delete(
            &self,
            keys: crate::store::KeyRange,
        ) -> Result<(i64, crate::store::Revision)> {
            self.inner.delete(keys).await
        }
        async fn txn(&self, txn: Txn) -> Result<crate::store::TxnResponse> {
            if !txn.success.iter().any(|op| matches!(op, TxnOp::Delete(_))) {
                return self.inner.txn(txn).await;
            }
            self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(self.lag).await;
            Err(if self.timed_out {
                Error::Timeout {
                    operation: "txn",
                    after: self.lag,
                }
            } else {
                Error::Unavailable("connection reset".into())
            })
        }
        async fn lease_grant(&self, ttl: Duration) -> Result<crate::store::LeaseGrant> {
            self.inner.lease_grant(ttl).await
        }
        async fn lease_keep_alive(&self, id: crate::store::LeaseId) -> Result<Option<Duration>> {
            self.inner.lease_keep_alive(id).await
        }
        async fn lease_revoke(&self, id: crate::store::LeaseId) -> Result<()> {
            self.inner.lease_revoke(id).await
        }
        async fn lease_time_to_live(&self, id: crate::store::LeaseId) -> Result<Option<Duration>> {
            self.inner.lease_time_to_live(id).await
        }
        async fn watch(&self, watch: crate::store::Watch) -> Result<crate::store::WatchStream> {
            self.inner.watch(watch).await
        }
        async fn compact(&self, revision: crate::store::Revision) -> Result<()> {
            self.inner.compact(revision).await
        }
    }

    /// A claim that fails in flight is sent again, but no more once the timeout has passed
    /// (or `stop` completed): the dequeue then fails at once, saying the item may have been
    /// taken, rather than resending for seconds after its deadline.
    #[tokio::test]
    async fn a_stop_ends_the_resends_of_a_claim_failed_in_flight() {
        for how in ["fifo timeout", "priority timeout", "fifo until"] {
            let store = UnansweredClaims::new(Duration::ZERO, false);
            let client = Client::from_arc(store.clone());
            let bound = Duration::from_millis(300);
            let started = tokio::time::Instant::now();
            let got = match how {
                "fifo timeout" => {
                    let q = Queue::new(&client, "jobs").unwrap();
                    q.enqueue("precious").await.unwrap();
                    q.dequeue_timeout(bound).await.map(Some)
                }
                "priority timeout" => {
                    let q = crate::PriorityQueue::new(&client, "pq").unwrap();
                    q.enqueue("precious", 1).await.unwrap();
                    q.dequeue_timeout(bound).await.map(Some)
                }
                _ => {
                    let q = Queue::new(&client, "jobs").unwrap();
                    q.enqueue("precious").await.unwrap();
                    q.dequeue_until(tokio::time::sleep(bound)).await
                }
            };
            let took = started.elapsed();
            let err = got.unwrap_err();
            assert!(
                err.to_string().contains("may have been taken"),
                "{how}: {err}"
            );
            assert!(store.sent() >= 2, "{how}: {} sent", store.sent());
            assert!(
                took < bound + Duration::from_millis(500),
                "{how}: failed after {took:?}, {} claims sent",
                store.sent()
            );
        }
    }

    /// A claim that fails in flight is sent again for about one request timeout in all,
    /// the first send included: if each send fails at once, until the store's request
    /// timeout, or the default one for a store without. After a first send that took the
    /// store's whole request timeout (it may have been applied), for one more: the resend
    /// that tells (it timed out too here), then no more.
    #[tokio::test(start_paused = true)]
    async fn a_claim_failed_in_flight_takes_about_one_request_timeout() {
        let cases = [
            (Duration::from_secs(3), true, None),
            (Duration::ZERO, false, None),
            (Duration::ZERO, false, Some(Duration::from_secs(3))),
            (Duration::ZERO, false, Some(Duration::from_secs(30))),
        ];
        for (lag, timed_out, request_timeout) in cases {
            let store = UnansweredClaims::with_request_timeout(lag, timed_out, request_timeout);
            let client = Client::from_arc(store.clone());
            let q = Queue::new(&client, "jobs").unwrap();
            q.enqueue("precious").await.unwrap();
            let started = tokio::time::Instant::now();
            let err = q.dequeue().await.unwrap_err();
            let took = started.elapsed();
            assert!(err.to_string().contains("may have been taken"), "{err}");
            if timed_out {
                assert_eq!((took, store.sent()), (lag * 2, 2), "timed out");
            } else {
                let limit = request_timeout.unwrap_or(crate::client::DEFAULT_REQUEST_TIMEOUT);
                assert!(
                    took <= limit && took > limit - Duration::from_secs(2),
                    "failing at once (request timeout {request_timeout:?}): gave up after {took:?}"
                );
                assert!(store.sent() > 2, "{} sent", store.sent());
            }
        }
    }

    /// A store answering a claim's first send with a timeout after applying it (the whole
    /// request timeout), and its resend after most of another: the claim is settled nearly
    /// two request timeouts after it was sent.
    #[derive(Debug)]
    struct SlowClaimAnswers {
        inner: Arc<crate::store::slow::SlowWatches>,
        claims: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl crate::store::slow::Hooks for SlowClaimAnswers {
        fn inner(&self) -> &dyn Store {
            &*self.inner
        }
        async fn txn(&self, txn: Txn) -> Result<crate::store::TxnResponse> {
            if !txn.success.iter().any(|op| matches!(op, TxnOp::Delete(_))) {
                return self.inner.txn(txn).await;
            }
            let bound = self.inner.request_timeout().unwrap();
            match self
                .claims
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            {
                0 => {
                    self.inner.txn(txn).await?;
                    tokio::time::sleep(bound).await;
                    Err(Error::Timeout {
                        operation: "txn",
                        after: bound,
                    })
                }
                1 => {
                    tokio::time::sleep(bound * 9 / 10).await;
                    self.inner.txn(txn).await
                }
                _ => self.inner.txn(txn).await,
            }
        }
    }

    /// A dequeue dropped while its claim's first send went unanswered (applied, its answer
    /// timed out, its resend slow): the next dequeue, made at once, waits for that
    /// claim to be settled and gets its item, the first queued, rather than reading the
    /// store before and taking the second.
    #[tokio::test(start_paused = true)]
    async fn a_dequeue_after_a_claim_slow_twice_gets_its_item_first() {
        use crate::store::slow::SlowWatches;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        *slow.request_timeout.lock().unwrap() = Some(Duration::from_secs(2));
        let store = Arc::new(SlowClaimAnswers {
            inner: slow,
            claims: Default::default(),
        });
        let client = Client::from_arc(store.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue("first").await.unwrap();
        q.enqueue("second").await.unwrap();
        let dropped = tokio::time::timeout(Duration::from_millis(100), q.dequeue()).await;
        assert!(dropped.is_err(), "{dropped:?}");
        let got = q.dequeue().await.unwrap();
        let then = q.dequeue().await.unwrap();
        assert_eq!(
            (
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&then)
            ),
            ("first".into(), "second".into())
        );
    }

    /// An item enqueued by a clock near 1970 (an id of few digits) is still an item: its
    /// id is zero-padded to Go's 19 digits, so `len` and `dequeue` see it, and it sorts
    /// before the ids of today's clocks.
    #[tokio::test]
    async fn an_item_with_a_small_id_is_seen() {
        let client = Client::memory();
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue_at(b"from 1970".to_vec(), 5).await.unwrap();
        q.enqueue_at(b"also".to_vec(), 5).await.unwrap();
        q.enqueue("today").await.unwrap();
        let keys: Vec<String> = client
            .store()
            .range(Range::prefix("jobs/"))
            .await
            .unwrap()
            .kvs
            .iter()
            .map(|kv| kv.key_str().into_owned())
            .collect();
        assert_eq!(
            keys[..2],
            ["jobs/0000000000000000005", "jobs/0000000000000000006"]
        );
        assert_eq!(keys[2].len(), "jobs/".len() + 19, "{keys:?}");
        assert_eq!(q.len().await.unwrap(), 3);
        assert_eq!(q.try_dequeue().await.unwrap().unwrap(), b"from 1970");
        assert_eq!(q.try_dequeue().await.unwrap().unwrap(), b"also");
        assert_eq!(q.try_dequeue().await.unwrap().unwrap(), b"today");
    }

    #[tokio::test]
    async fn fifo_exactly_once_with_racing_consumers() {
        let client = Client::memory();
        let q = Queue::new(&client, "q").unwrap();
        let consumers: Vec<_> = (0..4)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    while let Ok(v) = q.dequeue_timeout(Duration::from_millis(300)).await {
                        got.push(String::from_utf8(v).unwrap());
                    }
                    got
                })
            })
            .collect();
        let producers: Vec<_> = (0..2)
            .map(|p| {
                let q = q.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        q.enqueue(format!("{p}-{i:03}")).await.unwrap();
                    }
                })
            })
            .collect();
        for p in producers {
            p.await.unwrap();
        }
        let mut all = HashSet::new();
        for c in consumers {
            let got = c.await.unwrap();
            for p in 0..2 {
                let mine: Vec<_> = got
                    .iter()
                    .filter(|v| v.starts_with(&format!("{p}-")))
                    .collect();
                assert!(
                    mine.windows(2).all(|w| w[0] < w[1]),
                    "out of order: {mine:?}"
                );
            }
            for v in got {
                assert!(all.insert(v.clone()), "{v} taken twice");
            }
        }
        assert_eq!(all.len(), 100);
        assert!(q.is_empty().await.unwrap());
    }

    /// A lock of the queue's name has a key under the queue's prefix (`jobs/<lease>`): it
    /// is no item, and a consumer must not take (delete) it.
    /// A claim that lost (its compare failed: another consumer took the item) wrote no
    /// marker: none is left for the next claim's transaction, or the task after a quiet
    /// second, to delete (each a write for nothing; a racing consumer that lost and found
    /// the queue empty sent one more request a second later).
    #[tokio::test]
    async fn a_lost_claim_leaves_no_marker_to_delete() {
        let client = Client::memory();
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue("work").await.unwrap();
        let items = &q.items;
        let read = items.store.range(items.read(0)).await.unwrap();
        let item = read.kvs.into_iter().next().unwrap();
        // Someone else takes it.
        items
            .store
            .delete(crate::store::KeyRange::Key(item.key.clone()))
            .await
            .unwrap();
        let lease = items.mark_lease(false).await;
        assert!(lease.is_some());
        let never = std::pin::pin!(futures::future::maybe_done(std::future::pending::<()>()));
        let claimed = items.claim_here(&item, lease, never).await.unwrap();
        assert!(matches!(claimed, Claim::Lost));
        let done = items.marks.lock().done.clone();
        assert!(
            done.is_empty(),
            "markers never written are to be deleted: {:?}",
            done.iter()
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_lock_of_the_same_name_is_no_item() {
        let client = Client::memory();
        let session = crate::Session::new(&client).await.unwrap();
        let held = crate::Mutex::new(&session, "jobs")
            .unwrap()
            .lock()
            .await
            .unwrap();
        let q = Queue::new(&client, "jobs").unwrap();
        assert_eq!(q.len().await.unwrap(), 0);
        assert!(q.is_empty().await.unwrap());
        assert_eq!(q.try_dequeue().await.unwrap(), None);
        let err = q
            .dequeue_timeout(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        q.enqueue("work").await.unwrap();
        assert_eq!(q.try_dequeue().await.unwrap().unwrap(), b"work");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!held.is_lost(), "{:?}", held.lost_reason());
        held.unlock().await.unwrap();

        // The same for a priority queue: a leased key with an item's shape (a lock
        // `pq/00003` whose lease id has only decimal digits in hex) is no item.
        let pq = crate::PriorityQueue::new(&client, "pq").unwrap();
        client
            .store()
            .put(b"pq/00003/1000000000000001", b"", session.lease_id())
            .await
            .unwrap();
        assert_eq!(pq.try_dequeue().await.unwrap(), None);
        pq.enqueue("alert", 3).await.unwrap();
        assert_eq!(pq.try_dequeue().await.unwrap().unwrap(), b"alert");
        assert_eq!(pq.len().await.unwrap(), 0);
    }

    /// Keys that other types name freely, without a lease, under a queue's name: a
    /// `SharedValue` `jobs/1`, a `CountDownLatch` `jobs/cafe`, a held `Barrier` `jobs/2`, a
    /// `SharedValue` `pq/00001/7`. They are no items: a consumer never takes (deletes) them.
    #[tokio::test]
    async fn other_types_keys_are_no_items() {
        let client = Client::memory();
        let value = crate::SharedValue::new(&client, "jobs/1").unwrap();
        value.set("precious").await.unwrap();
        let latch = crate::CountDownLatch::new(&client, "jobs/cafe", 2).unwrap();
        latch.count_down().await.unwrap();
        let barrier = crate::Barrier::new(&client, "jobs/2").unwrap();
        assert!(barrier.hold().await.unwrap());
        let q = Queue::new(&client, "jobs").unwrap();
        assert_eq!(q.len().await.unwrap(), 0);
        assert_eq!(q.try_dequeue().await.unwrap(), None);
        q.enqueue("work").await.unwrap();
        assert_eq!(q.try_dequeue().await.unwrap().unwrap(), b"work");
        assert_eq!(value.get().await.unwrap().unwrap().value, b"precious");
        assert_eq!(latch.remaining().await.unwrap(), 1);
        assert!(barrier.is_held().await.unwrap());

        let pq = crate::PriorityQueue::new(&client, "pq").unwrap();
        let nested = crate::SharedValue::new(&client, "pq/00001/7").unwrap();
        nested.set("mine").await.unwrap();
        assert_eq!(pq.try_dequeue().await.unwrap(), None);
        pq.enqueue("alert", 1).await.unwrap();
        assert_eq!(pq.try_dequeue().await.unwrap().unwrap(), b"alert");
        assert_eq!(nested.get().await.unwrap().unwrap().value, b"mine");
    }

    #[tokio::test]
    async fn nested_names_and_bad_input() {
        let client = Client::memory();
        let q = Queue::new(&client, "n").unwrap();
        let nested = Queue::new(&client, "n/sub").unwrap();
        for i in 0..20 {
            nested.enqueue(format!("{i}")).await.unwrap();
        }
        q.enqueue("mine").await.unwrap();
        assert_eq!(q.len().await.unwrap(), 1);
        assert_eq!(q.try_dequeue().await.unwrap().unwrap(), b"mine");
        assert_eq!(q.try_dequeue().await.unwrap(), None);
        assert_eq!(nested.len().await.unwrap(), 20);
        let big = vec![0_u8; crate::MAX_VALUE_LEN + 1];
        assert!(q.enqueue(big).await.unwrap_err().is_invalid_input());
        assert!(Queue::new(&client, "").is_err());
        let err = q
            .dequeue_timeout(Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(err.is_timeout());
    }
    /// The embedded store (with [`SlowWatches`](crate::store::slow::SlowWatches)' fault
    /// injection) behind an etcd role that covers only the queue's prefix `jobs/` (all that
    /// docs/security.md asks of a FIFO `Queue`): a transaction that touches any other key
    /// (here: the put-back's marker `__jobs/returned/…`) is refused as a whole with
    /// `PermissionDenied`, as etcd refuses it.
    #[derive(Debug)]
    struct RoleOnJobs {
        inner: Arc<crate::store::slow::SlowWatches>,
        /// Refuse every put, in the queue's prefix too (a role taken away).
        refuse_puts: std::sync::atomic::AtomicBool,
    }

    impl RoleOnJobs {
        fn new(inner: Arc<crate::store::slow::SlowWatches>) -> Arc<RoleOnJobs> {
            Arc::new(RoleOnJobs {
                inner,
                refuse_puts: std::sync::atomic::AtomicBool::new(false),
            })
        }

        fn check(&self, key: &[u8]) -> Result<()> {
            if key.starts_with(b"jobs/")
                && !self.refuse_puts.load(std::sync::atomic::Ordering::Relaxed)
            {
                Ok(())
            } else {
                Err(Error::PermissionDenied(format!(
                    "txn: the etcd user's roles do not cover the key {:?}",
                    String::from_utf8_lossy(key)
                )))
            }
        }
    }

    #[async_trait::async_trait]
    impl crate::store::slow::Hooks for RoleOnJobs {
        fn inner(&self) -> &dyn Store {
            &*self.inner
        }
        async fn put(
            &self,
            key: &[u8],
            value: &[u8],
            lease: crate::store::LeaseId,
        ) -> Result<crate::store::Revision> {
            self.check(key)?;
            self.inner.put(key, value, lease).await
        }
        async fn txn(&self, txn: Txn) -> Result<crate::store::TxnResponse> {
            for c in &txn.compares {
                if !c.key.starts_with(b"jobs/") {
                    self.check(&c.key)?;
                }
            }
            for op in txn.success.iter().chain(&txn.failure) {
                if let TxnOp::Put { key, .. } = op {
                    self.check(key)?;
                }
            }
            self.inner.txn(txn).await
        }
    }

    /// A dropped dequeue's claim lands for nobody (its delete is slowed past the dequeue's
    /// timeout); the item is held and, after [`HOLD_FOR`], put back.
    pub(super) async fn claim_for_nobody(q: &Queue, slow: &crate::store::slow::SlowWatches) {
        *slow.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
        let dropped = tokio::time::timeout(Duration::from_millis(20), q.dequeue()).await;
        assert!(dropped.is_err(), "the dequeue was not dropped");
        tokio::time::sleep(Duration::from_millis(150)).await;
        *slow.delay_deletes.lock().unwrap() = None;
    }

    /// Under a role on the queue's prefix alone, the put-back's marker (`__jobs/…`) is
    /// refused: the item is put back without one, not lost in an endless resend, and `len`
    /// does not wait for it.
    #[tokio::test]
    async fn a_put_back_whose_marker_is_refused_goes_back_without_one() {
        use crate::store::slow::SlowWatches;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(RoleOnJobs::new(slow.clone()));
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue("A").await.unwrap();
        claim_for_nobody(&q, &slow).await;
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(300)).await;
        let keys: Vec<_> = slow.inner.range(Range::prefix("")).await.unwrap().kvs;
        assert_eq!(keys.len(), 1, "the item alone is back: {keys:?}");
        assert!(keys[0].key.starts_with(b"jobs/") && keys[0].value == b"A");
        let started = tokio::time::Instant::now();
        assert_eq!(q.len().await.unwrap(), 1);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "len waited {:?}",
            started.elapsed()
        );
        let other = Queue::new(&client, "jobs").unwrap();
        assert_eq!(
            other.try_dequeue().await.unwrap().as_deref(),
            Some(&b"A"[..])
        );
    }

    /// A put-back refused outright (a role taken away: no put is allowed) leaves the item
    /// held for the handle's dequeues: one already waiting (its watch not yet started) takes
    /// it at once, rather than when the store next changes; `len` counts it meanwhile.
    #[tokio::test]
    async fn a_put_back_refused_outright_stays_for_the_handles_dequeues() {
        use crate::store::slow::SlowWatches;
        use std::sync::atomic::Ordering::Relaxed;
        // Watches take 5 s to start: the waiting dequeue hears nothing from the store.
        let slow = Arc::new(SlowWatches::new(
            "mem",
            Duration::from_secs(5),
            Duration::ZERO,
        ));
        let role = RoleOnJobs::new(slow.clone());
        let client = Client::from_arc(role.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.dequeue_timeout(Duration::from_secs(4)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        q.enqueue("A").await.unwrap();
        role.refuse_puts.store(true, Relaxed);
        claim_for_nobody(&q, &slow).await;
        let started = tokio::time::Instant::now();
        let got = waiting.await.unwrap().unwrap();
        assert_eq!(got, b"A");
        assert!(
            started.elapsed() < HOLD_FOR + Duration::from_secs(1),
            "the waiting dequeue took it after {:?}",
            started.elapsed()
        );
        let keys = slow.inner.range(Range::prefix("")).await.unwrap().kvs;
        assert!(keys.is_empty(), "{keys:?}");
        // Once more, with no dequeue waiting: `len` counts the held item, at once.
        role.refuse_puts.store(false, Relaxed);
        q.enqueue("B").await.unwrap();
        role.refuse_puts.store(true, Relaxed);
        claim_for_nobody(&q, &slow).await;
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(300)).await;
        let started = tokio::time::Instant::now();
        assert_eq!(q.len().await.unwrap(), 1, "the held item is counted");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "len waited {:?}",
            started.elapsed()
        );
        let got = q.dequeue_timeout(Duration::from_secs(1)).await.unwrap();
        assert_eq!(got, b"B");
    }

    /// An item as large as a Go producer may enqueue (etcd takes its enqueue: one compare
    /// and one put), claimed for a dequeue that was dropped: its put-back (the item, plus the
    /// marker's put, compares and read) is over the request limit, and refused ("request is
    /// too large"). It goes back without the marker, a send no larger than the enqueue.
    #[tokio::test]
    async fn an_item_too_large_for_a_put_back_with_a_marker_goes_back_without_one() {
        use crate::store::slow::SlowWatches;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(store.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        let key = "jobs/0000000000000000001";
        // Go's recipe.Queue enqueue: put if the key does not exist.
        let go_enqueue = |len: usize| {
            Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, vec![b'x'; len], 0)])
        };
        // The largest item such an enqueue can write.
        let (mut lo, mut hi) = (crate::MAX_VALUE_LEN, 2 * crate::MAX_VALUE_LEN);
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if store.inner.txn(go_enqueue(mid)).await.is_ok() {
                store
                    .inner
                    .delete(crate::store::KeyRange::Key(key.into()))
                    .await
                    .unwrap();
                lo = mid;
            } else {
                hi = mid;
            }
        }
        assert!(store.inner.txn(go_enqueue(lo)).await.unwrap().succeeded);
        claim_for_nobody(&q, &store).await;
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(300)).await;
        let keys = store.inner.range(Range::prefix("")).await.unwrap().kvs;
        // The claim's marker (`__jobs/claimed/…`) is deleted after a quiet second.
        let keys: Vec<_> = keys
            .into_iter()
            .filter(|kv| !kv.key_str().contains("/claimed/"))
            .collect();
        assert_eq!(keys.len(), 1, "the item alone is back in the store");
        assert_eq!(keys[0].value.len(), lo, "the item itself");
    }

    /// A priority queue's put-back keeps its key unless a newer item took it (the level
    /// emptied meanwhile, and another process enqueued there): no key sorts before it, so
    /// it goes right after that item, as the docs say.
    #[tokio::test]
    async fn a_priority_put_back_whose_key_was_taken_goes_right_after_it() {
        use crate::store::slow::SlowWatches;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(store.clone());
        let pq = crate::PriorityQueue::new(&client, "pq").unwrap();
        pq.enqueue("A", 1).await.unwrap();
        *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
        let dropped = tokio::time::timeout(Duration::from_millis(20), pq.dequeue()).await;
        assert!(dropped.is_err(), "the dequeue was not dropped");
        tokio::time::sleep(Duration::from_millis(150)).await;
        *store.delay_deletes.lock().unwrap() = None;
        // A is held; another process's producer enqueues B at the same priority, and C
        // after it.
        let other = crate::PriorityQueue::new(&Client::from_arc(store.clone()), "pq").unwrap();
        other.enqueue("B", 1).await.unwrap();
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(300)).await;
        other.enqueue("C", 1).await.unwrap();
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(String::from_utf8(other.dequeue().await.unwrap()).unwrap());
        }
        assert_eq!(order, ["B", "A", "C"]);
    }

    /// `inner`, except that the first put-back with a marker (a txn writing a
    /// `…/returned/…` key) fails in flight (a timeout: not applied here, but its outcome is
    /// unknown to the caller), as a slow store's may.
    #[derive(Debug)]
    struct FirstMarkerTimesOut {
        inner: Arc<dyn Store>,
        failed: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl crate::store::slow::Hooks for FirstMarkerTimesOut {
        fn inner(&self) -> &dyn Store {
            &*self.inner
        }
        async fn txn(&self, txn: Txn) -> Result<crate::store::TxnResponse> {
            let marker = txn.success.iter().any(|op| {
                matches!(op, TxnOp::Put { key, .. } if key.windows(10).any(|w| w == b"/returned/"))
            });
            if marker && !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::Timeout {
                    operation: "txn",
                    after: Duration::from_secs(5),
                });
            }
            self.inner.txn(txn).await
        }
    }

    /// Under a role on the queue's prefix alone (the set-up the docs now support: "the
    /// put-back goes without the marker"), a slow store (the reason dequeues are dropped
    /// mid-claim) times out the first put-back. Every later send is refused for the marker,
    /// and was refused for it the first time too: the item must still go back without one,
    /// not be resent for ever, in neither the handle nor the store.
    #[tokio::test]
    async fn a_put_back_refused_after_a_timeout_still_goes_back_without_a_marker() {
        use crate::store::slow::SlowWatches;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let store = Arc::new(FirstMarkerTimesOut {
            inner: RoleOnJobs::new(slow.clone()),
            failed: Default::default(),
        });
        let client = Client::from_arc(store.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue("A").await.unwrap();
        claim_for_nobody(&q, &slow).await;
        tokio::time::sleep(HOLD_FOR + Duration::from_secs(5)).await;
        assert!(
            store.failed.load(std::sync::atomic::Ordering::SeqCst),
            "no put-back sent"
        );
        let keys: Vec<_> = slow.inner.range(Range::prefix("")).await.unwrap().kvs;
        let other = Queue::new(&client, "jobs").unwrap();
        let taken = other.try_dequeue().await.unwrap();
        assert_eq!(
            taken.as_deref(),
            Some(&b"A"[..]),
            "5 s on, the item is not back in the store (keys: {keys:?}); the handle still \
             counts it as being sent: len = {}",
            q.len().await.unwrap()
        );
    }

    /// A put-back refused outright leaves the item held in the handle, and is sent again
    /// later: it is not lost with the handle (and its clones) while the process lives, and
    /// is back in the store once the store takes it.
    #[tokio::test]
    async fn a_refused_put_back_is_not_lost_when_its_handle_is_dropped() {
        use crate::store::slow::SlowWatches;
        use std::sync::atomic::Ordering::Relaxed;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let role = RoleOnJobs::new(slow.clone());
        let client = Client::from_arc(role.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue("A").await.unwrap();
        role.refuse_puts.store(true, Relaxed);
        claim_for_nobody(&q, &slow).await;
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(300)).await;
        assert_eq!(q.len().await.unwrap(), 1, "held");
        // The worker is done with this queue handle; the role is given back.
        drop(q);
        role.refuse_puts.store(false, Relaxed);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let other = Queue::new(&client, "jobs").unwrap();
        assert_eq!(
            other.try_dequeue().await.unwrap().as_deref(),
            Some(&b"A"[..]),
            "the item is gone with its handle, the process alive"
        );
    }

    /// The marker is refused (an item near the request limit: `InvalidArgument`); the first
    /// bare put-back times out unapplied, and meanwhile another producer enqueues an item
    /// of the same value at the same level, which takes the emptied level's key.
    #[derive(Debug)]
    struct BareRace {
        inner: Arc<crate::store::slow::SlowWatches>,
        raced: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl crate::store::slow::Hooks for BareRace {
        fn inner(&self) -> &dyn Store {
            &*self.inner
        }
        async fn txn(&self, txn: Txn) -> Result<crate::store::TxnResponse> {
            let puts: Vec<(Vec<u8>, Vec<u8>)> = txn
                .success
                .iter()
                .filter_map(|op| match op {
                    TxnOp::Put { key, value, .. } => Some((key.clone(), value.clone())),
                    _ => None,
                })
                .collect();
            if puts
                .iter()
                .any(|(k, _)| k.windows(10).any(|w| w == b"/returned/"))
            {
                return Err(Error::InvalidArgument(
                    "etcdserver: request is too large".into(),
                ));
            }
            let put_back =
                txn.compares.len() == 1 && puts.first().is_some_and(|(k, _)| k.starts_with(b"pq/"));
            if put_back && !self.raced.swap(true, std::sync::atomic::Ordering::SeqCst) {
                // Another producer's enqueue of the same value lands at that key.
                let (key, value) = puts[0].clone();
                self.inner.put(&key, &value, 0).await.unwrap();
                return Err(Error::Timeout {
                    operation: "txn",
                    after: Duration::from_secs(5),
                });
            }
            self.inner.txn(txn).await
        }
    }

    /// A priority queue's bare put-back whose answer was lost, finding an item of the same
    /// value with no lease under its key, does not take it for its own: it may be another
    /// producer's (the level's next key), and ours would be lost. Ours goes under the next
    /// key: two items in the store, as two were enqueued.
    #[tokio::test]
    async fn a_bare_put_back_does_not_take_an_equal_item_for_its_own() {
        use crate::store::slow::SlowWatches;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let store = Arc::new(BareRace {
            inner: slow.clone(),
            raced: Default::default(),
        });
        let client = Client::from_arc(store.clone());
        let pq = crate::PriorityQueue::new(&client, "pq").unwrap();
        pq.enqueue("reindex", 1).await.unwrap();
        *slow.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
        let dropped = tokio::time::timeout(Duration::from_millis(20), pq.dequeue()).await;
        assert!(dropped.is_err(), "the dequeue was not dropped");
        tokio::time::sleep(Duration::from_millis(150)).await;
        *slow.delay_deletes.lock().unwrap() = None;
        tokio::time::sleep(HOLD_FOR + Duration::from_secs(2)).await;
        assert!(
            store.raced.load(std::sync::atomic::Ordering::SeqCst),
            "no bare put-back"
        );
        let items: Vec<_> = slow
            .inner
            .range(Range::prefix("pq/"))
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect();
        assert_eq!(
            items.len(),
            2,
            "the other producer's item and ours: {items:?}"
        );
    }
}

#[cfg(test)]
mod put_back_order {
    use super::*;
    use std::time::Duration;

    /// As the docs say: a priority queue's put-back keeps its place among the items still
    /// there, but once its level emptied, the level's numbering starts again at 0 (as Go's
    /// does), so an item enqueued at the level since comes before it. Here the level's one
    /// item (OLD, at sequence 5) is claimed for a dropped dequeue, and NEW is enqueued at
    /// the level: it gets sequence 0. OLD goes back under its own key, after NEW.
    #[tokio::test]
    async fn a_priority_put_back_after_its_level_emptied_comes_after_newer_items() {
        use crate::store::slow::SlowWatches;
        let store = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let client = Client::from_arc(store.clone());
        let pq = crate::PriorityQueue::new(&client, "pq").unwrap();
        for v in ["a", "b", "c", "d", "e", "OLD"] {
            pq.enqueue(v, 1).await.unwrap();
        }
        for _ in 0..5 {
            pq.dequeue().await.unwrap();
        }
        // OLD (pq/00001/0000000000000005) is claimed for a dequeue that is dropped.
        *store.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
        let dropped = tokio::time::timeout(Duration::from_millis(20), pq.dequeue()).await;
        assert!(dropped.is_err(), "the dequeue was not dropped");
        tokio::time::sleep(Duration::from_millis(150)).await;
        *store.delay_deletes.lock().unwrap() = None;
        // Another process enqueues NEW at the same priority, while OLD is held.
        let other = crate::PriorityQueue::new(&Client::from_arc(store.clone()), "pq").unwrap();
        other.enqueue("NEW", 1).await.unwrap();
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(300)).await;
        let keys: Vec<String> = store
            .range(Range::prefix("pq/"))
            .await
            .unwrap()
            .kvs
            .iter()
            .map(|kv| format!("{}={}", kv.key_str(), String::from_utf8_lossy(&kv.value)))
            .collect();
        let mut order = Vec::new();
        for _ in 0..2 {
            order.push(String::from_utf8(other.dequeue().await.unwrap()).unwrap());
        }
        assert_eq!(order, ["NEW", "OLD"], "keys: {keys:?}");
        assert!(
            keys[0].starts_with("pq/00001/0000000000000000=NEW"),
            "{keys:?}"
        );
        assert!(
            keys[1].starts_with("pq/00001/0000000000000005=OLD"),
            "{keys:?}"
        );
    }
}

#[cfg(test)]
mod put_back_out_of_space {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// etcd under the NOSPACE alarm: puts and lease grants fail ("database space
    /// exceeded", which Baton maps to a retryable `Error::Store`, as etcd answers it after a
    /// round trip), deletes pass.
    #[derive(Debug)]
    struct NoSpace {
        inner: Arc<crate::store::slow::SlowWatches>,
        on: AtomicBool,
        /// Lease grants pass (the alarm began after the put-back's grant).
        grants_pass: AtomicBool,
    }

    fn full() -> Error {
        Error::Store("etcdserver: mvcc: database space exceeded".into())
    }

    /// Whether `txn` puts (what etcd refuses under the alarm).
    fn puts(txn: &Txn) -> bool {
        txn.success
            .iter()
            .chain(txn.failure.iter())
            .any(|op| matches!(op, TxnOp::Put { .. }))
    }

    #[async_trait::async_trait]
    impl crate::store::slow::Hooks for NoSpace {
        fn inner(&self) -> &dyn Store {
            &*self.inner
        }
        async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
            if puts(&txn) && self.on.load(Ordering::SeqCst) {
                return Err(full());
            }
            self.inner.txn(txn).await
        }
        async fn lease_grant(&self, ttl: std::time::Duration) -> Result<crate::store::LeaseGrant> {
            if self.on.load(Ordering::SeqCst) && !self.grants_pass.load(Ordering::SeqCst) {
                // A round trip to a slow etcd.
                tokio::time::sleep(Duration::from_millis(300)).await;
                return Err(full());
            }
            self.inner.lease_grant(ttl).await
        }
    }

    /// An item claimed for a dropped dequeue cannot go back (NOSPACE: its put-back's lease
    /// grant fails, so nothing is sent: `PutBack::Unsent`). It stays held by the handle, and
    /// the put-back task retries. A dequeue of the same handle that began while the task was
    /// trying (the item then in neither the store nor `held`) waits on the store's watch for
    /// a put that cannot come, and is never given the item its own handle holds.
    #[tokio::test]
    async fn a_dequeue_gets_an_item_whose_put_back_was_never_sent() {
        a_dequeue_gets_an_item_the_store_has_no_space_for(false).await;
    }

    /// The same, with the alarm begun after the put-back's lease grant: its transaction is
    /// refused for space, which says it was not applied. The item is not resent in a loop,
    /// out of everyone's reach: the handle's dequeue gets it.
    #[tokio::test]
    async fn a_dequeue_gets_an_item_whose_put_back_was_refused_for_space() {
        a_dequeue_gets_an_item_the_store_has_no_space_for(true).await;
    }

    async fn a_dequeue_gets_an_item_the_store_has_no_space_for(grants_pass: bool) {
        use crate::store::slow::SlowWatches;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let store = Arc::new(NoSpace {
            inner: slow.clone(),
            on: AtomicBool::new(false),
            grants_pass: AtomicBool::new(grants_pass),
        });
        let client = Client::from_arc(store.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue("X").await.unwrap();
        store.on.store(true, Ordering::SeqCst);
        super::tests::claim_for_nobody(&q, &slow).await;
        // X is held; after HOLD_FOR the task tries to put it back (a 300 ms lease grant).
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(100)).await;
        let got = tokio::time::timeout(Duration::from_secs(5), q.dequeue()).await;
        assert!(
            matches!(&got, Ok(Ok(v)) if v == b"X"),
            "the handle holds X, yet its dequeue got {got:?}"
        );
    }

    /// The put-back's first send loses its answer (it lands later); its resend is
    /// refused for space. The marker read then finds nothing, and the put-back gives the
    /// item back to the handle as `Unsent`, revoking the marker's lease. But the lost send
    /// is applied between that read and the revoke (an earlier request etcd applies late):
    /// the item is in the store (the revoke deletes the marker, not the item, which has no
    /// lease) and held by the handle. Two dequeues both get it.
    #[derive(Debug)]
    struct LateLanding {
        inner: Arc<crate::store::slow::SlowWatches>,
        on: AtomicBool,
        sent: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl crate::store::slow::Hooks for LateLanding {
        fn inner(&self) -> &dyn Store {
            &*self.inner
        }
        async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
            // The first put-back send goes through (the slow store loses its answer and
            // applies it after the next read); the later ones are refused for space.
            if puts(&txn)
                && self.on.load(Ordering::SeqCst)
                && self.sent.fetch_add(1, Ordering::SeqCst) > 0
            {
                return Err(full());
            }
            self.inner.txn(txn).await
        }
    }

    #[tokio::test]
    async fn a_put_back_refused_for_space_after_a_lost_answer_is_not_delivered_twice() {
        use crate::store::slow::SlowWatches;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let store = Arc::new(LateLanding {
            inner: slow.clone(),
            on: AtomicBool::new(false),
            sent: std::sync::atomic::AtomicUsize::new(0),
        });
        let client = Client::from_arc(store.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue("X").await.unwrap();
        super::tests::claim_for_nobody(&q, &slow).await;
        // X is held; after HOLD_FOR the task puts it back: its first send lands late.
        store.on.store(true, Ordering::SeqCst);
        slow.put_lands_after_next_read.store(true, Ordering::SeqCst);
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(1000)).await;
        let mut got = Vec::new();
        for _ in 0..2 {
            if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_millis(500), q.dequeue()).await {
                got.push(String::from_utf8(v).unwrap());
            }
        }
        assert!(got.len() <= 1, "X delivered twice: {got:?}");
    }
}

#[cfg(test)]
mod put_back_refused_after_a_lost_answer {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// A role that covers `__jobs/` (the marker's prefix) until the put-back's first send
    /// has gone out: then it is taken away (the role cut down to `jobs/`, as
    /// docs/security.md allows), so every later send with the marker is refused with
    /// `PermissionDenied`, and so (`reads_too`) is a read of the marker.
    #[derive(Debug)]
    struct MarkerRoleTakenAway {
        inner: Arc<crate::store::slow::SlowWatches>,
        reads_too: bool,
        /// Puts under `jobs/` are refused too (the role made read-only).
        writes_all: bool,
        sent: AtomicBool,
        revoked: AtomicBool,
    }

    impl MarkerRoleTakenAway {
        fn check(&self, key: &[u8]) -> Result<()> {
            if self.revoked.load(Ordering::SeqCst) && !key.starts_with(b"jobs/") {
                return Err(Error::PermissionDenied(format!(
                    "the etcd user's roles do not cover the key {:?}",
                    String::from_utf8_lossy(key)
                )));
            }
            Ok(())
        }
    }

    pub(super) fn marker_put(txn: &Txn) -> bool {
        txn.success.iter().any(|op| {
            matches!(op, TxnOp::Put { key, .. } if key.windows(10).any(|w| w == b"/returned/"))
        })
    }

    #[async_trait::async_trait]
    impl crate::store::slow::Hooks for MarkerRoleTakenAway {
        fn inner(&self) -> &dyn Store {
            &*self.inner
        }
        async fn range(&self, range: Range) -> Result<RangeResponse> {
            if self.reads_too {
                self.check(range.keys.bytes())?;
            }
            self.inner.range(range).await
        }
        async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
            for c in &txn.compares {
                self.check(&c.key)?;
            }
            for op in txn.success.iter().chain(&txn.failure) {
                if let TxnOp::Put { key, .. } = op {
                    self.check(key)?;
                    if self.writes_all && self.revoked.load(Ordering::SeqCst) {
                        return Err(Error::PermissionDenied("the role is read-only".into()));
                    }
                }
            }
            let first = marker_put(&txn) && !self.sent.swap(true, Ordering::SeqCst);
            let r = self.inner.txn(txn).await;
            if first {
                self.revoked.store(true, Ordering::SeqCst);
            }
            r
        }
    }

    async fn run(
        reads_too: bool,
        writes_all: bool,
        lose: impl Fn(&crate::store::slow::SlowWatches),
    ) {
        use crate::store::slow::SlowWatches;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let store = Arc::new(MarkerRoleTakenAway {
            inner: slow.clone(),
            reads_too,
            writes_all,
            sent: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
        });
        let client = Client::from_arc(store.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue("X").await.unwrap();
        super::tests::claim_for_nobody(&q, &slow).await;
        // X is held; after HOLD_FOR the task puts it back: its first send loses its answer.
        lose(&slow);
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(2000)).await;
        assert!(store.revoked.load(Ordering::SeqCst), "no put-back sent");
        let items: Vec<String> = slow
            .inner
            .range(Range::prefix("jobs/"))
            .await
            .unwrap()
            .kvs
            .iter()
            .map(|kv| format!("{}={}", kv.key_str(), String::from_utf8_lossy(&kv.value)))
            .collect();
        let held = q.len().await.unwrap();
        assert_eq!(
            held, 1,
            "X was enqueued once; the handle counts {held} (store: {items:?})"
        );
        let mut got = Vec::new();
        for _ in 0..2 {
            if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_millis(500), q.dequeue()).await {
                got.push(String::from_utf8(v).unwrap());
            }
        }
        assert!(got.len() <= 1, "X delivered twice: {got:?}");
    }

    /// The brief's case: the first send (with the marker) fails in flight and lands right
    /// after the next read; the resend is refused for the marker's prefix, the marker read
    /// finds nothing (the read that the late send overtakes), and the item goes back
    /// without a marker, under the next key, as the bare put-back does not know an
    /// earlier send lost its answer: X is queued twice.
    #[tokio::test]
    async fn a_put_back_refused_after_a_late_landing_is_not_queued_twice() {
        run(false, false, |slow| {
            slow.put_lands_after_next_read.store(true, Ordering::SeqCst)
        })
        .await;
    }

    /// The case real etcd can reach (a send authorized before a role change and applied
    /// after it fails with "revision of auth store is old"): the first send lands, its
    /// answer is lost, then the role loses `__jobs/`. The resend is refused, the read of
    /// the marker is refused too ("the earlier sends wrote the same marker, refused so":
    /// not so), and the item goes back without a marker, under the next key: queued twice.
    #[tokio::test]
    async fn a_put_back_that_landed_before_its_role_lost_the_marker_is_not_queued_twice() {
        run(true, false, |slow| {
            slow.lose_next_reply.store(true, Ordering::SeqCst)
        })
        .await;
    }

    /// The same, with the role made read-only on `jobs/` (and nothing on `__jobs/`): the
    /// bare put-back is refused as well, and the item is given back to the handle's
    /// dequeues (`PutBack::Refused`) though it is in the store: delivered twice.
    #[tokio::test]
    async fn a_put_back_that_landed_before_its_role_went_read_only_is_not_delivered_twice() {
        run(true, true, |slow| {
            slow.lose_next_reply.store(true, Ordering::SeqCst)
        })
        .await;
    }
}

#[cfg(test)]
mod put_back_blocks_the_next_held {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// The first put-back (a txn with a marker) fails in flight, unapplied or (`lands_first`)
    /// applied with its answer lost; every later one is refused for space (the NOSPACE alarm
    /// began): after a lost answer, the put-back is resent as any failure (7dca1dc), until
    /// space is freed. Enqueues and claims pass.
    #[derive(Debug)]
    pub(super) struct PutBacksFull {
        pub(super) inner: Arc<crate::store::slow::SlowWatches>,
        pub(super) lost: AtomicBool,
        pub(super) lands_first: bool,
    }

    #[async_trait::async_trait]
    impl crate::store::slow::Hooks for PutBacksFull {
        fn inner(&self) -> &dyn Store {
            &*self.inner
        }
        async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
            if super::put_back_refused_after_a_lost_answer::marker_put(&txn) {
                if !self.lost.swap(true, Ordering::SeqCst) {
                    if self.lands_first {
                        self.inner.txn(txn).await?;
                    }
                    return Err(Error::Store("request timed out".into()));
                }
                return Err(Error::Store(
                    "etcdserver: mvcc: database space exceeded".into(),
                ));
            }
            self.inner.txn(txn).await
        }
    }

    /// While A's put-back is in its resend loop (a lost answer, then NOSPACE: for as long
    /// as the alarm lasts), `len` waits for it to settle on every call: a whole request
    /// timeout each (entry 46 fixed the same for a refused put-back).
    #[tokio::test]
    async fn len_does_not_wait_a_request_timeout_per_call_during_a_resend_loop() {
        use crate::store::slow::SlowWatches;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let store = Arc::new(PutBacksFull {
            inner: slow.clone(),
            lost: AtomicBool::new(false),
            lands_first: false,
        });
        let client = Client::from_arc(store.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue("A").await.unwrap();
        super::tests::claim_for_nobody(&q, &slow).await;
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(200)).await;
        assert!(store.lost.load(Ordering::SeqCst), "no put-back sent");
        let started = tokio::time::Instant::now();
        let n = q.len().await.unwrap();
        assert_eq!(n, 1);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "len took {:?}",
            started.elapsed()
        );
    }

    /// Item A's put-back is in its resend loop (a lost answer, then NOSPACE). Item B is
    /// won by a claim whose dequeue was dropped, while a dequeue D of the same handle waits
    /// (it lost the race for B and read an empty store). B is held by the handle and was
    /// never sent, yet D was not given it: `held_for_us` waited for a task that was not
    /// `returning` or was parked, and the task is busy resending A for as long as the
    /// alarm lasts. D hung with B in its own handle.
    #[tokio::test]
    async fn a_waiting_dequeue_gets_an_item_held_behind_a_put_back_in_its_resend_loop() {
        use crate::store::slow::SlowWatches;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let store = Arc::new(PutBacksFull {
            inner: slow.clone(),
            lost: AtomicBool::new(false),
            lands_first: false,
        });
        let client = Client::from_arc(store.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue("A").await.unwrap();
        *slow.delay_deletes.lock().unwrap() = Some(Duration::from_millis(100));
        let dropped = tokio::time::timeout(Duration::from_millis(20), q.dequeue()).await;
        assert!(dropped.is_err(), "the dequeue was not dropped");
        tokio::time::sleep(Duration::from_millis(150)).await;
        // A is held; after HOLD_FOR its put-back starts, loses its answer, and loops.
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(200)).await;
        assert!(store.lost.load(Ordering::SeqCst), "no put-back sent");
        assert_eq!(q.try_dequeue().await.unwrap(), None, "A is out of reach");
        // B: E's claim takes 500 ms and E is dropped; D gives up waiting for E's claim
        // after the request timeout (200 ms), claims B too (lands later: lost), reads an
        // empty store and waits.
        q.enqueue("B").await.unwrap();
        *slow.delay_deletes.lock().unwrap() = Some(Duration::from_millis(500));
        *slow.request_timeout.lock().unwrap() = Some(Duration::from_millis(200));
        let e = tokio::time::timeout(Duration::from_millis(20), q.clone().dequeue()).await;
        assert!(e.is_err(), "E was not dropped");
        let d = tokio::spawn({
            let q = q.clone();
            async move { q.dequeue_timeout(Duration::from_secs(3)).await }
        });
        tokio::time::sleep(Duration::from_millis(1000)).await;
        *slow.delay_deletes.lock().unwrap() = None;
        let got = d.await.unwrap();
        assert!(
            matches!(&got, Ok(v) if v == b"B"),
            "the handle holds B, never sent, yet its waiting dequeue got {got:?}"
        );
    }
}

#[cfg(test)]
mod put_back_landed_then_refused {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use super::put_back_refused_after_a_lost_answer::marker_put;

    /// `len()` returns at once during a resend loop (entry 74). When the send whose answer
    /// was lost had landed, the item was in the store AND in `sending`: `len()` said 2 for
    /// one item for as long as the alarm lasted (and 1 after a consumer took it from the
    /// store: the queue empty). A resend refused for space now reads the marker.
    #[tokio::test]
    async fn len_counts_a_landed_put_back_once_during_its_resend_loop() {
        use crate::store::slow::SlowWatches;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let store = Arc::new(super::put_back_blocks_the_next_held::PutBacksFull {
            inner: slow.clone(),
            lost: AtomicBool::new(false),
            lands_first: true,
        });
        let client = Client::from_arc(store.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue("A").await.unwrap();
        super::tests::claim_for_nobody(&q, &slow).await;
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(300)).await;
        assert!(store.lost.load(Ordering::SeqCst), "no put-back sent");
        let n = q.len().await.unwrap();
        assert_eq!(n, 1, "one item, A, in the store (landed); len says {n}");
    }

    /// A role that loses `__jobs/` and write on `jobs/` right after the put-back's first
    /// send (which lands; its answer is lost), and one read of `jobs/` that fails in
    /// flight (the store is flaky: a lost answer just happened).
    #[derive(Debug)]
    struct ReadOnlyAndAFlakyRead {
        inner: Arc<crate::store::slow::SlowWatches>,
        revoked: AtomicBool,
        flaky_reads: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl crate::store::slow::Hooks for ReadOnlyAndAFlakyRead {
        fn inner(&self) -> &dyn Store {
            &*self.inner
        }
        async fn range(&self, range: Range) -> Result<RangeResponse> {
            if self.revoked.load(Ordering::SeqCst) {
                let k = range.keys.bytes();
                if !k.starts_with(b"jobs/") {
                    return Err(Error::PermissionDenied("no role on __jobs/".into()));
                }
                // The bare put-back's look-up of its key (one key, not the prefix).
                if k.len() > b"jobs/".len()
                    && self
                        .flaky_reads
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                {
                    return Err(Error::Store("request timed out".into()));
                }
            }
            self.inner.range(range).await
        }
        async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
            if self.revoked.load(Ordering::SeqCst)
                && txn.success.iter().any(|op| matches!(op, TxnOp::Put { .. }))
            {
                return Err(Error::PermissionDenied("the role is read-only".into()));
            }
            let first = marker_put(&txn);
            let r = self.inner.txn(txn).await;
            if first {
                self.revoked.store(true, Ordering::SeqCst);
                r?;
                return Err(Error::Store("request timed out".into()));
            }
            r
        }
    }

    /// FIFO: the bare put-back after a lost answer is refused (read-only role) and looks
    /// for the item under its key; that read fails in flight once, and the failure is
    /// taken for "not there": the item, back in the store, is given to the handle's
    /// dequeues as well (`PutBack::Refused`): delivered twice. The `Ok(_)` branch retries
    /// such a read; the refused branch does not.
    #[tokio::test]
    async fn a_refused_bare_put_back_whose_look_up_fails_is_not_delivered_twice() {
        use crate::store::slow::SlowWatches;
        let slow = Arc::new(SlowWatches::new("mem", Duration::ZERO, Duration::ZERO));
        let store = Arc::new(ReadOnlyAndAFlakyRead {
            inner: slow.clone(),
            revoked: AtomicBool::new(false),
            flaky_reads: AtomicUsize::new(1),
        });
        let client = Client::from_arc(store.clone());
        let q = Queue::new(&client, "jobs").unwrap();
        q.enqueue("X").await.unwrap();
        super::tests::claim_for_nobody(&q, &slow).await;
        tokio::time::sleep(HOLD_FOR + Duration::from_millis(2000)).await;
        assert!(store.revoked.load(Ordering::SeqCst), "no put-back sent");
        let in_store = slow
            .inner
            .range(Range::prefix("jobs/"))
            .await
            .unwrap()
            .kvs
            .len();
        let mut got = Vec::new();
        for _ in 0..2 {
            if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_millis(500), q.dequeue()).await {
                got.push(String::from_utf8(v).unwrap());
            }
        }
        assert!(
            got.len() <= 1,
            "X enqueued once, delivered {got:?} ({in_store} in the store)"
        );
    }
}
