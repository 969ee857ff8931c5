//! The control plane's store: an ordered, durable log of [`Command`]s applied to a [`State`].
//!
//! One implementation orders commands (today a single-node redb log; the Raft group replaces the
//! ordering, not the state machine). Readers never lock: they hold `Arc<State>` snapshots
//! published through a `watch` channel by the store's single writer.

mod codec;
#[cfg(any(test, feature = "testing"))]
pub mod conformance;
#[cfg(feature = "etcd")]
mod etcd;
mod local;
pub mod raft;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

#[cfg(feature = "etcd")]
pub use etcd::EtcdStore;
pub use local::LocalStore;

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
}

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Rejected(ApplyError::Invalid(_)) => tonic::Status::invalid_argument(e.to_string()),
            StoreError::Rejected(ApplyError::NotFound(_)) => tonic::Status::not_found(e.to_string()),
            StoreError::Rejected(ApplyError::Conflict(_)) => tonic::Status::already_exists(e.to_string()),
            StoreError::Io(_) | StoreError::Corrupt(_) | StoreError::Closed => {
                tonic::Status::unavailable(e.to_string())
            }
        }
    }
}

/// A boxed future returned by [`Store::propose`].
pub type ProposeFuture<'a> = Pin<Box<dyn Future<Output = Result<u64, StoreError>> + Send + 'a>>;

/// The seam between the control plane and how its state is ordered and persisted.
pub trait Store: Send + Sync + 'static {
    /// Durably appends `cmd` and applies it; resolves with its log index once applied, or with
    /// the reason the state machine refused it.
    fn propose(&self, cmd: Command) -> ProposeFuture<'_>;

    /// A receiver of state snapshots; the current one is `borrow()`.
    fn subscribe(&self) -> watch::Receiver<Arc<State>>;

    /// The current state.
    fn current(&self) -> Arc<State> {
        self.subscribe().borrow().clone()
    }
}
