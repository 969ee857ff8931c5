//! The store on etcd: etcd is the ordered, durable log, and every control-plane instance on the
//! same prefix applies every entry in order, whoever wrote it.
//!
//! Keys under the prefix (default `/trellis/`): `log/<index, 20 digits>` holds one command in the
//! sealed format of every backend (CRC32 + JSON, see `codec`), `next` the first free index,
//! `snapshot` the sealed JSON of the state at `snapshot_index` (20 digits, so that etcd's byte-wise
//! comparison orders it like a number). Two tasks per instance:
//! - the appender writes queued proposals, one etcd transaction per batch, guarded by `next`;
//! - the follower is the single writer of the state: it watches `log/`, applies entries strictly
//!   in index order, publishes the new `Arc<State>` and answers this instance's proposers, so a
//!   proposal resolves only once its entry is applied here (read-your-writes).
//!
//! A damaged or unreadable entry stops the follower with [`StoreError::Corrupt`] naming the key; it
//! is never applied. Plain-text etcd is accepted only on loopback: the log holds the federation's
//! CA keys.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, GetResponse, Txn, TxnOp,
    TxnOpResponse, TxnResponse, WatchOptions, WatchStream,
};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::codec::{seal, unseal};
use super::{ProposeFuture, Store, StoreError};
use crate::state::{Command, State};

/// Entries after which the state is snapshotted and the log below it deleted.
const COMPACT_EVERY: u64 = 10_000;
/// Most proposals in one transaction: each takes a put and a compare, and etcd refuses
/// transactions of more than `--max-txn-ops` (128 by default) operations.
const MAX_BATCH: usize = 100;
/// Most bytes of commands in one transaction; etcd refuses requests over `--max-request-bytes`
/// (1.5 MiB by default).
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Bound on one unary request. Not set on the client as a whole: tonic would apply it to the
/// watch stream too and cut it after that long.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on checking that one endpoint answers at start.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys read per request while catching up, well under the client's 4 MiB message limit.
const PAGE: i64 = 500;
/// How long an index may stay missing while later ones have arrived before the log is re-read
/// (where a real gap is reported as damage).
const GAP_DEADLINE: Duration = Duration::from_secs(5);
/// Conflicting appends tolerated for one batch; each conflict means another instance appended.
const MAX_APPEND_ATTEMPTS: u32 = 1_000;

type Reply = oneshot::Sender<Result<u64, StoreError>>;
type EtcdResult<T> = Result<T, etcd_client::Error>;

struct Proposal {
    sealed: Vec<u8>,
    reply: Reply,
}

/// A store whose log lives in etcd; several instances may share one prefix.
pub struct EtcdStore {
    tx: mpsc::UnboundedSender<Proposal>,
    state: watch::Receiver<Arc<State>>,
    claims: Arc<Mutex<Claims>>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for EtcdStore {
    /// Stops both tasks; waiting proposers get [`StoreError::Closed`].
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Where the outcome of each of this instance's proposals is handed from the follower to the
/// proposer. Shared by the two tasks, locked briefly and never across an `.await`.
#[derive(Default)]
struct Claims {
    /// Entries written by this instance, not applied yet: index → (etcd revision of the write,
    /// proposer). The revision tells our entry from another instance's at the same index.
    waiting: HashMap<u64, (i64, Reply)>,
    /// An append of this instance is in flight.
    appending: bool,
    /// Outcomes of entries applied while an append was in flight: the watch can deliver our
    /// entries before the transaction's answer reaches the appender.
    unclaimed: BTreeMap<u64, (i64, Result<u64, StoreError>)>,
    /// Last index whose outcome went through `settle`.
    settled: u64,
    /// Set when the follower stopped for good; every later proposal gets it.
    failed: Option<StoreError>,
}

fn lock(claims: &Mutex<Claims>) -> MutexGuard<'_, Claims> {
    // A panic while holding the lock cannot leave Claims inconsistent (each update is one
    // insert or remove), so a poisoned lock is still usable.
    claims.lock().unwrap_or_else(|p| p.into_inner())
}

/// The keys of one prefix.
#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn log(&self, index: u64) -> String {
        format!("{}log/{index:020}", self.prefix)
    }
    fn log_dir(&self) -> String {
        format!("{}log/", self.prefix)
    }
    /// End of the range of keys under `log/`: '0' is the byte after '/'.
    fn log_end(&self) -> String {
        format!("{}log0", self.prefix)
    }
    fn next(&self) -> String {
        format!("{}next", self.prefix)
    }
    fn snapshot(&self) -> String {
        format!("{}snapshot", self.prefix)
    }
    fn snapshot_index(&self) -> String {
        format!("{}snapshot_index", self.prefix)
    }
    /// The index of a `log/` key, or `None` for anything else.
    fn index_of(&self, key: &[u8]) -> Option<u64> {
        let digits = key.strip_prefix(self.log_dir().as_bytes())?;
        if digits.len() != 20 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    }
}

fn etcd_error(tried: &str, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!(
        "etcd at {tried}: {what} failed: {e}; check that etcd runs there and that --etcd-endpoints is right"
    ))
}

/// Whether a failed request can be sent again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Reads and watch creation: sending them twice changes nothing.
    Always,
    /// Writes: only when the request certainly never left (the connection was refused), since a
    /// write that timed out may have been applied and a second one would append a duplicate.
    IfNeverSent,
}

/// Attempts per request: the client balances over the endpoints, so the next attempt usually
/// goes to another one when one of several is down.
const ATTEMPTS: u32 = 5;

/// The request was refused at connection time, so etcd never saw it.
fn never_sent(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = e else { return false };
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = err.source();
    }
    false
}

/// Runs one unary etcd request, each attempt bounded by [`RPC_TIMEOUT`].
async fn rpc<T>(
    tried: &str,
    what: &str,
    repeat: Repeat,
    mut call: impl FnMut() -> BoxFuture<'static, Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    let mut attempt = 1;
    loop {
        let e = match tokio::time::timeout(RPC_TIMEOUT, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if attempt < ATTEMPTS && (repeat == Repeat::Always || never_sent(&e)) => e,
            Ok(Err(e)) => return Err(etcd_error(tried, what, e)),
            Err(_) if attempt < ATTEMPTS && repeat == Repeat::Always => continue,
            Err(_) => return Err(etcd_error(tried, what, format!("no answer within {}s", RPC_TIMEOUT.as_secs()))),
        };
        tracing::debug!(error = %e, attempt, what, "etcd request failed; trying again");
        attempt += 1;
    }
}

// Each attempt of a request gets its own future, owning a clone of the client (a handle on
// shared channels) and of the arguments, so that the tasks stay `Send` and `'static`.

fn get_call(
    client: &Client,
    key: String,
    options: GetOptions,
) -> impl FnMut() -> BoxFuture<'static, EtcdResult<GetResponse>> {
    move || {
        let (mut client, key, options) = (client.clone(), key.clone(), options.clone());
        Box::pin(async move { client.get(key, Some(options)).await })
    }
}

fn txn_call(client: &Client, txn: Txn) -> impl FnMut() -> BoxFuture<'static, EtcdResult<TxnResponse>> {
    move || {
        let (mut client, txn) = (client.clone(), txn.clone());
        Box::pin(async move { client.txn(txn).await })
    }
}

fn watch_call(
    client: &Client,
    key: String,
    options: WatchOptions,
) -> impl FnMut() -> BoxFuture<'static, EtcdResult<WatchStream>> {
    move || {
        let (mut client, key, options) = (client.clone(), key.clone(), options.clone());
        Box::pin(async move { client.watch(key, Some(options)).await })
    }
}

/// The endpoints that answer now. The client balances requests over its endpoints at random
/// without noticing that one refuses connections, so a dead endpoint would fail a share of all
/// requests; it is left out (until restart) and said so. Fails, naming every endpoint and its
/// error, when none answers.
async fn live_endpoints(endpoints: &[String], options: &ConnectOptions) -> Result<Vec<String>, StoreError> {
    let probes = endpoints.iter().map(|e| async move {
        let probe = async {
            let mut c = Client::connect([e.as_str()], Some(options.clone())).await?;
            c.status().await
        };
        let outcome = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
        };
        (e.clone(), outcome)
    });
    let mut live = Vec::new();
    let mut dead = Vec::new();
    for (e, outcome) in futures::future::join_all(probes).await {
        match outcome {
            Ok(()) => live.push(e),
            Err(err) => dead.push(format!("{e}: {err}")),
        }
    }
    if live.is_empty() {
        return Err(StoreError::Io(format!(
            "no etcd endpoint answered (tried {}): {}; check that etcd runs there and that --etcd-endpoints is right",
            endpoints.join(","),
            dead.join("; ")
        )));
    }
    for d in &dead {
        tracing::warn!(endpoint = %d, "an etcd endpoint does not answer; using the others until trellis-cp restarts");
    }
    Ok(live)
}

fn damaged(key: &str) -> StoreError {
    StoreError::Corrupt(format!(
        "etcd key {key} fails its checksum: it was damaged or written by something other than trellis-cp. \
         Stop every trellis-cp on this prefix and restore etcd from a backup (etcdctl snapshot restore); \
         never edit keys under the prefix by hand"
    ))
}

fn unreadable(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!(
        "etcd key {key} cannot be read ({e}): it was damaged, or written by a newer trellis-cp. Upgrade this \
         instance, or stop every trellis-cp on this prefix and restore etcd from a backup"
    ))
}

fn decode_command(key: &str, value: &[u8]) -> Result<Command, StoreError> {
    let payload = unseal(value).map_err(|_| damaged(key))?;
    serde_json::from_slice(payload).map_err(|e| unreadable(key, e))
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>, tried: &str) -> Result<i64, StoreError> {
    h.map(|h| h.revision()).ok_or_else(|| etcd_error(tried, "reading the revision", "the answer has no header"))
}

impl EtcdStore {
    /// Checks that every endpoint is plain HTTP on loopback, the only kind this build may use.
    pub fn check_endpoints(endpoints: &[String]) -> Result<(), String> {
        if endpoints.is_empty() {
            return Err("no etcd endpoint given; pass --etcd-endpoints http://127.0.0.1:2379".into());
        }
        for e in endpoints {
            if e.starts_with("https://") {
                return Err(format!(
                    "etcd endpoint {e}: TLS to etcd is not supported yet (future work); run etcd on loopback \
                     and use http://127.0.0.1:PORT"
                ));
            }
            let rest = e.strip_prefix("http://").unwrap_or(e);
            if rest.contains("://") {
                return Err(format!("etcd endpoint {e}: only http:// on loopback is supported"));
            }
            let host = rest.split('/').next().unwrap_or_default();
            let host = match host.rsplit_once(':') {
                Some((h, port)) if port.parse::<u16>().is_ok() => h,
                _ => host,
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(format!(
                    "etcd endpoint {e} is not on loopback: plain-text etcd is accepted only on 127.0.0.0/8, ::1 \
                     or localhost, because the log holds the federation's CA keys; TLS to etcd is future work"
                ));
            }
        }
        Ok(())
    }

    /// Connects to etcd at `endpoints` (plain `http://` on loopback only), loads the state under
    /// `prefix` (snapshot, then the log after it) and starts following the log.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, prefix, COMPACT_EVERY).await
    }

    /// [`connect`](Self::connect), snapshotting every `compact_every` entries instead of
    /// every 10,000 (tests use small numbers to exercise compaction).
    pub async fn connect_with(endpoints: &[String], prefix: &str, compact_every: u64) -> Result<Self, StoreError> {
        Self::check_endpoints(endpoints).map_err(StoreError::Io)?;
        if prefix.is_empty() {
            return Err(StoreError::Io("the etcd key prefix is empty; use e.g. --etcd-prefix /trellis/".into()));
        }
        // Without the trailing '/', prefix "/a" would also cover the keys of prefix "/ab/".
        let prefix = if prefix.ends_with('/') { prefix.to_string() } else { format!("{prefix}/") };
        let keys = Keys { prefix };
        let tried = endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let live = live_endpoints(endpoints, &options).await?;
        let client = Client::connect(&live, Some(options)).await.map_err(|e| etcd_error(&tried, "connecting", e))?;
        let claims = Arc::new(Mutex::new(Claims::default()));
        let (state_tx, state_rx) = watch::channel(Arc::new(State::default()));
        let mut follower = Follower {
            client: client.clone(),
            keys: keys.clone(),
            tried: tried.clone(),
            state_tx,
            buffer: BTreeMap::new(),
            claims: claims.clone(),
            compact_every: compact_every.max(1),
        };
        let revision = follower.catch_up().await?;
        let state = state_rx.borrow().clone();
        tracing::info!(
            revision = state.revision,
            services = state.services.len(),
            endpoints = %tried,
            prefix = %keys.prefix,
            "etcd store opened"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let appender =
            Appender { client, keys, tried, claims: claims.clone(), next: state.revision + 1, state: state_rx.clone() };
        let tasks = [tokio::spawn(follower.run(revision)), tokio::spawn(appender.run(rx))];
        Ok(Self { tx, state: state_rx, claims, tasks })
    }
}

impl Store for EtcdStore {
    fn propose(&self, cmd: Command) -> ProposeFuture<'_> {
        Box::pin(async move {
            if let Some(e) = lock(&self.claims).failed.clone() {
                return Err(e);
            }
            let payload = serde_json::to_vec(&cmd).map_err(|e| StoreError::Io(format!("encoding a command: {e}")))?;
            let (reply, rx) = oneshot::channel();
            self.tx.send(Proposal { sealed: seal(&payload), reply }).map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.state.clone()
    }
}

/// Writes this instance's proposals to the log.
struct Appender {
    client: Client,
    keys: Keys,
    tried: String,
    claims: Arc<Mutex<Claims>>,
    /// The index the next append tries; corrected by every conflict.
    next: u64,
    /// The applied state: entries other instances appended move `next` on without a conflict.
    state: watch::Receiver<Arc<State>>,
}

impl Appender {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Proposal>) {
        while let Some(first) = rx.recv().await {
            // Group commit: everything queued goes in one transaction. One transaction per
            // proposal (the simplest reading of the design) makes concurrent proposals race
            // for the same index, and each lost race is still a Raft round in etcd.
            let mut bytes = first.sealed.len();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(p) => {
                        bytes += p.sealed.len();
                        batch.push(p);
                    }
                    Err(_) => break,
                }
            }
            let failed = {
                let mut c = lock(&self.claims);
                c.appending = c.failed.is_none();
                c.failed.clone()
            };
            if let Some(e) = failed {
                for p in batch {
                    let _ = p.reply.send(Err(e.clone()));
                }
                continue;
            }
            let sealed: Vec<&[u8]> = batch.iter().map(|p| p.sealed.as_slice()).collect();
            let written = self.append(&sealed).await;
            let mut c = lock(&self.claims);
            c.appending = false;
            let unclaimed = std::mem::take(&mut c.unclaimed);
            match written {
                Ok((first_index, revision)) => {
                    for (i, p) in batch.into_iter().enumerate() {
                        let index = first_index + i as u64;
                        match unclaimed.get(&index) {
                            Some((r, outcome)) if *r == revision => {
                                let _ = p.reply.send(outcome.clone());
                            }
                            // The follower stopped: nothing will answer a waiter any more.
                            _ if c.failed.is_some() => {
                                let _ = p.reply.send(Err(c.failed.clone().unwrap_or(StoreError::Closed)));
                            }
                            // Applied already, but not while the append was in flight: cannot
                            // happen with one appender; answered rather than left waiting.
                            _ if c.settled >= index => {
                                let _ = p.reply.send(Err(StoreError::Io(format!(
                                    "entry {index} was written, but its outcome was lost; check the state"
                                ))));
                            }
                            _ => {
                                c.waiting.insert(index, (revision, p.reply));
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, entries = batch.len(), "etcd append failed");
                    for p in batch {
                        let _ = p.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Appends `sealed` at the first free index: one transaction that succeeds only if `next`
    /// still says that index and none of the keys exists. Returns the first index and the etcd
    /// revision of the write.
    async fn append(&mut self, sealed: &[&[u8]]) -> Result<(u64, i64), StoreError> {
        let next_key = self.keys.next();
        for _ in 0..MAX_APPEND_ATTEMPTS {
            let n = self.next.max(self.state.borrow().revision + 1);
            let count = sealed.len() as u64;
            let mut when = vec![if n == 1 {
                Compare::create_revision(next_key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::value(next_key.clone(), CompareOp::Equal, n.to_string())
            }];
            let mut then = Vec::with_capacity(sealed.len() + 1);
            for (i, value) in sealed.iter().enumerate() {
                let key = self.keys.log(n + i as u64);
                when.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                then.push(TxnOp::put(key, value.to_vec(), None));
            }
            then.push(TxnOp::put(next_key.clone(), (n + count).to_string(), None));
            let txn = Txn::new().when(when).and_then(then).or_else(vec![TxnOp::get(next_key.clone(), None)]);
            let resp =
                rpc(&self.tried, "appending to the log", Repeat::IfNeverSent, txn_call(&self.client, txn)).await?;
            if resp.succeeded() {
                self.next = n + count;
                return Ok((n, header_revision(resp.header(), &self.tried)?));
            }
            // Another instance appended first: its `next` came back in the failure branch.
            let current = match resp.op_responses().first() {
                Some(TxnOpResponse::Get(g)) => match g.kvs().first() {
                    Some(kv) => std::str::from_utf8(kv.value())
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| unreadable(&next_key, "not a number"))?,
                    None => 1,
                },
                _ => return Err(etcd_error(&self.tried, "appending to the log", "unexpected transaction answer")),
            };
            if current == n {
                // `next` agrees with us, so a log key at or after it exists: retrying cannot help.
                return Err(StoreError::Corrupt(format!(
                    "etcd key {next_key} says the next entry is {n}, but {} or a later entry already exists: \
                     keys under {} were changed outside trellis-cp. Restore etcd from a backup",
                    self.keys.log(n),
                    self.keys.prefix
                )));
            }
            self.next = current;
        }
        Err(etcd_error(
            &self.tried,
            "appending to the log",
            format!("{MAX_APPEND_ATTEMPTS} conflicting appends in a row; too many writers on one prefix?"),
        ))
    }
}

/// One `log/` key as read from etcd.
struct Entry {
    key: String,
    /// etcd revision of the write.
    revision: i64,
    value: Vec<u8>,
}

/// The single writer of the state: applies the log in order and answers proposers.
struct Follower {
    client: Client,
    keys: Keys,
    tried: String,
    state_tx: watch::Sender<Arc<State>>,
    /// Entries received but not applied yet, by index.
    buffer: BTreeMap<u64, Entry>,
    claims: Arc<Mutex<Claims>>,
    compact_every: u64,
}

impl Follower {
    fn applied(&self) -> u64 {
        self.state_tx.borrow().revision
    }

    /// Follows the log until the store is dropped or the log is found damaged. Lost connections
    /// and cancelled watches are retried: the log is re-read from the last applied index.
    async fn run(mut self, mut revision: i64) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let e = match self.follow(revision).await {
                Ok(never) => match never {},
                Err(e) => e,
            };
            loop {
                if let StoreError::Corrupt(_) = e {
                    self.fail(e);
                    return;
                }
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "etcd log follower interrupted");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                match self.catch_up().await {
                    Ok(r) => {
                        revision = r;
                        backoff = Duration::from_millis(100);
                        break;
                    }
                    Err(again) => {
                        if let StoreError::Corrupt(_) = again {
                            self.fail(again);
                            return;
                        }
                        tracing::warn!(error = %again, "re-reading the etcd log failed");
                    }
                }
            }
        }
    }

    /// Watches `log/` from the revision after `revision` and applies what arrives.
    async fn follow(&mut self, revision: i64) -> Result<std::convert::Infallible, StoreError> {
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let call = watch_call(&self.client, self.keys.log_dir(), options);
        let stream = rpc(&self.tried, "watching the log", Repeat::Always, call).await?;
        // The request half must live as long as the watch: dropping it ends the stream.
        let (_requests, mut responses) = stream.split();
        let mut gap_since: Option<Instant> = None;
        loop {
            let message = match gap_since {
                None => responses.message().await,
                Some(since) => tokio::select! {
                    m = responses.message() => m,
                    _ = tokio::time::sleep_until(since + GAP_DEADLINE) => {
                        return Err(StoreError::Io(format!(
                            "log entry {} did not arrive within {}s while later ones did; re-reading the log",
                            self.applied() + 1,
                            GAP_DEADLINE.as_secs()
                        )));
                    }
                },
            };
            let response = match message {
                Ok(Some(r)) => r,
                Ok(None) => return Err(etcd_error(&self.tried, "watching the log", "the watch ended")),
                Err(e) => return Err(etcd_error(&self.tried, "watching the log", e)),
            };
            if response.canceled() {
                return Err(etcd_error(
                    &self.tried,
                    "watching the log",
                    format!(
                        "etcd cancelled the watch (compacted at revision {}): {}",
                        response.compact_revision(),
                        response.cancel_reason()
                    ),
                ));
            }
            for event in response.events() {
                // Deletions are compaction removing applied entries.
                if event.event_type() != EventType::Put {
                    continue;
                }
                let Some(kv) = event.kv() else { continue };
                self.receive(kv.key(), kv.mod_revision(), kv.value())?;
            }
            self.apply_ready()?;
            gap_since = if self.buffer.is_empty() { None } else { gap_since.or(Some(Instant::now())) };
        }
    }

    /// Buffers one `log/` key unless it is already applied.
    fn receive(&mut self, key: &[u8], revision: i64, value: &[u8]) -> Result<(), StoreError> {
        let name = String::from_utf8_lossy(key).into_owned();
        let Some(index) = self.keys.index_of(key) else {
            return Err(StoreError::Corrupt(format!(
                "etcd key {name} is not a log entry: keys under {} were written outside trellis-cp; \
                 remove them or use another --etcd-prefix",
                self.keys.log_dir()
            )));
        };
        if index <= self.applied() {
            // Applied entries are never rewritten by trellis-cp; a later write is tampering
            // and is ignored (the applied state stays what every instance applied).
            tracing::warn!(key = %name, "an applied log entry was rewritten in etcd; ignoring the new value");
            return Ok(());
        }
        self.buffer.insert(index, Entry { key: name, revision, value: value.to_vec() });
        Ok(())
    }

    /// Applies the buffered entries that follow the applied index, publishes the new state once,
    /// then answers the proposers. Stops before a damaged entry (after publishing the ones
    /// before it) and returns its error.
    fn apply_ready(&mut self) -> Result<(), StoreError> {
        let current = self.state_tx.borrow().clone();
        if self.buffer.first_key_value().map(|(i, _)| *i) != Some(current.revision + 1) {
            return Ok(());
        }
        let mut next = (*current).clone();
        let mut outcomes = Vec::new();
        let mut snapshots = Vec::new();
        let mut damage = None;
        while let Some(entry) = self.buffer.remove(&(next.revision + 1)) {
            let index = next.revision + 1;
            let cmd = match decode_command(&entry.key, &entry.value) {
                Ok(c) => c,
                Err(e) => {
                    damage = Some(e);
                    break;
                }
            };
            let outcome = next.apply(index, &cmd).map(|()| index).map_err(StoreError::from);
            outcomes.push((index, entry.revision, outcome));
            if index.is_multiple_of(self.compact_every) {
                snapshots.push(next.clone());
            }
        }
        if !outcomes.is_empty() {
            self.state_tx.send_replace(Arc::new(next));
            self.settle(outcomes);
        }
        for s in snapshots {
            tokio::spawn(write_snapshot(self.client.clone(), self.keys.clone(), self.tried.clone(), s));
        }
        damage.map_or(Ok(()), Err)
    }

    /// Hands outcomes to this instance's proposers (published state first: read-your-writes).
    fn settle(&self, outcomes: Vec<(u64, i64, Result<u64, StoreError>)>) {
        let mut c = lock(&self.claims);
        for (index, revision, outcome) in outcomes {
            c.settled = index;
            match c.waiting.remove(&index) {
                Some((r, reply)) if r == revision => {
                    let _ = reply.send(outcome);
                }
                Some((_, reply)) => {
                    let _ = reply.send(Err(StoreError::Corrupt(format!(
                        "{} was rewritten after this instance wrote it; keys under {} were changed outside \
                         trellis-cp",
                        self.keys.log(index),
                        self.keys.prefix
                    ))));
                }
                None if c.appending => {
                    c.unclaimed.insert(index, (revision, outcome));
                }
                None => {}
            }
        }
    }

    /// Stops for good: every waiting and later proposal gets `e`.
    fn fail(&self, e: StoreError) {
        tracing::error!(error = %e, "the etcd store stopped; this instance serves its last state and refuses writes");
        let mut c = lock(&self.claims);
        for (_, (_, reply)) in c.waiting.drain() {
            let _ = reply.send(Err(e.clone()));
        }
        c.unclaimed.clear();
        c.failed = Some(e);
    }

    /// Brings the state up to etcd's current revision: the snapshot if it is ahead of the
    /// applied index, then the log after it, all read at one etcd revision so that a
    /// concurrent compaction cannot remove entries between the two reads. Returns that revision.
    async fn catch_up(&mut self) -> Result<i64, StoreError> {
        let index_key = self.keys.snapshot_index();
        let call = get_call(&self.client, index_key.clone(), GetOptions::new());
        let resp = rpc(&self.tried, "reading the snapshot index", Repeat::Always, call).await?;
        let at = header_revision(resp.header(), &self.tried)?;
        let snapshot_index = match resp.kvs().first() {
            Some(kv) => std::str::from_utf8(kv.value())
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| unreadable(&index_key, "not a number"))?,
            None => 0,
        };
        if snapshot_index > self.applied() {
            self.install_snapshot(snapshot_index, at).await?;
        }
        let mut from = self.applied() + 1;
        loop {
            let options = GetOptions::new().with_range(self.keys.log_end()).with_revision(at).with_limit(PAGE);
            let call = get_call(&self.client, self.keys.log(from), options);
            let page = rpc(&self.tried, "reading the log", Repeat::Always, call).await?;
            for kv in page.kvs() {
                self.receive(kv.key(), kv.mod_revision(), kv.value())?;
                if let Some(i) = self.keys.index_of(kv.key()) {
                    from = i + 1;
                }
            }
            if !page.more() || page.kvs().is_empty() {
                break;
            }
        }
        self.apply_ready()?;
        if let Some((&first, _)) = self.buffer.first_key_value() {
            let applied = self.applied();
            return Err(StoreError::Corrupt(format!(
                "log entries {}..={} are missing under {} (entry {first} follows entry {applied}): keys were \
                 deleted outside trellis-cp. Stop every trellis-cp on this prefix and restore etcd from a backup",
                applied + 1,
                first - 1,
                self.keys.log_dir()
            )));
        }
        Ok(at)
    }

    /// Replaces the state with the snapshot at `index` (read at etcd revision `at`).
    async fn install_snapshot(&mut self, index: u64, at: i64) -> Result<(), StoreError> {
        let key = self.keys.snapshot();
        let options = GetOptions::new().with_revision(at);
        let resp =
            rpc(&self.tried, "reading the snapshot", Repeat::Always, get_call(&self.client, key.clone(), options))
                .await?;
        let Some(kv) = resp.kvs().first() else {
            return Err(unreadable(&key, format!("missing, while {} says {index}", self.keys.snapshot_index())));
        };
        let payload = unseal(kv.value()).map_err(|_| damaged(&key))?;
        let state: State = serde_json::from_slice(payload).map_err(|e| unreadable(&key, e))?;
        if state.revision != index {
            let says = format!("it holds index {}, {} says {index}", state.revision, self.keys.snapshot_index());
            return Err(unreadable(&key, says));
        }
        self.buffer.retain(|i, _| *i > index);
        self.state_tx.send_replace(Arc::new(state));
        // Entries of ours folded into the snapshot before we applied them: the change is in the
        // state, but whether it was refused is not recorded anywhere.
        let mut c = lock(&self.claims);
        c.settled = index;
        let folded: Vec<u64> = c.waiting.keys().copied().filter(|i| *i <= index).collect();
        for i in folded {
            if let Some((_, reply)) = c.waiting.remove(&i) {
                let _ = reply.send(Err(StoreError::Io(format!(
                    "entry {i} was folded into a snapshot before this instance applied it; its change, if \
                     accepted, is in the current state"
                ))));
            }
        }
        tracing::info!(index, "loaded the etcd snapshot");
        Ok(())
    }
}

/// Writes the snapshot of `state` and deletes the log up to its index, unless a snapshot at the
/// same or a later index is already there (every instance tries at the same indexes; one wins).
async fn write_snapshot(client: Client, keys: Keys, tried: String, state: State) {
    let index = state.revision;
    let payload = match serde_json::to_vec(&state) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, index, "cannot encode the snapshot; the log keeps growing");
            return;
        }
    };
    let padded = format!("{index:020}");
    let ops = vec![
        TxnOp::put(keys.snapshot(), seal(&payload), None),
        TxnOp::put(keys.snapshot_index(), padded.clone(), None),
        TxnOp::delete(keys.log_dir(), Some(DeleteOptions::new().with_range(keys.log(index + 1)))),
    ];
    // A value comparison on a missing key is false in etcd, so the first snapshot is guarded
    // by the key's absence and later ones (nested) by the index being newer.
    let newer =
        Txn::new().when(vec![Compare::value(keys.snapshot_index(), CompareOp::Less, padded)]).and_then(ops.clone());
    let txn = Txn::new()
        .when(vec![Compare::create_revision(keys.snapshot_index(), CompareOp::Equal, 0)])
        .and_then(ops)
        .or_else(vec![TxnOp::txn(newer)]);
    // Repeating is safe: a snapshot that landed makes the repeat's comparison fail.
    match rpc(&tried, "writing a snapshot", Repeat::Always, txn_call(&client, txn)).await {
        Ok(_) => tracing::info!(index, bytes = payload.len(), "etcd snapshot written (or a newer one exists)"),
        Err(e) => tracing::warn!(error = %e, index, "snapshot failed; the log keeps growing until one succeeds"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_plain_http_is_accepted() {
        let ok = ["http://127.0.0.1:2379", "http://127.0.1.5:2379", "http://[::1]:2379", "localhost:2379"];
        for e in ok {
            assert_eq!(EtcdStore::check_endpoints(&[e.to_string()]), Ok(()), "{e}");
        }
        let refused = [
            ("http://10.0.0.1:2379", "not on loopback"),
            ("http://etcd.example:2379", "not on loopback"),
            ("10.1.2.3:2379", "not on loopback"),
            ("https://127.0.0.1:2379", "TLS to etcd is not supported yet"),
            ("unix://etcd.sock", "only http://"),
        ];
        for (e, why) in refused {
            let err = EtcdStore::check_endpoints(&["http://127.0.0.1:2379".to_string(), e.to_string()]).unwrap_err();
            assert!(err.contains(why) && err.contains(e), "{e}: {err}");
        }
        assert!(EtcdStore::check_endpoints(&[]).unwrap_err().contains("--etcd-endpoints"));
    }

    #[test]
    fn log_keys_sort_like_their_indexes_and_parse_back() {
        let keys = Keys { prefix: "/t/".into() };
        assert_eq!(keys.log(42), "/t/log/00000000000000000042");
        assert!(keys.log(9) < keys.log(10) && keys.log(u64::MAX) < keys.log_end());
        assert_eq!(keys.index_of(keys.log(u64::MAX).as_bytes()), Some(u64::MAX));
        assert_eq!(keys.index_of(b"/t/log/42"), None);
        assert_eq!(keys.index_of(b"/t/next"), None);
        assert_eq!(keys.index_of(b"/u/log/00000000000000000042"), None);
    }
}
