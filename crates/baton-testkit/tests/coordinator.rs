//! The [`Coordinator`] behaves alike on etcd and Redis when the backend goes away: these
//! cases were found by a review to differ, or to contradict the docs.

use std::time::{Duration, Instant};

use baton::{Coordinator, Error};
use baton_testkit::{EtcdServer, RedisServer};

/// The backend under test, which the test can kill.
enum Server {
    Etcd(EtcdServer),
    Redis(RedisServer),
}

impl Server {
    async fn start(etcd: bool) -> Server {
        if etcd {
            Server::Etcd(EtcdServer::start_async().await)
        } else {
            Server::Redis(RedisServer::start_async().await)
        }
    }

    fn url(&self) -> String {
        match self {
            Server::Etcd(s) => s.endpoint(),
            Server::Redis(s) => s.url(),
        }
    }

    fn kill(&mut self) {
        match self {
            Server::Etcd(s) => s.kill(),
            Server::Redis(s) => s.kill(),
        }
    }
}

/// A hold known lost, released with its backend gone: `NotHeld` at once, as the `Guard`
/// docs say, not a retryable `Unavailable` after a request timeout (etcd 9.9 s, Redis
/// 150 ms before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_a_hold_known_lost_says_not_held_at_once() {
    for etcd in [true, false] {
        let mut server = Server::start(etcd).await;
        let coord = Coordinator::builder(&server.url())
            .with_ttl(Duration::from_secs(2))
            .connect()
            .await
            .unwrap();
        let guard = coord.lock("gone").unwrap().lock().await.unwrap();
        let token = guard.lost_token();
        server.kill();
        tokio::time::timeout(Duration::from_secs(10), token.cancelled())
            .await
            .expect("the hold was not lost with its backend gone");
        let started = Instant::now();
        let released = guard.release().await;
        assert!(
            matches!(released, Err(Error::NotHeld { .. })),
            "etcd {etcd}: {released:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "etcd {etcd}: release took {:?}",
            started.elapsed()
        );
    }
}
