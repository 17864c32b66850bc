//! Priority queues at the edge priorities (0, 65535), on mem and etcd.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use baton::{Client, PriorityQueue};
use baton_testkit::EtcdServer;

async fn client(endpoints: &str, request_timeout: Duration) -> Client {
    baton_testkit::connect_client(endpoints, request_timeout).await
}

async fn edge_priorities_on(client: &Client) {
    let q = PriorityQueue::new(client, "edges").unwrap();
    let prios: [u16; 9] = [65535, 0, 10000, 9999, 1, 65534, 0, 65535, 100];
    for (i, p) in prios.iter().enumerate() {
        q.enqueue(format!("{p}-{i}"), *p).await.unwrap();
    }
    assert_eq!(q.len().await.unwrap(), prios.len());
    let mut got = Vec::new();
    while let Some(v) = q.try_dequeue().await.unwrap() {
        got.push(String::from_utf8(v).unwrap());
    }
    assert_eq!(
        got,
        ["0-1", "0-6", "1-4", "100-8", "9999-3", "10000-2", "65534-5", "65535-0", "65535-7"]
    );
}

#[tokio::test]
async fn edge_priorities_mem() {
    edge_priorities_on(&Client::memory()).await;
}

#[tokio::test]
async fn edge_priorities_etcd() {
    let etcd = EtcdServer::start_async().await;
    let c = client(&etcd.endpoint(), Duration::from_secs(5)).await;
    edge_priorities_on(&c).await;
}
