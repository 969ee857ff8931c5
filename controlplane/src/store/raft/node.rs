//! The production driver: one thread per instance owns the [`Replica`] over its [`RedbLog`],
//! ticks it, feeds it messages and requests from bounded queues, runs the ready loop (in raft-rs's
//! documented order, see [`Replica::ready_with`]) and answers proposers once their entry is applied.
//!
//! Writes from any member are forwarded to the leader by Raft itself; the proposer learns the
//! outcome when it applies the entry (the proposal id travels in the entry's context). Reads for
//! proxies come from the local replica; linearizable reads use ReadIndex. The thread owns no
//! sockets: messages go through a [`Transport`], and peers' messages and reports come back
//! through a [`RaftHandle`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::pin::Pin;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use raft::prelude::{ConfState, Message};
use raft::{SnapshotStatus, Storage};
use tokio::sync::{oneshot, watch};

use super::log::RedbLog;
use super::replica::{MemberChange, ProposeError, Replica};
use crate::state::{Command, Member, State};
use crate::store::{ProposeFuture, ReadFuture, Store, StoreError};

/// Timing and sizes of a member. The defaults suit a LAN or one machine: 100 ms ticks, an
/// election timeout drawn from 1–2 s, heartbeats every 200 ms.
#[derive(Debug, Clone)]
pub struct RaftOptions {
    pub tick: Duration,
    /// Ticks without a heartbeat before a follower campaigns (randomized up to twice this).
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots.
    pub compact_every: u64,
    /// Entries kept behind a snapshot for followers that are a little behind.
    pub keep_entries: u64,
    /// How long a proposer waits for its entry to be applied.
    pub propose_timeout: Duration,
    /// How long a linearizable read waits for the leader's confirmation.
    pub read_timeout: Duration,
    /// Capacity of the request and message queue.
    pub queue: usize,
}

impl Default for RaftOptions {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_every: 10_000,
            keep_entries: 1_000,
            propose_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(3),
            queue: 8_192,
        }
    }
}

/// Sends Raft messages to peers. `send` must not block: a full queue drops messages (Raft
/// retransmits), and failures are reported through the [`RaftHandle`] the transport was built with.
pub trait Transport: Send + 'static {
    fn send(&mut self, messages: Vec<Message>);
}

/// A transport for a group of one: there is nobody to send to.
pub struct NoPeers;

impl Transport for NoPeers {
    fn send(&mut self, messages: Vec<Message>) {
        if !messages.is_empty() {
            tracing::debug!(count = messages.len(), "no peers to send raft messages to");
        }
    }
}

/// What one member reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: u64,
    pub role: &'static str,
    pub term: u64,
    /// 0 when no leader is known.
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Leader only: replicated index per member.
    pub matched: BTreeMap<u64, u64>,
    /// This member was removed from the group.
    pub removed: bool,
    /// The member stopped because its log cannot be written or read; it serves nothing.
    pub fatal: Option<String>,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Event {
    Message(Box<Message>),
    Propose(Command, Reply<u64>),
    Read(Reply<u64>),
    Member(MemberChange, Option<Member>, Reply<u64>),
    Transfer(u64),
    Campaign,
    Unreachable(u64),
    Snapshot(u64, SnapshotStatus),
    Removed,
    Stop,
}

/// How the rest of the process reaches the driver thread. Cheap to clone.
#[derive(Clone)]
pub struct RaftHandle {
    tx: SyncSender<Event>,
    id: u64,
    status: watch::Receiver<Arc<NodeStatus>>,
}

/// The queue is full or the member stopped.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the raft queue is full or closed")]
pub struct Busy;

impl RaftHandle {
    /// This member's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// This member's latest status.
    pub fn status(&self) -> Arc<NodeStatus> {
        self.status.borrow().clone()
    }

    /// Changes of this member's status.
    pub fn watch_status(&self) -> watch::Receiver<Arc<NodeStatus>> {
        self.status.clone()
    }

    /// Delivers a message from a peer; drops it when the queue is full.
    pub fn step(&self, m: Message) -> Result<(), Busy> {
        self.tx.try_send(Event::Message(Box::new(m))).map_err(|_| Busy)
    }

    /// A member of the group said this one is no longer part of it.
    pub fn removed(&self) {
        let _ = self.tx.try_send(Event::Removed);
    }

    /// A peer could not be reached.
    pub fn unreachable(&self, id: u64) {
        let _ = self.tx.try_send(Event::Unreachable(id));
    }

    /// How sending a snapshot to `id` ended.
    pub fn snapshot_status(&self, id: u64, status: SnapshotStatus) {
        // Losing this report would stall the follower: block for room rather than drop it.
        let _ = self.tx.send(Event::Snapshot(id, status));
    }

    fn request<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Event,
    ) -> Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>> {
        let (reply, rx) = oneshot::channel();
        let sent = match self.tx.try_send(make(reply)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                Err(StoreError::Unavailable("the control plane is overloaded (raft queue full); retry".into()))
            }
            Err(TrySendError::Disconnected(_)) => Err(StoreError::Closed),
        };
        Box::pin(async move {
            sent?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    /// Adds a learner, waiting (up to 30 s) while another membership change or an election is
    /// under way.
    pub async fn add_learner(&self, member: Member) -> Result<u64, StoreError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.change_membership(MemberChange::AddLearner(member.id), Some(member.clone())).await {
                Err(StoreError::Busy(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    /// Proposes a membership change; resolves with its index once applied here.
    pub fn change_membership(
        &self,
        change: MemberChange,
        member: Option<Member>,
    ) -> Pin<Box<dyn Future<Output = Result<u64, StoreError>> + Send>> {
        self.request(move |r| Event::Member(change, member, r))
    }

    /// Asks the leader to hand leadership to `to`.
    pub fn transfer_leader(&self, to: u64) {
        let _ = self.tx.try_send(Event::Transfer(to));
    }

    /// Starts an election on this member now.
    pub fn campaign(&self) {
        let _ = self.tx.try_send(Event::Campaign);
    }
}

/// The Raft-replicated store.
pub struct RaftStore {
    handle: RaftHandle,
    state: watch::Receiver<Arc<State>>,
    status: watch::Receiver<Arc<NodeStatus>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for RaftStore {
    /// Stops the driver and waits for it, so the log file is released when the store is gone.
    fn drop(&mut self) {
        let _ = self.handle.tx.send(Event::Stop);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// How a member starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// A new group whose only voter is this new member.
    Bootstrap,
    /// A new member admitted by the group as `id`; it starts empty and learns from the leader.
    Join { id: u64 },
    /// An existing member, from its log.
    Restart,
}

/// A random non-zero Raft id.
pub fn new_member_id() -> u64 {
    fastrand::u64(1..u64::MAX >> 1)
}

/// A random Raft id no member of `state` has.
pub fn new_member_id_for(state: &State) -> u64 {
    loop {
        let id = new_member_id();
        if !state.members.contains_key(&id) {
            return id;
        }
    }
}

impl RaftStore {
    /// Whether `dir` holds a member's log.
    pub fn exists(dir: &Path) -> bool {
        dir.join("raft.redb").exists()
    }

    /// Opens the log in `dir` and starts the driver thread. `transport` is built with the handle
    /// through which it reports back.
    pub fn open(
        dir: &Path,
        start: Start,
        options: RaftOptions,
        transport: impl FnOnce(RaftHandle) -> Box<dyn Transport>,
    ) -> Result<Self, StoreError> {
        if matches!(start, Start::Restart) && !Self::exists(dir) {
            return Err(StoreError::Io(format!("{} holds no control-plane log to restart from", dir.display())));
        }
        if !matches!(start, Start::Restart) && Self::exists(dir) {
            return Err(StoreError::Io(format!(
                "{} already holds a control-plane log; start without a join token to restart this member, \
                 or use an empty --data-dir",
                dir.display()
            )));
        }
        let id = match start {
            Start::Bootstrap => Some(new_member_id()),
            Start::Join { id } => Some(id),
            Start::Restart => None,
        };
        let mut log = RedbLog::open(dir, &ConfState::default())?;
        if let (Start::Bootstrap, Some(id)) = (&start, id) {
            log.bootstrap(id)?;
        }
        let id = match (id, log.node_id()) {
            (Some(id), None) => {
                log.set_node_id(id)?;
                id
            }
            (_, Some(id)) => id,
            (None, None) => {
                return Err(StoreError::Corrupt(format!(
                    "{} has no member id; the log was created by an interrupted start. Remove it and join again",
                    log.path().display()
                )));
            }
        };
        let applied = log.snapshot_index();
        let config = raft::Config {
            id,
            election_tick: options.election_ticks,
            heartbeat_tick: options.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            max_uncommitted_size: 64 << 20,
            ..Default::default()
        };
        config.validate().map_err(|e| StoreError::Io(format!("raft configuration: {e}")))?;
        let logger = super::logger();
        let mut replica = Replica::new(&config, log, &logger).map_err(|e| StoreError::Io(format!("raft: {e}")))?;
        if let Some(s) = replica_snapshot_state(&replica)? {
            replica.restore_state(s);
        }
        let (tx, rx) = sync_channel(options.queue);
        let (status_tx, status_rx) = watch::channel(Arc::new(NodeStatus { id, ..Default::default() }));
        let handle = RaftHandle { tx, id, status: status_rx.clone() };
        // Apply what is committed before anything else can happen (no tick, no campaign): a
        // restarted member must know its latest configuration before it may vote or campaign.
        let first = replica.ready()?;
        let (state_tx, state_rx) = watch::channel(Arc::new(replica.state().clone()));
        let transport = transport(handle.clone());
        let mut driver = Driver {
            replica,
            rx,
            transport,
            options,
            state_tx,
            status_tx,
            waiting: HashMap::new(),
            reads: HashMap::new(),
            confirmed_reads: Vec::new(),
            next_read: 0,
            published: 0,
            removed: false,
            last_promote_check: Instant::now(),
        };
        driver.transport.send(first.messages);
        if driver.replica.conf_state().voters == [id] && matches!(start, Start::Bootstrap | Start::Restart) {
            // A group of one elects itself at once instead of waiting out an election timeout,
            // and applies its term's first entry before it is handed out.
            let _ = driver.replica.campaign();
            for _ in 0..8 {
                let out = driver.replica.ready()?;
                driver.transport.send(out.messages);
                if driver.replica.applied() >= driver.replica.raw().raft.raft_log.last_index() {
                    break;
                }
            }
        }
        driver.publish();
        let thread = std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || driver.run())
            .map_err(|e| StoreError::Io(format!("cannot start the raft thread: {e}")))?;
        Ok(Self { handle, state: state_rx, status: status_rx, thread: Mutex::new(Some(thread)) })
    }

    /// The handle to the driver (for the transport's server side and membership).
    pub fn handle(&self) -> RaftHandle {
        self.handle.clone()
    }

    /// This member's id.
    pub fn id(&self) -> u64 {
        self.handle.id
    }

    /// This member's status.
    pub fn status(&self) -> watch::Receiver<Arc<NodeStatus>> {
        self.status.clone()
    }

    /// Waits until this member knows a leader (or `timeout` passes).
    pub async fn wait_leader(&self, timeout: Duration) -> Result<u64, StoreError> {
        let mut rx = self.status.clone();
        let wait = rx.wait_for(|s| s.leader != 0 || s.fatal.is_some());
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(s)) => match &s.fatal {
                Some(f) => Err(StoreError::Io(f.clone())),
                None => Ok(s.leader),
            },
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no leader after {} s: fewer than a quorum of members are reachable",
                timeout.as_secs()
            ))),
        }
    }
}

fn replica_snapshot_state(replica: &Replica<RedbLog>) -> Result<Option<State>, StoreError> {
    let Ok(s) = replica.raw().store().snapshot(0, 0) else { return Ok(None) };
    if s.get_data().is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(s.get_data()).map(Some).map_err(|e| {
        StoreError::Corrupt(format!(
            "the snapshot in the control-plane log cannot be read: {e}; remove the data directory and rejoin"
        ))
    })
}

impl Store for RaftStore {
    fn propose(&self, cmd: Command) -> ProposeFuture<'_> {
        self.handle.request(|r| Event::Propose(cmd, r))
    }

    fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.state.clone()
    }

    fn read(&self) -> ReadFuture<'_> {
        let index = self.handle.request(Event::Read);
        let mut rx = self.state.clone();
        Box::pin(async move {
            let index = index.await?;
            let state = rx.wait_for(|s| s.revision >= index).await.map_err(|_| StoreError::Closed)?;
            Ok(state.clone())
        })
    }
}

struct Waiting {
    reply: Reply<u64>,
    deadline: Instant,
}

struct Driver {
    replica: Replica<RedbLog>,
    rx: Receiver<Event>,
    transport: Box<dyn Transport>,
    options: RaftOptions,
    state_tx: watch::Sender<Arc<State>>,
    status_tx: watch::Sender<Arc<NodeStatus>>,
    /// Proposals (normal and membership) by proposal id.
    waiting: HashMap<u64, Waiting>,
    /// Read requests waiting for their read index, by request id.
    reads: HashMap<u64, Waiting>,
    /// Read indexes confirmed by the leader, waiting for this replica to apply them.
    confirmed_reads: Vec<(u64, Waiting)>,
    next_read: u64,
    /// Revision of the last published state.
    published: u64,
    removed: bool,
    last_promote_check: Instant,
}

/// How often the leader reconsiders which members vote.
const PLACEMENT_EVERY: Duration = Duration::from_millis(700);

/// Most voters the leader promotes learners to.
const MAX_VOTERS: usize = 5;

/// Most events handled between two ready rounds: the batch that one fsync covers.
const MAX_BATCH: usize = 1_024;

impl Driver {
    fn run(mut self) {
        let tick = self.options.tick;
        let mut next_tick = Instant::now() + tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(ev) => {
                    if !self.handle(ev) {
                        break;
                    }
                    let mut stop = false;
                    for _ in 0..MAX_BATCH {
                        let Ok(ev) = self.rx.try_recv() else { break };
                        if !self.handle(ev) {
                            stop = true;
                            break;
                        }
                    }
                    if stop {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_tick {
                self.replica.tick();
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
                self.housekeeping(now);
            }
            if let Err(e) = self.round() {
                self.fail(e);
                return;
            }
        }
        self.fail(StoreError::Closed);
    }

    /// Handles one event; false means stop.
    fn handle(&mut self, ev: Event) -> bool {
        match ev {
            Event::Message(m) => {
                if let Err(e) = self.replica.step(*m) {
                    tracing::debug!(error = %e, "raft message refused");
                }
            }
            Event::Propose(cmd, reply) => match self.replica.propose(&cmd) {
                Ok(id) => {
                    self.waiting.insert(id, Waiting { reply, deadline: Instant::now() + self.options.propose_timeout });
                }
                Err(e) => {
                    let _ = reply.send(Err(propose_error(e)));
                }
            },
            Event::Member(change, member, reply) => match self.replica.propose_member_change(change, member) {
                Ok(id) => {
                    self.waiting.insert(id, Waiting { reply, deadline: Instant::now() + self.options.propose_timeout });
                }
                Err(e) => {
                    let _ = reply.send(Err(propose_error(e)));
                }
            },
            Event::Read(reply) => {
                if self.replica.leader().is_none() {
                    let _ = reply.send(Err(propose_error(ProposeError::NoLeader)));
                } else {
                    self.next_read += 1;
                    let id = self.next_read;
                    self.replica.read_index(id.to_be_bytes().to_vec());
                    self.reads.insert(id, Waiting { reply, deadline: Instant::now() + self.options.read_timeout });
                }
            }
            Event::Transfer(to) => self.replica.transfer_leader(to),
            Event::Campaign => {
                let _ = self.replica.campaign();
            }
            Event::Unreachable(id) => self.replica.report_unreachable(id),
            Event::Snapshot(id, status) => self.replica.report_snapshot(id, status),
            Event::Removed => {
                // Sent by the leader only (see the transport); a leader never acts on it.
                if !self.replica.is_leader() && !self.removed {
                    tracing::warn!("a member reports that this instance was removed from the group");
                    self.removed = true;
                }
            }
            Event::Stop => return false,
        }
        true
    }

    /// One ready round: persist, send, apply, answer, publish.
    fn round(&mut self) -> Result<(), StoreError> {
        let transport = &mut self.transport;
        let out = self.replica.ready_with(|m| transport.send(m))?;
        if !out.messages.is_empty() {
            self.transport.send(out.messages);
        }
        // Publish before answering: a proposer that hears "applied" must see it in the state.
        self.publish();
        for a in out.applied {
            if let Some(w) = a.proposal.and_then(|p| self.waiting.remove(&p)) {
                let _ = w.reply.send(a.result.map(|()| a.index).map_err(StoreError::Rejected));
            }
        }
        for rs in out.read_states {
            let id = <[u8; 8]>::try_from(rs.request_ctx.as_slice()).map(u64::from_be_bytes).unwrap_or(0);
            if let Some(w) = self.reads.remove(&id) {
                self.confirmed_reads.push((rs.index, w));
            }
        }
        let applied = self.replica.state().revision;
        if !self.confirmed_reads.is_empty() {
            for (index, w) in std::mem::take(&mut self.confirmed_reads) {
                if index <= applied {
                    let _ = w.reply.send(Ok(index));
                } else {
                    self.confirmed_reads.push((index, w));
                }
            }
        }
        if out.removed && !self.removed {
            self.removed = true;
            tracing::warn!("this control-plane instance was removed from the group; it no longer takes part");
        }
        self.publish();
        self.maybe_compact()
    }

    fn publish(&mut self) {
        let state = self.replica.state();
        if state.revision != self.published || self.published == 0 {
            self.published = state.revision;
            self.state_tx.send_replace(Arc::new(state.clone()));
        }
        let status = self.status();
        if **self.status_tx.borrow() != status {
            self.status_tx.send_replace(Arc::new(status));
        }
    }

    fn status(&self) -> NodeStatus {
        let raw = self.replica.raw();
        let conf = self.replica.conf_state();
        let matched = if self.replica.is_leader() {
            raw.raft.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
        } else {
            BTreeMap::new()
        };
        NodeStatus {
            id: self.replica.id(),
            role: self.replica.role(),
            term: self.replica.term(),
            leader: self.replica.leader().unwrap_or(0),
            commit: self.replica.commit_index(),
            applied: self.replica.state().revision,
            last_index: raw.raft.raft_log.last_index(),
            snapshot_index: raw.store().snapshot_index(),
            // Either half of a joint configuration counts.
            voters: union(&conf.voters, &conf.voters_outgoing),
            learners: union(&conf.learners, &conf.learners_next),
            matched,
            removed: self.removed,
            fatal: None,
        }
    }

    fn maybe_compact(&mut self) -> Result<(), StoreError> {
        let applied = self.replica.applied();
        let store = self.replica.raw().store();
        let snap = store.snapshot_index();
        let wanted = store.take_snapshot_request() && applied > snap;
        if applied < snap + self.options.compact_every && !wanted {
            return Ok(());
        }
        let data = serde_json::to_vec(self.replica.state())
            .map_err(|e| StoreError::Io(format!("cannot serialize the state for a snapshot: {e}")))?;
        let started = Instant::now();
        store.compact(applied, data, self.replica.conf_state(), self.options.keep_entries)?;
        tracing::info!(index = applied, took_ms = started.elapsed().as_millis() as u64, "raft log compacted");
        Ok(())
    }

    /// Expires waiters and, on the leader, promotes learners that have caught up.
    fn housekeeping(&mut self, now: Instant) {
        let expired: Vec<u64> = self.waiting.iter().filter(|(_, w)| w.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(w) = self.waiting.remove(&id) {
                self.replica.forget(id);
                let _ = w.reply.send(Err(StoreError::Unavailable(format!(
                    "the write was not confirmed within {} s (leader change or lost quorum); it may or may not \
                     have been applied",
                    self.options.propose_timeout.as_secs()
                ))));
            }
        }
        let expired: Vec<u64> = self.reads.iter().filter(|(_, w)| w.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(w) = self.reads.remove(&id) {
                let _ = w.reply.send(Err(StoreError::Unavailable(
                    "the leader did not confirm a linearizable read in time; retry".into(),
                )));
            }
        }
        // A read the leader confirmed that this replica has not reached in time (it is cut off).
        let (late, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.confirmed_reads).into_iter().partition(|(_, w)| w.deadline <= now);
        self.confirmed_reads = waiting;
        for (_, w) in late {
            let _ = w.reply.send(Err(StoreError::Unavailable(
                "this instance is behind the leader and did not catch up in time; retry".into(),
            )));
        }
        // Not a multiple of the election timeout: check-quorum clears each peer's "recently
        // active" flag once per election timeout, and a check in step with it would always see
        // the flag cleared and never find a learner caught up.
        if self.replica.is_leader() && now.duration_since(self.last_promote_check) >= PLACEMENT_EVERY {
            self.last_promote_check = now;
            self.promote_caught_up_learners();
        }
    }

    /// Places the voters: up to five (they tolerate two failures; more slow every write), spread
    /// over clusters and regions, the rest learners. One change at a time.
    fn promote_caught_up_learners(&mut self) {
        use trellis_federation::placement::{Seat, Step, next_step};
        let raw = self.replica.raw();
        let commit = raw.raft.raft_log.committed;
        let me = raw.raft.id;
        // Caught up: replicating normally (not probing, not taking a snapshot), recently heard
        // from, and within a few entries of the commit index.
        let caught_up = |id: u64| {
            raw.raft.prs().get(id).is_some_and(|p| {
                p.recent_active
                    && p.state == raft::ProgressState::Replicate
                    && p.matched > 0
                    && p.matched + 16 >= commit
            })
        };
        let conf = self.replica.conf_state();
        if !conf.voters_outgoing.is_empty() {
            return;
        }
        let state = self.replica.state();
        let seat = |id: u64, voter: bool| {
            let cluster = state.members.get(&id).map(|m| m.cluster.clone()).unwrap_or_default();
            let region = state.clusters.get(&cluster).map(|c| c.region.clone()).unwrap_or_default();
            Seat { id, cluster, region, voter, caught_up: voter || caught_up(id), leader: id == me }
        };
        let seats: Vec<Seat> = conf
            .voters
            .iter()
            .map(|id| seat(*id, true))
            .chain(conf.learners.iter().map(|id| seat(*id, false)))
            .collect();
        let (change, what) = match next_step(&seats, MAX_VOTERS) {
            Some(Step::Promote(id)) => (MemberChange::Promote(id), "learner caught up; promoting it to voter"),
            Some(Step::Demote(id)) => (
                MemberChange::Demote(id),
                "voter of a cluster with several voters made a learner, for a cluster without one",
            ),
            None => return,
        };
        match self.replica.propose_member_change(change, None) {
            Ok(_) => tracing::info!(change = ?change, "{what}"),
            Err(e) => tracing::debug!(error = %e, "voter placement deferred"),
        }
    }

    /// The log cannot be used any more: answer everyone and stop serving.
    fn fail(&mut self, e: StoreError) {
        if !matches!(e, StoreError::Closed) {
            tracing::error!(error = %e, "the control-plane log failed; this instance stops serving");
        }
        for (_, w) in self.waiting.drain() {
            let _ = w.reply.send(Err(e.clone()));
        }
        for (_, w) in self.reads.drain() {
            let _ = w.reply.send(Err(e.clone()));
        }
        for (_, w) in self.confirmed_reads.drain(..) {
            let _ = w.reply.send(Err(e.clone()));
        }
        let mut status = self.status();
        status.fatal = Some(e.to_string());
        self.status_tx.send_replace(Arc::new(status));
    }
}

fn union(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut v: Vec<u64> = a.iter().chain(b).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn propose_error(e: ProposeError) -> StoreError {
    match e {
        ProposeError::ChangeInProgress | ProposeError::NoLeader => StoreError::Busy(e.to_string()),
        ProposeError::Dropped(_) | ProposeError::Membership(_) => StoreError::Unavailable(e.to_string()),
    }
}
