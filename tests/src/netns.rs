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

/// What a capture saw on one interface.
#[derive(Debug, Default, Clone)]
pub struct Captured {
    pub packets: u64,
    pub bytes: u64,
    /// How many packets held each marker, in the order given.
    pub hits: Vec<u64>,
}

/// A packet capture running on a thread inside a namespace.
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: JoinHandle<Result<Captured, String>>,
}

impl Capture {
    /// Stops the capture; what it saw.
    pub fn finish(self) -> Result<Captured, String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| Err("the capture thread panicked".into()))
    }
}

impl Fabric {
    /// Captures every frame on member `i`'s fabric interface (`eth0`, both directions) with a
    /// raw packet socket, counting the frames that contain each of `markers`.
    pub fn capture(&self, i: usize, markers: &[&[u8]]) -> Capture {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockProtocol, SockType, recvfrom, setsockopt, socket, sockopt,
        };
        let markers: Vec<Vec<u8>> = markers.iter().map(|m| m.to_vec()).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = self.thread(i, move || {
            let run = || -> Result<Captured, String> {
                let ifindex = nix::net::if_::if_nametoindex("eth0").map_err(|e| format!("eth0: {e}"))?;
                let fd = socket(AddressFamily::Packet, SockType::Raw, SockFlag::empty(), SockProtocol::EthAll)
                    .map_err(|e| format!("packet socket: {e}"))?;
                setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(0, 100_000))
                    .map_err(|e| format!("receive timeout: {e}"))?;
                let _ = ready_tx.send(());
                let mut seen = Captured { hits: vec![0; markers.len()], ..Default::default() };
                let mut buf = vec![0u8; 65_536];
                use std::os::fd::AsRawFd;
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let (n, from) = match recvfrom::<nix::sys::socket::LinkAddr>(fd.as_raw_fd(), &mut buf) {
                        Ok(x) => x,
                        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                        Err(e) => return Err(format!("recvfrom: {e}")),
                    };
                    if from.is_some_and(|a| a.ifindex() != ifindex as usize) {
                        continue;
                    }
                    seen.packets += 1;
                    seen.bytes += n as u64;
                    let frame = &buf[..n];
                    for (k, m) in markers.iter().enumerate() {
                        if frame.windows(m.len()).any(|w| w == m.as_slice()) {
                            seen.hits[k] += 1;
                        }
                    }
                }
                Ok(seen)
            };
            run()
        });
        // The socket is open before the caller goes on (or the thread failed and says why).
        let _ = ready_rx.recv_timeout(std::time::Duration::from_secs(5));
        Capture { stop, thread }
    }
}
