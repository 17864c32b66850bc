//! The channel to etcd's members: requests balanced by *power of two choices* on each
//! member's unanswered requests.
//!
//! etcd-client's own channel (tonic's `balance_channel`) also picks two members at random,
//! but every member counts as equally loaded, so each request goes to a member chosen
//! uniformly at random: one that is alive but silent (paused, its packets lost, its disk
//! stalled) still gets a third of the requests of a three-member cluster, including the
//! copies sent to get around it. A keep-alive whose stream went silent opened its new
//! stream on the same member again one time in three, and a session could be lost that
//! way (see `etcd_failures.rs`, `many_sessions_survive_a_paused_member`).
//!
//! Here each member's load is the number of its requests sent and not answered yet
//! ([`PendingRequests`]; a stream counts until its response headers arrive). Of the two
//! members drawn, the one with fewer unanswered requests gets the request: a silent member
//! piles up unanswered requests and stops getting new ones as soon as it has more than the
//! other, while members that answer share the load as before.

use std::pin::Pin;
use std::task::{Context, Poll};

use etcd_client as ec;
use futures::Stream;
use tokio::sync::mpsc::Sender;
use tonic::transport::channel::Change;
use tonic::transport::Endpoint;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::Change as TowerChange;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::util::BoxCloneSyncService;
use tower::BoxError;

type Member = PendingRequests<tonic::transport::Channel>;

/// How many requests may wait for the balancer (tonic's own channel allows 1024).
const BUFFER: usize = 1024;

/// Builds the channel: pass it to `ec::Client::connect_with_balanced_channel`.
pub(crate) struct LeastPending;

impl ec::BalancedChannelBuilder for LeastPending {
    type Error = ec::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(ec::Channel, Sender<Change<http::Uri, Endpoint>>), Self::Error> {
        let (tx, rx) = tokio::sync::mpsc::channel(buffer_size);
        let balance = Balance::new(Members { changes: rx });
        let service = Buffer::new(balance, BUFFER);
        Ok((ec::Channel::Custom(BoxCloneSyncService::new(service)), tx))
    }
}

/// The members, as etcd-client adds and removes them.
struct Members {
    changes: tokio::sync::mpsc::Receiver<Change<http::Uri, Endpoint>>,
}

impl Stream for Members {
    type Item = Result<TowerChange<http::Uri, Member>, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.changes.poll_recv(cx) {
            // The client is gone, or has not said anything yet: no change.
            Poll::Pending | Poll::Ready(None) => Poll::Pending,
            Poll::Ready(Some(Change::Insert(uri, endpoint))) => {
                let member =
                    PendingRequests::new(endpoint.connect_lazy(), CompleteOnResponse::default());
                Poll::Ready(Some(Ok(TowerChange::Insert(uri, member))))
            }
            Poll::Ready(Some(Change::Remove(uri))) => {
                Poll::Ready(Some(Ok(TowerChange::Remove(uri))))
            }
        }
    }
}
