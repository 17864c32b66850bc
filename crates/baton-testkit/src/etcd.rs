//! Real etcd servers on loopback: [`EtcdServer`] (one member) and [`EtcdCluster`].
//!
//! Each member runs the `etcd` binary ([`etcd_bin`]) on free loopback ports, with its data
//! in a temporary directory and its log in a file there (never on the terminal). Starting
//! waits until the member reports itself healthy (`GET /health`, which needs a leader and a
//! quorum read); a start that fails panics with the end of the log. Members are killed with
//! SIGKILL and reaped on drop, and are killed by the kernel if the test process dies first.
//!
//! [`EtcdServer::start_with`] takes [`EtcdServerOptions`]: TLS on the client URL (with
//! certificates from [`TestPki`](crate::TestPki)), client certificate authentication, and a
//! short `--auth-token-ttl`; [`EtcdServer::enable_auth`] turns authentication on with a root
//! user and prefix-scoped users.
//!
//! All calls block the calling thread (starting takes about a second). That is fine in
//! `#[tokio::test]`s: the servers are separate processes.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::ports::free_port;
use crate::process;

/// How long a single member may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a cluster may take to become healthy.
const CLUSTER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times a start is retried with new ports after a port was taken.
const START_ATTEMPTS: usize = 5;
/// How many log lines a failure message shows.
const LOG_TAIL_LINES: usize = 40;

/// The `etcd` binary: `$BATON_ETCD_BIN`, else `/usr/bin/etcd`, else `etcd` on the `PATH`.
pub fn etcd_bin() -> Option<PathBuf> {
    find_bin("BATON_ETCD_BIN", "etcd")
}

/// The `etcdctl` binary: `$BATON_ETCDCTL_BIN`, else `/usr/bin/etcdctl`, else `etcdctl` on
/// the `PATH`.
pub fn etcdctl_bin() -> Option<PathBuf> {
    find_bin("BATON_ETCDCTL_BIN", "etcdctl")
}

fn find_bin(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let usr = Path::new("/usr/bin").join(name);
    if usr.is_file() {
        return Some(usr);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// True if the etcd binary ([`etcd_bin`]) exists and runs (`etcd --version` succeeds).
///
/// Tests call this first to fail or skip with a clear message instead of a spawn error.
pub fn etcd_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        etcd_bin().is_some_and(|bin| {
            Command::new(bin)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    })
}

/// A unique token for `--initial-cluster-token`, so that members of different test
/// clusters never join each other.
fn cluster_token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "baton-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Why a start attempt failed.
#[derive(Debug)]
enum StartError {
    /// A port was taken by someone else: retry with new ports.
    PortTaken,
    /// Anything else: give up.
    Failed(String),
}

/// How to start an [`EtcdServer`].
///
/// # Default
///
/// Plain `http://` client URL, no client certificates, etcd's own token TTL (300 s).
#[derive(Clone, Debug, Default)]
pub struct EtcdServerOptions {
    tls: Option<ServerTls>,
    client_cert_auth: bool,
    auth_token_ttl: Option<Duration>,
    max_txn_ops: Option<usize>,
}

#[derive(Clone, Debug)]
struct ServerTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// The client certificate etcdctl presents.
    client: (PathBuf, PathBuf),
}

impl EtcdServerOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serve clients over TLS (`https://`) with the server certificate of `pki`, trusting
    /// its CA for client certificates. [`EtcdServer::etcdctl`] then uses `pki`'s CA and client
    /// certificate. Keep `pki` alive as long as the server.
    pub fn with_tls(mut self, pki: &crate::TestPki) -> Self {
        self.tls = Some(ServerTls {
            ca: pki.ca_file(),
            cert: pki.server_cert_file(),
            key: pki.server_key_file(),
            client: (pki.client_cert_file(), pki.client_key_file()),
        });
        self
    }

    /// Require a client certificate signed by the CA (`--client-cert-auth`); needs
    /// [`with_tls`](Self::with_tls).
    pub fn with_client_cert_auth(mut self) -> Self {
        self.client_cert_auth = true;
        self
    }

    /// How long an auth token lives without being used (`--auth-token-ttl`, whole seconds,
    /// at least 1).
    pub fn with_auth_token_ttl(mut self, ttl: Duration) -> Self {
        self.auth_token_ttl = Some(ttl);
        self
    }

    /// Refuse transactions of more than `ops` operations (`--max-txn-ops`; etcd's default
    /// is 128).
    pub fn with_max_txn_ops(mut self, ops: usize) -> Self {
        self.max_txn_ops = Some(ops);
        self
    }
}

/// One etcd member on loopback.
///
/// # Examples
///
/// ```no_run
/// let etcd = baton_testkit::EtcdServer::start();
/// println!("etcd listens on {}", etcd.endpoint());
/// ```
pub struct EtcdServer {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// A plain-HTTP port for /health and /metrics when clients use TLS.
    metrics_port: u16,
    options: EtcdServerOptions,
    /// `user:password` etcdctl uses once authentication is enabled.
    root: Mutex<Option<String>>,
    initial_cluster: String,
    token: String,
    dir: TempDir,
    child: Option<Child>,
}

impl std::fmt::Debug for EtcdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdServer")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint())
            .field("peer_port", &self.peer_port)
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl EtcdServer {
    /// Start a one-member cluster and wait until it is healthy.
    ///
    /// # Panics
    ///
    /// If etcd is missing, or does not become healthy within 20 s; the message shows the
    /// end of its log.
    pub fn start() -> EtcdServer {
        EtcdServer::start_with(EtcdServerOptions::default())
    }

    /// Start a one-member cluster with `options` (TLS, token TTL) and wait until it is
    /// healthy.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn start_with(options: EtcdServerOptions) -> EtcdServer {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let (client_port, peer_port) = (free_port(), free_port());
            let name = "baton0".to_string();
            let initial_cluster = format!("{name}={}", url(peer_port));
            let mut server = EtcdServer::new(name, client_port, peer_port, initial_cluster);
            server.options = options.clone();
            server.spawn();
            match server.wait_started(START_TIMEOUT) {
                Ok(()) => return server,
                Err(StartError::PortTaken) => {
                    last = server.log_tail(LOG_TAIL_LINES);
                    tracing::debug!(client_port, peer_port, "etcd port taken; retrying");
                }
                Err(StartError::Failed(why)) => panic!("{why}"),
            }
        }
        panic!(
            "etcd could not bind free ports in {START_ATTEMPTS} attempts; last log lines:\n{last}"
        )
    }

    /// Like [`start`](Self::start), from async code: runs on tokio's blocking pool.
    pub async fn start_async() -> EtcdServer {
        EtcdServer::start_with_async(EtcdServerOptions::default()).await
    }

    /// Like [`start_with`](Self::start_with), from async code.
    pub async fn start_with_async(options: EtcdServerOptions) -> EtcdServer {
        match tokio::task::spawn_blocking(move || EtcdServer::start_with(options)).await {
            Ok(server) => server,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    fn new(name: String, client_port: u16, peer_port: u16, initial_cluster: String) -> Self {
        let dir = match tempfile::Builder::new().prefix("baton-etcd-").tempdir() {
            Ok(dir) => dir,
            Err(e) => panic!("cannot create a temporary directory for etcd: {e}"),
        };
        EtcdServer {
            name,
            client_port,
            peer_port,
            metrics_port: free_port(),
            options: EtcdServerOptions::default(),
            root: Mutex::new(None),
            initial_cluster,
            token: cluster_token(),
            dir,
            child: None,
        }
    }

    fn command(&self) -> Command {
        let Some(bin) = etcd_bin() else {
            panic!("etcd not found: install etcd (Debian: apt-get install etcd-server) or set BATON_ETCD_BIN");
        };
        let mut command = Command::new(bin);
        // etcd reads ETCD_* variables as flags; do not let the environment change them.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD") {
                command.env_remove(key);
            }
        }
        let client = self.endpoint();
        let peer = url(self.peer_port);
        let mut args: Vec<OsString> = vec![
            "--name".into(),
            self.name.clone().into(),
            "--data-dir".into(),
            self.data_dir().into(),
            "--listen-client-urls".into(),
            client.clone().into(),
            "--advertise-client-urls".into(),
            client.into(),
            "--listen-peer-urls".into(),
            peer.clone().into(),
            "--initial-advertise-peer-urls".into(),
            peer.into(),
            "--initial-cluster".into(),
            self.initial_cluster.clone().into(),
            "--initial-cluster-token".into(),
            self.token.clone().into(),
            "--initial-cluster-state".into(),
            "new".into(),
            "--logger".into(),
            "zap".into(),
            "--log-outputs".into(),
            "stderr".into(),
            "--log-level".into(),
            "warn".into(),
        ];
        if let Some(tls) = &self.options.tls {
            args.extend([
                "--cert-file".into(),
                tls.cert.clone().into(),
                "--key-file".into(),
                tls.key.clone().into(),
                "--listen-metrics-urls".into(),
                url(self.metrics_port).into(),
            ]);
            // etcd 3.4 asks every client for a certificate once it has a trusted CA file.
            if self.options.client_cert_auth {
                args.extend([
                    "--trusted-ca-file".into(),
                    tls.ca.clone().into(),
                    "--client-cert-auth".into(),
                ]);
            }
        }
        if let Some(ttl) = self.options.auth_token_ttl {
            args.push("--auth-token-ttl".into());
            args.push(ttl.as_secs().max(1).to_string().into());
        }
        if let Some(ops) = self.options.max_txn_ops {
            args.push("--max-txn-ops".into());
            args.push(ops.to_string().into());
        }
        command.args(args);
        command
    }

    /// Start the process (no waiting). Its output goes to the log file.
    fn spawn(&mut self) {
        let log = match OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
        {
            Ok(log) => log,
            Err(e) => panic!(
                "cannot open the etcd log {}: {e}",
                self.log_path().display()
            ),
        };
        let (stdout, stderr) = match (log.try_clone(), log.try_clone()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => panic!("cannot duplicate the etcd log handle: {e}"),
        };
        if let Ok(mut log) = log.try_clone() {
            let _ = writeln!(
                log,
                "--- baton-testkit: starting {} (client {}, peer {})",
                self.name,
                url(self.client_port),
                url(self.peer_port)
            );
        }
        let mut command = self.command();
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        match process::spawn(command) {
            Ok(child) => {
                tracing::debug!(pid = child.id(), name = %self.name, client_port = self.client_port, "started etcd");
                self.child = Some(child);
            }
            Err(e) => panic!(
                "cannot start etcd ({}): {e}; install etcd or set BATON_ETCD_BIN",
                etcd_bin().unwrap_or_default().display()
            ),
        }
    }

    /// Wait until healthy; classify a failure.
    fn wait_started(&mut self, timeout: Duration) -> Result<(), StartError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Err(self.start_failure(format!("etcd exited with {status}")));
            }
            // Healthy, and it is our process that answers: another process may have
            // taken the port since it was found free (our etcd then exits, "address
            // already in use", and the next round sees it).
            if self.is_healthy() && self.owns_ports() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(
                    self.start_failure(format!("etcd did not become healthy within {timeout:?}"))
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// True if our own process listens on the client port (and the metrics port with TLS).
    fn owns_ports(&self) -> bool {
        let Some(pid) = self.pid() else { return false };
        process::listens_on(pid, self.client_port)
            && (self.options.tls.is_none() || process::listens_on(pid, self.metrics_port))
    }

    fn start_failure(&self, what: String) -> StartError {
        let tail = self.log_tail(LOG_TAIL_LINES);
        if tail.contains("address already in use") || tail.contains("address in use") {
            StartError::PortTaken
        } else {
            StartError::Failed(format!(
                "{what} (member {}, client {}, peer port {}, log {}); last log lines:\n{tail}",
                self.name,
                self.endpoint(),
                self.peer_port,
                self.log_path().display()
            ))
        }
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

    /// The client URL, `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        if self.options.tls.is_some() {
            format!("https://127.0.0.1:{}", self.client_port)
        } else {
            url(self.client_port)
        }
    }

    /// The port serving `/health` and `/metrics` over plain HTTP.
    fn http_port(&self) -> u16 {
        if self.options.tls.is_some() {
            self.metrics_port
        } else {
            self.client_port
        }
    }

    /// The client URL(s) in Baton's URL form; for one member the same as
    /// [`endpoint`](Self::endpoint).
    pub fn endpoints_url(&self) -> String {
        self.endpoint()
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The peer port.
    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// The member's name (`--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id, or `None` if the member is not running (killed or exited).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True if the process runs (possibly stopped with [`stop`](Self::stop)).
    pub fn is_running(&mut self) -> bool {
        self.exit_status();
        self.child.is_some()
    }

    /// The data directory (`--data-dir`), kept across [`restart`](Self::restart).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join(format!("{}.etcd", self.name))
    }

    /// The log file (etcd's stdout and stderr, appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
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
            tracing::debug!(name = %self.name, "killed etcd");
        }
    }

    /// Pause the process with SIGSTOP, and return once all its threads are stopped (at
    /// most 5 s). It keeps its sockets but answers nothing.
    ///
    /// # Panics
    ///
    /// If the member is not running.
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
    /// If the member is not running.
    pub fn cont(&mut self) {
        self.send(libc::SIGCONT, "SIGCONT");
    }

    fn send(&mut self, signal: libc::c_int, name: &str) {
        let Some(pid) = self.pid() else {
            panic!(
                "cannot send {name} to etcd member {}: not running",
                self.name
            );
        };
        if let Err(e) = process::signal(pid, signal) {
            panic!(
                "cannot send {name} to etcd member {} (pid {pid}): {e}",
                self.name
            );
        }
    }

    /// Kill the member if it runs, start it again with the same data directory and ports,
    /// and wait until it is healthy (which needs a quorum of its cluster).
    ///
    /// # Panics
    ///
    /// If it does not become healthy within 20 s.
    pub fn restart(&mut self) {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            self.restart_no_wait();
            match self.wait_started(START_TIMEOUT) {
                Ok(()) => return,
                Err(StartError::Failed(why)) => panic!("{why}"),
                // Someone holds the port for a moment (an old socket, or another process's
                // connection that was given it as its local port): try again.
                Err(StartError::PortTaken) if std::time::Instant::now() < deadline => {
                    tracing::debug!(name = %self.name, "etcd port taken on restart; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(StartError::PortTaken) => panic!(
                    "etcd member {} could not bind its ports again on restart; last log lines:\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL_LINES)
                ),
            }
        }
    }

    /// Kill the member if it runs and start it again with the same data directory and
    /// ports, without waiting for it to be healthy (for a member that cannot reach a
    /// quorum on its own).
    pub fn restart_no_wait(&mut self) {
        self.kill();
        self.spawn();
    }

    /// True if `GET /health` answers `{"health":"true"}` within a second.
    pub fn is_healthy(&self) -> bool {
        http_get(self.http_port(), "/health", Duration::from_secs(1))
            .is_some_and(|body| body.contains("\"health\":\"true\""))
    }

    /// Wait up to `timeout` for [`is_healthy`](Self::is_healthy).
    pub fn wait_healthy(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_healthy() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of a Prometheus metric without labels from `GET /metrics`, such as
    /// `etcd_server_is_leader` or `etcd_debugging_mvcc_watcher_total`. `None` if the
    /// member does not answer or has no such metric.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(self.http_port(), "/metrics", Duration::from_secs(1))?;
        body.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
            rest.trim().parse().ok()
        })
    }

    /// The sum of a Prometheus metric over every label set that contains all of `labels`
    /// (each `key="value"`), such as `grpc_server_handled_total` with
    /// `grpc_method="LeaseKeepAlive"`: over all its codes. `None` if the member does not
    /// answer.
    pub fn metric_sum(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let body = http_get(self.http_port(), "/metrics", Duration::from_secs(1))?;
        Some(
            body.lines()
                .filter_map(|line| {
                    let rest = line.strip_prefix(name)?.strip_prefix('{')?;
                    let (set, value) = rest.split_once("} ")?;
                    let all = labels.iter().all(|l| set.split(',').any(|s| s == *l));
                    all.then(|| value.trim().parse::<f64>().ok()).flatten()
                })
                .sum(),
        )
    }

    /// True if this member says it is the leader.
    pub fn is_leader(&self) -> bool {
        self.metric("etcd_server_is_leader") == Some(1.0)
    }

    /// Run `etcdctl --endpoints=<this member> ARGS` with `ETCDCTL_API=3` and return its
    /// output. With TLS, etcdctl trusts the test CA and presents the test client
    /// certificate; after [`enable_auth`](Self::enable_auth), it runs as root.
    ///
    /// # Panics
    ///
    /// If etcdctl cannot be started.
    pub fn etcdctl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut all: Vec<OsString> = Vec::new();
        if let Some(tls) = &self.options.tls {
            all.push(format!("--cacert={}", tls.ca.display()).into());
            all.push(format!("--cert={}", tls.client.0.display()).into());
            all.push(format!("--key={}", tls.client.1.display()).into());
        }
        if let Some(root) = self.root.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            all.push(format!("--user={root}").into());
        }
        all.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        etcdctl(&self.endpoint(), all)
    }

    /// Turn on authentication: a `root` user with `root_password`, and for each
    /// `(user, password, prefix)` a user whose only role (`USER-role`) may read and write the
    /// keys under `prefix`. From then on [`etcdctl`](Self::etcdctl) runs as root.
    ///
    /// # Panics
    ///
    /// If an etcdctl command fails; the message shows its output.
    pub fn enable_auth(&self, root_password: &str, users: &[(&str, &str, &str)]) {
        let run = |args: &[&str]| {
            let out = self.etcdctl(args);
            if !out.status.success() {
                panic!(
                    "etcdctl {} failed: {}{}",
                    args.first().copied().unwrap_or_default(),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        };
        run(&["user", "add", &format!("root:{root_password}")]);
        run(&["role", "add", "root"]);
        run(&["user", "grant-role", "root", "root"]);
        for (user, password, prefix) in users {
            let role = format!("{user}-role");
            run(&["user", "add", &format!("{user}:{password}")]);
            run(&["role", "add", &role]);
            run(&[
                "role",
                "grant-permission",
                &role,
                "readwrite",
                "--prefix=true",
                prefix,
            ]);
            run(&["user", "grant-role", user, &role]);
        }
        run(&["auth", "enable"]);
        *self.root.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(format!("root:{root_password}"));
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run `etcdctl --endpoints=ENDPOINTS ARGS` with `ETCDCTL_API=3`.
///
/// # Panics
///
/// If etcdctl cannot be started.
pub fn etcdctl<I, S>(endpoints: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let Some(bin) = etcdctl_bin() else {
        panic!("etcdctl not found: install etcd-client (Debian) or set BATON_ETCDCTL_BIN");
    };
    let mut command = Command::new(&bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCDCTL") {
            command.env_remove(key);
        }
    }
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .stdin(Stdio::null());
    match command.output() {
        Ok(output) => output,
        Err(e) => panic!("cannot run {}: {e}", bin.display()),
    }
}

/// A tiny HTTP/1.0 GET on loopback; the body, or `None` on any failure.
fn http_get(port: u16, path: &str, timeout: Duration) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/").then(|| body.to_string())
}

/// An etcd cluster of several members on loopback.
///
/// # Examples
///
/// ```no_run
/// let mut cluster = baton_testkit::EtcdCluster::start(3);
/// let leader = cluster.leader_index().expect("a leader");
/// cluster.kill(leader);
/// ```
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// Start `n` members that form one cluster, and wait until all are healthy.
    ///
    /// # Panics
    ///
    /// If `n` is 0, if etcd is missing, or if the cluster is not healthy within 30 s; the
    /// message shows the end of the failing member's log.
    pub fn start(n: usize) -> EtcdCluster {
        assert!(n > 0, "a cluster needs at least one member");
        for _ in 0..START_ATTEMPTS {
            let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
            let initial_cluster = ports
                .iter()
                .enumerate()
                .map(|(i, (_, peer))| format!("baton{i}={}", url(*peer)))
                .collect::<Vec<_>>()
                .join(",");
            let token = cluster_token();
            let mut members: Vec<EtcdServer> = ports
                .iter()
                .enumerate()
                .map(|(i, (client, peer))| {
                    let mut member = EtcdServer::new(
                        format!("baton{i}"),
                        *client,
                        *peer,
                        initial_cluster.clone(),
                    );
                    member.token = token.clone();
                    member
                })
                .collect();
            for member in &mut members {
                member.spawn();
            }
            let deadline = Instant::now() + CLUSTER_START_TIMEOUT;
            let mut outcome = Ok(());
            for member in &mut members {
                let left = deadline.saturating_duration_since(Instant::now());
                if let Err(e) = member.wait_started(left) {
                    outcome = Err(e);
                    break;
                }
            }
            match outcome {
                Ok(()) => return EtcdCluster { members },
                Err(StartError::PortTaken) => {
                    tracing::debug!("etcd cluster port taken; retrying");
                }
                Err(StartError::Failed(why)) => panic!("etcd cluster of {n} did not start: {why}"),
            }
        }
        panic!("etcd cluster could not bind free ports in {START_ATTEMPTS} attempts")
    }

    /// Like [`start`](Self::start), from async code: runs on tokio's blocking pool.
    pub async fn start_async(n: usize) -> EtcdCluster {
        match tokio::task::spawn_blocking(move || EtcdCluster::start(n)).await {
            Ok(cluster) => cluster,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True if the cluster has no members (never, after [`start`](Self::start)).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }

    /// Every member's client URL, comma-joined: Baton's URL form.
    pub fn endpoints_url(&self) -> String {
        self.endpoints().join(",")
    }

    /// Member `i`.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn member(&self, i: usize) -> &EtcdServer {
        &self.members[i]
    }

    /// Member `i`, mutably (to kill, stop or restart it).
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn member_mut(&mut self, i: usize) -> &mut EtcdServer {
        &mut self.members[i]
    }

    /// All members.
    pub fn members(&self) -> &[EtcdServer] {
        &self.members
    }

    /// Kill member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Pause member `i` with SIGSTOP.
    pub fn stop(&mut self, i: usize) {
        self.members[i].stop();
    }

    /// Resume member `i` with SIGCONT.
    pub fn cont(&mut self, i: usize) {
        self.members[i].cont();
    }

    /// Restart member `i` with its data and ports, and wait until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.members[i].restart();
    }

    /// The index of the member that says it is the leader, asking running members only.
    /// `None` if none does right now (an election is under way, or quorum is lost).
    pub fn leader_index(&self) -> Option<usize> {
        self.members
            .iter()
            .position(|m| m.child.is_some() && m.is_leader())
    }

    /// Wait up to `timeout` for a leader; its index.
    pub fn wait_for_leader(&self, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.leader_index() {
                return Some(i);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Make member `i` the leader (`etcdctl move-leader`, sent to the current leader), and
    /// wait up to 10 s until it says it is.
    ///
    /// # Panics
    ///
    /// If there is no leader, etcdctl fails, or member `i` does not become the leader.
    pub fn move_leader(&self, i: usize) {
        let leader = self
            .wait_for_leader(Duration::from_secs(10))
            .expect("no leader");
        if leader == i {
            return;
        }
        // `endpoint status -w simple`: "ENDPOINT, ID, VERSION, ...", the ID in hex.
        let status = self.members[i].etcdctl(["endpoint", "status", "-w", "simple"]);
        let text = String::from_utf8_lossy(&status.stdout).into_owned();
        let id = text
            .split(',')
            .nth(1)
            .map(str::trim)
            .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()))
            .unwrap_or_else(|| panic!("no member id in `endpoint status`: {text:?}"));
        let out = self.members[leader].etcdctl(["move-leader", id]);
        assert!(
            out.status.success(),
            "move-leader to member {i} ({id}) failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.members[i].is_leader() {
            assert!(
                Instant::now() < deadline,
                "member {i} did not become the leader"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run `etcdctl` against every member (see [`EtcdServer::etcdctl`]).
    pub fn etcdctl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        etcdctl(&self.endpoints_url(), args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another etcd (say, of another test process that probed the same "free" port at the
    /// same time) already serves the client port this member was given. Our etcd then
    /// dies with "address already in use", but the start must not be reported as a success
    /// with the other process answering in its place.
    #[test]
    fn a_client_port_served_by_another_etcd_is_not_taken_for_ours() {
        assert!(etcd_available(), "etcd is needed");
        let other = EtcdServer::start();
        let peer = free_port();
        let mut ours = EtcdServer::new(
            "baton0".into(),
            other.client_port(),
            peer,
            format!("baton0={}", url(peer)),
        );
        ours.spawn();
        let started = ours.wait_started(START_TIMEOUT);
        std::thread::sleep(Duration::from_secs(2));
        let running = ours.is_running();
        assert!(
            started.is_err() || running,
            "wait_started said {started:?}, yet our etcd is gone and {} is another process's; \
             our log:\n{}",
            ours.endpoint(),
            ours.log_tail(5)
        );
    }

    /// The same on restart: while the member was down another process took its client port.
    #[test]
    fn restart_onto_a_port_served_by_another_etcd_is_noticed() {
        assert!(etcd_available(), "etcd is needed");
        let mut ours = EtcdServer::start();
        ours.kill();
        let peer = free_port();
        let mut other = EtcdServer::new(
            "baton0".into(),
            ours.client_port(),
            peer,
            format!("baton0={}", url(peer)),
        );
        other.spawn();
        assert!(other.wait_started(START_TIMEOUT).is_ok());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ours.restart()));
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            outcome.is_err() || ours.is_running(),
            "restart() returned, yet our etcd is gone and {} is another process's",
            ours.endpoint()
        );
    }

    /// A TLS member serves /health on its metrics port: the ownership check covers both.
    #[test]
    fn a_tls_member_starts() {
        let pki = crate::TestPki::generate();
        let mut etcd = EtcdServer::start_with(EtcdServerOptions::new().with_tls(&pki));
        assert!(etcd.is_running() && etcd.owns_ports());
    }
}
