//! Worker processes that tests pause, resume and kill: [`WorkerProc`].
//!
//! A worker is any program (the testkit's `fault-worker`, the `baton` command, …) started
//! like the servers of the fixtures: killed by the kernel if the test process dies, killed
//! and reaped on drop. Its stdout is read line by line in the background; its stderr goes to
//! a file, shown when a test asks.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tempfile::NamedTempFile;
use tokio::sync::mpsc;

use crate::oracle::mono_now;
use crate::process;

/// A worker process: see the [module docs](self).
pub struct WorkerProc {
    name: String,
    child: Option<Child>,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: NamedTempFile,
    status: Option<ExitStatus>,
    stopped: bool,
}

impl std::fmt::Debug for WorkerProc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerProc")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .field("stopped", &self.stopped)
            .finish()
    }
}

impl WorkerProc {
    /// Start `program ARGS` as worker `name`, with stdin closed and stdout read by lines.
    ///
    /// # Panics
    ///
    /// If it cannot be started.
    pub fn spawn<I, S>(name: &str, program: impl AsRef<Path>, args: I) -> WorkerProc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(program.as_ref());
        command.args(args);
        Self::spawn_command(name, command)
    }

    /// Start `command` as worker `name` (stdin, stdout and stderr are set here).
    ///
    /// # Panics
    ///
    /// If it cannot be started.
    pub fn spawn_command(name: &str, mut command: Command) -> WorkerProc {
        let stderr = match NamedTempFile::new() {
            Ok(f) => f,
            Err(e) => panic!("worker {name}: cannot create a stderr file: {e}"),
        };
        let err_handle = match stderr.reopen() {
            Ok(f) => f,
            Err(e) => panic!("worker {name}: cannot open its stderr file: {e}"),
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err_handle));
        let mut child = match process::spawn(command) {
            Ok(c) => c,
            Err(e) => panic!("worker {name}: cannot start: {e}"),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        WorkerProc {
            name: name.to_string(),
            child: Some(child),
            lines: rx,
            stderr,
            status: None,
            stopped: false,
        }
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The next line of stdout, if one comes within `timeout` (`None` also at EOF).
    pub async fn line(&mut self, timeout: Duration) -> Option<String> {
        tokio::time::timeout(timeout, self.lines.recv())
            .await
            .ok()
            .flatten()
    }

    /// Read lines until one starts with `prefix`, within `timeout`; that line.
    pub async fn line_starting(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = self.line(left).await?;
            if line.starts_with(prefix) {
                return Some(line);
            }
        }
    }

    /// The lines printed so far and not read yet.
    pub fn lines_so_far(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            out.push(line);
        }
        out
    }

    /// Everything the worker wrote on stderr so far.
    pub fn stderr(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.stderr.path()) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// The stderr file's path.
    pub fn stderr_path(&self) -> PathBuf {
        self.stderr.path().to_path_buf()
    }

    fn send(&mut self, signal: libc::c_int, what: &str) {
        let Some(pid) = self.pid() else {
            panic!("cannot send {what} to worker {}: not running", self.name);
        };
        if let Err(e) = process::signal(pid, signal) {
            panic!(
                "cannot send {what} to worker {} (pid {pid}): {e}",
                self.name
            );
        }
    }

    /// Pause the worker (SIGSTOP); returns when, in `CLOCK_MONOTONIC` ns.
    ///
    /// # Panics
    ///
    /// If it is not running.
    pub fn stop(&mut self) -> u64 {
        self.send(libc::SIGSTOP, "SIGSTOP");
        self.stopped = true;
        mono_now()
    }

    /// Resume a paused worker (SIGCONT); returns when, in `CLOCK_MONOTONIC` ns.
    ///
    /// # Panics
    ///
    /// If it is not running.
    pub fn cont(&mut self) -> u64 {
        let t = mono_now();
        self.send(libc::SIGCONT, "SIGCONT");
        self.stopped = false;
        t
    }

    /// Send `signal` (SIGTERM, SIGINT, …).
    ///
    /// # Panics
    ///
    /// If it is not running.
    pub fn signal(&mut self, signal: libc::c_int) {
        self.send(signal, "a signal");
    }

    /// `kill -9` and reap; returns when it was sent, in `CLOCK_MONOTONIC` ns. Does nothing
    /// but return the time if it already exited.
    pub fn kill(&mut self) -> u64 {
        let t = mono_now();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if let Ok(status) = child.wait() {
                self.status = Some(status);
            }
        }
        self.stopped = false;
        t
    }

    /// The exit status if it has exited (reaping it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.status = Some(status);
                self.child = None;
            }
        }
        self.status
    }

    /// Wait up to `timeout` for the exit; its status.
    pub async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// True if process `pid` exists (a zombie counts).
pub fn alive(pid: u32) -> bool {
    process::signal(pid, 0).is_ok()
}

/// True if process `pid` exists and has not exited: a zombie (exited, not reaped) does not
/// count. Orphans stay zombies where PID 1 does not reap them, as in some containers.
pub fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return alive(pid);
    };
    match stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
    {
        Some("Z" | "X") => false,
        Some(_) => true,
        None => alive(pid),
    }
}
