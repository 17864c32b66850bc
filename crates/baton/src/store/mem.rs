//! MemStore: the embedded store (being written).
#![allow(missing_docs, unreachable_pub, clippy::unwrap_used, clippy::panic)]
use super::*;
use async_trait::async_trait;

#[derive(Clone, Debug, Default)]
pub struct MemStore {}

impl MemStore {
    pub fn new() -> Self { MemStore {} }
    pub fn shared(_name: &str) -> Self { MemStore {} }
}

#[async_trait]
impl Store for MemStore {
    fn backend(&self) -> &'static str { "mem" }
    async fn range(&self, _range: Range) -> Result<RangeResponse> { todo!() }
    async fn put(&self, _key: &[u8], _value: &[u8], _lease: LeaseId) -> Result<Revision> { todo!() }
    async fn delete(&self, _keys: KeyRange) -> Result<(i64, Revision)> { todo!() }
    async fn txn(&self, _txn: Txn) -> Result<TxnResponse> { todo!() }
    async fn lease_grant(&self, _ttl: Duration) -> Result<LeaseGrant> { todo!() }
    async fn lease_keep_alive(&self, _id: LeaseId) -> Result<Option<Duration>> { todo!() }
    async fn lease_revoke(&self, _id: LeaseId) -> Result<()> { todo!() }
    async fn lease_time_to_live(&self, _id: LeaseId) -> Result<Option<Duration>> { todo!() }
    async fn watch(&self, _watch: Watch) -> Result<WatchStream> { todo!() }
    async fn compact(&self, _revision: Revision) -> Result<()> { todo!() }
}
