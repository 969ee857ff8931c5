//! The store conformance suite against `EtcdStore` on a real etcd (Debian's `etcd-server`), one
//! etcd per test on loopback with its own free ports and data directory, killed when the test
//! ends (also when it panics). A system etcd on 2379, if any, is never used.

#![cfg(feature = "etcd")]

use std::net::TcpListener;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use trellis_controlplane::state::Command;
use trellis_controlplane::store::conformance::{self, StoreFactory};
use trellis_controlplane::store::{EtcdStore, Store, StoreError};

const PREFIX: &str = "/trellis-test/";
/// Bound on etcd's start; it takes about a second here.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A running etcd, killed by PID on drop.
struct Etcd {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a free port on loopback");
    l.local_addr().expect("the bound address").port()
}

impl Etcd {
    async fn start() -> Etcd {
        // The ports are free when chosen; another process could take one before etcd binds it,
        // in which case etcd exits and the start is retried with new ports.
        for _ in 0..3 {
            if let Some(etcd) = Self::try_start().await {
                return etcd;
            }
        }
        panic!("etcd did not start three times in a row; see the logs above");
    }

    async fn try_start() -> Option<Etcd> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("the etcd log file");
        let spawned = Process::new("etcd")
            .arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&url)
            .arg("--advertise-client-urls")
            .arg(&url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("default={peer_url}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the etcd log file"))
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("the etcd binary is not on PATH: install Debian's etcd-server (apt-get install etcd-server)")
            }
            Err(e) => panic!("cannot start etcd: {e}"),
        };
        let mut etcd = Etcd { child, url, dir };
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = etcd.child.try_wait() {
                let log = std::fs::read_to_string(etcd.dir.path().join("etcd.log")).unwrap_or_default();
                eprintln!("etcd exited with {status} before answering; its log:\n{log}");
                return None;
            }
            if etcd.answers().await {
                return Some(etcd);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("etcd at {} did not answer within {}s", etcd.url, START_DEADLINE.as_secs());
    }

    async fn answers(&self) -> bool {
        let attempt = async {
            let mut c = Client::connect([self.url.as_str()], None).await.ok()?;
            c.status().await.ok()
        };
        matches!(tokio::time::timeout(Duration::from_secs(1), attempt).await, Ok(Some(_)))
    }

    async fn client(&self) -> Client {
        Client::connect([self.url.as_str()], None).await.expect("a client of the test's etcd")
    }

    fn factory(&self, compact_every: u64) -> impl StoreFactory<Store = EtcdStore> + use<> {
        let endpoints = vec![self.url.clone()];
        move || {
            let endpoints = endpoints.clone();
            async move { EtcdStore::connect_with(&endpoints, PREFIX, compact_every).await }
        }
    }
}

fn log_key(index: u64) -> String {
    format!("{PREFIX}log/{index:020}")
}

/// Flips a byte near the end of the payload of `key`.
async fn damage(client: &mut Client, key: &str) {
    let resp = client.get(key, None).await.expect("reading the entry");
    let mut bytes = resp.kvs().first().expect("the entry exists").value().to_vec();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x55;
    client.put(key, bytes, None).await.expect("writing the damaged entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_sequential_indexes() {
    let etcd = Etcd::start().await;
    conformance::sequential_indexes(etcd.factory(10_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_refusal_matches_state_machine() {
    let etcd = Etcd::start().await;
    conformance::refusal_matches_state_machine(etcd.factory(10_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_concurrent_proposals() {
    let etcd = Etcd::start().await;
    conformance::concurrent_proposals(etcd.factory(10_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_reopen_keeps_state() {
    let etcd = Etcd::start().await;
    conformance::reopen_keeps_state(etcd.factory(10_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_reopen_after_compaction() {
    let etcd = Etcd::start().await;
    conformance::reopen_after_compaction(etcd.factory(100), 250).await;
    // The history: service, token, 250 endpoints, health, delete, revoke, a refusal and the Noop
    // after reopening = 257 entries, so snapshots at 100 and 200 and the log from 201 on.
    let mut c = etcd.client().await;
    // Snapshots are written in the background: wait for the one at 200.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let index = c.get(format!("{PREFIX}snapshot_index"), None).await.unwrap();
        if index.kvs().first().map(|kv| kv.value().to_vec()) == Some(format!("{:020}", 200).into_bytes()) {
            break;
        }
        assert!(Instant::now() < deadline, "no snapshot at index 200 within 30s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = c.get(format!("{PREFIX}log/"), Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    let first = String::from_utf8_lossy(log.kvs()[0].key()).into_owned();
    assert_eq!(first, log_key(201), "entries up to the snapshot are deleted");
    assert_eq!(log.kvs().len(), 57);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_subscriber_sees_increasing_revisions() {
    let etcd = Etcd::start().await;
    conformance::subscriber_sees_increasing_revisions(etcd.factory(10_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_damaged_entry_is_reported() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    conformance::damaged_entry_is_reported(etcd.factory(10_000), |index| async move {
        let key = log_key(index);
        damage(&mut client, &key).await;
        key
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_read_sees_acknowledged_writes() {
    let Some(etcd) = Etcd::try_start().await else { return };
    conformance::read_sees_acknowledged_writes(etcd.factory(10_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_two_instances_converge() {
    let etcd = Etcd::start().await;
    conformance::two_instances_converge(etcd.factory(10_000)).await;
}

/// A damaged entry written by someone else while an instance runs is not applied: the instance
/// keeps its last state and refuses writes, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_damaged_entry_arriving_live_is_not_applied() {
    let etcd = Etcd::start().await;
    let store = etcd.factory(10_000).open().await.unwrap();
    store.propose(conformance::endpoint("live", 1)).await.unwrap();
    let before = conformance::fingerprint(&store.current());
    // Append entry 2 as another instance would, then damage it.
    let mut c = etcd.client().await;
    let sealed = {
        let payload = serde_json::to_vec(&conformance::endpoint("live", 2)).unwrap();
        let mut v = crc32fast::hash(&payload).to_le_bytes().to_vec();
        v.extend_from_slice(&payload);
        v[6] ^= 0x55;
        v
    };
    let txn = Txn::new()
        .when(vec![Compare::value(format!("{PREFIX}next"), CompareOp::Equal, "2")])
        .and_then(vec![TxnOp::put(log_key(2), sealed, None), TxnOp::put(format!("{PREFIX}next"), "3", None)]);
    assert!(c.txn(txn).await.unwrap().succeeded());
    let err = match tokio::time::timeout(Duration::from_secs(30), store.propose(Command::Noop)).await {
        Ok(Err(e)) => e,
        other => panic!("a proposal after a damaged entry must fail, got {other:?}"),
    };
    assert!(matches!(&err, StoreError::Corrupt(m) if m.contains(&log_key(2))), "{err}");
    assert_eq!(conformance::fingerprint(&store.current()), before, "the damaged entry was applied");
}

/// An etcd that does not answer is reported as I/O naming the endpoints tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_names_the_endpoints() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let err = match EtcdStore::connect(std::slice::from_ref(&url), PREFIX).await {
        Err(e) => e,
        Ok(_) => panic!("nothing listens on {url}"),
    };
    assert!(matches!(&err, StoreError::Io(m) if m.contains(&url)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}
