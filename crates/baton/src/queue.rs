//! The create-revision queue shared by [`Mutex`](crate::Mutex) and
//! [`Election`](crate::Election): joining it, waiting for our turn, and holding the head.
//!
//! Joining is Go's acquire transaction: if our key (`prefix + hex(lease)`) does not exist,
//! put it (bound to the session's lease) and read the queue's head; otherwise read our key
//! and the head. Our revision is the header revision, or our existing key's create revision.

use std::fmt;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::names::is_member;
use crate::ownership::{delete_if_owned, not_held, release_in_background, Ownership};
use crate::session::{OwnedClaim, Session};
use crate::store::{
    Compare, CompareOp, KeyValue, Range, Revision, SortOrder, Store, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};
use crate::wait::{scan_member, wait_turn};

/// Our key in a queue, not yet at its head (or not yet known to be).
///
/// Dropping it before [`Entry::into_held`] removes our key: at once if our revision is known,
/// or after the in-flight join transaction has been answered. This is what makes `lock()` and
/// `campaign()` cancel safe.
pub(crate) struct Entry {
    session: Session,
    store: Arc<dyn Store>,
    prefix: Vec<u8>,
    key: Vec<u8>,
    claim: Option<OwnedClaim>,
    inflight: Option<JoinHandle<Result<TxnResponse>>>,
    my_rev: Option<Revision>,
    /// The revision after which changes to our key must be watched, once at the head.
    head_at: Option<Revision>,
    /// Our key as the join transaction found or wrote it.
    existing_value: Option<Vec<u8>>,
}

impl Entry {
    /// Join the queue under `prefix` with `key` holding `value`.
    pub(crate) async fn join(
        session: &Session,
        name: &str,
        prefix: &str,
        key: &str,
        value: &[u8],
    ) -> Result<Entry> {
        session.check_alive()?;
        let claim = session.claim(key.as_bytes(), name).await?;
        let store = session.store().clone();
        let mut entry = Entry {
            session: session.clone(),
            store,
            prefix: prefix.as_bytes().to_vec(),
            key: key.as_bytes().to_vec(),
            claim: Some(claim),
            inflight: None,
            my_rev: None,
            head_at: None,
            existing_value: None,
        };
        let k = entry.key.clone();
        let first = Range::prefix(entry.prefix.clone()).first_created();
        let txn = Txn::new()
            .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(k.clone(), value, session.lease_id()),
                TxnOp::get(first.clone()),
            ])
            .or_else([TxnOp::get(Range::key(k)), TxnOp::get(first)]);
        let resp = match entry.send(txn).await {
            Err(Error::LeaseNotFound(_)) => {
                return Err(if session.is_lost() {
                    session.lost_error()
                } else {
                    Error::lost("lease not found")
                })
            }
            r => r?,
        };
        let my_rev = my_revision(&resp, &entry.key)?;
        entry.my_rev = Some(my_rev);
        if !resp.succeeded {
            entry.existing_value = first_kv(&resp, 0).map(|kv| kv.value);
        }
        let mut head = first_kv(&resp, 1);
        if head
            .as_ref()
            .is_some_and(|kv| !is_member(&entry.prefix, &kv.key))
        {
            head = scan_member(&entry.store, &entry.prefix, SortOrder::Ascending, 0)
                .await?
                .1;
        }
        if head.is_none_or(|kv| kv.create_revision == my_rev) {
            entry.head_at = Some(resp.header_revision + 1);
        }
        Ok(entry)
    }

    /// Our revision: the fencing token once we are at the head.
    pub(crate) fn my_rev(&self) -> Revision {
        self.my_rev.unwrap_or_default()
    }

    /// The value our key had if it already existed when we joined (a resumed candidacy).
    pub(crate) fn existing_value(&self) -> Option<&[u8]> {
        self.existing_value.as_deref()
    }

    /// True if the join found us at the head already.
    pub(crate) fn at_head(&self) -> bool {
        self.head_at.is_some()
    }

    /// The store this entry lives in.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Wait until we are at the head, or fail: the session was lost, or our key vanished.
    pub(crate) async fn wait(&mut self) -> Result<()> {
        if self.head_at.is_some() {
            return Ok(());
        }
        let my_rev = self.my_rev();
        tracing::debug!(my_rev, "queued");
        let session = &self.session;
        let turn = tokio::select! {
            r = wait_turn(&self.store, &self.prefix, &self.key, my_rev) => r,
            _ = session.lost() => Err(session.lost_error()),
        };
        match turn {
            Ok(t) => {
                self.head_at = Some(t.header_revision + 1);
                Ok(())
            }
            Err(Error::NotHeld { .. }) if session.is_lost() => Err(session.lost_error()),
            Err(e) => Err(e),
        }
    }

    /// Run the join transaction in its own task, so that a cancelled caller can still learn
    /// its outcome and clean up.
    async fn send(&mut self, txn: Txn) -> Result<TxnResponse> {
        let store = self.store.clone();
        let handle = self
            .inflight
            .insert(tokio::spawn(async move { store.txn(txn).await }));
        let res = handle.await;
        self.inflight = None;
        res.map_err(|e| Error::Store(format!("queue join task failed: {e}")))?
    }

    /// Leave the queue now and wait for our key to be removed.
    pub(crate) async fn abandon(mut self) {
        if let Some(rev) = self.my_rev.take() {
            if let Err(e) = delete_if_owned(&self.store, &self.key, rev).await {
                tracing::debug!(error = %e, "removing our key failed; it expires with the lease");
            }
        }
    }

    /// We are at the head: start watching our key and hand over the claim.
    pub(crate) fn into_held(mut self) -> Held {
        let rev = self.my_rev.take().unwrap_or_default();
        let from = self.head_at.unwrap_or(rev + 1);
        let key = std::mem::take(&mut self.key);
        let ownership = Ownership::watch(&self.session, key.clone(), rev, from);
        tracing::debug!(token = rev, "at the head");
        Held {
            session: self.session.clone(),
            key: String::from_utf8_lossy(&key).into_owned(),
            rev,
            ownership,
            claim: self.claim.take(),
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else {
            return;
        };
        let store = self.store.clone();
        let key = std::mem::take(&mut self.key);
        match (self.my_rev, self.inflight.take()) {
            (Some(rev), _) => release_in_background(store, key, rev, claim),
            (None, Some(handle)) => {
                claim.releasing();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        if let Ok(Ok(resp)) = handle.await {
                            if let Ok(rev) = my_revision(&resp, &key) {
                                let _ = delete_if_owned(&store, &key, rev).await;
                            }
                        }
                        drop(claim);
                    });
                }
            }
            (None, None) => drop(claim),
        }
    }
}

fn first_kv(resp: &TxnResponse, index: usize) -> Option<KeyValue> {
    resp.responses
        .get(index)
        .and_then(TxnOpResponse::as_get)
        .and_then(|g| g.kvs.first().cloned())
}

/// Our revision from the join transaction: the header revision if we created the key, or
/// the existing key's create revision.
fn my_revision(resp: &TxnResponse, key: &[u8]) -> Result<Revision> {
    if resp.succeeded {
        return Ok(resp.header_revision);
    }
    first_kv(resp, 0)
        .map(|kv| kv.create_revision)
        .ok_or_else(|| not_held(key))
}

/// The head of a queue, held: our key, its create revision (the fencing token), and the
/// watch that tells us when it stops being ours.
///
/// Dropping it releases the key in the background (compare-and-delete).
pub(crate) struct Held {
    session: Session,
    key: String,
    rev: Revision,
    ownership: Ownership,
    claim: Option<OwnedClaim>,
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("key", &self.key)
            .field("fencing_token", &self.rev)
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl Held {
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn rev(&self) -> Revision {
        self.rev
    }

    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.ownership.lost.is_cancelled()
    }

    pub(crate) fn lost_reason(&self) -> Option<String> {
        self.ownership.reason(&self.session)
    }

    pub(crate) fn lost_token(&self) -> &CancellationToken {
        &self.ownership.lost
    }

    /// `CreateRevision(key) == rev`: true only while we hold the key.
    pub(crate) fn is_owner(&self) -> Compare {
        Compare::create_revision(self.key.as_bytes(), CompareOp::Equal, self.rev)
    }

    /// Run `txn` guarded by [`is_owner`](Held::is_owner); NotHeld if that guard failed.
    pub(crate) async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let txn = Txn {
            compares: std::iter::once(self.is_owner())
                .chain(txn.compares)
                .collect(),
            success: txn.success,
            failure: txn
                .failure
                .into_iter()
                .chain(std::iter::once(TxnOp::get(Range::key(self.key.as_bytes()))))
                .collect(),
        };
        let mut resp = self.session.store().txn(txn).await?;
        if !resp.succeeded {
            let ours = resp
                .responses
                .pop()
                .as_ref()
                .and_then(TxnOpResponse::as_get)
                .and_then(|g| g.kvs.first())
                .is_some_and(|kv| kv.create_revision == self.rev);
            if !ours {
                return Err(not_held(self.key.as_bytes()));
            }
        }
        Ok(resp)
    }

    /// Delete our key if it is still ours. NotHeld if it was not.
    pub(crate) async fn release(mut self, what: &'static str) -> Result<()> {
        self.ownership.stop();
        let store = self.session.store().clone();
        let claim = self.claim.take();
        if let Some(c) = &claim {
            c.releasing();
        }
        let result = delete_if_owned(&store, self.key.as_bytes(), self.rev)
            .instrument(tracing::debug_span!("release", what, key = %self.key, token = self.rev))
            .await;
        drop(claim);
        match result {
            Ok(true) => Ok(()),
            Ok(false) => Err(not_held(self.key.as_bytes())),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.ownership.stop();
        if let Some(claim) = self.claim.take() {
            release_in_background(
                self.session.store().clone(),
                std::mem::take(&mut self.key).into_bytes(),
                self.rev,
                claim,
            );
        }
    }
}
