//! Processes, binaries and waiting.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries (`target/<profile>`), found from the running
/// test executable (`target/<profile>/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("deps dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; panics with what to do when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` (it builds every binary)",
        p.display()
    );
    p
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args` with stdout and stderr in `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path, envs: &[(&str, &str)]) -> Self {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self { name: name.to_string(), child, log: log.to_path_buf() }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited; returns its status if so.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for exit up to `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits until something accepts TCP connections on `addr`: an error with the log if the
    /// process exits first or nothing listens within `timeout`.
    pub fn wait_listening(&mut self, addr: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = self.exited() {
                anyhow::bail!("{} exited ({status}) at start; its log:\n{}", self.name, self.log());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} not listening on {addr} after {timeout:?}; its log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Reads a JSON ready file written by a process, failing early with its log if it exits.
pub fn wait_ready(proc: &mut Proc, file: &Path, deadline: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && let Ok(v) = serde_json::from_str(&text)
        {
            return v;
        }
        if let Some(status) = proc.exited() {
            panic!("{} exited ({status}) before it was ready; log:\n{}", proc.name, proc.log());
        }
        assert!(start.elapsed() < deadline, "{} not ready after {deadline:?}; log:\n{}", proc.name, proc.log());
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A control-plane instance of one cluster, started on the cluster's loopback block.
pub struct ControlPlane {
    pub proc: Proc,
    pub grpc: String,
    pub trust_bundle: PathBuf,
    pub admin_context: PathBuf,
    pub trust_domain: String,
    args: Vec<String>,
    ready_file: PathBuf,
}

impl ControlPlane {
    /// Starts `trellis-cp` for `cluster` with its data in `dir`, listening on `ip` (the kernel picks
    /// the port; a restart keeps it).
    pub fn start(dir: &Path, cluster: &str, ip: &str) -> Self {
        let ready_file = dir.join(format!("{cluster}-cp.ready"));
        let args: Vec<String> = [
            "--data-dir",
            &dir.join(format!("{cluster}-cp")).display().to_string(),
            "--listen",
            &format!("{ip}:0"),
            "--cluster",
            cluster,
            "--node",
            "cp-1",
            "--endpoint-grace-secs",
            "5",
            "--ready-file",
            &ready_file.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut proc = Proc::spawn(
            &format!("trellis-cp {cluster}"),
            &bin("trellis-cp"),
            &args,
            &dir.join(format!("{cluster}-cp.log")),
            &[],
        );
        let ready = wait_ready(&mut proc, &ready_file, Duration::from_secs(30));
        let grpc = ready["grpc"].as_str().unwrap_or_default().to_string();
        let mut args = args;
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = grpc.clone();
        }
        Self {
            proc,
            grpc,
            trust_bundle: PathBuf::from(ready["trust_bundle"].as_str().unwrap_or_default()),
            admin_context: PathBuf::from(ready["admin_context"].as_str().unwrap_or_default()),
            trust_domain: ready["trust_domain"].as_str().unwrap_or_default().to_string(),
            args,
            ready_file,
        }
    }

    /// Kills the instance (SIGKILL) and starts it again with the same data and address.
    pub fn restart(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_file(&self.ready_file);
        let log = self.proc.log.clone();
        let mut log_name = log.clone();
        log_name.set_extension("restarted.log");
        self.proc = Proc::spawn(&self.proc.name.clone(), &bin("trellis-cp"), &self.args, &log_name, &[]);
        wait_ready(&mut self.proc, &self.ready_file, Duration::from_secs(30));
    }
}

/// Runs the `trellis` CLI with a given config file; returns its output.
pub fn trellis(config: &Path, args: &[&str]) -> Output {
    Command::new(bin("trellis"))
        .args(args)
        .env("TRELLIS_CONFIG", config)
        .stdin(Stdio::null())
        .output()
        .expect("run trellis")
}

/// Runs `trellis demo --scenario failover -o json` at 200 requests/s, with a's backends killed,
/// b's gateway killed, b's gateway restored and a's backends restored at `steps` seconds, for
/// `duration` seconds. Whether it exited successfully (it does not when a request failed), and
/// its report.
pub fn failover_demo(config: &Path, steps: [u64; 4], duration: u64) -> Result<(bool, serde_json::Value), String> {
    let [kill, kill_gw, restore_gw, restore] = steps.map(|s| s.to_string());
    let duration = duration.to_string();
    let out = trellis(
        config,
        &[
            "demo",
            "--scenario",
            "failover",
            "--rate",
            "200",
            "--kill-backends-at",
            &kill,
            "--kill-gateway-at",
            &kill_gw,
            "--restore-gateway-at",
            &restore_gw,
            "--restore-backends-at",
            &restore,
            "--duration",
            &duration,
            "-o",
            "json",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&text)
        .map_err(|e| format!("no report ({e}): {text}\n{}", String::from_utf8_lossy(&out.stderr)))?;
    Ok((out.status.success(), report))
}

/// A free port on `ip`.
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0)).expect("bind").local_addr().expect("addr").port()
}

/// One HTTP/1.1 `GET /hello` through `addr` (a proxy's local listener); the body of a 200.
pub fn http_get(addr: &str) -> Option<String> {
    http_get_path(addr, "/hello")
}

/// As [`http_get`], for `path`.
pub fn http_get_path(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then(|| out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}
