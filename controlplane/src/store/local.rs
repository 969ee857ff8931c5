//! Single-node store on redb: the log and snapshots of the state machine in one file.
//!
//! One thread owns the database. Proposals queue to it; it writes every queued command in one
//! transaction (group commit: one fsync for many writes), then applies them in order, publishes
//! the new state and answers the proposers. Each log entry and the snapshot carry a CRC32 so a
//! damaged file is reported, never served.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};

use super::codec::{self, seal};
use super::{ProposeFuture, Store, StoreError};
use crate::state::{Command, State};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SNAPSHOT_KEY: &str = "snapshot";
/// Entries after which the state is snapshotted and the log truncated.
const COMPACT_EVERY: u64 = 10_000;
/// Most proposals written in one transaction.
const MAX_BATCH: usize = 512;

type Proposal = (Command, oneshot::Sender<Result<u64, StoreError>>);

/// A durable single-node store.
pub struct LocalStore {
    tx: Option<mpsc::UnboundedSender<Proposal>>,
    state: watch::Receiver<Arc<State>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LocalStore {
    /// Closes the queue and waits for the writer to finish its batch and release the file, so
    /// the directory can be reopened as soon as the store is dropped.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Checks a sealed value read from the file at `path`; `what` names it in the error.
fn unseal<'a>(bytes: &'a [u8], what: &str, path: &Path) -> Result<&'a [u8], StoreError> {
    codec::unseal(bytes).map_err(|_| {
        StoreError::Corrupt(format!(
            "{what} in {} fails its checksum; the file was damaged or truncated. Restore this \
             instance's data directory from a backup, or remove it and let the instance rejoin",
            path.display()
        ))
    })
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl LocalStore {
    /// Opens (or creates) the store in `dir`, replaying the snapshot and the log.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("store.redb");
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::Storage(redb::StorageError::Corrupted(m)) => {
                StoreError::Corrupt(format!("{}: {m}", path.display()))
            }
            other => io(format!("cannot open {}: {other}", path.display())),
        })?;
        restrict_permissions(&path);
        let state = load(&db, &path)?;
        tracing::info!(revision = state.revision, services = state.services.len(), path = %path.display(), "store opened");
        let (state_tx, state_rx) = watch::channel(Arc::new(state));
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(db, path, rx, state_tx))
            .map_err(io)?;
        Ok(Self { tx: Some(tx), state: state_rx, writer: Some(writer) })
    }
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict_permissions(_: &Path) {}

fn load(db: &Database, path: &Path) -> Result<State, StoreError> {
    let txn = db.begin_read().map_err(io)?;
    let mut state = match txn.open_table(META) {
        Ok(meta) => match meta.get(SNAPSHOT_KEY).map_err(io)? {
            Some(v) => {
                let payload = unseal(v.value(), "the snapshot", path)?;
                serde_json::from_slice::<State>(payload).map_err(|e| {
                    StoreError::Corrupt(format!("the snapshot in {} cannot be read: {e}", path.display()))
                })?
            }
            None => State::default(),
        },
        Err(redb::TableError::TableDoesNotExist(_)) => State::default(),
        Err(e) => return Err(io(e)),
    };
    match txn.open_table(LOG) {
        Ok(log) => {
            for item in log.range(state.revision + 1..).map_err(io)? {
                let (k, v) = item.map_err(io)?;
                let index = k.value();
                if index != state.revision + 1 {
                    return Err(StoreError::Corrupt(format!(
                        "log in {} jumps from entry {} to {index}; entries are missing",
                        path.display(),
                        state.revision
                    )));
                }
                let payload = unseal(v.value(), &format!("log entry {index}"), path)?;
                let cmd: Command = serde_json::from_slice(payload).map_err(|e| {
                    StoreError::Corrupt(format!("log entry {index} in {} cannot be read: {e}", path.display()))
                })?;
                // A command refused when first applied is refused again: replay is deterministic.
                let _ = state.apply(index, &cmd);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(io(e)),
    }
    Ok(state)
}

fn writer(db: Database, path: PathBuf, mut rx: mpsc::UnboundedReceiver<Proposal>, state_tx: watch::Sender<Arc<State>>) {
    let mut since_snapshot = 0u64;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let current = state_tx.borrow().clone();
        let first_index = current.revision + 1;
        if let Err(e) = append(&db, first_index, &batch) {
            tracing::error!(error = %e, path = %path.display(), "log append failed");
            for (_, reply) in batch {
                let _ = reply.send(Err(e.clone()));
            }
            continue;
        }
        let mut next = (*current).clone();
        let mut results = Vec::with_capacity(batch.len());
        for (i, (cmd, _)) in batch.iter().enumerate() {
            let index = first_index + i as u64;
            results.push(next.apply(index, cmd).map(|()| index).map_err(StoreError::from));
        }
        since_snapshot += batch.len() as u64;
        if since_snapshot >= COMPACT_EVERY {
            match snapshot(&db, &next) {
                Ok(()) => since_snapshot = 0,
                Err(e) => tracing::warn!(error = %e, "snapshot failed; the log keeps growing until one succeeds"),
            }
        }
        state_tx.send_replace(Arc::new(next));
        for ((_, reply), result) in batch.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

fn append(db: &Database, first_index: u64, batch: &[Proposal]) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(io)?;
    {
        let mut log = txn.open_table(LOG).map_err(io)?;
        for (i, (cmd, _)) in batch.iter().enumerate() {
            let payload = serde_json::to_vec(cmd).map_err(io)?;
            log.insert(first_index + i as u64, seal(&payload).as_slice()).map_err(io)?;
        }
    }
    // Durability::Immediate is redb's default: commit returns after fsync.
    txn.commit().map_err(io)
}

fn snapshot(db: &Database, state: &State) -> Result<(), StoreError> {
    let payload = serde_json::to_vec(state).map_err(io)?;
    let txn = db.begin_write().map_err(io)?;
    {
        let mut meta = txn.open_table(META).map_err(io)?;
        meta.insert(SNAPSHOT_KEY, seal(&payload).as_slice()).map_err(io)?;
        let mut log = txn.open_table(LOG).map_err(io)?;
        log.retain(|k, _| k > state.revision).map_err(io)?;
    }
    txn.commit().map_err(io)
}

impl Store for LocalStore {
    fn propose(&self, cmd: Command) -> ProposeFuture<'_> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            self.tx.as_ref().ok_or(StoreError::Closed)?.send((cmd, tx)).map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.state.clone()
    }
}

/// Flips a byte of log entry `index` in the store in `dir` (closed), for corruption tests.
#[cfg(test)]
pub(super) fn damage_log_entry(dir: &Path, index: u64) {
    use redb::ReadableTable;
    let db = Database::create(dir.join("store.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut log = txn.open_table(LOG).unwrap();
        let mut bytes = log.get(index).unwrap().unwrap().value().to_vec();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x55;
        log.insert(index, bytes.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Endpoint, Protocol};
    use redb::ReadableTable;

    fn ep(i: u32) -> Command {
        Command::UpsertEndpoint {
            endpoint: Endpoint {
                id: format!("a/default/web/{i}"),
                service: "web.default".into(),
                cluster: "a".into(),
                zone: "z".into(),
                address: format!("127.0.0.1:{}", 1000 + i),
                identity: String::new(),
                healthy: true,
                weight: 1,
                revision: 0,
            },
            protocol: Protocol::Http,
        }
    }

    #[tokio::test]
    async fn survives_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LocalStore::open(dir.path()).unwrap();
            let futs: Vec<_> = (0..200).map(|i| store.propose(ep(i))).collect();
            for f in futs {
                f.await.unwrap();
            }
            assert!(store.propose(Command::DeleteEndpoint { id: "missing".into() }).await.is_err());
            assert_eq!(store.current().endpoints.len(), 200);
        }
        let store = LocalStore::open(dir.path()).unwrap();
        let s = store.current();
        assert_eq!(s.endpoints.len(), 200);
        assert_eq!(s.revision, 201);
        drop(store);
        let snap = {
            let db = Database::create(dir.path().join("store.redb")).unwrap();
            let state = load(&db, dir.path()).unwrap();
            snapshot(&db, &state).unwrap();
            state.revision
        };
        assert_eq!(snap, 201);
        let store = LocalStore::open(dir.path()).unwrap();
        assert_eq!(store.current().endpoints.len(), 200);
        store.propose(ep(500)).await.unwrap();
        assert_eq!(store.current().revision, 202);
    }

    #[tokio::test]
    async fn damaged_entry_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LocalStore::open(dir.path()).unwrap();
            store.propose(ep(1)).await.unwrap();
            store.propose(ep(2)).await.unwrap();
        }
        {
            let db = Database::create(dir.path().join("store.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut log = txn.open_table(LOG).unwrap();
                let mut bytes = log.get(2).unwrap().unwrap().value().to_vec();
                let last = bytes.len() - 2;
                bytes[last] ^= 0x55;
                log.insert(2, bytes.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let Err(err) = LocalStore::open(dir.path()) else { panic!("a damaged log must not open") };
        assert!(matches!(err, StoreError::Corrupt(ref m) if m.contains("log entry 2")), "{err}");
    }
}
