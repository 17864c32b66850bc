//! The Redis election under faults (from its second review): loss timing, resign/extend
//! races, cancelled campaigns, fencing, observe without pub/sub, with a Redlock master
//! down, close, and a leader whose record is deleted.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use baton::redis::{RedisClient, RedisClientBuilder};
use baton::{Error, LeaderEvent};
use baton_testkit::redis::RedisServerOptions;
use baton_testkit::{RedisServer, RedisServers};
use futures::StreamExt;
use redis::AsyncCommands;

fn unique(case: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "rv/{case}/{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The URL of `one` and of Redlock over `three`, each with its masters' URLs.
fn single_and_redlock(one: &RedisServer, three: &RedisServers) -> [(String, Vec<String>); 2] {
    [
        (one.url(), vec![one.url()]),
        (
            three.redlock_url(),
            three.servers().iter().map(|s| s.url()).collect(),
        ),
    ]
}

fn builder(url: &str, ttl: Duration) -> RedisClientBuilder {
    RedisClient::builder(url)
        .with_ttl(ttl)
        .with_dial_timeout(Duration::from_secs(2))
}

async fn connect(url: &str, ttl: Duration) -> RedisClient {
    builder(url, ttl).connect().await.unwrap()
}

/// Every key on `url` whose name contains `part`.
async fn keys_with(url: &str, part: &str) -> Vec<String> {
    let mut conn = raw(url).await;
    let all: Vec<String> = conn.keys("*").await.unwrap();
    let mut v: Vec<String> = all.into_iter().filter(|k| k.contains(part)).collect();
    v.sort();
    v
}

async fn next_event(o: &mut baton::LeaderEvents, within: Duration, what: &str) -> LeaderEvent {
    tokio::time::timeout(within, o.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {within:?}"))
        .unwrap_or_else(|| panic!("{what}: the stream ended"))
}

fn describe(e: &LeaderEvent) -> String {
    match e {
        LeaderEvent::Leader(l) => format!(
            "Leader({}, v{})",
            String::from_utf8_lossy(&l.value),
            l.mod_revision
        ),
        LeaderEvent::Vacant => "Vacant".to_string(),
        #[allow(unreachable_patterns)]
        _ => "other".to_string(),
    }
}

/// lost() after the leader key is DELeted or overwritten: within TTL/3 + a round trip.
async fn lost_after_tamper(url: &str, masters: &[String]) {
    let ttl = Duration::from_millis(900);
    let client = connect(url, ttl).await;
    let mut conns = Vec::new();
    for m in masters {
        conns.push(raw(m).await);
    }
    let mut took = Vec::new();
    for overwrite in [false, true, false, true] {
        let election = client.election(&unique("lost")).unwrap();
        let leading = election.campaign("a").await.unwrap();
        // Worst case: tamper just after an extend.
        tokio::time::sleep(ttl / 3 + Duration::from_millis(20)).await;
        let t = Instant::now();
        for c in &mut conns {
            if overwrite {
                let () = c.set(election.key(), "someone-else").await.unwrap();
            } else {
                let _: i64 = c.del(election.key()).await.unwrap();
            }
        }
        tokio::time::timeout(Duration::from_secs(3), leading.lost())
            .await
            .unwrap_or_else(|_| panic!("{url}: lost() silent after tamper"));
        took.push(t.elapsed());
        assert!(matches!(
            election.leader().await.unwrap_err(),
            Error::NoLeader { .. } | Error::NoQuorum { .. }
        ));
        for c in &mut conns {
            let _: i64 = c.del(election.key()).await.unwrap();
        }
    }
    eprintln!("{url}: lost() after DEL/SET: {took:?}");
    let bound = ttl / 3 + Duration::from_millis(80);
    for t in &took {
        assert!(*t <= bound, "{url}: lost() took {took:?}, bound {bound:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_within_a_third_after_del_or_overwrite() {
    let one = RedisServer::start_async().await;
    lost_after_tamper(&one.url(), &[one.url()]).await;
    let three = RedisServers::start_async(3).await;
    let urls: Vec<String> = three.servers().iter().map(|s| s.url()).collect();
    lost_after_tamper(&three.redlock_url(), &urls).await;
}

/// Resign at random moments, racing the watchdog's extend (TTL 30 ms: an extend every
/// 10 ms): the resign succeeds, nothing is left, the next candidate leads at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resign_racing_the_watchdog_leaves_nothing() {
    let one = RedisServer::start_async().await;
    let three = RedisServers::start_async(3).await;
    for (url, masters) in single_and_redlock(&one, &three) {
        let ttl = Duration::from_millis(60);
        let a = connect(&url, ttl).await;
        let b = connect(&url, ttl).await;
        let name = unique("race");
        let (ea, eb) = (a.election(&name).unwrap(), b.election(&name).unwrap());
        let mut fails = 0;
        for i in 0..60u64 {
            let leading = match ea.campaign_timeout("a", Duration::from_secs(2)).await {
                Ok(l) => l,
                Err(e) => panic!("{url}: campaign {i}: {e}"),
            };
            tokio::time::sleep(Duration::from_millis((i * 7) % 45)).await;
            match leading.resign().await {
                Ok(()) => {}
                Err(Error::NotLeader { .. }) => fails += 1,
                Err(e) => panic!("{url}: resign {i}: {e}"),
            }
            // The next candidate leads at once.
            let t = Instant::now();
            let other = eb
                .campaign_timeout("b", Duration::from_secs(2))
                .await
                .unwrap();
            assert!(
                t.elapsed() < Duration::from_millis(200),
                "{url}: b waited {:?}",
                t.elapsed()
            );
            other.resign().await.unwrap();
        }
        assert!(fails <= 3, "{url}: {fails} resigns said NotLeader");
        tokio::time::sleep(Duration::from_millis(100)).await;
        for m in &masters {
            let left: Vec<String> = keys_with(m, &name)
                .await
                .into_iter()
                .filter(|k| !k.starts_with("baton:fence:") && !k.starts_with("baton:released:"))
                .collect();
            assert!(left.is_empty(), "{url}: left {left:?}");
        }
    }
}

/// Campaigns cut short at random moments (while the election is free and while it is held)
/// leave no key, no record, no queue entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_campaigns_leave_nothing() {
    let one = RedisServer::start_async().await;
    let three = RedisServers::start_async(3).await;
    for (url, masters) in single_and_redlock(&one, &three) {
        let ttl = Duration::from_secs(30);
        let a = connect(&url, ttl).await;
        let name = unique("drop");
        let ea = a.election(&name).unwrap();
        // Free: cut mid-acquire.
        for i in 0..40u64 {
            let e = ea.clone();
            let task = tokio::spawn(async move { e.campaign(format!("c{i}")).await });
            tokio::time::sleep(Duration::from_micros(50 * (i % 20))).await;
            task.abort();
            if let Ok(Ok(l)) = task.await {
                l.resign().await.unwrap();
            }
        }
        // Held: cut while waiting.
        let b = connect(&url, ttl).await;
        let leading = b.election(&name).unwrap().campaign("b").await.unwrap();
        for i in 0..20u64 {
            let e = ea.clone();
            let task = tokio::spawn(async move { e.campaign(format!("w{i}")).await });
            tokio::time::sleep(Duration::from_millis(i % 7)).await;
            task.abort();
            let _ = task.await;
        }
        // campaign_timeout while held.
        let t = Instant::now();
        let err = ea
            .campaign_timeout("t", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Timeout {
                    operation: "campaign",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        leading.resign().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        for m in &masters {
            let left: Vec<String> = keys_with(m, &name)
                .await
                .into_iter()
                .filter(|k| !k.starts_with("baton:fence:") && !k.starts_with("baton:released:"))
                .collect();
            assert!(left.is_empty(), "{url}: left {left:?}");
        }
        assert!(matches!(
            ea.leader().await.unwrap_err(),
            Error::NoLeader { .. }
        ));
    }
}

/// Fencing tokens strictly increase across leaders on one instance, and leader() reports
/// the leader's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_across_leaders() {
    let one = RedisServer::start_async().await;
    let ttl = Duration::from_millis(300);
    let name = unique("fence");
    let mut tasks = Vec::new();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    for w in 0..4 {
        let client = connect(&one.url(), ttl).await;
        let seen = seen.clone();
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            let e = client.election(&name).unwrap();
            for r in 0..15 {
                let l = e.campaign(format!("{w}-{r}")).await.unwrap();
                let f = l.fencing_token().unwrap();
                let read = e.leader().await.unwrap();
                assert_eq!(read.create_revision, f);
                seen.lock().unwrap().push(f);
                if r % 5 == 4 {
                    // Dropped: released by the drop's background task.
                    drop(l);
                } else {
                    l.resign().await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    for w in seen.windows(2) {
        assert!(w[1] > w[0], "fencing tokens not increasing: {seen:?}");
    }
}

/// Without channel rights (no pub/sub), observe still reports every change within the
/// fallback poll: a campaign, a proclaim, a resign, a DEL of the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_without_channel_rights_polls() {
    let server = RedisServer::start_with(
        RedisServerOptions::new().with_acl_user("u", "on >pw ~* resetchannels +@all"),
    );
    let url = format!("redis://u:pw@{}", server.addr());
    let ttl = Duration::from_secs(5);
    let a = connect(&url, ttl).await;
    let o = connect(&url, ttl).await;
    let name = unique("nochan");
    let ea = a.election(&name).unwrap();
    let mut obs = o.election(&name).unwrap().observe().with_vacancies();
    let poll = Duration::from_millis(500) + Duration::from_millis(300);
    let e = next_event(&mut obs, poll, "initial").await;
    assert!(matches!(e, LeaderEvent::Vacant), "{}", describe(&e));
    let mut leading = ea.campaign("v1").await.unwrap();
    let e = next_event(&mut obs, poll, "campaign").await;
    assert_eq!(describe(&e), "Leader(v1, v1)");
    leading.proclaim("v2").await.unwrap();
    let e = next_event(&mut obs, poll, "proclaim").await;
    assert_eq!(describe(&e), "Leader(v2, v2)");
    leading.resign().await.unwrap();
    let e = next_event(&mut obs, poll, "resign").await;
    assert!(matches!(e, LeaderEvent::Vacant), "{}", describe(&e));
    let leading = ea.campaign("v3").await.unwrap();
    let e = next_event(&mut obs, poll, "campaign 2").await;
    assert_eq!(describe(&e), "Leader(v3, v1)");
    let _: i64 = raw(&server.url()).await.del(ea.key()).await.unwrap();
    let e = next_event(&mut obs, poll, "del").await;
    assert!(matches!(e, LeaderEvent::Vacant), "{}", describe(&e));
    drop(leading);
    // Nothing more: no repeats.
    assert!(
        tokio::time::timeout(Duration::from_millis(1200), obs.next())
            .await
            .is_err()
    );
}

/// With one Redlock master of three down: leader() and observe follow a campaign, a
/// proclaim, a resign, without repeats or skips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_master_down_observe_and_leader() {
    let mut three = RedisServers::start_async(3).await;
    let url = three.redlock_url();
    let ttl = Duration::from_secs(3);
    let a = builder(&url, ttl)
        .with_request_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let o = builder(&url, ttl)
        .with_request_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let name = unique("down");
    let ea = a.election(&name).unwrap();
    let eo = o.election(&name).unwrap();
    three.kill(1);
    let mut obs = eo.observe().with_vacancies();
    let within = Duration::from_secs(2);
    let mut events = Vec::new();
    events.push(describe(&next_event(&mut obs, within, "initial").await));
    let mut leading = ea.campaign("v1").await.unwrap();
    assert_eq!(eo.leader().await.unwrap().value, b"v1");
    events.push(describe(&next_event(&mut obs, within, "campaign").await));
    leading.proclaim("v2").await.unwrap();
    assert_eq!(eo.leader().await.unwrap().value, b"v2");
    events.push(describe(&next_event(&mut obs, within, "proclaim").await));
    leading.resign().await.unwrap();
    let err = eo.leader().await.unwrap_err();
    assert!(matches!(err, Error::NoLeader { .. }), "{err}");
    events.push(describe(&next_event(&mut obs, within, "resign").await));
    assert_eq!(
        events,
        ["Vacant", "Leader(v1, v1)", "Leader(v2, v2)", "Vacant"]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), obs.next())
            .await
            .is_err(),
        "a repeat"
    );
}

/// Observe streams end after close: the client's, and the coordinator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_ends_after_close() {
    let one = RedisServer::start_async().await;
    let three = RedisServers::start_async(3).await;
    for url in [one.url(), three.redlock_url()] {
        let c = connect(&url, Duration::from_secs(5)).await;
        let name = unique("close");
        let leading = c.election(&name).unwrap().campaign("x").await.unwrap();
        let mut obs = c.election(&name).unwrap().observe();
        assert_eq!(obs.next().await.unwrap().value, b"x");
        c.close().await.unwrap();
        assert!(leading.is_lost());
        let end = tokio::time::timeout(Duration::from_secs(2), obs.next()).await;
        assert!(matches!(end, Ok(None)), "{url}: stream did not end");
        let coord = baton::Coordinator::connect(&url).await.unwrap();
        let el = coord.election(&name).unwrap();
        let leading = el.campaign(b"y".to_vec()).await.unwrap();
        let mut obs = el.observe();
        assert_eq!(obs.next().await.unwrap().value, b"y");
        coord.close().await.unwrap();
        assert!(leading.is_lost());
        let end = tokio::time::timeout(Duration::from_secs(2), obs.next()).await;
        assert!(
            matches!(end, Ok(None)),
            "{url}: coordinator stream did not end"
        );
        let err = el.leader().await.unwrap_err();
        assert!(matches!(err, Error::Closed), "{err}");
    }
}

/// A leader paused past its key's expiry while another leads: it knows at once, its
/// proclaim fails and re-creates nothing; leader() says the new one.
#[test]
fn rv_paused_leader_cannot_proclaim_over_the_next() {
    let one = RedisServer::start();
    let url = one.url();
    let ttl = Duration::from_millis(600);
    let name = unique("paused");
    let rt_a = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rt_b = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (a, mut leading) = rt_a.block_on(async {
        let a = connect(&url, ttl).await;
        let l = a.election(&name).unwrap().campaign("a").await.unwrap();
        (a, l)
    });
    // rt_a is not running: its watchdog is paused. b takes over after the key expires.
    let b_lead = rt_b.block_on(async {
        let b = connect(&url, ttl).await;
        let l = b
            .election(&name)
            .unwrap()
            .campaign_timeout("b", Duration::from_secs(3))
            .await
            .unwrap();
        (b, l)
    });
    assert!(leading.is_lost());
    rt_a.block_on(async {
        let err = leading.proclaim("a-again").await.unwrap_err();
        assert!(matches!(err, Error::NotLeader { .. }), "{err}");
        let read = a.election(&name).unwrap().leader().await.unwrap();
        assert_eq!(read.value, b"b");
        drop(leading);
    });
    rt_b.block_on(async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!b_lead.1.is_lost());
        assert_eq!(
            b_lead
                .0
                .election(&name)
                .unwrap()
                .leader()
                .await
                .unwrap()
                .value,
            b"b"
        );
    });
}

/// The docs: "A leader whose record is deleted (while its key stays) ... loses its
/// leadership at its next extend (a third of the TTL), and steps down." Stepping down frees
/// the key, so another candidate leads then, not a full TTL later (it did not: found by
/// review); and so does a proclaim that finds the record gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_record_is_deleted_frees_the_key_when_it_steps_down() {
    let one = RedisServer::start_async().await;
    let ttl = Duration::from_secs(3);
    let a = connect(&one.url(), ttl).await;
    let b = connect(&one.url(), ttl).await;
    let name = unique("stepdown");
    let leading = a.election(&name).unwrap().campaign("a").await.unwrap();
    let record = format!("baton:leader:{}", a.election(&name).unwrap().key());
    let t = Instant::now();
    let _: i64 = raw(&one.url()).await.del(&record).await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), leading.lost())
        .await
        .unwrap();
    let lost_at = t.elapsed();
    let other = b
        .election(&name)
        .unwrap()
        .campaign_timeout("b", Duration::from_secs(10))
        .await
        .unwrap();
    let led_at = t.elapsed();
    eprintln!("lost after {lost_at:?}, b leads after {led_at:?}");
    assert!(
        led_at < lost_at + Duration::from_millis(700),
        "b led {led_at:?} after the record's deletion, the leader stepped down at {lost_at:?}"
    );
    other.resign().await.unwrap();
    drop(leading);

    // The same found by a proclaim before the watchdog's next extend.
    let mut leading = a.election(&name).unwrap().campaign("a").await.unwrap();
    let t = Instant::now();
    let _: i64 = raw(&one.url()).await.del(&record).await.unwrap();
    let err = leading.proclaim("a2").await.unwrap_err();
    assert!(matches!(err, Error::NotLeader { .. }), "{err}");
    let other = b
        .election(&name)
        .unwrap()
        .campaign_timeout("b", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "b led {:?} after the record's deletion and a failed proclaim",
        t.elapsed()
    );
    other.resign().await.unwrap();
}

/// A candidate already waiting when the leader steps down
/// (its record deleted) is woken by the step-down's PUBLISH at once, not by its fallback
/// poll nor the key's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_candidate_leads_at_once_when_the_leader_steps_down() {
    let one = RedisServer::start_async().await;
    let ttl = Duration::from_secs(6);
    let a = connect(&one.url(), ttl).await;
    let b = connect(&one.url(), ttl).await;
    let name = unique("stepdown-wake");
    let leading = a.election(&name).unwrap().campaign("a").await.unwrap();
    let record = format!("baton:leader:{}", a.election(&name).unwrap().key());
    let election = b.election(&name).unwrap();
    let waiting = tokio::spawn(async move {
        let l = election
            .campaign_timeout("b", Duration::from_secs(20))
            .await
            .unwrap();
        (Instant::now(), l)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _: i64 = raw(&one.url()).await.del(&record).await.unwrap();
    tokio::time::timeout(Duration::from_secs(6), leading.lost())
        .await
        .unwrap();
    let lost = Instant::now();
    let (led, other) = waiting.await.unwrap();
    let after = led.saturating_duration_since(lost);
    eprintln!("b led {after:?} after a's loss");
    assert!(
        after < Duration::from_millis(300),
        "the waiting candidate led {after:?} after the leader stepped down"
    );
    other.resign().await.unwrap();
}

/// Redlock: the watchdog stepped down only when every failing master said "record gone".
/// With the record deleted on one master and the key gone from another (a master restarted
/// empty, an admin's DEL of the election there), the loss was reported as "the lock key was
/// deleted or expired", nothing was deleted, and our key stayed on two of three masters (a
/// quorum): every candidate was kept out for a full TTL (found by review). A lost leader now
/// steps down whatever the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redlock_leader_lost_for_mixed_reasons_steps_down_too() {
    let three = RedisServers::start_async(3).await;
    let masters: Vec<String> = three.servers().iter().map(|s| s.url()).collect();
    let ttl = Duration::from_secs(6);
    let a = connect(&three.redlock_url(), ttl).await;
    let b = connect(&three.redlock_url(), ttl).await;
    let name = unique("stepdown-mixed");
    let leading = a.election(&name).unwrap().campaign("a").await.unwrap();
    let record = format!("baton:leader:{}", a.election(&name).unwrap().key());
    let lock_keys = keys_with(&masters[1], &name).await;
    // Master 0: the record only. Master 1: everything of this election.
    let _: i64 = raw(&masters[0]).await.del(&record).await.unwrap();
    for k in &lock_keys {
        let _: i64 = raw(&masters[1]).await.del(k).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(6), leading.lost())
        .await
        .unwrap();
    let lost = Instant::now();
    eprintln!("lost: {:?}", leading.lost_reason());
    let other = b
        .election(&name)
        .unwrap()
        .campaign_timeout("b", Duration::from_secs(15))
        .await
        .unwrap();
    let after = lost.elapsed();
    assert!(
        after < Duration::from_millis(700),
        "b led {after:?} after a's loss (TTL {ttl:?}): a's key was left on a quorum"
    );
    other.resign().await.unwrap();
}
