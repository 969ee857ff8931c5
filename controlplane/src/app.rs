//! Assembly of a control-plane instance: store, bootstrap, gRPC services over mTLS, metrics,
//! background tasks; returns a handle with the addresses actually bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use trellis_proto::pb;
use trellis_proto::tls::{IdentityStore, client_config, server_config};
use trellis_proto::verify::{IdMatcher, SharedBundle, TrustBundle};

use crate::admin::AdminService;
use crate::bootstrap::{self, BootstrapError};
use crate::certs::{CertificateService, FailureLimiter, Signer};
use crate::config::{ConfigError, CpConfig, StoreKind};
use crate::discovery::{DiscoveryService, expire_orphans};
use crate::membership::{Group, JoinTicket, MembershipService};
use crate::metrics::{self, Metrics};
use crate::proxies::ProxyTracker;
use crate::state::{Command, Member};
use crate::store::raft::transport::{GrpcTransport, PeerService, Peers};
use crate::store::raft::{RaftOptions, RaftStore, Start};
use crate::store::{Store, StoreError};

/// Why an instance cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("bootstrap: {0}")]
    Bootstrap(#[from] BootstrapError),
    #[error("cannot listen on {addr}: {source} (is another instance running? choose another port)")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("trust bundle: {0}")]
    Bundle(#[from] trellis_proto::VerifyError),
    #[error("TLS: {0}")]
    Tls(#[from] trellis_proto::tls::TlsError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("joining the control-plane group: {0}")]
    Join(String),
}

/// A running instance.
pub struct Handle {
    /// Bound address of the gRPC mTLS listener.
    pub grpc_addr: SocketAddr,
    /// Bound address of the metrics listener.
    pub metrics_addr: SocketAddr,
    /// Path of the trust bundle file for proxies.
    pub trust_bundle: PathBuf,
    /// Path of the admin context.
    pub admin_context: PathBuf,
    /// The store, for in-process tests.
    pub store: Arc<dyn Store>,
    /// The Raft member, unless the store is etcd.
    pub raft: Option<Arc<RaftStore>>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl Handle {
    /// Waits for SIGTERM or SIGINT (or for the store to fail, or for this member to be removed
    /// from the group), then shuts down gracefully. Returns whether the stop was clean.
    pub async fn wait_termination(self) -> bool {
        let ended = async {
            match &self.raft {
                Some(raft) => {
                    let mut rx = raft.status();
                    let s = rx.wait_for(|s| s.fatal.is_some() || s.removed).await.map(|s| s.clone());
                    match s {
                        Ok(s) if s.removed => {
                            tracing::warn!(
                                "removed from the control-plane group; stopping (its data directory can be deleted)"
                            );
                            true
                        }
                        Ok(s) => {
                            tracing::error!(reason = s.fatal.as_deref().unwrap_or(""), "the store failed; stopping");
                            false
                        }
                        Err(_) => false,
                    }
                }
                None => std::future::pending().await,
            }
        };
        let clean = tokio::select! {
            () = wait_signal() => true,
            clean = ended => clean,
        };
        tracing::info!("shutting down");
        self.shutdown().await;
        clean
    }

    /// Hands leadership to another voter (if this instance leads), stops accepting, lets streams
    /// end for a moment, then stops.
    pub async fn shutdown(self) {
        if let Some(raft) = &self.raft {
            let s = raft.status().borrow().clone();
            if s.role == "leader" && s.fatal.is_none() {
                let last = s.last_index;
                let best =
                    s.voters.iter().filter(|v| **v != s.id).max_by_key(|v| s.matched.get(v).copied().unwrap_or(0));
                if let Some(&to) = best.filter(|v| s.matched.get(v).copied().unwrap_or(0) + 16 >= last) {
                    raft.handle().transfer_leader(to);
                    let mut rx = raft.status();
                    let moved = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|s| s.leader != s.id)).await;
                    tracing::info!(
                        to = format!("{to:x}"),
                        moved = moved.is_ok(),
                        "leadership handed over before stopping"
                    );
                }
            }
        }
        let _ = self.shutdown.send(true);
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(3), &mut server).await.is_err() {
            server.abort();
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Starts an instance.
pub async fn build(cfg: CpConfig) -> Result<Handle, AppError> {
    build_with_progress(cfg, &|_| {}).await
}

/// A sink for one-line progress messages of a start (`trellis cluster join` prints them).
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// As [`build`], reporting the steps of a join to `progress`.
pub async fn build_with_progress(cfg: CpConfig, progress: Progress<'_>) -> Result<Handle, AppError> {
    cfg.validate()?;
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting trellis-cp");
    std::fs::create_dir_all(&cfg.data_dir)?;
    let listener = TcpListener::bind(cfg.listen).await.map_err(|source| AppError::Bind { addr: cfg.listen, source })?;
    let grpc_addr = listener.local_addr()?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| grpc_addr.to_string());
    let signer = Arc::new(Signer::with_key_file(&cfg.cluster, bootstrap::cluster_key_path(&cfg.data_dir)));
    let identity = IdentityStore::empty();
    let bundle = SharedBundle::new(TrustBundle::empty(&cfg.trust_domain));

    let opened = open_store(&cfg, &advertise, identity.clone(), bundle.clone(), progress).await?;
    let store = opened.store.clone();
    let mut created = false;
    if let Some(raft) = &opened.raft {
        if opened.may_bootstrap {
            raft.wait_leader(Duration::from_secs(10)).await?;
            created = bootstrap::ensure_federation(store.as_ref(), &cfg).await?;
        }
    } else {
        created = bootstrap::ensure_federation(store.as_ref(), &cfg).await?;
    }
    let state = store.current();
    if state.federation.is_some() && !state.clusters.contains_key(&cfg.cluster) {
        let known = state.clusters.keys().cloned().collect::<Vec<_>>().join(", ");
        return Err(BootstrapError::WrongCluster { cluster: cfg.cluster.clone(), known }.into());
    }
    // This instance's identity and trust: from the replicated state when it has them, else from
    // what joining gave (a new member serves with it until its state has caught up).
    let td = state.trust_domain().map(str::to_string).or_else(|| opened.joined_td.clone());
    let td = td.unwrap_or_else(|| cfg.trust_domain.clone());
    match bootstrap::serving_identity(&state, &signer, &cfg) {
        Ok(id) => identity.replace(id),
        Err(e) => match bootstrap::load_join_identity(&cfg.data_dir)? {
            Some(id) => identity.replace(id),
            None => return Err(e.into()),
        },
    }
    let roots: Vec<String> = if state.roots.is_empty() {
        bootstrap::load_join_bundle(&cfg.data_dir)?.into_iter().collect()
    } else {
        state.roots.iter().map(|r| r.cert_pem.clone()).collect()
    };
    bundle.store(TrustBundle::from_pem(&td, &roots)?);
    if !state.roots.is_empty() {
        bootstrap::write_trust_bundle(&cfg.data_dir, &state)?;
    }

    let metrics_listener =
        metrics::bind(cfg.metrics).await.map_err(|source| AppError::Bind { addr: cfg.metrics, source })?;
    let metrics_addr = metrics_listener.local_addr()?;
    let admin_context = if state.federation.is_some() && (created || opened.raft.is_none() || !opened.joined) {
        bootstrap::write_admin_context(&cfg.data_dir, &state, &signer, &cfg, &advertise, created)?
    } else {
        bootstrap::admin_context_path(&cfg.data_dir)
    };
    if created {
        tracing::info!(path = %admin_context.display(), "admin credential written; import it with `trellis config import`");
    }

    let metrics = Metrics::new();
    let proxies = Arc::new(ProxyTracker::default());
    let tls = server_config(identity.clone(), bundle.clone(), IdMatcher::AnyInTrustDomain, false, &[b"h2"])?;
    let incoming = trellis_proto::grpc::tls_incoming(listener, TlsAcceptor::from(tls));
    let overlay = crate::overlay::Overlay::new(store.clone(), Some(metrics.clone()));
    let fanout = crate::fanout::Fanout::new();
    tokio::spawn(fanout.clone().follow(store.subscribe()));
    let discovery = DiscoveryService {
        fanout,
        store: store.clone(),
        overlay: overlay.clone(),
        proxies: proxies.clone(),
        cluster: cfg.cluster.clone(),
        node: cfg.node.clone(),
        metrics: metrics.clone(),
    };
    let certs = CertificateService {
        store: store.clone(),
        signer: signer.clone(),
        limiter: FailureLimiter::default(),
        metrics: metrics.clone(),
    };
    let group = opened.raft.as_ref().map(|raft| {
        Arc::new(Group {
            raft: raft.handle(),
            peers: opened.peers.clone(),
            tls: opened.peer_tls.clone(),
            state: store.subscribe(),
        })
    });
    let admin = AdminService {
        store: store.clone(),
        overlay: overlay.clone(),
        proxies: proxies.clone(),
        cluster: cfg.cluster.clone(),
        node: cfg.node.clone(),
        group,
    };
    let peer_services = opened.raft.as_ref().map(|raft| {
        let peer = PeerService {
            handle: raft.handle(),
            peers: opened.peers.clone(),
            status: raft.status(),
            state: store.subscribe(),
        };
        let membership = MembershipService {
            store: store.clone(),
            raft: raft.handle(),
            limiter: FailureLimiter::default(),
            signer: signer.clone(),
        };
        (
            pb::peer_server::PeerServer::new(peer)
                .max_decoding_message_size(crate::store::raft::transport::MAX_MESSAGE),
            pb::membership_server::MembershipServer::new(membership),
        )
    });
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    let server = tokio::spawn(async move {
        let (peer, membership) = match peer_services {
            Some((p, m)) => (Some(p), Some(m)),
            None => (None, None),
        };
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(15)))
            .add_service(pb::discovery_server::DiscoveryServer::new(discovery))
            .add_service(pb::certificates_server::CertificatesServer::new(certs))
            .add_service(pb::admin_server::AdminServer::new(admin))
            .add_optional_service(peer)
            .add_optional_service(membership)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = shutdown_rx.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });

    let mut tasks = vec![
        tokio::spawn(metrics::serve(metrics_listener, metrics.clone())),
        tokio::spawn(overlay.clone().run()),
        tokio::spawn(expire_orphans(
            store.clone(),
            overlay.clone(),
            proxies.clone(),
            cfg.cluster.clone(),
            cfg.node.clone(),
            cfg.endpoint_grace(),
        )),
        tokio::spawn(follow_state(store.clone(), bundle, metrics.clone(), cfg.data_dir.clone(), td.clone())),
        tokio::spawn(renew_serving_identity(store.clone(), signer, identity, cfg.clone())),
    ];
    if let Some(raft) = &opened.raft {
        tasks.push(tokio::spawn(opened.peers.clone().follow(store.subscribe())));
        let me = Member {
            id: raft.id(),
            name: cfg.node.clone(),
            cluster: cfg.cluster.clone(),
            address: advertise.clone(),
            key_pin: String::new(),
        };
        tasks.push(tokio::spawn(keep_member_record(store.clone(), me)));
    }
    if let Some(expiry) = crate::certs::ca_not_after(&state, &cfg.cluster) {
        metrics.ca_expiry.set(expiry.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64);
    }
    metrics.ready.store(true, Ordering::Relaxed);
    if let Some(path) = &cfg.ready_file {
        let ready = serde_json::json!({
            "grpc": grpc_addr.to_string(),
            "metrics": metrics_addr.to_string(),
            "trust_bundle": bootstrap::trust_bundle_path(&cfg.data_dir),
            "admin_context": admin_context,
            "cluster": cfg.cluster,
            "trust_domain": td,
            "member_id": opened.raft.as_ref().map(|r| format!("{:x}", r.id())),
        });
        crate::context::write_private(path, ready.to_string().as_bytes())?;
    }
    tasks.shrink_to_fit();
    tracing::info!(grpc = %grpc_addr, metrics = %metrics_addr, cluster = %cfg.cluster, node = %cfg.node, "trellis-cp serving");
    Ok(Handle {
        grpc_addr,
        metrics_addr,
        trust_bundle: bootstrap::trust_bundle_path(&cfg.data_dir),
        admin_context,
        store,
        raft: opened.raft,
        shutdown: shutdown_tx,
        server,
        tasks,
    })
}

/// The store an instance runs on, with what the Raft group needs besides.
struct Opened {
    store: Arc<dyn Store>,
    raft: Option<Arc<RaftStore>>,
    peers: Arc<Peers>,
    peer_tls: Arc<rustls::ClientConfig>,
    /// A new group: this instance creates the federation.
    may_bootstrap: bool,
    /// This start joined an existing group.
    joined: bool,
    joined_td: Option<String>,
}

/// Opens the store the configuration names: restarts a member from its log, joins a group with
/// a token, or starts a new group of one.
async fn open_store(
    cfg: &CpConfig,
    advertise: &str,
    identity: Arc<IdentityStore>,
    bundle: SharedBundle,
    progress: Progress<'_>,
) -> Result<Opened, AppError> {
    let peers = Arc::new(Peers::default());
    let peer_tls = client_config(Some(identity.clone()), bundle.clone(), IdMatcher::AnyControlPlane, &[b"h2"])?;
    match cfg.store {
        StoreKind::Raft => {
            let dir = cfg.data_dir.join("raft");
            let token = cfg.join_token()?;
            let mut joined_td = None;
            let start = if RaftStore::exists(&dir) {
                if token.is_some() {
                    tracing::warn!("--join-token ignored: this data directory is already a member of a group");
                }
                Start::Restart
            } else if let Some(token) = token {
                let ticket = JoinTicket::decode(&token).map_err(AppError::Join)?;
                tracing::info!(addresses = ?ticket.addresses, cluster = %ticket.cluster, "joining the control-plane group");
                let joined =
                    crate::membership::join(&ticket, &cfg.cluster, &cfg.region, &cfg.node, advertise, progress)
                        .await
                        .map_err(AppError::Join)?;
                progress(&format!(
                    "{} presented the pinned root CA and accepted the token; this instance is member {:x}",
                    joined.answered_by, joined.id
                ));
                if let Some((cert, key)) = &joined.cluster_ca
                    && cert.is_empty()
                {
                    bootstrap::save_cluster_key(&cfg.data_dir, key)?;
                    tracing::info!(cluster = %cfg.cluster, from = %joined.answered_by, "received the cluster's CA key from another instance of it");
                } else if let Some((_, key)) = &joined.cluster_ca {
                    bootstrap::save_cluster_key(&cfg.data_dir, key)?;
                    tracing::info!(cluster = %cfg.cluster, region = %cfg.region, "cluster joined the federation");
                    progress(&format!(
                        "cluster {} registered in region {}; its intermediate CA is signed by the root (its key stays in {})",
                        cfg.cluster,
                        cfg.region,
                        bootstrap::cluster_key_path(&cfg.data_dir).display()
                    ));
                }
                bootstrap::save_join_identity(
                    &cfg.data_dir,
                    &joined.chain_pem,
                    &joined.key_pem,
                    &joined.trust_bundle_pem,
                )?;
                identity.replace(trellis_proto::tls::Identity::from_pem(&joined.chain_pem, &joined.key_pem)?);
                bundle.store(TrustBundle::from_pem(
                    &joined.trust_domain,
                    std::slice::from_ref(&joined.trust_bundle_pem),
                )?);
                peers.extend(joined.members);
                joined_td = Some(joined.trust_domain);
                Start::Join { id: joined.id }
            } else {
                Start::Bootstrap
            };
            let joined = matches!(start, Start::Join { .. });
            let options = RaftOptions {
                tick: Duration::from_millis(cfg.raft_tick_ms),
                compact_every: cfg.raft_snapshot_every,
                keep_entries: (cfg.raft_snapshot_every / 10).min(1_000),
                ..RaftOptions::default()
            };
            let runtime = tokio::runtime::Handle::current();
            let (p, tls) = (peers.clone(), peer_tls.clone());
            let raft = Arc::new(RaftStore::open(&dir, start, options, move |handle| {
                Box::new(GrpcTransport::new(p, tls, handle, runtime))
            })?);
            let status = raft.status().borrow().clone();
            // A new group, or a group of one that stopped before it created the federation.
            let may_bootstrap = !joined && status.voters == [raft.id()] && raft.current().federation.is_none();
            Ok(Opened { store: raft.clone(), raft: Some(raft), peers, peer_tls, may_bootstrap, joined, joined_td })
        }
        #[cfg(feature = "etcd")]
        StoreKind::Etcd => {
            let store = Arc::new(crate::store::EtcdStore::connect(&cfg.etcd_endpoints, &cfg.etcd_prefix).await?);
            Ok(Opened { store, raft: None, peers, peer_tls, may_bootstrap: false, joined: false, joined_td: None })
        }
        // `validate` refuses this first; kept so that the message is the same whatever calls here.
        #[cfg(not(feature = "etcd"))]
        StoreKind::Etcd => {
            Err(ConfigError::Invalid { flag: "store", reason: crate::config::NO_ETCD_FEATURE.into() }.into())
        }
    }
}

/// Records this instance in the member directory (and its address when it changed), retrying
/// until the group has a leader.
async fn keep_member_record(store: Arc<dyn Store>, me: Member) {
    let mut rx = store.subscribe();
    loop {
        let current = rx.borrow_and_update().members.get(&me.id).cloned();
        if current.as_ref() != Some(&me) {
            match store.propose(Command::SetMember(me.clone())).await {
                Ok(_) => tracing::info!(address = %me.address, "member record updated"),
                Err(e) => {
                    tracing::debug!(error = %e, "member record not updated yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps the trust bundle (TLS and file) and the revision gauge in step with the store.
async fn follow_state(
    store: Arc<dyn Store>,
    bundle: SharedBundle,
    metrics: Arc<Metrics>,
    data_dir: PathBuf,
    td: String,
) {
    let mut rx = store.subscribe();
    let mut roots: Vec<String> = Vec::new();
    loop {
        let state = rx.borrow_and_update().clone();
        metrics.revision.set(state.revision as i64);
        let now: Vec<String> = state.roots.iter().map(|r| r.cert_pem.clone()).collect();
        if now != roots && !now.is_empty() {
            match TrustBundle::from_pem(&td, &now) {
                Ok(b) => {
                    bundle.store(b);
                    if let Err(e) = bootstrap::write_trust_bundle(&data_dir, &state) {
                        tracing::warn!(error = %e, "cannot write the trust bundle file");
                    }
                    roots = now;
                }
                Err(e) => tracing::error!(error = %e, "the stored trust bundle is invalid; keeping the previous one"),
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Renews this instance's serving certificate at half-life.
async fn renew_serving_identity(
    store: Arc<dyn Store>,
    signer: Arc<Signer>,
    identity: Arc<IdentityStore>,
    cfg: CpConfig,
) {
    // What the serving certificate depends on besides time: the cluster's CA certificate and
    // the roots (a root rotation changes both).
    let issuer_of = |s: &crate::state::State| {
        let inter = s.clusters.get(&cfg.cluster).map(|c| c.intermediate_cert_pem.clone()).unwrap_or_default();
        let roots: String = s.roots.iter().map(|r| r.cert_pem.as_str()).collect();
        inter + &roots
    };
    let mut states = store.subscribe();
    let mut issued_under = issuer_of(&store.current());
    loop {
        let at = identity.current().map(|i| i.renew_at()).unwrap_or_else(SystemTime::now);
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        let sleep = tokio::time::sleep(wait.max(Duration::from_secs(1)));
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                changed = states.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = issuer_of(&states.borrow_and_update());
                    if now != issued_under {
                        tracing::info!("the cluster's CA or the roots changed; renewing the serving certificate");
                        break;
                    }
                }
            }
        }
        let state = store.current();
        issued_under = issuer_of(&state);
        match bootstrap::serving_identity(&state, &signer, &cfg) {
            Ok(id) => {
                tracing::info!(not_after = ?id.not_after, "serving certificate renewed");
                identity.replace(id);
            }
            Err(e) => {
                tracing::warn!(error = %e, "serving certificate renewal failed; retrying in 10 s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}
