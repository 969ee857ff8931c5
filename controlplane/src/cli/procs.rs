//! Child processes of the demo: spawned with their logs in files, stopped by SIGTERM then
//! SIGKILL, and killed when their guard is dropped so nothing outlives the demo.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// A running child process.
pub struct Proc {
    /// Short name for messages.
    pub name: String,
    /// The program and its arguments, to restart it.
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Its log file.
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `program args`, output appended to `log`.
    pub fn spawn(name: &str, program: &Path, args: Vec<String>, log: &Path) -> std::io::Result<Self> {
        let mut p =
            Self { name: name.to_string(), program: program.to_path_buf(), args, log: log.to_path_buf(), child: None };
        p.start()?;
        Ok(p)
    }

    /// (Re)starts the process with its original arguments.
    pub fn start(&mut self) -> std::io::Result<()> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let err = out.try_clone()?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends a signal.
    pub fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }

    /// SIGKILL, and reaps it.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// SIGTERM, waits up to `grace`, then SIGKILL.
    pub async fn stop(&mut self, grace: Duration) {
        self.signal(Signal::SIGTERM);
        if let Some(mut c) = self.child.take()
            && tokio::time::timeout(grace, c.wait()).await.is_err()
        {
            let _ = c.kill().await;
        }
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Waits for a JSON ready file written by a child, failing early if the child exits.
pub async fn wait_ready(proc: &mut Proc, file: &Path, deadline: Duration) -> Result<serde_json::Value, String> {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            return Ok(v);
        }
        if !proc.running() {
            return Err(format!(
                "{} exited during start-up; its log ({}):\n{}",
                proc.name,
                proc.log.display(),
                proc.log_tail(15)
            ));
        }
        if start.elapsed() > deadline {
            return Err(format!(
                "{} was not ready after {deadline:?}; its log ({}):\n{}",
                proc.name,
                proc.log.display(),
                proc.log_tail(15)
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Finds a sibling binary of the running executable.
pub fn sibling_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the trellis binary: {e}"))?;
    let dir = exe.parent().ok_or("the trellis binary has no directory")?;
    for candidate in [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "{name} was not found next to {}; build every binary with `cargo build --release` (or `cargo build`) first",
        exe.display()
    ))
}
