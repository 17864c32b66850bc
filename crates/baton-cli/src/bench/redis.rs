//! Targets on Redis (`redis://`, `redlock://`): Baton's Redis family ([`RedisTarget`]) and
//! the rslock crate ([`Rslock`], `--peer rslock`).
//!
//! Both end a hold from outside the way an operator would: `DEL` of the lock key on every
//! server.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::target::{Counters, Failure, Held, Result, Target, Worker};
use crate::cli::{self, Global};
use crate::exit::CliError;

/// One plain connection per server, for what the bench does from outside: `DEL`, `PUBSUB
/// NUMSUB`, `INFO`.
#[derive(Clone)]
pub(crate) struct Admin {
    conns: Vec<redis::aio::MultiplexedConnection>,
}

/// What `--cacert`, `--cert` and `--key` name, read: the TLS settings of the bench's own
/// connections to `rediss://` servers, the same as Baton's.
#[derive(Clone, Default)]
pub(crate) struct TlsFiles {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    /// Read the files the global options name.
    pub(crate) fn read(global: &Global) -> Result<TlsFiles> {
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path)
                .map_err(|e| Failure(format!("cannot read the {what} {}: {e}", path.display())))
        };
        Ok(TlsFiles {
            ca: global
                .cacert
                .as_deref()
                .map(|p| read(p, "CA certificate"))
                .transpose()?,
            identity: match (&global.cert, &global.key) {
                (Some(cert), Some(key)) => {
                    Some((read(cert, "client certificate")?, read(key, "client key")?))
                }
                _ => None,
            },
        })
    }

    /// A client for `url`: with these settings if it is `rediss://`.
    fn client(&self, url: &str) -> Result<redis::Client> {
        if !url.starts_with("rediss://") {
            return Ok(redis::Client::open(url)?);
        }
        Ok(redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: self.identity.clone().map(|(client_cert, client_key)| {
                    redis::ClientTlsConfig {
                        client_cert,
                        client_key,
                    }
                }),
                root_cert: self.ca.clone(),
            },
        )?)
    }
}

impl Admin {
    /// Connect to the servers named by `endpoints` (`redis://…` or `redlock://h:p,…`, with
    /// the credentials in the URLs: see [`cli::redis_endpoints`]), over TLS with `tls` for
    /// `rediss://`. Redlock works while a majority of its masters is up, and so does the
    /// bench: the servers that cannot be reached are named on stderr and left out of what
    /// the bench does from outside; fewer than a majority is an error naming them.
    pub(crate) async fn connect(
        endpoints: &str,
        dial_timeout: Duration,
        tls: &TlsFiles,
    ) -> Result<Admin> {
        let urls = node_urls(endpoints)?;
        let mut conns = Vec::new();
        let mut down = Vec::new();
        for url in &urls {
            let conn = async {
                let client = tls.client(url)?;
                tokio::time::timeout(dial_timeout, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| Failure(format!("no answer within {dial_timeout:?}")))?
                    .map_err(Failure::from)
            };
            match conn.await {
                Ok(conn) => conns.push(conn),
                Err(e) => down.push(format!("{}: {}", redacted(url), e.0)),
            }
        }
        if conns.len() < urls.len() / 2 + 1 {
            return Err(Failure(format!(
                "cannot connect to {} of {} Redis servers ({})",
                down.len(),
                urls.len(),
                down.join("; ")
            )));
        }
        for d in &down {
            eprintln!("bench: {d}: left out (a majority of the masters is up)");
        }
        Ok(Admin { conns })
    }

    /// `DEL key` on every server.
    async fn delete(&self, key: &str) -> Result<()> {
        for conn in &self.conns {
            let mut conn = conn.clone();
            redis::cmd("DEL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await?;
        }
        Ok(())
    }

    /// Delete, on every server, the keys of the locks and elections named `keys` (full
    /// keys, the namespace included): each key itself and Baton's keys for it that do not
    /// expire (`baton:fence:`, `baton:leader:`, `baton:queue:` before the key). A waiter's
    /// place (`baton:waiter:`) and a release's marker (`baton:released:`) expire on their
    /// own. Work in proportion to the run, never to the server's key space (a `SCAN`
    /// walked a production server's every key).
    async fn delete_keys(&self, keys: &[String]) -> Result<()> {
        let all: Vec<String> = keys
            .iter()
            .flat_map(|key| {
                std::iter::once(key.clone())
                    .chain(FAMILIES.iter().map(move |family| format!("{family}{key}")))
            })
            .collect();
        for conn in &self.conns {
            let mut conn = conn.clone();
            for chunk in all.chunks(1000) {
                redis::cmd("DEL")
                    .arg(chunk)
                    .query_async::<i64>(&mut conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// End `held` from outside as an operator would: `DEL` of its key, under `namespace`
    /// (the key a guard reports is relative to it), on every server.
    async fn delete_held(&self, namespace: &str, held: &dyn Held) -> Result<()> {
        let key = held
            .key()
            .ok_or_else(|| Failure("the hold has no key".into()))?;
        self.delete(&format!("{namespace}{key}")).await
    }

    /// Whether `key` exists on any server, and the most subscribers `channel` has on one.
    async fn held_and_subscribers(&self, key: &str, channel: &str) -> Result<(bool, usize)> {
        let mut held = false;
        let mut subscribers = 0;
        for conn in &self.conns {
            let mut conn = conn.clone();
            let exists: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut conn).await?;
            held |= exists > 0;
            let (_, n): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(channel)
                .query_async(&mut conn)
                .await?;
            subscribers = subscribers.max(usize::try_from(n).unwrap_or(0));
        }
        Ok((held, subscribers))
    }

    /// The first server's `redis_version`.
    pub(crate) async fn version(&self) -> Option<String> {
        let mut conn = self.conns.first()?.clone();
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_string())
    }
}

/// The prefixes of Baton's own keys for a lock key that never expire (see `baton::redis`'s
/// key layout); waiters' places and release markers expire, and the wake-up channel
/// (`baton:wake:`) is no key.
const FAMILIES: [&str; 3] = ["baton:fence:", "baton:leader:", "baton:queue:"];

/// The names a run locked or campaigned for, to delete their keys once it ends.
#[derive(Clone, Default)]
pub(crate) struct Names(Arc<StdMutex<BTreeSet<String>>>);

impl Names {
    fn add(&self, name: &str) {
        let mut names = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !names.contains(name) {
            names.insert(name.to_string());
        }
    }

    /// The names that start with `prefix`, each after `namespace`.
    fn keys(&self, namespace: &str, prefix: &str) -> Vec<String> {
        let names = self.0.lock().unwrap_or_else(|e| e.into_inner());
        names
            .iter()
            .filter(|n| n.starts_with(prefix))
            .map(|n| format!("{namespace}{n}"))
            .collect()
    }
}

/// `url` without the credentials it may carry, for messages.
fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            format!("{scheme}://{host}")
        }
        None => url.to_string(),
    }
}

/// `redis://h:p` URLs, one per server, from `--endpoints`.
fn node_urls(endpoints: &str) -> Result<Vec<String>> {
    let endpoints = endpoints.trim();
    let (scheme, rest) = endpoints
        .split_once("://")
        .ok_or_else(|| Failure(format!("not a Redis URL: {endpoints}")))?;
    let scheme = match scheme {
        "redis" | "redlock" => "redis",
        "rediss" => "rediss",
        other => return Err(Failure(format!("not a Redis URL scheme: {other}://"))),
    };
    Ok(rest
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|node| format!("{scheme}://{node}"))
        .collect())
}

/// Baton on Redis: every worker is its own [`baton::Coordinator`] (its own connections),
/// whose locks are kept alive by Baton's watchdog.
pub(crate) struct RedisTarget {
    global: Global,
    ttl: Duration,
    admin: Admin,
    backend: &'static str,
    /// The endpoints, credentials redacted.
    endpoints: String,
    /// The key prefix (`--namespace`).
    namespace: String,
    /// The names the run's workers used.
    names: Names,
}

impl RedisTarget {
    /// Connect the admin connections; workers connect on their own.
    pub(crate) async fn connect(
        global: &Global,
        ttl: Duration,
    ) -> std::result::Result<Self, CliError> {
        // One coordinator first: it validates the URL and the options, with the CLI's
        // errors.
        let probe = cli::coordinator(global, ttl).await?;
        let backend = probe.backend();
        let endpoints = probe
            .redis()
            .map(|r| r.endpoints().to_string())
            .unwrap_or_default();
        cli::close_coordinator(&probe).await;
        let tls = TlsFiles::read(global).map_err(|e| CliError::failed(e.0))?;
        let admin = Admin::connect(&cli::redis_endpoints(global)?, global.dial_timeout, &tls)
            .await
            .map_err(|e| CliError::failed(e.0))?;
        Ok(RedisTarget {
            global: global.clone(),
            ttl,
            admin,
            backend,
            endpoints,
            namespace: global.namespace.clone(),
            names: Names::default(),
        })
    }

    /// The endpoints, credentials redacted.
    pub(crate) fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// The admin connections.
    pub(crate) fn admin(&self) -> &Admin {
        &self.admin
    }
}

#[async_trait]
impl Target for RedisTarget {
    fn name(&self) -> &'static str {
        "baton"
    }

    fn backend(&self) -> &'static str {
        self.backend
    }

    async fn worker(&self) -> Result<Box<dyn Worker>> {
        let coordinator = cli::coordinator(&self.global, self.ttl)
            .await
            .map_err(|e| Failure(e.message().unwrap_or("cannot connect").to_string()))?;
        Ok(Box::new(CoordinatorWorker {
            coordinator,
            names: self.names.clone(),
        }))
    }

    async fn revoke(&self, held: &dyn Held) -> Result<()> {
        self.admin.delete_held(&self.namespace, held).await
    }

    /// The holder (if the key exists) plus the clients subscribed to the lock's wake-up
    /// channel: Baton's waiters.
    async fn queued(&self, name: &str) -> Result<usize> {
        let key = format!("{}{name}", self.namespace);
        let (held, waiting) = self
            .admin
            .held_and_subscribers(&key, &format!("baton:wake:{key}"))
            .await?;
        Ok(usize::from(held) + waiting)
    }

    fn counters(&self) -> Counters {
        Counters::default()
    }

    fn lost_note(&self) -> Option<&'static str> {
        Some(
            "on Redis, ending a hold from outside is DEL of the lock key; the holder learns \
             of it at its watchdog's next extend (every TTL/3)",
        )
    }

    /// The fencing counters (which never expire), election records and anything else the
    /// run's names left, under `--namespace`.
    async fn clean_up(&self, prefix: &str) -> Result<()> {
        self.admin
            .delete_keys(&self.names.keys(&self.namespace, prefix))
            .await
    }
}

struct CoordinatorWorker {
    coordinator: baton::Coordinator,
    names: Names,
}

#[async_trait]
impl Worker for CoordinatorWorker {
    async fn lock(&self, name: &str) -> Result<Box<dyn Held>> {
        self.names.add(name);
        let guard = self.coordinator.lock(name)?.lock().await?;
        Ok(Box::new(GuardHeld::new(guard)))
    }

    async fn campaign(&self, name: &str, value: &str) -> Result<Box<dyn Held>> {
        self.names.add(name);
        let leading = self
            .coordinator
            .election(name)?
            .campaign(value.as_bytes().to_vec())
            .await?;
        let guard: Box<dyn baton::coordinator::Guard> = leading;
        Ok(Box::new(GuardHeld::new(guard)))
    }

    async fn close(&self) {
        cli::close_coordinator(&self.coordinator).await;
    }
}

/// A hold through the backend-neutral traits.
struct GuardHeld {
    guard: Box<dyn baton::coordinator::Guard>,
    lost: CancellationToken,
    key: String,
}

impl GuardHeld {
    fn new(guard: Box<dyn baton::coordinator::Guard>) -> GuardHeld {
        GuardHeld {
            lost: guard.lost_token(),
            key: guard.key().to_string(),
            guard,
        }
    }
}

#[async_trait]
impl Held for GuardHeld {
    fn lease(&self) -> i64 {
        0
    }

    fn key(&self) -> Option<&str> {
        Some(&self.key)
    }

    fn lost(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.lost.cancelled())
    }

    async fn release(self: Box<Self>) -> Result<()> {
        Ok(self.guard.release().await?)
    }
}

/// The rslock crate (Redlock over one or more servers), used as its documentation shows:
/// `acquire` (which retries `lock`, itself 3 tries 0–200 ms apart, until it succeeds) and
/// `unlock`. rslock has no watchdog and no loss notification, so each hold runs the extend
/// loop a user would write: `extend` every TTL/3, lost when it fails.
pub(crate) struct Rslock {
    urls: Vec<String>,
    ttl: Duration,
    admin: Admin,
    backend: &'static str,
    /// The names the run's workers used.
    names: Names,
}

impl Rslock {
    /// Check the endpoints and connect the admin connections.
    pub(crate) async fn connect(
        global: &Global,
        ttl: Duration,
    ) -> std::result::Result<Self, CliError> {
        let fail = |e: Failure| CliError::failed(format!("rslock: {}", e.0));
        let backend = match global.endpoints.trim().split_once("://") {
            Some(("redis" | "rediss", _)) => "redis",
            Some(("redlock", _)) => "redlock",
            _ => {
                return Err(CliError::failed(
                    "--peer rslock needs Redis endpoints (redis://… or redlock://…)",
                ))
            }
        };
        if !global.namespace.is_empty() {
            return Err(CliError::failed(
                "--peer rslock cannot prefix its keys: run it without --namespace",
            ));
        }
        if global.cacert.is_some() || global.cert.is_some() {
            return Err(CliError::failed(
                "--peer rslock cannot take --cacert, --cert or --key: run it without them",
            ));
        }
        let endpoints = cli::redis_endpoints(global)?;
        let urls = node_urls(&endpoints).map_err(fail)?;
        let admin = Admin::connect(&endpoints, global.dial_timeout, &TlsFiles::default())
            .await
            .map_err(fail)?;
        Ok(Rslock {
            urls,
            ttl,
            admin,
            backend,
            names: Names::default(),
        })
    }
}

#[async_trait]
impl Target for Rslock {
    fn name(&self) -> &'static str {
        "rslock"
    }

    fn backend(&self) -> &'static str {
        self.backend
    }

    async fn worker(&self) -> Result<Box<dyn Worker>> {
        Ok(Box::new(RslockWorker {
            manager: rslock::LockManager::new(self.urls.clone()),
            ttl: self.ttl,
            names: self.names.clone(),
        }))
    }

    async fn revoke(&self, held: &dyn Held) -> Result<()> {
        self.admin.delete_held("", held).await
    }

    async fn queued(&self, _name: &str) -> Result<usize> {
        Err(Failure(
            "rslock keeps no queue: its waiters poll with sleeps".into(),
        ))
    }

    fn counters(&self) -> Counters {
        Counters::default()
    }

    fn lost_note(&self) -> Option<&'static str> {
        Some(
            "rslock has no loss notification; measured instead: the time until an extend \
             loop (every TTL/3, as a user would write it) fails",
        )
    }

    /// The lock keys of holds cut short (rslock's keys have no other families).
    async fn clean_up(&self, prefix: &str) -> Result<()> {
        self.admin.delete_keys(&self.names.keys("", prefix)).await
    }
}

struct RslockWorker {
    manager: rslock::LockManager,
    ttl: Duration,
    names: Names,
}

#[async_trait]
impl Worker for RslockWorker {
    async fn lock(&self, name: &str) -> Result<Box<dyn Held>> {
        self.names.add(name);
        let lock = self
            .manager
            .acquire_no_guard(name.as_bytes(), self.ttl)
            .await
            .map_err(|e| Failure(format!("rslock acquire: {e:?}")))?;
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let lock = Arc::new(tokio::sync::Mutex::new(lock));
        tokio::spawn(extend_loop(
            self.manager.clone(),
            lock.clone(),
            self.ttl,
            lost.clone(),
            stop.clone(),
        ));
        Ok(Box::new(RslockHeld {
            manager: self.manager.clone(),
            lock,
            key: name.to_string(),
            lost,
            stop,
        }))
    }

    async fn campaign(&self, _name: &str, _value: &str) -> Result<Box<dyn Held>> {
        Err(Failure("rslock has no leader election".into()))
    }

    async fn close(&self) {}
}

/// Extend every TTL/3 until stopped; a failed extend is the loss.
async fn extend_loop(
    manager: rslock::LockManager,
    lock: Arc<tokio::sync::Mutex<rslock::Lock>>,
    ttl: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let mut current = lock.lock().await;
        tokio::select! {
            _ = stop.cancelled() => return,
            extended = manager.extend(&current, ttl) => match extended {
                Ok(next) => *current = next,
                Err(_) => {
                    lost.cancel();
                    return;
                }
            },
        }
    }
}

struct RslockHeld {
    manager: rslock::LockManager,
    lock: Arc<tokio::sync::Mutex<rslock::Lock>>,
    key: String,
    lost: CancellationToken,
    stop: CancellationToken,
}

#[async_trait]
impl Held for RslockHeld {
    fn lease(&self) -> i64 {
        0
    }

    fn key(&self) -> Option<&str> {
        Some(&self.key)
    }

    fn lost(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.lost.cancelled())
    }

    async fn release(self: Box<Self>) -> Result<()> {
        self.stop.cancel();
        let lock = self.lock.lock().await;
        self.manager.unlock(&lock).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_to_node_urls() {
        assert_eq!(
            node_urls("redis://a:1").unwrap(),
            ["redis://a:1".to_string()]
        );
        assert_eq!(
            node_urls("redlock://a:1, b:2,c:3").unwrap(),
            ["redis://a:1", "redis://b:2", "redis://c:3"].map(String::from)
        );
        assert!(node_urls("http://a:1").is_err());
    }

    #[test]
    fn the_run_deletes_the_keys_of_its_own_names_only() {
        let names = Names::default();
        for n in ["run1/a", "run1/b", "run1/a", "run2/a", "run10/a"] {
            names.add(n);
        }
        assert_eq!(names.keys("ns/", "run1/"), ["ns/run1/a", "ns/run1/b"]);
        assert_eq!(names.keys("", "run2/"), ["run2/a"]);
        assert!(names.keys("", "run3/").is_empty());
    }

    #[test]
    fn node_urls_are_named_without_credentials() {
        assert_eq!(redacted("redis://u:secret@h:1"), "redis://h:1");
        assert_eq!(redacted("rediss://:p@w@h:1/2"), "rediss://h:1/2");
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
    }
}
