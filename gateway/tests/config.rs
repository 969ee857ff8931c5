//! `trellis-gateway` refuses a configuration it cannot serve safely, with a message that says what
//! to change, before it opens anything. (These also make `cargo test --workspace` build the
//! binary that the multi-process suites in `tests/` start.)

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis-gateway")).args(args).output().expect("run trellis-gateway");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn an_admin_listener_off_loopback_is_refused() {
    let (ok, err) = run(&[
        "--control-plane",
        "127.0.0.1:1",
        "--trust-bundle",
        "/nonexistent",
        "--cluster",
        "b",
        "--token",
        "x",
        "--admin",
        "0.0.0.0:0",
    ]);
    assert!(!ok);
    assert!(err.contains("--admin") && err.contains("not loopback"), "{err}");
}

#[test]
fn a_missing_token_or_bundle_is_named() {
    let (ok, err) = run(&["--control-plane", "127.0.0.1:1", "--trust-bundle", "/nonexistent", "--cluster", "b"]);
    assert!(!ok);
    assert!(err.contains("trellis token gateway create"), "{err}");
    let (ok, err) =
        run(&["--control-plane", "127.0.0.1:1", "--trust-bundle", "/nonexistent", "--cluster", "b", "--token", "x"]);
    assert!(!ok);
    assert!(err.contains("--trust-bundle") && err.contains("/nonexistent"), "{err}");
}
