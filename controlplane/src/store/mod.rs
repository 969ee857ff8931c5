//! The control plane's store: an ordered, durable log of [`Command`]s applied to a [`State`].
//!
//! The Raft group ([`RaftStore`], a group of one for a single instance) orders commands; the
//! `etcd` feature offers the same trait on an external etcd. Readers never lock: they hold
//! `Arc<State>` snapshots published through a `watch` channel by the store's single writer.

mod codec;
#[cfg(any(test, feature = "testing"))]
pub mod conformance;
#[cfg(feature = "etcd")]
mod etcd;
pub mod raft;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

#[cfg(feature = "etcd")]
pub use etcd::EtcdStore;
pub use raft::RaftStore;

use crate::state::{ApplyError, Command, State};

/// Errors of the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Rejected(#[from] ApplyError),
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("the store is damaged: {0}")]
    Corrupt(String),
    #[error("the store is shutting down")]
    Closed,
    #[error("the control plane cannot serve this now: {0}")]
    Unavailable(String),
    /// Nothing was written: the group is between leaders or busy with a membership change.
    #[error("the control plane cannot serve this now: {0}")]
    Busy(String),
}

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Rejected(ApplyError::Invalid(_)) => tonic::Status::invalid_argument(e.to_string()),
            StoreError::Rejected(ApplyError::NotFound(_)) => tonic::Status::not_found(e.to_string()),
            StoreError::Rejected(ApplyError::Conflict(_)) => tonic::Status::already_exists(e.to_string()),
            StoreError::Io(_)
            | StoreError::Corrupt(_)
            | StoreError::Closed
            | StoreError::Unavailable(_)
            | StoreError::Busy(_) => tonic::Status::unavailable(e.to_string()),
        }
    }
}

/// A boxed future returned by [`Store::propose`].
pub type ProposeFuture<'a> = Pin<Box<dyn Future<Output = Result<u64, StoreError>> + Send + 'a>>;

/// A boxed future returned by [`Store::read`].
pub type ReadFuture<'a> = Pin<Box<dyn Future<Output = Result<Arc<State>, StoreError>> + Send + 'a>>;

/// The seam between the control plane and how its state is ordered and persisted.
pub trait Store: Send + Sync + 'static {
    /// Durably appends `cmd` and applies it; resolves with its log index once applied, or with
    /// the reason the state machine refused it.
    fn propose(&self, cmd: Command) -> ProposeFuture<'_>;

    /// A receiver of state snapshots; the current one is `borrow()`.
    fn subscribe(&self) -> watch::Receiver<Arc<State>>;

    /// The current state of this replica (may trail the group by a moment).
    fn current(&self) -> Arc<State> {
        self.subscribe().borrow().clone()
    }

    /// A state that reflects every write acknowledged before the call (linearizable read).
    fn read(&self) -> ReadFuture<'_> {
        let state = self.current();
        Box::pin(async move { Ok(state) })
    }
}
