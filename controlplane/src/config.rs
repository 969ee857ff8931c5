//! Configuration of `trellis-cp`: flags and environment, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// Configuration of one control-plane instance.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct CpConfig {
    /// Directory of the store, the trust bundle file and, at bootstrap, the admin credential.
    #[arg(long, env = "TRELLIS_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address of the mTLS gRPC listener (discovery, certificates, admin).
    #[arg(long, env = "TRELLIS_LISTEN", default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Address that proxies and the CLI use to reach this instance (default: the bound address).
    #[arg(long, env = "TRELLIS_ADVERTISE")]
    pub advertise: Option<String>,
    /// Address of the unauthenticated metrics and health listener; must be loopback.
    #[arg(long, env = "TRELLIS_METRICS", default_value = "127.0.0.1:0")]
    pub metrics: SocketAddr,
    /// Trust domain of a new federation (ignored once bootstrapped).
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = trellis_proto::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Name of this instance's cluster.
    #[arg(long, env = "TRELLIS_CLUSTER", default_value = "local")]
    pub cluster: String,
    /// Region of this instance's cluster.
    #[arg(long, env = "TRELLIS_REGION", default_value = "local")]
    pub region: String,
    /// Name of this instance, unique within its cluster.
    #[arg(long, env = "TRELLIS_NODE", default_value = "cp-1")]
    pub node: String,
    /// Write the bound addresses as JSON to this file once serving.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Seconds after start before endpoints whose proxy has not reconnected are marked unhealthy.
    #[arg(long, default_value_t = 15)]
    pub endpoint_grace_secs: u64,
    /// Lifetime of the instance's own serving certificate, in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub cert_ttl_secs: u64,
    /// Where the state's log lives: `raft` (the control-plane group, its log in redb under
    /// --data-dir) or `etcd` (an external etcd; needs a build with `--features etcd`).
    #[arg(long, env = "TRELLIS_STORE", value_enum, default_value_t = StoreKind::Raft)]
    pub store: StoreKind,
    /// Join an existing control-plane group with this token (from `trellis controlplane token
    /// create`). Only needed on the first start: afterwards the data directory holds the membership.
    #[arg(long, env = "TRELLIS_JOIN_TOKEN", hide_env_values = true, conflicts_with = "join_token_file")]
    #[serde(skip)]
    pub join_token: Option<String>,
    /// Read the join token from this file.
    #[arg(long)]
    pub join_token_file: Option<PathBuf>,
    /// Raft tick in milliseconds; the election timeout is 10 to 20 ticks.
    #[arg(long, default_value_t = 100)]
    pub raft_tick_ms: u64,
    /// Applied entries between snapshots of the state (the log before a snapshot is dropped,
    /// except a tail of 1,000 entries for followers slightly behind).
    #[arg(long, default_value_t = 10_000)]
    pub raft_snapshot_every: u64,
    /// etcd endpoints for `--store etcd`, comma separated; plain http only on loopback for now.
    #[arg(long, env = "TRELLIS_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this federation's data in etcd (`--store etcd`).
    #[arg(long, env = "TRELLIS_ETCD_PREFIX", default_value = "/trellis/")]
    pub etcd_prefix: String,
}

/// Backend of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The Raft group of control-plane instances (a group of one for a single instance).
    #[value(alias = "local")]
    Raft,
    /// A log in etcd, shared by every instance on the same prefix.
    Etcd,
}

/// Why `--store etcd` cannot run in a build without the backend.
pub const NO_ETCD_FEATURE: &str =
    "this trellis-cp was built without the etcd feature; rebuild with `cargo build --features etcd`";

/// Why a configuration cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--metrics {0} is not a loopback address: the metrics listener is unauthenticated; use 127.0.0.1:PORT")]
    MetricsNotLoopback(SocketAddr),
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
}

impl CpConfig {
    /// Checks the configuration; every message names the flag and what to do.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.metrics.ip().is_loopback() {
            return Err(ConfigError::MetricsNotLoopback(self.metrics));
        }
        let name = |flag: &'static str, v: &str| {
            trellis_proto::identity::validate_name(v).map_err(|e| ConfigError::Invalid { flag, reason: e.to_string() })
        };
        name("cluster", &self.cluster)?;
        name("node", &self.node)?;
        trellis_proto::SpiffeId::new(&self.trust_domain, "x")
            .map_err(|e| ConfigError::Invalid { flag: "trust-domain", reason: e.to_string() })?;
        if let Some(a) = &self.advertise
            && a.parse::<SocketAddr>().is_err()
            && a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none()
        {
            return Err(ConfigError::Invalid { flag: "advertise", reason: format!("'{a}' is not host:port") });
        }
        if self.cert_ttl_secs < 120 {
            return Err(ConfigError::Invalid { flag: "cert-ttl-secs", reason: "must be at least 120".into() });
        }
        if self.store == StoreKind::Etcd {
            self.validate_etcd()?;
            if self.join_token.is_some() || self.join_token_file.is_some() {
                return Err(ConfigError::Invalid {
                    flag: "join-token",
                    reason: "instances on the etcd store share etcd and need no join token".into(),
                });
            }
        }
        if self.raft_snapshot_every < 100 {
            return Err(ConfigError::Invalid { flag: "raft-snapshot-every", reason: "must be at least 100".into() });
        }
        if !(10..=5_000).contains(&self.raft_tick_ms) {
            return Err(ConfigError::Invalid { flag: "raft-tick-ms", reason: "must be between 10 and 5000".into() });
        }
        Ok(())
    }

    #[cfg(feature = "etcd")]
    fn validate_etcd(&self) -> Result<(), ConfigError> {
        crate::store::EtcdStore::check_endpoints(&self.etcd_endpoints)
            .map_err(|reason| ConfigError::Invalid { flag: "etcd-endpoints", reason })?;
        if self.etcd_prefix.is_empty() {
            return Err(ConfigError::Invalid {
                flag: "etcd-prefix",
                reason: "must not be empty, e.g. /trellis/".into(),
            });
        }
        Ok(())
    }

    #[cfg(not(feature = "etcd"))]
    fn validate_etcd(&self) -> Result<(), ConfigError> {
        Err(ConfigError::Invalid { flag: "store", reason: NO_ETCD_FEATURE.into() })
    }

    /// The join token, from the flag, the environment or the file.
    pub fn join_token(&self) -> Result<Option<String>, ConfigError> {
        if let Some(t) = &self.join_token {
            return Ok(Some(t.trim().to_string()));
        }
        match &self.join_token_file {
            Some(path) => std::fs::read_to_string(path).map(|t| Some(t.trim().to_string())).map_err(|e| {
                ConfigError::Invalid { flag: "join-token-file", reason: format!("cannot read {}: {e}", path.display()) }
            }),
            None => Ok(None),
        }
    }

    /// Grace period for proxies to reconnect after a restart.
    pub fn endpoint_grace(&self) -> Duration {
        Duration::from_secs(self.endpoint_grace_secs)
    }
}
