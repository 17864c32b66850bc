//! A semaphore's waiters hold little while they wait: before, each held its whole join read
//! (every key before its own, with values) and a map of those keys, so 2,000 waiters on one
//! client held 558 MiB; now a fingerprint and a count per key before it (90 MiB: still
//! quadratic in the queue's length, about 45 bytes per pair of waiters).
//!
//! Its own test binary: it counts every allocation of the process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use baton::{Client, Semaphore, Session};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: usize = 1 << 20;

/// 1,000 waiters queued behind one holder: 143 MiB live before, 25 MiB now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiters_hold_little_while_they_wait() {
    const WAITERS: usize = 1000;
    let client = Client::connect("mem://").await.unwrap();
    let holder = Session::new(&client).await.unwrap();
    let permit = Semaphore::new(&holder, "memory", 1)
        .unwrap()
        .acquire()
        .await
        .unwrap();
    let at_start = LIVE.load(Ordering::Relaxed);
    let mut sessions = Vec::new();
    let mut waiting = Vec::new();
    for _ in 0..WAITERS {
        let session = Session::new(&client).await.unwrap();
        let sem = Semaphore::new(&session, "memory", 1).unwrap();
        sessions.push(session);
        waiting.push(tokio::spawn(async move {
            sem.acquire().await.unwrap().release().await.unwrap();
        }));
    }
    // Every waiter queued and waiting (each reads once, then waits on the shared watch):
    // the live bytes stop moving.
    let mut settled = 0;
    while settled < 5 {
        let before = LIVE.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = LIVE.load(Ordering::Relaxed);
        settled = if before.abs_diff(after) < MIB {
            settled + 1
        } else {
            0
        };
    }
    let grown = LIVE.load(Ordering::Relaxed).saturating_sub(at_start);
    eprintln!("{WAITERS} waiters queued: {} MiB live", grown / MIB);
    assert!(
        grown < 60 * MIB,
        "{WAITERS} waiters hold {} MiB while they wait",
        grown / MIB
    );
    permit.release().await.unwrap();
    for w in waiting {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("a waiter was not granted")
            .unwrap();
    }
}
