//! EtcdStore: etcd through the etcd-client crate (being written).
#![allow(missing_docs, unreachable_pub, clippy::unwrap_used, clippy::panic)]
use super::*;
use async_trait::async_trait;

#[derive(Clone, Debug)]
pub struct EtcdOptions { pub dial_timeout: Duration, pub request_timeout: Duration }

#[derive(Clone, Debug)]
pub struct EtcdStore {}

impl EtcdStore {
    pub async fn connect(_endpoints: &[String], _options: EtcdOptions) -> Result<Self> { todo!() }
}

#[async_trait]
impl Store for EtcdStore {
    fn backend(&self) -> &'static str { "etcd" }
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
