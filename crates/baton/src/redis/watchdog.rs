//! A held Redis lock and its watchdog: the background task that extends the key every TTL/3
//! and declares the hold lost when it can no longer be sure it is ours.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::Instrument;

use super::node::Keys;
use super::redlock::Extended;
use super::{drift, ClientInner};
use crate::deadline::LocalDeadline;
use crate::error::{Error, Result};

/// After a failed extend, the watchdog tries again this soon (or sooner, if its interval is
/// shorter), until the local deadline.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// Why a hold is lost when its local deadline passes.
const DEADLINE_PASSED: &str = "the local deadline passed without a successful extend";

/// Why a leader's hold is lost when its election record is gone (see `redlock::extend`).
pub(crate) const RECORD_GONE: &str = "the election record was deleted";

/// Why a hold is lost when the runtime it was acquired on shut down under it.
const RUNTIME_GONE: &str =
    "the tokio runtime the lock was acquired on, which ran its watchdog, was shut down";

/// What a guard and its watchdog share.
#[derive(Debug)]
pub(crate) struct HoldState {
    id: u64,
    pub(crate) keys: Keys,
    pub(crate) token: String,
    pub(crate) fence: Option<i64>,
    /// A leader's hold: its election record must stay, carrying its token.
    pub(crate) election: bool,
    /// Cancelled when the hold is lost. A child of the client's `closed` token.
    lost: CancellationToken,
    /// The local deadline: the start of the last successful acquire or extend, plus the TTL,
    /// minus the drift. Read without a lock by every `is_lost()`.
    deadline: LocalDeadline,
    /// Cancelled to stop the watchdog (release).
    stop: CancellationToken,
    /// Wakes the watchdog to re-read the deadline.
    poke: Notify,
    /// When the acquire that took the key started (for a hand-off: a moment no later than
    /// the grant).
    started_at: Instant,
    /// The first extend is due this long after `started_at`: a third of the key's TTL.
    first_extend: Duration,
    /// The runtime the hold was acquired on, which runs its watchdog (whichever runtime
    /// the client's launcher runs on).
    runtime: Option<tokio::runtime::Handle>,
    state: StdMutex<State>,
}

#[derive(Debug)]
struct State {
    reason: Option<String>,
}

impl HoldState {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record why the hold is lost (the first reason wins), without cancelling yet.
    pub(crate) fn set_reason(&self, reason: &str) {
        let mut st = self.state();
        if st.reason.is_none() {
            st.reason = Some(reason.to_string());
        }
    }

    fn mark_lost(&self, reason: &str) {
        if !self.lost.is_cancelled() {
            tracing::info!(key = %self.keys.lock, reason, "lock lost");
        }
        self.set_reason(reason);
        self.lost.cancel();
    }

    /// True if the hold is lost, marking it lost first if the local deadline has passed (the
    /// watchdog may not have run since: a paused process, a blocked runtime). A token check
    /// and a clock read while it is held, no lock.
    fn check_deadline(&self) -> bool {
        if self.lost.is_cancelled() {
            return true;
        }
        if !self.deadline.passed() {
            return false;
        }
        self.mark_lost(DEADLINE_PASSED);
        true
    }

    fn reason(&self) -> Option<String> {
        if !self.check_deadline() {
            return None;
        }
        Some(
            self.state()
                .reason
                .clone()
                .unwrap_or_else(|| "the client was closed".to_string()),
        )
    }

    fn deadline(&self) -> Instant {
        self.deadline.get()
    }

    fn push_deadline(&self, deadline: Instant) {
        self.deadline.push(deadline);
    }
}

/// A held key: the shared state, the client, and the watchdog's life.
///
/// Dropping it without [`release`](Hold::release) stops the watchdog and releases the key in
/// a task spawned on the current runtime (best effort; else the key expires with its TTL).
#[derive(Debug)]
pub(crate) struct Hold {
    client: Arc<ClientInner>,
    state: Arc<HoldState>,
    done: bool,
}

impl Hold {
    /// Start holding `keys` with `token`, acquired at `start`: register with the client and
    /// start the watchdog (or only the deadline timer, without a watchdog).
    ///
    /// `election`: the hold of a leader, whose election record must stay (see
    /// `extend.lua`).
    pub(crate) fn start(
        client: &Arc<ClientInner>,
        keys: Keys,
        token: String,
        fence: Option<i64>,
        start: Instant,
        election: bool,
    ) -> Hold {
        let ttl = client.opts.ttl;
        Hold::start_with_ttl(client, keys, token, fence, start, ttl, election)
    }

    /// [`start`](Hold::start) for a key whose TTL was set to `ttl` (a FIFO hand-off grants
    /// a short one, see `handoff.lua`): the first extend (to the client's TTL) is due after
    /// `ttl / 3`, and the launcher starts the watchdog halfway to it.
    pub(crate) fn start_with_ttl(
        client: &Arc<ClientInner>,
        keys: Keys,
        token: String,
        fence: Option<i64>,
        start: Instant,
        ttl: Duration,
        election: bool,
    ) -> Hold {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let state = Arc::new(HoldState {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            keys,
            token,
            fence,
            election,
            lost: client.closed.child_token(),
            deadline: LocalDeadline::new(start, start + ttl.saturating_sub(drift(ttl))),
            stop: CancellationToken::new(),
            poke: Notify::new(),
            started_at: start,
            first_extend: ttl / 3,
            runtime: tokio::runtime::Handle::try_current().ok(),
            state: StdMutex::new(State { reason: None }),
        });
        client
            .holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(state.id, state.clone());
        client.launcher.add(client, state.clone());
        Hold {
            client: client.clone(),
            state,
            done: false,
        }
    }

    pub(crate) fn key(&self) -> &str {
        &self.state.keys.lock
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.state.keys
    }

    pub(crate) fn token(&self) -> &str {
        &self.state.token
    }

    pub(crate) fn fence(&self) -> Option<i64> {
        self.state.fence
    }

    pub(crate) fn client(&self) -> &Arc<ClientInner> {
        &self.client
    }

    /// True once the hold is lost; true at once when the local deadline has passed, even if
    /// the watchdog has not run since (this call then marks it lost).
    pub(crate) fn is_lost(&self) -> bool {
        self.state.check_deadline()
    }

    pub(crate) fn lost_reason(&self) -> Option<String> {
        self.state.reason()
    }

    /// Checks the local deadline first: the future is ready at once if it has passed.
    pub(crate) fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.state.check_deadline();
        self.state.lost.cancelled()
    }

    /// Checks the local deadline first: the token is cancelled already if it has passed.
    pub(crate) fn lost_token(&self) -> CancellationToken {
        self.state.check_deadline();
        self.state.lost.child_token()
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.state.deadline()
    }

    /// Mark the hold lost (a proclaim found we no longer lead).
    pub(crate) fn mark_lost(&self, reason: &str) {
        self.state.mark_lost(reason);
    }

    fn not_held(&self) -> Error {
        Error::NotHeld {
            key: self.state.keys.lock.clone(),
        }
    }

    /// Extend the key now (on a quorum): compare-and-`PEXPIRE`, never re-creating it.
    pub(crate) async fn extend(&self) -> Result<()> {
        if self.is_lost() {
            return Err(self.not_held());
        }
        let st = &self.state;
        match self
            .client
            .extend(&st.keys, &st.token, st.election, st.deadline())
            .instrument(tracing::debug_span!("extend", key = %st.keys.lock))
            .await
        {
            Extended::Held(sent) => {
                let ttl = self.client.opts.ttl;
                st.push_deadline(sent + ttl.saturating_sub(drift(ttl)));
                st.poke.notify_one();
                // Declared lost meanwhile (the local deadline passed before the reply came):
                // the loss stands.
                if st.lost.is_cancelled() {
                    return Err(self.not_held());
                }
                Ok(())
            }
            Extended::Lost(reason) => {
                st.mark_lost(reason);
                Err(self.not_held())
            }
            Extended::Retry(e) => {
                if st.check_deadline() {
                    return Err(self.not_held());
                }
                Err(e)
            }
        }
    }

    /// Stop the watchdog and delete the key if it is still ours. [`Error::NotHeld`] if the
    /// hold had been lost (the key is still deleted if it turns out to be ours).
    pub(crate) async fn release(mut self, what: &'static str) -> Result<()> {
        if self.is_lost() {
            // Known lost: say so at once, whether or not the server answers (a server
            // gone made this a retryable Unavailable after a request timeout). The
            // compare-and-delete still runs, in the background (see `Drop`).
            return Err(self.not_held());
        }
        self.done = true;
        let st = self.state.clone();
        st.stop.cancel();
        self.deregister();
        let deleted = self
            .client
            .release(&st.keys, &st.token)
            .instrument(tracing::debug_span!("release", key = %st.keys.lock, what))
            .await?;
        if deleted < self.client.quorum {
            return Err(self.not_held());
        }
        Ok(())
    }

    fn deregister(&self) {
        self.client
            .holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.state.id);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.state.stop.cancel();
        self.deregister();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let state = self.state.clone();
            self.client.cleanups.spawn_on(
                async move {
                    if let Err(e) = client.clean_up(&state.keys, &state.token).await {
                        tracing::warn!(error = %e, "release on drop failed; the key expires with its ttl");
                    }
                }
                .instrument(tracing::debug_span!("release", key = %self.state.keys.lock, what = "drop")),
                &handle,
            );
        }
    }
}

/// Start the watchdogs of `holds` still held now, not at their launch time (they wait for
/// their first extend): the launcher that would have started them is gone.
fn spawn_watchdogs(client: &Arc<ClientInner>, holds: Vec<Arc<HoldState>>) {
    let interval = client.opts.watchdog.then(|| client.opts.ttl / 3);
    for state in holds.into_iter().filter(|s| !s.is_done()) {
        spawn_watchdog(client.clone(), state, interval);
    }
}

/// Start `state`'s watchdog on the runtime the hold was acquired on. If that runtime is
/// shut down while the hold lives (the task is dropped unfinished), the hold is lost: no
/// task extends its key any more, and its `lost()` and `lost_token()` must say so now
/// rather than never.
fn spawn_watchdog(client: Arc<ClientInner>, state: Arc<HoldState>, interval: Option<Duration>) {
    struct Orphaned(Arc<HoldState>);
    impl Drop for Orphaned {
        fn drop(&mut self) {
            if !self.0.is_done() {
                self.0.mark_lost(RUNTIME_GONE);
            }
        }
    }
    let span = tracing::debug_span!("watchdog", key = %state.keys.lock);
    let runtime = state
        .runtime
        .clone()
        .or_else(|| tokio::runtime::Handle::try_current().ok());
    let orphaned = Orphaned(state.clone());
    let task = async move {
        let _orphaned = orphaned;
        watchdog(client, state, interval).await;
    }
    .instrument(span);
    match runtime {
        Some(runtime) => drop(runtime.spawn(task)),
        // No runtime at all: dropping the task marks the hold lost.
        None => drop(task),
    }
}

/// Extend every `interval` (if any) until stopped or lost; declare the hold lost when an
/// extend says the key is not ours, or when the local deadline passes.
async fn watchdog(client: Arc<ClientInner>, state: Arc<HoldState>, interval: Option<Duration>) {
    let ttl = client.opts.ttl;
    let never = Duration::from_secs(u64::from(u32::MAX));
    // Launched late (see `Launcher`): the first extend is still due one interval after the
    // acquire started.
    let mut wait = match interval {
        Some(_) => {
            (state.started_at + state.first_extend).saturating_duration_since(Instant::now())
        }
        None => never,
    };
    // Whether the last extend failed: one warning per run of failures, not one per retry.
    let mut failing = false;
    loop {
        let deadline = state.deadline();
        tokio::select! {
            _ = state.stop.cancelled() => return,
            _ = state.lost.cancelled() => return,
            _ = state.poke.notified() => continue,
            _ = tokio::time::sleep_until(deadline) => {}
            _ = tokio::time::sleep(wait) => {}
        }
        if state.check_deadline() {
            return;
        }
        if interval.is_none() {
            continue;
        }
        let extended = tokio::select! {
            _ = state.stop.cancelled() => return,
            r = client
                .extend(&state.keys, &state.token, state.election, state.deadline())
                .instrument(tracing::debug_span!("extend")) => r,
        };
        match extended {
            Extended::Held(sent) => {
                state.push_deadline(sent + ttl.saturating_sub(drift(ttl)));
                wait = interval.unwrap_or(never);
                if std::mem::take(&mut failing) {
                    tracing::info!("extended again after failures");
                } else {
                    tracing::trace!("extended");
                }
            }
            Extended::Lost(reason) => {
                state.mark_lost(reason);
                if state.election {
                    // Step down, whatever the reason: the key may still be ours (the record
                    // alone gone; on Redlock, "record gone" on one master and "key gone" on
                    // another leave it on a quorum), and would keep every other candidate
                    // out until it expires. A compare-and-delete: never another's key.
                    if let Err(e) = client.clean_up(&state.keys, &state.token).await {
                        tracing::debug!(error = %e, "stepping down failed; the key expires with its ttl");
                    }
                }
                return;
            }
            Extended::Retry(e) => {
                if std::mem::replace(&mut failing, true) {
                    tracing::debug!(error = %e, "extend failed again; retrying");
                } else {
                    tracing::warn!(error = %e, "extend failed; retrying until the local deadline");
                }
                wait = RETRY_BACKOFF.min(interval.unwrap_or(never));
            }
        }
    }
}

/// Starts each hold's watchdog task lazily: one client-wide task, which starts a hold's
/// watchdog halfway to its first extend (TTL/6 after the acquire for a hold of the full
/// TTL), if the hold is still alive then.
///
/// Spawning a task per hold at acquire time costs a cross-thread wake-up on acquire and
/// another on release, which for a short hold (lock, a little work, unlock) is most of
/// the client-side cost. Nothing needs the watchdog before the first extend, a third of
/// the key's TTL after the acquire started: a hold released before its launch time never
/// has one. The first extend stays due at the acquire's start plus a third of the TTL, and
/// `is_lost()` checks the local deadline itself, so nothing is detected later than with a
/// task per hold.
///
/// The launcher sleeps until the earliest launch time among the holds it has (at most
/// TTL/6); a hold added with an earlier one (a hand-off's short grant) wakes it.
///
/// Each watchdog runs on the runtime its hold was acquired on; the launcher task runs on the
/// runtime of the hold that started it. A hold acquired on another runtime (a client shared
/// between runtimes) does not wait for it, since that runtime may sit idle (a
/// current-thread runtime outside `block_on`) and never run it: its watchdog task starts at
/// once, on its own runtime. If the launcher's runtime is shut down, the task ends with it:
/// the holds still pending get their watchdogs at once, each on its own runtime, and the
/// next hold starts a new launcher on its runtime.
#[derive(Debug, Default)]
pub(crate) struct Launcher {
    pending: StdMutex<Pending>,
    wake: Arc<Notify>,
}

/// The pending holds' list is purged of released ones when it reaches this length (and
/// then at twice the live length after each purge, at least this): the launcher itself
/// removes them only when it wakes, every TTL/6 at most, so a long TTL and many short holds
/// would otherwise pile them up.
const PURGE_AT: usize = 64;

#[derive(Debug)]
struct Pending {
    holds: Vec<Arc<HoldState>>,
    /// When the launcher task wakes next, if it sleeps.
    wakes_at: Option<Instant>,
    /// The launcher task, once started: a new one is started if it has ended (its runtime
    /// was shut down).
    task: Option<tokio::task::JoinHandle<()>>,
    /// A hold is starting the launcher task (outside the lock: a spawn on a runtime that is
    /// shutting down drops the task at once, and the task's drop takes the lock).
    starting: bool,
    /// Purge released holds from `holds` when it reaches this length.
    purge_at: usize,
    /// The runtime the launcher task runs on.
    runtime: Option<tokio::runtime::Id>,
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            holds: Vec::new(),
            wakes_at: None,
            task: None,
            starting: false,
            purge_at: PURGE_AT,
            runtime: None,
        }
    }
}

impl HoldState {
    /// When the launcher starts this hold's watchdog: halfway to the first extend.
    fn launch_at(&self) -> Instant {
        self.started_at + self.first_extend / 2
    }

    /// True once the hold is released or lost: it needs no watchdog.
    fn is_done(&self) -> bool {
        self.stop.is_cancelled() || self.lost.is_cancelled()
    }
}

impl Launcher {
    /// Queue `state`'s watchdog; start the launcher task on the client's first hold, and
    /// again (on the current runtime) if it has ended with the runtime it ran on.
    fn add(&self, client: &Arc<ClientInner>, state: Arc<HoldState>) {
        let launch_at = state.launch_at();
        let runtime = state.runtime.clone();
        let rt_id = runtime.as_ref().map(tokio::runtime::Handle::id);
        let (earlier, start) = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.holds.len() >= pending.purge_at {
                pending.holds.retain(|s| !s.is_done());
                pending.purge_at = (pending.holds.len() * 2).max(PURGE_AT);
            }
            let running =
                pending.starting || pending.task.as_ref().is_some_and(|t| !t.is_finished());
            if running && rt_id.is_some() && pending.runtime != rt_id {
                // The launcher runs on another runtime, which may sit idle (a current-thread
                // runtime outside `block_on`): this hold's watchdog must not depend on it.
                drop(pending);
                let interval = client.opts.watchdog.then(|| client.opts.ttl / 3);
                spawn_watchdog(client.clone(), state, interval);
                return;
            }
            pending.holds.push(state);
            let start = runtime.is_some() && !running;
            if start {
                // Its `wakes_at` died with it.
                pending.wakes_at = None;
                pending.starting = true;
                pending.runtime = rt_id;
            }
            (pending.wakes_at.is_some_and(|at| launch_at < at), start)
        };
        if let (true, Some(runtime)) = (start, runtime) {
            let span = tracing::debug_span!("watchdog-launcher");
            let task =
                runtime.spawn(launch(Arc::downgrade(client), self.wake.clone()).instrument(span));
            let orphans = {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                pending.starting = false;
                if task.is_finished() {
                    // Dropped at once (its runtime is shutting down): its end started the
                    // watchdogs of the holds pending then, but holds added since, while
                    // `starting` kept them from starting a launcher, have none. Start
                    // theirs now, each on its own runtime; the next hold starts a launcher.
                    pending.task = None;
                    std::mem::take(&mut pending.holds)
                } else {
                    pending.task = Some(task);
                    Vec::new()
                }
            };
            spawn_watchdogs(client, orphans);
        }
        if earlier {
            self.wake.notify_one();
        }
    }

    /// How many holds wait for their launch time (released ones not yet purged included).
    #[cfg(test)]
    pub(crate) fn pending_len(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .holds
            .len()
    }
}

/// Start the watchdogs whose launch time has come, of the holds still held; sleep until the
/// next launch time (at most TTL/6), or until a hold with an earlier one is added. Ends
/// when the client is closed or gone.
fn launch(
    client: std::sync::Weak<ClientInner>,
    wake: Arc<Notify>,
) -> impl std::future::Future<Output = ()> {
    // Made now, not at the first poll: the task may be dropped before it ever runs.
    let ended = LauncherEnded(client.clone());
    async move {
        let _ended = ended;
        launching(client, wake).await;
    }
}

/// Dropped when the launcher task ends, also unpolled (its runtime shut down under it, maybe
/// before it first ran): start the pending holds' watchdogs now, each on its own runtime
/// (they wait for their first extend), and let the next hold start a new launcher.
struct LauncherEnded(std::sync::Weak<ClientInner>);

impl Drop for LauncherEnded {
    fn drop(&mut self) {
        let Some(client) = self.0.upgrade() else {
            return;
        };
        let holds = {
            let mut pending = client
                .launcher
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            pending.task = None;
            pending.wakes_at = None;
            std::mem::take(&mut pending.holds)
        };
        spawn_watchdogs(&client, holds);
    }
}

async fn launching(client: std::sync::Weak<ClientInner>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(client) = client.upgrade() else {
                return;
            };
            if client.closed.is_cancelled() {
                return;
            }
            let period = (client.opts.ttl / 6).max(Duration::from_millis(1));
            let interval = client.opts.watchdog.then(|| client.opts.ttl / 3);
            let now = Instant::now();
            let mut next = now + period;
            let mut due = Vec::new();
            {
                let mut pending = client
                    .launcher
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                pending.holds.retain(|state| {
                    if state.is_done() {
                        return false;
                    }
                    let at = state.launch_at();
                    if at <= now {
                        due.push(state.clone());
                        return false;
                    }
                    next = next.min(at);
                    true
                });
                pending.wakes_at = Some(next);
            }
            for state in due {
                spawn_watchdog(client.clone(), state, interval);
            }
            next
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a 1 h TTL the launcher wakes every 10 min: the holds released meanwhile must
    /// not pile up until then (2000 short holds left 2000 behind).
    #[tokio::test]
    async fn released_holds_do_not_pile_up_in_the_launcher() {
        let client = ClientInner::unconnected(Duration::from_secs(3600));
        for _ in 0..2000 {
            let keys = Keys::new("", "x");
            let mut hold = Hold::start(
                &client,
                keys,
                super::super::new_token(),
                None,
                Instant::now(),
                false,
            );
            // Released as `release` does, without a server to ask.
            hold.done = true;
            hold.state.stop.cancel();
            hold.deregister();
        }
        let pending = client.launcher.pending_len();
        assert!(pending < 100, "{pending} holds pending");
        // A live hold stays pending across purges.
        let mut live = Hold::start(
            &client,
            Keys::new("", "y"),
            "t".into(),
            None,
            Instant::now(),
            false,
        );
        for _ in 0..200 {
            let mut hold = Hold::start(
                &client,
                Keys::new("", "x"),
                "u".into(),
                None,
                Instant::now(),
                false,
            );
            hold.done = true;
            hold.state.stop.cancel();
            hold.deregister();
        }
        let still = client
            .launcher
            .pending
            .lock()
            .unwrap()
            .holds
            .iter()
            .any(|s| Arc::ptr_eq(s, &live.state));
        assert!(still);
        live.done = true;
        live.state.stop.cancel();
    }
}
