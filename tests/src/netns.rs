//! Network namespaces for fault tests: each cluster in its own namespace, linked by a veth pair
//! to a bridge in a hub namespace, at `198.18.0.<n>/24`. A cluster is cut off by taking its
//! link down at the hub (its processes keep running and keep their loopback), and healed by
//! bringing it back. Needs `ip` (iproute2) and the right to create namespaces (root; CI runs as
//! root). Everything is deleted when the fabric is dropped.

use std::path::Path;
use std::process::Command;
use std::thread::JoinHandle;

use crate::harness::Proc;

/// Namespaces of one test.
pub struct Fabric {
    hub: String,
    members: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Fabric {
    /// Why namespaces cannot be made here, if they cannot.
    pub fn unavailable() -> Option<String> {
        let probe = format!("trellis-probe-{}", std::process::id());
        match ip(&["netns", "add", &probe]) {
            Ok(()) => {
                let _ = ip(&["netns", "del", &probe]);
                None
            }
            Err(e) => Some(e),
        }
    }

    /// `n` member namespaces named `<tag>-0` ... and their hub.
    pub fn new(tag: &str, n: usize) -> Result<Self, String> {
        let mut f = Self { hub: format!("{tag}-hub"), members: Vec::new() };
        ip(&["netns", "add", &f.hub])?;
        ip(&["-n", &f.hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &f.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &f.hub, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("{tag}-{i}");
            ip(&["netns", "add", &ns])?;
            f.members.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let port = format!("m{i}");
            ip(&["-n", &f.hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &f.hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", Self::addr(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(f)
    }

    /// Name of member namespace `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.members[i]
    }

    /// Address of member `i` on the fabric.
    pub fn addr(i: usize) -> String {
        format!("198.18.0.{}", i + 1)
    }

    /// Takes member `i`'s link down: it reaches no other member and none reaches it.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.hub, "link", "set", &format!("m{i}"), "down"]).expect("cut");
    }

    /// Brings member `i`'s link back.
    pub fn heal(&self, i: usize) {
        ip(&["-n", &self.hub, "link", "set", &format!("m{i}"), "up"]).expect("heal");
    }

    /// A command that runs `program` inside member `i`'s namespace.
    pub fn command(&self, i: usize, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(i)]).arg(program);
        c
    }

    /// Starts `program args` inside member `i`'s namespace (`ip netns exec` execs the program,
    /// so the process id is the program's).
    pub fn spawn(&self, i: usize, name: &str, program: &Path, args: &[String], log: &Path) -> Proc {
        let mut all = vec!["netns".to_string(), "exec".into(), self.ns(i).into(), program.display().to_string()];
        all.extend(args.iter().cloned());
        Proc::spawn(name, Path::new("ip"), &all, log, &[])
    }

    /// Runs `f` on a new thread whose sockets live in member `i`'s namespace.
    pub fn thread<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let path = format!("/run/netns/{}", self.ns(i));
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for ns in self.members.iter().chain(std::iter::once(&self.hub)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
