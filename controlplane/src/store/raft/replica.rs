//! One member of the Raft group: `RawNode` plus the state machine, with the ready loop.

use std::collections::HashMap;

use raft::prelude::{ConfChange, ConfChangeV2, Entry, EntryType, HardState, Message, Snapshot};
use raft::{RawNode, StateRole, Storage};

use crate::state::{ApplyError, Command, State};
use crate::store::StoreError;

/// Persistence of the Raft log, hard state and snapshots. `persist` must be durable (fsync)
/// when it returns: messages of the same `Ready` leave only afterwards.
pub trait DurableLog: Storage {
    /// Durably stores a snapshot (if any), then entries, then the hard state.
    fn persist(&self, snapshot: Option<&Snapshot>, entries: &[Entry], hs: Option<&HardState>)
    -> Result<(), StoreError>;
    /// Records a new commit index (from a `LightReady`).
    fn set_commit(&self, commit: u64) -> Result<(), StoreError>;
}

impl DurableLog for raft::storage::MemStorage {
    fn persist(
        &self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hs: Option<&HardState>,
    ) -> Result<(), StoreError> {
        let mut w = self.wl();
        if let Some(s) = snapshot {
            w.apply_snapshot(s.clone()).map_err(|e| StoreError::Io(e.to_string()))?;
        }
        w.append(entries).map_err(|e| StoreError::Io(e.to_string()))?;
        if let Some(hs) = hs {
            w.set_hardstate(hs.clone());
        }
        Ok(())
    }

    fn set_commit(&self, commit: u64) -> Result<(), StoreError> {
        self.wl().mut_hard_state().set_commit(commit);
        Ok(())
    }
}

/// Why a proposal was not accepted by this replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("this instance is not the leader (leader: {leader:?}); forward the write")]
    NotLeader { leader: Option<u64> },
    #[error("the proposal was dropped by raft: {0}")]
    Dropped(String),
}

/// A committed entry applied to the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Log index.
    pub index: u64,
    /// Term of the entry.
    pub term: u64,
    /// CRC32 of the entry's data, so replicas can be compared entry by entry.
    pub digest: u32,
    /// The proposal id, when this replica proposed the entry.
    pub proposal: Option<u64>,
    /// What the state machine said.
    pub result: Result<(), ApplyError>,
}

/// What one round of `ready` produced for the caller to do.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages to send; their entries and hard state are already durable.
    pub messages: Vec<Message>,
    /// Entries applied in this round, in order.
    pub applied: Vec<Applied>,
}

/// Encodes a command as entry data.
pub fn encode(cmd: &Command) -> Vec<u8> {
    serde_json::to_vec(cmd).unwrap_or_default()
}

/// One replica.
pub struct Replica<S: DurableLog> {
    node: RawNode<S>,
    state: State,
    next_proposal: u64,
    /// Proposals of this replica not applied yet, by id.
    pending: HashMap<u64, ()>,
}

impl<S: DurableLog> Replica<S> {
    /// Starts (or restarts) a replica over `storage`. The state machine is rebuilt by re-applying
    /// committed entries (raft-rs re-delivers them from `config.applied`).
    pub fn new(config: &raft::Config, storage: S, logger: &slog::Logger) -> Result<Self, raft::Error> {
        let node = RawNode::new(config, storage, logger)?;
        Ok(Self { node, state: State::default(), next_proposal: 0, pending: HashMap::new() })
    }

    /// The node id.
    pub fn id(&self) -> u64 {
        self.node.raft.id
    }

    /// The applied state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Current term.
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// Whether this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<u64> {
        Some(self.node.raft.leader_id).filter(|l| *l != 0)
    }

    /// Commit index.
    pub fn commit_index(&self) -> u64 {
        self.node.raft.raft_log.committed
    }

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        self.node.tick();
    }

    /// Starts an election now.
    pub fn campaign(&mut self) -> Result<(), raft::Error> {
        self.node.campaign()
    }

    /// Delivers a message from a peer.
    pub fn step(&mut self, m: Message) -> Result<(), raft::Error> {
        self.node.step(m)
    }

    /// Proposes a command; returns its proposal id, reported back in [`Applied::proposal`].
    pub fn propose(&mut self, cmd: &Command) -> Result<u64, ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader { leader: self.leader() });
        }
        self.next_proposal += 1;
        // Ids are unique across the group: the node id in the high bits.
        let id = (self.id() << 48) | self.next_proposal;
        self.node.propose(id.to_be_bytes().to_vec(), encode(cmd)).map_err(|e| ProposeError::Dropped(e.to_string()))?;
        self.pending.insert(id, ());
        Ok(id)
    }

    /// Processes one `Ready`, in raft-rs's documented order, with one deliberate strengthening:
    /// every message (not only the persisted ones) leaves after the snapshot, entries and hard
    /// state of the same `Ready` are durable.
    pub fn ready(&mut self) -> Result<Output, StoreError> {
        let mut out = Output::default();
        if !self.node.has_ready() {
            return Ok(out);
        }
        let mut rd = self.node.ready();
        // 1. Persist: snapshot, entries, hard state (fsync inside `persist`).
        let snapshot = (*rd.snapshot() != Snapshot::default()).then(|| rd.snapshot().clone());
        self.node.store().persist(snapshot.as_ref(), rd.entries(), rd.hs())?;
        if let Some(s) = &snapshot {
            self.restore(s)?;
        }
        // 2. Only now may messages leave.
        out.messages.extend(rd.take_messages());
        out.messages.extend(rd.take_persisted_messages());
        // 3. Apply what is committed.
        let committed = rd.take_committed_entries();
        self.apply(committed, &mut out)?;
        // 4. Advance; the light ready carries a new commit index, messages and more entries.
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.node.store().set_commit(commit)?;
        }
        out.messages.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(committed, &mut out)?;
        self.node.advance_apply();
        Ok(out)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let data = snapshot.get_data();
        if data.is_empty() {
            return Ok(());
        }
        self.state = serde_json::from_slice(data)
            .map_err(|e| StoreError::Corrupt(format!("a received snapshot cannot be read: {e}")))?;
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<(), StoreError> {
        for entry in entries {
            let index = entry.index;
            let proposal = <[u8; 8]>::try_from(entry.context.as_ref()).ok().map(u64::from_be_bytes);
            let result = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => self.state.apply(index, &Command::Noop),
                EntryType::EntryNormal => match serde_json::from_slice::<Command>(&entry.data) {
                    Ok(cmd) => self.state.apply(index, &cmd),
                    // Only our own proposers write entries; an unreadable one is a bug or damage.
                    Err(e) => return Err(StoreError::Corrupt(format!("committed entry {index} cannot be read: {e}"))),
                },
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    protobuf::Message::merge_from_bytes(&mut cc, &entry.data)
                        .map_err(|e| StoreError::Corrupt(format!("conf change {index}: {e}")))?;
                    self.node.apply_conf_change(&cc).map_err(|e| StoreError::Io(e.to_string()))?;
                    self.state.apply(index, &Command::Noop)
                }
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    protobuf::Message::merge_from_bytes(&mut cc, &entry.data)
                        .map_err(|e| StoreError::Corrupt(format!("conf change {index}: {e}")))?;
                    self.node.apply_conf_change(&cc).map_err(|e| StoreError::Io(e.to_string()))?;
                    self.state.apply(index, &Command::Noop)
                }
            };
            let proposal = proposal.filter(|p| self.pending.remove(p).is_some());
            let digest = crc32fast::hash(&entry.data);
            out.applied.push(Applied { index, term: entry.term, digest, proposal, result });
        }
        Ok(())
    }
}
