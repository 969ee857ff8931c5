//! `trellis cluster join`: links a new cluster to a federation with one join token and runs the
//! cluster's first control-plane instance in the foreground, showing each step as it happens.
//! Under a service manager the same join is `trellis-cp --join-token-file`; afterwards the data
//! directory holds the membership and `trellis-cp --data-dir` restarts the instance.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::app;
use crate::config::CpConfig;
use crate::membership::JoinTicket;
use crate::store::raft::{NodeStatus, RaftStore};

/// Options of `trellis cluster join`.
#[derive(Debug, Clone, clap::Args)]
pub struct JoinArgs {
    /// The join token printed by `trellis token create` on a member of the federation. A token on
    /// the command line is visible in the process list: prefer --token-file or TRELLIS_JOIN_TOKEN.
    #[arg(env = "TRELLIS_JOIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the join token from this file.
    #[arg(long, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Name of the new cluster (unique in the federation; letters, digits and dashes).
    #[arg(long)]
    pub name: String,
    /// Region of the new cluster; proxies fail over to clusters of their own region first.
    #[arg(long)]
    pub region: String,
    /// Data directory of this control-plane instance; must not hold a member already.
    #[arg(long, env = "TRELLIS_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address of the instance's mTLS gRPC listener.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Address the federation's other control planes and this cluster's proxies use to reach
    /// this instance (default: the bound address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Name of this instance within its cluster.
    #[arg(long, default_value = "cp-1")]
    pub node: String,
    /// Write the bound addresses as JSON to this file once serving.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// Used only to fill a `CpConfig` with its defaults.
#[derive(Parser)]
struct CpFlags {
    #[command(flatten)]
    config: CpConfig,
}

impl JoinArgs {
    fn token_text(&self) -> Result<String, String> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Ok(t.trim().to_string()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("--token-file: cannot read {}: {e}", path.display())),
            (None, None) => Err("no join token: pass it as an argument, with --token-file or in TRELLIS_JOIN_TOKEN \
                                 (create one with `trellis token create` on a member of the federation)"
                .into()),
        }
    }

    fn config(&self, token: String) -> Result<CpConfig, String> {
        let args = [
            "trellis-cp".to_string(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--listen".into(),
            self.listen.to_string(),
            "--cluster".into(),
            self.name.clone(),
            "--region".into(),
            self.region.clone(),
            "--node".into(),
            self.node.clone(),
        ];
        let mut cfg = CpFlags::try_parse_from(args).map_err(|e| e.to_string())?.config;
        cfg.advertise = self.advertise.clone();
        cfg.ready_file = self.ready_file.clone();
        cfg.join_token = Some(token);
        cfg.validate().map_err(|e| e.to_string().replace("--cluster", "--name"))?;
        Ok(cfg)
    }
}

/// Joins, shows progress, then serves until SIGTERM or Ctrl-C.
pub async fn run(args: JoinArgs) -> Result<(), String> {
    let began = Instant::now();
    let text = args.token_text()?;
    let ticket = JoinTicket::decode(&text)?;
    if !ticket.cluster.is_empty() {
        return Err(format!(
            "this token admits another control-plane instance of cluster '{}', not a new cluster; start that \
             instance with `trellis-cp --cluster {} --join-token-file <file>`, or create a cluster token with \
             `trellis token create`",
            ticket.cluster, ticket.cluster
        ));
    }
    if RaftStore::exists(&args.data_dir.join("raft")) {
        return Err(format!(
            "{} already holds a member of a federation: restart it with `trellis-cp --data-dir {}`, or join with an \
             empty --data-dir",
            args.data_dir.display(),
            args.data_dir.display()
        ));
    }
    let cfg = args.config(text)?;
    let step = |n: u8, msg: &str| println!("[{n}/5] {msg}");
    println!(
        "Joining cluster {} (region {}) to federation {} as control plane {}",
        args.name, args.region, ticket.trust_domain, args.node
    );
    step(
        1,
        &format!(
            "token read: root CA pin sha256:{}…, control planes at {}",
            &ticket.pin[..16.min(ticket.pin.len())],
            ticket.addresses.join(", ")
        ),
    );
    let n = std::sync::atomic::AtomicU8::new(2);
    let progress = |msg: &str| {
        let at = n.load(std::sync::atomic::Ordering::Relaxed);
        if msg.contains("retrying") {
            println!("      {msg}");
        } else {
            step(at, msg);
            n.store((at + 1).min(3), std::sync::atomic::Ordering::Relaxed);
        }
    };
    let handle = app::build_with_progress(cfg, &progress).await.map_err(|e| e.to_string())?;
    let Some(raft) = handle.raft.clone() else {
        return Err("this control plane does not run the Raft store".into());
    };
    let id = raft.id();
    let mut rx = raft.status();
    // Catching up: the leader sends a snapshot, then the log since.
    let caught_up = |s: &NodeStatus| s.leader != 0 && s.commit > 0 && s.applied >= s.commit;
    let waited =
        matches!(tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|s| caught_up(s))).await, Ok(Ok(_)));
    let s: Arc<NodeStatus> = raft.status().borrow().clone();
    match waited {
        true => step(4, &format!("caught up with the group: applied {} of {} entries", s.applied, s.commit)),
        false => step(
            4,
            &format!(
                "still catching up after 60 s (applied {} of {}); it goes on in the background, see `trellis get \
                 controlplanes`",
                s.applied, s.commit
            ),
        ),
    }
    let placed = |s: &NodeStatus| s.voters.contains(&id) || (s.learners.contains(&id) && s.voters.len() >= 5);
    let waited = matches!(tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| placed(s))).await, Ok(Ok(_)));
    let s: Arc<NodeStatus> = raft.status().borrow().clone();
    match waited {
        true if s.voters.contains(&id) => {
            step(5, &format!("placed as a voter by the leader ({} voters in the group)", s.voters.len()))
        }
        true => step(5, "placed as a learner: the group already has 5 voters; it replicates and serves reads"),
        false => step(
            5,
            "still a learner after 30 s: the leader promotes it once it is caught up (see `trellis get controlplanes`)",
        ),
    }
    println!(
        "\nCluster {} joined in {:.2} s. Its control plane serves on {}; this cluster's proxies use it with the \
         trust bundle {}.\nRestart it later with `trellis-cp --data-dir {} --listen {} --cluster {} --region {} \
         --node {}` (the token is spent; the data directory holds the membership).\nRunning; Ctrl-C stops it.",
        args.name,
        began.elapsed().as_secs_f64(),
        handle.grpc_addr,
        handle.trust_bundle.display(),
        args.data_dir.display(),
        handle.grpc_addr,
        args.name,
        args.region,
        args.node
    );
    if handle.wait_termination().await { Ok(()) } else { Err("the control plane stopped on an error".into()) }
}
