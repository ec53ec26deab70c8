//! Test hosts in network namespaces: each node runs in its own namespace with its own address on a
//! bridge the harness creates; partitions are `iptables` DROP rules inside the namespaces. The
//! harness's control traffic (cluster init, status, leader transfers, membership changes) leaves
//! from the root namespace, on the bridge, and always reaches every node, like Jepsen's control
//! node. The workload's clients live on client hosts, namespaces of their own on the same bridge
//! (see `client_host.rs`), so that they can be cut off from some nodes while the control node is
//! not. Everything created here is removed when the `Net` is dropped (also on error or Ctrl-C).
//!
//! Addresses: `10.250.<tag>.0/24`, the bridge `.1`, client host `h` `.(1 + h)` (h from 1, at
//! most `CLIENT_HOSTS_MAX`), node `i` `.(10 + i)`. Only namespaces this harness made itself are
//! ever addressed.

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

/// Flushes the filter rules of namespace `ns`.
fn flush(ns: &str) -> Result<()> {
    sh(&["ip", "netns", "exec", ns, "iptables", "-F", "INPUT"])?;
    sh(&["ip", "netns", "exec", ns, "iptables", "-F", "OUTPUT"])
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

/// Client hosts a run may have: their addresses `.2` to `.9` sit below the nodes' `.11`.
pub const CLIENT_HOSTS_MAX: u64 = 8;

/// Nodes a run may have: their addresses end at `.254`.
pub const NODES_MAX: u64 = 244;

/// The namespaces, veths and bridge of one run.
#[derive(Debug)]
pub struct Net {
    tag: u8,
    nodes: u64,
    client_hosts: u64,
    bridge: String,
}

impl Net {
    /// Creates a bridge, one namespace per node (ids 1..=nodes) and one per client host (1..=
    /// client_hosts). `tag` keeps concurrent runs apart (names and subnet).
    pub fn create(nodes: u64, client_hosts: u64, tag: u8) -> Result<Net> {
        if nodes > NODES_MAX || client_hosts > CLIENT_HOSTS_MAX {
            bail!(
                "at most {NODES_MAX} nodes and {CLIENT_HOSTS_MAX} client hosts fit the test network"
            );
        }
        let net = Net {
            tag,
            nodes,
            client_hosts,
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
            net.add_host(&net.namespace(i), &format!("dsj{tag}v{i}"), &net.ip(i))?;
        }
        for h in 1..=client_hosts {
            net.add_host(
                &net.client_namespace(h),
                &format!("dsj{tag}c{h}"),
                &net.client_ip(h),
            )?;
        }
        Ok(net)
    }

    /// A namespace `ns` with the address `ip` on the bridge, through the veth pair `outer` (on the
    /// bridge) and `outer` + `p` (inside).
    fn add_host(&self, ns: &str, outer: &str, ip: &str) -> Result<()> {
        let inner = format!("{outer}p");
        sh(&["ip", "netns", "add", ns])?;
        sh(&[
            "ip", "link", "add", outer, "type", "veth", "peer", "name", &inner,
        ])?;
        sh(&["ip", "link", "set", &inner, "netns", ns])?;
        sh(&["ip", "link", "set", outer, "master", &self.bridge])?;
        sh(&["ip", "link", "set", outer, "up"])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "ip",
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &inner,
        ])?;
        sh(&["ip", "netns", "exec", ns, "ip", "link", "set", &inner, "up"])?;
        sh(&["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])?;
        Ok(())
    }

    pub fn namespace(&self, node: u64) -> String {
        format!("dsj{}n{node}", self.tag)
    }

    pub fn ip(&self, node: u64) -> String {
        format!("10.250.{}.{}", self.tag, 10 + node)
    }

    /// The namespace of client host `host` (from 1).
    pub fn client_namespace(&self, host: u64) -> String {
        format!("dsj{}c{host}", self.tag)
    }

    pub fn client_ip(&self, host: u64) -> String {
        format!("10.250.{}.{}", self.tag, 1 + host)
    }

    pub fn client_hosts(&self) -> u64 {
        self.client_hosts
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

    /// Removes every rule between nodes (rules cutting client hosts stay).
    pub fn heal(&self) -> Result<()> {
        for i in 1..=self.nodes {
            flush(&self.namespace(i))?;
        }
        Ok(())
    }

    /// Cuts client host `h` off from node `i` (both directions) wherever `sees(h, i)` is false.
    /// The rules sit in the client hosts' namespaces: links between nodes, and the control
    /// node's, are untouched.
    pub fn cut_clients(&self, sees: &dyn Fn(u64, u64) -> bool) -> Result<()> {
        self.heal_clients()?;
        for h in 1..=self.client_hosts {
            let ns = self.client_namespace(h);
            for i in (1..=self.nodes).filter(|&i| !sees(h, i)) {
                let node = self.ip(i);
                sh(&[
                    "ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &node, "-j",
                    "DROP",
                ])?;
                sh(&[
                    "ip", "netns", "exec", &ns, "iptables", "-A", "OUTPUT", "-d", &node, "-j",
                    "DROP",
                ])?;
            }
        }
        Ok(())
    }

    /// Removes every rule cutting client hosts off.
    pub fn heal_clients(&self) -> Result<()> {
        for h in 1..=self.client_hosts {
            flush(&self.client_namespace(h))?;
        }
        Ok(())
    }

    fn teardown(&self) {
        let hosts = (1..=self.nodes)
            .map(|i| (self.namespace(i), format!("dsj{}v{i}", self.tag)))
            .chain(
                (1..=self.client_hosts)
                    .map(|h| (self.client_namespace(h), format!("dsj{}c{h}", self.tag))),
            );
        for (ns, outer) in hosts {
            // Deleting a namespace also deletes the veth pair inside it; a missing one is fine.
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            let _ = Command::new("ip").args(["link", "del", &outer]).output();
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
