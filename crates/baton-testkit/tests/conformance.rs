//! The conformance suite (`baton_testkit::conformance`) on every store: the embedded store,
//! one real etcd node, and a real 3-node etcd cluster; and its backend-neutral cases
//! (`coordinator_*`) on one real Redis and on Redlock over 5 real Redis masters. The
//! embedded store, one etcd node and one Redis run it a second time through a namespace.
//! `mem_vs_etcd` runs the same store operations on the embedded store and on one etcd
//! node and compares the answers.

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
    coordinator_observe_vacancies,
    coordinator_tasks_share_one_coordinator,
    coordinator_after_close,
    coordinator_keys_relative_to_namespace,
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
    rwlock_try_after_own_drop,
    rwlock_waiting_reader_key_deleted,
    rwlock_resume_other_mode,
    rwlock_both_keys_resumed,
    rwlock_resumed_key_overwritten_without_a_lease,
    resumed_key_overwritten_without_a_lease,
    held_key_overwritten_without_a_lease_fences_writes,
    release_of_a_key_overwritten_without_a_lease,
    waiter_key_overwritten_without_a_lease_is_not_granted,
    freed_keys_are_heard_at_once,
    coordinator_traits,
    coordinator_mutual_exclusion,
    coordinator_cancel_and_timeout,
    coordinator_election_handover,
    coordinator_observe_vacancies,
    coordinator_tasks_share_one_coordinator,
    coordinator_after_close,
    coordinator_keys_relative_to_namespace,
    cross_type_names,
    semaphore_limits_holders,
    semaphore_holder_dies,
    semaphore_a_stuck_waiter_does_not_block_those_behind,
    barrier_and_latch,
    double_barrier_five,
    double_barrier_participant_dies,
    queue_exactly_once_fifo,
    priority_queue_order,
    queue_dropped_dequeues_lose_nothing,
    shared_value_sync,
    stm_bank_transfer,
    stm_read_committed_many_reads_one_write,
    stm_blind_write_conflicts_with_a_put_not_a_delete,
    stm_writes_share_one_request_size_limit,
    recipes_bad_input,
);

/// The same store operations on the embedded store and on a real etcd give the same
/// answers: where the two could drift apart (transaction checks, compaction, `prev_kv`,
/// watch batches, lease TTLs, request size limits).
mod mem_vs_etcd {
    use std::time::Duration;

    use baton::store::etcd::{EtcdOptions, EtcdStore};
    use baton::store::mem::MemStore;
    use baton::store::{
        Compare, CompareOp, KeyRange, Range, Revision, Store, Txn, TxnOp, Watch, WatchStream,
    };
    use baton::Error;
    use baton_testkit::EtcdServer;
    use futures::StreamExt;

    /// 1.5 MiB: etcd's default `--max-request-bytes`.
    const MAX_REQUEST: usize = 1024 * 1024 * 3 / 2;

    async fn etcd_store(server: &EtcdServer) -> EtcdStore {
        EtcdStore::connect(&[server.endpoint()], EtcdOptions::default())
            .await
            .unwrap()
    }

    /// An answer, with errors reduced to what both stores must agree on.
    fn outcome<T: std::fmt::Debug>(r: baton::Result<T>) -> String {
        match r {
            Ok(v) => format!("ok {v:?}"),
            Err(e @ Error::InvalidArgument(_)) => {
                let m = e.to_string();
                let kind = ["duplicate key", "too large", "must be positive"]
                    .into_iter()
                    .find(|k| m.contains(k))
                    .unwrap_or(&m);
                format!("invalid: {kind}")
            }
            Err(Error::Compacted { requested, .. }) => format!("compacted {requested}"),
            Err(e) => format!("{e:?}"),
        }
    }

    /// The batches a watch delivers until it is quiet for a while.
    async fn batches(w: &mut WatchStream, base: Revision) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Some(b)) = tokio::time::timeout(Duration::from_millis(700), w.next()).await {
            let b = b.unwrap();
            let events: Vec<String> = b
                .events
                .iter()
                .map(|e| {
                    let prev = e
                        .prev_kv
                        .as_ref()
                        .map(|p| (p.value_str().into_owned(), p.mod_revision - base));
                    let rev = e.kv.mod_revision - base;
                    format!("{:?} {:?}@{rev} prev {prev:?}", e.kind, e.kv.key_str())
                })
                .collect();
            out.push(format!("header {}: {events:?}", b.header_revision - base));
        }
        out
    }

    async fn semantics(s: &dyn Store) -> Vec<String> {
        let mut log = Vec::new();
        let base = s.range(Range::key("x")).await.unwrap().header_revision;

        // Deleting a prefix with no end ("", or 0xff bytes only) clashes with no put.
        s.put(b"a", b"old", 0).await.unwrap();
        s.put(b"\xff\xffb", b"old", 0).await.unwrap();
        let (_, mut w) = s
            .watch_from_now(Watch::prefix("").with_prev_kv())
            .await
            .unwrap();
        let branches = [
            vec![
                TxnOp::put("a", "new", 0),
                TxnOp::Delete(KeyRange::prefix("")),
            ],
            vec![TxnOp::Delete(KeyRange::prefix("")), TxnOp::put("a", "1", 0)],
            vec![
                TxnOp::put(b"\xffc".to_vec(), "", 0),
                TxnOp::Delete(KeyRange::prefix(b"\xff".to_vec())),
            ],
            vec![
                TxnOp::put("p/x", "", 0),
                TxnOp::Delete(KeyRange::prefix("p/")),
            ],
        ];
        for ops in branches {
            let r = s.txn(Txn::new().and_then(ops)).await;
            log.push(outcome(r.map(|r| r.header_revision - base)));
        }
        log.extend(batches(&mut w, base).await);
        drop(w);

        // Compaction: no delete at the compact revision, no prev_kv from before it.
        let r1 = s.put(b"c/k", b"1", 0).await.unwrap();
        s.put(b"c/k", b"2", 0).await.unwrap();
        s.put(b"c/d", b"1", 0).await.unwrap();
        let r4 = s
            .txn(Txn::new().and_then([TxnOp::delete("c/d"), TxnOp::put("c/k", "3", 0)]))
            .await
            .unwrap()
            .header_revision;
        s.put(b"c/k", b"4", 0).await.unwrap();
        s.compact(r4).await.unwrap();
        // etcd compacts its storage after answering (EtcdStore does not ask for a physical
        // compaction): until then, a watch may still see a delete at the compact revision.
        // The embedded store answers as etcd does once it is done.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut w = s
            .watch(Watch::prefix("c/").from_revision(r4).with_prev_kv())
            .await
            .unwrap();
        log.extend(batches(&mut w, base).await);
        let at = s.range(Range::prefix("c/").at_revision(r4)).await;
        log.push(outcome(at.map(|r| r.kvs.len())));
        let before = s.range(Range::prefix("c/").at_revision(r1)).await;
        log.push(outcome(before.map(|r| r.kvs.len())).replace(&r1.to_string(), "r1"));

        // A replay comes in one batch, at the current revision.
        s.put(b"r/a", b"", 0).await.unwrap();
        let from = s.put(b"r/b", b"", 0).await.unwrap();
        s.put(b"r/c", b"", 0).await.unwrap();
        s.put(b"other", b"", 0).await.unwrap();
        let mut w = s
            .watch(Watch::prefix("r/").from_revision(from))
            .await
            .unwrap();
        log.extend(batches(&mut w, base).await);

        // Lease TTLs in whole seconds, rounded down.
        let lease = s.lease_grant(Duration::from_secs(10)).await.unwrap();
        log.push(outcome(s.lease_time_to_live(lease.id).await));

        for revision in [0, -1] {
            log.push(outcome(s.compact(revision).await));
        }
        log
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_semantics() {
        let server = EtcdServer::start_async().await;
        let etcd = semantics(&etcd_store(&server).await).await;
        let mem = semantics(&MemStore::new()).await;
        assert_eq!(mem, etcd);
    }

    /// Whether `store` takes each request of `sizes`.
    async fn takes<F, Fut>(sizes: &[usize], mut op: F) -> Vec<bool>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = baton::Result<()>>,
    {
        let mut out = Vec::new();
        for &n in sizes {
            out.push(match op(n).await {
                Ok(()) => true,
                Err(e) if e.to_string().contains("too large") => false,
                Err(e) => panic!("size {n}: {e:?}"),
            });
        }
        out
    }

    /// Every request etcd refuses as too large, the embedded store refuses; it may refuse
    /// a write up to 3 bytes smaller than the largest etcd takes (etcd's request id varies
    /// in length with its member id), and takes the same reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_size_limits() {
        let server = EtcdServer::start_async().await;
        let etcd = etcd_store(&server).await;
        let mem = MemStore::new();
        let stores: [&dyn Store; 2] = [&etcd, &mem];
        let x = |n: usize| vec![b'x'; n];
        let grpc = MAX_REQUEST + 512 * 1024;

        // (what, sizes around etcd's limit, slack allowed to the embedded store)
        let cases: [(&str, std::ops::Range<usize>, usize); 6] = [
            ("put", MAX_REQUEST - 40..MAX_REQUEST - 15, 3),
            ("delete", MAX_REQUEST - 35..MAX_REQUEST - 10, 3),
            ("delete prefix", MAX_REQUEST / 2 - 25..MAX_REQUEST / 2, 3),
            ("txn", MAX_REQUEST - 85..MAX_REQUEST - 60, 3),
            ("read-only txn", grpc - 30..grpc - 10, 0),
            ("range", grpc - 12..grpc + 3, 0),
        ];
        for (what, sizes, slack) in cases {
            let sizes: Vec<usize> = sizes.collect();
            let mut answers = Vec::new();
            for s in stores {
                answers.push(
                    takes(&sizes, |n| async move {
                        match what {
                            "put" => s.put(b"k", &x(n), 0).await.map(drop),
                            "delete" => s.delete(KeyRange::key(x(n))).await.map(drop),
                            "delete prefix" => s.delete(KeyRange::prefix(x(n))).await.map(drop),
                            "txn" => {
                                let txn = Txn::new()
                                    .when([
                                        Compare::version("k", CompareOp::Greater, 0),
                                        Compare::mod_revision("k", CompareOp::Equal, 0),
                                    ])
                                    .and_then([
                                        TxnOp::put("k", x(n), 0),
                                        TxnOp::get(Range::prefix("").with_limit(1)),
                                    ])
                                    .or_else([TxnOp::delete("zz")]);
                                s.txn(txn).await.map(drop)
                            }
                            "read-only txn" => {
                                let txn = Txn::new()
                                    .when([Compare::value("k", CompareOp::Equal, x(n))])
                                    .and_then([TxnOp::get(Range::key("k"))]);
                                s.txn(txn).await.map(drop)
                            }
                            _ => s.range(Range::key(x(n))).await.map(drop),
                        }
                    })
                    .await,
                );
            }
            let (on_etcd, on_mem) = (&answers[0], &answers[1]);
            let largest = |takes: &[bool]| {
                let i = takes
                    .iter()
                    .rposition(|t| *t)
                    .expect("the smallest size fits");
                assert!(takes[..i].iter().all(|t| *t), "{what}: {takes:?}");
                assert!(
                    i + 1 < takes.len(),
                    "{what}: the largest size fits: {takes:?}"
                );
                sizes[i]
            };
            let (etcd_largest, mem_largest) = (largest(on_etcd), largest(on_mem));
            eprintln!("{what}: etcd takes up to {etcd_largest}, mem up to {mem_largest}");
            assert!(
                mem_largest <= etcd_largest && etcd_largest - mem_largest <= slack,
                "{what}: etcd takes up to {etcd_largest} bytes, mem up to {mem_largest}"
            );
        }
    }
}
