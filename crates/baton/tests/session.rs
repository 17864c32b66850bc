//! Session behaviour on the embedded store, with tokio's clock paused so that TTLs pass
//! instantly and exactly.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use baton::{Client, Error, Session};

async fn session(client: &Client, ttl: Duration) -> Session {
    Session::builder(client)
        .with_ttl(ttl)
        .build()
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn keeps_its_lease_alive_for_many_ttls() {
    let client = Client::memory();
    let s = session(&client, Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!s.is_lost(), "{:?}", s.lost_reason());
    let left = client
        .store()
        .lease_time_to_live(s.lease_id())
        .await
        .unwrap();
    assert!(left.is_some(), "lease expired although kept alive");
    // The local deadline moves forward and is never later than send time + TTL.
    assert!(s.deadline() <= tokio::time::Instant::now() + Duration::from_secs(3));
    assert!(s.deadline() > tokio::time::Instant::now());
}

#[tokio::test(start_paused = true)]
async fn reports_the_granted_ttl() {
    let client = Client::memory();
    assert_eq!(
        Session::new(&client).await.unwrap().ttl(),
        Duration::from_secs(60)
    );
    let s = session(&client, Duration::from_millis(2500)).await;
    assert_eq!(s.ttl(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn rejects_bad_ttls_and_intervals_before_any_call() {
    let client = Client::memory();
    for ttl in [0, 1_999, 9_000_000_001_000u64] {
        let err = Session::builder(&client)
            .with_ttl(Duration::from_millis(ttl))
            .build()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{ttl}: {err}");
    }
    let err = Session::builder(&client)
        .with_ttl(Duration::from_secs(3))
        .with_keep_alive_interval(Duration::from_secs(3))
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn external_revoke_is_lost() {
    let client = Client::memory();
    let s = session(&client, Duration::from_secs(9)).await;
    client.store().lease_revoke(s.lease_id()).await.unwrap();
    // Without a key to watch, the session learns at its next keep-alive (TTL/3).
    tokio::time::timeout(Duration::from_secs(3) + Duration::from_millis(10), s.lost())
        .await
        .expect("revoke not noticed by the next keep-alive");
    assert_eq!(s.lost_reason().as_deref(), Some("lease revoked or expired"));
}

#[tokio::test(start_paused = true)]
async fn close_revokes_and_is_idempotent() {
    let client = Client::memory();
    let s = session(&client, Duration::from_secs(10)).await;
    let lease = s.lease_id();
    s.close().await.unwrap();
    assert!(s.is_lost());
    assert_eq!(s.lost_reason().as_deref(), Some("session closed"));
    assert_eq!(
        client.store().lease_time_to_live(lease).await.unwrap(),
        None
    );
    s.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn orphan_stops_keep_alives_and_is_lost_at_the_deadline() {
    let client = Client::memory();
    let s = session(&client, Duration::from_secs(6)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let deadline = s.deadline();
    s.orphan();
    assert!(!s.is_lost(), "orphan() alone does not end the lease");
    let lease = s.lease_id();
    tokio::time::sleep_until(deadline - Duration::from_millis(1)).await;
    assert!(!s.is_lost());
    assert!(client
        .store()
        .lease_time_to_live(lease)
        .await
        .unwrap()
        .is_some());
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(s.is_lost(), "not lost at the local deadline");
    // The lease expires on the server no earlier than the local deadline, and then does.
    drop(s);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        client.store().lease_time_to_live(lease).await.unwrap(),
        None
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_handle_revokes() {
    let client = Client::memory();
    let s = session(&client, Duration::from_secs(60)).await;
    let lease = s.lease_id();
    let clone = s.clone();
    drop(s);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(client
        .store()
        .lease_time_to_live(lease)
        .await
        .unwrap()
        .is_some());
    drop(clone);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        client.store().lease_time_to_live(lease).await.unwrap(),
        None
    );
}

#[tokio::test(start_paused = true)]
async fn an_orphaned_session_is_not_revoked_on_drop() {
    let client = Client::memory();
    let s = session(&client, Duration::from_secs(60)).await;
    let lease = s.lease_id();
    s.orphan();
    drop(s);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(client
        .store()
        .lease_time_to_live(lease)
        .await
        .unwrap()
        .is_some());
}

#[tokio::test(start_paused = true)]
async fn a_lost_session_refuses_new_locks() {
    let client = Client::memory();
    let s = session(&client, Duration::from_secs(10)).await;
    let m = baton::Mutex::new(&s, "x").unwrap();
    s.close().await.unwrap();
    let err = m.lock().await.unwrap_err();
    assert!(matches!(err, Error::SessionLost { .. }), "{err}");
}

#[tokio::test]
async fn unreachable_etcd_fails_within_the_dial_timeout() {
    // Nothing listens on port 1 of loopback.
    let start = std::time::Instant::now();
    let err = Client::builder("http://127.0.0.1:1")
        .with_dial_timeout(Duration::from_millis(800))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(
        start.elapsed() < Duration::from_millis(1800),
        "{:?}",
        start.elapsed()
    );
    // A malformed URL fails before any network call.
    let err = Client::connect("http//oops").await.unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
}

/// A member that accepts connections and never answers (a hung process, a proxy to
/// nowhere), a dial timeout longer than the request timeout: the connect keeps trying for
/// the whole dial timeout. Before, the gRPC backstop (the request timeout plus 1 s) ended
/// the probe and the connect failed then ("timeout expired": `--dial-timeout 20s` gave up
/// after 11 s, saying "within 20s").
#[tokio::test]
async fn a_silent_member_is_tried_for_the_whole_dial_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let start = std::time::Instant::now();
    let err = Client::builder(&url)
        .with_request_timeout(Duration::from_secs(1))
        .with_dial_timeout(Duration::from_secs(4))
        .connect()
        .await
        .unwrap_err();
    let took = start.elapsed();
    drop(listener);
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(
        took >= Duration::from_millis(3900) && took < Duration::from_secs(6),
        "gave up after {took:?}: {err}"
    );
    assert!(err.to_string().contains("no member answered"), "{err}");
}

/// A session built on a runtime that then shuts down, used from another: its keep-alives
/// died with that runtime, so it is lost at once, not only when a call finds its deadline
/// passed (a `lost()` already awaited would never have fired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_runtime_shuts_down_is_lost_at_once() {
    let client = Client::memory();
    let on_b = client.clone();
    let s = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = rt.block_on(session(&on_b, Duration::from_secs(30)));
        drop(rt);
        s
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_millis(500), s.lost())
        .await
        .expect("lost() did not fire after the session's runtime shut down");
    assert!(s.lost_token().is_cancelled());
    let reason = s.lost_reason().unwrap();
    assert!(reason.contains("runtime"), "{reason}");
    // A session of a live runtime is not affected.
    let live = session(&client, Duration::from_secs(30)).await;
    assert!(!live.is_lost());
}
