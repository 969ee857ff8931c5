//! Conformance cases every [`Store`] implementation passes, so backends are compared on the same
//! numbers: indexes, refusals, concurrency, durability across reopen, subscriptions and damage.
//!
//! Each case takes a [`StoreFactory`]: every call opens a new instance over the same backing data
//! (the same directory, the same etcd prefix), which is how "reopen" and "a second instance" are
//! written. Cases panic with a message saying what was expected, like any test; every wait has a
//! deadline so a hung store fails instead of blocking the suite.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;

use super::{Store, StoreError};
use crate::state::{ApplyError, Command, Endpoint, Protocol, Service, ServicePort, State, WorkloadToken};

/// Bound on every wait: generous, it only turns a hang into a failure.
const DEADLINE: Duration = Duration::from_secs(60);

/// Opens a store over the case's backing data; each call is a new instance.
pub trait StoreFactory {
    /// The store opened.
    type Store: Store;
    /// Opens a new instance.
    fn open(&self) -> impl Future<Output = Result<Self::Store, StoreError>>;
}

impl<S, F, Fut> StoreFactory for F
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<S, StoreError>>,
{
    type Store = S;
    fn open(&self) -> impl Future<Output = Result<S, StoreError>> {
        self()
    }
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {}s", DEADLINE.as_secs()),
    }
}

async fn open_ok<F: StoreFactory>(factory: &F) -> F::Store {
    match within("opening the store", factory.open()).await {
        Ok(s) => s,
        Err(e) => panic!("opening the store failed: {e}"),
    }
}

async fn propose_ok(store: &impl Store, cmd: Command) -> u64 {
    let what = format!("{cmd:?}");
    match within("a proposal", store.propose(cmd)).await {
        Ok(i) => i,
        Err(e) => panic!("proposing {what} failed: {e}"),
    }
}

/// An endpoint registration; `case` keeps the ids of different cases apart.
pub fn endpoint(case: &str, i: u32) -> Command {
    Command::UpsertEndpoint {
        endpoint: Endpoint {
            id: format!("a/{case}/web/{i}"),
            service: "web.default".into(),
            cluster: "a".into(),
            zone: "z1".into(),
            address: format!("127.0.0.1:{}", 10_000 + i),
            identity: String::new(),
            healthy: true,
            weight: 1,
            revision: 0,
            registrar: String::new(),
        },
        protocol: Protocol::Http,
    }
}

fn token(id: &str) -> Command {
    Command::CreateWorkloadToken(WorkloadToken {
        id: id.into(),
        secret_hash: "hash".into(),
        namespace: "default".into(),
        service_account: "web".into(),
        expires_at: 2_000_000_000,
        created_at: 1_700_000_000,
        description: "conformance".into(),
        revoked: false,
        gateway: false,
        cluster: String::new(),
    })
}

fn service(name: &str) -> Command {
    Command::UpsertService(Service {
        name: name.into(),
        namespace: "default".into(),
        ports: vec![ServicePort { name: "http".into(), port: 8080 }],
        protocol: Protocol::Grpc,
        exported: true,
        revision: 0,
        vip: String::new(),
    })
}

/// What a store holds, as JSON: services, endpoints and workload tokens.
fn contents(s: &State) -> String {
    serde_json::json!({
        "services": s.services,
        "endpoints": s.endpoints,
        "workload_tokens": s.workload_tokens,
    })
    .to_string()
}

/// [`contents`] and the revision: two stores with the same fingerprint hold the same state.
pub fn fingerprint(s: &State) -> String {
    format!("{} @ {}", contents(s), s.revision)
}

/// Waits until `store` has applied `revision`.
async fn wait_applied(store: &impl Store, revision: u64) -> Arc<State> {
    let mut rx = store.subscribe();
    let seen = within(&format!("waiting for revision {revision}"), rx.wait_for(|s| s.revision >= revision)).await;
    match seen {
        Ok(s) => s.clone(),
        Err(_) => panic!("the store closed before applying revision {revision}"),
    }
}

/// Sequential proposals get strictly increasing, contiguous indexes; each resolves only once
/// applied (the state's revision is the index at that moment), and the revision ends at the last.
pub async fn sequential_indexes(factory: impl StoreFactory) {
    let store = open_ok(&factory).await;
    let start = store.current().revision;
    let mut last = start;
    for i in 0..20 {
        let index = propose_ok(&store, endpoint("seq", i)).await;
        assert!(index > last, "index {index} after {last}: indexes must strictly increase");
        assert_eq!(store.current().revision, index, "a proposal resolves only once applied (read-your-writes)");
        last = index;
    }
    assert_eq!(last - start, 20, "20 proposals on one instance take 20 consecutive indexes");
    assert_eq!(store.current().revision, last);
    assert_eq!(store.current().endpoints.len(), 20);
}

/// A refused command returns the error `State::apply` returns for it (same variant, same
/// message), takes one index, and leaves services, endpoints and tokens unchanged.
pub async fn refusal_matches_state_machine(factory: impl StoreFactory) {
    let store = open_ok(&factory).await;
    propose_ok(&store, endpoint("refuse", 1)).await;
    propose_ok(&store, token("tok-1")).await;
    propose_ok(&store, service("api")).await;
    let before = contents(&store.current());
    let mut bad_address = endpoint("refuse", 2);
    if let Command::UpsertEndpoint { endpoint, .. } = &mut bad_address {
        endpoint.address = "nowhere".into();
    }
    let refused = [
        Command::DeleteEndpoint { id: "missing".into(), registrar: None },
        bad_address,
        token("tok-1"),
        Command::DeleteService { key: "missing.default".into() },
        Command::RevokeWorkloadToken { id: "missing".into() },
        Command::SetEndpointHealth { id: "missing".into(), healthy: false, registrar: None },
    ];
    let mut variants = BTreeSet::new();
    for cmd in refused {
        let current = store.current();
        let expected = match (*current).clone().apply(current.revision + 1, &cmd) {
            Err(e) => e,
            Ok(()) => panic!("the case is wrong: the state machine accepts {cmd:?}"),
        };
        let got = within("a refused proposal", store.propose(cmd.clone())).await;
        match got {
            Err(StoreError::Rejected(e)) => assert_eq!(e, expected, "{cmd:?}"),
            other => panic!("{cmd:?}: expected Rejected({expected:?}), got {other:?}"),
        }
        variants.insert(match expected {
            ApplyError::Invalid(_) => "invalid",
            ApplyError::NotFound(_) => "not found",
            ApplyError::Conflict(_) => "conflict",
        });
        let after = store.current();
        assert_eq!(after.revision, current.revision + 1, "{cmd:?}: a refused command still takes its index");
        assert_eq!(contents(&after), before, "{cmd:?}: a refused command changed the state");
    }
    assert_eq!(variants.len(), 3, "the case covers every ApplyError variant: {variants:?}");
}

/// 200 concurrent proposals all resolve, with 200 distinct indexes, and all 200 endpoints are
/// in the state at the last index.
pub async fn concurrent_proposals(factory: impl StoreFactory) {
    let store = open_ok(&factory).await;
    let start = store.current().revision;
    let results =
        within("200 concurrent proposals", join_all((0..200).map(|i| store.propose(endpoint("conc", i))))).await;
    let mut indexes = BTreeSet::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(index) => {
                indexes.insert(index);
            }
            Err(e) => panic!("concurrent proposal {i} failed: {e}"),
        }
    }
    assert_eq!(indexes.len(), 200, "every proposal gets its own index");
    assert_eq!(indexes.first().copied(), Some(start + 1));
    assert_eq!(indexes.last().copied(), Some(start + 200));
    let state = store.current();
    assert_eq!(state.endpoints.len(), 200);
    assert_eq!(state.revision, start + 200);
}

async fn mixed_history(store: &impl Store, entries: u32) {
    propose_ok(store, service("api")).await;
    propose_ok(store, token("tok-r")).await;
    // Waves of concurrent proposals: fast on every backend, and they exercise batching.
    let mut i = 0;
    while i < entries {
        let wave: Vec<_> = (i..(i + 500).min(entries)).map(|j| store.propose(endpoint("reopen", j))).collect();
        for r in within("a wave of proposals", join_all(wave)).await {
            if let Err(e) = r {
                panic!("proposal failed: {e}");
            }
        }
        i += 500;
    }
    propose_ok(store, Command::SetEndpointHealth { id: "a/reopen/web/1".into(), healthy: false, registrar: None })
        .await;
    propose_ok(store, Command::DeleteEndpoint { id: "a/reopen/web/2".into(), registrar: None }).await;
    propose_ok(store, Command::RevokeWorkloadToken { id: "tok-r".into() }).await;
    assert!(store.propose(Command::DeleteEndpoint { id: "missing".into(), registrar: None }).await.is_err());
}

/// The state after close and reopen is identical (services, endpoints, tokens, revision), and
/// the next proposal takes the next index.
pub async fn reopen_keeps_state(factory: impl StoreFactory) {
    reopen_after(factory, 30).await;
}

/// As [`reopen_keeps_state`] with `entries` endpoints: pass more than the backend's compaction
/// threshold to check that a snapshot plus the log after it restore the same state.
pub async fn reopen_after_compaction(factory: impl StoreFactory, entries: u32) {
    reopen_after(factory, entries).await;
}

async fn reopen_after(factory: impl StoreFactory, entries: u32) {
    let (before, revision) = {
        let store = open_ok(&factory).await;
        mixed_history(&store, entries).await;
        let s = store.current();
        assert_eq!(s.endpoints.len(), entries as usize - 1);
        (contents(&s), s.revision)
    };
    let store = open_ok(&factory).await;
    let after = store.current();
    // A Raft leader starts its term with an entry of its own, so the revision may have moved on.
    assert_eq!(contents(&after), before, "the state after reopening differs");
    assert!(after.revision >= revision, "reopened at revision {} below {revision}", after.revision);
    let next = propose_ok(&store, Command::Noop).await;
    assert!(next > after.revision, "the log goes on after the last index: {next} after {}", after.revision);
}

/// A subscriber sees the revision only increase and ends at the final one.
pub async fn subscriber_sees_increasing_revisions(factory: impl StoreFactory) {
    let store = open_ok(&factory).await;
    let mut rx = store.subscribe();
    let (final_tx, mut final_rx) = tokio::sync::watch::channel(0u64);
    let collector = tokio::spawn(async move {
        let mut seen = vec![rx.borrow_and_update().revision];
        loop {
            let target = *final_rx.borrow();
            if target > 0 && seen.last().copied().unwrap_or_default() >= target {
                return seen;
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return seen;
                    }
                    seen.push(rx.borrow_and_update().revision);
                }
                _ = final_rx.changed() => {}
            }
        }
    });
    for wave in 0..5 {
        let futs = (0..10).map(|i| store.propose(endpoint("sub", wave * 10 + i)));
        for r in within("a wave of proposals", join_all(futs)).await {
            if let Err(e) = r {
                panic!("proposal failed: {e}");
            }
        }
    }
    let last = store.current().revision;
    let _ = final_tx.send(last);
    let seen = match within("the subscriber", collector).await {
        Ok(s) => s,
        Err(e) => panic!("the subscriber task failed: {e}"),
    };
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "revisions went backwards or repeated: {seen:?}");
    assert_eq!(seen.last().copied(), Some(last), "the subscriber ends at the final revision: {seen:?}");
    assert!(seen.len() >= 2, "the subscriber saw at least the start and the end: {seen:?}");
}

/// A damaged entry is reported as [`StoreError::Corrupt`] when the store opens, never served.
/// `corrupt(index)` damages that log entry in the backing data (the store is closed then) and
/// returns the text the error must contain to name it.
pub async fn damaged_entry_is_reported<C, CF>(factory: impl StoreFactory, corrupt: C)
where
    C: FnOnce(u64) -> CF,
    CF: Future<Output = String>,
{
    let second = {
        let store = open_ok(&factory).await;
        propose_ok(&store, endpoint("damage", 1)).await;
        let second = propose_ok(&store, endpoint("damage", 2)).await;
        propose_ok(&store, endpoint("damage", 3)).await;
        second
    };
    let name = corrupt(second).await;
    match within("opening a damaged store", factory.open()).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains(&name), "the error must name {name}: {m}"),
        Err(other) => panic!("a damaged entry must be reported as Corrupt, got: {other}"),
        Ok(s) => panic!("a damaged store opened and serves revision {}", s.current().revision),
    }
}

/// For stores that allow several instances over the same data: two instances propose 100
/// each, concurrently, and end with identical state holding all 200 endpoints.
pub async fn two_instances_converge(factory: impl StoreFactory) {
    let a = open_ok(&factory).await;
    let b = open_ok(&factory).await;
    let start = a.current().revision;
    let (ra, rb) = within("200 proposals on two instances", async {
        tokio::join!(propose_endpoints(&a, 0..100), propose_endpoints(&b, 100..200))
    })
    .await;
    let mut indexes = BTreeSet::new();
    for r in ra.into_iter().chain(rb) {
        match r {
            Ok(i) => {
                assert!(indexes.insert(i), "index {i} was given twice");
            }
            Err(e) => panic!("a proposal failed: {e}"),
        }
    }
    assert_eq!(indexes.len(), 200);
    let last = start + 200;
    assert_eq!(indexes.last().copied(), Some(last), "200 entries after {start}");
    let sa = wait_applied(&a, last).await;
    let sb = wait_applied(&b, last).await;
    assert_eq!(sa.endpoints.len(), 200);
    assert_eq!(sa.revision, last);
    assert_eq!(fingerprint(&sa), fingerprint(&sb), "the two instances disagree");
}

/// Proposes endpoints `ids` concurrently; each checks read-your-writes on its own instance.
async fn propose_endpoints(store: &impl Store, ids: std::ops::Range<u32>) -> Vec<Result<u64, StoreError>> {
    join_all(ids.map(|i| async move {
        let index = store.propose(endpoint("two", i)).await?;
        let applied = store.current().revision;
        assert!(applied >= index, "resolved at {index} while this instance is at {applied}");
        Ok(index)
    }))
    .await
}

/// A linearizable read issued after a write was acknowledged reflects it, on a new instance too.
pub async fn read_sees_acknowledged_writes(factory: impl StoreFactory) {
    let store = open_ok(&factory).await;
    for i in 0..20 {
        let index = propose_ok(&store, endpoint("read", i)).await;
        let state = match within("a linearizable read", store.read()).await {
            Ok(s) => s,
            Err(e) => panic!("read failed: {e}"),
        };
        assert!(state.revision >= index, "read at revision {} after a write acknowledged at {index}", state.revision);
        assert!(state.endpoints.contains_key(&format!("a/read/web/{i}")), "write {i} missing from the read");
    }
}

#[cfg(test)]
mod tests {
    //! The suite against the Raft store as a group of one, each case in its own directory.

    use std::path::PathBuf;

    use super::*;
    use crate::store::RaftStore;
    use crate::store::raft::node::NoPeers;
    use crate::store::raft::{RaftOptions, Start};

    fn raft_with(dir: &tempfile::TempDir, compact_every: u64) -> impl StoreFactory<Store = RaftStore> + use<> {
        let path: PathBuf = dir.path().join("raft");
        move || {
            let path = path.clone();
            async move {
                let start = if RaftStore::exists(&path) { Start::Restart } else { Start::Bootstrap };
                let options = RaftOptions { compact_every, keep_entries: 10, ..RaftOptions::default() };
                RaftStore::open(&path, start, options, |_| Box::new(NoPeers))
            }
        }
    }

    fn raft(dir: &tempfile::TempDir) -> impl StoreFactory<Store = RaftStore> + use<> {
        raft_with(dir, 10_000)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raft_sequential_indexes() {
        let dir = tempfile::tempdir().unwrap();
        sequential_indexes(raft(&dir)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raft_refusal_matches_state_machine() {
        let dir = tempfile::tempdir().unwrap();
        refusal_matches_state_machine(raft(&dir)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raft_concurrent_proposals() {
        let dir = tempfile::tempdir().unwrap();
        concurrent_proposals(raft(&dir)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raft_reopen_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        reopen_keeps_state(raft(&dir)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raft_reopen_after_compaction() {
        let dir = tempfile::tempdir().unwrap();
        reopen_after_compaction(raft_with(&dir, 100), 250).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raft_subscriber_sees_increasing_revisions() {
        let dir = tempfile::tempdir().unwrap();
        subscriber_sees_increasing_revisions(raft(&dir)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raft_read_sees_acknowledged_writes() {
        let dir = tempfile::tempdir().unwrap();
        read_sees_acknowledged_writes(raft(&dir)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raft_damaged_entry_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft");
        damaged_entry_is_reported(raft(&dir), |index| async move {
            crate::store::raft::log::damage_entry(&path, index);
            format!("entry {index}")
        })
        .await;
    }
}
