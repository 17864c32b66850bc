//! Real Redis servers on loopback: [`RedisServer`] (one) and [`RedisServers`] (N independent
//! masters, for Redlock).
//!
//! Each server runs the `redis-server` binary ([`redis_bin`]) on a free loopback port with
//! `--save '' --appendonly no` (no persistence: a restart loses every key), its working
//! directory and log in a temporary directory. Starting waits until it answers `PING`; a
//! start that fails panics with the end of the log. Servers are killed with SIGKILL and
//! reaped on drop, and are killed by the kernel if the test process dies first.
//!
//! [`RedisServer::start_with`] takes [`RedisServerOptions`]: a `requirepass`, ACL users, and
//! TLS on a second port (with certificates from [`TestPki`](crate::TestPki)).
//!
//! All calls block the calling thread (starting takes a few milliseconds).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::ports::free_port;
use crate::process;

/// How long a server may take to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a start is retried on a new port after the port was taken.
const START_ATTEMPTS: usize = 5;
/// How many log lines a failure message shows.
const LOG_TAIL_LINES: usize = 30;

/// The `redis-server` binary: `$BATON_REDIS_BIN`, else `/usr/bin/redis-server`, else
/// `redis-server` on the `PATH`.
pub fn redis_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BATON_REDIS_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let usr = PathBuf::from("/usr/bin/redis-server");
    if usr.is_file() {
        return Some(usr);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.is_file())
}

/// True if `redis-server` ([`redis_bin`]) exists and runs (`--version` succeeds).
pub fn redis_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        redis_bin().is_some_and(|bin| {
            Command::new(bin)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    })
}

/// How to start a [`RedisServer`].
///
/// # Default
///
/// No password, only the `default` user, no TLS.
#[derive(Clone, Debug, Default)]
pub struct RedisServerOptions {
    requirepass: Option<String>,
    users: Vec<String>,
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    client_cert_auth: bool,
}

impl RedisServerOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Require this password (`--requirepass`): the `default` user's password.
    pub fn with_requirepass(mut self, password: &str) -> Self {
        self.requirepass = Some(password.to_string());
        self
    }

    /// Add an ACL user: `rules` as in `ACL SETUSER` after the name, such as
    /// `"on >secret ~app:* &* +@all"`.
    pub fn with_acl_user(mut self, name: &str, rules: &str) -> Self {
        self.users.push(format!("{name} {rules}"));
        self
    }

    /// Also listen with TLS on a second port ([`RedisServer::tls_url`]), with the server
    /// certificate of `pki`. Keep `pki` alive as long as the server.
    pub fn with_tls(mut self, pki: &crate::TestPki) -> Self {
        self.tls = Some((pki.server_cert_file(), pki.server_key_file(), pki.ca_file()));
        self
    }

    /// Require TLS clients to present a certificate signed by the CA
    /// (`--tls-auth-clients yes`; the default with TLS is `no`).
    pub fn with_client_cert_auth(mut self) -> Self {
        self.client_cert_auth = true;
        self
    }
}

/// Send one command (RESP) to the Redis server at `addr` and return the first line of the raw
/// reply (`+OK`, `:1`, `-ERR …`), or `None` on any failure. Blocks the calling thread. For
/// tampering with keys behind a client's back, and simple checks.
pub fn redis_command(addr: SocketAddr, args: &[&str], timeout: Duration) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(req.as_bytes()).ok()?;
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    Some(text.lines().next().unwrap_or_default().to_string())
}

/// One `redis-server` on loopback, without persistence.
///
/// # Examples
///
/// ```no_run
/// let redis = baton_testkit::RedisServer::start();
/// println!("redis listens on {}", redis.url());
/// ```
pub struct RedisServer {
    port: u16,
    /// The TLS port, with [`RedisServerOptions::with_tls`].
    tls_port: u16,
    options: RedisServerOptions,
    dir: TempDir,
    child: Option<Child>,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("url", &self.url())
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl RedisServer {
    /// Start a server on a free loopback port and wait until it answers `PING`.
    ///
    /// # Panics
    ///
    /// If redis-server is missing or does not answer within 10 s; the message shows the end
    /// of its log.
    pub fn start() -> RedisServer {
        RedisServer::start_with(RedisServerOptions::default())
    }

    /// Start a server with `options` (password, ACL users, TLS).
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn start_with(options: RedisServerOptions) -> RedisServer {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = match tempfile::Builder::new().prefix("baton-redis-").tempdir() {
                Ok(dir) => dir,
                Err(e) => panic!("cannot create a temporary directory for redis: {e}"),
            };
            let mut server = RedisServer {
                port: free_port(),
                tls_port: free_port(),
                options: options.clone(),
                dir,
                child: None,
            };
            server.spawn();
            match server.wait_started() {
                Ok(()) => return server,
                Err(None) => {
                    last = server.log_tail(LOG_TAIL_LINES);
                    tracing::debug!(port = server.port, "redis port taken; retrying");
                }
                Err(Some(why)) => panic!("{why}"),
            }
        }
        panic!("redis-server could not bind a free port in {START_ATTEMPTS} attempts; last log lines:\n{last}")
    }

    /// Like [`start`](Self::start), from async code: runs on tokio's blocking pool.
    pub async fn start_async() -> RedisServer {
        match tokio::task::spawn_blocking(RedisServer::start).await {
            Ok(server) => server,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    fn spawn(&mut self) {
        let Some(bin) = redis_bin() else {
            panic!("redis-server not found: install it (Debian: apt-get install redis-server) or set BATON_REDIS_BIN");
        };
        let log = match OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
        {
            Ok(log) => log,
            Err(e) => panic!(
                "cannot open the redis log {}: {e}",
                self.log_path().display()
            ),
        };
        if let Ok(mut l) = log.try_clone() {
            let _ = writeln!(l, "--- baton-testkit: starting redis on port {}", self.port);
        }
        let (stdout, stderr) = match (log.try_clone(), log.try_clone()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => panic!("cannot duplicate the redis log handle: {e}"),
        };
        let mut command = Command::new(&bin);
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--daemonize", "no"])
            .args(["--enable-debug-command", "local"])
            .args(["--loglevel", "warning"]);
        if let Some(pass) = &self.options.requirepass {
            command.args(["--requirepass", pass]);
        }
        for user in &self.options.users {
            command.arg("--user").args(user.split_whitespace());
        }
        if let Some((cert, key, ca)) = &self.options.tls {
            command
                .args(["--tls-port", &self.tls_port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args([
                    "--tls-auth-clients",
                    if self.options.client_cert_auth {
                        "yes"
                    } else {
                        "no"
                    },
                ]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        match process::spawn(command) {
            Ok(child) => {
                tracing::debug!(pid = child.id(), port = self.port, "started redis");
                self.child = Some(child);
            }
            Err(e) => panic!("cannot start {}: {e}", bin.display()),
        }
    }

    /// Wait until it answers PING. `Err(None)`: the port was taken; `Err(Some(why))`: failed.
    fn wait_started(&mut self) -> Result<(), Option<String>> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.exit_status() {
                let tail = self.log_tail(LOG_TAIL_LINES);
                if tail.contains("Address already in use") {
                    return Err(None);
                }
                return Err(Some(format!(
                    "redis-server exited with {status} (port {}); last log lines:\n{tail}",
                    self.port
                )));
            }
            // It answers, and it is ours: another process may have taken the port since
            // it was found free (ours then exits, "Address already in use").
            if self.ping() && self.owns_ports() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(Some(format!(
                    "redis-server did not answer PING within {START_TIMEOUT:?} (port {}); last log lines:\n{}",
                    self.port,
                    self.log_tail(LOG_TAIL_LINES)
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True if our own process listens on the port (and the TLS port with TLS).
    fn owns_ports(&self) -> bool {
        let Some(pid) = self.pid() else { return false };
        process::listens_on(pid, self.port)
            && (self.options.tls.is_none() || process::listens_on(pid, self.tls_port))
    }

    fn exit_status(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            _ => None,
        }
    }

    /// True if the server answers `PING` with `PONG` (or, with a password, asks for it)
    /// within 200 ms.
    pub fn ping(&self) -> bool {
        self.command(&["PING"], Duration::from_millis(200))
            .is_some_and(|reply| reply.starts_with("+PONG") || reply.starts_with("-NOAUTH"))
    }

    /// Send one command (RESP) and return the first line of the raw reply, or `None` on any
    /// failure. For simple checks; tests use a real client for anything more.
    pub fn command(&self, args: &[&str], timeout: Duration) -> Option<String> {
        redis_command(
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
            args,
            timeout,
        )
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://127.0.0.1:TLS_PORT`, with [`RedisServerOptions::with_tls`].
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_port)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, or `None` if the server is not running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True if the process runs (possibly paused with [`stop`](Self::stop)).
    pub fn is_running(&mut self) -> bool {
        self.exit_status();
        self.child.is_some()
    }

    /// The log file (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(self.log_path()) {
            let _ = file.read_to_string(&mut text);
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kill the process with SIGKILL and reap it. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            tracing::debug!(port = self.port, "killed redis");
        }
    }

    /// Pause the process with SIGSTOP, and return once all its threads are stopped (at
    /// most 5 s): it keeps its socket but answers nothing.
    ///
    /// # Panics
    ///
    /// If the server is not running.
    pub fn stop(&mut self) {
        self.send(libc::SIGSTOP, "SIGSTOP");
        // Returns once every thread is stopped: a request sent right after must not be
        // answered by a thread that was still running.
        if let Some(pid) = self.pid() {
            process::wait_stopped(pid, std::time::Duration::from_secs(5));
        }
    }

    /// Resume a process paused with [`stop`](Self::stop) (SIGCONT).
    ///
    /// # Panics
    ///
    /// If the server is not running.
    pub fn cont(&mut self) {
        self.send(libc::SIGCONT, "SIGCONT");
    }

    fn send(&mut self, signal: libc::c_int, name: &str) {
        let Some(pid) = self.pid() else {
            panic!(
                "cannot send {name} to redis on port {}: not running",
                self.port
            );
        };
        if let Err(e) = process::signal(pid, signal) {
            panic!("cannot send {name} to redis (pid {pid}): {e}");
        }
    }

    /// Kill the server if it runs and start it again on the same port. Without persistence
    /// it comes back empty. Waits until it answers `PING`.
    ///
    /// # Panics
    ///
    /// If it does not come back within 10 s (or another process took the port).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.spawn();
            match self.wait_started() {
                Ok(()) => return,
                // The old socket may linger for a moment.
                Err(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(None) => panic!(
                    "redis could not bind port {} again on restart; last log lines:\n{}",
                    self.port,
                    self.log_tail(LOG_TAIL_LINES)
                ),
                Err(Some(why)) => panic!("{why}"),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// N independent Redis masters (no replication between them), for Redlock.
///
/// # Examples
///
/// ```no_run
/// let mut masters = baton_testkit::RedisServers::start(5);
/// println!("redlock URL: {}", masters.redlock_url());
/// masters.kill(0);
/// ```
#[derive(Debug)]
pub struct RedisServers {
    servers: Vec<RedisServer>,
}

impl RedisServers {
    /// Start `n` servers.
    ///
    /// # Panics
    ///
    /// If `n` is 0 or a server does not start (see [`RedisServer::start`]).
    pub fn start(n: usize) -> RedisServers {
        assert!(n > 0, "at least one server");
        RedisServers {
            servers: (0..n).map(|_| RedisServer::start()).collect(),
        }
    }

    /// Like [`start`](Self::start), from async code: runs on tokio's blocking pool.
    pub async fn start_async(n: usize) -> RedisServers {
        match tokio::task::spawn_blocking(move || RedisServers::start(n)).await {
            Ok(servers) => servers,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// `redlock://127.0.0.1:P1,127.0.0.1:P2,…`.
    pub fn redlock_url(&self) -> String {
        let addrs: Vec<String> = self.servers.iter().map(RedisServer::addr).collect();
        format!("redlock://{}", addrs.join(","))
    }

    /// The number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// True if there are none (never, after [`start`](Self::start)).
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Server `i`.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn server(&self, i: usize) -> &RedisServer {
        &self.servers[i]
    }

    /// Server `i`, mutably (to kill, stop or restart it).
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn server_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.servers[i]
    }

    /// All servers.
    pub fn servers(&self) -> &[RedisServer] {
        &self.servers
    }

    /// Kill server `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Pause server `i` with SIGSTOP.
    pub fn stop(&mut self, i: usize) {
        self.servers[i].stop();
    }

    /// Resume server `i` with SIGCONT.
    pub fn cont(&mut self, i: usize) {
        self.servers[i].cont();
    }

    /// Restart server `i` on its port (empty: no persistence).
    pub fn restart(&mut self, i: usize) {
        self.servers[i].restart();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another redis-server already listens on the port this fixture was given (another
    /// test process probed it free at the same moment): the fixture must not report a
    /// start while its own server died and the other one answers `PING`.
    #[test]
    fn a_port_served_by_another_redis_is_not_taken_for_ours() {
        assert!(redis_available(), "redis-server is needed");
        let other = RedisServer::start();
        let mut ours = RedisServer {
            port: other.port(),
            tls_port: free_port(),
            options: RedisServerOptions::default(),
            dir: tempfile::Builder::new()
                .prefix("baton-redis-")
                .tempdir()
                .unwrap(),
            child: None,
        };
        ours.spawn();
        let started = ours.wait_started();
        std::thread::sleep(Duration::from_millis(500));
        let running = ours.is_running();
        assert!(
            started.is_err() || running,
            "wait_started said {started:?}, yet our redis-server is gone and port {} is \
             another process's; our log:\n{}",
            ours.port,
            ours.log_tail(5)
        );
    }

    #[test]
    fn a_tls_server_starts() {
        let pki = crate::TestPki::generate();
        let mut redis = RedisServer::start_with(RedisServerOptions::new().with_tls(&pki));
        assert!(redis.is_running() && redis.owns_ports());
    }
}
