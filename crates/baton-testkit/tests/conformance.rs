//! The conformance suite (`baton_testkit::conformance`) on every store: the embedded store,
//! one real etcd node, and a real 3-node etcd cluster; and its backend-neutral cases
//! (`coordinator_*`) on one real Redis and on Redlock over 5 real Redis masters. The
//! embedded store, one etcd node and one Redis run it a second time through a namespace.

#![allow(clippy::unwrap_used, clippy::panic)]

use baton_testkit::conformance::{self, Backend};
use baton_testkit::{EtcdCluster, EtcdServer, RedisServer, RedisServers};

async fn mem() -> Backend {
    Backend::mem()
}

async fn etcd() -> Backend {
    let server = EtcdServer::start_async().await;
    Backend::new(server.endpoint(), server)
}

async fn etcd_cluster() -> Backend {
    let cluster = EtcdCluster::start_async(3).await;
    Backend::new(cluster.endpoints_url(), cluster)
}

async fn mem_namespaced() -> Backend {
    Backend::mem().with_namespace("team-a/")
}

async fn etcd_namespaced() -> Backend {
    etcd().await.with_namespace("team-a/")
}

async fn redis_namespaced() -> Backend {
    redis().await.with_namespace("team-a:")
}

async fn redis() -> Backend {
    let server = RedisServer::start_async().await;
    Backend::new(server.url(), server)
}

async fn redlock() -> Backend {
    let servers = RedisServers::start_async(5).await;
    Backend::new(servers.redlock_url(), servers)
}

macro_rules! suite {
    ($backend:ident: $($case:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::$backend().await;
                    super::conformance::$case(&backend).await;
                }
            )*
        }
    };
}

macro_rules! all_backends {
    ($($case:ident),* $(,)?) => {
        suite!(mem: $($case),*);
        suite!(etcd: $($case),*);
        suite!(etcd_cluster: $($case),*);
        suite!(mem_namespaced: $($case),*);
        suite!(etcd_namespaced: $($case),*);
    };
}

// Redis is not a store: only the backend-neutral cases (the Coordinator's traits) apply.
macro_rules! redis_backends {
    ($($case:ident),* $(,)?) => {
        suite!(redis: $($case),*);
        suite!(redlock: $($case),*);
        suite!(redis_namespaced: $($case),*);
    };
}

redis_backends!(
    coordinator_traits,
    coordinator_mutual_exclusion,
    coordinator_cancel_and_timeout,
    coordinator_election_handover,
    coordinator_tasks_share_one_coordinator,
);

all_backends!(
    mutual_exclusion_counter,
    fifo_order,
    long_queue_order,
    try_lock_while_held,
    cancel_while_waiting,
    holder_session_expires,
    lease_revoked_externally,
    key_deleted_externally,
    guarded_txn,
    waiter_lease_expires_in_queue,
    prefix_independence,
    same_session_twice,
    bad_input,
    election_one_leader_at_a_time,
    election_leader_and_observe,
    election_leader_revoked,
    election_no_phantom_leader,
    election_cancel_campaign,
    election_observe_across_compaction,
    election_resume,
    rwlock_mutual_exclusion,
    rwlock_fair,
    rwlock_cancel_and_loss,
    coordinator_traits,
    coordinator_mutual_exclusion,
    coordinator_cancel_and_timeout,
    coordinator_election_handover,
    coordinator_tasks_share_one_coordinator,
    cross_type_names,
    semaphore_limits_holders,
    semaphore_holder_dies,
    barrier_and_latch,
    double_barrier_five,
    double_barrier_participant_dies,
    queue_exactly_once_fifo,
    priority_queue_order,
    shared_value_sync,
    stm_bank_transfer,
    recipes_bad_input,
);
