//! `Stm` on the embedded store: the limits of one transaction, and what each isolation
//! level checks. The same cases run on a real etcd in baton-testkit's `tests/stm_etcd.rs`.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use baton::{Client, Error, Isolation, Stm};

/// At `ReadCommitted` nothing is compared, so the commit cannot fail: the keys read are
/// neither re-read on failure nor counted against etcd's 128 operations per branch.
#[tokio::test]
async fn read_committed_many_reads_one_write() {
    let client = Client::memory();
    let keys: Vec<String> = (0..200).map(|i| format!("rc/{i:03}")).collect();
    let stm = Stm::new(&client).with_isolation(Isolation::ReadCommitted);
    let with_write = stm
        .run(|tx| {
            let keys = keys.clone();
            async move {
                let n = tx.get_many(keys.iter()).await?.len();
                tx.put("rc/count", n.to_string());
                Ok::<_, Error>(n)
            }
        })
        .await;
    assert!(with_write.is_ok(), "{}", with_write.unwrap_err());
    let count = client
        .store()
        .range(baton::store::Range::key("rc/count"))
        .await
        .unwrap();
    assert_eq!(count.kvs[0].value, b"200");
}
