//! `trellis`: the command-line interface to a Trellis mesh.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::json;
use trellis_controlplane::cli::client::{self, CliError};
use trellis_controlplane::cli::demo::{self, DemoArgs};
use trellis_controlplane::cli::join::{self, JoinArgs};
use trellis_controlplane::cli::output::{Format, Listing, human_duration};
use trellis_controlplane::context::{ConfigFile, Context, default_path};
use trellis_controlplane::telemetry::{self, LogFormat};
use trellis_controlplane::unix_now;
use trellis_proto::pb;

/// `println!` for this command-line tool: output piped into a command that stops reading (`|
/// head`) ends the program quietly, as Unix tools do, instead of a panic.
macro_rules! println {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            stdout_failed(e);
        }
    }};
}

/// `print!`, likewise.
macro_rules! print {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($t)*) {
            stdout_failed(e);
        }
    }};
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to standard output: {e}");
    std::process::exit(1);
}

#[derive(Parser)]
#[command(name = "trellis", version, about = "Operate a Trellis multi-cluster service mesh", propagate_version = true)]
struct Cli {
    /// CLI configuration file (default: $TRELLIS_CONFIG or ~/.trellis/config).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Context to use instead of the current one.
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List resources: services, endpoints, proxies, workload-tokens, controlplanes.
    Get {
        #[arg(value_enum)]
        resource: Resource,
        /// Only this namespace (services) or this service `name.namespace` (endpoints).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show the control plane's status.
    Status {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Create or update a service.
    #[command(name = "create-service")]
    CreateService {
        /// `name.namespace` (namespace defaults to `default`).
        name: String,
        #[arg(long, default_value = "http")]
        protocol: String,
        /// Ports as `name:port` or `port`, repeatable.
        #[arg(long = "port")]
        ports: Vec<String>,
        /// Make the service reachable from other clusters.
        #[arg(long)]
        exported: bool,
    },
    /// Delete a service and its endpoints.
    #[command(name = "delete-service")]
    DeleteService { name: String },
    /// The control-plane group: join tokens, removal, leadership.
    #[command(name = "controlplane", alias = "cp")]
    ControlPlane {
        #[command(subcommand)]
        command: ControlPlaneCmd,
    },
    /// The federation's certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCmd,
    },
    /// Clusters of the federation.
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Join tokens for new clusters, and workload tokens (universal mode: how a workload proves
    /// its identity for a certificate).
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// Manage contexts (which control plane and credential the CLI uses).
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Start a whole mesh on this machine and show traffic through it.
    Demo(DemoArgs),
    /// The demo's sample application (used by `trellis demo`).
    #[command(name = "demo-app", hide = true)]
    DemoApp {
        #[arg(long)]
        name: String,
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Write the bound address as JSON here once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Transparent mode for a workload's network namespace (Linux, as root there): redirect TCP
    /// connections to service virtual addresses to the proxy's --transparent listener.
    #[command(name = "transparent-init")]
    TransparentInit {
        /// Port of the proxy's --transparent listener on 127.0.0.1.
        #[arg(long, default_value_t = 15001)]
        capture_port: u16,
        /// Undo it.
        #[arg(long)]
        remove: bool,
        /// Print the commands without running them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Resource {
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "endpoint", alias = "ep")]
    Endpoints,
    #[value(alias = "proxy")]
    Proxies,
    #[value(name = "workload-tokens", alias = "workload-token")]
    WorkloadTokens,
    #[value(name = "controlplanes", alias = "controlplane", alias = "cp")]
    ControlPlanes,
}

#[derive(Subcommand)]
enum ControlPlaneCmd {
    /// Create a token with which one more control-plane instance joins the group
    /// (`trellis-cp --join-token-file FILE`); prints it once.
    #[command(name = "token")]
    Token {
        #[command(subcommand)]
        command: ControlPlaneTokenCmd,
    },
    /// Remove a member (`node` or `cluster/node`) from the group.
    Remove { name: String },
    /// Hand leadership to a voter (`node` or `cluster/node`; any caught-up voter if omitted).
    #[command(name = "transfer-leader")]
    TransferLeader { to: Option<String> },
}

#[derive(Subcommand)]
enum ControlPlaneTokenCmd {
    /// Create a join token.
    Create {
        /// The new instance's cluster (default: the answering instance's).
        #[arg(long)]
        cluster: Option<String>,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many instances may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        #[arg(long, default_value = "")]
        description: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token with which a new cluster joins the federation (`trellis cluster join` on the
    /// new cluster); prints it once.
    Create {
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many clusters may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List join tokens (never their secrets).
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Revoke a join token by id.
    Revoke { id: String },
    /// Workload tokens.
    Workload {
        #[command(subcommand)]
        command: WorkloadTokenCmd,
    },
    /// Tokens with which an east-west gateway gets its first certificate
    /// (`trellis-gateway --token-file`); a token is for the cluster of the control plane that
    /// creates it (use `--context` to choose).
    Gateway {
        #[command(subcommand)]
        command: GatewayTokenCmd,
    },
}

#[derive(Subcommand)]
enum GatewayTokenCmd {
    /// Create a gateway token; prints it once. List and revoke with `trellis token workload`.
    Create {
        /// Lifetime, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        ttl: String,
        #[arg(long, default_value = "")]
        description: String,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Rotate the root CA: a new root, cross-signed by the current one, is trusted next to it;
    /// every cluster's intermediate CA is issued again under it (same keys); workloads and
    /// control planes renew their certificates and reload them without restarting. With
    /// --finish, stop trusting the old root once every certificate issued under it has expired.
    Rotate {
        #[arg(long)]
        finish: bool,
        /// With --finish: do not wait for certificates issued under the old root to expire.
        #[arg(long, requires = "finish")]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// List the clusters of the federation, with the liveness of their control planes.
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Link a new cluster with a join token from `trellis token create`, and run its first
    /// control-plane instance in the foreground.
    Join(JoinArgs),
    /// One cluster in detail: region, CA, control planes, services and endpoints.
    Describe {
        name: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// How other clusters reach this cluster's endpoints: `gateways` (only through its east-west
    /// gateways; none up means unreachable from outside) or `direct` (one flat network: dialled
    /// directly even if it has gateways). Without it, a cluster is reached through gateways once
    /// its first gateway registers.
    Reach {
        name: String,
        #[arg(value_parser = ["direct", "gateways"])]
        how: String,
    },
    /// Remove a cluster: its control planes leave the group, its endpoints leave the registry.
    /// Ask a control plane of another cluster.
    Remove { name: String },
}

#[derive(Subcommand)]
enum WorkloadTokenCmd {
    /// Create a token for one namespace and service account; prints it once.
    Create {
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// Lifetime, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        ttl: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Import a context file (e.g. `<data-dir>/admin/context.yaml`) and make it current.
    Import {
        file: PathBuf,
        /// Name to give the context.
        #[arg(long)]
        name: Option<String>,
    },
    /// Make a context current.
    UseContext { name: String },
    /// List contexts.
    GetContexts,
    /// Print the current context's name.
    CurrentContext,
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86_400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .map(|n| n * mult)
        .ok_or_else(|| format!("--ttl '{s}' is not a duration; use e.g. 90s, 30m, 24h or 7d"))
}

fn load_context(cli: &Cli) -> Result<(PathBuf, Context), String> {
    let path = cli.config.clone().unwrap_or_else(default_path);
    let cfg = ConfigFile::load(&path).map_err(|e| e.to_string())?;
    let ctx = match &cli.context {
        Some(name) => cfg.get(name),
        None => cfg.current(),
    }
    .map_err(|e| e.to_string())?
    .clone();
    Ok((path, ctx))
}

/// `trellis cluster describe`: the cluster's row, its control planes and its endpoints.
async fn describe_cluster(ctx: &Context, name: &str, output: Format) -> Result<(), String> {
    let status = |s: tonic::Status| client::from_status(&ctx.server, s).to_string();
    let mut admin = client::admin(ctx).map_err(|e| e.to_string())?;
    let clusters = admin.list_clusters(pb::ListClustersRequest {}).await.map_err(status)?.into_inner().clusters;
    let Some(c) = clusters.into_iter().find(|c| c.name == name) else {
        return Err(format!("no cluster named '{name}'; see `trellis cluster list`"));
    };
    let group = admin.list_control_planes(pb::ListControlPlanesRequest {}).await.map_err(status)?.into_inner();
    let members: Vec<pb::ControlPlaneStatus> = group.members.into_iter().filter(|m| m.cluster == name).collect();
    let endpoints: Vec<pb::Endpoint> = admin
        .list_endpoints(pb::ListEndpointsRequest::default())
        .await
        .map_err(status)?
        .into_inner()
        .endpoints
        .into_iter()
        .filter(|e| e.cluster == name)
        .collect();
    let services = admin.list_services(pb::ListServicesRequest::default()).await.map_err(status)?.into_inner().services;
    let mut served: Vec<(String, bool, usize, usize)> = Vec::new();
    for svc in &services {
        let key = format!("{}.{}", svc.name, svc.namespace);
        let eps: Vec<&pb::Endpoint> = endpoints.iter().filter(|e| e.service == key).collect();
        if !eps.is_empty() {
            served.push((key, svc.exported, eps.iter().filter(|e| e.healthy).count(), eps.len()));
        }
    }
    let value = json!({
        "name": c.name, "region": c.region, "status": c.status, "created_at": c.created_at,
        "ca_expires_at": c.ca_expires_at, "gateways": c.gateways, "via_gateways": c.via_gateways,
        "control_planes": members.iter().map(|m| json!({
            "name": m.name, "id": format!("{:x}", m.id), "address": m.address, "membership": m.membership,
            "leader": m.leader, "role": m.role, "applied": m.applied, "error": m.error,
        })).collect::<Vec<_>>(),
        "services": served.iter().map(|(k, exported, healthy, total)| json!({
            "service": k, "exported": exported, "endpoints_healthy": healthy, "endpoints": total,
        })).collect::<Vec<_>>(),
    });
    if output != Format::Table {
        print!("{}", Listing { columns: vec![], rows: vec![], value }.render(output));
        return Ok(());
    }
    println!("Cluster {} (region {}): {}", c.name, c.region, if c.status.is_empty() { "-" } else { &c.status });
    println!("  joined          {} ago", human_duration(unix_now().saturating_sub(c.created_at)));
    println!("  intermediate CA expires in {}", human_duration(c.ca_expires_at.saturating_sub(unix_now())));
    let reach = match (c.via_gateways, c.gateways.is_empty()) {
        (false, true) => "directly (no gateway has registered)".to_string(),
        (false, false) => format!(
            "directly (`trellis cluster reach {} direct`); its gateways {} are not used",
            c.name,
            c.gateways.join(", ")
        ),
        (true, true) => "through its gateways, and none is up: other clusters cannot reach it".to_string(),
        (true, false) => format!("through its gateways {}", c.gateways.join(", ")),
    };
    println!("  reached from other clusters {reach}");
    println!("\nControl planes ({} of {} answering, {} voter(s)):", c.members_up, c.members, c.voters);
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                format!("{:x}", m.id),
                m.address.clone(),
                if m.leader { format!("{} (leader)", m.membership) } else { m.membership.clone() },
                if m.error.is_empty() { format!("up, applied {}", m.applied) } else { format!("DOWN: {}", m.error) },
            ]
        })
        .collect();
    print!("{}", trellis_controlplane::cli::output::table(&["NAME", "ID", "ADDRESS", "MEMBERSHIP", "STATE"], &rows));
    println!("\nServices with endpoints here ({} endpoint(s)):", c.endpoints);
    let rows: Vec<Vec<String>> = served
        .iter()
        .map(|(k, exported, healthy, total)| {
            vec![
                k.clone(),
                if *exported { "exported" } else { "cluster-local" }.to_string(),
                format!("{healthy}/{total}"),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("  none");
    } else {
        print!("{}", trellis_controlplane::cli::output::table(&["SERVICE", "SCOPE", "HEALTHY"], &rows));
    }
    Ok(())
}

fn split_service(name: &str) -> (String, String) {
    match name.split_once('.') {
        Some((n, ns)) => (n.to_string(), ns.to_string()),
        None => (name.to_string(), "default".to_string()),
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let status = |server: &str| {
        let server = server.to_string();
        move |s: tonic::Status| client::from_status(&server, s).to_string()
    };
    match &cli.command {
        Cmd::Demo(args) if args.scenario == demo::Scenario::Failover => {
            let report = trellis_controlplane::cli::failover::run(args).await?;
            match args.output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default()),
                Format::Yaml => print!("{}", serde_saphyr::to_string(&report).unwrap_or_default()),
                Format::Table => {
                    let ms = |m: Option<f64>| m.map(|m| format!("{m:.0} ms")).unwrap_or_else(|| "not seen".into());
                    println!(
                        "\nFailover demo finished: {} requests, {} failed, served by {:?}; a's backends: failover {:.0} \
                         ms, failback {}; b's gateway: failover {}, failback {}",
                        report.requests,
                        report.failed,
                        report.served_by,
                        report.failover_ms,
                        ms(report.failback_ms),
                        ms(report.gateway_failover_ms),
                        ms(report.gateway_failback_ms),
                    )
                }
            }
            if report.failed > 0 {
                return Err(format!("{} requests failed", report.failed));
            }
            Ok(())
        }
        Cmd::Demo(args) => {
            let report = demo::run(args.clone()).await?;
            match args.output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default()),
                Format::Yaml => print!("{}", serde_saphyr::to_string(&report).unwrap_or_default()),
                Format::Table => println!(
                    "\nDemo finished: {} cluster(s), {} requests, {} failed, mTLS on every request: {}{}, p50 {:.2} ms, p99 {:.2} ms",
                    report.clusters,
                    report.requests,
                    report.failed,
                    report.mtls,
                    if report.cross_cluster { ", every route served across clusters" } else { "" },
                    report.p50_ms,
                    report.p99_ms
                ),
            }
            if report.failed > 0 {
                return Err(format!("{} requests failed", report.failed));
            }
            Ok(())
        }
        Cmd::DemoApp { name, cluster, listen, ready_file } => {
            trellis_controlplane::cli::demo_app::run(name.clone(), cluster.clone(), *listen, ready_file.clone())
                .await
                .map_err(|e| e.to_string())
        }
        Cmd::TransparentInit { capture_port, remove, dry_run } => {
            trellis_controlplane::cli::transparent::apply(*capture_port, *remove, *dry_run)
        }
        Cmd::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "trellis", &mut script);
            print!("{}", String::from_utf8_lossy(&script));
            Ok(())
        }
        Cmd::Config { command } => {
            let path = cli.config.clone().unwrap_or_else(default_path);
            let mut cfg = ConfigFile::load(&path).map_err(|e| e.to_string())?;
            match command {
                ConfigCmd::Import { file, name } => {
                    let src = ConfigFile::load(file).map_err(|e| e.to_string())?;
                    let mut ctx = src.current().map_err(|e| format!("{}: {e}", file.display()))?.clone();
                    if let Some(n) = name {
                        ctx.name = n.clone();
                    }
                    cfg.current_context = Some(ctx.name.clone());
                    println!("Context '{}' imported and made current ({}).", ctx.name, ctx.server);
                    cfg.upsert(ctx);
                    cfg.save(&path).map_err(|e| e.to_string())
                }
                ConfigCmd::UseContext { name } => {
                    cfg.get(name).map_err(|e| e.to_string())?;
                    cfg.current_context = Some(name.clone());
                    cfg.save(&path).map_err(|e| e.to_string())?;
                    println!("Switched to context '{name}'.");
                    Ok(())
                }
                ConfigCmd::GetContexts => {
                    let rows: Vec<Vec<String>> = cfg
                        .contexts
                        .iter()
                        .map(|c| {
                            let cur = if cfg.current_context.as_deref() == Some(&c.name) { "*" } else { "" };
                            vec![cur.to_string(), c.name.clone(), c.server.clone(), c.trust_domain.clone()]
                        })
                        .collect();
                    print!(
                        "{}",
                        trellis_controlplane::cli::output::table(&["CURRENT", "NAME", "SERVER", "TRUST DOMAIN"], &rows)
                    );
                    Ok(())
                }
                ConfigCmd::CurrentContext => {
                    println!("{}", cfg.current().map_err(|e| e.to_string())?.name);
                    Ok(())
                }
            }
        }
        Cmd::Get { resource, namespace, output } => {
            let (_, ctx) = load_context(&cli)?;
            let mut admin = client::admin(&ctx).map_err(|e: CliError| e.to_string())?;
            let listing = match resource {
                Resource::Services => {
                    let r = admin
                        .list_services(pb::ListServicesRequest { namespace: namespace.clone().unwrap_or_default() })
                        .await
                        .map_err(status(&ctx.server))?
                        .into_inner();
                    Listing {
                        columns: vec!["NAME", "NAMESPACE", "PROTOCOL", "PORTS", "EXPORTED", "VIP", "REVISION"],
                        rows: r
                            .services
                            .iter()
                            .map(|s| {
                                vec![
                                    s.name.clone(),
                                    s.namespace.clone(),
                                    s.protocol.clone(),
                                    s.ports.iter().map(|p| p.port.to_string()).collect::<Vec<_>>().join(","),
                                    s.exported.to_string(),
                                    if s.vip.is_empty() { "-".into() } else { s.vip.clone() },
                                    s.revision.to_string(),
                                ]
                            })
                            .collect(),
                        value: json!(r.services.iter().map(|s| json!({
                            "name": s.name, "namespace": s.namespace, "protocol": s.protocol,
                            "ports": s.ports.iter().map(|p| json!({"name": p.name, "port": p.port})).collect::<Vec<_>>(),
                            "exported": s.exported, "vip": s.vip, "revision": s.revision,
                        })).collect::<Vec<_>>()),
                    }
                }
                Resource::Endpoints => {
                    let r = admin
                        .list_endpoints(pb::ListEndpointsRequest { service: namespace.clone().unwrap_or_default() })
                        .await
                        .map_err(status(&ctx.server))?
                        .into_inner();
                    Listing {
                        columns: vec!["SERVICE", "CLUSTER", "ZONE", "ADDRESS", "HEALTHY", "IDENTITY"],
                        rows: r
                            .endpoints
                            .iter()
                            .map(|e| {
                                vec![
                                    e.service.clone(),
                                    e.cluster.clone(),
                                    e.zone.clone(),
                                    e.address.clone(),
                                    e.healthy.to_string(),
                                    e.identity.clone(),
                                ]
                            })
                            .collect(),
                        value: json!(
                            r.endpoints
                                .iter()
                                .map(|e| json!({
                                    "id": e.id, "service": e.service, "cluster": e.cluster, "zone": e.zone,
                                    "address": e.address, "healthy": e.healthy, "identity": e.identity,
                                    "weight": e.weight, "revision": e.revision,
                                }))
                                .collect::<Vec<_>>()
                        ),
                    }
                }
                Resource::Proxies => {
                    let r =
                        admin.list_proxies(pb::ListProxiesRequest {}).await.map_err(status(&ctx.server))?.into_inner();
                    Listing {
                        columns: vec![
                            "IDENTITY",
                            "INSTANCE",
                            "CONNECTED",
                            "VIEW",
                            "SENT",
                            "ACKED",
                            "STATE",
                            "LAST NACK",
                        ],
                        rows: r
                            .proxies
                            .iter()
                            .map(|p| {
                                let state = if !p.connected {
                                    "disconnected"
                                } else if p.acked_version >= p.sent_version {
                                    "in sync"
                                } else {
                                    "stale"
                                };
                                vec![
                                    p.identity.clone(),
                                    p.instance.clone(),
                                    p.connected.to_string(),
                                    p.view.clone(),
                                    p.sent_version.to_string(),
                                    p.acked_version.to_string(),
                                    state.to_string(),
                                    p.last_nack.clone(),
                                ]
                            })
                            .collect(),
                        value: json!(
                            r.proxies
                                .iter()
                                .map(|p| json!({
                                    "identity": p.identity, "cluster": p.cluster, "instance": p.instance,
                                    "connected": p.connected, "sent_version": p.sent_version,
                                    "acked_version": p.acked_version, "last_nack": p.last_nack,
                                    "peer_address": p.peer_address, "view": p.view,
                                }))
                                .collect::<Vec<_>>()
                        ),
                    }
                }
                Resource::WorkloadTokens => token_listing(&mut admin, &ctx.server).await?,
                Resource::ControlPlanes => {
                    let r = admin
                        .list_control_planes(pb::ListControlPlanesRequest {})
                        .await
                        .map_err(status(&ctx.server))?
                        .into_inner();
                    Listing {
                        columns: vec![
                            "NAME", "CLUSTER", "ID", "ADDRESS", "MEMBER", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG",
                            "STATE",
                        ],
                        rows: r
                            .members
                            .iter()
                            .map(|m| {
                                let role = if m.error.is_empty() { m.role.clone() } else { "unreachable".into() };
                                vec![
                                    m.name.clone(),
                                    m.cluster.clone(),
                                    format!("{:x}", m.id),
                                    m.address.clone(),
                                    m.membership.clone(),
                                    role,
                                    m.term.to_string(),
                                    m.commit.to_string(),
                                    m.applied.to_string(),
                                    m.lag.to_string(),
                                    if m.error.is_empty() {
                                        m.state_hash.chars().take(12).collect()
                                    } else {
                                        m.error.clone()
                                    },
                                ]
                            })
                            .collect(),
                        value: json!({
                            "leader": format!("{:x}", r.leader),
                            "term": r.term,
                            "members": r.members.iter().map(|m| json!({
                                "id": format!("{:x}", m.id), "name": m.name, "cluster": m.cluster,
                                "address": m.address, "membership": m.membership, "leader": m.leader,
                                "role": m.role, "term": m.term, "commit": m.commit, "applied": m.applied,
                                "lag": m.lag, "state_hash": m.state_hash, "error": m.error,
                            })).collect::<Vec<_>>(),
                        }),
                    }
                }
            };
            print!("{}", listing.render(*output));
            Ok(())
        }
        Cmd::Status { output } => {
            let (_, ctx) = load_context(&cli)?;
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            let s = admin.status(pb::StatusRequest {}).await.map_err(status(&ctx.server))?.into_inner();
            let value = json!({
                "server": ctx.server, "trust_domain": s.trust_domain, "cluster": s.cluster, "node": s.node,
                "revision": s.revision, "services": s.services, "endpoints": s.endpoints,
                "proxies_connected": s.proxies_connected, "version": s.version, "ca_expires_in_s": s.ca_expires_in,
                "raft_role": s.raft_role, "raft_term": s.raft_term, "raft_leader": format!("{:x}", s.raft_leader),
                "warnings": s.warnings,
            });
            match output {
                Format::Table => {
                    println!(
                        "Control plane {} ({}), cluster {}, trust domain {}",
                        s.node, ctx.server, s.cluster, s.trust_domain
                    );
                    println!("  store revision      {}", s.revision);
                    println!("  services/endpoints  {}/{}", s.services, s.endpoints);
                    println!("  proxies connected   {}", s.proxies_connected);
                    println!("  cluster CA expires  in {}", human_duration(s.ca_expires_in));
                    println!("  version             {}", s.version);
                    if !s.raft_role.is_empty() {
                        let leader =
                            if s.raft_leader == 0 { "none known".to_string() } else { format!("{:x}", s.raft_leader) };
                        println!("  raft                {} in term {}, leader {leader}", s.raft_role, s.raft_term);
                    }
                    for w in &s.warnings {
                        println!("\nWARNING: {w}");
                    }
                }
                other => print!("{}", Listing { columns: vec![], rows: vec![], value }.render(*other)),
            }
            Ok(())
        }
        Cmd::CreateService { name, protocol, ports, exported } => {
            let (_, ctx) = load_context(&cli)?;
            let (n, ns) = split_service(name);
            let ports = ports
                .iter()
                .map(|p| {
                    let (pname, port) = p.split_once(':').map_or(("", p.as_str()), |(a, b)| (a, b));
                    port.parse::<u32>()
                        .map(|port| pb::ServicePort { name: pname.to_string(), port })
                        .map_err(|_| format!("--port '{p}' must be PORT or NAME:PORT"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            let s = admin
                .apply_service(pb::Service {
                    name: n,
                    namespace: ns,
                    ports,
                    protocol: protocol.clone(),
                    exported: *exported,
                    revision: 0,
                    vip: String::new(),
                })
                .await
                .map_err(status(&ctx.server))?
                .into_inner();
            println!("service/{}.{} applied (revision {})", s.name, s.namespace, s.revision);
            Ok(())
        }
        Cmd::DeleteService { name } => {
            let (_, ctx) = load_context(&cli)?;
            let (n, ns) = split_service(name);
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            admin
                .delete_service(pb::DeleteServiceRequest { name: n.clone(), namespace: ns.clone() })
                .await
                .map_err(status(&ctx.server))?;
            println!("service/{n}.{ns} deleted");
            Ok(())
        }
        Cmd::ControlPlane { command } => {
            let (_, ctx) = load_context(&cli)?;
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            match command {
                ControlPlaneCmd::Token {
                    command: ControlPlaneTokenCmd::Create { cluster, ttl, uses, description },
                } => {
                    let ttl_seconds = parse_ttl(ttl)?;
                    let r = admin
                        .create_join_token(pb::CreateJoinTokenRequest {
                            cluster: cluster.clone().unwrap_or_default(),
                            ttl_seconds,
                            description: description.clone(),
                            new_cluster: false,
                            uses: *uses,
                        })
                        .await
                        .map_err(status(&ctx.server))?
                        .into_inner();
                    eprintln!(
                        "Join token {} for {uses} more control-plane instance(s), valid {}. It is shown only now; start the \
                         new instance with `trellis-cp --join-token-file FILE` (or TRELLIS_JOIN_TOKEN):",
                        r.id,
                        human_duration(ttl_seconds)
                    );
                    println!("{}", r.token);
                    Ok(())
                }
                ControlPlaneCmd::Remove { name } => {
                    admin
                        .remove_control_plane(pb::RemoveControlPlaneRequest { name: name.clone() })
                        .await
                        .map_err(status(&ctx.server))?;
                    println!("controlplane/{name} removed from the group");
                    Ok(())
                }
                ControlPlaneCmd::TransferLeader { to } => {
                    let r = admin
                        .transfer_leadership(pb::TransferLeadershipRequest { to: to.clone().unwrap_or_default() })
                        .await
                        .map_err(status(&ctx.server))?
                        .into_inner();
                    println!("leader is now {:x}", r.leader);
                    Ok(())
                }
            }
        }
        Cmd::Cluster { command: ClusterCmd::List { output } } => {
            let (_, ctx) = load_context(&cli)?;
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            let r = admin.list_clusters(pb::ListClustersRequest {}).await.map_err(status(&ctx.server))?.into_inner();
            let listing =
                Listing {
                    columns: vec![
                        "NAME",
                        "REGION",
                        "STATUS",
                        "CONTROL PLANES",
                        "VOTERS",
                        "ENDPOINTS",
                        "EXPORTED",
                        "CA EXPIRES",
                    ],
                    rows: r
                        .clusters
                        .iter()
                        .map(|c| {
                            vec![
                                c.name.clone(),
                                c.region.clone(),
                                c.status.clone(),
                                format!("{}/{} up", c.members_up, c.members),
                                c.voters.to_string(),
                                c.endpoints.to_string(),
                                c.services_exported.to_string(),
                                human_duration(c.ca_expires_at.saturating_sub(unix_now())),
                            ]
                        })
                        .collect(),
                    value: json!(r.clusters.iter().map(|c| json!({
                    "name": c.name, "region": c.region, "created_at": c.created_at, "control_planes": c.members,
                    "voters": c.voters, "endpoints": c.endpoints, "services_exported": c.services_exported,
                    "ca_expires_at": c.ca_expires_at, "status": c.status, "control_planes_up": c.members_up,
                })).collect::<Vec<_>>()),
                };
            print!("{}", listing.render(*output));
            Ok(())
        }
        Cmd::Cluster { command: ClusterCmd::Join(args) } => join::run(args.clone()).await,
        Cmd::Ca { command: CaCmd::Rotate { finish, force } } => {
            let (_, ctx) = load_context(&cli)?;
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            let r = admin
                .rotate_root(pb::RotateRootRequest { finish: *finish, force: *force })
                .await
                .map_err(status(&ctx.server))?
                .into_inner();
            let pins: Vec<String> = r.root_pins.iter().map(|p| format!("sha256:{}", &p[..16.min(p.len())])).collect();
            if *finish {
                println!("Root rotation finished: only {} is trusted now.", pins.join(", "));
            } else {
                println!(
                    "Root rotated: new root {} signs from now on; {} stays trusted during the overlap.\n\
                     {} cluster intermediate CA(s) re-issued under the new root (same keys). Workloads and control \
                     planes renew their certificates now and reload them without restarting.\n\
                     Join tokens created from now on pin the new root. Run `trellis ca rotate --finish` once every \
                     certificate issued under the old root has expired (30 days at most).",
                    pins.first().cloned().unwrap_or_default(),
                    pins[1..].join(", "),
                    r.intermediates_reissued
                );
            }
            Ok(())
        }
        Cmd::Cluster { command: ClusterCmd::Describe { name, output } } => {
            let (_, ctx) = load_context(&cli)?;
            describe_cluster(&ctx, name, *output).await
        }
        Cmd::Cluster { command: ClusterCmd::Reach { name, how } } => {
            let (_, ctx) = load_context(&cli)?;
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            let via_gateways = how == "gateways";
            let r = admin
                .set_cluster_reach(pb::SetClusterReachRequest { name: name.clone(), via_gateways })
                .await
                .map_err(status(&ctx.server))?
                .into_inner();
            match (via_gateways, r.gateways.is_empty()) {
                (true, true) => println!(
                    "cluster {name} is reached only through its gateways; none is registered now, so other clusters \
                     cannot reach it until one starts"
                ),
                (true, false) => println!("cluster {name} is reached through its gateways {}", r.gateways.join(", ")),
                (false, true) => println!("cluster {name} is reached directly"),
                (false, false) => println!(
                    "cluster {name} is reached directly; its gateways ({}) are no longer used by other clusters",
                    r.gateways.join(", ")
                ),
            }
            Ok(())
        }
        Cmd::Cluster { command: ClusterCmd::Remove { name } } => {
            let (_, ctx) = load_context(&cli)?;
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            let r = admin
                .remove_cluster(pb::RemoveClusterRequest { name: name.clone() })
                .await
                .map_err(status(&ctx.server))?
                .into_inner();
            println!(
                "cluster {name} removed: {} control plane(s) left the group ({}), {} endpoint(s) left the registry",
                r.removed_control_planes.len(),
                if r.removed_control_planes.is_empty() {
                    "none".to_string()
                } else {
                    r.removed_control_planes.join(", ")
                },
                r.removed_endpoints
            );
            Ok(())
        }
        Cmd::Token { command: TokenCmd::Create { ttl, uses, description } } => {
            let (_, ctx) = load_context(&cli)?;
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            let ttl_seconds = parse_ttl(ttl)?;
            let r = admin
                .create_join_token(pb::CreateJoinTokenRequest {
                    cluster: String::new(),
                    ttl_seconds,
                    description: description.clone(),
                    new_cluster: true,
                    uses: *uses,
                })
                .await
                .map_err(status(&ctx.server))?
                .into_inner();
            eprintln!(
                "Join token {} for {uses} new cluster(s), valid {}. It is shown only now; on the new cluster run \
                 `trellis cluster join --token-file FILE --name NAME --region REGION --data-dir DIR` (or \
                 `trellis-cp --join-token-file FILE --cluster NAME --region REGION` under a service manager):",
                r.id,
                human_duration(ttl_seconds)
            );
            println!("{}", r.token);
            Ok(())
        }
        Cmd::Token { command: TokenCmd::List { output } } => {
            let (_, ctx) = load_context(&cli)?;
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            let r =
                admin.list_join_tokens(pb::ListJoinTokensRequest {}).await.map_err(status(&ctx.server))?.into_inner();
            let now = unix_now();
            let listing = Listing {
                columns: vec!["ID", "KIND", "USES LEFT", "EXPIRES", "STATE", "DESCRIPTION"],
                rows: r
                    .tokens
                    .iter()
                    .map(|t| {
                        let state = if t.revoked {
                            "revoked"
                        } else if t.expires_at <= now {
                            "expired"
                        } else if t.uses_left == 0 {
                            "used"
                        } else {
                            "valid"
                        };
                        vec![
                            t.id.clone(),
                            t.kind.clone(),
                            t.uses_left.to_string(),
                            human_duration(t.expires_at.saturating_sub(now)),
                            state.into(),
                            t.description.clone(),
                        ]
                    })
                    .collect(),
                value: json!(
                    r.tokens
                        .iter()
                        .map(|t| json!({
                            "id": t.id, "kind": t.kind, "uses_left": t.uses_left, "expires_at": t.expires_at,
                            "created_at": t.created_at, "revoked": t.revoked, "description": t.description,
                        }))
                        .collect::<Vec<_>>()
                ),
            };
            print!("{}", listing.render(*output));
            Ok(())
        }
        Cmd::Token { command: TokenCmd::Revoke { id } } => {
            let (_, ctx) = load_context(&cli)?;
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            admin
                .revoke_join_token(pb::RevokeJoinTokenRequest { id: id.clone() })
                .await
                .map_err(status(&ctx.server))?;
            println!("join token {id} revoked");
            Ok(())
        }
        Cmd::Token { command: TokenCmd::Gateway { command: GatewayTokenCmd::Create { ttl, description } } } => {
            let (_, ctx) = load_context(&cli)?;
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            let ttl_seconds = parse_ttl(ttl)?;
            let r = admin
                .create_workload_token(pb::CreateWorkloadTokenRequest {
                    namespace: String::new(),
                    service_account: String::new(),
                    ttl_seconds,
                    description: description.clone(),
                    gateway: true,
                })
                .await
                .map_err(status(&ctx.server))?
                .into_inner();
            eprintln!(
                "Gateway token, valid {}: a gateway started with it (`trellis-gateway --token-file FILE`) gets the \
                 gateway identity of this control plane's cluster. It is shown only now:",
                human_duration(ttl_seconds)
            );
            println!("{}", r.token);
            Ok(())
        }
        Cmd::Token { command: TokenCmd::Workload { command } } => {
            let (_, ctx) = load_context(&cli)?;
            let mut admin = client::admin(&ctx).map_err(|e| e.to_string())?;
            match command {
                WorkloadTokenCmd::Create { namespace, service_account, ttl, description } => {
                    let ttl_seconds = parse_ttl(ttl)?;
                    let r = admin
                        .create_workload_token(pb::CreateWorkloadTokenRequest {
                            namespace: namespace.clone(),
                            service_account: service_account.clone(),
                            ttl_seconds,
                            description: description.clone(),
                            gateway: false,
                        })
                        .await
                        .map_err(status(&ctx.server))?
                        .into_inner();
                    eprintln!(
                        "Workload token for namespace {namespace}, service account {service_account}, valid {}. It is shown only now:",
                        human_duration(ttl_seconds)
                    );
                    println!("{}", r.token);
                    Ok(())
                }
                WorkloadTokenCmd::List { output } => {
                    print!("{}", token_listing(&mut admin, &ctx.server).await?.render(*output));
                    Ok(())
                }
                WorkloadTokenCmd::Revoke { id } => {
                    admin
                        .revoke_workload_token(pb::RevokeWorkloadTokenRequest { id: id.clone() })
                        .await
                        .map_err(status(&ctx.server))?;
                    println!("workload token {id} revoked");
                    Ok(())
                }
            }
        }
    }
}

async fn token_listing(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
    server: &str,
) -> Result<Listing, String> {
    let r = admin
        .list_workload_tokens(pb::ListWorkloadTokensRequest {})
        .await
        .map_err(|s| client::from_status(server, s).to_string())?
        .into_inner();
    let now = unix_now();
    Ok(Listing {
        columns: vec!["ID", "NAMESPACE", "SERVICE ACCOUNT", "EXPIRES", "STATE", "DESCRIPTION"],
        rows: r
            .tokens
            .iter()
            .map(|t| {
                let state = if t.revoked {
                    "revoked"
                } else if t.expires_at <= now {
                    "expired"
                } else {
                    "valid"
                };
                let expires =
                    if t.expires_at > now { format!("in {}", human_duration(t.expires_at - now)) } else { "-".into() };
                vec![
                    t.id.clone(),
                    t.namespace.clone(),
                    t.service_account.clone(),
                    expires,
                    state.into(),
                    t.description.clone(),
                ]
            })
            .collect(),
        value: json!(r.tokens.iter().map(|t| json!({
            "id": t.id, "namespace": t.namespace, "service_account": t.service_account,
            "expires_at": t.expires_at, "created_at": t.created_at, "revoked": t.revoked, "description": t.description,
        })).collect::<Vec<_>>()),
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = if matches!(cli.command, Cmd::DemoApp { .. }) { "info" } else { "warn" };
    telemetry::init(LogFormat::Text, filter);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
