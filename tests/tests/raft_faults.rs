//! Three real `trellis-cp` processes under concurrent clients while members are killed (SIGKILL),
//! paused (SIGSTOP) and restarted. Every call is recorded with its invocation and return time;
//! at the end the history must be linearizable, every acknowledged write must be present, and
//! every member must hold the same state (same hash at the same applied index).
//!
//! Clients write and read five registers (a service's port is the register's value) through the
//! admin API, whose reads are linearizable (ReadIndex), and create services with unique names
//! (the "acknowledged writes are not lost" check). A client whose member fails moves on to the
//! next member, as the CLI user would.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trellis_controlplane::cli::client;
use trellis_controlplane::context::Context;
use trellis_controlplane::linearizability::{self, History, Input, Outcome, Output};
use trellis_proto::pb;
use trellis_tests::group::Group;

const KEYS: u32 = 5;
const CLIENTS: u64 = 6;
const CALL_TIMEOUT: Duration = Duration::from_secs(4);

struct Shared {
    history: Mutex<History>,
    acked_inserts: Mutex<BTreeSet<String>>,
    start: Instant,
    stop: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

fn key_name(k: u32) -> String {
    format!("reg{k}")
}

fn service(name: &str, port: u32) -> pb::Service {
    pb::Service {
        name: name.to_string(),
        namespace: "default".into(),
        ports: vec![pb::ServicePort { name: "v".into(), port }],
        protocol: "http".into(),
        exported: false,
        revision: 0,
        vip: String::new(),
    }
}

/// One client: a loop of random operations against one member at a time.
async fn client_loop(id: u64, contexts: Vec<Context>, shared: Arc<Shared>) -> (u64, u64) {
    let mut member = id as usize % contexts.len();
    let mut admin = client::admin(&contexts[member]).ok();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut n = 0u32;
    while !shared.stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let Some(a) = admin.as_mut() else {
            member = (member + 1) % contexts.len();
            admin = client::admin(&contexts[member]).ok();
            continue;
        };
        let roll = fastrand::u32(0..10);
        let success = if roll < 4 {
            // Write a register: the value is unique across the run.
            let key = key_name(fastrand::u32(0..KEYS));
            let value = (id as u32) * 10_000 + n;
            let op = shared.history.lock().unwrap().invoke(
                id,
                Input::Write { key: key.clone(), value: value.into() },
                shared.now(),
            );
            let r = tokio::time::timeout(CALL_TIMEOUT, a.apply_service(service(&key, value))).await;
            match r {
                Ok(Ok(_)) => {
                    shared.history.lock().unwrap().ret(op, Output::WriteOk, shared.now());
                    true
                }
                _ => false,
            }
        } else if roll < 8 {
            let key = key_name(fastrand::u32(0..KEYS));
            let op = shared.history.lock().unwrap().invoke(id, Input::Read { key: key.clone() }, shared.now());
            let r = tokio::time::timeout(
                CALL_TIMEOUT,
                a.list_services(pb::ListServicesRequest { namespace: "default".into() }),
            )
            .await;
            match r {
                Ok(Ok(resp)) => {
                    let seen = resp
                        .into_inner()
                        .services
                        .iter()
                        .find(|s| s.name == key)
                        .and_then(|s| s.ports.first())
                        .map(|p| u64::from(p.port));
                    shared.history.lock().unwrap().ret(op, Output::Read(seen), shared.now());
                    true
                }
                _ => false,
            }
        } else {
            let name = format!("ins-{id}-{n}");
            let r = tokio::time::timeout(CALL_TIMEOUT, a.apply_service(service(&name, 1))).await;
            match r {
                Ok(Ok(_)) => {
                    shared.acked_inserts.lock().unwrap().insert(name);
                    true
                }
                _ => false,
            }
        };
        if success {
            ok += 1;
        } else {
            failed += 1;
            member = (member + 1) % contexts.len();
            admin = client::admin(&contexts[member]).ok();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    (ok, failed)
}

async fn leader(group: &Group) -> Option<usize> {
    group.leader().await
}

async fn wait_new_leader(group: &Group, old: Option<usize>, within: Duration) -> (usize, Duration) {
    let start = Instant::now();
    loop {
        if let Some(l) = leader(group).await
            && Some(l) != old
            && group.members[l].up()
        {
            return (l, start.elapsed());
        }
        assert!(start.elapsed() < within, "no new leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn three_members_stay_linearizable_under_kills_and_pauses() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Frequent snapshots, so that restarted and paused members catch up from one, and a
    // member's restart replays a snapshot plus a log tail.
    let mut group = Group::start(dir.path(), 3, &["--raft-snapshot-every", "200"]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let _enter = rt.enter();
    let shared = Arc::new(Shared {
        history: Mutex::new(History::new()),
        acked_inserts: Mutex::new(BTreeSet::new()),
        start: Instant::now(),
        stop: std::sync::atomic::AtomicBool::new(false),
    });
    let contexts: Vec<Context> = (0..3).map(|i| group.context_for(i)).collect();
    let clients: Vec<_> = (0..CLIENTS).map(|id| rt.spawn(client_loop(id, contexts.clone(), shared.clone()))).collect();
    let pause = |d: u64| std::thread::sleep(Duration::from_millis(d));
    let mut elections = Vec::new();

    pause(2_000);
    // 1. SIGKILL the leader; a new one takes over; the old one comes back.
    let l = rt.block_on(leader(&group)).expect("a leader");
    group.members[l].kill();
    let (_, took) = rt.block_on(wait_new_leader(&group, Some(l), Duration::from_secs(15)));
    elections.push(("leader SIGKILL", took));
    pause(1_500);
    group.members[l].restart();
    pause(1_500);

    // 2. SIGSTOP a follower for 3 s.
    let l = rt.block_on(leader(&group)).expect("a leader");
    let f = (l + 1) % 3;
    group.members[f].pause();
    pause(3_000);
    group.members[f].resume();
    pause(1_500);

    // 3. SIGSTOP the leader for 3 s: the others elect a new one; the old one steps down.
    let l = rt.block_on(leader(&group)).expect("a leader");
    group.members[l].pause();
    let (_, took) = rt.block_on(wait_new_leader(&group, Some(l), Duration::from_secs(15)));
    elections.push(("leader SIGSTOP", took));
    pause(1_500);
    group.members[l].resume();
    pause(1_500);

    // 4. SIGKILL a follower, restart it later.
    let l = rt.block_on(leader(&group)).expect("a leader");
    let f = (l + 2) % 3;
    group.members[f].kill();
    pause(2_000);
    group.members[f].restart();
    pause(2_000);

    shared.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let totals: Vec<(u64, u64)> = clients.into_iter().map(|c| rt.block_on(c).expect("client")).collect();
    let (ok, failed) = totals.iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));

    let group = group;
    let _dump = DumpOnPanic(&group);
    // Every member converges on the same state.
    let deadline = Instant::now() + Duration::from_secs(30);
    let final_status = loop {
        let s = rt.block_on(group.status());
        if let Some(s) = &s {
            let hashes: BTreeSet<(&str, u64)> = s.members.iter().map(|m| (m.state_hash.as_str(), m.applied)).collect();
            if s.members.len() == 3 && s.members.iter().all(|m| m.error.is_empty()) && hashes.len() == 1 {
                break s.clone();
            }
        }
        assert!(Instant::now() < deadline, "members did not converge: {s:#?}");
        std::thread::sleep(Duration::from_millis(200));
    };

    // Acknowledged inserts are all there, read linearizably from every member.
    let acked = shared.acked_inserts.lock().unwrap().clone();
    for i in 0..3 {
        let mut admin = client::admin(&group.context_for(i)).expect("admin");
        let services = rt
            .block_on(admin.list_services(pb::ListServicesRequest { namespace: "default".into() }))
            .expect("final read")
            .into_inner()
            .services;
        let names: BTreeSet<String> = services.into_iter().map(|s| s.name).collect();
        let lost: Vec<&String> = acked.iter().filter(|n| !names.contains(*n)).collect();
        assert!(lost.is_empty(), "member {i} lost {} acknowledged writes: {lost:?}", lost.len());
    }

    let history = shared.history.lock().unwrap().operations().to_vec();
    let started = Instant::now();
    let outcome = linearizability::check(&history, Some(Duration::from_secs(120)));
    eprintln!(
        "raft fault test: {} operations ({ok} ok, {failed} failed or timed out), {} acknowledged inserts, \
         history of {} register calls checked in {:?}: {outcome:?}; elections: {elections:?}; final: term {} applied {}",
        ok + failed,
        acked.len(),
        history.len(),
        started.elapsed(),
        final_status.term,
        final_status.members[0].applied,
    );
    assert_eq!(outcome, Outcome::Ok, "the history is not linearizable");
    // Snapshots were taken, and sent beyond the two at join: a member that fell behind the kept
    // log tail caught up from one.
    let logs: String = group.members.iter().map(|m| m.logs()).collect();
    let sent = logs.matches("snapshot sent").count();
    assert!(logs.contains("raft log compacted"), "no snapshot was taken");
    assert!(sent > 2, "only {sent} snapshots were sent: the catch-up path was not exercised");
    assert!(ok > 100, "too few successful operations ({ok}) for the test to mean anything");
}

/// Prints every member's log when the test fails after the faults.
struct DumpOnPanic<'a>(&'a Group);

impl Drop for DumpOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for m in &self.0.members {
                eprintln!("==== {} ====\n{}", m.name, m.logs());
            }
        }
    }
}
