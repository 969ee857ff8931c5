//! One member of the Raft group: `RawNode` plus the state machine, with the ready loop.

use std::collections::HashMap;

use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType,
    HardState, Message, Snapshot,
};
use raft::{RawNode, ReadState, SnapshotStatus, StateRole, Storage};
use serde::{Deserialize, Serialize};

use crate::state::{ApplyError, Command, Member, State};
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
    #[error("the group has no leader at the moment (an election is under way or a quorum is lost); retry shortly")]
    NoLeader,
    #[error("the proposal was dropped by raft: {0}")]
    Dropped(String),
    #[error("{0}")]
    Membership(String),
    #[error("another membership change is still in progress; retry in a few seconds")]
    ChangeInProgress,
}

/// The context of a configuration change entry: who proposed it and the directory entries of
/// the members it adds, so every replica learns their names and addresses at the same index.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfContext {
    pub proposal: u64,
    #[serde(default)]
    pub members: Vec<Member>,
}

/// One change of membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    AddLearner(u64),
    Promote(u64),
    /// A voter becomes a learner (its seat goes to a better placed member).
    Demote(u64),
    Remove(u64),
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
    /// Confirmed read indexes (ReadIndex), with the context they were requested with.
    pub read_states: Vec<ReadState>,
    /// A configuration change removed this replica from the group.
    pub removed: bool,
    /// The membership changed in this round.
    pub conf_changed: bool,
}

/// Every id a configuration names (voters of either half, learners, learners to be).
fn conf_ids(c: &ConfState) -> std::collections::BTreeSet<u64> {
    c.voters.iter().chain(&c.voters_outgoing).chain(&c.learners).chain(&c.learners_next).copied().collect()
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
        Ok(Self { node, state: State::default(), next_proposal: fastrand::u64(..), pending: HashMap::new() })
    }

    /// Replaces the state machine with the one a snapshot recorded (at restart: raft-rs resumes
    /// after the snapshot's index).
    pub fn restore_state(&mut self, state: State) {
        self.state = state;
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

    /// Sets where this incarnation's proposal ids start (tests use it for determinism).
    pub fn set_proposal_base(&mut self, base: u64) {
        self.next_proposal = base;
    }

    fn next_id(&mut self) -> u64 {
        // Ids must differ across members and across restarts of one member: an entry proposed
        // (and forwarded) before a crash may be applied after it, and must not answer a new
        // proposal. Each incarnation starts at a random 64-bit base.
        self.next_proposal = self.next_proposal.wrapping_add(1);
        self.next_proposal
    }

    fn dropped(e: raft::Error) -> ProposeError {
        match e {
            raft::Error::ProposalDropped => ProposeError::NoLeader,
            e => ProposeError::Dropped(e.to_string()),
        }
    }

    /// Proposes a command; returns its proposal id, reported back in [`Applied::proposal`]. A
    /// follower forwards the proposal to the leader; with no known leader it is refused.
    pub fn propose(&mut self, cmd: &Command) -> Result<u64, ProposeError> {
        if self.leader().is_none() {
            return Err(ProposeError::NoLeader);
        }
        let id = self.next_id();
        self.node.propose(id.to_be_bytes().to_vec(), encode(cmd)).map_err(Self::dropped)?;
        self.pending.insert(id, ());
        Ok(id)
    }

    /// Proposes one membership change through joint consensus (entered and left automatically).
    /// `member` is the directory entry of a member being added.
    pub fn propose_member_change(&mut self, change: MemberChange, member: Option<Member>) -> Result<u64, ProposeError> {
        if self.leader().is_none() {
            return Err(ProposeError::NoLeader);
        }
        // A follower forwards the change; the leader checks again (and turns a change it cannot
        // take into an empty entry, which leaves the proposer to time out).
        let conf = self.conf_state();
        if self.is_leader() && (self.node.raft.has_pending_conf() || !conf.voters_outgoing.is_empty()) {
            return Err(ProposeError::ChangeInProgress);
        }
        let voter = |id: u64| conf.voters.contains(&id);
        let learner = |id: u64| conf.learners.contains(&id);
        let (kind, node) = match change {
            MemberChange::AddLearner(id) => {
                if voter(id) || learner(id) {
                    return Err(ProposeError::Membership(format!("member {id:x} is already in the group")));
                }
                (ConfChangeType::AddLearnerNode, id)
            }
            MemberChange::Promote(id) => {
                if !learner(id) {
                    return Err(ProposeError::Membership(format!("member {id:x} is not a learner")));
                }
                (ConfChangeType::AddNode, id)
            }
            MemberChange::Demote(id) => {
                if !voter(id) {
                    return Err(ProposeError::Membership(format!("member {id:x} is not a voter")));
                }
                if conf.voters.len() <= 2 {
                    return Err(ProposeError::Membership(
                        "a group keeps at least two voters when it demotes one".into(),
                    ));
                }
                (ConfChangeType::AddLearnerNode, id)
            }
            MemberChange::Remove(id) => {
                if !voter(id) && !learner(id) {
                    return Err(ProposeError::Membership(format!("member {id:x} is not in the group")));
                }
                if voter(id) && conf.voters.len() == 1 {
                    return Err(ProposeError::Membership("the last voter cannot be removed".into()));
                }
                (ConfChangeType::RemoveNode, id)
            }
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(kind);
        single.node_id = node;
        let mut cc = ConfChangeV2::default();
        cc.set_transition(ConfChangeTransition::Implicit);
        cc.set_changes(vec![single].into());
        let id = self.next_id();
        let ctx = ConfContext { proposal: id, members: member.into_iter().collect() };
        let ctx = serde_json::to_vec(&ctx).unwrap_or_default();
        self.node.propose_conf_change(ctx, cc).map_err(Self::dropped)?;
        self.pending.insert(id, ());
        Ok(id)
    }

    /// Asks for a read index; the answer comes back in [`Output::read_states`] with `ctx`.
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.node.read_index(ctx);
    }

    /// Hands leadership to `to`.
    pub fn transfer_leader(&mut self, to: u64) {
        self.node.transfer_leader(to);
    }

    /// A peer could not be reached.
    pub fn report_unreachable(&mut self, id: u64) {
        self.node.report_unreachable(id);
    }

    /// How sending a snapshot to `id` ended.
    pub fn report_snapshot(&mut self, id: u64, status: SnapshotStatus) {
        self.node.report_snapshot(id, status);
    }

    /// Forgets a proposal whose caller gave up waiting.
    pub fn forget(&mut self, proposal: u64) {
        self.pending.remove(&proposal);
    }

    /// The raft node, for status.
    pub fn raw(&self) -> &RawNode<S> {
        &self.node
    }

    /// The current configuration.
    pub fn conf_state(&self) -> ConfState {
        self.node.raft.prs().conf().to_conf_state()
    }

    /// Whether `id` is in the current configuration (voter or learner, either side of a joint one).
    pub fn in_conf(&self, id: u64) -> bool {
        let c = self.conf_state();
        [&c.voters, &c.learners, &c.voters_outgoing, &c.learners_next].iter().any(|l| l.contains(&id))
    }

    /// Index of the last applied entry.
    pub fn applied(&self) -> u64 {
        self.node.raft.raft_log.applied
    }

    /// Role name for status.
    pub fn role(&self) -> &'static str {
        match self.node.raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        }
    }

    /// Processes one `Ready`, in raft-rs's documented order, collecting every message in
    /// [`Output::messages`] (sent after persistence).
    pub fn ready(&mut self) -> Result<Output, StoreError> {
        let mut early = Vec::new();
        let mut out = self.ready_with(|m| early.extend(m))?;
        early.append(&mut out.messages);
        out.messages = early;
        Ok(out)
    }

    /// Processes one `Ready`, in raft-rs's documented order: the messages raft-rs allows to leave
    /// before persistence (a leader's appends and heartbeats: the leader writes its log in
    /// parallel with its followers, Raft thesis §10.2.1) go to `send_early` first; then the
    /// snapshot, entries and hard state are persisted (fsync inside `persist`); only then do the
    /// others (votes, append responses) leave, in [`Output::messages`].
    pub fn ready_with(&mut self, send_early: impl FnOnce(Vec<Message>)) -> Result<Output, StoreError> {
        let mut out = Output::default();
        if !self.node.has_ready() {
            return Ok(out);
        }
        let mut rd = self.node.ready();
        let early = rd.take_messages();
        if !early.is_empty() {
            send_early(early);
        }
        // 1. Persist: snapshot, entries, hard state.
        let snapshot = (*rd.snapshot() != Snapshot::default()).then(|| rd.snapshot().clone());
        self.node.store().persist(snapshot.as_ref(), rd.entries(), rd.hs())?;
        if let Some(s) = &snapshot {
            self.restore(s)?;
        }
        // 2. Messages that needed the persistence.
        out.read_states.extend(rd.take_read_states());
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

    /// Applies a configuration change to raft and the member directory to the state.
    fn apply_conf_change(
        &mut self,
        index: u64,
        cc: ConfChangeV2,
        context: &[u8],
        out: &mut Output,
    ) -> Result<Result<(), ApplyError>, StoreError> {
        let before = conf_ids(&self.conf_state());
        let after = conf_ids(
            &self.node.apply_conf_change(&cc).map_err(|e| StoreError::Io(format!("conf change {index}: {e}")))?,
        );
        out.conf_changed = true;
        let mut result = self.state.apply(index, &Command::Noop);
        let ctx: ConfContext = serde_json::from_slice(context).unwrap_or_default();
        for m in ctx.members {
            result = result.and(self.state.apply(index, &Command::SetMember(m)));
        }
        // A member is gone only once no part of the configuration names it: while a joint
        // configuration still counts it among the outgoing voters, it must keep taking part.
        for id in before.difference(&after) {
            if *id == self.id() {
                out.removed = true;
            }
            // A member may have no directory entry (e.g. removed before it was recorded).
            let _ = self.state.apply(index, &Command::RemoveMember { id: *id });
        }
        Ok(result)
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<(), StoreError> {
        for entry in entries {
            let index = entry.index;
            let proposal = <[u8; 8]>::try_from(entry.context.as_ref()).ok().map(u64::from_be_bytes);
            let result = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => self.state.apply(index, &Command::Noop),
                EntryType::EntryNormal => match serde_json::from_slice::<Command>(&entry.data) {
                    // The directory names members of the configuration only: a removed member
                    // that still runs cannot write itself back.
                    Ok(Command::SetMember(m)) if !self.in_conf(m.id) => {
                        self.state.revision = index;
                        Err(ApplyError::Invalid(format!("{:x} is not a member of the group", m.id)))
                    }
                    Ok(cmd) => self.state.apply(index, &cmd),
                    // Only our own proposers write entries; an unreadable one is a bug or damage.
                    Err(e) => return Err(StoreError::Corrupt(format!("committed entry {index} cannot be read: {e}"))),
                },
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    protobuf::Message::merge_from_bytes(&mut cc, &entry.data)
                        .map_err(|e| StoreError::Corrupt(format!("conf change {index}: {e}")))?;
                    {
                        let mut single = ConfChangeSingle::default();
                        single.set_change_type(cc.get_change_type());
                        single.node_id = cc.node_id;
                        let mut v2 = ConfChangeV2::default();
                        v2.set_changes(vec![single].into());
                        self.apply_conf_change(index, v2, &entry.context, out)?
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    protobuf::Message::merge_from_bytes(&mut cc, &entry.data)
                        .map_err(|e| StoreError::Corrupt(format!("conf change {index}: {e}")))?;
                    self.apply_conf_change(index, cc, &entry.context, out)?
                }
            };
            let proposal = match entry.get_entry_type() {
                EntryType::EntryNormal => proposal,
                _ => serde_json::from_slice::<ConfContext>(&entry.context).ok().map(|c| c.proposal),
            };
            let proposal = proposal.filter(|p| self.pending.remove(p).is_some());
            let digest = crc32fast::hash(&entry.data);
            out.applied.push(Applied { index, term: entry.term, digest, proposal, result });
        }
        Ok(())
    }
}
