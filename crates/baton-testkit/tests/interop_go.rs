//! Interoperability with etcd's own Go coordination code, on a real etcd:
//! `clientv3/concurrency` (Mutex, Election) and `contrib/recipes` (RWMutex, Barrier,
//! DoubleBarrier, Queue, PriorityQueue) of etcd 3.4, driven by the Go program in
//! `go/goi/main.go`, meet Baton's primitives of the same names, both ways.
//!
//! The program is built once per test run, with Debian's `golang-go` against the etcd
//! 3.4.23 sources of Debian's `golang-etcd-server-dev` (GOPATH mode, `/usr/share/gocode`),
//! its build cache under the target directory (a first build takes ~15 s, later ones ~1 s).
//! `scripts/test.sh` installs both packages; without them these tests fail with a message
//! saying so, unless `BATON_SKIP_GO=1` is set.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baton::store::Range;
use baton::{
    Barrier, Client, DoubleBarrier, Election, Error, Leader, Mutex, Observe, PriorityQueue, Queue,
    RwLock, Session,
};
use baton_testkit::EtcdServer;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

/// Where Debian's golang-etcd-server-dev installs etcd's Go sources: a GOPATH.
const GOPATH: &str = "/usr/share/gocode";
/// How long a Go program may take to print an expected line.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long nothing must happen for "it waits" to count as shown.
const QUIET: Duration = Duration::from_millis(500);

/// The built Go program, or `None` (after saying so) when `BATON_SKIP_GO=1` and Go or the
/// etcd sources are missing. Built once per test run.
fn goi() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(build_goi).as_deref()
}

fn build_goi() -> Option<PathBuf> {
    let go = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("go"))
        .find(|path| path.is_file());
    let etcd_sources = Path::new(GOPATH).join("src/go.etcd.io/etcd/contrib/recipes");
    let missing = match (&go, etcd_sources.is_dir()) {
        (None, _) => Some("Go (`go`) is not on the PATH".to_string()),
        (_, false) => Some(format!("etcd's Go sources are missing ({etcd_sources:?})")),
        _ => None,
    };
    if let Some(why) = missing {
        if std::env::var_os("BATON_SKIP_GO").is_some_and(|v| v == "1") {
            eprintln!("\n\n!!!!! SKIPPED the Go interop tests: {why}; BATON_SKIP_GO=1 !!!!!\n");
            return None;
        }
        panic!(
            "{why}: install Debian's golang-go and golang-etcd-server-dev \
             (`apt-get install golang-go golang-etcd-server-dev`; scripts/test.sh installs \
             them), or set BATON_SKIP_GO=1 to skip these tests"
        );
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("goi");
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("goi");
    // Built beside its final name and renamed, so that concurrent runs never see half a file.
    let partial = dir.join(format!("goi.{}", std::process::id()));
    let out = std::process::Command::new(go.unwrap())
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/go/goi"))
        // GOPATH mode, against Debian's sources; no cgo, so no C toolchain is needed.
        .env("GO111MODULE", "off")
        .env("GOPATH", GOPATH)
        .env("GOCACHE", dir.join("cache"))
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0")
        .args(["build", "-o"])
        .arg(&partial)
        .arg(".")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building go/goi failed (it needs golang-go and golang-etcd-server-dev):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&partial, &bin).unwrap();
    Some(bin)
}

/// A real etcd and a Baton client of it; `None` when the Go tests are skipped.
async fn setup() -> Option<(EtcdServer, Client)> {
    goi()?;
    let etcd = EtcdServer::start_async().await;
    let client = Client::connect(&etcd.endpoint()).await.unwrap();
    Some((etcd, client))
}

async fn session(client: &Client) -> Session {
    Session::builder(client)
        .with_ttl(Duration::from_secs(10))
        .build()
        .await
        .unwrap()
}

/// Nanoseconds since the Unix epoch: the Go program's clock too.
fn now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// One line of the Go program: `NAME AT FIELD...`.
#[derive(Clone, Debug)]
struct Event {
    name: String,
    at: u128,
    fields: Vec<String>,
}

/// A running Go program (killed on drop).
struct Go {
    args: Vec<String>,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: Option<JoinHandle<String>>,
}

impl Go {
    fn spawn(etcd: &EtcdServer, args: &[&str]) -> Go {
        let mut child = Command::new(goi().unwrap())
            .env("EP", etcd.endpoint())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut err = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s).await;
            s
        });
        Go {
            args: args.iter().map(|a| a.to_string()).collect(),
            stdin: child.stdin.take(),
            child,
            lines,
            stderr: Some(stderr),
        }
    }

    /// The next line, `None` at the end of the output, `Err` if none came within `within`.
    async fn next_within(&mut self, within: Duration) -> Result<Option<Event>, ()> {
        let line = match tokio::time::timeout(within, self.lines.next_line()).await {
            Err(_) => return Err(()),
            Ok(line) => line.unwrap(),
        };
        Ok(line.map(|line| {
            let mut parts = line.split(' ').map(str::to_string);
            let name = parts.next().unwrap();
            let at = parts
                .next()
                .and_then(|at| at.parse().ok())
                .unwrap_or_else(|| panic!("goi {:?}: a line without a time: {line}", self.args));
            Event {
                name,
                at,
                fields: parts.collect(),
            }
        }))
    }

    /// The next line, which must be the event `name`.
    async fn expect(&mut self, name: &str) -> Event {
        match self.next_within(PATIENCE).await {
            Ok(Some(event)) if event.name == name => event,
            Ok(Some(event)) => panic!("goi {:?}: expected {name}, got {event:?}", self.args),
            Ok(None) => {
                let stderr = self.stderr().await;
                panic!("goi {:?}: ended before {name}; stderr: {stderr}", self.args)
            }
            Err(()) => panic!("goi {:?}: no {name} within {PATIENCE:?}", self.args),
        }
    }

    /// Asserts the program prints nothing for `QUIET`: it is waiting (for `why`).
    async fn waits(&mut self, why: &str) {
        if let Ok(line) = self.next_within(QUIET).await {
            panic!("goi {:?}: {line:?} while {why}", self.args);
        }
    }

    /// Let a `-` hold go on.
    async fn proceed(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"\n").await.unwrap();
        stdin.flush().await.unwrap();
    }

    async fn stderr(&mut self) -> String {
        match self.stderr.take() {
            Some(task) => task.await.unwrap(),
            None => String::new(),
        }
    }

    /// The rest of the output, after the program exited with `code`.
    async fn finish_with(mut self, code: i32) -> Vec<Event> {
        self.stdin = None;
        let mut rest = Vec::new();
        loop {
            match self.next_within(PATIENCE).await {
                Ok(Some(event)) => rest.push(event),
                Ok(None) => break,
                Err(()) => panic!("goi {:?}: did not finish; got {rest:?}", self.args),
            }
        }
        let status = self.child.wait().await.unwrap();
        let stderr = self.stderr().await;
        assert_eq!(
            status.code(),
            Some(code),
            "goi {:?}: {status}; stderr: {stderr}",
            self.args
        );
        rest
    }

    /// The rest of the output, after the program exited successfully.
    async fn finish(self) -> Vec<Event> {
        self.finish_with(0).await
    }
}

/// The values of the events `name` among `events` (their first field).
fn values(events: &[Event], name: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.name == name)
        .map(|e| e.fields[0].clone())
        .collect()
}

/// The holds (acquired → releasing) a Go program printed.
fn go_holds(events: &[Event], who: &str) -> Vec<Hold> {
    let acquired = events.iter().filter(|e| e.name == "acquired");
    let releasing = events.iter().filter(|e| e.name == "releasing");
    acquired
        .zip(releasing)
        .map(|(a, r)| Hold {
            who: who.to_string(),
            from: a.at,
            to: r.at,
        })
        .collect()
}

/// A time a lock was held: from just after it was granted to just before its release, so
/// that the real hold includes it.
#[derive(Clone, Debug)]
struct Hold {
    who: String,
    from: u128,
    to: u128,
}

/// Asserts no two of `holds` overlap.
fn assert_exclusive(mut holds: Vec<Hold>) {
    holds.sort_by_key(|h| h.from);
    for pair in holds.windows(2) {
        assert!(
            pair[1].from >= pair[0].to,
            "{} and {} held at once: {:?} and {:?}",
            pair[0].who,
            pair[1].who,
            pair[0],
            pair[1]
        );
    }
}

/// The next leader `observe` reports.
async fn next_observed(observe: &mut Observe) -> Leader {
    tokio::time::timeout(PATIENCE, observe.next())
        .await
        .expect("Baton observed nothing")
        .unwrap()
}

/// The create revision and lease of `key`.
async fn key_info(client: &Client, key: &str) -> (i64, i64) {
    let mut kvs = client.store().range(Range::key(key)).await.unwrap().kvs;
    assert_eq!(kvs.len(), 1, "{key} does not exist");
    let kv = kvs.remove(0);
    (kv.create_revision, kv.lease)
}

/// Go holds a Mutex: Baton waits, and gets it once Go unlocks. Baton holds: Go waits, and
/// gets it once Baton unlocks. The key layout and the fencing tokens agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutex_handover_both_ways() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let s = session(&client).await;
    let name = "gi/mutex";

    let mut go = Go::spawn(&etcd, &["lock", name, "-"]);
    go.expect("waiting").await;
    let go_key = go.expect("acquired").await.fields[0].clone();
    let (go_rev, go_lease) = key_info(&client, &go_key).await;
    assert_eq!(go_key, format!("{name}/{go_lease:x}"));
    let m = Mutex::new(&s, name).unwrap();
    let err = m.try_lock().await.unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    let waiter = tokio::spawn(async move {
        let g = m.lock_timeout(PATIENCE).await.unwrap();
        (g, now())
    });
    tokio::time::sleep(QUIET).await;
    assert!(!waiter.is_finished(), "Baton locked while Go held");
    go.proceed().await;
    let releasing = go.expect("releasing").await;
    let (g, acquired) = waiter.await.unwrap();
    assert!(acquired > releasing.at, "Baton locked before Go unlocked");
    assert!(g.fencing_token() > go_rev);
    go.finish().await;

    let mut go = Go::spawn(&etcd, &["lock", name, "-"]);
    go.expect("waiting").await;
    go.waits("Baton holds the lock").await;
    let token = g.fencing_token();
    let unlocked = now();
    g.unlock().await.unwrap();
    let acquired = go.expect("acquired").await;
    assert!(acquired.at > unlocked, "Go locked before Baton unlocked");
    assert!(key_info(&client, &acquired.fields[0]).await.0 > token);
    go.proceed().await;
    go.finish().await;
}

/// Three Go and three Baton processes take one Mutex four times each: no two holds overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutex_contenders_never_overlap() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let name = "gi/contended";
    let gos: Vec<Go> = (0..3)
        .map(|_| Go::spawn(&etcd, &["lock", name, "20ms", "4"]))
        .collect();
    let batons: Vec<_> = (0..3)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let s = session(&client).await;
                let m = Mutex::new(&s, name).unwrap();
                let mut holds = Vec::new();
                for _ in 0..4 {
                    let g = m.lock_timeout(PATIENCE).await.unwrap();
                    let from = now();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    holds.push(Hold {
                        who: format!("baton{i}"),
                        from,
                        to: now(),
                    });
                    g.unlock().await.unwrap();
                }
                holds
            })
        })
        .collect();
    let mut holds = Vec::new();
    for (i, go) in gos.into_iter().enumerate() {
        holds.extend(go_holds(&go.finish().await, &format!("go{i}")));
    }
    for baton in batons {
        holds.extend(baton.await.unwrap());
    }
    assert_eq!(holds.len(), 24, "{holds:?}");
    assert_exclusive(holds);
}

/// A Go leader's Campaign and Proclaim are what Baton's `leader()` and `observe()` report,
/// and a Baton candidate takes over when the Go leader resigns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_go_leader_seen_by_baton() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let name = "gi/election";
    let mut observe = Election::observe_with(&client, name).unwrap();

    let mut go = Go::spawn(&etcd, &["campaign", name, "g1", "-", "g2", "-"]);
    go.expect("waiting").await;
    let led = go.expect("leader").await;
    let (go_key, go_rev) = (led.fields[0].clone(), led.fields[1].parse::<i64>().unwrap());
    let seen = next_observed(&mut observe).await;
    assert_eq!((seen.value_str().as_ref(), &seen.key), ("g1", &go_key));
    assert_eq!(seen.create_revision, go_rev);
    let leader = Election::leader_with(&client, name).await.unwrap();
    assert_eq!((leader.value_str().as_ref(), &leader.key), ("g1", &go_key));

    go.proceed().await;
    go.expect("proclaimed").await;
    let seen = next_observed(&mut observe).await;
    assert_eq!((seen.value_str().as_ref(), &seen.key), ("g2", &go_key));
    let leader = Election::leader_with(&client, name).await.unwrap();
    assert_eq!(leader.value_str(), "g2");

    let s = session(&client).await;
    let e = Election::new(&s, name).unwrap();
    let campaign = tokio::spawn(async move { e.campaign_timeout("b1", PATIENCE).await });
    tokio::time::sleep(QUIET).await;
    assert!(!campaign.is_finished(), "Baton led while Go leads");
    go.proceed().await;
    go.expect("resigned").await;
    go.finish().await;
    let leadership = campaign.await.unwrap().unwrap();
    let seen = next_observed(&mut observe).await;
    assert_eq!(seen.value_str(), "b1");
    assert_eq!(seen.key, leadership.key());
    assert!(seen.create_revision > go_rev);
    leadership.resign().await.unwrap();
}

/// A Baton leader's campaign and proclaim are what Go's Leader and Observe report, and a
/// waiting Go candidate takes over when Baton resigns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_baton_leader_seen_by_go() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let name = "gi/election";
    let s = session(&client).await;
    let mut leadership = Election::new(&s, name)
        .unwrap()
        .campaign("b1")
        .await
        .unwrap();

    let leader = Go::spawn(&etcd, &["leader", name]).finish().await;
    assert_eq!(leader[0].name, "leader");
    assert_eq!(leader[0].fields, ["b1", leadership.key()]);

    let mut observe = Go::spawn(&etcd, &["observe", name, "2", "10s"]);
    observe.expect("observing").await;
    assert_eq!(observe.expect("observed").await.fields[0], "b1");
    leadership.proclaim("b2").await.unwrap();
    assert_eq!(
        observe.expect("observed").await.fields,
        ["b2", leadership.key()]
    );
    observe.finish().await;

    let mut go = Go::spawn(&etcd, &["campaign", name, "g1", "-"]);
    go.expect("waiting").await;
    go.waits("Baton leads").await;
    let resigned = now();
    let baton_key = leadership.key().to_string();
    leadership.resign().await.unwrap();
    let led = go.expect("leader").await;
    assert!(led.at > resigned, "Go led before Baton resigned");
    assert_ne!(led.fields[0], baton_key);
    let leader = Election::leader_with(&client, name).await.unwrap();
    assert_eq!(
        (leader.value_str().as_ref(), &leader.key),
        ("g1", &led.fields[0])
    );
    go.proceed().await;
    go.expect("resigned").await;
    go.finish().await;
    let err = Election::leader_with(&client, name).await.unwrap_err();
    assert!(matches!(err, Error::NoLeader { .. }), "{err}");
}

/// RwLock against Go's RWMutex: a Go writer blocks a Baton reader, a Baton writer blocks a
/// Go reader, a Baton reader blocks a Go writer, and Go and Baton readers share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rwlock_shared_with_go() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let name = "gi/rw";
    let s = session(&client).await;

    // A Go writer blocks a Baton reader.
    let mut go = Go::spawn(&etcd, &["wlock", name, "-"]);
    go.expect("waiting").await;
    go.expect("acquired").await;
    let rw = RwLock::new(&s, name).unwrap();
    let err = rw.try_read().await.unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    let reader = tokio::spawn(async move {
        let g = rw.read_timeout(PATIENCE).await.unwrap();
        (g, now())
    });
    tokio::time::sleep(QUIET).await;
    assert!(!reader.is_finished(), "Baton read while a Go writer held");
    go.proceed().await;
    let releasing = go.expect("releasing").await;
    let (read, acquired) = reader.await.unwrap();
    assert!(
        acquired > releasing.at,
        "Baton read before the Go writer left"
    );
    go.finish().await;

    // Readers share: a Go reader gets in while Baton reads, and Baton's writer is kept out.
    let mut go = Go::spawn(&etcd, &["rlock", name, "-"]);
    go.expect("waiting").await;
    go.expect("acquired").await;
    let other = session(&client).await;
    let err = RwLock::new(&other, name)
        .unwrap()
        .try_write()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    go.proceed().await;
    go.finish().await;

    // A Baton reader blocks a Go writer.
    let mut go = Go::spawn(&etcd, &["wlock", name, "-"]);
    go.expect("waiting").await;
    go.waits("Baton reads").await;
    let unlocked = now();
    read.unlock().await.unwrap();
    assert!(go.expect("acquired").await.at > unlocked);
    go.proceed().await;
    go.finish().await;

    // A Baton writer blocks a Go reader.
    let write = RwLock::new(&s, name).unwrap().write().await.unwrap();
    let mut go = Go::spawn(&etcd, &["rlock", name, "-"]);
    go.expect("waiting").await;
    go.waits("Baton writes").await;
    let unlocked = now();
    write.unlock().await.unwrap();
    assert!(go.expect("acquired").await.at > unlocked);
    go.proceed().await;
    go.finish().await;
}

/// A Go and a Baton writer and a Go and a Baton reader, four rounds each: no writer's hold
/// overlaps another hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rwlock_contenders_never_overlap_writers() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let name = "gi/rw-contended";
    let go_writer = Go::spawn(&etcd, &["wlock", name, "20ms", "4"]);
    let go_reader = Go::spawn(&etcd, &["rlock", name, "20ms", "4"]);
    let baton = |write: bool| {
        let client = client.clone();
        tokio::spawn(async move {
            let s = session(&client).await;
            let rw = RwLock::new(&s, name).unwrap();
            let who = if write {
                "baton-writer"
            } else {
                "baton-reader"
            };
            let mut holds = Vec::new();
            for _ in 0..4 {
                let hold = async {
                    let from = now();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Hold {
                        who: who.to_string(),
                        from,
                        to: now(),
                    }
                };
                if write {
                    let g = rw.write_timeout(PATIENCE).await.unwrap();
                    holds.push(hold.await);
                    g.unlock().await.unwrap();
                } else {
                    let g = rw.read_timeout(PATIENCE).await.unwrap();
                    holds.push(hold.await);
                    g.unlock().await.unwrap();
                }
            }
            holds
        })
    };
    let (baton_writer, baton_reader) = (baton(true), baton(false));
    let mut writes = go_holds(&go_writer.finish().await, "go-writer");
    writes.extend(baton_writer.await.unwrap());
    let mut reads = go_holds(&go_reader.finish().await, "go-reader");
    reads.extend(baton_reader.await.unwrap());
    assert_eq!(writes.len(), 8, "{writes:?}");
    assert_eq!(reads.len(), 8, "{reads:?}");
    assert_exclusive(writes.clone());
    for w in &writes {
        for r in &reads {
            assert!(
                r.to <= w.from || w.to <= r.from,
                "{} wrote while {} read: {w:?} and {r:?}",
                w.who,
                r.who
            );
        }
    }
}

/// Go holds a barrier and releases it: Baton waiters wait until then. Baton holds: a Go
/// waiter waits until Baton releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_shared_with_go() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let name = "gi/barrier";
    let barrier = Barrier::new(&client, name).unwrap();

    let held = Go::spawn(&etcd, &["bhold", name]).finish().await;
    assert_eq!(held[0].name, "held");
    assert!(barrier.is_held().await.unwrap());
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait_timeout(PATIENCE).await.unwrap();
                now()
            })
        })
        .collect();
    tokio::time::sleep(QUIET).await;
    assert!(
        waiters.iter().all(|w| !w.is_finished()),
        "passed a held barrier"
    );
    let released = now();
    Go::spawn(&etcd, &["brelease", name]).finish().await;
    for waiter in waiters {
        assert!(waiter.await.unwrap() > released);
    }
    assert!(!barrier.is_held().await.unwrap());

    // Nothing is written between the hold and the Go waiter's read (see the hazard below).
    assert!(barrier.hold().await.unwrap());
    let mut go = Go::spawn(&etcd, &["bwait", name, "10s"]);
    go.expect("waiting").await;
    go.waits("Baton holds the barrier").await;
    let released = now();
    assert!(barrier.release().await.unwrap());
    assert!(go.expect("passed").await.at > released);
    go.finish().await;
}

/// The hazard the README warns of, which is Go's: etcd 3.4's `Barrier.Wait` watches for a
/// put and then a delete from the revision of its read, so a write anywhere in the store
/// between the hold and the Wait makes it miss the release and hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hazard_go_barrier_wait_misses_release_after_other_write() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let name = "gi/barrier";
    let barrier = Barrier::new(&client, name).unwrap();
    assert!(barrier.hold().await.unwrap());
    client.store().put(b"gi/unrelated", b"x", 0).await.unwrap();
    let mut go = Go::spawn(&etcd, &["bwait", name, "3s"]);
    go.expect("waiting").await;
    // Let its read happen while the barrier is held.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(barrier.release().await.unwrap());
    go.expect("timeout").await;
    go.finish_with(3).await;
    // Baton's waiter passes the released barrier.
    barrier.wait_timeout(PATIENCE).await.unwrap();
}

/// Two Go and two Baton participants of one DoubleBarrier enter together (nobody before the
/// last arrives) and leave together (nobody before the last starts leaving).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_barrier_mixed_participants() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let name = "gi/double";
    let baton = |hold: Duration| {
        let client = client.clone();
        tokio::spawn(async move {
            let s = session(&client).await;
            let b = DoubleBarrier::new(&s, name, 4).unwrap();
            let entering = now();
            let g = b.enter_timeout(PATIENCE).await.unwrap();
            let entered = now();
            tokio::time::sleep(hold).await;
            let leaving = now();
            g.leave_timeout(PATIENCE).await.unwrap();
            [entering, entered, leaving, now()]
        })
    };
    let mut go1 = Go::spawn(&etcd, &["dbarrier", name, "4", "0s"]);
    let baton1 = baton(Duration::ZERO);
    let mut go1_events = vec![go1.expect("entering").await];
    go1.waits("only two of four entered").await;
    assert!(!baton1.is_finished(), "Baton entered with two of four");
    let go2 = Go::spawn(&etcd, &["dbarrier", name, "4", "400ms"]);
    let baton2 = baton(Duration::from_millis(400));

    let mut times = vec![baton1.await.unwrap(), baton2.await.unwrap()];
    go1_events.extend(go1.finish().await);
    for events in [go1_events, go2.finish().await] {
        let at = |name: &str| events.iter().find(|e| e.name == name).unwrap().at;
        times.push([at("entering"), at("entered"), at("leaving"), at("left")]);
    }
    let last_entering = times.iter().map(|t| t[0]).max().unwrap();
    let first_entered = times.iter().map(|t| t[1]).min().unwrap();
    let last_leaving = times.iter().map(|t| t[2]).max().unwrap();
    let first_left = times.iter().map(|t| t[3]).min().unwrap();
    assert!(
        first_entered >= last_entering,
        "entered before all arrived: {times:?}"
    );
    assert!(
        first_left >= last_leaving,
        "left before all left: {times:?}"
    );
}

/// Go's Queue and Baton's: items go both ways in order and intact, and with Go and Baton
/// producers and consumers at once, every item is taken exactly once, each consumer taking
/// each producer's items in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_shared_with_go() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let name = "gi/queue";
    let q = Queue::new(&client, name).unwrap();

    let sent: Vec<String> = (0..10).map(|i| format!("go-{i}")).collect();
    let mut args = vec!["enqueue", name];
    args.extend(sent.iter().map(String::as_str));
    Go::spawn(&etcd, &args).finish().await;
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(String::from_utf8(q.dequeue_timeout(PATIENCE).await.unwrap()).unwrap());
    }
    assert_eq!(got, sent);
    assert_eq!(q.try_dequeue().await.unwrap(), None);

    let sent: Vec<String> = (0..10).map(|i| format!("baton-{i}")).collect();
    for v in &sent {
        q.enqueue(v.as_str()).await.unwrap();
    }
    let events = Go::spawn(&etcd, &["dequeue", name, "10"]).finish().await;
    assert_eq!(values(&events, "dequeued"), sent);
    assert_eq!(q.try_dequeue().await.unwrap(), None);

    // Everything at once: 15 items from each side, taken by two Go consumers (10 each) and
    // a Baton one (10).
    let consumers = [
        Go::spawn(&etcd, &["dequeue", name, "10"]),
        Go::spawn(&etcd, &["dequeue", name, "10"]),
    ];
    let baton_consumer = tokio::spawn({
        let q = q.clone();
        async move {
            let mut got = Vec::new();
            for _ in 0..10 {
                got.push(String::from_utf8(q.dequeue_timeout(PATIENCE).await.unwrap()).unwrap());
            }
            got
        }
    });
    let go_items: Vec<String> = (0..15).map(|i| format!("g{i:02}")).collect();
    let mut args = vec!["enqueue", name];
    args.extend(go_items.iter().map(String::as_str));
    let producer = Go::spawn(&etcd, &args);
    for i in 0..15 {
        q.enqueue(format!("b{i:02}")).await.unwrap();
    }
    producer.finish().await;
    let mut taken = vec![baton_consumer.await.unwrap()];
    for go in consumers {
        taken.push(values(&go.finish().await, "dequeued"));
    }
    for got in &taken {
        for side in ["g", "b"] {
            let mine: Vec<&String> = got.iter().filter(|v| v.starts_with(side)).collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "out of order: {got:?}"
            );
        }
    }
    let all: Vec<&String> = taken.iter().flatten().collect();
    let distinct: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(all.len(), 30, "{taken:?}");
    assert_eq!(distinct.len(), 30, "an item taken twice: {taken:?}");
    assert_eq!(q.try_dequeue().await.unwrap(), None);
}

/// Go's PriorityQueue and Baton's: items come out by priority (0 first), first in first out
/// within a priority, whichever side enqueued them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_queue_shared_with_go() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let name = "gi/pq";
    let q = PriorityQueue::new(&client, name).unwrap();
    let items = [(2, "a"), (0, "b"), (1, "c"), (0, "d"), (2, "e"), (1, "f")];
    let by_priority = ["b", "d", "c", "f", "a", "e"];

    let mut args = vec!["penqueue".to_string(), name.to_string()];
    for (p, v) in items {
        args.extend([p.to_string(), v.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Go::spawn(&etcd, &args).finish().await;
    let mut got = Vec::new();
    for _ in 0..items.len() {
        got.push(String::from_utf8(q.dequeue_timeout(PATIENCE).await.unwrap()).unwrap());
    }
    assert_eq!(got, by_priority);
    assert_eq!(q.try_dequeue().await.unwrap(), None);

    for (p, v) in items {
        q.enqueue(v, p).await.unwrap();
    }
    let events = Go::spawn(&etcd, &["pdequeue", name, "6"]).finish().await;
    assert_eq!(values(&events, "dequeued"), by_priority);

    // One priority, both sides producing in turn: first in, first out.
    Go::spawn(&etcd, &["penqueue", name, "1", "go-1"])
        .finish()
        .await;
    q.enqueue("baton-1", 1).await.unwrap();
    Go::spawn(&etcd, &["penqueue", name, "1", "go-2"])
        .finish()
        .await;
    q.enqueue("baton-2", 1).await.unwrap();
    q.enqueue("urgent", 0).await.unwrap();
    let events = Go::spawn(&etcd, &["pdequeue", name, "3"]).finish().await;
    assert_eq!(values(&events, "dequeued"), ["urgent", "go-1", "baton-1"]);
    let mut rest = Vec::new();
    for _ in 0..2 {
        rest.push(String::from_utf8(q.dequeue_timeout(PATIENCE).await.unwrap()).unwrap());
    }
    assert_eq!(rest, ["go-2", "baton-2"]);
    assert_eq!(q.try_dequeue().await.unwrap(), None);
}

/// The hazard the README warns of, which is Go's: `recipe.Queue` reads `NAME` as a bare
/// prefix, so a Go consumer of queue `jobs` takes the items of Baton's queue `jobs2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hazard_go_queue_takes_items_of_prefix_sharing_names() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let other = Queue::new(&client, "gi/jobs2").unwrap();
    other.enqueue("not-yours").await.unwrap();
    let events = Go::spawn(&etcd, &["dequeue", "gi/jobs", "1"])
        .finish()
        .await;
    assert_eq!(values(&events, "dequeued"), ["not-yours"]);
    assert_eq!(other.try_dequeue().await.unwrap(), None);
}

/// A mixed fleet under contention with cancellation: two Go writers and two Go readers
/// (each its own session) against Baton writers and readers whose waits time out at random
/// (their keys removed mid-queue, ahead of and behind Go's), and whose guards are unlocked
/// or dropped: no writer's hold overlaps another hold, both sides hold, and no key is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rwlock_mixed_fleet_with_timeouts_never_overlaps() {
    let Some((etcd, client)) = setup().await else {
        return;
    };
    let name = "gi/rw-mixed-timeouts";
    let gos = [
        (
            "go-writer-1",
            Go::spawn(&etcd, &["wlock", name, "15ms", "6"]),
        ),
        (
            "go-writer-2",
            Go::spawn(&etcd, &["wlock", name, "15ms", "6"]),
        ),
        (
            "go-reader-1",
            Go::spawn(&etcd, &["rlock", name, "15ms", "6"]),
        ),
        (
            "go-reader-2",
            Go::spawn(&etcd, &["rlock", name, "15ms", "6"]),
        ),
    ];
    let baton = |i: u64, write: bool| {
        let client = client.clone();
        tokio::spawn(async move {
            let s = session(&client).await;
            let rw = RwLock::new(&s, name).unwrap();
            let who = format!("baton-{}-{i}", if write { "writer" } else { "reader" });
            let mut holds = Vec::new();
            for round in 0..20u64 {
                let x = (i * 7919 + round * 104729) % 97;
                // 5 to 239 ms: shorter than a Go waiter's wake-up (etcd's 100 ms sweep of
                // its watch) often, longer sometimes, so that both sides get holds.
                let timeout = Duration::from_millis(5 + (x % 40) * 6);
                let hold = async {
                    let from = now();
                    tokio::time::sleep(Duration::from_millis(3 + x % 5)).await;
                    Hold {
                        who: who.clone(),
                        from,
                        to: now(),
                    }
                };
                // Hold, then unlock or drop (the guards are of two types).
                macro_rules! hold_then_free {
                    ($got:expr) => {
                        match $got {
                            Ok(g) => {
                                holds.push(hold.await);
                                if x % 2 == 0 {
                                    g.unlock().await.unwrap();
                                } else {
                                    drop(g);
                                }
                            }
                            Err(e) => assert!(e.is_timeout(), "{e}"),
                        }
                    };
                }
                if write {
                    hold_then_free!(rw.write_timeout(timeout).await)
                } else {
                    hold_then_free!(rw.read_timeout(timeout).await)
                }
            }
            s.close().await.unwrap();
            holds
        })
    };
    let tasks: Vec<_> = (0..3)
        .map(|i| baton(i, true))
        .chain((0..3).map(|i| baton(i, false)))
        .collect();
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let h = t.await.unwrap();
        if i < 3 {
            writes.extend(h);
        } else {
            reads.extend(h);
        }
    }
    for (who, go) in gos {
        let holds = go_holds(&go.finish().await, who);
        assert_eq!(holds.len(), 6, "{who}");
        if who.contains("writer") {
            writes.extend(holds);
        } else {
            reads.extend(holds);
        }
    }
    eprintln!("{} writes, {} reads", writes.len(), reads.len());
    for side in ["baton-writer", "baton-reader"] {
        assert!(
            writes.iter().chain(&reads).any(|h| h.who.starts_with(side)),
            "no {side} ever held: the check checked Go alone"
        );
    }
    assert_exclusive(writes.clone());
    for w in &writes {
        for r in &reads {
            assert!(
                r.to <= w.from || w.to <= r.from,
                "{} wrote while {} read: {w:?} and {r:?}",
                w.who,
                r.who
            );
        }
    }
    assert!(client
        .store()
        .range(Range::prefix(format!("{name}/")))
        .await
        .unwrap()
        .kvs
        .is_empty());
}
