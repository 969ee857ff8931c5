//! One meshed cluster, end to end with the real binaries: the demo's traffic over mTLS through a
//! control-plane kill and restart, registrations that survive the restart, and workload tokens
//! that are refused with a reason the operator can act on.

use std::time::Duration;

use trellis_tests::harness::{ControlPlane, Proc, bin, trellis, wait_for};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn demo_serves_every_request_over_mtls_while_the_control_plane_is_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    // The user's own context must be current again after the demo.
    std::fs::write(
        &config,
        "current-context: mine\ncontexts:\n- name: mine\n  server: 127.0.0.1:1\n  trust-domain: trellis.local\n  ca: x\n  cert: x\n  key: x\n",
    )
    .unwrap();
    let out = trellis(
        &config,
        &[
            "demo",
            "--clusters",
            "1",
            "--duration",
            "12",
            "--rate",
            "300",
            "-o",
            "json",
            "--kill-controlplane-at",
            "3",
            "--restart-controlplane-at",
            "7",
        ],
    );
    assert!(out.status.success(), "demo failed: {}\n{}", stdout(&out), stderr(&out));
    let report: serde_json::Value =
        serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    let requests = report["requests"].as_u64().unwrap();
    assert!(requests >= 2_500, "expected about 3,600 requests in 12 s at 300/s, got {requests}");
    assert_eq!(report["failed"], 0, "{report:#}");
    assert_eq!(report["mtls"], true, "{report:#}");
    assert_eq!(report["controlplane_restarts"], 1, "{report:#}");
    // Both proxies' registrations are there (and healthy) after the restart.
    assert_eq!(report["endpoints_registered"], 2, "{report:#}");
    assert!(report["p99_ms"].as_f64().unwrap() > 0.0);
    let after = std::fs::read_to_string(&config).unwrap();
    assert!(after.contains("current-context: mine"), "previous context not restored:\n{after}");
    assert!(!after.contains("trellis-demo"), "demo context left behind:\n{after}");
}

#[test]
fn registrations_survive_a_control_plane_restart_and_bad_tokens_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let mut cp = ControlPlane::start(dir.path(), "a", "127.0.1.1");
    let imported = trellis(&config, &["config", "import", cp.admin_context.to_str().unwrap()]);
    assert!(imported.status.success(), "{}", stderr(&imported));

    let token = |sa: &str, ttl: &str| {
        let o = trellis(&config, &["token", "workload", "create", "--service-account", sa, "--ttl", ttl]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o).trim().to_string()
    };
    let (cp_grpc, cp_bundle) = (cp.grpc.clone(), cp.trust_bundle.display().to_string());
    let start_proxy = |name: &str, token: Option<&str>| {
        let mut args: Vec<String> = vec![
            "--control-plane".into(),
            cp_grpc.clone(),
            "--trust-bundle".into(),
            cp_bundle.clone(),
            "--service-account".into(),
            "web".into(),
            "--cluster".into(),
            "a".into(),
            "--instance".into(),
            name.into(),
            "--service".into(),
            "web.default".into(),
            "--app".into(),
            "127.0.1.2:9".into(),
            "--inbound".into(),
            "127.0.1.2:0".into(),
            "--ready-file".into(),
            dir.path().join(format!("{name}.ready")).display().to_string(),
        ];
        if let Some(t) = token {
            args.push("--token".into());
            args.push(t.into());
        }
        Proc::spawn(name, &bin("trellis-proxy"), &args, &dir.path().join(format!("{name}.log")), &[])
    };

    // A good token: the proxy registers its endpoint.
    let good = token("web", "1h");
    let mut proxy = start_proxy("web-1", Some(&good));
    let endpoints = |config: &std::path::Path| -> Vec<serde_json::Value> {
        let o = trellis(config, &["get", "endpoints", "-o", "json"]);
        serde_json::from_str(&stdout(&o)).unwrap_or_default()
    };
    wait_for("the proxy's endpoint to be registered and healthy", Duration::from_secs(30), || {
        endpoints(&config).iter().any(|e| e["id"] == "a/default/web/web-1" && e["healthy"] == true).then_some(())
    });

    // Kill -9 the control plane and restart it: nothing registered is lost.
    cp.restart();
    let eps = endpoints(&config);
    assert!(eps.iter().any(|e| e["id"] == "a/default/web/web-1"), "registration lost after restart: {eps:?}");
    wait_for("the proxy to reconnect and keep its endpoint healthy", Duration::from_secs(30), || {
        endpoints(&config).iter().any(|e| e["id"] == "a/default/web/web-1" && e["healthy"] == true).then_some(())
    });
    let tokens = trellis(&config, &["get", "workload-tokens", "-o", "json"]);
    assert!(!stdout(&tokens).contains(&good[22..]), "a token secret appeared in a listing");

    // Bad tokens: the proxy exits non-zero and says why.
    let revoked = token("web", "1h");
    let revoked_id = revoked.split('.').nth(1).unwrap().to_string();
    assert!(trellis(&config, &["token", "workload", "revoke", &revoked_id]).status.success());
    let expired = token("web", "1s");
    let other_sa = token("api", "1h");
    let tampered = format!("{}{}", &good[..good.len() - 4], if good.ends_with("AAAA") { "BBBB" } else { "AAAA" });
    std::thread::sleep(Duration::from_millis(1_100)); // let the 1 s token expire
    let cases: [(&str, Option<&str>, &str); 6] = [
        ("missing", None, "token"),
        ("revoked", Some(&revoked), "revoked"),
        ("expired", Some(&expired), "expired"),
        ("tampered", Some(&tampered), "wrong secret"),
        ("other-sa", Some(&other_sa), "is for namespace"),
        ("garbage", Some("not-a-token"), "malformed"),
    ];
    for (name, tok, reason) in cases {
        let mut p = start_proxy(&format!("bad-{name}"), tok);
        let status =
            p.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("proxy with {name} token kept running"));
        assert!(!status.success(), "proxy with {name} token exited successfully");
        let log = p.log();
        assert!(log.to_lowercase().contains(reason), "proxy with {name} token should say '{reason}', said:\n{log}");
    }
    assert!(proxy.exited().is_none(), "the good proxy died:\n{}", proxy.log());

    // SIGTERM drains: the proxy exits cleanly and deregisters, so its endpoint disappears rather
    // than lingering as unhealthy.
    let term = std::process::Command::new("kill").args(["-TERM", &proxy.pid().to_string()]).status().unwrap();
    assert!(term.success());
    let status = proxy.wait_exit(Duration::from_secs(15)).expect("proxy did not exit after SIGTERM");
    assert!(status.success(), "drain should exit 0, got {status}:\n{}", proxy.log());
    wait_for("the drained proxy's endpoint to be deregistered", Duration::from_secs(10), || {
        (!endpoints(&config).iter().any(|e| e["id"] == "a/default/web/web-1")).then_some(())
    });
}
