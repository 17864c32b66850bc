//! `baton sem`, `barrier`, `queue`, `get`, `set` and `watch`, run as a user would, against
//! real etcd.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// The files in `dir` whose names start with `prefix`.
fn count_files(dir: &Path, prefix: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(prefix)
        })
        .count()
}

/// With 2 permits, two CMDs run at once and a third waits until one ends; `--try` exits 124
/// at once while both are taken.
#[test]
fn sem_two_permits_third_waits() {
    let etcd = etcd();
    let dir = tempfile::tempdir().unwrap();
    let script = r#"touch "$DIR/in.$$"; while [ ! -e "$DIR/go" ]; do sleep 0.02; done"#;
    let spawn = || {
        Proc::spawn(baton(&etcd.endpoint()).env("DIR", dir.path()).args([
            "sem",
            "encoders",
            "--permits",
            "2",
            "--",
            "sh",
            "-c",
            script,
        ]))
    };
    let mut procs: Vec<Proc> = (0..3).map(|_| spawn()).collect();
    wait_until("two CMDs running", || count_files(dir.path(), "in.") == 2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count_files(dir.path(), "in."), 2, "a third CMD ran");
    assert_eq!(keys(&etcd, "encoders/").len(), 3);

    let (out, took) = run(baton(&etcd.endpoint()).args([
        "sem",
        "--try",
        "encoders",
        "--permits",
        "2",
        "--",
        "true",
    ]));
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(took < Duration::from_secs(3), "--try took {took:?}");
    let err = stderr_lines(&out);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("no free permit"), "{err:?}");

    // Another permit count than the holders' is refused.
    let (out, _) = run(baton(&etcd.endpoint()).args([
        "sem",
        "--try",
        "encoders",
        "--permits",
        "3",
        "--",
        "true",
    ]));
    assert_eq!(out.status.code(), Some(125), "{out:?}");

    std::fs::write(dir.path().join("go"), "").unwrap();
    for p in &mut procs {
        assert_eq!(p.code(), 0, "{:?}", p.stderr_so_far());
    }
    assert_eq!(count_files(dir.path(), "in."), 3);
    assert!(keys(&etcd, "encoders/").is_empty());
}

/// When a holder's lease is revoked, its CMD is terminated and `baton sem` exits 122 with
/// `permit lost` on stderr.
#[test]
fn sem_lost_permit_exits_122() {
    let etcd = etcd();
    let mut holder = Proc::spawn(baton(&etcd.endpoint()).args([
        "sem",
        "lossy",
        "--permits",
        "2",
        "--grace",
        "1s",
        "--",
        "sleep",
        "30",
    ]));
    wait_until("the permit key", || keys(&etcd, "lossy/").len() == 1);
    revoke(&etcd, &keys(&etcd, "lossy/")[0]);
    assert!(
        holder.wait(Duration::from_secs(5)).is_some(),
        "baton sem did not end after the loss"
    );
    assert_eq!(holder.code(), 122);
    let err = holder.stderr_after_exit();
    assert!(err.iter().any(|l| l.starts_with("permit lost")), "{err:?}");
}

/// A waiter for a permit, and a barrier participant, whose session is lost held nothing:
/// they exit 125 saying so, not 122 ("lost while held").
#[test]
fn sem_and_barrier_session_lost_while_waiting_exit_125() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let _holder = Proc::spawn(baton(&ep).args(["sem", "full", "--permits", "1"]));
    wait_until("the holder's key", || keys(&etcd, "full/").len() == 1);
    let holder_key = keys(&etcd, "full/")[0].clone();
    let mut waiter = Proc::spawn(baton(&ep).args(["sem", "full", "--permits", "1", "--", "true"]));
    revoke_waiter_and_expect_125(
        &etcd,
        "full/",
        &holder_key,
        &mut waiter,
        "baton: session lost while waiting for a permit of semaphore \"full\"",
    );

    let mut alone = Proc::spawn(baton(&ep).args(["barrier", "pair", "--count", "2"]));
    wait_until("the participant's key", || {
        keys(&etcd, "pair/waiters/").len() == 1
    });
    revoke(&etcd, &keys(&etcd, "pair/waiters/")[0]);
    assert_eq!(alone.code(), 125);
    let err = alone.stderr_all();
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].starts_with("baton: session lost while waiting at barrier \"pair\""),
        "{err:?}"
    );
}

/// A waiter for a permit, and a barrier participant, whose key is deleted (its session
/// alive) held nothing: they exit 125 saying that their key was deleted, not that their
/// session was lost (found by review: `baton sem` said "session lost").
#[test]
fn sem_and_barrier_key_deleted_while_waiting_exit_125() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let _holder = Proc::spawn(baton(&ep).args(["sem", "kd", "--permits", "1"]));
    wait_until("the holder's key", || keys(&etcd, "kd/").len() == 1);
    let holder_key = keys(&etcd, "kd/")[0].clone();
    let mut waiter = Proc::spawn(baton(&ep).args(["sem", "kd", "--permits", "1", "--", "true"]));
    delete_waiter_key_and_expect_125(
        &etcd,
        "kd/",
        &holder_key,
        &mut waiter,
        "for a permit of semaphore \"kd\"",
    );

    let _first = Proc::spawn(baton(&ep).args(["barrier", "kdb", "--count", "3"]));
    wait_until("the first participant's key", || {
        keys(&etcd, "kdb/waiters/").len() == 1
    });
    let first_key = keys(&etcd, "kdb/waiters/")[0].clone();
    let mut second = Proc::spawn(baton(&ep).args(["barrier", "kdb", "--count", "3"]));
    delete_waiter_key_and_expect_125(
        &etcd,
        "kdb/waiters/",
        &first_key,
        &mut second,
        "at barrier \"kdb\"",
    );
}

/// CMD's exit code passes through, and CMD sees its key; bad input exits 125 with one line
/// before connecting.
#[test]
fn sem_exit_codes_and_bad_input() {
    let etcd = etcd();
    let (out, _) = run(baton(&etcd.endpoint()).args([
        "sem",
        "s",
        "--permits",
        "1",
        "--",
        "sh",
        "-c",
        r#"echo "$BATON_SEM_KEY $BATON_SEM_PERMITS"; exit 7"#,
    ]));
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(stdout(&out).starts_with("s/"), "{out:?}");
    assert!(stdout(&out).trim_end().ends_with(" 1"), "{out:?}");

    // Unreachable etcd: bad input must be reported without waiting for it.
    for args in [
        vec!["sem", "s", "--permits", "0", "--", "true"],
        vec!["sem", "", "--permits", "1", "--", "true"],
        vec!["sem", "s", "--", "true"],
        vec!["sem", "s", "--permits", "1", "--timeout", "soon"],
        vec!["barrier", "b", "--count", "0"],
        vec!["barrier", "", "--count", "2"],
        vec!["queue", "push", "", "x"],
        vec!["queue"],
        vec!["queue", "pop", "q", "--timeout", "0s"],
        vec!["set", "k", "v", "--if-revision", "-1"],
        vec!["get", ""],
    ] {
        let (out, took) = run(baton("http://127.0.0.1:1").args(&args));
        assert_eq!(out.status.code(), Some(125), "{args:?}: {out:?}");
        assert_eq!(stderr_lines(&out).len(), 1, "{args:?}: {out:?}");
        assert!(took < Duration::from_secs(2), "{args:?} took {took:?}");
    }
}

/// Three `baton barrier --count 3` processes: the first two wait until the third arrives,
/// then all pass in the same round and leave nothing behind. Alone, `--timeout` exits 124.
#[test]
fn barrier_releases_all_three_together() {
    let etcd = etcd();
    let spawn = || Proc::spawn(baton(&etcd.endpoint()).args(["barrier", "start", "--count", "3"]));
    let mut first = vec![spawn(), spawn()];
    wait_until("two waiting", || keys(&etcd, "start/waiters/").len() == 2);
    std::thread::sleep(Duration::from_millis(400));
    for p in &mut first {
        assert!(p.wait(Duration::ZERO).is_none(), "passed before the third");
    }
    first.push(spawn());
    let mut rounds = Vec::new();
    for p in &mut first {
        assert!(p.wait(Duration::from_secs(5)).is_some(), "did not pass");
        assert_eq!(p.code(), 0, "{:?}", p.stderr_so_far());
        let line = p.line();
        assert!(line.starts_with("passed start (round "), "{line}");
        rounds.push(line);
    }
    assert!(rounds.iter().all(|r| *r == rounds[0]), "{rounds:?}");
    assert!(
        keys(&etcd, "start/").is_empty(),
        "{:?}",
        keys(&etcd, "start/")
    );

    let (out, took) = run(baton(&etcd.endpoint()).args([
        "barrier",
        "alone",
        "--count",
        "2",
        "--timeout",
        "300ms",
    ]));
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(stderr_lines(&out).len(), 1, "{out:?}");
    assert!(keys(&etcd, "alone/").is_empty());

    // One process is a whole barrier of one.
    let (out, _) = run(baton(&etcd.endpoint()).args(["barrier", "b", "--count", "1"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).starts_with("passed b (round "), "{out:?}");
}

/// `baton barrier` processes given different `--count`s: the odd one out exits 125 at once
/// saying so, and nobody passes with fewer participants than it asked for (3, 3, 2: the two
/// with 3 went through with two; 2 then 3: both waited until --timeout).
#[test]
fn barrier_with_another_count_exits_125() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let spawn = |name: &str, count: &str| {
        Proc::spawn(baton(&ep).args(["barrier", name, "--count", count, "--timeout", "10s"]))
    };
    let mismatch = |out: &std::process::Output, took: Duration| {
        assert_eq!(out.status.code(), Some(125), "{out:?}");
        let err = stderr_lines(out);
        assert_eq!(err.len(), 1, "{err:?}");
        assert!(err[0].contains("different settings"), "{err:?}");
        assert!(err[0].contains("count"), "{err:?}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
    };

    let mut three = vec![spawn("m", "3"), spawn("m", "3")];
    wait_until("two waiting", || keys(&etcd, "m/waiters/").len() == 2);
    let (out, took) = run(baton(&ep).args(["barrier", "m", "--count", "2", "--timeout", "5s"]));
    mismatch(&out, took);
    std::thread::sleep(Duration::from_millis(300));
    for p in &mut three {
        assert!(
            p.wait(Duration::ZERO).is_none(),
            "passed a barrier of 3 with two"
        );
    }
    assert_eq!(keys(&etcd, "m/waiters/").len(), 2);
    three.push(spawn("m", "3"));
    for p in &mut three {
        assert_eq!(p.code(), 0, "{:?}", p.stderr_so_far());
    }

    let mut two = spawn("n", "2");
    wait_until("one waiting", || keys(&etcd, "n/waiters/").len() == 1);
    let (out, took) = run(baton(&ep).args(["barrier", "n", "--count", "3", "--timeout", "5s"]));
    mismatch(&out, took);
    let (out, _) = run(baton(&ep).args(["barrier", "n", "--count", "2"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(two.code(), 0);
    assert!(keys(&etcd, "m/").is_empty() && keys(&etcd, "n/").is_empty());
}

/// `baton queue ARGS` on `ep`, run to its end.
fn queue(ep: &str, args: &[&str]) -> std::process::Output {
    run(baton(ep).arg("queue").args(args)).0
}

/// Each `baton queue pop` claims with a marker under a lease of its handle's
/// (`__NAME/claimed/…`, docs/reliability.md entries 95 and 97): a pop that exits normally
/// revokes it, so N pops (an item each, a wait then an item, a `--timeout` on an empty
/// queue) leave no lease on etcd, nor a marker. Before, each left its lease for 60 s.
#[test]
fn queue_pops_leave_no_lease() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let q = |args: &[&str]| queue(&ep, args);
    const N: usize = 4;
    for i in 0..N {
        assert_eq!(q(&["push", "jobs", &i.to_string()]).status.code(), Some(0));
    }
    for i in 0..N {
        assert_eq!(stdout(&q(&["pop", "jobs"])), format!("{i}\n"));
    }
    let mut waiting = Proc::spawn(baton(&ep).args(["queue", "pop", "jobs"]));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(q(&["push", "jobs", "late"]).status.code(), Some(0));
    assert_eq!(waiting.line(), "late");
    assert_eq!(waiting.code(), 0);
    let out = q(&["pop", "jobs", "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert_eq!(leases(&etcd), 0, "leases left by {} pops", N + 2);
    assert!(keys(&etcd, "__jobs/").is_empty(), "markers left");
}

/// A pop whose `--timeout` passes while its handle's first read and lease grant are in
/// flight (`--timeout 1ms`, as a script that only wants to look does) stops at once; the
/// grant goes on in its task and gives the handle a lease, after `close()` found none to
/// revoke: each such pop left one lease on etcd for 60 s. `close()` now waits for the
/// grant, so none is left.
#[test]
fn queue_pops_timing_out_mid_grant_leave_no_lease() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    for t in ["1ms", "1ms", "2ms", "1ms", "3ms"] {
        let out = run(baton(&ep).args(["queue", "pop", "empty", "--timeout", t])).0;
        assert_eq!(out.status.code(), Some(124), "{out:?}");
    }
    assert_eq!(leases(&etcd), 0, "leases left by pops timing out mid-grant");
}

/// push, len, pop in order, pop --timeout on an empty queue exits 124, and a waiting pop
/// gets the next push.
#[test]
fn queue_round_trip() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let q = |args: &[&str]| queue(&ep, args);
    for v in ["first", "second item", "third"] {
        let out = q(&["push", "jobs", v]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert_eq!(stdout(&out), "");
    }
    assert_eq!(stdout(&q(&["len", "jobs"])), "3\n");
    assert_eq!(stdout(&q(&["pop", "jobs"])), "first\n");
    assert_eq!(
        stdout(&q(&["pop", "jobs", "--timeout", "5s"])),
        "second item\n"
    );
    let out = run(baton(&ep).args(["--json", "queue", "pop", "jobs"])).0;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["value"], "third");
    assert_eq!(stdout(&q(&["len", "jobs"])), "0\n");

    let (out, took) = run(baton(&ep).args(["queue", "pop", "jobs", "--timeout", "300ms"]));
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert_eq!(stdout(&out), "");
    assert_eq!(stderr_lines(&out).len(), 1, "{out:?}");

    let mut waiting = Proc::spawn(baton(&ep).args(["queue", "pop", "jobs"]));
    std::thread::sleep(Duration::from_millis(300));
    assert!(waiting.wait(Duration::ZERO).is_none(), "pop did not wait");
    assert_eq!(q(&["push", "jobs", "late"]).status.code(), Some(0));
    assert_eq!(waiting.line(), "late");
    assert_eq!(waiting.code(), 0);
    assert!(keys(&etcd, "jobs/").is_empty());

    // mem:// would be a fresh store each process, a queue nobody else sees: refused.
    for args in [
        &["queue", "push", "jobs", "x"][..],
        &["queue", "len", "jobs"],
    ] {
        let (out, _) = run(baton("mem://").args(args));
        assert_eq!(out.status.code(), Some(125), "{out:?}");
        assert!(stdout(&out).is_empty(), "{out:?}");
    }
}

/// Run `cmd` with stdout on /dev/full (every write fails with ENOSPC).
fn run_to_full(cmd: &mut std::process::Command) -> std::process::Output {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    cmd.stdout(full)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}

/// A result that cannot be written to stdout is a failure (125 and one line on stderr),
/// never a silent 0; an item popped from a queue is then printed on stderr, so that it is
/// not lost with stdout.
#[test]
fn results_to_a_full_stdout_exit_125() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let failed = |out: &std::process::Output, what: &str| {
        assert_eq!(out.status.code(), Some(125), "{what}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot write"), "{what}: {err}");
    };

    for item in ["precious", "also precious"] {
        let out = run(baton(&ep).args(["queue", "push", "full", item])).0;
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }
    let out = run_to_full(baton(&ep).args(["queue", "pop", "full"]));
    failed(&out, "queue pop");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.ends_with("\nprecious\n"),
        "the popped item is lost: {err:?}"
    );
    let out = run_to_full(baton(&ep).args(["--json", "queue", "pop", "full"]));
    failed(&out, "queue pop --json");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["value"], "also precious", "{err}");

    failed(
        &run_to_full(baton(&ep).args(["queue", "len", "full"])),
        "queue len",
    );
    failed(
        &run_to_full(baton(&ep).args(["--json", "queue", "push", "full", "x"])),
        "queue push --json",
    );
    failed(&run_to_full(baton(&ep).args(["set", "full/k", "v"])), "set");
    failed(&run_to_full(baton(&ep).args(["get", "full/k"])), "get");
    failed(
        &run_to_full(baton(&ep).args(["--json", "get", "full/k"])),
        "get --json",
    );
    failed(&run_to_full(baton(&ep).args(["status"])), "status");
    let leader = Proc::spawn(baton(&ep).args(["elect", "full/e", "v"]));
    assert!(leader.line().starts_with("elected "));
    failed(
        &run_to_full(baton(&ep).args(["leader", "full/e"])),
        "leader",
    );
    failed(
        &run_to_full(baton(&ep).args(["barrier", "b", "--count", "1"])),
        "barrier",
    );
}

/// The human result lines of `set` and `sem` escape control characters in names, as
/// `watch`, `observe` and `status` do: a key with a newline stays one line.
#[test]
fn result_lines_escape_control_characters_in_names() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let (out, _) = run(baton(&ep).args(["set", "esc/nl\nkey\x1b[31m", "v"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    assert!(
        stdout.starts_with("set esc/nl\\nkey\\x1b[31m (version 1, "),
        "{stdout:?}"
    );
    let sem = Proc::spawn(baton(&ep).args(["sem", "esc/s\nem", "--permits", "2"]));
    let acquired = sem.line();
    assert!(acquired.starts_with("acquired esc/s\\nem/"), "{acquired:?}");
    assert!(acquired.ends_with(" permits=2"), "one line: {acquired:?}");
    sem.signal(libc::SIGTERM);
    let released = sem.line();
    assert!(released.starts_with("released esc/s\\nem/"), "{released:?}");
    let mut sem = sem;
    assert_eq!(sem.code(), 0);
}

/// set, get, --if-revision: a matching revision writes, a stale one exits 1 with one line
/// and writes nothing (also after a delete and re-create, which restarts the version); a
/// missing key exits 1.
#[test]
fn set_get_and_if_revision() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let (out, _) = run(baton(&ep).args(["get", "cfg/x"]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr_lines(&out)[0].contains("does not exist"), "{out:?}");

    let (out, _) = run(baton(&ep).args(["set", "--if-revision", "0", "cfg/x", "one"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout(&out).starts_with("set cfg/x (version 1, "),
        "{out:?}"
    );
    let (out, _) = run(baton(&ep).args(["--json", "get", "cfg/x"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["value"], "one");
    let one = v["revision"].as_i64().unwrap().to_string();

    let (out, _) = run(baton(&ep).args(["set", "cfg/x", "two", "--if-revision", &one]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (out, _) = run(baton(&ep).args(["set", "cfg/x", "three", "--if-revision", &one]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr_lines(&out);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("its last write is revision"), "{err:?}");
    // `--if-revision 0` asks that the key does not exist: the refusal says it does.
    let (out, _) = run(baton(&ep).args(["set", "--if-revision", "0", "cfg/x", "three"]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr_lines(&out)[0].contains("not set: it exists"),
        "{out:?}"
    );

    let (out, _) = run(baton(&ep).args(["--json", "get", "cfg/x"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["value"], "two");
    assert_eq!(v["version"], 2);
    // etcdctl sees the same key.
    let out = etcd.etcdctl(["get", "--print-value-only", "cfg/x"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "two");

    // A plain set overwrites whatever is there.
    let (out, _) = run(baton(&ep).args(["set", "cfg/x", "four"]));
    assert!(
        stdout(&out).starts_with("set cfg/x (version 3, "),
        "{out:?}"
    );
    let (out, _) = run(baton(&ep).args(["--json", "get", "cfg/x"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let four = v["revision"].as_i64().unwrap().to_string();
    // Someone deletes it and writes it again: version 1 again, a new revision.
    let out = etcd.etcdctl(["del", "cfg/x"]);
    assert!(out.status.success(), "{out:?}");
    let (out, _) = run(baton(&ep).args(["set", "cfg/x", "theirs"]));
    assert!(
        stdout(&out).starts_with("set cfg/x (version 1, "),
        "{out:?}"
    );
    let (out, _) = run(baton(&ep).args(["set", "cfg/x", "mine", "--if-revision", &four]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let (out, _) = run(baton(&ep).args(["get", "cfg/x"]));
    assert_eq!(stdout(&out), "theirs\n");
}

/// `baton watch --prefix` prints a put and a delete as lines; `--json` gives JSON lines.
#[test]
fn watch_prints_changes() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let human = Proc::spawn(baton(&ep).args(["watch", "--prefix", "w/"]));
    let json = Proc::spawn(baton(&ep).args(["--json", "watch", "w/a"]));
    // The watchers start at some point: write until each has printed a change.
    let mut i = 0;
    let (mut first_human, mut first_json) = (None, None);
    while first_human.is_none() || first_json.is_none() {
        assert!(i < 100, "no change printed");
        let (out, _) = run(baton(&ep).args(["set", "w/a", &format!("v{i}")]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        i += 1;
        if first_human.is_none() {
            first_human = human.line_within(Duration::from_millis(100));
        }
        if first_json.is_none() {
            first_json = json.line_within(Duration::from_millis(100));
        }
    }
    let line = first_human.unwrap();
    assert!(line.starts_with("put w/a = v"), "{line}");
    assert!(line.contains("(version "), "{line}");
    let v: serde_json::Value = serde_json::from_str(&first_json.unwrap()).unwrap();
    assert_eq!(v["event"], "put");
    assert_eq!(v["key"], "w/a");

    // Drain what the loop wrote, then a fresh change in order.
    while human.line_within(Duration::from_millis(200)).is_some() {}
    while json.line_within(Duration::from_millis(200)).is_some() {}
    run(baton(&ep).args(["set", "w/b", "hello world"]));
    assert!(human
        .line()
        .starts_with("put w/b = hello world (version 1, revision "));
    let out = etcd.etcdctl(["del", "w/a"]);
    assert!(out.status.success(), "{out:?}");
    assert!(human.line().starts_with("delete w/a (revision "));
    let v: serde_json::Value = serde_json::from_str(&json.line()).unwrap();
    assert_eq!(v["event"], "delete");

    // SIGTERM ends it with 0.
    let mut human = human;
    human.signal(libc::SIGTERM);
    assert_eq!(human.code(), 0);
}

/// `baton watch --prefix` starts from a read of the revision alone: it does not download
/// the values under the prefix (16 MiB here; a queue of big items may hold a gigabyte,
/// which made it time out and exit 125 without ever watching).
#[test]
fn watch_prefix_does_not_download_the_values_under_it() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = baton::Client::connect(&ep).await.unwrap();
        let value = vec![b'x'; 1 << 20];
        for i in 0..16 {
            client
                .store()
                .put(format!("wbig/blob-{i}").as_bytes(), &value, 0)
                .await
                .unwrap();
        }
    });
    let sent = || {
        etcd.metric("etcd_network_client_grpc_sent_bytes_total")
            .expect("etcd_network_client_grpc_sent_bytes_total")
    };
    let before = sent();
    let watch = Proc::spawn(baton(&ep).args(["watch", "--prefix", "wbig/"]));
    // Write until the watcher prints a change: it is watching then.
    let mut line = None;
    for i in 0..100 {
        let (out, _) = run(baton(&ep).args(["set", "wbig/new", &format!("v{i}")]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        line = watch.line_within(Duration::from_millis(200));
        if line.is_some() {
            break;
        }
    }
    let line = line.expect("watch printed no change");
    assert!(line.starts_with("put wbig/new = v"), "{line}");
    let sent = sent() - before;
    assert!(
        sent < 1024.0 * 1024.0,
        "starting `baton watch --prefix wbig/` downloaded the values under it: etcd sent \
         {sent} bytes"
    );
}

/// A watch cut off past a compaction reads the keys again, and prints each key that changed
/// meanwhile with its value as it is now (read one by one: the listing has keys only).
#[test]
fn watch_after_a_compaction_prints_what_changed_with_its_value() {
    let mut etcd = etcd();
    let ep = etcd.endpoint();
    let watch = Proc::spawn(baton(&ep).args(["watch", "--prefix", "wc/"]));
    until_watch_prints(&watch, |i| {
        let (out, _) = run(baton(&ep).args(["set", "wc/a", &format!("v{i}")]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    });
    while watch.line_within(Duration::from_millis(200)).is_some() {}
    // Cut it off (paused, its connection broken by a restart), change two keys, compact.
    watch.signal(libc::SIGSTOP);
    etcd.kill();
    etcd.restart();
    run(baton(&ep).args(["set", "wc/a", "changed meanwhile"]));
    let (out, _) = run(baton(&ep).args(["set", "wc/c", "new meanwhile"]));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let revision = stdout
        .rsplit("revision ")
        .next()
        .and_then(|r| r.trim().trim_end_matches(')').parse::<i64>().ok())
        .unwrap_or_else(|| panic!("no revision in {stdout:?}"));
    let out = etcd.etcdctl(["compact", &revision.to_string()]);
    assert!(out.status.success(), "{out:?}");
    watch.signal(libc::SIGCONT);
    let a = watch
        .line_within(Duration::from_secs(20))
        .expect("nothing printed");
    assert!(a.starts_with("put wc/a = changed meanwhile ("), "{a}");
    let c = watch
        .line_within(Duration::from_secs(5))
        .expect("wc/c not printed");
    assert!(
        c.starts_with("put wc/c = new meanwhile (version 1, "),
        "{c}"
    );
    // And it follows on.
    run(baton(&ep).args(["set", "wc/a", "after"]));
    let after = watch
        .line_within(Duration::from_secs(5))
        .expect("no change after");
    assert!(after.starts_with("put wc/a = after ("), "{after}");
}

/// While etcd is down, `baton watch` and `baton observe` say so on stderr (once), and again
/// when they work again; then they go on: a change made after the restart is printed.
#[test]
fn watch_and_observe_say_when_the_backend_is_down_and_back() {
    let mut etcd = etcd();
    let ep = etcd.endpoint();
    let watch = Proc::spawn(baton(&ep).args(["watch", "down/a"]));
    let observe = Proc::spawn(baton(&ep).args(["observe", "down-e"]));
    // Both follow once a change reaches them.
    until_watch_prints(&watch, |i| {
        let (out, _) = run(baton(&ep).args(["set", "down/a", &format!("v{i}")]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    });
    let one = Proc::spawn(baton(&ep).args(["elect", "down-e", "leader-one"]));
    let elected = one.line();
    assert!(elected.starts_with("elected down-e/"), "{elected}");
    let key_one = elected.split_whitespace().nth(1).unwrap().to_string();
    assert!(observe.line().starts_with("leader-one (key down-e/"));
    assert!(watch.stderr_so_far().is_empty() && observe.stderr_so_far().is_empty());
    // Observe watches the leader's key once it has printed it: a watch being created when
    // etcd goes is retried for up to the request timeout (10 s) before anything is said.
    std::thread::sleep(Duration::from_millis(500));

    etcd.kill();
    let (mut watch_err, mut observe_err) = (Vec::new(), Vec::new());
    let failing = |lines: &[String], what: &str| {
        lines.iter().any(|l| {
            l.starts_with(&format!("{what}: ")) && l.ends_with("retrying (changes may come late)")
        })
    };
    // At once: the broken stream says so, not only a watch made again that fails (which
    // can take seconds: an outage shorter than that went unsaid).
    let killed = std::time::Instant::now();
    while !(failing(&watch_err, "watch") && failing(&observe_err, "observe"))
        && killed.elapsed() < Duration::from_secs(6)
    {
        watch_err.extend(watch.stderr_so_far());
        observe_err.extend(observe.stderr_so_far());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        failing(&watch_err, "watch") && failing(&observe_err, "observe"),
        "6 s after etcd went down: watch said {watch_err:?}, observe {observe_err:?}"
    );
    // Once each, not once per retry.
    std::thread::sleep(Duration::from_secs(2));
    watch_err.extend(watch.stderr_so_far());
    observe_err.extend(observe.stderr_so_far());
    assert_eq!(watch_err.len(), 1, "{watch_err:?}");
    assert_eq!(observe_err.len(), 1, "{observe_err:?}");

    etcd.restart();
    wait_until("both say they work again", || {
        watch_err.extend(watch.stderr_so_far());
        observe_err.extend(observe.stderr_so_far());
        watch_err
            .iter()
            .any(|l| l.starts_with("watch: working again after "))
            && observe_err
                .iter()
                .any(|l| l.starts_with("observe: working again after "))
    });
    while watch.line_within(Duration::from_millis(200)).is_some() {}
    let (out, _) = run(baton(&ep).args(["set", "down/a", "after"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(watch.line().starts_with("put down/a = after "));
    // The first leader may have lost its session while etcd was down (and revoked its lease
    // on the way out), or still lead: either way, its lease goes now.
    let lease = key_one.rsplit('/').next().unwrap();
    let _ = etcd.etcdctl(["lease", "revoke", lease]);
    let _two = Proc::spawn(baton(&ep).args(["elect", "down-e", "leader-two"]));
    assert!(observe.line().starts_with("leader-two (key down-e/"));
    assert_eq!(watch_err.len(), 2, "{watch_err:?}");
    assert_eq!(observe_err.len(), 2, "{observe_err:?}");
}

/// With `--json`, a value (or a watched key) that is not UTF-8 is given as `value_base64`
/// (`key_base64`) instead of a lossy string: a popped item has left the queue, so its bytes
/// must come out intact.
#[test]
fn json_keeps_bytes_that_are_not_utf8() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let etcd = etcd();
    let ep = etcd.endpoint();
    let bytes = OsStr::from_bytes(b"a\xff\xfeb");
    let put = |key: &OsStr| {
        let out = etcd.etcdctl([OsStr::new("put"), key, bytes]);
        assert!(out.status.success(), "{out:?}");
    };
    let json_of = |out: &std::process::Output| -> serde_json::Value {
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    put(OsStr::new("bin/1700000000000000000"));
    let v = json_of(&run(baton(&ep).args(["--json", "get", "bin/1700000000000000000"])).0);
    assert_eq!(v["value_base64"], "Yf/+Yg==", "{v}");
    assert!(v.get("value").is_none(), "{v}");
    let v = json_of(&run(baton(&ep).args(["--json", "queue", "pop", "bin"])).0);
    assert_eq!(v["value_base64"], "Yf/+Yg==", "{v}");
    assert!(v.get("value").is_none(), "{v}");
    assert!(keys(&etcd, "bin/").is_empty());
    // Text stays text.
    run(baton(&ep).args(["queue", "push", "bin", "plain"]));
    let v = json_of(&run(baton(&ep).args(["--json", "queue", "pop", "bin"])).0);
    assert_eq!(v["value"], "plain", "{v}");
    assert!(v.get("value_base64").is_none(), "{v}");

    let watch = Proc::spawn(baton(&ep).args(["--json", "watch", "--prefix", "wb/"]));
    let line = loop {
        put(OsStr::from_bytes(b"wb/\xff"));
        if let Some(line) = watch.line_within(Duration::from_millis(200)) {
            break line;
        }
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["key_base64"], "d2Iv/w==", "{v}");
    assert_eq!(v["value_base64"], "Yf/+Yg==", "{v}");
    assert!(v.get("key").is_none() && v.get("value").is_none(), "{v}");
    let out = etcd.etcdctl([OsStr::new("del"), OsStr::from_bytes(b"wb/\xff")]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = loop {
        let v: serde_json::Value = serde_json::from_str(&watch.line()).unwrap();
        if v["event"] == "delete" {
            break v;
        }
    };
    assert_eq!(v["key_base64"], "d2Iv/w==", "{v}");

    // An election's value too (`leader`, and `observe`, which shares the format).
    let granted = etcd.etcdctl(["lease", "grant", "60"]);
    let granted = String::from_utf8_lossy(&granted.stdout).to_string();
    let lease = granted.split_whitespace().nth(1).unwrap().to_string();
    let key = format!("el/{lease}");
    let out = etcd.etcdctl([
        OsStr::new("put"),
        OsStr::new(&format!("--lease={lease}")),
        OsStr::new(&key),
        bytes,
    ]);
    assert!(out.status.success(), "{out:?}");
    let v = json_of(&run(baton(&ep).args(["--json", "leader", "el"])).0);
    assert_eq!(v["value_base64"], "Yf/+Yg==", "{v}");
    assert!(v.get("value").is_none(), "{v}");
}

/// With etcd gone during the wait (SIGSTOPped), `barrier --timeout` and `queue pop
/// --timeout` still end about on time with 124, and say on stderr that the backend did not
/// answer: the barrier gives removing its key 1 s (as `lock`, `sem` and `elect` do), not
/// the 5 s of a release, and then says the key expires by itself; the pop says the backend
/// did not answer, not merely that nothing came.
#[test]
fn barrier_and_pop_timeouts_with_etcd_gone_are_on_time_and_say_so() {
    let mut etcd = etcd();
    let ep = etcd.endpoint();
    // etcd's count of open watches (a gauge).
    let watchers = |etcd: &EtcdServer| etcd.metric("etcd_debugging_mvcc_watcher_total").unwrap();
    let idle = watchers(&etcd);

    let started = std::time::Instant::now();
    let mut barrier =
        Proc::spawn(baton(&ep).args(["barrier", "gone-b", "--count", "2", "--timeout", "3s"]));
    wait_until("the participant's key", || {
        keys(&etcd, "gone-b/waiters/").len() == 1
    });
    etcd.stop();
    let code = barrier.code();
    let took = started.elapsed();
    let err = barrier.stderr_after_exit();
    etcd.cont();
    assert_eq!(code, 124, "{err:?}");
    assert!(
        took < Duration::from_millis(4800),
        "barrier took {took:?}: {err:?}"
    );
    assert!(err[0].contains("timed out after 3s"), "{err:?}");
    assert!(
        err.iter()
            .any(|l| l.starts_with("the backend did not confirm within 1s")),
        "{err:?}"
    );

    // A pop that is waiting (its watch is open) when etcd stops. The barrier's watches
    // end when etcd, resumed, sees its connection closed: wait for that first, or they
    // would hide the pop's (a CI failure).
    wait_until("the barrier's watches to end", || watchers(&etcd) <= idle);
    let before = watchers(&etcd);
    let started = std::time::Instant::now();
    let mut pop = Proc::spawn(baton(&ep).args(["queue", "pop", "--timeout", "3s", "gone-q"]));
    wait_until("the pop's watch", || watchers(&etcd) > before);
    etcd.stop();
    let code = pop.code();
    let took = started.elapsed();
    let err = pop.stderr_after_exit();
    etcd.cont();
    assert_eq!(code, 124, "{err:?}");
    assert!(
        took < Duration::from_millis(4800),
        "pop took {took:?}: {err:?}"
    );
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("nothing to pop within 3s"), "{err:?}");
    assert!(err[0].contains("the backend did not answer"), "{err:?}");

    // With etcd up, the same timeouts say nothing of the backend.
    let (out, _) = run(baton(&ep).args(["queue", "pop", "--timeout", "300ms", "gone-q"]));
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    let err = stderr_lines(&out);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(!err[0].contains("backend"), "{err:?}");
}

/// Spawn `cmd` with stdout piped; return it once its first stdout line has come (calling
/// `nudge` until it does), with that line; the read end of the pipe is closed by then.
fn first_line_then_close(
    cmd: &mut std::process::Command,
    mut nudge: impl FnMut(),
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads one line, then drops the read end: `| head -1`.
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let started = std::time::Instant::now();
    let line = loop {
        assert!(started.elapsed() < STEP, "no first line");
        nudge();
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            break line;
        }
    };
    (child, line)
}

/// Wait at most `limit` for `child` to exit; its exit code.
fn exit_within(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// `baton watch KEY | head -1` and `baton observe NAME | head -1` end (exit 0) once the
/// reader has gone, without waiting for a further change to make a write fail: a script
/// that waits for one change is not held up until a second. Stdout on a file does not end
/// them.
#[test]
fn watch_and_observe_end_when_the_reader_goes() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let mut i = 0;
    let (mut watch, line) = first_line_then_close(baton(&ep).args(["watch", "rg/a"]), || {
        i += 1;
        let (out, _) = run(baton(&ep).args(["set", "rg/a", &format!("v{i}")]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    });
    assert!(line.starts_with("put rg/a = v"), "{line}");
    // Nothing changes from here: only the reader's going can end it.
    assert_eq!(
        exit_within(&mut watch, Duration::from_secs(2)),
        Some(0),
        "watch did not end within 2 s of its reader going"
    );

    let leader = Proc::spawn(baton(&ep).args(["elect", "rg-e", "one"]));
    assert!(leader.line().starts_with("elected rg-e/"));
    let (mut observe, line) = first_line_then_close(baton(&ep).args(["observe", "rg-e"]), || {});
    assert!(line.starts_with("one (key rg-e/"), "{line}");
    assert_eq!(
        exit_within(&mut observe, Duration::from_secs(2)),
        Some(0),
        "observe did not end within 2 s of its reader going"
    );

    // On a file, nothing ends it: the next change is written there.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out");
    let file = std::fs::File::create(&path).unwrap();
    let mut to_file = baton(&ep)
        .args(["watch", "rg/f"])
        .stdout(file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut i = 0;
    wait_until("a change in the file", || {
        i += 1;
        run(baton(&ep).args(["set", "rg/f", &format!("v{i}")]));
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .contains("put rg/f")
    });
    assert_eq!(
        exit_within(&mut to_file, Duration::from_secs(1)),
        None,
        "watch to a file ended"
    );
}

/// Values too long for the command line (Linux takes at most 128 KiB per argument, though
/// the limit of a value is 1 MiB) come with `--value-file FILE` (`-`: stdin) to `set` and
/// `queue push`, byte for byte (also bytes that are not UTF-8); one over 1 MiB is refused
/// with 125 before anything is written, and VALUE and --value-file together are refused.
#[test]
fn values_from_a_file_or_stdin() {
    use std::io::Write;
    let etcd = etcd();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    // 512 KiB, with bytes that are not UTF-8 and newlines.
    let big: Vec<u8> = (0..512 * 1024).map(|i| (i % 251) as u8).collect();
    let path = dir.path().join("big");
    std::fs::write(&path, &big).unwrap();
    let (out, _) = run(baton(&ep)
        .args(["set", "vf/big", "--value-file"])
        .arg(&path));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (out, _) = run(baton(&ep).args(["get", "vf/big"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout.len(), big.len() + 1);
    assert!(
        out.stdout[..big.len()] == big[..],
        "the value read back differs"
    );

    // From stdin, to a queue; --if-revision 0 with a file too.
    let mut push = baton(&ep)
        .args(["queue", "push", "vf-q", "--value-file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    push.stdin.take().unwrap().write_all(&big).unwrap();
    let out = push.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (out, _) = run(baton(&ep).args(["queue", "pop", "vf-q"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        out.stdout[..out.stdout.len() - 1] == big[..],
        "the item differs"
    );
    let (out, _) = run(baton(&ep)
        .args(["set", "--if-revision", "0", "vf/new", "--value-file"])
        .arg(&path));
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // Exactly 1 MiB is a value; one byte more is refused, and nothing is written.
    let limit = 1024 * 1024;
    let at_limit = dir.path().join("at-limit");
    std::fs::write(&at_limit, vec![b'x'; limit]).unwrap();
    let (out, _) = run(baton(&ep)
        .args(["set", "vf/limit", "--value-file"])
        .arg(&at_limit));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let over = dir.path().join("over");
    std::fs::write(&over, vec![b'x'; limit + 1]).unwrap();
    for args in [&["set", "vf/over"][..], &["queue", "push", "vf-over"]] {
        let (out, took) = run(baton(&ep).args(args).arg("--value-file").arg(&over));
        assert_eq!(out.status.code(), Some(125), "{args:?}: {out:?}");
        let err = stderr_lines(&out);
        assert_eq!(err.len(), 1, "{args:?}: {err:?}");
        assert!(err[0].contains("the limit is 1048576"), "{args:?}: {err:?}");
        assert!(took < Duration::from_secs(2), "{args:?} took {took:?}");
    }
    assert!(keys(&etcd, "vf/over").is_empty() && keys(&etcd, "vf-over/").is_empty());

    // A missing file, and a value given twice.
    let (out, _) = run(baton(&ep).args(["set", "vf/x", "--value-file", "/nonexistent/v"]));
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert_eq!(stderr_lines(&out).len(), 1, "{out:?}");
    assert!(stderr_lines(&out)[0].contains("/nonexistent/v"), "{out:?}");
    for args in [
        &["set", "vf/x", "v", "--value-file"][..],
        &["queue", "push", "vf-x", "v", "--value-file"],
    ] {
        let (out, _) = run(baton(&ep).args(args).arg(&path));
        assert_eq!(out.status.code(), Some(125), "{args:?}: {out:?}");
        assert_eq!(stderr_lines(&out).len(), 1, "{args:?}: {out:?}");
        assert!(stderr_lines(&out)[0].contains("--value-file"), "{out:?}");
    }
    // Neither: VALUE is still asked for.
    let (out, _) = run(baton(&ep).args(["set", "vf/x"]));
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(keys(&etcd, "vf/x").is_empty() && keys(&etcd, "vf-x/").is_empty());
}

/// Human lines of `watch`, `observe` and `status` are one line per change (per entry),
/// whatever the keys and values hold: control characters are shown escaped (`\n`, `\r`,
/// `\t`, `\x1b`, `\x7f`, `\u{85}`), so a value or key cannot add a line, or fake one
/// (`ml/b\ndelete ml/c`). --json is unchanged.
#[test]
fn human_lines_escape_control_characters() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let watch = Proc::spawn(baton(&ep).args(["watch", "--prefix", "ml/"]));
    let json = Proc::spawn(baton(&ep).args(["--json", "watch", "--prefix", "ml/"]));
    // The watchers start at some point: write until each has printed a change.
    let mut i = 0;
    let (mut human_up, mut json_up) = (false, false);
    while !human_up || !json_up {
        assert!(i < 100, "no change printed");
        run(baton(&ep).args(["set", "ml/start", &i.to_string()]));
        i += 1;
        human_up |= watch.line_within(Duration::from_millis(100)).is_some();
        json_up |= json.line_within(Duration::from_millis(100)).is_some();
    }
    while watch.line_within(Duration::from_millis(200)).is_some() {}
    while json.line_within(Duration::from_millis(200)).is_some() {}

    let value = "line1\nline2\r\tx\u{1b}[31m\u{7f}\u{85}end";
    let (out, _) = run(baton(&ep).args(["set", "ml/a", value]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (out, _) = run(baton(&ep).args(["set", "ml/b\ndelete ml/c", "v"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (out, _) = run(baton(&ep).args(["set", "ml/z", "last"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines: Vec<String> = (0..3).map(|_| watch.line()).collect();
    assert!(
        lines[0].starts_with(
            r"put ml/a = line1\nline2\r\tx\x1b[31m\x7f\u{85}end (version 1, revision "
        ),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with(r"put ml/b\ndelete ml/c = v (version 1, revision "),
        "{lines:?}"
    );
    assert!(lines[2].starts_with("put ml/z = last "), "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(&json.line()).unwrap();
    assert_eq!(v["value"], value);
    let v: serde_json::Value = serde_json::from_str(&json.line()).unwrap();
    assert_eq!(v["key"], "ml/b\ndelete ml/c");

    // observe: the leader's value.
    let _leader = Proc::spawn(baton(&ep).args(["elect", "ml-e", "a\nb"]));
    let observe = Proc::spawn(baton(&ep).args(["observe", "ml-e"]));
    let line = observe.line();
    assert!(line.starts_with(r"a\nb (key ml-e/"), "{line}");

    // status: names and keys.
    let holder = Proc::spawn(baton(&ep).args(["lock", "st\rx\ny"]));
    assert!(holder.line().starts_with("acquired "));
    let (out, _) = run(baton(&ep).args(["status", "st"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 2, "{text:?}");
    assert!(
        text.lines()
            .nth(1)
            .unwrap()
            .starts_with(r"st\rx\ny  lock  st\rx\ny/"),
        "{text:?}"
    );
}

/// A watch or observe whose stdout has no reader from the start still reports that it
/// cannot connect (exit 125, the error on stderr): the reader is looked for only once
/// connected. (Before: exit 0 and nothing said.)
#[test]
fn watch_and_observe_without_a_reader_still_report_a_failed_connect() {
    for cmd in [["watch", "k"], ["observe", "e"]] {
        let mut child = baton("http://127.0.0.1:1")
            .args(["--dial-timeout", "1s"])
            .args(cmd)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // `| true`
        let code = exit_within(&mut child, Duration::from_secs(10));
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(code, Some(125), "{cmd:?}: {err}");
        assert!(!err.trim().is_empty(), "{cmd:?}: nothing said");
    }
}

/// `queue push --value-file -` waiting on a stdin that stays open ends on SIGINT, SIGTERM
/// or SIGHUP, pushing nothing (before: the read went on until stdin ended, the signal
/// caught and held meanwhile). The child starts with the default disposition of each, as
/// from a terminal: a harness run with `nohup` or in the background ignores some of them,
/// and a child inherits that.
#[test]
fn queue_push_from_an_open_stdin_obeys_signals() {
    use std::os::unix::process::CommandExt;
    let etcd = etcd();
    let ep = etcd.endpoint();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let mut cmd = baton(&ep);
        // SAFETY: only async-signal-safe calls (signal(2)) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    libc::signal(s, libc::SIG_DFL);
                }
                Ok(())
            });
        }
        let mut child = cmd
            .args(["queue", "push", "vf-q", "--value-file", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let _stdin = child.stdin.take(); // kept open
        std::thread::sleep(Duration::from_millis(500));
        signal(child.id(), sig);
        let started = std::time::Instant::now();
        let ended = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() > Duration::from_secs(3) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(ended.is_some(), "signal {sig}: still running 3 s after it");
        assert!(!ended.unwrap().success(), "signal {sig}: exit 0");
    }
    let (out, _) = run(baton(&ep).args(["queue", "len", "vf-q"]));
    assert_eq!(stdout(&out).trim(), "0", "{out:?}");
}

/// A pop with a very short `--timeout` on a healthy etcd does not say the backend did not
/// answer: a wait of a few milliseconds tells nothing of the backend. (Before: 6 of 10.)
#[test]
fn a_short_pop_timeout_does_not_blame_the_backend() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    for timeout in ["1ms", "2ms", "5ms", "1ms", "2ms", "5ms", "1ms", "2ms"] {
        let (out, _) = run(baton(&ep).args(["queue", "pop", "--timeout", timeout, "hq"]));
        assert_eq!(out.status.code(), Some(124), "{out:?}");
        let err = stderr_lines(&out).join("\n");
        assert!(
            !err.contains("did not answer"),
            "--timeout {timeout}: {err}"
        );
    }
}

/// `baton barrier --timeout` is counted once connected, as its help says: a barrier of one
/// whose connect takes 3 s (etcd paused, within `--dial-timeout 10s`) passes as soon as it
/// is connected, exit 0. It counted the connect too, and exited 124 having never entered
/// (found by review; `baton lock --timeout` counted from the connect already).
#[test]
fn barrier_timeout_is_counted_once_connected() {
    let etcd = etcd();
    let pid = i32::try_from(etcd.pid().unwrap()).unwrap();
    // SAFETY: signals to the etcd process this test started (and still owns).
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let resume = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    let (out, took) = run(baton(&etcd.endpoint()).args([
        "--dial-timeout",
        "10s",
        "barrier",
        "solo",
        "--count",
        "1",
        "--timeout",
        "2s",
    ]));
    resume.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "took {took:?}: {out:?}");
}

/// SIGUSR1 still ends the commands that run no CMD (its default action): a waiting `queue
/// pop`, `watch` or `barrier`. Only `lock`, `elect` and `sem` catch it, to forward it to
/// CMD (a first version caught it everywhere and never read it: `timeout -s USR1 … baton
/// queue pop` waited for ever; found by a second look).
#[test]
fn sigusr1_still_ends_commands_that_forward_nothing() {
    use std::os::unix::process::CommandExt;
    let etcd = etcd();
    let ep = etcd.endpoint();
    let commands: [&[&str]; 3] = [
        &["queue", "pop", "usr1-q"],
        &["watch", "usr1-k"],
        &["barrier", "usr1-b", "--count", "2"],
    ];
    let mut still = Vec::new();
    for args in commands {
        let mut cmd = baton(&ep);
        // SAFETY: only async-signal-safe calls (signal(2)) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGUSR1, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut child = cmd
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(700));
        assert!(
            child.try_wait().unwrap().is_none(),
            "{args:?} ended by itself"
        );
        signal(child.id(), libc::SIGUSR1);
        let started = std::time::Instant::now();
        let mut ended = false;
        while started.elapsed() < Duration::from_secs(3) {
            if child.try_wait().unwrap().is_some() {
                ended = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !ended {
            still.push(args.join(" "));
            let _ = child.kill();
        }
        let _ = child.wait();
    }
    assert!(
        still.is_empty(),
        "still running 3 s after SIGUSR1: {still:?}"
    );
}

/// `baton barrier`'s result line escapes control characters in the name, as `set`, `sem`,
/// `watch`, `observe` and `status` do: a name with a newline stays one line (found by
/// review, kvcli: `passed NAME` printed it raw, two lines, the second one forged by NAME).
#[test]
fn barrier_result_line_escapes_control_characters() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let (out, _) = run(baton(&ep).args(["barrier", "esc/b\nfake line\x1b[31m", "--count", "1"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    assert!(
        stdout.starts_with("passed esc/b\\nfake line\\x1b[31m (round "),
        "{stdout:?}"
    );
}

/// A watch cut off past a compaction reads the keys that changed meanwhile one by one, at
/// the revision of its listing. If etcd compacts past that revision while it reads (a busy
/// cluster with auto-compaction, and many keys changed), it should list them again, as
/// `status` does, not end: `baton watch` exited 125 ("compacted") instead, ending a
/// follower that its help says retries everything but a refusal (found by review, kvcli).
#[test]
fn watch_recovering_from_a_compaction_survives_another_compaction() {
    let mut etcd = etcd();
    let ep = etcd.endpoint();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(baton::Client::connect(&ep)).unwrap();
    let store = client.store().clone();
    let watch = Proc::spawn(baton(&ep).args(["watch", "--prefix", "wcc/"]));
    until_watch_prints(&watch, |i| {
        rt.block_on(store.put(b"wcc/first", format!("v{i}").as_bytes(), 0))
            .unwrap();
    });
    while watch.line_within(Duration::from_millis(200)).is_some() {}
    // Cut it off, change 3,000 keys, compact.
    watch.signal(libc::SIGSTOP);
    etcd.kill();
    etcd.restart();
    let client = rt.block_on(baton::Client::connect(&ep)).unwrap();
    let store = client.store().clone();
    for batch in 0..30 {
        let puts = (0..100).map(|k| {
            baton::store::TxnOp::put(
                format!("wcc/k{batch:02}-{k:03}").as_bytes(),
                b"x".to_vec(),
                0,
            )
        });
        rt.block_on(store.txn(baton::store::Txn::new().and_then(puts)))
            .unwrap();
    }
    let rev = rt.block_on(store.put(b"other/x", b"1", 0)).unwrap();
    rt.block_on(store.compact(rev)).unwrap();
    // While it reads them again: writes elsewhere, and a compaction every 50 ms.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compactor = {
        let (stop, store) = (stop.clone(), store.clone());
        let handle = rt.handle().clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                handle.block_on(async {
                    if let Ok(rev) = store.put(b"other/x", b"1", 0).await {
                        let _ = store.compact(rev).await;
                    }
                });
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    watch.signal(libc::SIGCONT);
    let mut watch = watch;
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    compactor.join().unwrap();
    let mut lines = 0;
    while watch.line_within(Duration::from_secs(5)).is_some() {
        lines += 1;
        if lines >= 3000 {
            break;
        }
    }
    let exited = watch.wait(Duration::from_millis(500));
    assert!(
        exited.is_none(),
        "watch ended ({exited:?}) after {lines} of 3000 lines; stderr: {:?}",
        watch.stderr_so_far()
    );
    assert_eq!(lines, 3000, "stderr: {:?}", watch.stderr_so_far());
    // Each once: nothing more comes.
    assert_eq!(watch.line_within(Duration::from_secs(1)), None);
}

/// On a healthy 3-member cluster, the member serving `baton watch`'s stream is killed (a
/// rolling restart, say). The watch is made again on another member at once and misses
/// nothing: the backend was never unavailable, and `watch` says nothing (as `observe`). A
/// break is said only if the watch is not made again within a second.
#[test]
fn watch_says_nothing_when_a_cluster_member_fails_over() {
    let mut cluster = baton_testkit::EtcdCluster::start(3);
    let ep = cluster.endpoints_url();
    let watch = Proc::spawn(baton(&ep).args(["watch", "fo/a"]));
    until_watch_prints(&watch, |i| {
        let (out, _) = run(baton(&ep).args(["set", "fo/a", &format!("v{i}")]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    });
    // Kill each member in turn (one of them serves the watch), with a change meanwhile.
    for m in 0..3 {
        cluster.kill(m);
        std::thread::sleep(Duration::from_millis(500));
        let (out, _) = run(baton(&ep).args(["set", "fo/a", &format!("after-kill-{m}")]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let line = watch
            .line_within(Duration::from_secs(5))
            .expect("the change made with a member down was not printed");
        assert!(
            line.starts_with(&format!("put fo/a = after-kill-{m} (")),
            "{line}"
        );
        cluster.restart(m);
    }
    let said = watch.stderr_so_far();
    assert!(
        said.is_empty(),
        "watch said the backend was unavailable while the cluster served it: {said:?}"
    );
}

/// Make a change (`change(i)`, i = 0, 1, ...) until `watch` prints one: it has started
/// watching. At most 100 changes.
fn until_watch_prints(watch: &Proc, mut change: impl FnMut(usize)) {
    for i in 0..100 {
        change(i);
        if watch.line_within(Duration::from_millis(100)).is_some() {
            return;
        }
    }
    panic!("watch printed no change");
}

/// `--timeout` passing in the leave stage (the other participant, here a key put with
/// etcdctl as a participant's, entered and never leaves): exit 124, saying it waited for
/// the others to leave, and our own key gone.
#[test]
fn barrier_timeout_while_leaving_exits_124() {
    let etcd = etcd();
    let granted = etcd.etcdctl(["lease", "grant", "60"]);
    let text = String::from_utf8_lossy(&granted.stdout).into_owned();
    let lease = text.split_whitespace().nth(1).unwrap().to_string();
    let put = etcd.etcdctl([
        "put",
        &format!("--lease={lease}"),
        &format!("lv/waiters/{lease}"),
        "2",
    ]);
    assert!(put.status.success(), "{put:?}");
    let (out, took) =
        run(baton(&etcd.endpoint()).args(["barrier", "lv", "--count", "2", "--timeout", "1s"]));
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(
        stderr_lines(&out)[0].contains("waiting for the others to leave"),
        "{out:?}"
    );
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert_eq!(
        keys(&etcd, "lv/waiters/"),
        vec![format!("lv/waiters/{lease}")]
    );
}
