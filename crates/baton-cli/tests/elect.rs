//! `baton elect`, `baton observe` and `baton leader` agree with each other and with
//! `etcdctl elect`, on real etcd.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `etcdctl elect ARGS` in the background, as a [`Proc`].
fn etcdctl_elect(etcd: &EtcdServer, args: &[&str]) -> Proc {
    let mut cmd = Command::new(baton_testkit::etcdctl_bin().expect("etcdctl"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCDCTL") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoint()))
        .arg("elect")
        .args(args)
        .stdin(Stdio::null());
    Proc::spawn(&mut cmd)
}

/// `VALUE (key KEY, revision R, token T)`: (value, key).
fn parse_observed(line: &str) -> (String, String) {
    let (value, rest) = line
        .split_once(" (key ")
        .unwrap_or_else(|| panic!("not an observe line: {line}"));
    let key = rest.split_once(',').unwrap().0;
    (value.to_string(), key.to_string())
}

/// A leader chosen by `etcdctl elect` is the one `baton leader` and `baton observe`
/// report; when it resigns, a `baton elect` candidate takes over and both tools see it.
#[test]
fn etcdctl_leader_is_seen_by_baton() {
    let etcd = etcd();
    let ep = etcd.endpoint();

    let (out, _) = run(baton(&ep).args(["leader", "e1"]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr_lines(&out);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("no leader"), "{err:?}");

    let go = etcdctl_elect(&etcd, &["e1", "v1"]);
    let go_key = go.line();
    assert_eq!(go.line(), "v1");
    assert!(go_key.starts_with("e1/"), "{go_key}");

    let (out, _) = run(baton(&ep).args(["leader", "e1"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "v1\n");

    let mut observer = Proc::spawn(baton(&ep).args(["observe", "e1"]));
    let (value, key) = parse_observed(&observer.line());
    assert_eq!((value.as_str(), key.as_str()), ("v1", go_key.as_str()));

    // A baton candidate queues behind etcdctl's leader and takes over when it resigns.
    let mut candidate = Proc::spawn(baton(&ep).args(["elect", "e1", "v2"]));
    wait_until("baton's candidacy", || keys(&etcd, "e1/").len() == 2);
    assert!(candidate.line_within(Duration::from_millis(200)).is_none());
    go.signal(libc::SIGINT); // etcdctl elect resigns on SIGINT
    let elected = candidate.line();
    assert!(elected.starts_with("elected e1/"), "{elected}");
    let (value, key) = parse_observed(&observer.line());
    assert_eq!(value, "v2");
    assert!(elected.contains(&key), "{elected} vs {key}");
    let (out, _) = run(baton(&ep).args(["leader", "e1"]));
    assert_eq!(stdout(&out), "v2\n");

    candidate.signal(libc::SIGTERM);
    assert_eq!(candidate.code(), 0);
    assert!(candidate.line().starts_with("resigned e1/"));
    observer.signal(libc::SIGINT);
    assert_eq!(observer.code(), 0);
}

/// While `baton elect` leads, `etcdctl elect -l` prints its value; `baton leader` and
/// `baton observe` agree (JSON too); losing the lease makes the leader's CMD die and baton
/// exit 122 with `leadership lost`, and the next candidate leads.
#[test]
fn baton_leader_is_seen_by_etcdctl() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();

    let mut leader = Proc::spawn(baton(&ep).env("D", dir.path()).args([
        "--json",
        "elect",
        "e2",
        "bv1",
        "--",
        "sh",
        "-c",
        r#"echo "$BATON_ELECTION_KEY $BATON_FENCING_TOKEN" > "$D/leader"; exec sleep 30"#,
    ]));
    // With CMD, baton prints nothing on stdout: the key and token come from CMD.
    let leader_file = wait_for_file(&dir.path().join("leader"));
    let (key, token) = leader_file.trim_end().split_once(' ').unwrap();
    let (key, token) = (key.to_string(), token.parse::<i64>().unwrap());
    assert!(key.starts_with("e2/"), "{leader_file}");
    assert_eq!(create_revision(&etcd, &key), token);

    let listener = etcdctl_elect(&etcd, &["-l", "e2"]);
    assert_eq!(listener.line(), key);
    assert_eq!(listener.line(), "bv1");

    let (out, _) = run(baton(&ep).args(["--json", "leader", "e2"]));
    let seen: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(seen["value"], "bv1");
    assert_eq!(seen["key"], key.as_str());
    assert_eq!(seen["fencing_token"], token);

    let observer = Proc::spawn(baton(&ep).args(["--json", "observe", "e2"]));
    let seen: serde_json::Value = serde_json::from_str(&observer.line()).unwrap();
    assert_eq!(
        (seen["value"].as_str(), seen["key"].as_str()),
        (Some("bv1"), Some(key.as_str()))
    );

    let mut standby = Proc::spawn(baton(&ep).args(["elect", "e2", "bv2"]));
    wait_until("the standby's candidacy", || keys(&etcd, "e2/").len() == 2);

    let revoked = Instant::now();
    revoke(&etcd, &key);
    let status = leader.wait(Duration::from_secs(5)).expect("baton exits");
    assert_eq!(status.code(), Some(122));
    assert!(
        revoked.elapsed() < Duration::from_secs(1),
        "{:?}",
        revoked.elapsed()
    );
    let err = leader.stderr_after_exit();
    assert!(
        err.len() == 1 && err[0].starts_with("leadership lost"),
        "{err:?}"
    );

    assert!(standby.line().starts_with("elected e2/"));
    let seen: serde_json::Value = serde_json::from_str(&observer.line()).unwrap();
    assert_eq!(seen["value"], "bv2");
    assert!(seen["fencing_token"].as_i64().unwrap() > token);
    assert_eq!(
        listener
            .line_within(STEP)
            .as_deref()
            .map(|l| l.starts_with("e2/")),
        Some(true)
    );
    assert_eq!(listener.line(), "bv2");

    standby.signal(libc::SIGINT);
    assert_eq!(standby.code(), 0);
    assert!(keys(&etcd, "e2/").is_empty());
}

/// A candidate whose session is lost before it is elected never led: it exits 125 saying
/// so, not 122 ("lost while held").
#[test]
fn candidate_whose_lease_is_revoked_exits_125() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let leader = Proc::spawn(baton(&ep).args(["elect", "vote", "a"]));
    assert!(leader.line().starts_with("elected vote/"));
    let leader_key = keys(&etcd, "vote/")[0].clone();
    let mut candidate = Proc::spawn(baton(&ep).args(["elect", "vote", "b", "--", "true"]));
    revoke_waiter_and_expect_125(
        &etcd,
        "vote/",
        &leader_key,
        &mut candidate,
        "baton: session lost while waiting to lead \"vote\"",
    );
}

/// A candidate whose key is deleted (its session alive) never led: it exits 125 saying its
/// key was deleted, not that its session was lost.
#[test]
fn candidate_whose_key_is_deleted_exits_125() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let leader = Proc::spawn(baton(&ep).args(["elect", "kde", "a"]));
    assert!(leader.line().starts_with("elected kde/"));
    let leader_key = keys(&etcd, "kde/")[0].clone();
    let mut candidate = Proc::spawn(baton(&ep).args(["elect", "kde", "b", "--", "true"]));
    delete_waiter_key_and_expect_125(
        &etcd,
        "kde/",
        &leader_key,
        &mut candidate,
        "to lead \"kde\"",
    );
}

/// With CMD, stdout is CMD's alone, as with `baton lock NAME -- CMD`: no `elected` or
/// `resigned` line (nor their JSON) around it, so `baton elect … -- ./report > out.csv`
/// writes the report only. Without CMD, baton prints `elected` when elected and `resigned`
/// when stopped.
#[test]
fn cmd_output_is_cmds_alone() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    for json in [false, true] {
        let mut cmd = baton(&ep);
        if json {
            cmd.arg("--json");
        }
        let (out, _) = run(cmd.args(["elect", "report", "v", "--", "sh", "-c", "echo a,b"]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert_eq!(stdout(&out), "a,b\n", "--json {json}: {out:?}");
        assert!(out.stderr.is_empty(), "{out:?}");
    }

    let mut leader = Proc::spawn(baton(&ep).args(["elect", "report", "v"]));
    assert!(leader.line().starts_with("elected report/"));
    leader.signal(libc::SIGTERM);
    assert_eq!(leader.code(), 0);
    assert!(leader.line().starts_with("resigned report/"));
    assert!(keys(&etcd, "report/").is_empty());
}

/// `baton observe --vacancies` prints `no leader` at the start and when the leader leaves
/// with no candidate waiting (its lease revoked, then a resignation), once each, and not
/// on a hand-over to a waiting candidate; `--json` prints `"event": "no_leader"`. Without
/// the flag, a vacancy prints nothing.
#[test]
fn observe_vacancies_says_no_leader() {
    let etcd = etcd();
    let ep = etcd.endpoint();
    let observer = Proc::spawn(baton(&ep).args(["observe", "--vacancies", "e4"]));
    let json = Proc::spawn(baton(&ep).args(["--json", "observe", "--vacancies", "e4"]));
    let plain = Proc::spawn(baton(&ep).args(["observe", "e4"]));
    assert_eq!(observer.line(), "no leader");
    let seen: serde_json::Value = serde_json::from_str(&json.line()).unwrap();
    assert_eq!(
        seen,
        serde_json::json!({"event": "no_leader", "name": "e4"})
    );

    // A leader, revoked: no candidate waits.
    let mut first = Proc::spawn(baton(&ep).args(["elect", "e4", "v1"]));
    let elected = first.line();
    assert!(elected.starts_with("elected e4/"), "{elected}");
    assert_eq!(parse_observed(&observer.line()).0, "v1");
    let seen: serde_json::Value = serde_json::from_str(&json.line()).unwrap();
    assert_eq!(seen["event"], "leader");
    assert_eq!(parse_observed(&plain.line()).0, "v1");
    let key = keys(&etcd, "e4/").pop().unwrap();
    revoke(&etcd, &key);
    assert_eq!(first.code(), 122);
    assert_eq!(observer.line(), "no leader");
    let seen: serde_json::Value = serde_json::from_str(&json.line()).unwrap();
    assert_eq!(seen["event"], "no_leader");

    // A leader with a candidate waiting: the hand-over prints the next leader only.
    let mut second = Proc::spawn(baton(&ep).args(["elect", "e4", "v2"]));
    assert!(second.line().starts_with("elected e4/"));
    assert_eq!(parse_observed(&observer.line()).0, "v2");
    assert_eq!(parse_observed(&plain.line()).0, "v2");
    let mut third = Proc::spawn(baton(&ep).args(["elect", "e4", "v3"]));
    wait_until("the third candidacy", || keys(&etcd, "e4/").len() == 2);
    second.signal(libc::SIGTERM);
    assert_eq!(second.code(), 0);
    assert!(third.line().starts_with("elected e4/"));
    assert_eq!(parse_observed(&observer.line()).0, "v3");
    assert_eq!(parse_observed(&plain.line()).0, "v3");

    // The last leader resigns: one `no leader`, and nothing from the plain observer.
    third.signal(libc::SIGTERM);
    assert_eq!(third.code(), 0);
    assert_eq!(observer.line(), "no leader");
    assert_eq!(observer.line_within(Duration::from_millis(500)), None);
    assert_eq!(plain.line_within(Duration::from_millis(10)), None);
    for mut p in [observer, json, plain] {
        p.signal(libc::SIGINT);
        assert_eq!(p.code(), 0);
    }
}

/// `baton leader` prints the leader's value as is, as `baton get` prints a value: a Go
/// service may proclaim any bytes (a binary address, a protobuf), and a script reading
/// `$(baton leader NAME)` or `baton leader NAME > file` must get them, not U+FFFD in place
/// of each byte that is not UTF-8 (found by review, kvcli).
#[test]
fn leader_prints_a_value_that_is_not_utf8_as_is() {
    use std::os::unix::ffi::OsStrExt;
    let etcd = etcd();
    let granted = etcd.etcdctl(["lease", "grant", "60"]);
    let text = String::from_utf8_lossy(&granted.stdout).into_owned();
    // "lease 694d7f3a2c1b granted with TTL(60s)"
    let lease = text.split_whitespace().nth(1).unwrap().to_string();
    let value: &[u8] = b"\x0a\x01\x07\xff\xfe";
    let put = etcd.etcdctl([
        std::ffi::OsStr::new("put"),
        std::ffi::OsStr::new(&format!("--lease={lease}")),
        std::ffi::OsStr::new(&format!("bin/{lease}")),
        std::ffi::OsStr::from_bytes(value),
    ]);
    assert!(put.status.success(), "{put:?}");
    let (out, _) = run(baton(&etcd.endpoint()).args(["leader", "bin"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let mut expected = value.to_vec();
    expected.push(b'\n');
    assert_eq!(
        out.stdout,
        expected,
        "stdout {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}
