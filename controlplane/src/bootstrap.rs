//! First start of a federation and every start of an instance: create the root and the cluster's
//! intermediate CA once, issue this instance's serving certificate (its key never leaves the
//! process), write the trust bundle for local proxies and, at bootstrap, the admin credential.

use std::path::{Path, PathBuf};
use std::time::Duration;

use trellis_federation::ca::{Ca, INTERMEDIATE_TTL, ROOT_TTL};
use trellis_proto::SpiffeId;
use trellis_proto::tls::Identity;

use crate::certs::Signer;
use crate::config::CpConfig;
use crate::context::{ConfigFile, Context, write_private};
use crate::state::{Cluster, Command, Federation, RootCa, State};
use crate::store::{Store, StoreError};
use crate::unix_now;

/// Lifetime of the admin credential written at bootstrap.
const ADMIN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Errors of bootstrap.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("certificate authority: {0}")]
    Ca(#[from] trellis_federation::CaError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("TLS material: {0}")]
    Tls(#[from] trellis_proto::tls::TlsError),
    #[error("identity: {0}")]
    Identity(#[from] trellis_proto::IdentityError),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Context(#[from] crate::context::ContextError),
    #[error("this cluster's CA is not available: {0}")]
    ClusterCa(String),
    #[error(
        "this data directory belongs to cluster(s) {known}, not '{cluster}'; use the right --data-dir \
         or --cluster"
    )]
    WrongCluster { cluster: String, known: String },
}

/// Creates the federation if the store is empty. Returns true when it did.
pub async fn ensure_federation(store: &dyn Store, cfg: &CpConfig) -> Result<bool, BootstrapError> {
    let state = store.current();
    if state.federation.is_some() {
        if !state.clusters.contains_key(&cfg.cluster) {
            let known = state.clusters.keys().cloned().collect::<Vec<_>>().join(", ");
            return Err(BootstrapError::WrongCluster { cluster: cfg.cluster.clone(), known });
        }
        return Ok(false);
    }
    let now = unix_now();
    let root = Ca::new_root(&cfg.trust_domain, ROOT_TTL)?;
    let inter = root.issue_intermediate(&cfg.cluster, INTERMEDIATE_TTL)?;
    store
        .propose(Command::Bootstrap {
            federation: Federation { trust_domain: cfg.trust_domain.clone(), created_at: now },
            root: RootCa {
                cert_pem: root.cert_pem().to_string(),
                key_pem: root.key_pem().to_string(),
                created_at: now,
                cross_cert_pem: String::new(),
                generation: 1,
            },
            cluster: Cluster {
                name: cfg.cluster.clone(),
                region: cfg.region.clone(),
                intermediate_cert_pem: inter.cert_pem().to_string(),
                intermediate_key_pem: inter.key_pem().to_string(),
                created_at: now,
                join_token: String::new(),
                gateways: Default::default(),
                via_gateways: false,
                reach_pinned: false,
            },
        })
        .await?;
    tracing::info!(trust_domain = %cfg.trust_domain, cluster = %cfg.cluster, "federation bootstrapped");
    Ok(true)
}

fn chain_pem(leaf: &trellis_federation::SignedLeaf) -> String {
    std::iter::once(leaf.cert_pem.as_str()).chain(leaf.chain_pem.iter().map(String::as_str)).collect()
}

/// Issues this instance's serving identity from its cluster's CA.
pub fn serving_identity(state: &State, signer: &Signer, cfg: &CpConfig) -> Result<Identity, BootstrapError> {
    let td = state.trust_domain().unwrap_or(&cfg.trust_domain);
    let id = SpiffeId::control_plane(td, &cfg.cluster, &cfg.node)?;
    let ca = signer.ca(state).map_err(|s| BootstrapError::ClusterCa(s.message().to_string()))?;
    let (leaf, key) = ca.issue_leaf(&id, Duration::from_secs(cfg.cert_ttl_secs))?;
    // The roots ride along so that an instance joining with a token (which pins the root) can
    // verify this one before it has a trust bundle; verifiers with a bundle ignore them.
    let roots: String = state.roots.iter().map(|r| r.cert_pem.as_str()).collect();
    Ok(Identity::from_pem(&(chain_pem(&leaf) + &roots), &key)?)
}

/// Where a cluster that joined keeps its intermediate CA key.
pub fn cluster_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ca").join("intermediate-key.pem")
}

/// Keeps the key of this cluster's intermediate CA (private, 0600).
pub fn save_cluster_key(data_dir: &Path, key_pem: &str) -> Result<(), BootstrapError> {
    let path = cluster_key_path(data_dir);
    write_private(&path, key_pem.as_bytes()).map_err(|source| BootstrapError::Write { path, source })
}

fn join_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("join")
}

/// Keeps what joining gave (certificate, key, trust bundle) so that a member restarted before its
/// state caught up can still reach the group.
pub fn save_join_identity(data_dir: &Path, chain: &str, key: &str, bundle: &str) -> Result<(), BootstrapError> {
    let dir = join_dir(data_dir);
    for (name, body) in [("cert.pem", chain), ("key.pem", key), ("trust-bundle.pem", bundle)] {
        let path = dir.join(name);
        write_private(&path, body.as_bytes()).map_err(|source| BootstrapError::Write { path, source })?;
    }
    Ok(())
}

/// The identity saved at join, if any.
pub fn load_join_identity(data_dir: &Path) -> Result<Option<Identity>, BootstrapError> {
    let dir = join_dir(data_dir);
    let (Ok(chain), Ok(key)) =
        (std::fs::read_to_string(dir.join("cert.pem")), std::fs::read_to_string(dir.join("key.pem")))
    else {
        return Ok(None);
    };
    Ok(Some(Identity::from_pem(&chain, &key)?))
}

/// The trust bundle saved at join, if any.
pub fn load_join_bundle(data_dir: &Path) -> Result<Option<String>, BootstrapError> {
    Ok(std::fs::read_to_string(join_dir(data_dir).join("trust-bundle.pem")).ok())
}

/// Path of the trust bundle file that local proxies read at start.
pub fn trust_bundle_path(data_dir: &Path) -> PathBuf {
    data_dir.join("trust-bundle.pem")
}

/// Path of the admin context written at bootstrap.
pub fn admin_context_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin").join("context.yaml")
}

/// Writes the current trust bundle (all roots) for local proxies.
pub fn write_trust_bundle(data_dir: &Path, state: &State) -> Result<(), BootstrapError> {
    let path = trust_bundle_path(data_dir);
    let pem: String = state.roots.iter().map(|r| r.cert_pem.as_str()).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pem)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| BootstrapError::Write { path, source })
}

/// Writes the admin context at bootstrap, or refreshes its server address on later starts.
pub fn write_admin_context(
    data_dir: &Path,
    state: &State,
    signer: &Signer,
    cfg: &CpConfig,
    server: &str,
    created: bool,
) -> Result<PathBuf, BootstrapError> {
    let path = admin_context_path(data_dir);
    let name = format!("trellis-{}", cfg.cluster);
    let mut file = ConfigFile::load(&path)?;
    let ca_pem: String = state.roots.iter().map(|r| r.cert_pem.as_str()).collect();
    if created || file.contexts.is_empty() {
        if !created {
            // Lost admin context on an existing federation: do not mint a new credential
            // silently; say how to recover.
            tracing::warn!(path = %path.display(), "no admin context found; restore it from a backup");
            return Ok(path);
        }
        let td = state.trust_domain().unwrap_or(&cfg.trust_domain);
        let id = SpiffeId::admin(td, "admin")?;
        let ca = signer.ca(state).map_err(|s| BootstrapError::ClusterCa(s.message().to_string()))?;
        let (leaf, key) = ca.issue_leaf(&id, ADMIN_TTL)?;
        file = ConfigFile {
            current_context: Some(name.clone()),
            contexts: vec![Context {
                name,
                server: server.to_string(),
                trust_domain: td.to_string(),
                ca: ca_pem,
                cert: chain_pem(&leaf),
                key,
            }],
        };
    } else {
        for c in &mut file.contexts {
            c.server = server.to_string();
            c.ca = ca_pem.clone();
        }
    }
    file.save(&path)?;
    let _ = write_private(&path.with_file_name("README"), b"context.yaml holds the federation's admin credential.\nImport it with `trellis config import context.yaml`; keep it secret.\n");
    Ok(path)
}
