//! The gRPC channel under the etcd client: a connection per member, and each request sent to
//! a connected member with the fewest requests still waiting for an answer.
//!
//! etcd-client's own channel (tonic's balancer) sends each request to a connected member
//! picked at random: tonic reports every connection's load as 0. A member that is alive but
//! silent (paused, its packets lost) then gets its share of every request, and of every copy
//! a hedged request sends to get past it: on a 3-member cluster with one member paused, a
//! third of the writes waited out the request timeout, all four copies of a read went to it
//! 1 time in 81, and 1 watch creation in 27 failed after the request timeout.
//!
//! Here a request goes, in this order of preference, to a member whose connection is made
//! (as tonic's balancer does: a member that does not answer TCP, or never finishes a TLS
//! handshake, gets no request while another member is connected; its connection is made in
//! the background, again after each failure), that is not passed over, with the fewest
//! requests waiting for their response headers, ties taken in turn. So a copy sent while
//! the first waits goes to another member. A member is passed over for [`AVOID_FOR`] when a
//! request on it failed (refused, reset: it is then connected again in the background) or
//! when it left a request unanswered for [`SILENT_AFTER`] while answering nothing else (the
//! request then dropped, as a hedged copy is when another copy wins); any answer from it ends
//! that at once. A request made while no member is connected waits for the first member
//! connected, as with tonic's balancer (a second look found that sending it to a member
//! still connecting made a store with credentials fail to connect when the first endpoint
//! listed did not answer TCP, and cost every connect dial/16 then); once every member's
//! connection failed once more since it began to wait, it goes to a member not connected,
//! to get that member's error (a refused certificate, a refused port).
//!
//! A first version of this (9e413b5) was reverted (1200395) because it sent requests to
//! members whose connection was still being made (6 of 20 puts took ~5 s with a member that
//! does not answer TCP listed) and to a killed member, which failed at once and so was never
//! busy (`bench distinct` at ~350 ops/s against ~600). Those are what "connected" and
//! "passed over" are for.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client as ec;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::channel::Change;
use tonic::transport::Endpoint;
use tower::{BoxError, Service, ServiceExt};

use super::lock_unpoisoned;

/// A request unanswered this long, while its member answered nothing else, marks the member
/// silent once the request is dropped. etcd answers a healthy request's headers within
/// milliseconds; the hedged copies of a request go a share of the request timeout apart.
pub(super) const SILENT_AFTER: Duration = Duration::from_millis(500);

/// How long a silent member, or one that failed to connect, is passed over.
pub(super) const AVOID_FOR: Duration = Duration::from_secs(10);

/// The first and the largest pause between two attempts to connect a member in the
/// background.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_millis(500);

/// Endpoints the client adds or removes (etcd-client sends its endpoints at connect).
type Changes = mpsc::Receiver<Change<http::Uri, Endpoint>>;

/// The channel etcd-client is built with ([`ec::BalancedChannelBuilder`]).
#[derive(Debug)]
pub(super) struct Members {
    /// Where each member's connection runs its tasks: the runtime the store was connected
    /// on, as with tonic's own channel, so that no other runtime's shutdown ends them.
    pub(super) runtime: tokio::runtime::Handle,
}

impl ec::BalancedChannelBuilder for Members {
    type Error = ec::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> std::result::Result<(ec::Channel, mpsc::Sender<Change<http::Uri, Endpoint>>), ec::Error>
    {
        let (sender, changes) = mpsc::channel(buffer_size.max(1));
        let channel = Balanced {
            shared: Arc::new(Shared {
                members: RwLock::new(Arc::from(Vec::new())),
                changes: StdMutex::new(changes),
                turn: AtomicUsize::new(0),
                epoch: Instant::now(),
                runtime: self.runtime,
                news: Arc::new(tokio::sync::Notify::new()),
            }),
        };
        Ok((
            ec::Channel::Custom(tower::util::BoxCloneSyncService::new(channel)),
            sender,
        ))
    }
}

/// One member's connection and what is known of its answers.
struct Member {
    uri: http::Uri,
    endpoint: Endpoint,
    /// Lazy at first (it connects on its first request); replaced by a connected one when
    /// a background connect succeeds.
    channel: RwLock<tonic::transport::Channel>,
    /// Its connection is made: a request on it was answered, or a background connect
    /// succeeded, and no request failed on it since.
    connected: AtomicBool,
    /// A background connect is running.
    connecting: AtomicBool,
    /// How many background connects failed.
    failed_connects: AtomicU64,
    /// Told whenever a background connect ends or the member turns connected.
    news: Arc<tokio::sync::Notify>,
    /// Requests sent and not yet answered (response headers or an error).
    waiting: AtomicUsize,
    /// When it last answered, in nanoseconds since [`Shared::epoch`].
    answered: AtomicU64,
    /// Passed over until then (nanoseconds since [`Shared::epoch`]; 0: not passed over).
    avoid_until: AtomicU64,
}

struct Shared {
    members: RwLock<Arc<[Arc<Member>]>>,
    changes: StdMutex<Changes>,
    /// Whose turn it is among members that tie.
    turn: AtomicUsize,
    epoch: Instant,
    runtime: tokio::runtime::Handle,
    /// Told whenever a background connect ends or a member turns connected.
    news: Arc<tokio::sync::Notify>,
}

impl Shared {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Take in the endpoints added or removed since the last request.
    fn apply_changes(&self, changes: &mut Changes) {
        while let Ok(change) = changes.try_recv() {
            let mut members = self
                .members
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut list: Vec<Arc<Member>> = members.iter().cloned().collect();
            match change {
                Change::Insert(uri, endpoint) => {
                    list.retain(|m| m.uri != uri);
                    // Its tasks (the buffer's worker, the connection) on the store's runtime.
                    let _entered = self.runtime.enter();
                    list.push(Arc::new(Member {
                        uri,
                        channel: RwLock::new(endpoint.connect_lazy()),
                        endpoint,
                        connected: AtomicBool::new(false),
                        connecting: AtomicBool::new(false),
                        failed_connects: AtomicU64::new(0),
                        news: self.news.clone(),
                        waiting: AtomicUsize::new(0),
                        answered: AtomicU64::new(0),
                        avoid_until: AtomicU64::new(0),
                    }));
                }
                Change::Remove(uri) => list.retain(|m| m.uri != uri),
            }
            *members = Arc::from(list);
        }
    }

    fn members(&self) -> Arc<[Arc<Member>]> {
        if let Ok(mut changes) = self.changes.try_lock() {
            self.apply_changes(&mut changes);
        }
        let members = self
            .members
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if !members.is_empty() {
            return members;
        }
        // Another request may be taking the first endpoints in: wait for it.
        self.apply_changes(&mut lock_unpoisoned(&self.changes));
        self.members
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The member the next request goes to. While no member is connected, it waits until
    /// one is (as tonic's balancer waits for a ready endpoint), or until every member's
    /// connection failed once more since the wait began: then the request goes to a member
    /// whose connection is not made, to get that member's error.
    async fn choose(&self) -> Option<Arc<Member>> {
        let members = self.members();
        if members.len() <= 1 {
            // One member: its channel connects (and connects again) by itself.
            return members.first().cloned();
        }
        let mut since: Option<Vec<u64>> = None;
        loop {
            let news = self.news.notified();
            tokio::pin!(news);
            news.as_mut().enable();
            let connected = members.iter().any(|m| m.connected.load(Ordering::Acquire));
            let all_failed = since.as_ref().is_some_and(|since| {
                members
                    .iter()
                    .zip(since)
                    .all(|(m, &before)| m.failed_connects.load(Ordering::Acquire) > before)
            });
            if connected || all_failed {
                return self.pick(&members);
            }
            for member in members.iter() {
                self.connect_in_background(member);
            }
            if since.is_none() {
                since = Some(
                    members
                        .iter()
                        .map(|m| m.failed_connects.load(Ordering::Acquire))
                        .collect(),
                );
            }
            news.await;
        }
    }

    /// Among `members` (two or more): connected if any is, then not passed over if any is
    /// not, then the fewest waiting, then in turn. Members not connected are connected in
    /// the background.
    fn pick(&self, members: &[Arc<Member>]) -> Option<Arc<Member>> {
        let n = members.len();
        let now = self.now();
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        // (not connected, passed over, waiting): the least wins.
        type Rank = (bool, bool, usize);
        let mut best: Option<(&Arc<Member>, Rank)> = None;
        for k in 0..n {
            let member = &members[(start + k) % n];
            let connected = member.connected.load(Ordering::Relaxed);
            if !connected {
                self.connect_in_background(member);
            }
            let rank = (
                !connected,
                member.avoid_until.load(Ordering::Relaxed) > now,
                member.waiting.load(Ordering::Relaxed),
            );
            if best.as_ref().is_none_or(|(_, b)| rank < *b) {
                best = Some((member, rank));
            }
        }
        best.map(|(m, _)| m.clone())
    }

    /// Make `member`'s connection in a task of its own, trying again until it is made or
    /// the member is gone, unless such a task is running.
    fn connect_in_background(&self, member: &Arc<Member>) {
        if member.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let member: Weak<Member> = Arc::downgrade(member);
        // On a runtime shut down, nothing runs: requests still go to the member's channel.
        drop(self.runtime.spawn(async move {
            let mut pause = RECONNECT_MIN;
            loop {
                let Some(endpoint) = member.upgrade().map(|m| m.endpoint.clone()) else {
                    return;
                };
                // Bounded by the endpoint's connect timeout (the dial timeout).
                let made = endpoint.connect().await;
                let Some(m) = member.upgrade() else {
                    return;
                };
                match made {
                    Ok(channel) => {
                        // Unless a request on the member's channel was answered meanwhile
                        // (that channel is connected: this one is closed unused).
                        let mut current = m
                            .channel
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        if !m.connected.load(Ordering::Acquire) {
                            *current = channel;
                        }
                        drop(current);
                        m.connected.store(true, Ordering::Release);
                        m.connecting.store(false, Ordering::Release);
                        m.news.notify_waiters();
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(member = %m.uri, error = %e, "connecting an etcd member failed; trying again");
                        m.failed_connects.fetch_add(1, Ordering::AcqRel);
                        m.news.notify_waiters();
                    }
                }
                drop(m);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECONNECT_MAX);
            }
        }));
    }
}

/// A request on its way: counted as waiting until answered or dropped.
struct Waiting {
    shared: Arc<Shared>,
    member: Arc<Member>,
    since: u64,
    answered: bool,
}

impl Waiting {
    fn new(shared: Arc<Shared>, member: Arc<Member>) -> Waiting {
        member.waiting.fetch_add(1, Ordering::Relaxed);
        let since = shared.now();
        Waiting {
            shared,
            member,
            since,
            answered: false,
        }
    }

    /// The member answered: it is connected, and not silent.
    fn answered(&mut self) {
        self.answered = true;
        if !self.member.connected.swap(true, Ordering::AcqRel) {
            self.member.news.notify_waiters();
        }
        let now = self.shared.now();
        self.member.answered.fetch_max(now, Ordering::Relaxed);
        self.member.avoid_until.store(0, Ordering::Relaxed);
    }

    /// The request failed on the connection (refused, reset, TLS): pass the member over,
    /// and connect it again in the background.
    fn failed(&mut self) {
        self.answered = true;
        self.avoid();
        self.member.connected.store(false, Ordering::Release);
        self.shared.connect_in_background(&self.member);
    }

    fn avoid(&self) {
        let until = self.shared.now().saturating_add(nanos(AVOID_FOR));
        self.member.avoid_until.fetch_max(until, Ordering::Relaxed);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.member.waiting.fetch_sub(1, Ordering::Relaxed);
        if self.answered {
            return;
        }
        // Dropped unanswered: silent if it waited long and the member answered nothing
        // since it was sent.
        let now = self.shared.now();
        let waited = now.saturating_sub(self.since);
        if waited >= nanos(SILENT_AFTER)
            && self.member.answered.load(Ordering::Relaxed) < self.since
        {
            tracing::debug!(
                member = %self.member.uri,
                waited = ?Duration::from_nanos(waited),
                "an etcd member left a request unanswered; passing it over for a while"
            );
            self.avoid();
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

/// The channel: cloned into every gRPC client of the store.
#[derive(Clone)]
struct Balanced {
    shared: Arc<Shared>,
}

impl Service<Request> for Balanced {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, std::result::Result<Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        // Each request waits for its member's connection in its own future.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let Some(member) = shared.choose().await else {
                return Err(BoxError::from("no etcd endpoint to send the request to"));
            };
            let channel = member
                .channel
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let mut waiting = Waiting::new(shared, member);
            let result = channel.oneshot(request).await;
            match &result {
                Ok(_) => waiting.answered(),
                Err(_) => waiting.failed(),
            }
            result.map_err(|e| Box::new(e) as BoxError)
        }) as Pin<Box<_>>
    }
}
