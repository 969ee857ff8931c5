//! Raft traffic between members over tonic with mTLS (control-plane identities only).
//!
//! Sending: one task per peer owns a long-lived client stream (`Peer.Send`) fed by a bounded
//! queue; a full queue drops messages (Raft retransmits) and a broken stream is reported as
//! unreachable and reconnected with backoff. Snapshots travel on their own stream
//! (`Peer.InstallSnapshot`) in 1 MiB chunks, and the outcome is reported to Raft.
//!
//! Receiving: the `Peer` service accepts a message only when its sender id belongs to the
//! authenticated control-plane identity in the member directory, so one member cannot speak
//! for another.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use protobuf::Message as _;
use raft::SnapshotStatus;
use raft::prelude::{Message, MessageType};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::identity::Principal;
use trellis_proto::{grpc, pb};

use super::node::{NodeStatus, RaftHandle, Transport};
use crate::state::{Member, State};

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4_096;
/// Messages sent in one batch on the stream.
const BATCH: usize = 256;
/// Snapshot chunk size.
const CHUNK: usize = 1 << 20;
/// Largest snapshot accepted.
const MAX_SNAPSHOT: usize = 1 << 30;
/// How a member tells a sender that it is no longer part of the group.
const REMOVED: &str = "this member was removed from the control-plane group";
/// Largest gRPC message on the peer service.
pub const MAX_MESSAGE: usize = 16 << 20;

/// The member directory the transport uses: the replicated one, plus the members a joining
/// instance was told about before its own state has caught up.
#[derive(Default)]
pub struct Peers(RwLock<HashMap<u64, Member>>);

impl Peers {
    /// Adds or replaces members.
    pub fn extend(&self, members: impl IntoIterator<Item = Member>) {
        let mut w = self.0.write().unwrap_or_else(|p| p.into_inner());
        for m in members {
            w.insert(m.id, m);
        }
    }

    /// The member with `id`.
    pub fn get(&self, id: u64) -> Option<Member> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Keeps the directory in step with the replicated state (once it names any member, it is
    /// the whole directory: removed members drop out).
    pub async fn follow(self: Arc<Self>, mut state: watch::Receiver<Arc<State>>) {
        loop {
            let members: HashMap<u64, Member> =
                state.borrow_and_update().members.iter().map(|(id, m)| (*id, m.clone())).collect();
            if !members.is_empty() {
                *self.0.write().unwrap_or_else(|p| p.into_inner()) = members;
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    }
}

/// The client side: a queue and a task per peer.
pub struct GrpcTransport {
    peers: Arc<Peers>,
    tls: Arc<rustls::ClientConfig>,
    handle: RaftHandle,
    runtime: tokio::runtime::Handle,
    queues: HashMap<u64, mpsc::Sender<Message>>,
}

impl GrpcTransport {
    /// A transport that dials peers with `tls` (the member's own identity, expecting control-plane
    /// servers) and spawns its tasks on `runtime`.
    pub fn new(
        peers: Arc<Peers>,
        tls: Arc<rustls::ClientConfig>,
        handle: RaftHandle,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self { peers, tls, handle, runtime, queues: HashMap::new() }
    }
}

impl Transport for GrpcTransport {
    fn send(&mut self, messages: Vec<Message>) {
        for m in messages {
            let to = m.to;
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.runtime.spawn(send_snapshot(m, self.peers.clone(), self.tls.clone(), self.handle.clone()));
                continue;
            }
            let queue = self.queues.entry(to).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(PEER_QUEUE);
                self.runtime.spawn(peer_loop(to, rx, self.peers.clone(), self.tls.clone(), self.handle.clone()));
                tx
            });
            if queue.try_send(m).is_err() {
                tracing::debug!(to = format!("{to:x}"), "peer queue full; raft message dropped");
            }
        }
    }
}

fn encode(m: &Message) -> Option<Vec<u8>> {
    m.write_to_bytes().ok()
}

/// Owns the stream to one peer. The request stream of the long-lived `Send` call reads the peer
/// queue itself (each poll takes what is queued, up to a batch), so a message goes from the Raft
/// thread to the HTTP/2 encoder without another task in between.
async fn peer_loop(
    to: u64,
    rx: mpsc::Receiver<Message>,
    peers: Arc<Peers>,
    tls: Arc<rustls::ClientConfig>,
    handle: RaftHandle,
) {
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut backoff = Duration::from_millis(50);
    loop {
        // Wait for traffic before dialing, so an idle or unknown peer costs nothing.
        {
            let mut q = rx.lock().await;
            let Some(first) = q.recv().await else { return };
            // Put it back in front: the stream below sends it first.
            let mut pending = vec![first];
            while let Ok(m) = q.try_recv() {
                pending.push(m);
            }
            drop(q);
            let Some(member) = peers.get(to) else {
                tracing::debug!(to = format!("{to:x}"), "no address known for peer yet");
                handle.unreachable(to);
                continue;
            };
            let channel = match grpc::channel(&member.address, tls.clone()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(peer = %member.name, address = %member.address, error = %e, "bad peer address");
                    handle.unreachable(to);
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let mut client = pb::peer_client::PeerClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
            let first = pb::RaftBatch { messages: pending.iter().filter_map(encode).collect() };
            let queue = rx.clone();
            let rest = futures::stream::unfold(queue, |queue| async move {
                let batch = {
                    let mut q = queue.lock().await;
                    let m = q.recv().await?;
                    let mut batch = vec![m];
                    while batch.len() < BATCH {
                        match q.try_recv() {
                            Ok(m) => batch.push(m),
                            Err(_) => break,
                        }
                    }
                    batch
                };
                Some((pb::RaftBatch { messages: batch.iter().filter_map(encode).collect() }, queue))
            });
            let stream = futures::stream::iter([first]).chain(rest);
            let opened = tokio::time::Instant::now();
            let result = client.send(stream).await;
            if opened.elapsed() > Duration::from_secs(5) {
                // The stream worked for a while: this is a new failure, not a repeated one.
                backoff = Duration::from_millis(50);
            }
            let why = match result {
                Ok(_) => "stream closed by the peer".to_string(),
                Err(s) if s.code() == tonic::Code::PermissionDenied && s.message().starts_with(REMOVED) => {
                    tracing::warn!(peer = %member.name, "{}", s.message());
                    handle.removed();
                    return;
                }
                Err(s) => s.message().to_string(),
            };
            tracing::debug!(peer = %member.name, reason = %why, "raft stream ended; reconnecting");
            handle.unreachable(to);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Streams one snapshot and reports the outcome.
async fn send_snapshot(mut m: Message, peers: Arc<Peers>, tls: Arc<rustls::ClientConfig>, handle: RaftHandle) {
    let to = m.to;
    let result = async {
        let member = peers.get(to).ok_or_else(|| format!("no address known for member {to:x}"))?;
        let data = m.mut_snapshot().take_data();
        let header = m.write_to_bytes().map_err(|e| e.to_string())?;
        let mut chunks = vec![pb::SnapshotChunk { message: header, data: Vec::new() }];
        chunks.extend(data.chunks(CHUNK).map(|c| pb::SnapshotChunk { message: Vec::new(), data: c.to_vec() }));
        let channel = grpc::channel(&member.address, tls).map_err(|e| e.to_string())?;
        let mut client = pb::peer_client::PeerClient::new(channel);
        let size = data.len();
        client.install_snapshot(futures::stream::iter(chunks)).await.map_err(|s| s.message().to_string())?;
        tracing::info!(peer = %member.name, bytes = size, "snapshot sent");
        Ok::<(), String>(())
    }
    .await;
    match result {
        Ok(()) => handle.snapshot_status(to, SnapshotStatus::Finish),
        Err(e) => {
            tracing::warn!(to = format!("{to:x}"), error = %e, "sending a snapshot failed; raft retries");
            handle.unreachable(to);
            handle.snapshot_status(to, SnapshotStatus::Failure);
        }
    }
}

/// The server side.
pub struct PeerService {
    pub handle: RaftHandle,
    pub peers: Arc<Peers>,
    pub status: watch::Receiver<Arc<NodeStatus>>,
    pub state: watch::Receiver<Arc<State>>,
}

impl PeerService {
    /// The caller's control-plane identity, or why it is refused.
    fn caller<T>(&self, req: &Request<T>) -> Result<(String, String), Status> {
        let id = grpc::peer_identity(req)
            .ok_or_else(|| Status::unauthenticated("raft traffic needs a control-plane client certificate"))?;
        match id.principal() {
            Principal::ControlPlane { cluster, node } => Ok((cluster.to_string(), node.to_string())),
            _ => Err(Status::permission_denied(format!("{id} is not a control-plane instance"))),
        }
    }

    /// Whether message sender `from` is the authenticated caller.
    fn check_sender(&self, m: &Message, caller: &(String, String)) -> Result<(), Status> {
        if m.to != self.handle.id() {
            return Err(Status::invalid_argument(format!(
                "message for member {:x} reached member {:x}; the peer's directory is stale",
                m.to,
                self.handle.id()
            )));
        }
        if m.get_msg_type() == MessageType::MsgTransferLeader {
            // Forwarded by a follower on behalf of the transferee, whose id it carries: the
            // caller must still be a member.
            let members = self.peers.0.read().unwrap_or_else(|p| p.into_inner());
            return match members.values().any(|p| p.cluster == caller.0 && p.name == caller.1) {
                true => Ok(()),
                false => Err(Status::permission_denied(format!("{}/{} is not a member", caller.0, caller.1))),
            };
        }
        match self.peers.get(m.from) {
            Some(member) if member.cluster == caller.0 && member.name == caller.1 => Ok(()),
            Some(member) => Err(Status::permission_denied(format!(
                "{}/{} may not send as member {:x} ({}/{})",
                caller.0, caller.1, m.from, member.cluster, member.name
            ))),
            None => {
                let st = self.status.borrow();
                // `voters` and `learners` include both halves of a joint configuration.
                let in_conf = st.voters.contains(&m.from) || st.learners.contains(&m.from);
                // Only the leader says so: its configuration is the newest there is.
                if !in_conf && st.role == "leader" {
                    return Err(Status::permission_denied(format!("{REMOVED} ({:x})", m.from)));
                }
                Err(Status::failed_precondition(format!("member {:x} is not in this member's directory yet", m.from)))
            }
        }
    }
}

type AckResult = Result<Response<pb::PeerAck>, Status>;

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn send(&self, req: Request<Streaming<pb::RaftBatch>>) -> AckResult {
        let caller = self.caller(&req)?;
        let mut stream = req.into_inner();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            for bytes in batch.messages {
                let m = Message::parse_from_bytes(&bytes)
                    .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
                match self.check_sender(&m, &caller) {
                    Ok(()) => {
                        if self.handle.step(m).is_err() {
                            tracing::debug!("raft queue full; message from a peer dropped");
                        }
                    }
                    // A joining member may hear from the leader before it knows its name.
                    Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                        tracing::debug!(reason = %s.message(), "raft message from an unknown member dropped");
                    }
                    Err(s) => return Err(s),
                }
            }
        }
        Ok(Response::new(pb::PeerAck {}))
    }

    async fn install_snapshot(&self, req: Request<Streaming<pb::SnapshotChunk>>) -> AckResult {
        let caller = self.caller(&req)?;
        let mut stream = req.into_inner();
        let first = stream.next().await.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let mut m = Message::parse_from_bytes(&first.message)
            .map_err(|e| Status::invalid_argument(format!("undecodable snapshot message: {e}")))?;
        self.check_sender(&m, &caller)?;
        if m.get_msg_type() != MessageType::MsgSnapshot {
            return Err(Status::invalid_argument("the first chunk must carry a MsgSnapshot"));
        }
        let mut data = first.data;
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?.data);
            if data.len() > MAX_SNAPSHOT {
                return Err(Status::resource_exhausted("snapshot larger than 1 GiB"));
            }
        }
        m.mut_snapshot().set_data(data.into());
        self.handle.step(m).map_err(|_| Status::unavailable("raft queue full; retry"))?;
        Ok(Response::new(pb::PeerAck {}))
    }

    async fn member_status(
        &self,
        req: Request<pb::MemberStatusRequest>,
    ) -> Result<Response<pb::MemberStatusResponse>, Status> {
        self.caller(&req)?;
        Ok(Response::new(member_status(&self.status.borrow(), &self.state.borrow(), &self.peers)))
    }
}

/// This member's status as the wire message, with the hash of its applied state.
pub fn member_status(s: &NodeStatus, state: &State, peers: &Peers) -> pb::MemberStatusResponse {
    let me = peers.get(s.id);
    pb::MemberStatusResponse {
        id: s.id,
        name: me.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
        cluster: me.map(|m| m.cluster).unwrap_or_default(),
        role: s.role.to_string(),
        term: s.term,
        leader: s.leader,
        commit: s.commit,
        applied: state.revision,
        last_index: s.last_index,
        snapshot_index: s.snapshot_index,
        state_hash: state_hash(state),
        voters: s.voters.clone(),
        learners: s.learners.clone(),
        matched: s.matched.iter().map(|(k, v)| (*k, *v)).collect(),
    }
}

/// SHA-256 of the replicated state (everything a snapshot carries), hex.
pub fn state_hash(state: &State) -> String {
    let bytes = serde_json::to_vec(state).unwrap_or_default();
    trellis_federation::token::hash_hex(&bytes)
}
