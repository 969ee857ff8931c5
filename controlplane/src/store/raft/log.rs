//! The durable Raft log on redb: entries, hard state and the latest snapshot in one file, each
//! value sealed with a CRC32 so damage is reported instead of replayed.
//!
//! Reads that raft-rs makes on its hot path (`entries`, `term`, indexes) are served from an
//! in-memory mirror (`MemStorage`), rebuilt from the file at open; every write reaches the file
//! first (one redb transaction, fsync on commit) and the mirror second, so the mirror never holds
//! anything that is not durable. Snapshots carry the serialized state machine and are written by
//! [`RedbLog::compact`], which also drops the entries they cover.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};
use redb::{Database, ReadableDatabase, TableDefinition};

use super::replica::DurableLog;
use crate::store::StoreError;
use crate::store::codec::{seal, unseal};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAPSHOT: &str = "snapshot";
const NODE_ID: &str = "node_id";

/// A Raft log stored in redb.
pub struct RedbLog {
    db: Database,
    path: PathBuf,
    mirror: MemStorage,
    /// The latest snapshot, with state machine data, served to lagging followers.
    snapshot: Mutex<Option<Snapshot>>,
    /// This member's Raft id, recorded when the log was created.
    node_id: Option<u64>,
    /// A follower needs a snapshot newer than the stored one.
    snapshot_wanted: std::sync::atomic::AtomicBool,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl RedbLog {
    /// Opens (or creates) the log in `dir`. A new log starts with `initial` as its configuration;
    /// an existing one keeps its own.
    pub fn open(dir: &Path, initial: &ConfState) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("raft.redb");
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => io(format!(
                "{} is in use by another trellis-cp; stop it first or give this one its own --data-dir",
                path.display()
            )),
            redb::DatabaseError::Storage(redb::StorageError::Corrupted(m)) => StoreError::Corrupt(format!(
                "{}: {m}; the file was damaged. Remove this instance's data directory and let it rejoin the group",
                path.display()
            )),
            other => io(format!("cannot open {}: {other}", path.display())),
        })?;
        let mirror = MemStorage::new();
        let mut snapshot = None;
        let node_id;
        let fresh;
        {
            let txn = db.begin_read().map_err(io)?;
            let read = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
                match txn.open_table(META) {
                    Ok(t) => match t.get(key).map_err(io)? {
                        Some(v) => Ok(Some(unseal(v.value()).map_err(|_| damaged(&path, key))?.to_vec())),
                        None => Ok(None),
                    },
                    Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
                    Err(e) => Err(io(e)),
                }
            };
            let hs = read(HARD_STATE)?;
            fresh = hs.is_none();
            let mut w = mirror.wl();
            let mut after = 0;
            if let Some(bytes) = read(SNAPSHOT)? {
                let s = Snapshot::parse_from_bytes(&bytes).map_err(|_| damaged(&path, SNAPSHOT))?;
                w.apply_snapshot(s.clone()).map_err(io)?;
                after = s.get_metadata().index;
                snapshot = Some(s);
            }
            node_id = read(NODE_ID)?
                .map(|b| <[u8; 8]>::try_from(b.as_slice()).map(u64::from_be_bytes).map_err(|_| damaged(&path, NODE_ID)))
                .transpose()?;
            match read(CONF_STATE)? {
                Some(bytes) => {
                    w.set_conf_state(ConfState::parse_from_bytes(&bytes).map_err(|_| damaged(&path, CONF_STATE))?)
                }
                None => w.set_conf_state(initial.clone()),
            }
            if let Ok(t) = txn.open_table(ENTRIES) {
                let mut entries = Vec::new();
                // Entries the snapshot covers stay in the file as a tail for slow followers; the
                // mirror starts after the snapshot.
                for item in t.range(after + 1..).map_err(io)? {
                    let (k, v) = item.map_err(io)?;
                    let key = format!("entry {}", k.value());
                    let payload = unseal(v.value()).map_err(|_| damaged(&path, &key))?;
                    entries.push(Entry::parse_from_bytes(payload).map_err(|_| damaged(&path, &key))?);
                }
                w.append(&entries).map_err(io)?;
            }
            if let Some(bytes) = hs {
                let mut hs = HardState::parse_from_bytes(&bytes).map_err(|_| damaged(&path, HARD_STATE))?;
                // Whatever a snapshot covers is committed.
                hs.commit = hs.commit.max(after);
                w.set_hardstate(hs);
            }
        }
        let log =
            Self { db, path, mirror, snapshot: Mutex::new(snapshot), node_id, snapshot_wanted: Default::default() };
        if fresh {
            log.write(|meta, _| {
                meta.insert(CONF_STATE, seal(&encode(initial)?).as_slice()).map_err(io)?;
                Ok(())
            })?;
        }
        Ok(log)
    }

    /// Starts a new group whose only voter is `id`: the log begins with a snapshot at index 1
    /// holding that configuration (and an empty state). Members that join later start from
    /// this snapshot or a later one, so they learn the first configuration like any other.
    pub fn bootstrap(&self, id: u64) -> Result<(), StoreError> {
        let mut s = Snapshot::default();
        let meta = s.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.set_conf_state(ConfState::from((vec![id], vec![])));
        let hs = HardState { term: 1, vote: 0, commit: 1, ..Default::default() };
        self.persist(Some(&s), &[], Some(&hs))
    }

    /// Index of the stored snapshot (0 when there is none), without copying it.
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|s| s.get_metadata().index).unwrap_or(0)
    }

    /// Whether a follower asked for a snapshot newer than the stored one (and clears the request).
    pub fn take_snapshot_request(&self) -> bool {
        self.snapshot_wanted.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// The Raft id recorded in this log, if any.
    pub fn node_id(&self) -> Option<u64> {
        self.node_id
    }

    /// Records this member's Raft id (once, when the log is created).
    pub fn set_node_id(&mut self, id: u64) -> Result<(), StoreError> {
        self.write(|meta, _| {
            meta.insert(NODE_ID, seal(&id.to_be_bytes()).as_slice()).map_err(io)?;
            Ok(())
        })?;
        self.node_id = Some(id);
        Ok(())
    }

    /// Records a snapshot of the state machine at `index` (applied, so committed) with the
    /// configuration `conf` in force there, and drops the entries it covers except the last
    /// `keep`, which let a follower slightly behind catch up without a snapshot. `data` is the
    /// serialized state.
    pub fn compact(&self, index: u64, data: Vec<u8>, conf: ConfState, keep: u64) -> Result<(), StoreError> {
        let term = self.mirror.term(index).map_err(io)?;
        let mut s = Snapshot::default();
        s.set_data(data.into());
        let meta = s.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf.clone());
        let bytes = encode(&s)?;
        let conf_bytes = encode(&conf)?;
        let drop_through = index.saturating_sub(keep);
        // The snapshot's index is applied, so committed: the stored commit index must not trail
        // it, or raft-rs refuses the log at the next start.
        let mut hs = self.mirror.initial_state().map_err(io)?.hard_state;
        hs.commit = hs.commit.max(index);
        let hs_bytes = encode(&hs)?;
        self.write(|meta_t, entries| {
            meta_t.insert(SNAPSHOT, seal(&bytes).as_slice()).map_err(io)?;
            meta_t.insert(CONF_STATE, seal(&conf_bytes).as_slice()).map_err(io)?;
            meta_t.insert(HARD_STATE, seal(&hs_bytes).as_slice()).map_err(io)?;
            entries.retain(|k, _| k > drop_through).map_err(io)?;
            Ok(())
        })?;
        // MemStorage discards the entries before its argument.
        let first = self.mirror.first_index().map_err(io)?;
        if drop_through + 1 > first {
            self.mirror.wl().compact(drop_through + 1).map_err(io)?;
        }
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
        Ok(())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(
        &self,
        f: impl FnOnce(&mut redb::Table<'_, &str, &[u8]>, &mut redb::Table<'_, u64, &[u8]>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.write_with(true, f)
    }

    /// One transaction; `durable` makes commit return after fsync. A non-durable commit is
    /// atomic and becomes durable with the next durable one.
    fn write_with(
        &self,
        durable: bool,
        f: impl FnOnce(&mut redb::Table<'_, &str, &[u8]>, &mut redb::Table<'_, u64, &[u8]>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(io)?;
        if !durable {
            txn.set_durability(redb::Durability::None).map_err(io)?;
        }
        {
            let mut meta = txn.open_table(META).map_err(io)?;
            let mut entries = txn.open_table(ENTRIES).map_err(io)?;
            f(&mut meta, &mut entries)?;
        }
        txn.commit().map_err(io)
    }
}

fn encode(m: &impl protobuf::Message) -> Result<Vec<u8>, StoreError> {
    m.write_to_bytes().map_err(io)
}

fn damaged(path: &Path, what: &str) -> StoreError {
    StoreError::Corrupt(format!(
        "{what} in {} fails its checksum or cannot be decoded; the file was damaged. Remove this \
         instance's data directory and let it catch up from the group (it receives a snapshot)",
        path.display()
    ))
}

impl DurableLog for RedbLog {
    fn persist(
        &self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hs: Option<&HardState>,
    ) -> Result<(), StoreError> {
        if snapshot.is_none() && entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let snap_bytes = snapshot.map(encode).transpose()?;
        let conf_bytes = snapshot.map(|s| encode(s.get_metadata().get_conf_state())).transpose()?;
        let encoded =
            entries.iter().map(|e| Ok((e.index, seal(&encode(e)?)))).collect::<Result<Vec<_>, StoreError>>()?;
        // Only the commit index may be lost in a crash (it is learned again from the leader, and
        // the state machine is rebuilt from the log): a Ready that changes nothing else stays in
        // memory until the next write that must be durable.
        let current = self.mirror.initial_state().map_err(io)?.hard_state;
        let durable = snapshot.is_some()
            || !entries.is_empty()
            || hs.is_some_and(|h| h.term != current.term || h.vote != current.vote);
        if !durable {
            return self.mirror.persist(None, &[], hs);
        }
        // The hard state written is this Ready's, or the current one (with the latest commit
        // index). A leader may know an index committed by its followers before its own copy is
        // durable: the file never records a commit index beyond the entries it holds, or a
        // restart would refuse the log.
        let mut to_write = hs.cloned().unwrap_or(current);
        let last = entries
            .last()
            .map(|e| e.index)
            .or_else(|| snapshot.map(|s| s.get_metadata().index))
            .unwrap_or(self.mirror.last_index().map_err(io)?);
        to_write.commit = to_write.commit.min(last);
        let hs_bytes = Some(encode(&to_write)?);
        self.write_with(true, |meta, table| {
            if let (Some(_), Some(bytes), Some(conf)) = (snapshot, &snap_bytes, &conf_bytes) {
                meta.insert(SNAPSHOT, seal(bytes).as_slice()).map_err(io)?;
                meta.insert(CONF_STATE, seal(conf).as_slice()).map_err(io)?;
                // A snapshot from the leader replaces the whole log: entries this member held
                // beyond it may be from older terms and must not come back at the next start.
                table.retain(|_, _| false).map_err(io)?;
            }
            if let Some((first, _)) = encoded.first() {
                // A new leader may overwrite a suffix: entries from `first` on are replaced.
                let first = *first;
                table.retain(|k, _| k < first).map_err(io)?;
                for (index, bytes) in &encoded {
                    table.insert(*index, bytes.as_slice()).map_err(io)?;
                }
            }
            if let Some(bytes) = &hs_bytes {
                meta.insert(HARD_STATE, seal(bytes).as_slice()).map_err(io)?;
            }
            Ok(())
        })?;
        self.mirror.persist(snapshot, entries, hs)?;
        if let Some(s) = snapshot {
            *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
        }
        Ok(())
    }

    fn set_commit(&self, commit: u64) -> Result<(), StoreError> {
        // The commit index is not written here: it goes to the file with the next hard state that
        // must be durable anyway. A restart with an older commit index is safe: the state machine
        // is rebuilt from the log and the leader says again what is committed.
        self.mirror.set_commit(commit)
    }
}

impl Storage for RedbLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mirror.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mirror.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mirror.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mirror.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mirror.last_index()
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let includes = |s: &Snapshot| {
            let c = s.get_metadata().get_conf_state();
            to == 0 || [&c.voters, &c.learners, &c.voters_outgoing, &c.learners_next].iter().any(|l| l.contains(&to))
        };
        match self.snapshot.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(s) if s.get_metadata().index >= request_index && includes(s) => Ok(s.clone()),
            // A member the snapshot does not know (it joined after) would refuse it: the driver
            // writes a fresh one, and raft-rs asks again.
            _ => {
                self.snapshot_wanted.store(true, std::sync::atomic::Ordering::Relaxed);
                Err(raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable))
            }
        }
    }
}

/// Flips a byte of entry `index` in the log under `dir`, as disk damage would (tests only).
#[cfg(any(test, feature = "testing"))]
pub fn damage_entry(dir: &Path, index: u64) {
    use redb::ReadableTable as _;
    let db = Database::create(dir.join("raft.redb")).expect("open the log to damage it");
    let txn = db.begin_write().expect("write transaction");
    {
        let mut t = txn.open_table(ENTRIES).expect("entries table");
        let mut bytes = t.get(index).expect("read").expect("the entry exists").value().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        t.insert(index, bytes.as_slice()).expect("write");
    }
    txn.commit().expect("commit");
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTable;

    fn entry(index: u64, term: u64, data: &str) -> Entry {
        Entry { index, term, data: data.as_bytes().to_vec().into(), ..Default::default() }
    }

    fn voters() -> ConfState {
        ConfState::from((vec![1, 2, 3], vec![]))
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit, ..Default::default() }
    }

    #[test]
    fn entries_and_hard_state_survive_reopen_and_conflicts_truncate() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RedbLog::open(dir.path(), &voters()).unwrap();
            let es: Vec<Entry> = (1..=5).map(|i| entry(i, 1, "a")).collect();
            log.persist(None, &es, Some(&hs(1, 2, 3))).unwrap();
            // A new leader in term 2 overwrites from index 4.
            log.persist(None, &[entry(4, 2, "b")], Some(&hs(2, 3, 3))).unwrap();
            // A commit index alone is not written; it goes with the next durable write.
            log.set_commit(4).unwrap();
        }
        let log = RedbLog::open(dir.path(), &ConfState::default()).unwrap();
        assert_eq!(log.last_index().unwrap(), 4, "entry 5 of the old term must be gone");
        assert_eq!(log.term(4).unwrap(), 2);
        let st = log.initial_state().unwrap();
        assert_eq!((st.hard_state.term, st.hard_state.vote, st.hard_state.commit), (2, 3, 3));
        log.set_commit(4).unwrap();
        // A leader may know a commit index beyond its own durable entries: the file is clamped.
        log.set_commit(9).unwrap();
        log.persist(None, &[entry(5, 2, "c")], None).unwrap();
        drop(log);
        let log = RedbLog::open(dir.path(), &ConfState::default()).unwrap();
        let st = log.initial_state().unwrap();
        assert_eq!((st.hard_state.term, st.hard_state.commit, log.last_index().unwrap()), (2, 5, 5));
        assert_eq!(st.conf_state.voters, vec![1, 2, 3], "the first configuration is kept");
        let es = log.entries(1, 6, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(es.iter().map(|e| e.term).collect::<Vec<_>>(), vec![1, 1, 1, 2, 2]);
    }

    #[test]
    fn compaction_keeps_a_snapshot_with_the_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RedbLog::open(dir.path(), &voters()).unwrap();
            let es: Vec<Entry> = (1..=10).map(|i| entry(i, 1, "x")).collect();
            log.persist(None, &es, Some(&hs(1, 1, 10))).unwrap();
            log.compact(8, b"state at 8".to_vec(), voters(), 0).unwrap();
            assert_eq!(log.first_index().unwrap(), 9);
            assert_eq!(log.snapshot(8, 2).unwrap().get_data(), b"state at 8");
            assert!(log.snapshot(9, 2).is_err(), "no snapshot covers index 9 yet");
        }
        let log = RedbLog::open(dir.path(), &voters()).unwrap();
        assert_eq!(log.first_index().unwrap(), 9);
        assert_eq!(log.last_index().unwrap(), 10);
        let s = log.snapshot(8, 2).unwrap();
        assert_eq!((s.get_metadata().index, s.get_data()), (8, b"state at 8".as_slice()));
    }

    #[test]
    fn a_damaged_entry_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RedbLog::open(dir.path(), &voters()).unwrap();
            log.persist(None, &[entry(1, 1, "a"), entry(2, 1, "b")], Some(&hs(1, 1, 1))).unwrap();
            let txn = log.db.begin_write().unwrap();
            {
                let mut t = txn.open_table(ENTRIES).unwrap();
                let mut bytes = t.get(2).unwrap().unwrap().value().to_vec();
                let last = bytes.len() - 1;
                bytes[last] ^= 0xff;
                t.insert(2, bytes.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let Err(e) = RedbLog::open(dir.path(), &voters()) else { panic!("a damaged log must not open") };
        assert!(matches!(e, StoreError::Corrupt(ref m) if m.contains("entry 2")), "{e}");
    }

    #[test]
    fn a_replica_restarts_from_the_redb_log() {
        use crate::state::Command;
        use crate::store::raft::Replica;
        let dir = tempfile::tempdir().unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let cfg = raft::Config { id: 1, election_tick: 10, heartbeat_tick: 3, ..Default::default() };
        let single = ConfState::from((vec![1], vec![]));
        {
            let mut r = Replica::new(&cfg, RedbLog::open(dir.path(), &single).unwrap(), &logger).unwrap();
            r.campaign().unwrap();
            r.ready().unwrap();
            assert!(r.is_leader());
            for _ in 0..5 {
                r.propose(&Command::Noop).unwrap();
                let out = r.ready().unwrap();
                assert!(out.messages.is_empty(), "a single voter sends nothing");
            }
            while r.state().revision < 6 {
                r.ready().unwrap();
            }
        }
        let mut r = Replica::new(&cfg, RedbLog::open(dir.path(), &single).unwrap(), &logger).unwrap();
        r.campaign().unwrap();
        let mut applied = 0;
        for _ in 0..5 {
            applied += r.ready().unwrap().applied.len();
        }
        assert!(r.state().revision >= 6, "committed entries are applied again after restart");
        assert!(applied >= 6);
    }
}
