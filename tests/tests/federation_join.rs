//! Linking clusters with join tokens, with real processes: cluster A bootstraps, B and C join with
//! one token each (their intermediate CAs signed from CSRs, their keys kept at home), every
//! instance ends a voter of one group with the same state, and an admin credential of A is
//! trusted by B's control plane and trusts it back (one root). Bad tokens are refused with a
//! message that names the reason, and leave the federation unchanged.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::harness::{ControlPlane, Proc, bin, http_get, trellis, wait_for, wait_ready};

fn json(config: &Path, args: &[&str]) -> Value {
    let out = trellis(config, args);
    assert!(out.status.success(), "trellis {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("trellis {args:?}: not JSON: {e}"))
}

fn create_token(config: &Path, dir: &Path, name: &str) -> std::path::PathBuf {
    let out = trellis(config, &["token", "create", "--ttl", "10m"]);
    assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
    let path = dir.join(name);
    std::fs::write(&path, &out.stdout).expect("write token");
    path
}

/// Starts the first instance of a new cluster with a token; returns it once serving.
fn join(dir: &Path, cluster: &str, region: &str, ip: &str, token: &Path) -> Proc {
    let ready = dir.join(format!("{cluster}.ready"));
    let args: Vec<String> = [
        "--data-dir",
        &dir.join(cluster).display().to_string(),
        "--cluster",
        cluster,
        "--region",
        region,
        "--node",
        "cp-1",
        "--listen",
        &format!("{ip}:0"),
        "--join-token-file",
        &token.display().to_string(),
        "--ready-file",
        &ready.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = Proc::spawn(cluster, &bin("trellis-cp"), &args, &dir.join(format!("{cluster}.log")), &[]);
    wait_ready(&mut p, &ready, Duration::from_secs(60));
    p
}

/// Joins a new cluster the way an operator does, with `trellis cluster join`, which runs its first
/// control plane in the foreground; returns it once the join has shown every step.
fn join_with_cli(dir: &Path, cluster: &str, region: &str, ip: &str, token: &Path) -> Proc {
    let ready = dir.join(format!("{cluster}.ready"));
    let args: Vec<String> = [
        "cluster",
        "join",
        "--token-file",
        &token.display().to_string(),
        "--name",
        cluster,
        "--region",
        region,
        "--data-dir",
        &dir.join(cluster).display().to_string(),
        "--listen",
        &format!("{ip}:0"),
        "--ready-file",
        &ready.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.join(format!("{cluster}.log"));
    let mut p = Proc::spawn(cluster, &bin("trellis"), &args, &log, &[]);
    wait_ready(&mut p, &ready, Duration::from_secs(60));
    let text = wait_for("the join's last step", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("Running; Ctrl-C stops it.").then_some(text)
    });
    for step in ["[1/5] token read", "[2/5]", "[3/5] cluster", "[4/5] caught up", "[5/5] placed as a voter"] {
        if !text.contains(step) {
            let leader_log = std::fs::read_to_string(dir.join("a-cp.log")).unwrap_or_default();
            let id = text
                .split("this instance is member ")
                .nth(1)
                .and_then(|r| u64::from_str_radix(r.split_whitespace().next().unwrap_or(""), 16).ok())
                .map(|n| n.to_string())
                .unwrap_or_else(|| "none".into());
            let placement: Vec<&str> = leader_log
                .lines()
                .filter(|l| l.contains("placement") || l.contains("promot") || l.contains(&id))
                .collect();
            let members = trellis(&dir.join("cli.yaml"), &["get", "controlplanes"]);
            panic!(
                "`trellis cluster join` did not show '{step}':\n{text}\n{}\nleader's placement log:\n{}",
                String::from_utf8_lossy(&members.stdout),
                placement[placement.len().saturating_sub(30)..].join("\n")
            );
        }
    }
    p
}

fn warnings(config: &Path) -> Vec<String> {
    json(config, &["status", "-o", "json"])["warnings"]
        .as_array()
        .map(|w| w.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Starts another control-plane instance `node` of cluster `cluster` with a control-plane token;
/// returns it with its ready file once serving.
fn another_instance(dir: &Path, config: &Path, cluster: &str, node: &str, ip: &str) -> (Proc, Value) {
    let out = trellis(config, &["controlplane", "token", "create", "--cluster", cluster, "--ttl", "10m"]);
    assert!(out.status.success(), "controlplane token create: {}", String::from_utf8_lossy(&out.stderr));
    let token = dir.join(format!("token-{cluster}-{node}"));
    std::fs::write(&token, &out.stdout).expect("write token");
    let ready = dir.join(format!("{cluster}-{node}.ready"));
    let args: Vec<String> = [
        "--data-dir",
        &dir.join(format!("{cluster}-{node}")).display().to_string(),
        "--cluster",
        cluster,
        "--node",
        node,
        "--listen",
        &format!("{ip}:0"),
        "--join-token-file",
        &token.display().to_string(),
        "--ready-file",
        &ready.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.join(format!("{cluster}-{node}.log"));
    let mut p = Proc::spawn(node, &bin("trellis-cp"), &args, &log, &[]);
    let v = wait_ready(&mut p, &ready, Duration::from_secs(60));
    (p, v)
}

/// A join that must fail: returns its last line of output.
fn refused_join(dir: &Path, cluster: &str, token: &Path) -> String {
    let data = dir.join(format!("refused-{cluster}"));
    let out = std::process::Command::new(bin("trellis-cp"))
        .args(["--data-dir", &data.display().to_string(), "--cluster", cluster, "--node", "cp-1"])
        .args(["--listen", "127.0.9.1:0", "--join-token-file", &token.display().to_string()])
        .output()
        .expect("run trellis-cp");
    assert!(!out.status.success(), "a join with a bad token succeeded");
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    text.lines().last().unwrap_or_default().to_string()
}

fn clusters(config: &Path) -> Vec<(String, u64)> {
    let v = json(config, &["cluster", "list", "-o", "json"]);
    let mut out: Vec<(String, u64)> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    (c["name"].as_str().unwrap_or_default().to_string(), c["control_planes"].as_u64().unwrap_or(0))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn clusters_join_with_tokens_and_bad_tokens_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let config = dir.join("cli.yaml");
    let a = ControlPlane::start(dir, "a", "127.0.1.1");
    let out = trellis(&config, &["config", "import", &a.admin_context.display().to_string()]);
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));

    let tb = create_token(&config, dir, "token-b");
    let tc = create_token(&config, dir, "token-c");
    let _b = join(dir, "b", "eu", "127.0.2.1", &tb);
    // Two failure domains: losing either stops writes, and status says so with what to do.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let w = loop {
        let w = warnings(&config);
        if !w.is_empty() {
            break w;
        }
        if std::time::Instant::now() > deadline {
            let members = trellis(&config, &["get", "controlplanes"]);
            let log = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
            panic!(
                "no two-cluster warning within 60 s:\n{}\n--- a ---\n{}\n--- b ---\n{}",
                String::from_utf8_lossy(&members.stdout),
                log("a-cp.log").lines().filter(|l| !l.contains("DEBUG")).collect::<Vec<_>>().join("\n"),
                log("b.log").lines().filter(|l| !l.contains("DEBUG")).collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(w[0].contains("only two clusters") && w[0].contains("witness"), "{w:?}");
    let mut c = join_with_cli(dir, "c", "ap", "127.0.3.1", &tc);

    // One group of three voters, one per cluster, on the same state.
    wait_for("three voters with one state", Duration::from_secs(60), || {
        let out = trellis(&config, &["get", "controlplanes", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let members = v["members"].as_array()?;
        let voters = members.iter().filter(|m| m["membership"] == "voter" && m["error"] == "").count();
        let hashes: std::collections::BTreeSet<&str> =
            members.iter().filter_map(|m| m["state_hash"].as_str()).collect();
        (voters == 3 && hashes.len() == 1).then_some(())
    });
    let three = vec![("a".to_string(), 1), ("b".to_string(), 1), ("c".to_string(), 1)];
    assert_eq!(clusters(&config), three);
    assert_eq!(warnings(&config), Vec::<String>::new(), "three clusters with one voter each");
    let listed = json(&config, &["cluster", "list", "-o", "json"]);
    assert!(listed.as_array().is_some_and(|c| c.iter().all(|c| c["status"] == "up")), "{listed}");
    let tokens = json(&config, &["token", "list", "-o", "json"]);
    assert!(
        tokens.as_array().is_some_and(|t| t.iter().all(|t| t["uses_left"] == 0)),
        "both tokens are used up: {tokens}"
    );
    let listing = String::from_utf8_lossy(&trellis(&config, &["token", "list"]).stdout).to_string();
    for secret_part in [&tb, &tc].map(|p| std::fs::read_to_string(p).unwrap_or_default()) {
        assert!(!listing.contains(secret_part.trim()), "token list shows a secret");
    }

    // One root: A's admin credential is accepted by B's control plane, whose certificate (signed
    // by B's own intermediate) A's trust bundle accepts.
    let b_addr = serde_json::from_str::<Value>(&std::fs::read_to_string(dir.join("b.ready")).unwrap_or_default())
        .ok()
        .and_then(|v| v["grpc"].as_str().map(str::to_string))
        .expect("b's address");
    let mut ctx = std::fs::read_to_string(&config).expect("config");
    ctx = ctx.replace(&a.grpc, &b_addr);
    let config_b = dir.join("cli-b.yaml");
    std::fs::write(&config_b, ctx).expect("write");
    let status = json(&config_b, &["status", "-o", "json"]);
    assert_eq!(status["cluster"], "b", "{status}");

    // Refusals, each with its reason; the federation is unchanged after each.
    let reused = refused_join(dir, "d", &tb);
    assert!(reused.contains("already used"), "reused token: {reused}");
    let td = create_token(&config, dir, "token-d");
    let id = json(&config, &["token", "list", "-o", "json"])
        .as_array()
        .and_then(|t| t.iter().find(|t| t["uses_left"] == 1).and_then(|t| t["id"].as_str().map(str::to_string)))
        .expect("the new token");
    assert!(trellis(&config, &["token", "revoke", &id]).status.success());
    let revoked = refused_join(dir, "d", &td);
    assert!(revoked.contains("was revoked"), "revoked token: {revoked}");

    let out = trellis(&config, &["token", "create", "--ttl", "5s"]);
    assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("short"), &out.stdout).expect("write");
    std::thread::sleep(Duration::from_secs(6));
    let expired = refused_join(dir, "d", &dir.join("short"));
    assert!(expired.contains(" expired "), "expired token: {expired}");

    let te = create_token(&config, dir, "token-e");
    let text = std::fs::read_to_string(&te).expect("token");
    let (prefix, body) = text.trim().split_once('.').expect("token shape");
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut ticket: Value = serde_json::from_slice(&b64.decode(body).expect("base64")).expect("json");
    let encode = |t: &Value| format!("{prefix}.{}", b64.encode(t.to_string()));
    let mut tampered = ticket.clone();
    let secret = tampered["token"].as_str().unwrap_or_default().to_string();
    // A character inside the secret (every bit of it counts, unlike the last base64 character,
    // whose low bits are padding: changing those makes the token malformed, not wrong).
    let at = secret.len() - 5;
    let flipped = if &secret[at..at + 1] == "A" { 'B' } else { 'A' };
    tampered["token"] = Value::from(format!("{}{flipped}{}", &secret[..at], &secret[at + 1..]));
    std::fs::write(dir.join("tampered"), encode(&tampered)).expect("write");
    let msg = refused_join(dir, "e", &dir.join("tampered"));
    assert!(msg.contains("wrong secret"), "tampered token: {msg}");
    ticket["pin"] = Value::from("0".repeat(64));
    std::fs::write(dir.join("wrong-pin"), encode(&ticket)).expect("write");
    let msg = refused_join(dir, "e", &dir.join("wrong-pin"));
    assert!(msg.contains("does not present the root CA pinned"), "wrong pin: {msg}");
    let msg = refused_join(dir, "b", &te);
    assert!(msg.contains("already in the federation"), "taken name: {msg}");
    std::fs::write(dir.join("garbage"), "trellis-join-v1.bm9wZQ").expect("write");
    let msg = refused_join(dir, "e", &dir.join("garbage"));
    assert!(msg.contains("malformed"), "garbage token: {msg}");

    assert_eq!(clusters(&config), three, "a refused join changed the federation");

    // A cluster whose control plane is down shows so; removing it takes its voter out of the
    // group and its record out of the federation, with the other two clusters as the quorum.
    let described = json(&config, &["cluster", "describe", "c", "-o", "json"]);
    assert_eq!(described["control_planes"][0]["membership"], "voter", "{described}");
    let out = trellis(&config, &["cluster", "remove", "a"]);
    assert!(!out.status.success(), "a control plane removed its own cluster");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another cluster"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.kill();
    let status_of_c = || {
        json(&config, &["cluster", "list", "-o", "json"]).as_array().and_then(|l| {
            l.iter().find(|x| x["name"] == "c").map(|x| x["status"].as_str().unwrap_or_default().to_string())
        })
    };
    assert_eq!(status_of_c().as_deref(), Some("unreachable"));
    let out = trellis(&config, &["cluster", "remove", "c"]);
    assert!(out.status.success(), "cluster remove: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("c/cp-1"), "{}", String::from_utf8_lossy(&out.stdout));
    let two = vec![("a".to_string(), 1), ("b".to_string(), 1)];
    assert_eq!(clusters(&config), two);
    let members = json(&config, &["get", "controlplanes", "-o", "json"]);
    assert_eq!(members["members"].as_array().map(Vec::len), Some(2), "{members}");
    assert!(!warnings(&config).is_empty(), "two clusters again: the warning is back");
}

/// A proxy with a workload token, talking to control plane `cp` whose trust bundle file is
/// `bundle`; returns it with its ready file's contents.
fn proxy(
    dir: &Path,
    name: &str,
    (cp, bundle): (&str, &Path),
    config: &Path,
    sa: &str,
    cluster: &str,
    extra: &[&str],
) -> (Proc, Value) {
    let token = trellis_tests::mesh::workload_token(config, sa).expect("workload token");
    let ready = dir.join(format!("{name}.ready"));
    let mut args: Vec<String> = [
        "--control-plane",
        cp,
        "--trust-bundle",
        &bundle.display().to_string(),
        "--token",
        &token,
        "--service-account",
        sa,
        "--cluster",
        cluster,
        "--instance",
        name,
        "--ready-file",
        &ready.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = Proc::spawn(name, &bin("trellis-proxy"), &args, &dir.join(format!("{name}.log")), &[]);
    let v = wait_ready(&mut p, &ready, Duration::from_secs(30));
    (p, v)
}

#[test]
fn a_workload_in_one_cluster_calls_an_exported_service_of_another_with_mtls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let config = dir.join("cli.yaml");
    let a = ControlPlane::start(dir, "a", "127.0.1.1");
    let out = trellis(&config, &["config", "import", &a.admin_context.display().to_string()]);
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
    let tb = create_token(&config, dir, "token-b");
    let _b = join(dir, "b", "eu", "127.0.2.1", &tb);
    // A second control plane of B: the cluster's CA key is handed to it by B's first instance
    // (it is in no replicated state), so it signs B's workloads too. B's client proxy uses it.
    let (_b2, b_ready) = another_instance(dir, &config, "b", "cp-2", "127.0.2.2");
    let b_grpc = b_ready["grpc"].as_str().unwrap_or_default().to_string();
    let b_bundle = std::path::PathBuf::from(b_ready["trust_bundle"].as_str().unwrap_or_default());
    wait_for("b's trust bundle file", Duration::from_secs(30), || b_bundle.exists().then_some(()));
    let out = trellis(&config, &["create-service", "api.default", "--port", "80", "--exported"]);
    assert!(out.status.success(), "create-service: {}", String::from_utf8_lossy(&out.stderr));
    let out = trellis(&config, &["create-service", "secret.default", "--port", "80"]);
    assert!(out.status.success(), "create-service: {}", String::from_utf8_lossy(&out.stderr));

    // In A: the api application and its proxy; a cluster-local "secret" service too.
    let app_ready = dir.join("api-app.ready");
    let mut app = Proc::spawn(
        "api-app",
        &bin("trellis"),
        &["demo-app", "--name", "api", "--cluster", "a", "--listen", "127.0.1.10:0", "--ready-file"]
            .iter()
            .map(|s| s.to_string())
            .chain(std::iter::once(app_ready.display().to_string()))
            .collect::<Vec<_>>(),
        &dir.join("api-app.log"),
        &[],
    );
    let app_addr =
        wait_ready(&mut app, &app_ready, Duration::from_secs(30))["addr"].as_str().unwrap_or_default().to_string();
    let (_server, _) = proxy(
        dir,
        "api-proxy",
        (&a.grpc, &a.trust_bundle),
        &config,
        "api",
        "a",
        &["--service", "api.default", "--app", &app_addr, "--inbound", "127.0.1.2:0"],
    );
    let (_secret, _) = proxy(
        dir,
        "secret-proxy",
        (&a.grpc, &a.trust_bundle),
        &config,
        "secret",
        "a",
        &["--service", "secret.default", "--app", &app_addr, "--inbound", "127.0.1.3:0"],
    );

    // In B: a client whose certificate B's own intermediate signs, with listeners for both.
    let (_client, ready) = proxy(
        dir,
        "client-proxy",
        (&b_grpc, &b_bundle),
        &config,
        "client",
        "b",
        &["--upstream", "api.default=127.0.2.3:0", "--upstream", "secret.default=127.0.2.3:0"],
    );
    let api = ready["upstreams"]["api.default"].as_str().unwrap_or_default().to_string();
    let body = wait_for("a cross-cluster call", Duration::from_secs(30), || http_get(&api));
    let v: Value = serde_json::from_str(&body).expect("json body");
    assert_eq!(v["cluster"], "a", "{v}");
    assert!(
        v["caller"].as_str().is_some_and(|c| c.ends_with("/ns/default/sa/client")),
        "the server must see the caller's identity: {v}"
    );
    // The cluster-local service is not reachable from B: B's proxies never learn its endpoints.
    let secret = ready["upstreams"]["secret.default"].as_str().unwrap_or_default().to_string();
    assert!(http_get(&secret).is_none(), "a cluster-local service of A answered a caller in B");
}

#[test]
fn the_demo_joins_three_clusters_and_every_route_crosses_clusters_over_mtls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config");
    // Cluster a's control plane (the group's first member) is killed and restarted mid-run: the
    // other two keep a quorum, and every proxy keeps serving. Then the root CA is rotated: every
    // certificate is re-issued under the new root while the traffic goes on.
    let out = trellis(
        &config,
        &[
            "demo",
            "--duration",
            "13",
            "--rate",
            "300",
            "-o",
            "json",
            "--kill-controlplane-at",
            "3",
            "--restart-controlplane-at",
            "5",
            "--rotate-root-at",
            "8",
            "--keep",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "demo failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(report["clusters"], 3, "{report:#}");
    assert_eq!(report["failed"], 0, "{report:#}");
    assert_eq!(report["mtls"], true, "{report:#}");
    assert_eq!(report["cross_cluster"], true, "{report:#}");
    assert_eq!(report["endpoints_registered"], 3, "{report:#}");
    assert_eq!(report["root_rotations"], 1, "{report:#}");
    // Every route crosses clusters through the callee's gateway (one pooled tunnel per route).
    assert!(report["gateway_tunnels"].as_u64().unwrap_or(0) >= 3, "{report:#}");
    let workdir = std::path::PathBuf::from(report["workdir"].as_str().unwrap_or_default());
    let log = |name: &str| std::fs::read_to_string(workdir.join("logs").join(name)).unwrap_or_default();
    for proxy in ["web-1-proxy.log", "api-1-proxy.log", "db-1-proxy.log"] {
        assert!(
            log(proxy).contains("renewing the certificate now"),
            "{proxy} did not take a certificate under the new root:\n{}",
            log(proxy)
        );
    }
    for cp in ["cp-a.log", "cp-b.log", "cp-c.log"] {
        assert!(log(cp).contains("renewing the serving certificate"), "{cp} kept its old certificate");
    }
    let _ = std::fs::remove_dir_all(&workdir);
    let joined: Vec<&str> = report["joins"]
        .as_array()
        .map(|j| j.iter().filter_map(|x| x["cluster"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(joined, ["b", "c"], "{report:#}");
    // Each cluster's service was called by the previous cluster's, and saw that caller.
    let mut served: Vec<(String, String, String)> = report["routes"]
        .as_array()
        .map(|routes| {
            routes
                .iter()
                .map(|r| {
                    let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                    (s("cluster"), s("served_by"), s("caller_seen"))
                })
                .collect()
        })
        .unwrap_or_default();
    served.sort();
    let expect = |c: &str, by: &str, sa: &str| {
        (c.to_string(), by.to_string(), format!("spiffe://trellis.local/ns/default/sa/{sa}"))
    };
    assert_eq!(served, [expect("a", "api@b", "web"), expect("b", "db@c", "api"), expect("c", "web@a", "db")]);
}

#[test]
fn a_new_cluster_gets_a_voter_seat_from_a_cluster_holding_all_five() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let config = dir.join("cli.yaml");
    let a = ControlPlane::start(dir, "a", "127.0.1.1");
    let out = trellis(&config, &["config", "import", &a.admin_context.display().to_string()]);
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
    let mut keep = Vec::new();
    for i in 2..=5 {
        keep.push(another_instance(dir, &config, "a", &format!("cp-{i}"), &format!("127.0.1.{i}")).0);
    }
    let voters_by_cluster = || {
        let v = json(&config, &["get", "controlplanes", "-o", "json"]);
        let mut by: std::collections::BTreeMap<String, usize> = Default::default();
        for m in v["members"].as_array().cloned().unwrap_or_default() {
            if m["membership"] == "voter" {
                *by.entry(m["cluster"].as_str().unwrap_or_default().to_string()).or_default() += 1;
            }
        }
        by
    };
    wait_for("five voters in a", Duration::from_secs(60), || (voters_by_cluster().get("a") == Some(&5)).then_some(()));
    let tb = create_token(&config, dir, "token-b");
    let _b = join(dir, "b", "eu", "127.0.2.1", &tb);
    // The leader moves one of a's seats to b: four voters in a, one in b, still five in all.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let spread = loop {
        let by = voters_by_cluster();
        if by.get("b") == Some(&1) && by.get("a") == Some(&4) {
            break by;
        }
        if std::time::Instant::now() > deadline {
            let members = trellis(&config, &["get", "controlplanes"]);
            let mut placement = String::new();
            for entry in std::fs::read_dir(dir).expect("dir").flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                for l in text.lines().filter(|l| l.contains("voter") || l.contains("promot")) {
                    placement.push_str(&format!("{}: {l}\n", entry.file_name().to_string_lossy()));
                }
            }
            panic!(
                "no voter seat for b within 60 s: {by:?}\n{}\n{placement}",
                String::from_utf8_lossy(&members.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(spread.values().sum::<usize>(), 5);
    // Losing b leaves a quorum; losing a does not: status names a alone.
    let w = warnings(&config);
    assert!(w.len() == 1 && w[0].starts_with("cluster a holds 4 of the 5 voters"), "{w:?}");
}
