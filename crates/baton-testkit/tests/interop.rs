//! Interoperability with Go's `clientv3/concurrency` through `etcdctl lock` and
//! `etcdctl elect` (Debian's etcd-client, which calls that package), on a real etcd.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use baton::{Client, Election, Error, Mutex, Session};
use baton_testkit::{etcdctl_bin, EtcdServer};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// `etcdctl ARGS` in the background, stdout piped, killed on drop.
fn etcdctl_bg(etcd: &EtcdServer, args: &[&str]) -> Child {
    Command::new(etcdctl_bin().expect("etcdctl not installed"))
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoint()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn first_line(child: &mut Child, within: Duration) -> Option<String> {
    let out = child.stdout.as_mut().unwrap();
    let mut lines = BufReader::new(out).lines();
    tokio::time::timeout(within, lines.next_line())
        .await
        .ok()
        .and_then(|r| r.ok())
        .flatten()
}

async fn session(etcd: &EtcdServer) -> Session {
    let client = Client::connect(&etcd.endpoint()).await.unwrap();
    Session::builder(&client)
        .with_ttl(Duration::from_secs(10))
        .build()
        .await
        .unwrap()
}

/// While `etcdctl lock` holds, Baton waits; Baton gets the lock when etcdctl releases it, and
/// `ETCD_LOCK_KEY` / `ETCD_LOCK_REV` follow Baton's key layout and token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_waits_for_etcdctl_lock() {
    let etcd = EtcdServer::start_async().await;
    let mut ctl = etcdctl_bg(
        &etcd,
        &[
            "lock",
            "interop/job",
            "--",
            "sh",
            "-c",
            "echo $ETCD_LOCK_KEY $ETCD_LOCK_REV; sleep 2",
        ],
    );
    let line = first_line(&mut ctl, Duration::from_secs(10))
        .await
        .expect("etcdctl lock did not acquire");
    let acquired = Instant::now();
    let (ctl_key, ctl_rev) = line.split_once(' ').unwrap();
    let ctl_rev: i64 = ctl_rev.parse().unwrap();

    // ETCD_LOCK_KEY is NAME/<lease hex> for the lease the key is bound to, and ETCD_LOCK_REV
    // its create revision: Baton's layout and fencing token.
    let s = session(&etcd).await;
    let kv = s
        .client()
        .store()
        .range(baton::store::Range::key(ctl_key))
        .await
        .unwrap()
        .kvs
        .remove(0);
    assert_eq!(ctl_key, format!("interop/job/{:x}", kv.lease));
    assert_eq!(ctl_rev, kv.create_revision);
    // A Baton session on the same lease names the very same key.
    let adopted = Session::builder(s.client())
        .with_lease(kv.lease)
        .build()
        .await
        .unwrap();
    assert_eq!(Mutex::new(&adopted, "interop/job").unwrap().key(), ctl_key);
    adopted.orphan();

    let m = Mutex::new(&s, "interop/job").unwrap();
    let err = m.try_lock().await.unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    let g = m.lock_timeout(Duration::from_secs(10)).await.unwrap();
    let waited = acquired.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "Baton acquired while etcdctl held ({waited:?})"
    );
    assert!(g.fencing_token() > ctl_rev);
    assert!(ctl.wait().await.unwrap().success());
    g.unlock().await.unwrap();
}

/// While Baton holds, `etcdctl lock` waits; it acquires as soon as Baton unlocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_waits_for_baton_lock() {
    let etcd = EtcdServer::start_async().await;
    let s = session(&etcd).await;
    let g = Mutex::new(&s, "interop/rev").unwrap().lock().await.unwrap();
    let mut ctl = etcdctl_bg(
        &etcd,
        &[
            "lock",
            "interop/rev",
            "--",
            "sh",
            "-c",
            "echo $ETCD_LOCK_REV",
        ],
    );
    assert_eq!(
        first_line(&mut ctl, Duration::from_secs(1)).await,
        None,
        "etcdctl acquired while Baton held"
    );
    let token = g.fencing_token();
    let granted = g.granted_revision();
    g.unlock().await.unwrap();
    let line = first_line(&mut ctl, Duration::from_secs(5))
        .await
        .expect("etcdctl did not acquire after Baton released");
    let ctl_rev = line.trim().parse::<i64>().unwrap();
    assert!(ctl_rev > token && ctl_rev > granted);
    assert!(ctl.wait().await.unwrap().success());
}

/// `etcdctl lock` exports as `ETCD_LOCK_REV` the revision at which it was granted (Go's
/// `Mutex.Header().Revision`), larger than its key's create revision when it waited. A Baton
/// waiter queued behind it (created after it, so before it was granted) is granted next: its
/// `granted_revision()` (what `baton lock` exports as `ETCD_LOCK_REV`) is larger than
/// etcdctl's, as a resource fenced on that variable needs; its `fencing_token()` (its
/// create revision) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_revisions_rise_when_etcdctl_and_baton_take_turns() {
    let etcd = EtcdServer::start_async().await;
    let Queued {
        h: _h,
        g,
        mut ctl,
        b: _b,
        waiting,
    } = queued(&etcd, "interop/turns", "echo $ETCD_LOCK_REV").await;
    let first = g.granted_revision();
    g.unlock().await.unwrap();
    let ctl_rev: i64 = first_line(&mut ctl, Duration::from_secs(5))
        .await
        .expect("etcdctl did not acquire")
        .trim()
        .parse()
        .unwrap();
    assert!(ctl_rev > first, "{ctl_rev} <= {first}");
    assert!(ctl.wait().await.unwrap().success());
    let gb = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        gb.granted_revision() > ctl_rev,
        "Baton's grant after etcdctl's has granted_revision {} <= etcdctl's ETCD_LOCK_REV \
         {ctl_rev}",
        gb.granted_revision()
    );
    // Its create revision is older than etcdctl's grant: no fence across the two tools.
    assert!(gb.fencing_token() < ctl_rev);
    gb.unlock().await.unwrap();
}

/// `etcdctl elect NAME v1` leads: Baton's `leader()` and `observe()` see `v1`; Baton queues
/// behind it and leads when it exits. While Baton leads, `etcdctl elect -l` prints Baton's
/// value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_are_shared_with_etcdctl_elect() {
    let etcd = EtcdServer::start_async().await;
    let mut ctl = etcdctl_bg(&etcd, &["elect", "interop/leader", "v1"]);
    // etcdctl elect prints the key, then the value, once it leads.
    let key = first_line(&mut ctl, Duration::from_secs(10))
        .await
        .expect("etcdctl elect did not lead");
    assert!(key.starts_with("interop/leader/"), "{key}");

    let client = Client::connect(&etcd.endpoint()).await.unwrap();
    let leader = Election::leader_with(&client, "interop/leader")
        .await
        .unwrap();
    assert_eq!(leader.value_str(), "v1");
    assert_eq!(leader.key, key);
    let mut obs = Election::observe_with(&client, "interop/leader").unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(3), obs.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.value_str(), "v1");

    let s = session(&etcd).await;
    let e = Election::new(&s, "interop/leader").unwrap();
    let campaign = tokio::spawn(async move { e.campaign("baton-v2").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !campaign.is_finished(),
        "Baton led while etcdctl elect leads"
    );
    // etcdctl elect resigns on SIGINT.
    let pid = ctl.id().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let l = tokio::time::timeout(Duration::from_secs(5), campaign)
        .await
        .expect("Baton did not lead after etcdctl resigned")
        .unwrap()
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(3), obs.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.value_str(), "baton-v2");

    // `etcdctl elect -l` prints the leader's key, then its value, then follows changes.
    let mut listen = etcdctl_bg(&etcd, &["elect", "-l", "interop/leader"]);
    let out = listen.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    for want in [l.key(), "baton-v2"] {
        let got = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .expect("etcdctl elect -l printed nothing")
            .unwrap()
            .unwrap_or_default();
        assert_eq!(got, want);
    }
    drop(listen);
    l.resign().await.unwrap();
}

/// A long queue on a nested name (`interop/parent/child`, 11 sessions each with a client of
/// its own) hands over by handoff marks, and the mark stays after the queue has drained (it
/// goes with its session). It lies under none of the name's parents' prefixes: `etcdctl
/// lock` on the parent name, which counts every key under `interop/parent/` as a holder,
/// acquires at once (found by review: the mark's first key, `NAME\0baton-handoff`, lay
/// under `interop/parent/` and held `etcdctl lock interop/parent` up for as long as it
/// lived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_names_handoff_mark_holds_up_no_parent() {
    let etcd = EtcdServer::start_async().await;
    let name = "interop/parent/child";
    let first = session(&etcd).await;
    let held = Mutex::new(&first, name).unwrap().lock().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut sessions = vec![first];
    let n = 10;
    for i in 0..n {
        let s = session(&etcd).await;
        let mutex = Mutex::new(&s, name).unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            let guard = mutex.lock().await.unwrap();
            tx.send(guard.fencing_token()).unwrap();
            guard.unlock().await.unwrap();
        });
        baton_testkit::conformance::wait_queued(sessions[0].client(), name, i).await;
        sessions.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    held.unlock().await.unwrap();
    let mut tokens = Vec::new();
    for _ in 0..n {
        let token = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a waiter hung")
            .unwrap();
        tokens.push(token);
    }
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    // The last holder sends its token before its unlock: wait for that to land.
    let store = sessions[0].client().store().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = store
            .range(baton::store::Range::prefix("interop/parent/"))
            .await
            .unwrap();
        if left.kvs.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last holder's key stayed: {:?}",
            left.kvs
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mark = store
        .range(baton::store::Range::key(
            b"interop\0baton-handoff/parent/child".to_vec(),
        ))
        .await
        .unwrap();
    assert_eq!(
        mark.kvs.len(),
        1,
        "no mark was left: the test tests nothing"
    );
    let mut ctl = etcdctl_bg(
        &etcd,
        &["lock", "interop/parent", "--", "sh", "-c", "echo acquired"],
    );
    let line = first_line(&mut ctl, Duration::from_secs(5)).await;
    assert_eq!(
        line.as_deref(),
        Some("acquired"),
        "etcdctl lock on the parent blocked"
    );
    for s in sessions {
        s.close().await.unwrap();
    }
    assert!(store
        .range(baton::store::Range::key(
            b"interop\0baton-handoff/parent/child".to_vec()
        ))
        .await
        .unwrap()
        .kvs
        .is_empty());
}

/// `etcdctl elect` leads, a Baton candidate waits behind it and an
/// `etcdctl elect` candidate behind that; the Baton campaign times out (dropped mid-wait,
/// its session alive): its key goes, and the second etcdctl candidate leads as soon as the
/// first resigns, not blocked behind a candidacy nobody holds any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_baton_campaign_does_not_block_an_etcdctl_candidate() {
    let etcd = EtcdServer::start_async().await;
    let name = "interop/drop";
    let mut first = etcdctl_bg(&etcd, &["elect", name, "g1"]);
    first_line(&mut first, Duration::from_secs(10))
        .await
        .expect("etcdctl elect did not lead");
    let s = session(&etcd).await;
    let e = Election::new(&s, name).unwrap();
    let client = s.client().clone();
    let campaign = {
        let e = e.clone();
        tokio::spawn(async move { e.campaign_timeout("b", Duration::from_secs(2)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut second = etcdctl_bg(&etcd, &["elect", name, "g2"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let keys = client
        .store()
        .range(baton::store::Range::prefix(format!("{name}/")))
        .await
        .unwrap()
        .kvs;
    assert_eq!(keys.len(), 3, "{keys:?}");
    let err = campaign.await.unwrap().unwrap_err();
    assert!(err.is_timeout(), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(client
        .store()
        .range(baton::store::Range::key(e.key()))
        .await
        .unwrap()
        .kvs
        .is_empty());
    let pid = first.id().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let started = Instant::now();
    let line = first_line(&mut second, Duration::from_secs(5))
        .await
        .expect("the etcdctl candidate did not lead");
    assert!(line.starts_with(&format!("{name}/")), "{line}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let leader = Election::leader_with(&client, name).await.unwrap();
    assert_eq!(leader.value_str(), "g2");
    drop(s);
}

/// Why the docs say to free no Go waiter's place: an operator deletes an `etcdctl lock`
/// waiter's key (`etcdctl del`) while a Baton waiter queues behind it. Go's `Mutex.Lock`
/// (etcd 3.4) waits for the keys created before its own, then takes the lock without
/// looking at its own key: etcdctl runs its command, while the Baton waiter, now first in
/// the queue, is granted too. The hazard is Go's; this test shows it still exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hazard_an_etcdctl_waiter_whose_key_was_deleted_still_takes_the_lock() {
    let etcd = EtcdServer::start_async().await;
    let Queued {
        h,
        g,
        mut ctl,
        b,
        waiting,
    } = queued(&etcd, "interop/freed", "echo held; sleep 10").await;
    let keys = h
        .client()
        .store()
        .range(baton::store::Range::prefix("interop/freed/"))
        .await
        .unwrap()
        .kvs;
    let ctl_key = keys
        .iter()
        .find(|k| k.lease != h.lease_id() && k.lease != b.lease_id())
        .expect("etcdctl's key")
        .key
        .clone();
    h.client()
        .store()
        .delete(baton::store::KeyRange::key(ctl_key))
        .await
        .unwrap();
    g.unlock().await.unwrap();
    let ctl_held = first_line(&mut ctl, Duration::from_secs(5)).await;
    assert_eq!(ctl_held.as_deref(), Some("held"));
    let gb = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the Baton waiter was not granted")
        .unwrap()
        .unwrap();
    // Both hold: etcdctl's command runs (for 10 s) while Baton holds.
    assert!(ctl.try_wait().unwrap().is_none());
    gb.unlock().await.unwrap();
}

/// A Baton holder of `name` (session `h`, guard `g`), an `etcdctl lock name -- sh -c
/// script` waiting behind it (`ctl`), and a Baton waiter behind that (session `b`, its
/// `lock()` in `waiting`).
struct Queued {
    h: Session,
    g: baton::MutexGuard,
    ctl: Child,
    b: Session,
    waiting: tokio::task::JoinHandle<baton::Result<baton::MutexGuard>>,
}

async fn queued(etcd: &EtcdServer, name: &str, script: &str) -> Queued {
    let h = session(etcd).await;
    let g = Mutex::new(&h, name).unwrap().lock().await.unwrap();
    let ctl = etcdctl_bg(etcd, &["lock", name, "--", "sh", "-c", script]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = session(etcd).await;
    let mb = Mutex::new(&b, name).unwrap();
    let waiting = tokio::spawn(async move { mb.lock().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    Queued {
        h,
        g,
        ctl,
        b,
        waiting,
    }
}
