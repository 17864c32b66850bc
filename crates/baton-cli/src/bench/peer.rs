//! Peers: other implementations run through the same scenarios, on the same backend, in the
//! same run.
//!
//! - `etcd-lock-api`: etcd's own Lock and Election gRPC services (server-side Go
//!   `concurrency.Mutex` and `concurrency.Election`), called through the etcd-client crate,
//!   with a lease kept alive the way Go's clientv3 does it (a keep-alive every TTL/3 on a
//!   keep-alive stream). `--namespace` goes before every lock and election name; the peer
//!   connects over plain HTTP without logging in, and refuses the options for TLS and
//!   authentication rather than ignore them.
//!
//! - `rslock`: the rslock crate's Redlock, on `redis://` and `redlock://` (in
//!   [`super::redis`]).
//!
//! A new peer is a variant of [`Peer`] and an implementation of [`Target`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client as ec;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::target::{Counters, Failure, Held, Result, Target, Worker};
use crate::cli::Global;
use crate::exit::CliError;

/// The peers `--peer` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Peer {
    /// etcd's Lock and Election RPCs via the etcd-client crate.
    #[value(name = "etcd-lock-api")]
    EtcdLockApi,
    /// The rslock crate (Redlock), on redis:// or redlock://.
    #[value(name = "rslock")]
    Rslock,
}

impl Peer {
    /// Why the peer cannot run `scenario`, if it cannot: checked before any run, so that
    /// it is not found out only after Baton's whole run.
    pub(crate) fn cannot_run(self, scenario: super::Scenario) -> Option<&'static str> {
        match (self, scenario) {
            (Peer::Rslock, super::Scenario::Handover) => {
                Some("rslock has no leader election: run bench handover without --peer rslock")
            }
            _ => None,
        }
    }

    /// Connect the peer to the backend named by `--endpoints`.
    pub(crate) async fn connect(
        self,
        global: &Global,
        ttl: Duration,
    ) -> std::result::Result<Box<dyn Target>, CliError> {
        match self {
            Peer::EtcdLockApi => {
                let urls = etcd_urls(&global.endpoints).ok_or_else(|| {
                    CliError::failed(
                        "--peer etcd-lock-api needs etcd endpoints (http://… or etcd://…)",
                    )
                })?;
                if let Some(option) = etcd_lock_api_cannot_apply(global) {
                    return Err(CliError::failed(format!(
                        "--peer etcd-lock-api connects without TLS or authentication: run it \
                         without {option}, on a server that does not need them"
                    )));
                }
                let target =
                    EtcdLockApi::connect(urls, global.dial_timeout, ttl, global.namespace.clone())
                        .await
                        .map_err(|e| CliError::failed(format!("etcd-lock-api: {}", e.0)))?;
                Ok(Box::new(target))
            }
            Peer::Rslock => Ok(Box::new(super::redis::Rslock::connect(global, ttl).await?)),
        }
    }
}

/// The first option given that the etcd-lock-api peer cannot apply (it connects over plain
/// HTTP, without logging in), if any.
fn etcd_lock_api_cannot_apply(global: &Global) -> Option<&'static str> {
    if global.user.is_some() {
        Some("--user")
    } else if global.password_file.is_some() {
        Some("--password-file")
    } else if global.endpoints.contains('@') {
        Some("a user in the endpoint URL")
    } else if global.endpoints.trim().starts_with("https://") {
        Some("https:// endpoints")
    } else if global.cacert.is_some() {
        Some("--cacert")
    } else if global.cert.is_some() {
        Some("--cert and --key")
    } else {
        None
    }
}

/// etcd member URLs from `--endpoints`, or `None` if they are not etcd's.
fn etcd_urls(endpoints: &str) -> Option<Vec<String>> {
    let endpoints = endpoints.trim();
    if let Some(rest) = endpoints.strip_prefix("etcd://") {
        return Some(
            rest.split(',')
                .map(|h| format!("http://{}", h.trim().trim_end_matches('/')))
                .collect(),
        );
    }
    let urls: Vec<String> = endpoints
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .collect();
    urls.iter()
        .all(|u| u.starts_with("http://") || u.starts_with("https://"))
        .then_some(urls)
}

/// The etcd server's version, if the backend is etcd and answers.
pub(crate) async fn server_version(global: &Global, backend: &str) -> Option<String> {
    if backend != "etcd" {
        return None;
    }
    let urls = etcd_urls(&global.endpoints)?;
    let options = ec::ConnectOptions::new().with_connect_timeout(global.dial_timeout);
    let mut client = ec::Client::connect(urls, Some(options)).await.ok()?;
    let status = tokio::time::timeout(global.dial_timeout, client.status())
        .await
        .ok()?
        .ok()?;
    Some(status.version().to_string())
}

/// etcd's Lock and Election services.
pub(crate) struct EtcdLockApi {
    urls: Vec<String>,
    dial_timeout: Duration,
    /// The leases' TTL, whole seconds; a keep-alive goes every third of it.
    ttl: Duration,
    admin: ec::Client,
    keep_alives: Arc<AtomicU64>,
    /// `--namespace`, put before every lock and election name (as Go's `namespace` package
    /// does for a client's keys).
    namespace: String,
}

impl EtcdLockApi {
    async fn connect(
        urls: Vec<String>,
        dial_timeout: Duration,
        ttl: Duration,
        namespace: String,
    ) -> Result<Self> {
        let admin = connect(&urls, dial_timeout).await?;
        Ok(EtcdLockApi {
            urls,
            dial_timeout,
            // etcd grants whole seconds: rounded up, as Baton's session does, not down.
            ttl: super::lease_ttl(ttl),
            admin,
            keep_alives: Arc::default(),
            namespace,
        })
    }
}

async fn connect(urls: &[String], dial_timeout: Duration) -> Result<ec::Client> {
    let options = ec::ConnectOptions::new().with_connect_timeout(dial_timeout);
    Ok(ec::Client::connect(urls, Some(options)).await?)
}

#[async_trait]
impl Target for EtcdLockApi {
    fn name(&self) -> &'static str {
        "etcd-lock-api"
    }

    fn backend(&self) -> &'static str {
        "etcd"
    }

    async fn worker(&self) -> Result<Box<dyn Worker>> {
        let mut client = connect(&self.urls, self.dial_timeout).await?;
        let ttl_secs = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = client.lease_grant(ttl_secs, None).await?.id();
        let (keeper, stream) = client.lease_keep_alive(lease).await?;
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        tokio::spawn(keep_alive(
            keeper,
            stream,
            self.ttl / 3,
            lost.clone(),
            stop.clone(),
            self.keep_alives.clone(),
        ));
        Ok(Box::new(EtcdWorker {
            client,
            lease,
            lost,
            stop,
            namespace: self.namespace.clone(),
        }))
    }

    async fn revoke(&self, held: &dyn Held) -> Result<()> {
        self.admin.clone().lease_revoke(held.lease()).await?;
        Ok(())
    }

    async fn queued(&self, name: &str) -> Result<usize> {
        let prefix = format!("{}{name}/", self.namespace);
        let resp = self
            .admin
            .clone()
            .get(prefix.clone(), Some(ec::GetOptions::new().with_prefix()))
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter(|kv| !kv.key()[prefix.len()..].contains(&b'/'))
            .count())
    }

    fn counters(&self) -> Counters {
        Counters {
            keep_alives: self.keep_alives.load(Ordering::Relaxed),
            wakeups: None,
            watches_opened: None,
        }
    }

    fn lost_note(&self) -> Option<&'static str> {
        Some(
            "etcd's Lock API has no loss notification; measured instead: the time until the \
             lease's keep-alive stream (a keep-alive every TTL/3, as Go's clientv3 sends them) \
             answers TTL 0, which is when Go's Session.Done() fires",
        )
    }
}

/// Keep the lease alive as Go's clientv3 does: a keep-alive every TTL/3 on one stream. The
/// holder learns that the lease is gone only from a keep-alive answer with TTL 0 (when Go's
/// `Session.Done()` closes), or when the stream breaks.
async fn keep_alive(
    mut keeper: ec::LeaseKeeper,
    mut stream: ec::LeaseKeepAliveStream,
    interval: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
    sent: Arc<AtomicU64>,
) {
    // As Go's lessor: the channel closes (Done()) once the deadline, the last answer plus
    // its TTL, passes without an answer (lease.go deadlineLoop), even if the server is
    // silent.
    let mut deadline = tokio::time::Instant::now() + interval * 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        sent.fetch_add(1, Ordering::Relaxed);
        let answer = async {
            keeper.keep_alive().await.ok()?;
            match stream.message().await {
                Ok(Some(r)) if r.ttl() > 0 => Some(r.ttl()),
                _ => None,
            }
        };
        let alive = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => false,
            a = answer => match a {
                Some(ttl) => {
                    deadline = tokio::time::Instant::now()
                        + Duration::from_secs(u64::try_from(ttl).unwrap_or(0));
                    true
                }
                None => false,
            },
        };
        if !alive {
            lost.cancel();
            return;
        }
    }
}

struct EtcdWorker {
    client: ec::Client,
    lease: i64,
    lost: CancellationToken,
    stop: CancellationToken,
    namespace: String,
}

#[async_trait]
impl Worker for EtcdWorker {
    async fn lock(&self, name: &str) -> Result<Box<dyn Held>> {
        let mut client = self.client.clone();
        let resp = tokio::select! {
            r = client.lock(
                format!("{}{name}", self.namespace),
                Some(ec::LockOptions::new().with_lease(self.lease)),
            ) => r?,
            // As Go's Mutex.Lock with the session's context: the wait ends with the session.
            _ = self.lost.cancelled() => return Err(Failure("session lost".into())),
        };
        Ok(Box::new(EtcdHeld {
            client,
            lease: self.lease,
            lost: self.lost.clone(),
            what: What::Lock(resp.key().to_vec()),
        }))
    }

    async fn campaign(&self, name: &str, value: &str) -> Result<Box<dyn Held>> {
        let mut client = self.client.clone();
        let mut resp = tokio::select! {
            r = client.campaign(format!("{}{name}", self.namespace), value, self.lease) => r?,
            _ = self.lost.cancelled() => return Err(Failure("session lost".into())),
        };
        let leader = resp
            .take_leader()
            .ok_or_else(|| Failure("campaign answered without a leader key".into()))?;
        Ok(Box::new(EtcdHeld {
            client,
            lease: self.lease,
            lost: self.lost.clone(),
            what: What::Lead(leader),
        }))
    }

    async fn close(&self) {
        self.stop.cancel();
        let mut client = self.client.clone();
        let _ = tokio::time::timeout(crate::cli::RELEASE_TIMEOUT, client.lease_revoke(self.lease))
            .await;
    }
}

enum What {
    Lock(Vec<u8>),
    Lead(ec::LeaderKey),
}

struct EtcdHeld {
    client: ec::Client,
    lease: i64,
    lost: CancellationToken,
    what: What,
}

#[async_trait]
impl Held for EtcdHeld {
    fn lease(&self) -> i64 {
        self.lease
    }

    fn lost(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.lost.cancelled())
    }

    async fn release(self: Box<Self>) -> Result<()> {
        let mut client = self.client;
        match self.what {
            What::Lock(key) => {
                client.unlock(key).await?;
            }
            What::Lead(leader) => {
                client
                    .resign(Some(ec::ResignOptions::new().with_leader(leader)))
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_to_urls() {
        assert_eq!(
            etcd_urls("http://a:1,http://b:2/"),
            Some(vec!["http://a:1".to_string(), "http://b:2".to_string()])
        );
        assert_eq!(
            etcd_urls("etcd://a:1,b:2"),
            Some(vec!["http://a:1".to_string(), "http://b:2".to_string()])
        );
        assert_eq!(etcd_urls("mem://"), None);
        assert_eq!(etcd_urls("redis://x:6379"), None);
    }

    /// A TTL with a fraction of a second gives the peer's lease the TTL rounded up, as
    /// Baton's session does (etcd grants whole seconds), not rounded down.
    #[tokio::test]
    async fn the_lease_ttl_is_rounded_up_to_whole_seconds() {
        assert!(baton_testkit::etcd_available(), "etcd is needed");
        let etcd = baton_testkit::EtcdServer::start();
        let peer = EtcdLockApi::connect(
            vec![etcd.endpoint()],
            Duration::from_secs(5),
            Duration::from_millis(2500),
            String::new(),
        )
        .await
        .unwrap();
        let worker = peer.worker().await.unwrap();
        let held = worker.lock("ttl-probe").await.unwrap();
        let ttl = peer
            .admin
            .clone()
            .lease_time_to_live(held.lease(), None)
            .await
            .unwrap();
        assert_eq!(ttl.granted_ttl(), 3);
        held.release().await.unwrap();
        worker.close().await;
    }

    /// Go's clientv3 closes a lease's keep-alive channel (Session.Done()) once the lease's
    /// deadline (the last keep-alive answer plus the TTL) passes, even when the server
    /// answers nothing (lease.go deadlineLoop). The peer claims to keep its lease "the way
    /// Go's clientv3 does it", but its keep-alive loop waits for an answer forever: against
    /// a stalled server, the peer's `lost()` never fires, and `bench lost`/`contended` with
    /// --peer etcd-lock-api hang until the server comes back.
    #[tokio::test]
    async fn the_peer_is_told_of_the_loss_when_the_server_stalls() {
        assert!(baton_testkit::etcd_available(), "etcd is needed");
        let mut etcd = baton_testkit::EtcdServer::start();
        let peer = EtcdLockApi::connect(
            vec![etcd.endpoint()],
            Duration::from_secs(5),
            Duration::from_secs(2),
            String::new(),
        )
        .await
        .unwrap();
        let worker = peer.worker().await.unwrap();
        let held = worker.lock("stall-probe").await.unwrap();
        etcd.stop();
        // Go: Done() closes at most TTL (2 s) after the last answered keep-alive.
        let told = tokio::time::timeout(Duration::from_secs(6), held.lost()).await;
        etcd.cont();
        assert!(
            told.is_ok(),
            "the peer's lost() did not fire within 3x the TTL of a stalled server"
        );
    }
}
