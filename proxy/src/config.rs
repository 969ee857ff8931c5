//! The proxy's one configuration: flags and `TRELLIS_*` environment variables, validated at start
//! with messages that say what to change, serialisable (the token is skipped) and logged once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use trellis_proto::SpiffeId;

use crate::routes::{AppProtocol, ServiceName, validate_host_port};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(
        "no workload token: pass --token, --token-file or set TRELLIS_WORKLOAD_TOKEN; create one with \
         `trellis token workload create --namespace {namespace} --service-account {service_account}`"
    )]
    MissingToken { namespace: String, service_account: String },
    #[error("cannot read the workload token file {path}: {reason}")]
    TokenFile { path: PathBuf, reason: String },
    #[error(
        "cannot use the trust bundle {path}: {reason} (it is the PEM file of root certificates the \
         control plane wrote at bootstrap)"
    )]
    TrustBundle { path: PathBuf, reason: String },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A local listener for one upstream service: `--upstream NAME.NS=ADDR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upstream {
    /// The service the listener forwards to.
    pub service: ServiceName,
    /// Where the application connects (usually `127.0.0.1:PORT`).
    pub listen: SocketAddr,
}

impl FromStr for Upstream {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (svc, addr) =
            s.split_once('=').ok_or_else(|| format!("'{s}' must look like NAME.NAMESPACE=127.0.0.1:PORT"))?;
        let service = svc.parse::<ServiceName>().map_err(|e| e.to_string())?;
        let listen =
            addr.parse::<SocketAddr>().map_err(|_| format!("'{addr}' is not an IP:PORT address to listen on"))?;
        Ok(Self { service, listen })
    }
}

/// Configuration of one proxy process.
#[derive(Debug, Clone, clap::Parser, Serialize)]
#[command(name = "trellis-proxy", version, about = "Trellis per-workload proxy (universal mode)")]
pub struct Config {
    /// Control-plane address, HOST:PORT.
    #[arg(long, env = "TRELLIS_CONTROL_PLANE")]
    pub control_plane: String,

    /// PEM file with the federation's root certificates (written by the control plane at bootstrap).
    #[arg(long, env = "TRELLIS_TRUST_BUNDLE")]
    pub trust_bundle: PathBuf,

    /// Trust domain of the federation.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = trellis_proto::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Workload token (from `trellis token workload create`).
    #[arg(long, env = "TRELLIS_WORKLOAD_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub token: Option<String>,

    /// File holding the workload token.
    #[arg(long, env = "TRELLIS_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Namespace of the workload.
    #[arg(long, env = "TRELLIS_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Service account of the workload.
    #[arg(long, env = "TRELLIS_SERVICE_ACCOUNT")]
    pub service_account: String,

    /// Cluster this workload runs in.
    #[arg(long, env = "TRELLIS_CLUSTER", default_value = "local")]
    pub cluster: String,

    /// Zone this workload runs in.
    #[arg(long, env = "TRELLIS_ZONE", default_value = "zone-a")]
    pub zone: String,

    /// Instance name, unique in the cluster (default: HOSTNAME-PID).
    #[arg(long, env = "TRELLIS_INSTANCE")]
    pub instance: Option<String>,

    /// The service this workload serves, NAME.NAMESPACE.
    #[arg(long, env = "TRELLIS_SERVICE")]
    pub service: Option<ServiceName>,

    /// Application protocol of the served service.
    #[arg(long, env = "TRELLIS_PROTOCOL", value_enum, default_value_t = AppProtocol::Http)]
    pub protocol: AppProtocol,

    /// Inbound mTLS listener.
    #[arg(long, env = "TRELLIS_INBOUND", default_value = "127.0.0.1:0")]
    pub inbound: SocketAddr,

    /// Address other proxies dial, HOST:PORT (default: the bound inbound address).
    #[arg(long, env = "TRELLIS_ADVERTISE")]
    pub advertise: Option<String>,

    /// The local application, HOST:PORT (required with --service).
    #[arg(long, env = "TRELLIS_APP")]
    pub app: Option<String>,

    /// A local listener for an upstream service, NAME.NAMESPACE=IP:PORT (repeatable).
    #[arg(long = "upstream", env = "TRELLIS_UPSTREAMS", value_delimiter = ',')]
    pub upstreams: Vec<Upstream>,

    /// Transparent mode: the listener that connections redirected by iptables arrive on
    /// (`trellis transparent-init` installs the rule for the service addresses). Each is served
    /// as a call to the service whose virtual address the application dialled. Loopback only.
    #[arg(long, env = "TRELLIS_TRANSPARENT")]
    pub transparent: Option<SocketAddr>,

    /// Receive every endpoint the proxy may see instead of those of the services it calls (the
    /// default view holds the `--upstream` services and each service the application calls
    /// through its virtual address, subscribed to on its first call).
    #[arg(long, env = "TRELLIS_FULL_VIEW")]
    pub full_view: bool,

    /// Admin listener (metrics, readiness); loopback only, it is unauthenticated.
    #[arg(long, env = "TRELLIS_ADMIN", default_value = "127.0.0.1:0")]
    pub admin: SocketAddr,

    /// Requested certificate lifetime in seconds (the control plane may cap it).
    #[arg(long, env = "TRELLIS_CERT_TTL", default_value_t = 86_400)]
    pub cert_ttl: u32,

    /// Timeout of one outbound request until its response headers, in milliseconds.
    #[arg(long, env = "TRELLIS_REQUEST_TIMEOUT", default_value_t = 15_000)]
    pub request_timeout: u64,

    /// Timeout of one attempt (0: only the request timeout); a timed-out attempt may be retried.
    #[arg(long, env = "TRELLIS_PER_TRY_TIMEOUT", default_value_t = 0)]
    pub per_try_timeout: u64,

    /// Timeout to connect (TCP + TLS) to a peer proxy, in milliseconds.
    #[arg(long, env = "TRELLIS_CONNECT_TIMEOUT", default_value_t = 1_000)]
    pub connect_timeout: u64,

    /// How long in-flight work may finish after SIGTERM, in seconds.
    #[arg(long, env = "TRELLIS_DRAIN_TIMEOUT", default_value_t = 5)]
    pub drain_timeout: u64,

    /// How long to keep trying to get a first certificate from an unreachable control plane, in seconds.
    #[arg(long, env = "TRELLIS_STARTUP_TIMEOUT", default_value_t = 30)]
    pub startup_timeout: u64,

    /// Log format.
    #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Worker threads (0: one per core). One, the default, runs everything on one thread: a
    /// sidecar's load is one workload's, and a single thread saves the cross-thread wake-ups that
    /// cost latency on a busy node.
    #[arg(long, env = "TRELLIS_THREADS", default_value_t = 1)]
    pub threads: usize,

    /// When ready, write {"inbound","admin","upstreams","identity"} as JSON to this file (atomically).
    #[arg(long, env = "TRELLIS_READY_FILE")]
    pub ready_file: Option<PathBuf>,
}

impl Config {
    /// Checks every field and fills defaults that depend on the host (the instance name).
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        let invalid = ConfigError::Invalid;
        validate_host_port(&self.control_plane)
            .map_err(|_| invalid(format!("--control-plane '{}' must be HOST:PORT", self.control_plane)))?;
        if let Err(e) = SpiffeId::workload(&self.trust_domain, &self.namespace, &self.service_account) {
            return Err(invalid(format!(
                "--trust-domain/--namespace/--service-account do not make a workload identity: {e}"
            )));
        }
        for (flag, v) in [("--cluster", &self.cluster), ("--zone", &self.zone)] {
            if trellis_proto::identity::validate_name(v).is_err() {
                return Err(invalid(format!("{flag} '{v}' must use lowercase letters, digits and '-' (at most 63)")));
            }
        }
        match self.instance.as_deref() {
            Some("") | None => self.instance = Some(default_instance()),
            Some(i) if i.contains('/') || i.len() > 253 => {
                return Err(invalid(format!("--instance '{i}' must not contain '/' (at most 253 bytes)")));
            }
            Some(_) => {}
        }
        if self.service.is_some() && self.app.is_none() {
            return Err(invalid("--service needs --app HOST:PORT, the local application to forward to".into()));
        }
        if let Some(app) = &self.app {
            validate_host_port(app).map_err(|_| invalid(format!("--app '{app}' must be HOST:PORT")))?;
        }
        if let Some(adv) = &self.advertise {
            validate_host_port(adv).map_err(|_| invalid(format!("--advertise '{adv}' must be HOST:PORT")))?;
        }
        if !self.admin.ip().is_loopback() {
            return Err(invalid(format!(
                "--admin {} is not a loopback address; the admin port is unauthenticated, so it only \
                 listens on 127.0.0.1 or ::1",
                self.admin
            )));
        }
        // Plaintext listeners that send into the mesh with this workload's identity: only the
        // workload itself may reach them.
        if let Some(t) = self.transparent
            && !t.is_ipv4()
        {
            return Err(invalid(format!(
                "--transparent {t}: the original destination of a redirected connection is read for IPv4 only; \
                 use 127.0.0.1:PORT"
            )));
        }
        for (flag, addr) in self
            .upstreams
            .iter()
            .map(|u| ("--upstream", u.listen))
            .chain(self.transparent.map(|t| ("--transparent", t)))
        {
            if !addr.ip().is_loopback() {
                return Err(invalid(format!(
                    "{flag} {addr} is not a loopback address; it takes plaintext from the application and \
                     calls the mesh with this workload's identity, so it only listens on 127.0.0.1 or ::1"
                )));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for u in &self.upstreams {
            if !seen.insert(&u.service) {
                return Err(invalid(format!("--upstream {} is given twice", u.service)));
            }
        }
        if self.request_timeout == 0 || self.connect_timeout == 0 {
            return Err(invalid("--request-timeout and --connect-timeout must be at least 1 ms".into()));
        }
        if self.cert_ttl < 2 {
            return Err(invalid("--cert-ttl must be at least 2 seconds".into()));
        }
        if self.token.is_some() && self.token_file.is_some() {
            return Err(invalid(
                "give the workload token once: --token (or TRELLIS_WORKLOAD_TOKEN) or --token-file".into(),
            ));
        }
        Ok(self)
    }

    /// The workload identity this proxy asks a certificate for.
    pub fn spiffe_id(&self) -> Result<SpiffeId, ConfigError> {
        SpiffeId::workload(&self.trust_domain, &self.namespace, &self.service_account)
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// The instance name (after [`Config::validate`]).
    pub fn instance_name(&self) -> String {
        self.instance.clone().unwrap_or_else(default_instance)
    }

    /// Reads the workload token from the flag, the environment or the token file.
    pub fn load_token(&self) -> Result<String, ConfigError> {
        let missing = || ConfigError::MissingToken {
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
        };
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.trim().to_string(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| ConfigError::TokenFile { path: path.clone(), reason: e.to_string() })?
                .trim()
                .to_string(),
            (None, None) => return Err(missing()),
        };
        if token.is_empty() {
            return Err(missing());
        }
        Ok(token)
    }

    /// Reads the initial trust bundle.
    pub fn load_trust_bundle(&self) -> Result<trellis_proto::TrustBundle, ConfigError> {
        let err = |reason: String| ConfigError::TrustBundle { path: self.trust_bundle.clone(), reason };
        let pem = std::fs::read_to_string(&self.trust_bundle).map_err(|e| err(e.to_string()))?;
        trellis_proto::TrustBundle::from_pem(&self.trust_domain, &[pem]).map_err(|e| err(e.to_string()))
    }

    /// Request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout)
    }

    /// Per-attempt timeout, if any.
    pub fn per_try_timeout(&self) -> Option<Duration> {
        (self.per_try_timeout > 0).then(|| Duration::from_millis(self.per_try_timeout))
    }

    /// Connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout)
    }

    /// Drain timeout.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout)
    }

    /// Startup timeout for the first certificate.
    pub fn startup_timeout(&self) -> Duration {
        Duration::from_secs(self.startup_timeout)
    }
}

/// `HOSTNAME-PID`: unique per process on a host, readable in `trellis get proxies`.
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_string());
    let host: String = host.chars().map(|c| if c == '/' { '-' } else { c }).collect();
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let mut args = vec![
            "trellis-proxy",
            "--control-plane",
            "127.0.0.1:7000",
            "--trust-bundle",
            "/nonexistent",
            "--service-account",
            "web",
        ];
        args.extend_from_slice(extra);
        Config::try_parse_from(args).map_err(|e| e.to_string())?.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn validation_table() {
        let cases: &[(&[&str], Option<&str>)] = &[
            (&[], None),
            (&["--service", "web.default", "--app", "127.0.0.1:8080"], None),
            (&["--service", "web.default"], Some("--service needs --app")),
            (&["--admin", "0.0.0.0:9000"], Some("not a loopback address")),
            (&["--upstream", "web.default=127.0.0.1:0", "--upstream", "web.default=127.0.0.1:0"], Some("twice")),
            (&["--upstream", "web=127.0.0.1:0"], Some("not a service name")),
            (&["--namespace", "Bad"], Some("workload identity")),
            (&["--token", "a", "--token-file", "/x"], Some("give the workload token once")),
            (&["--protocol", "smtp"], Some("invalid value")),
            (&["--request-timeout", "0"], Some("at least 1 ms")),
            (&["--upstream", "web.default=0.0.0.0:15001"], Some("not a loopback address")),
            (&["--transparent", "127.0.0.1:15001"], None),
            (&["--transparent", "10.0.0.1:15001"], Some("not a loopback address")),
            (&["--transparent", "[::1]:15001"], Some("IPv4 only")),
        ];
        for (args, want_err) in cases {
            match (parse(args), want_err) {
                (Ok(c), None) => assert!(c.instance.is_some()),
                (Err(e), Some(w)) => assert!(e.contains(w), "{args:?}: {e}"),
                (r, w) => panic!("{args:?}: got {r:?}, wanted error {w:?}"),
            }
        }
    }

    #[test]
    fn token_sources_and_serialisation_skips_the_token() {
        let c = parse(&["--token", " secret-value \n"]).unwrap();
        assert_eq!(c.load_token().unwrap(), "secret-value");
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("secret-value"), "{json}");
        let missing = parse(&[]).unwrap().load_token().unwrap_err().to_string();
        assert!(missing.contains("trellis token workload create --namespace default --service-account web"));
    }
}
