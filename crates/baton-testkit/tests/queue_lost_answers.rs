//! Queue claims whose answers are lost after etcd applied them (a connection cut; a
//! dequeue stopped meanwhile): every item is delivered exactly once, and the claims' markers
//! (`__NAME/claimed/…`) are gone afterwards. See docs/reliability.md entry 95.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::HashSet;
use std::time::Duration;

use baton::store::etcd::{EtcdOptions, EtcdStore};
use baton::store::Range;
use baton::{Client, PriorityQueue, Queue};
use baton_testkit::lost_answers::LoseAnswers;
use baton_testkit::proxy::FaultProxy;
use baton_testkit::EtcdServer;

async fn client(endpoints: &str) -> Client {
    baton_testkit::connect_client(endpoints, Duration::from_secs(5)).await
}

async fn store(etcd: &EtcdServer) -> EtcdStore {
    let options = EtcdOptions {
        request_timeout: Duration::from_secs(5),
        ..EtcdOptions::default()
    };
    EtcdStore::connect(&[etcd.endpoint()], options)
        .await
        .unwrap()
}

/// A FIFO or a priority queue, as one type for the test.
enum AnyQueue {
    Fifo(Queue),
    Priority(PriorityQueue),
}

impl AnyQueue {
    fn new(client: &Client, kind: &str, name: &str) -> AnyQueue {
        if kind == "fifo" {
            AnyQueue::Fifo(Queue::new(client, name).unwrap())
        } else {
            AnyQueue::Priority(PriorityQueue::new(client, name).unwrap())
        }
    }
    async fn enqueue(&self, i: usize) {
        match self {
            AnyQueue::Fifo(q) => q.enqueue(format!("{i}")).await.unwrap(),
            AnyQueue::Priority(q) => q.enqueue(format!("{i}"), (i % 3) as u16).await.unwrap(),
        }
    }
    async fn dequeue_timeout(&self, timeout: Duration) -> baton::Result<Vec<u8>> {
        match self {
            AnyQueue::Fifo(q) => q.dequeue_timeout(timeout).await,
            AnyQueue::Priority(q) => q.dequeue_timeout(timeout).await,
        }
    }
    async fn dequeue(&self) -> baton::Result<Vec<u8>> {
        match self {
            AnyQueue::Fifo(q) => q.dequeue().await,
            AnyQueue::Priority(q) => q.dequeue().await,
        }
    }
}

/// The claim markers left under `__NAME/claimed/`, waiting up to 5 s for them to go (the
/// handle's task deletes the last ones after 1 s of quiet).
async fn markers_left(direct: &Client, name: &str) -> usize {
    let prefix = format!("__{name}/claimed/");
    let mut left = 0;
    for _ in 0..50 {
        left = direct
            .store()
            .range(Range::prefix(prefix.as_bytes()))
            .await
            .unwrap()
            .kvs
            .len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    left
}

/// Two consumers, each over a store that loses the answer of every second transaction
/// that deletes (after etcd applied it): a claim that took its item, then lost the
/// answer, is resent, and the resend finds the item gone. Before the fix the dequeue then
/// failed ("may have been taken"), and the item was lost; a dequeue dropped meanwhile
/// (second phase: 0.2–2 ms timeouts) lost it with a warning. Now every item is delivered
/// exactly once, no dequeue fails, and no marker is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_whose_answers_are_lost_deliver_every_item_once() {
    const ITEMS: usize = 40;
    let etcd = EtcdServer::start_async().await;
    let direct = client(&etcd.endpoint()).await;
    for kind in ["fifo", "priority"] {
        for dropped in [false, true] {
            let name = format!("lost-{kind}-{dropped}");
            let producer = AnyQueue::new(&direct, kind, &name);
            for i in 0..ITEMS {
                producer.enqueue(i).await;
            }
            let mut consumers = Vec::new();
            let mut stores = Vec::new();
            for c in 0..2u64 {
                let lossy = LoseAnswers::new(store(&etcd).await);
                lossy.lose_every_nth_delete(2);
                stores.push(lossy.clone());
                let client = Client::from_store(lossy);
                let q = AnyQueue::new(&client, kind, &name);
                consumers.push(tokio::spawn(async move {
                    let (mut got, mut errors) = (Vec::new(), Vec::new());
                    if dropped {
                        // Dequeues dropped at any moment, until the queue stays empty.
                        let mut idle = 0;
                        for i in c.. {
                            let bound = Duration::from_micros(200 + (i % 7) * 300);
                            match tokio::time::timeout(bound, q.dequeue()).await {
                                Ok(Ok(v)) => {
                                    got.push(String::from_utf8(v).unwrap());
                                    idle = 0;
                                }
                                Ok(Err(e)) => errors.push(e.to_string()),
                                Err(_) => idle += 1,
                            }
                            if idle > 2000 {
                                break;
                            }
                        }
                    }
                    loop {
                        match q.dequeue_timeout(Duration::from_secs(2)).await {
                            Ok(v) => got.push(String::from_utf8(v).unwrap()),
                            Err(baton::Error::Timeout { .. }) => break,
                            Err(e) => errors.push(e.to_string()),
                        }
                    }
                    (got, errors)
                }));
            }
            let (seen, errors) = received_once(consumers, &name).await;
            let lost: u64 = stores.iter().map(LoseAnswers::lost).sum();
            assert!(lost >= 5, "{name}: only {lost} answers lost");
            assert!(errors.is_empty(), "{name}: dequeues failed: {errors:?}");
            let missing: Vec<usize> = (0..ITEMS)
                .filter(|i| !seen.contains(&i.to_string()))
                .collect();
            assert!(
                missing.is_empty(),
                "{name}: items lost ({lost} answers lost): {missing:?}"
            );
            assert_eq!(
                markers_left(&direct, &name).await,
                0,
                "{name}: markers left"
            );
        }
    }
}

/// The review's case: three consumers through a proxy that cuts every connection every
/// 500 ms, 480 items. It lost 4–5 items (dequeues failing "may have been taken") before
/// the fix; now none, and no dequeue fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_cut_by_connection_resets_lose_no_item() {
    const ITEMS: usize = 480;
    let etcd = EtcdServer::start_async().await;
    let direct = client(&etcd.endpoint()).await;
    let proxy = FaultProxy::start(etcd.client_port()).await;
    let name = "cut-queue";
    let q = Queue::new(&direct, name).unwrap();
    for i in 0..ITEMS {
        q.enqueue(format!("{i}")).await.unwrap();
    }
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let client = client(&proxy.url("http")).await;
        consumers.push(tokio::spawn(async move {
            let q = Queue::new(&client, name).unwrap();
            let (mut got, mut errors) = (Vec::new(), Vec::new());
            loop {
                match q.dequeue_timeout(Duration::from_secs(3)).await {
                    Ok(v) => got.push(String::from_utf8(v).unwrap()),
                    Err(baton::Error::Timeout { .. }) => break,
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (got, errors)
        }));
    }
    let cutter = {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut cuts = 0;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                proxy.reset_all();
                cuts += 1;
            }
            cuts
        });
        (stop, task)
    };
    let (seen, errors) = received_once(consumers, "cut").await;
    cutter.0.store(true, std::sync::atomic::Ordering::SeqCst);
    let cuts = cutter.1.await.unwrap();
    let missing: Vec<usize> = (0..ITEMS)
        .filter(|i| !seen.contains(&i.to_string()))
        .collect();
    assert!(
        missing.is_empty() && errors.is_empty(),
        "{} items lost ({cuts} cuts): {missing:?}; dequeues failed: {errors:?}",
        missing.len()
    );
    assert_eq!(markers_left(&direct, name).await, 0, "markers left");
}

/// A `dequeue_timeout` whose time runs out while its claim's answer is being lost (the
/// claim took the item; its error comes late, as after a connection that dies slowly): one
/// resend, then the marker, tell that the item is ours. Before, the claim sent nothing
/// more once `stop` had completed and gave up (`Unknown`): the dequeue failed "may have
/// been taken" and the item, deleted by the first send, was lost although one more
/// request could tell (the same for `baton queue pop --timeout` or a first Ctrl-C).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dequeue_timing_out_while_its_claims_answer_is_lost_loses_no_item() {
    let etcd = EtcdServer::start_async().await;
    let direct = client(&etcd.endpoint()).await;
    let name = "late-answer";
    Queue::new(&direct, name)
        .unwrap()
        .enqueue("only")
        .await
        .unwrap();
    let lossy = LoseAnswers::new(store(&etcd).await);
    lossy.delay_lost_answers(Duration::from_millis(600));
    lossy.lose_every_nth_delete(1);
    let q = Queue::new(&Client::from_store(lossy.clone()), name).unwrap();
    let dequeue = tokio::spawn(async move { q.dequeue_timeout(Duration::from_millis(200)).await });
    // The first claim's answer is being lost: lose no more (the resend's).
    while lossy.lost() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    lossy.lose_every_nth_delete(0);
    let got = dequeue.await.unwrap();
    let left = Queue::new(&direct, name).unwrap().len().await.unwrap();
    assert_eq!(lossy.lost(), 1);
    assert!(
        matches!(&got, Ok(v) if v == b"only"),
        "the item was taken and not returned: {got:?}; items left in the queue: {left}"
    );
}

/// A claim that etcd applied but whose answer did not come within the request timeout (a
/// member that applies, then stalls; a reply delayed past the timeout): the store fails it
/// with `Error::Timeout` after the whole request timeout. Before, such a first send was not
/// sent again ("the claim has had it all"), so the marker was never read: `dequeue()` and
/// `dequeue_timeout()` failed "may have been taken", a dropped dequeue's claim logged a
/// warning, and the item, deleted by the first send, was lost. Now one resend (and the
/// marker's read) is given one more request timeout: the item is returned, within about two
/// request timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_answer_times_out_after_it_took_its_item_loses_no_item() {
    let request_timeout = Duration::from_secs(1);
    let etcd = EtcdServer::start_async().await;
    let direct = client(&etcd.endpoint()).await;
    for (kind, how) in [
        ("fifo", "dequeue"),
        ("priority", "dequeue"),
        ("fifo", "timeout"),
        ("priority", "dropped"),
    ] {
        let name = format!("timed-out-{kind}-{how}");
        AnyQueue::new(&direct, kind, &name).enqueue(7).await;
        let options = EtcdOptions {
            request_timeout,
            ..EtcdOptions::default()
        };
        let inner = EtcdStore::connect(&[etcd.endpoint()], options)
            .await
            .unwrap();
        let lossy = LoseAnswers::new(inner);
        lossy.time_out_lost_answers(true);
        lossy.lose_every_nth_delete(1);
        let q = AnyQueue::new(&Client::from_store(lossy.clone()), kind, &name);
        let started = tokio::time::Instant::now();
        let lose_no_more = {
            let lossy = lossy.clone();
            tokio::spawn(async move {
                // The first claim's answer is being lost: lose no more (the resend's).
                while lossy.lost() == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                lossy.lose_every_nth_delete(0);
            })
        };
        let got = match how {
            "dequeue" => q.dequeue().await,
            "timeout" => q.dequeue_timeout(Duration::from_millis(200)).await,
            _ => {
                let dropped = tokio::time::timeout(Duration::from_millis(300), q.dequeue()).await;
                assert!(dropped.is_err(), "{name}: the dequeue was not dropped");
                q.dequeue_timeout(Duration::from_secs(5)).await
            }
        };
        let took = started.elapsed();
        lose_no_more.await.unwrap();
        let left = AnyQueue::new(&direct, kind, &name);
        let left = match &left {
            AnyQueue::Fifo(q) => q.len().await.unwrap(),
            AnyQueue::Priority(q) => q.len().await.unwrap(),
        };
        assert_eq!(lossy.lost(), 1, "{name}");
        assert!(
            matches!(&got, Ok(v) if v == b"7"),
            "{name}: the item was taken and not returned: {got:?} after {took:?}; items left \
             in the queue: {left}"
        );
        assert!(
            took < request_timeout * 2 + Duration::from_secs(2),
            "{name}: took {took:?}"
        );
        assert_eq!(left, 0, "{name}");
        assert_eq!(
            markers_left(&direct, &name).await,
            0,
            "{name}: markers left"
        );
    }
}

/// The leases etcd has now, per etcdctl.
/// The leases on `etcd` once the background revokes had up to 6 s to run.
async fn leases_once_revoked(etcd: &EtcdServer) -> Vec<String> {
    let mut left = leases(etcd);
    for _ in 0..60 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = leases(etcd);
    }
    left
}

fn leases(etcd: &EtcdServer) -> Vec<String> {
    let out = etcd.etcdctl(["lease", "list"]);
    assert!(out.status.success(), "etcdctl lease list: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect()
}

/// Each queue handle puts its claims' markers under a lease of its own (60 s, granted
/// again every 30 s). Before, it was never revoked: every short-lived handle (each
/// `baton queue pop`) left one on etcd for a minute. Now a handle's lease is revoked in
/// the background once the handle and its clones are dropped and no claim of theirs is
/// being settled, and an old one once a new one replaced it: N handles dropped, after a
/// dequeue each (FIFO and priority, one through a dequeue dropped mid-claim, one whose
/// claim's answer was lost), leave no lease once their drop has settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_queue_handles_leave_no_lease() {
    const N: usize = 6;
    let etcd = EtcdServer::start_async().await;
    let direct = client(&etcd.endpoint()).await;
    for kind in ["fifo", "priority"] {
        let name = format!("leases-{kind}");
        let producer = AnyQueue::new(&direct, kind, &name);
        for i in 0..N {
            producer.enqueue(i).await;
        }
        for i in 0..N {
            let lossy = LoseAnswers::new(store(&etcd).await);
            if i == 1 {
                // The claim's answer is lost (not the resend's): its marker tells, under
                // the lease.
                lossy.lose_every_nth_delete(1);
                let lossy = lossy.clone();
                tokio::spawn(async move {
                    while lossy.lost() == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    lossy.lose_every_nth_delete(0);
                });
            }
            let q = AnyQueue::new(&Client::from_store(lossy.clone()), kind, &name);
            if i == 2 {
                // Dropped mid-claim: the claim settles in its task, the item is put back.
                let _ = tokio::time::timeout(Duration::from_micros(300), q.dequeue()).await;
                continue;
            }
            let got = q.dequeue_timeout(Duration::from_secs(5)).await;
            assert!(got.is_ok(), "{name} #{i}: {got:?}");
            assert!(
                !leases(&etcd).is_empty(),
                "{name} #{i}: no lease was granted"
            );
        }
    }
    let left = leases_once_revoked(&etcd).await;
    assert!(
        left.is_empty(),
        "leases left after the handles were dropped: {left:?}"
    );
    for kind in ["fifo", "priority"] {
        assert_eq!(
            markers_left(&direct, &format!("leases-{kind}")).await,
            0,
            "{kind}: markers left"
        );
    }
}

/// Every consumer's items, each asserted to arrive once (`what` names the case), and their
/// errors.
async fn received_once<T: std::fmt::Display + Clone + Eq + std::hash::Hash>(
    consumers: Vec<tokio::task::JoinHandle<(Vec<T>, Vec<String>)>>,
    what: &str,
) -> (HashSet<T>, Vec<String>) {
    let mut seen = HashSet::new();
    let mut errors = Vec::new();
    for c in consumers {
        let (got, errs) = c.await.unwrap();
        for v in got {
            assert!(seen.insert(v.clone()), "{what}: {v} received twice");
        }
        errors.extend(errs);
    }
    (seen, errors)
}

/// A store over `inner` that, once armed, plays a slow etcd with a competing consumer for
/// the claims of one dequeue: each claim sent before `granted + lost_until` finds its item
/// taken by another consumer (stolen here, just before it is forwarded) and is answered
/// 0.9 request timeouts after it was sent (a slow member); the first claim sent after
/// that is applied, and its answer times out (`Error::Timeout` after the request timeout).
/// `granted`: when the last lease was asked for; `lost_until` counts from the first.
#[derive(Clone, Debug)]
struct SlowRivals {
    inner: std::sync::Arc<dyn baton::store::Store>,
    request_timeout: Duration,
    lost_until: Duration,
    state: std::sync::Arc<std::sync::Mutex<Rivals>>,
}

#[derive(Default, Debug)]
struct Rivals {
    armed: bool,
    granted: Option<tokio::time::Instant>,
    /// Armed: claims sent before this lose their item to the rival.
    steal_until: Option<tokio::time::Instant>,
    stolen: Vec<Vec<u8>>,
    timed_out: bool,
}

#[async_trait::async_trait]
impl baton::store::Store for SlowRivals {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn range(&self, range: Range) -> baton::Result<baton::store::RangeResponse> {
        self.inner.range(range).await
    }
    async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: baton::store::LeaseId,
    ) -> baton::Result<baton::store::Revision> {
        self.inner.put(key, value, lease).await
    }
    async fn delete(
        &self,
        keys: baton::store::KeyRange,
    ) -> baton::Result<(i64, baton::store::Revision)> {
        self.inner.delete(keys).await
    }
    async fn txn(&self, txn: baton::store::Txn) -> baton::Result<baton::store::TxnResponse> {
        let sent = tokio::time::Instant::now();
        let (armed, steal) = {
            let s = self.state.lock().unwrap();
            let steal = s.steal_until.is_some_and(|until| sent < until);
            (s.armed && !s.timed_out && !txn.compares.is_empty(), steal)
        };
        if !armed {
            return self.inner.txn(txn).await;
        }
        if steal {
            // Another consumer takes the item first.
            let key = txn.compares[0].key.clone();
            let found = self.inner.range(Range::key(key.clone())).await?;
            if let Some(kv) = found.kvs.into_iter().next() {
                self.inner.delete(baton::store::KeyRange::key(key)).await?;
                self.state.lock().unwrap().stolen.push(kv.value);
            }
            let answer = self.inner.txn(txn).await;
            tokio::time::sleep_until(sent + self.request_timeout * 9 / 10).await;
            return answer;
        }
        // Applied; its answer does not come within the request timeout.
        self.state.lock().unwrap().timed_out = true;
        let _ = self.inner.txn(txn).await?;
        tokio::time::sleep_until(sent + self.request_timeout).await;
        Err(baton::Error::Timeout {
            operation: "txn",
            after: self.request_timeout,
        })
    }
    async fn lease_grant(&self, ttl: Duration) -> baton::Result<baton::store::LeaseGrant> {
        let asked = tokio::time::Instant::now();
        let grant = self.inner.lease_grant(ttl).await?;
        self.state.lock().unwrap().granted = Some(asked);
        Ok(grant)
    }
    async fn lease_keep_alive(&self, id: baton::store::LeaseId) -> baton::Result<Option<Duration>> {
        self.inner.lease_keep_alive(id).await
    }
    async fn lease_revoke(&self, id: baton::store::LeaseId) -> baton::Result<()> {
        self.inner.lease_revoke(id).await
    }
    async fn lease_time_to_live(
        &self,
        id: baton::store::LeaseId,
    ) -> baton::Result<Option<Duration>> {
        self.inner.lease_time_to_live(id).await
    }
    fn lease_keep_alive_done(&self, id: baton::store::LeaseId) {
        self.inner.lease_keep_alive_done(id);
    }
    fn request_timeout(&self) -> Option<Duration> {
        self.inner.request_timeout()
    }
    async fn watch(&self, watch: baton::store::Watch) -> baton::Result<baton::store::WatchStream> {
        self.inner.watch(watch).await
    }
    async fn watch_from_now(
        &self,
        watch: baton::store::Watch,
    ) -> baton::Result<(baton::store::Revision, baton::store::WatchStream)> {
        self.inner.watch_from_now(watch).await
    }
    async fn compact(&self, revision: baton::store::Revision) -> baton::Result<()> {
        self.inner.compact(revision).await
    }
}

/// The claim markers' lease is reused for `ttl - 3 × request timeout` (54 s here, with a
/// 2 s request timeout), so that a claim's marker outlives the claim (two request timeouts
/// at most). But one dequeue takes the lease once, before its read, and claims the items
/// it read one after another under it: on a slow etcd (answers in 1.8 s) with another
/// consumer taking the first items, the claims that lose take that long each, and the one
/// that is applied, but whose answer times out, is settled after the lease has expired:
/// its marker is gone with the lease, so the resend cannot tell that our first send took
/// the item, and the dequeue fails "may have been taken" with the item lost. Every item
/// must arrive exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_late_in_a_dequeue_keeps_its_marker_until_settled() {
    const ITEMS: usize = 8;
    let request_timeout = Duration::from_secs(2);
    let etcd = EtcdServer::start_async().await;
    let direct = client(&etcd.endpoint()).await;
    let name = "aged";
    let producer = Queue::new(&direct, name).unwrap();
    producer.enqueue("first").await.unwrap();
    let inner = EtcdStore::connect(
        &[etcd.endpoint()],
        EtcdOptions {
            request_timeout,
            ..EtcdOptions::default()
        },
    )
    .await
    .unwrap();
    let rivals = SlowRivals {
        inner: std::sync::Arc::new(inner),
        request_timeout,
        lost_until: Duration::from_millis(59_000),
        state: Default::default(),
    };
    let q = Queue::new(&Client::from_store(rivals.clone()), name).unwrap();
    // The handle's lease is granted with its first dequeue.
    assert_eq!(q.dequeue().await.unwrap(), b"first");
    let granted = rivals.state.lock().unwrap().granted.unwrap();
    for i in 0..ITEMS {
        producer.enqueue(format!("{i}")).await.unwrap();
    }
    // Still young enough to be reused (54 s).
    tokio::time::sleep_until(granted + Duration::from_millis(52_000)).await;
    {
        let mut s = rivals.state.lock().unwrap();
        s.armed = true;
        s.steal_until = Some(granted + rivals.lost_until);
    }
    let got = q.dequeue().await;
    let (stolen, timed_out) = {
        let s = rivals.state.lock().unwrap();
        (s.stolen.clone(), s.timed_out)
    };
    assert!(timed_out, "no claim timed out; stolen: {}", stolen.len());
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    for v in stolen.iter().cloned() {
        assert!(seen.insert(v), "stolen twice");
    }
    let got_ok = got.as_ref().ok().cloned();
    if let Some(v) = &got_ok {
        assert!(seen.insert(v.clone()), "received twice");
    }
    while let Some(v) = producer.try_dequeue().await.unwrap() {
        assert!(
            seen.insert(v.clone()),
            "{:?} received twice",
            String::from_utf8_lossy(&v)
        );
    }
    assert!(
        got.is_ok(),
        "the dequeue failed: {got:?} ({} claims lost to the rival first, {:?} after the \
         lease was asked for); items seen: {} of {ITEMS}",
        stolen.len(),
        granted.elapsed(),
        seen.len()
    );
    assert_eq!(seen.len(), ITEMS, "items lost");
}

/// `close()` on a handle while a clone's claim, whose answer was lost, is being settled
/// (its marker tells, under the lease): the lease is left to that claim, which still gets
/// its item; the clone dequeues on afterwards (under a new lease), and once it is dropped
/// no lease nor marker is left. Every item arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_during_a_clones_claim_loses_no_item() {
    let etcd = EtcdServer::start_async().await;
    let direct = client(&etcd.endpoint()).await;
    let name = "closing";
    let producer = Queue::new(&direct, name).unwrap();
    for i in 0..3 {
        producer.enqueue(format!("{i}")).await.unwrap();
    }
    let lossy = LoseAnswers::new(store(&etcd).await);
    lossy.delay_lost_answers(Duration::from_millis(1500));
    lossy.lose_every_nth_delete(1);
    let q = Queue::new(&Client::from_store(lossy.clone()), name).unwrap();
    let c = q.clone();
    let first = tokio::spawn({
        let c = c.clone();
        async move { c.dequeue().await }
    });
    while lossy.lost() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    lossy.lose_every_nth_delete(0);
    // The claim's answer is being lost: its marker's lease must outlive it.
    let closing = tokio::time::Instant::now();
    q.close().await.unwrap();
    assert!(
        closing.elapsed() < Duration::from_millis(500),
        "close waited for the claim"
    );
    let mut seen = HashSet::new();
    let got = first.await.unwrap().unwrap();
    assert!(seen.insert(got));
    for _ in 0..2 {
        let got = c.dequeue_timeout(Duration::from_secs(5)).await.unwrap();
        assert!(seen.insert(got.clone()), "{got:?} received twice");
    }
    assert_eq!(seen.len(), 3);
    // (len: a dequeue would give the producer's handle a lease of its own.)
    assert_eq!(producer.len().await.unwrap(), 0);
    drop(c);
    let left = leases_once_revoked(&etcd).await;
    assert!(left.is_empty(), "leases left: {left:?}");
    assert_eq!(markers_left(&direct, name).await, 0, "markers left");
}
