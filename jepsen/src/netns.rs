//! Test hosts in network namespaces: each node runs in its own namespace with its own address on a
//! bridge the harness creates; partitions are `iptables` DROP rules inside the namespaces. The
//! harness (in the root namespace, on the bridge) always reaches every node, like Jepsen's control
//! node. Everything created here is removed when the `Net` is dropped (also on error or Ctrl-C).
//!
//! Addresses: `10.250.<tag>.0/24`, the bridge `.1`, node `i` `.(10 + i)`. Only namespaces this
//! harness made itself are ever addressed.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Whether namespaces can be used here: root, and `ip` and `iptables` present.
pub fn available() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root".into());
    }
    for tool in ["ip", "iptables"] {
        let ok = Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "--version" })
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err(format!("`{tool}` is not installed"));
        }
    }
    Ok(())
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The namespaces, veths and bridge of one run.
#[derive(Debug)]
pub struct Net {
    tag: u8,
    nodes: u64,
    bridge: String,
}

impl Net {
    /// Creates a bridge and one namespace per node (ids 1..=nodes). `tag` keeps concurrent runs
    /// apart (names and subnet).
    pub fn create(nodes: u64, tag: u8) -> Result<Net> {
        let net = Net {
            tag,
            nodes,
            bridge: format!("dsjbr{tag}"),
        };
        // Leftovers of an interrupted run with the same tag go first.
        net.teardown();
        sh(&["ip", "link", "add", &net.bridge, "type", "bridge"])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.250.{tag}.1/24"),
            "dev",
            &net.bridge,
        ])?;
        sh(&["ip", "link", "set", &net.bridge, "up"])?;
        for i in 1..=nodes {
            let ns = net.namespace(i);
            let (outer, inner) = (format!("dsj{tag}v{i}"), format!("dsj{tag}v{i}p"));
            sh(&["ip", "netns", "add", &ns])?;
            sh(&[
                "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            sh(&["ip", "link", "set", &inner, "netns", &ns])?;
            sh(&["ip", "link", "set", &outer, "master", &net.bridge])?;
            sh(&["ip", "link", "set", &outer, "up"])?;
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{}/24", net.ip(i)),
                "dev",
                &inner,
            ])?;
            sh(&[
                "ip", "netns", "exec", &ns, "ip", "link", "set", &inner, "up",
            ])?;
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    pub fn namespace(&self, node: u64) -> String {
        format!("dsj{}n{node}", self.tag)
    }

    pub fn ip(&self, node: u64) -> String {
        format!("10.250.{}.{}", self.tag, 10 + node)
    }

    /// The command prefix that runs a program inside the node's namespace.
    pub fn prefix(&self, node: u64) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.namespace(node),
        ]
    }

    /// Cuts every link between two nodes for which `connected` is false (in both directions).
    pub fn partition(&self, connected: &dyn Fn(u64, u64) -> bool) -> Result<()> {
        self.heal()?;
        for i in 1..=self.nodes {
            let ns = self.namespace(i);
            for j in (1..=self.nodes).filter(|&j| j != i && !connected(i, j)) {
                let peer = self.ip(j);
                sh(&[
                    "ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &peer, "-j",
                    "DROP",
                ])?;
                sh(&[
                    "ip", "netns", "exec", &ns, "iptables", "-A", "OUTPUT", "-d", &peer, "-j",
                    "DROP",
                ])?;
            }
        }
        Ok(())
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> Result<()> {
        for i in 1..=self.nodes {
            let ns = self.namespace(i);
            sh(&["ip", "netns", "exec", &ns, "iptables", "-F", "INPUT"])?;
            sh(&["ip", "netns", "exec", &ns, "iptables", "-F", "OUTPUT"])?;
        }
        Ok(())
    }

    fn teardown(&self) {
        for i in 1..=self.nodes {
            // Deleting a namespace also deletes the veth pair inside it; a missing one is fine.
            let _ = Command::new("ip")
                .args(["netns", "del", &self.namespace(i)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &format!("dsj{}v{i}", self.tag)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}
