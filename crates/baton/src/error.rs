//! The crate's one error type.

use std::time::Duration;

/// A specialised `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Baton.
///
/// Messages are lowercase and never contain values, passwords or tokens. Use the classifier
/// methods ([`is_timeout`](Error::is_timeout), [`is_lost`](Error::is_lost),
/// [`is_retryable`](Error::is_retryable)) rather than matching on the text.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller passed something Baton refuses before any network call: an empty or
    /// oversized name, a TTL out of range, a malformed option.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An endpoint URL could not be parsed or names an unsupported scheme.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given (credentials redacted).
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },

    /// No endpoint answered within the dial timeout.
    #[error("cannot connect to {endpoints} within {timeout:?}: {reason}")]
    Connect {
        /// The endpoints that were tried (credentials redacted).
        endpoints: String,
        /// The dial timeout that passed.
        timeout: Duration,
        /// What the transport said.
        reason: String,
    },

    /// An operation did not finish within its timeout.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was being done.
        operation: &'static str,
        /// The timeout that passed.
        after: Duration,
    },

    /// `try_lock` found the lock held by another owner.
    #[error("lock {name:?} is held by another owner")]
    Locked {
        /// The lock's name.
        name: String,
    },

    /// The same session already holds, or is waiting for, this name: a lock, a
    /// leadership (a second `campaign` on one session), a semaphore's permits.
    ///
    /// Baton locks and elections are not re-entrant: a session has exactly one key per
    /// name.
    #[error(
        "this session already holds or is waiting for {name:?} (one key per name and session)"
    )]
    AlreadyHeld {
        /// The name (of the lock, election, ...). For an [`RwLock`](crate::RwLock), the
        /// mode held follows it: `NAME (read lock)` or `NAME (write lock)`.
        name: String,
    },

    /// The session's lease is gone: revoked, expired, or not kept alive before its local
    /// deadline. Everything bound to it is lost.
    #[error("session lost: {reason}")]
    SessionLost {
        /// Why the session counts as lost.
        reason: String,
    },

    /// What we held is no longer ours: its key (a lock's, a candidate's, a semaphore
    /// permit's, a barrier participant's, ...) was deleted or replaced.
    #[error("key {key:?} is no longer held")]
    NotHeld {
        /// The key that was held.
        key: String,
    },

    /// The election has no leader.
    #[error("election {name:?} has no leader")]
    NoLeader {
        /// The election's name.
        name: String,
    },

    /// We are not (or no longer) the election's leader.
    #[error("not the leader of election {name:?}")]
    NotLeader {
        /// The election's name.
        name: String,
    },

    /// `try_acquire` found too few free permits in a semaphore.
    #[error("semaphore {name:?} has too few free permits")]
    NoPermits {
        /// The semaphore's name.
        name: String,
    },

    /// A recipe is used with settings that disagree with those of its other users: a
    /// semaphore's permit count, a latch's or a double barrier's count, or a key that holds
    /// another primitive's data. Nothing was changed; fix the configuration.
    #[error("{name:?} is in use with different settings: {reason}")]
    Mismatch {
        /// The recipe's name.
        name: String,
        /// What disagrees.
        reason: String,
    },

    /// A double barrier already has its full count of participants inside.
    #[error("double barrier {name:?} is full")]
    BarrierFull {
        /// The barrier's name.
        name: String,
    },

    /// A key holds data the primitive cannot read, such as a shared count that is not an
    /// integer.
    #[error("key {key:?} holds unexpected data: {reason}")]
    InvalidData {
        /// The key.
        key: String,
        /// What is wrong with it (never the value itself).
        reason: String,
    },

    /// A software transaction ([`Stm`](crate::Stm)) kept conflicting with other writers
    /// and ran out of attempts; or a join (a lock, a campaign, ...) that found its key
    /// overwritten with no lease kept finding it written again before it could remove it.
    #[error("transaction conflicted {attempts} times; giving up")]
    Conflict {
        /// How many attempts were made.
        attempts: u32,
    },

    /// A watch asked for a revision that has been compacted away.
    #[error("revision {requested} is compacted (compact revision {compact_revision})")]
    Compacted {
        /// The revision that was asked for.
        requested: i64,
        /// The store's compact revision.
        compact_revision: i64,
    },

    /// The lease does not exist (any more).
    #[error("lease {0:x} not found")]
    LeaseNotFound(i64),

    /// The store refused or failed the request.
    #[error("store error: {0}")]
    Store(String),

    /// The backend could not serve the request for now: the connection was lost or refused,
    /// the server is still loading its data, or the cluster has no leader. Retryable: the
    /// same call may succeed once the backend is back. As with [`Error::Store`] and
    /// [`Error::Timeout`], a write that failed this way may or may not have been applied.
    #[error("backend unavailable: {0}")]
    Unavailable(String),

    /// Redlock could not get a majority of its independent masters in time: too many were
    /// unreachable or failed, or the acquisition took longer than the lock's validity. What
    /// had been taken was released. (A lock held by another owner gives [`Error::Locked`].)
    #[error("redlock quorum not reached: {reached} of {nodes} nodes, {needed} needed ({reason})")]
    NoQuorum {
        /// Nodes that granted or extended.
        reached: usize,
        /// The quorum: `nodes / 2 + 1`.
        needed: usize,
        /// The number of masters.
        nodes: usize,
        /// Why, in a few words.
        reason: String,
    },

    /// The backend refused to set up a TLS connection: a certificate the other side does not
    /// trust, a host name that does not match, a client certificate that is missing or
    /// rejected, or one side speaking TLS and the other not. Baton never falls back to
    /// plaintext. Not retryable: fix the certificates or the URL.
    #[error("tls error with {endpoints}: {reason}")]
    Tls {
        /// The endpoints (credentials redacted).
        endpoints: String,
        /// What went wrong, and what to check.
        reason: String,
    },

    /// The backend did not accept our credentials: a wrong user name or password, none
    /// given to a server that needs them, or an expired token that could not be renewed.
    /// Not retryable. The message never contains the password or the token.
    #[error("authentication failed: {0}")]
    Unauthenticated(String),

    /// The backend knows who we are but does not allow the request: the user's etcd roles
    /// or Redis ACL do not cover the key. Not retryable.
    #[error("permission denied: {0}")]
    PermissionDenied(String),

    /// The client or session has been closed.
    #[error("closed")]
    Closed,
}

impl Error {
    /// True if an operation ran out of time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// True if a lock, leadership or session was lost.
    pub fn is_lost(&self) -> bool {
        matches!(
            self,
            Error::SessionLost { .. }
                | Error::NotHeld { .. }
                | Error::NotLeader { .. }
                | Error::LeaseNotFound(_)
        )
    }

    /// True if the caller gave bad input (or settings that disagree with other users');
    /// retrying the same call cannot help.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidArgument(_)
                | Error::InvalidEndpoint { .. }
                | Error::Mismatch { .. }
                | Error::InvalidData { .. }
        )
    }

    /// True if the backend refused our credentials or our permissions
    /// ([`Error::Unauthenticated`], [`Error::PermissionDenied`]) or the TLS handshake
    /// ([`Error::Tls`]): a configuration problem that retrying cannot fix.
    pub fn is_access_denied(&self) -> bool {
        matches!(
            self,
            Error::Unauthenticated(_) | Error::PermissionDenied(_) | Error::Tls { .. }
        )
    }

    /// True if the same call may succeed later (a timeout, a connection or store failure).
    /// Never for [`is_access_denied`](Error::is_access_denied) errors.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. }
                | Error::Connect { .. }
                | Error::Store(_)
                | Error::Unavailable(_)
                | Error::Conflict { .. }
                | Error::NoQuorum { .. }
        )
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    pub(crate) fn lost(reason: impl Into<String>) -> Self {
        Error::SessionLost {
            reason: reason.into(),
        }
    }
}
