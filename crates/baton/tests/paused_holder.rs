//! A holder whose process was paused past its local deadline (fault harness row 16: a leader
//! SIGSTOPped past its TTL) must know it is lost at its first look, before the keep-alive task
//! gets to run. The pause is reproduced without signals: on a current-thread runtime, the
//! only thread is blocked with `std::thread::sleep`, so no background task can run, and the
//! assertions are made before any `.await`.
//!
//! Real time, the embedded store, the smallest TTL a session accepts (2 s).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use baton::{Client, Election, Mutex, RwLock, Semaphore, Session, MIN_TTL};
use futures::FutureExt;
use tokio::time::Instant;

const REASON: &str = "keep-alives were not acknowledged before the local deadline";

async fn session(client: &Client) -> Session {
    Session::builder(client)
        .with_ttl(MIN_TTL)
        .build()
        .await
        .unwrap()
}

/// Block the runtime's only thread until `deadline` plus a margin: nothing else runs.
fn pause_past(deadline: Instant) {
    let now = Instant::now();
    std::thread::sleep(deadline.saturating_duration_since(now) + Duration::from_millis(100));
    assert!(Instant::now() > deadline);
}

#[tokio::test(flavor = "current_thread")]
async fn every_accessor_sees_the_passed_deadline_before_the_keep_alive_runs() {
    let client = Client::memory();
    // One session per holder, so that each accessor is the first call to look at its own
    // session after the pause (a check through one holder cancels its session's tokens).
    let s_mutex = session(&client).await;
    let s_leader = session(&client).await;
    let s_permit = session(&client).await;
    let s_write = session(&client).await;
    let s_read = session(&client).await;
    let s_bare = session(&client).await;

    let mutex = Mutex::new(&s_mutex, "paused/mutex").unwrap();
    let guard = mutex.lock().await.unwrap();
    let election = Election::new(&s_leader, "paused/election").unwrap();
    let mut leadership = election.campaign("me").await.unwrap();
    let semaphore = Semaphore::new(&s_permit, "paused/semaphore", 2).unwrap();
    let permit = semaphore.acquire().await.unwrap();
    let rw_w = RwLock::new(&s_write, "paused/rw-w").unwrap();
    let write = rw_w.write().await.unwrap();
    let rw_r = RwLock::new(&s_read, "paused/rw-r").unwrap();
    let read = rw_r.read().await.unwrap();

    // Tokens taken while held: cancelled by the first check that finds the deadline passed.
    let early_guard_token = guard.lost_token();
    let early_session_token = s_mutex.lost_token();
    let early_bare_token = s_bare.lost_token();

    let sessions = [&s_mutex, &s_leader, &s_permit, &s_write, &s_read, &s_bare];
    for s in sessions {
        assert!(!s.is_lost());
        assert!(s.deadline() > Instant::now());
        assert!(s.deadline() <= Instant::now() + MIN_TTL);
    }
    assert!(!guard.is_lost() && !leadership.is_lost() && !permit.is_lost());
    assert!(!write.is_lost() && !read.is_lost());
    let latest = sessions.iter().map(|s| s.deadline()).max().unwrap();

    pause_past(latest);

    // No `.await` from here until every assertion on the state is made.
    // The lock: is_lost() first.
    assert!(!early_guard_token.is_cancelled(), "nothing ran yet");
    assert!(
        guard.is_lost(),
        "a mutex guard past its deadline is not lost"
    );
    assert!(early_guard_token.is_cancelled());
    assert!(early_session_token.is_cancelled());
    assert!(s_mutex.is_lost());
    assert_eq!(guard.lost_reason().as_deref(), Some(REASON));
    assert!(guard.lost_token().is_cancelled());
    assert!(guard.lost().now_or_never().is_some());

    // The leadership: lost_reason() first.
    assert_eq!(leadership.lost_reason().as_deref(), Some(REASON));
    assert!(leadership.is_lost());
    assert!(leadership.lost_token().is_cancelled());

    // The permit: lost_token() first.
    assert!(permit.lost_token().is_cancelled());
    assert!(permit.is_lost());
    assert_eq!(permit.lost_reason().as_deref(), Some(REASON));

    // The write lock: lost() first (ready on its first poll).
    assert!(write.lost().now_or_never().is_some());
    assert!(write.is_lost());
    assert!(write.lost_token().is_cancelled());

    // The read lock: is_lost() first.
    assert!(read.is_lost());
    assert_eq!(read.lost_reason().as_deref(), Some(REASON));

    // A session alone: its own accessors check too.
    assert!(!early_bare_token.is_cancelled(), "nothing ran yet");
    assert!(s_bare.is_lost());
    assert!(early_bare_token.is_cancelled());
    assert_eq!(s_bare.lost_reason().as_deref(), Some(REASON));
    assert!(s_bare.lost_token().is_cancelled());
    assert!(s_bare.lost().now_or_never().is_some());

    // A lost holder sends no more writes: proclaim (a guarded txn) is refused at once.
    let err = leadership.proclaim("still me?").await.unwrap_err();
    assert!(matches!(err, baton::Error::NotLeader { .. }), "{err}");
    let err = guard
        .txn(baton::store::Txn::new().and_then([baton::store::TxnOp::put(
            "paused/resource",
            "write",
            0,
        )]))
        .await
        .unwrap_err();
    assert!(matches!(err, baton::Error::NotHeld { .. }), "{err}");
    assert!(client
        .store()
        .range(baton::store::Range::key("paused/resource"))
        .await
        .unwrap()
        .kvs
        .is_empty());
    // Releasing a lost lock says so.
    let err = guard.unlock().await.unwrap_err();
    assert!(matches!(err, baton::Error::NotHeld { .. }), "{err}");
}

/// The check follows acknowledged keep-alives, not the acquire: a pause shorter than the TTL
/// after a keep-alive was acknowledged loses nothing, even when it ends past the first
/// deadline.
#[tokio::test(flavor = "current_thread")]
async fn a_pause_within_the_deadline_loses_nothing() {
    let client = Client::memory();
    let s = session(&client).await;
    let mutex = Mutex::new(&s, "paused/within").unwrap();
    let guard = mutex.lock().await.unwrap();
    let first = s.deadline();

    // Past the keep-alive interval (TTL/3) but before the deadline: still held.
    std::thread::sleep(MIN_TTL / 2);
    assert!(!guard.is_lost());
    assert!(!s.is_lost());
    assert_eq!(guard.lost_reason(), None);
    assert!(!guard.lost_token().is_cancelled());

    // Let the keep-alive task run: the deadline moves on.
    let t = Instant::now();
    while s.deadline() == first {
        assert!(t.elapsed() < Duration::from_millis(500), "no keep-alive");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = s.deadline();
    assert!(second > first);
    assert!(
        second <= Instant::now() + MIN_TTL,
        "later than send time + TTL"
    );

    // Past the first deadline, before the second: still held.
    let until = first + Duration::from_millis(100);
    assert!(until < second);
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    assert!(!guard.is_lost(), "{:?}", guard.lost_reason());

    // Past the second: lost at once.
    pause_past(second);
    assert!(guard.is_lost());
    assert_eq!(guard.lost_reason().as_deref(), Some(REASON));
}

#[tokio::test(flavor = "current_thread")]
async fn an_orphaned_session_paused_past_its_deadline_says_orphaned() {
    let client = Client::memory();
    let s = session(&client).await;
    let mutex = Mutex::new(&s, "paused/orphan").unwrap();
    let guard = mutex.lock().await.unwrap();
    s.orphan();
    assert!(!guard.is_lost());
    pause_past(s.deadline());
    assert!(guard.is_lost());
    assert_eq!(
        guard.lost_reason().as_deref(),
        Some("session orphaned: its lease is no longer kept alive")
    );
}
