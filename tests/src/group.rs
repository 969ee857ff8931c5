//! A control-plane group of real `trellis-cp` processes on one machine: the first member creates
//! the federation, the others join with a token from `trellis controlplane token create`. Members
//! can be killed (SIGKILL), paused (SIGSTOP) and resumed, and restarted on the same address and
//! data directory. Status comes from the admin API of any member that answers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trellis_controlplane::cli::client;
use trellis_controlplane::context::{ConfigFile, Context};
use trellis_proto::pb;

use crate::harness::{Proc, bin, trellis, wait_ready};

/// One member process.
pub struct Member {
    pub name: String,
    pub proc: Option<Proc>,
    /// Bound gRPC address, kept across restarts.
    pub grpc: String,
    args: Vec<String>,
    ready_file: PathBuf,
    log_dir: PathBuf,
    starts: u32,
    pub paused: bool,
}

impl Member {
    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.ready_file);
        self.starts += 1;
        let log = self.log_dir.join(format!("{}.{}.log", self.name, self.starts));
        let mut proc = Proc::spawn(&self.name, &bin("trellis-cp"), &self.args, &log, &[]);
        let ready = wait_ready(&mut proc, &self.ready_file, Duration::from_secs(60));
        self.grpc = ready["grpc"].as_str().unwrap_or_default().to_string();
        if let Some(i) = self.args.iter().position(|a| a == "--listen") {
            self.args[i + 1] = self.grpc.clone();
        }
        self.proc = Some(proc);
        self.paused = false;
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            if self.paused {
                let _ = kill(Pid::from_raw(p.pid() as i32), Signal::SIGCONT);
            }
            p.kill();
        }
        self.paused = false;
    }

    /// Starts again with the same data directory and address.
    pub fn restart(&mut self) {
        self.kill();
        if let Some(i) = self.args.iter().position(|a| a == "--join-token-file") {
            self.args.drain(i..i + 2);
        }
        self.spawn();
    }

    /// SIGSTOP.
    pub fn pause(&mut self) {
        if let Some(p) = &self.proc {
            let _ = kill(Pid::from_raw(p.pid() as i32), Signal::SIGSTOP);
            self.paused = true;
        }
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        if let Some(p) = &self.proc {
            let _ = kill(Pid::from_raw(p.pid() as i32), Signal::SIGCONT);
        }
        self.paused = false;
    }

    /// Running and not paused.
    pub fn up(&self) -> bool {
        self.proc.is_some() && !self.paused
    }

    /// Its logs so far (every start).
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| std::fs::read_to_string(self.log_dir.join(format!("{}.{i}.log", self.name))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---- restart ----\n")
    }
}

/// A group of members.
pub struct Group {
    pub members: Vec<Member>,
    /// Admin context (CLI config file) of the federation.
    pub config: PathBuf,
    pub context: Context,
}

impl Group {
    /// Starts `n` members under `dir` on 127.0.0.1, with `extra` flags for every member.
    pub fn start(dir: &Path, n: usize, extra: &[&str]) -> Self {
        let config = dir.join("cli.yaml");
        let mut members = Vec::new();
        for i in 1..=n {
            let name = format!("cp-{i}");
            let ready_file = dir.join(format!("{name}.ready"));
            let mut args: Vec<String> = [
                "--data-dir",
                &dir.join(&name).display().to_string(),
                "--listen",
                "127.0.0.1:0",
                "--node",
                &name,
                "--ready-file",
                &ready_file.display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            if i > 1 {
                let token = dir.join("join-token");
                if i == 2 {
                    let uses = (n - 1).to_string();
                    let out = trellis(&config, &["controlplane", "token", "create", "--uses", &uses]);
                    assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
                    std::fs::write(&token, &out.stdout).expect("write token");
                }
                args.push("--join-token-file".into());
                args.push(token.display().to_string());
            }
            let mut m = Member {
                name,
                proc: None,
                grpc: String::new(),
                args,
                ready_file: ready_file.clone(),
                log_dir: dir.to_path_buf(),
                starts: 0,
                paused: false,
            };
            m.spawn();
            if i == 1 {
                let ready: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&ready_file).unwrap_or_default()).unwrap_or_default();
                let ctx = ready["admin_context"].as_str().unwrap_or_default().to_string();
                let out = trellis(&config, &["config", "import", &ctx]);
                assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
            }
            members.push(m);
        }
        let file = ConfigFile::load(&config).expect("cli config");
        let context = file.current().expect("current context").clone();
        let group = Self { members, config, context };
        group.wait_voters(n, Duration::from_secs(60));
        group
    }

    /// The admin context pointed at member `i`.
    pub fn context_for(&self, i: usize) -> Context {
        let mut c = self.context.clone();
        c.server = self.members[i].grpc.clone();
        c
    }

    /// The group's status from the first member that answers.
    pub async fn status(&self) -> Option<pb::ListControlPlanesResponse> {
        for (i, m) in self.members.iter().enumerate() {
            if !m.up() {
                continue;
            }
            let Ok(mut admin) = client::admin(&self.context_for(i)) else { continue };
            let call = admin.list_control_planes(pb::ListControlPlanesRequest {});
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(3), call).await {
                return Some(r.into_inner());
            }
        }
        None
    }

    /// The member that considers itself leader with the highest term, asking every running
    /// member directly (each answers from its own state, without the others).
    pub async fn leader(&self) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for (i, m) in self.members.iter().enumerate() {
            if !m.up() {
                continue;
            }
            let Ok(mut admin) = client::admin(&self.context_for(i)) else { continue };
            let call = admin.status(pb::StatusRequest {});
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(500), call).await {
                let r = r.into_inner();
                if r.raft_role == "leader" && best.is_none_or(|(t, _)| r.raft_term > t) {
                    best = Some((r.raft_term, i));
                }
            }
        }
        best.map(|(_, i)| i)
    }

    /// Index of the member that leads, by name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }

    /// Waits until `n` voters are in the group with a leader.
    pub fn wait_voters(&self, n: usize, deadline: Duration) {
        // From a blocking thread of a runtime, use that runtime; else a small one of our own
        // (whose drivers only `Runtime::block_on` runs).
        let own = match tokio::runtime::Handle::try_current() {
            Ok(h) => Err(h),
            Err(_) => Ok(tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")),
        };
        let start = Instant::now();
        loop {
            let status = match &own {
                Ok(rt) => rt.block_on(self.status()),
                Err(h) => h.block_on(self.status()),
            };
            if let Some(s) = status {
                let voters = s.members.iter().filter(|m| m.membership == "voter" && m.error.is_empty()).count();
                if voters == n && s.leader != 0 {
                    return;
                }
            }
            assert!(start.elapsed() < deadline, "the group did not reach {n} voters with a leader");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
