//! Running the `baton` binary as a user would, against real etcd.
#![allow(dead_code, clippy::unwrap_used, clippy::panic, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub use baton_testkit::EtcdServer;

/// The longest any single step may take before a test gives up.
pub const STEP: Duration = Duration::from_secs(15);

/// A real etcd on loopback, or a clear failure.
pub fn etcd() -> EtcdServer {
    assert!(
        baton_testkit::etcd_available(),
        "etcd is needed for these tests: run scripts/test.sh (it installs etcd) or set BATON_ETCD_BIN"
    );
    EtcdServer::start()
}

/// `baton` with `--endpoints` set, a clean environment for tracing, and no stdin.
pub fn baton(endpoints: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
    cmd.env("BATON_ENDPOINTS", endpoints)
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null());
    // `baton` leaves signals ignored at its start ignored (nohup, background jobs): the
    // tests that send it signals must not inherit ignored ones from whatever ran the
    // suite (`nohup ./.ci/run` made SIGHUP ignored, and the SIGHUP test failed).
    // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            for sig in [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    cmd
}

/// Run to completion (at most [`STEP`]) and collect the output.
pub fn run(cmd: &mut Command) -> (Output, Duration) {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(STEP) {
        Ok(output) => (output.unwrap(), started.elapsed()),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("baton did not finish within {STEP:?}: {cmd:?}");
        }
    }
}

/// The lines of stderr.
pub fn stderr_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The whole of stdout.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A `baton` running in the background. Killed (SIGKILL) on drop if still running.
pub struct Proc {
    pub child: Child,
    lines: Receiver<String>,
    err_lines: Receiver<String>,
}

impl Proc {
    /// Start `cmd` with stdout and stderr captured line by line.
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = reader(child.stdout.take().unwrap());
        let err_lines = reader(child.stderr.take().unwrap());
        Proc {
            child,
            lines,
            err_lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line, waiting at most [`STEP`].
    pub fn line(&self) -> String {
        match self.lines.recv_timeout(STEP) {
            Ok(line) => line,
            Err(e) => panic!(
                "no stdout line from baton within {STEP:?} ({e}); stderr: {:?}",
                self.stderr_so_far()
            ),
        }
    }

    /// The next stdout line if one comes within `timeout`.
    pub fn line_within(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The stderr lines printed so far.
    pub fn stderr_so_far(&self) -> Vec<String> {
        self.err_lines.try_iter().collect()
    }

    /// The stderr lines of a process that has exited: all of them once stderr is closed,
    /// waiting at most 2 s for that (a CMD that outlives baton may keep it open). Unlike
    /// [`stderr_so_far`](Proc::stderr_so_far), this does not miss the last lines, which the
    /// reader thread may not have passed on yet when the exit is seen.
    pub fn stderr_after_exit(&self) -> Vec<String> {
        self.stderr_until_closed(Duration::from_secs(2)).0
    }

    /// Every stderr line, once stderr is closed (after the exit), waiting at most [`STEP`].
    pub fn stderr_all(&self) -> Vec<String> {
        match self.stderr_until_closed(STEP) {
            (lines, true) => lines,
            (lines, false) => panic!("stderr still open: {lines:?}"),
        }
    }

    /// The stderr lines until stderr closes or `limit` passes, and whether it closed.
    fn stderr_until_closed(&self, limit: Duration) -> (Vec<String>, bool) {
        let deadline = Instant::now() + limit;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.err_lines.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return (lines, true),
                Err(mpsc::RecvTimeoutError::Timeout) => return (lines, false),
            }
        }
    }

    /// Send a signal.
    pub fn signal(&self, sig: i32) {
        signal(self.pid(), sig);
    }

    /// Wait for the exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait for the exit (at most [`STEP`]) and return its code.
    pub fn code(&mut self) -> i32 {
        match self.wait(STEP) {
            Some(status) => status
                .code()
                .unwrap_or_else(|| panic!("baton was killed by a signal: {status:?}")),
            None => panic!("baton did not exit within {STEP:?}"),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn reader(stream: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Send `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// True if process `pid` exists (a zombie counts).
pub fn alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Wait until `cond` holds, at most [`STEP`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait until `path` exists and is not empty; its contents.
pub fn wait_for_file(path: &Path) -> String {
    let mut text = String::new();
    wait_until(&format!("{}", path.display()), || {
        text = std::fs::read_to_string(path).unwrap_or_default();
        text.ends_with('\n')
    });
    text
}

/// The keys under `prefix`, per etcdctl.
pub fn keys(etcd: &EtcdServer, prefix: &str) -> Vec<String> {
    let out = etcd.etcdctl(["get", "--prefix", "--keys-only", prefix]);
    assert!(out.status.success(), "etcdctl get: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Revoke the lease of a lock or election key (`NAME/<lease hex>`) with etcdctl.
pub fn revoke(etcd: &EtcdServer, key: &str) {
    let lease = key.rsplit('/').next().unwrap();
    let out = etcd.etcdctl(["lease", "revoke", lease]);
    assert!(
        out.status.success(),
        "etcdctl lease revoke {lease}: {out:?}"
    );
}

/// Once a second key is under `prefix` (a waiter's, beside `holder_key`), revoke its lease,
/// and check that `waiter` exits 125 with one line on stderr, starting with `message`: a
/// session lost while waiting is no loss of something held (that would be 122).
pub fn revoke_waiter_and_expect_125(
    etcd: &EtcdServer,
    prefix: &str,
    holder_key: &str,
    waiter: &mut Proc,
    message: &str,
) {
    wait_until("the waiter's key", || keys(etcd, prefix).len() == 2);
    let waiter_key = keys(etcd, prefix)
        .into_iter()
        .find(|k| k != holder_key)
        .unwrap();
    revoke(etcd, &waiter_key);
    assert_eq!(waiter.code(), 125);
    let err = waiter.stderr_all();
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].starts_with(message), "{err:?}");
}

/// Once a second key is under `prefix` (a waiter's, beside `holder_key`), delete it with
/// etcdctl (its session lives on), and check that `waiter` exits 125 with one line on
/// stderr, `baton: key "<its key>" was deleted while waiting WHAT`: not that its session was
/// lost, which it was not.
pub fn delete_waiter_key_and_expect_125(
    etcd: &EtcdServer,
    prefix: &str,
    holder_key: &str,
    waiter: &mut Proc,
    what: &str,
) {
    wait_until("the waiter's key", || keys(etcd, prefix).len() == 2);
    let waiter_key = keys(etcd, prefix)
        .into_iter()
        .find(|k| k != holder_key)
        .unwrap();
    let out = etcd.etcdctl(["del", &waiter_key]);
    assert!(out.status.success(), "etcdctl del {waiter_key}: {out:?}");
    assert_eq!(waiter.code(), 125);
    let err = waiter.stderr_all();
    assert_eq!(
        err,
        [format!(
            "baton: key {waiter_key:?} was deleted while waiting {what}"
        )]
    );
}

/// A key's create revision, per etcdctl.
pub fn create_revision(etcd: &EtcdServer, key: &str) -> i64 {
    let out = etcd.etcdctl(["get", key, "-w", "fields"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("\"CreateRevision\" : "))
        .unwrap_or_else(|| panic!("no CreateRevision for {key}: {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A process's state letter from /proc/PID/stat (`T` when stopped), or `None` if it is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state …"; comm may contain spaces and parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().next()?.chars().next()
}

/// True if no process of process group `pgid` can run, and the group is not empty: each
/// is stopped (`T`), a zombie, or blocked in a `vfork` (`D`) whose child in the group is
/// stopped. A shell stopped while it starts a command is the last kind: the SIGSTOP for
/// the group reaches its child between `vfork` and `exec`, and the kernel keeps the shell
/// waiting for that stopped child, so it never gets to act on its own pending SIGSTOP.
pub fn group_stopped(pgid: u32) -> bool {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp …"; comm may contain spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(ppid), Some(pgrp)) = (
            fields.first().and_then(|f| f.chars().next()),
            fields.get(1).and_then(|f| f.parse::<u32>().ok()),
            fields.get(2).and_then(|f| f.parse::<u32>().ok()),
        ) else {
            continue;
        };
        if pgrp == pgid {
            members.push((pid, state, ppid));
        }
    }
    let stopped = |state: char| matches!(state, 'T' | 't' | 'Z');
    !members.is_empty()
        && members.iter().all(|&(pid, state, _)| {
            stopped(state)
                || (state == 'D'
                    && members.iter().any(|&(_, child_state, ppid)| {
                        ppid == pid && matches!(child_state, 'T' | 't')
                    }))
        })
}

/// The number of leases etcd has, per etcdctl.
pub fn leases(etcd: &EtcdServer) -> usize {
    let out = etcd.etcdctl(["lease", "list"]);
    assert!(out.status.success(), "etcdctl lease list: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .and_then(|l| l.strip_prefix("found "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("etcdctl lease list: {text}"))
}

/// The size of the file at `path` (0 if it does not exist).
pub fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The pid of `baton`'s guardian process (its child run with the hidden guardian argument),
/// waiting at most [`STEP`] for it to start.
pub fn guardian_of(baton: u32) -> u32 {
    let mut found = None;
    wait_until("baton's guardian", || {
        found = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .find(|&pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let is_guardian = cmdline
                    .split(|&b| b == 0)
                    .nth(1)
                    .is_some_and(|arg| arg == b"__baton-guardian");
                is_guardian && parent_of(pid) == Some(baton)
            });
        found.is_some()
    });
    found.unwrap()
}

/// A process's parent, from /proc/PID/stat.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// What a process has read so far, from /proc/PID/io: bytes (`rchar`) and read calls
/// (`syscr`), /proc's own files included.
pub fn reads_of(pid: u32) -> (u64, u64) {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let field = |name: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/io: {io}"))
    };
    (field("rchar:"), field("syscr:"))
}

/// A process's CPU time so far (user + system), from /proc/PID/stat.
pub fn cpu_time_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(')').unwrap();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3 of the whole line, utime 14 and stime 15.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}
