//! `trellis transparent-init`: sets up transparent mode in a workload's network namespace (run
//! as root there, as an init container would): a route for the service virtual addresses
//! ([`crate::state::SERVICE_VIPS`]) and an iptables rule that redirects TCP connections to them
//! to the proxy's `--transparent` listener. Only those addresses are captured, so the proxy's own
//! connections (to peers, gateways, control planes) never loop back into it, and traffic that
//! is not to a mesh service is untouched. Idempotent; `--remove` undoes it.

use std::process::Command;

use crate::state::SERVICE_VIPS;

/// The commands, as argument lists, that set up (or with `remove`, undo) the redirect to
/// `capture_port`.
pub fn commands(capture_port: u16, remove: bool) -> Vec<Vec<String>> {
    let range = format!("{}/{}", SERVICE_VIPS.0, SERVICE_VIPS.1);
    let rule = |op: &str| -> Vec<String> {
        ["iptables", "-w", "-t", "nat", op, "OUTPUT", "-p", "tcp", "-d", &range, "-j", "REDIRECT", "--to-ports"]
            .iter()
            .map(|s| s.to_string())
            .chain(std::iter::once(capture_port.to_string()))
            .collect()
    };
    let route =
        |op: &str| -> Vec<String> { ["ip", "route", op, &range, "dev", "lo"].iter().map(|s| s.to_string()).collect() };
    if remove { vec![rule("-D"), route("del")] } else { vec![route("replace"), rule("-A")] }
}

fn run(args: &[String]) -> Result<std::process::Output, String> {
    Command::new(&args[0]).args(&args[1..]).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("`{}` is not installed (Debian: apt-get install iptables iproute2)", args[0])
        } else {
            format!("cannot run `{}`: {e}", args[0])
        }
    })
}

/// Applies (or removes) the setup; prints each command. With `dry_run`, only prints.
pub fn apply(capture_port: u16, remove: bool, dry_run: bool) -> Result<(), String> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout();
    macro_rules! println {
        ($($t:tt)*) => {
            writeln!(stdout, $($t)*).map_err(|e| format!("cannot write to standard output: {e}"))?
        };
    }
    if capture_port == 0 {
        return Err("--capture-port must be the port of the proxy's --transparent listener (1..65535)".into());
    }
    for cmd in commands(capture_port, remove) {
        println!("{}", cmd.join(" "));
        if dry_run {
            continue;
        }
        // The rule is appended only once: `-C` says whether it is there already.
        if cmd.iter().any(|a| a == "-A") {
            let check: Vec<String> = cmd.iter().map(|a| if a == "-A" { "-C".into() } else { a.clone() }).collect();
            if run(&check)?.status.success() {
                println!("  (already there)");
                continue;
            }
        }
        let out = run(&cmd)?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let missing = remove && (err.contains("No such") || err.contains("does a matching rule exist"));
            if missing {
                println!("  (not there)");
                continue;
            }
            let hint = if err.contains("Permission denied") || err.contains("Operation not permitted") {
                " (run as root, or with CAP_NET_ADMIN, inside the workload's network namespace)"
            } else {
                ""
            };
            return Err(format!("`{}` failed: {err}{hint}", cmd.join(" ")));
        }
    }
    if !dry_run && !remove {
        println!(
            "Connections to service virtual addresses now go to 127.0.0.1:{capture_port}; start the proxy with \
             --transparent 127.0.0.1:{capture_port}. `trellis get services` lists each service's address."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_capture_only_the_service_addresses() {
        let set = commands(15001, false);
        assert_eq!(set[0].join(" "), "ip route replace 198.19.0.0/16 dev lo");
        assert_eq!(
            set[1].join(" "),
            "iptables -w -t nat -A OUTPUT -p tcp -d 198.19.0.0/16 -j REDIRECT --to-ports 15001"
        );
        let undo = commands(15001, true);
        assert!(undo[0].contains(&"-D".to_string()) && undo[1].join(" ") == "ip route del 198.19.0.0/16 dev lo");
    }
}
