//! A proxy's scoped view against the real control plane: it holds the endpoints of the services
//! it calls and none of the others, a first call to another service brings that service's
//! endpoints, changes to services it does not call never reach it, and the view survives a
//! control-plane restart (less the subscriptions to services that do not exist). A proxy run with `--full-view` holds everything.
//!
//! The control plane and the serving proxies are the real binaries; the calling proxies run in
//! this process so the test reads their routes directly.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use tokio::sync::watch;
use trellis_proxy::app::App;
use trellis_proxy::config::Config;
use trellis_proxy::routes::{Routes, ServiceName};
use trellis_tests::harness::{ControlPlane, Proc, bin, trellis};

struct Cluster {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    cp: ControlPlane,
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config");
        let cp = ControlPlane::start(dir.path(), "a", "127.0.1.1");
        let imported = trellis(&config, &["config", "import", cp.admin_context.to_str().expect("utf-8 path")]);
        assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));
        Self { dir, config, cp }
    }

    fn token(&self, sa: &str) -> String {
        let o = trellis(&self.config, &["token", "workload", "create", "--service-account", sa, "--ttl", "1h"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn common_args(&self, sa: &str, instance: &str) -> Vec<String> {
        [
            "--control-plane",
            &self.cp.grpc,
            "--trust-bundle",
            &self.cp.trust_bundle.display().to_string(),
            "--token",
            &self.token(sa),
            "--service-account",
            sa,
            "--cluster",
            "a",
            "--instance",
            instance,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// A serving proxy (the real binary) registering one endpoint of `service.default`.
    fn serve(&self, service: &str, instance: &str) -> Proc {
        let mut args = self.common_args(service, instance);
        args.extend(
            ["--service", &format!("{service}.default"), "--app", "127.0.1.2:9", "--inbound", "127.0.1.2:0"]
                .iter()
                .map(|s| s.to_string()),
        );
        Proc::spawn(instance, &bin("trellis-proxy"), &args, &self.dir.path().join(format!("{instance}.log")), &[])
    }

    /// A calling proxy in this process.
    async fn caller(&self, instance: &str, extra: &[&str]) -> App {
        let mut args = vec!["trellis-proxy".to_string()];
        args.extend(self.common_args("client", instance));
        args.extend(extra.iter().map(|s| s.to_string()));
        let config = Config::try_parse_from(args).expect("proxy arguments");
        trellis_proxy::app::build(config).await.expect("calling proxy starts")
    }
}

fn svc(name: &str) -> ServiceName {
    ServiceName::new(name, "default").expect("service name")
}

fn services_with_endpoints(routes: &Routes) -> BTreeSet<String> {
    routes.endpoints.values().map(|e| e.service.name.clone()).collect()
}

/// Waits until `f` holds for the routes, or fails with what was seen.
async fn until(routes: &watch::Receiver<Arc<Routes>>, what: &str, f: impl Fn(&Routes) -> bool) {
    let mut rx = routes.clone();
    let waited = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|r| f(r))).await;
    assert!(
        matches!(waited, Ok(Ok(_))),
        "timed out waiting for {what}; the proxy holds endpoints of {:?}, view {:?}",
        services_with_endpoints(&routes.borrow()),
        routes.borrow().scope
    );
}

fn endpoint_ids(routes: &Routes, service: &str) -> BTreeSet<String> {
    routes.endpoints.values().filter(|e| e.service.name == service).map(|e| e.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_view_holds_what_the_proxy_calls_and_grows_on_a_first_call() {
    let mut cluster = Cluster::start();
    let _web = cluster.serve("web", "web-1");
    let _db = cluster.serve("db", "db-1");
    let _cache = cluster.serve("cache", "cache-1");

    let caller = cluster.caller("caller-1", &["--upstream", "web.default=127.0.0.1:0"]).await;
    let full = cluster.caller("caller-full", &["--full-view"]).await;
    let routes = caller.routes();
    until(&full.routes(), "every endpoint in the full view", |r| {
        services_with_endpoints(r) == BTreeSet::from(["cache".into(), "db".into(), "web".into()])
    })
    .await;
    assert_eq!(full.routes().borrow().scope, None);
    until(&routes, "web's endpoint in the scoped view", |r| !r.endpoints_of(&svc("web")).is_empty()).await;
    {
        let r = routes.borrow();
        assert_eq!(services_with_endpoints(&r), BTreeSet::from(["web".to_string()]), "only what the proxy calls");
        assert_eq!(r.scope, Some(BTreeSet::from([svc("web")])));
        // Every service is known by name (and virtual address) all the same.
        for s in ["web", "db", "cache"] {
            assert!(r.service(&svc(s)).is_some(), "{s} unknown to the scoped proxy");
        }
        assert!(!r.in_view(&svc("db")));
    }

    // A first call to db: its endpoints arrive before the call goes on.
    assert!(caller.subscriptions().ensure(&svc("db"), Duration::from_secs(10)).await, "db never came into view");
    assert_eq!(endpoint_ids(&routes.borrow(), "db"), BTreeSet::from(["a/default/db/db-1".to_string()]));
    // A service with no endpoint at all is confirmed too: the call fails at once, not after a wait.
    assert!(caller.subscriptions().ensure(&svc("nothing"), Duration::from_secs(10)).await);
    assert!(routes.borrow().endpoints_of(&svc("nothing")).is_empty());

    // The control plane shows each proxy's view.
    let listed = trellis(&cluster.config, &["get", "proxies", "-o", "json"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let proxies: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).expect("proxies as JSON");
    let view_of = |instance: &str| {
        proxies.iter().find(|p| p["instance"] == instance).map(|p| p["view"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(view_of("caller-1").as_deref(), Some("3 services"), "{proxies:?}");
    assert_eq!(view_of("caller-full").as_deref(), Some("full"), "{proxies:?}");
    assert_eq!(view_of("web-1").as_deref(), Some("0 services"), "{proxies:?}");

    // Changes: a new cache endpoint (not called) and then a new db endpoint (called). Deltas
    // arrive in order, so once db-2 is there, cache-2 would have been too.
    let _cache2 = cluster.serve("cache", "cache-2");
    until(&full.routes(), "cache-2 in the full view", |r| endpoint_ids(r, "cache").len() == 2).await;
    let _db2 = cluster.serve("db", "db-2");
    until(&routes, "db-2 in the scoped view", |r| endpoint_ids(r, "db").len() == 2).await;
    assert!(endpoint_ids(&routes.borrow(), "cache").is_empty(), "a change to a service not called reached the proxy");

    // The control plane restarts: the proxy reconnects with its subscriptions and keeps up.
    cluster.cp.restart();
    let _db3 = cluster.serve("db", "db-3");
    until(&routes, "db-3 after the control-plane restart", |r| endpoint_ids(r, "db").len() == 3).await;
    {
        let r = routes.borrow();
        assert_eq!(services_with_endpoints(&r), BTreeSet::from(["db".to_string(), "web".to_string()]));
        // The subscription to a service that does not exist ended with the stream.
        assert_eq!(r.scope, Some(BTreeSet::from([svc("db"), svc("web")])));
    }
}
