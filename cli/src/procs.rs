//! Child `dossier-node` processes on loopback, for the playground (and tests of the binaries).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One node process: its ports, data directory, and the running child if any.
#[derive(Debug)]
pub struct NodeProc {
    pub id: u64,
    pub grpc: String,
    pub http: String,
    pub data: PathBuf,
    bin: PathBuf,
    /// Extra flags for `dossier-node` (e.g. test-only switches).
    pub extra_args: Vec<String>,
    /// The peer endpoint (host:port, `--peer-listen`), when the internal services have their own.
    pub peer: Option<String>,
    /// A command the node runs under (e.g. `ip netns exec NS` for a test host in a namespace).
    pub prefix: Vec<String>,
    child: Option<Child>,
}

/// The `dossier-node` binary next to this executable (as cargo builds them), or `explicit`.
pub fn node_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe().context("locate the dossier executable")?;
    let sibling = me.with_file_name("dossier-node");
    if sibling.exists() {
        return Ok(sibling);
    }
    bail!(
        "dossier-node not found next to {} (build it: cargo build -p dossier-node, or pass --node-bin)",
        me.display()
    )
}

impl NodeProc {
    /// A node on loopback ports.
    pub fn new(id: u64, grpc_port: u16, http_port: u16, data: PathBuf, bin: PathBuf) -> Self {
        Self::at(
            id,
            format!("127.0.0.1:{grpc_port}"),
            format!("127.0.0.1:{http_port}"),
            data,
            bin,
        )
    }

    /// A node listening on the given addresses (host:port).
    pub fn at(id: u64, grpc: String, http: String, data: PathBuf, bin: PathBuf) -> Self {
        NodeProc {
            id,
            grpc,
            http,
            data,
            bin,
            extra_args: Vec::new(),
            peer: None,
            prefix: Vec::new(),
            child: None,
        }
    }

    /// Starts the node (logs go to `data/node.log`).
    pub fn spawn(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.data)
            .with_context(|| format!("create {}", self.data.display()))?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.data.join("node.log"))
            .context("open node log")?;
        let mut command = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = command
            .args([
                "--node-id",
                &self.id.to_string(),
                "--listen",
                &self.grpc,
                "--http-listen",
                &self.http,
            ])
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--no-auto-init")
            .args(self.peer.iter().map(|p| format!("--peer-listen={p}")))
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("clone log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            // The child may have exited already; nothing else to do then.
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): the process freezes or resumes.
    pub fn pause(&self, stop: bool) {
        self.signal(if stop {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        });
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id of the running child.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the node stops at once, mid-write.
    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL if the node is still running after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        self.signal(Signal::SIGTERM);
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Polls `GET /{path}` on the HTTP endpoint until it answers 200, within `timeout`.
    pub async fn wait_http_ok(&self, path: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if http_ok(&self.http, path).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} did not answer 200 on /{path} within {timeout:?}",
                    self.id
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(10));
    }
}

/// An unlabelled metric from a node's `/metrics` page at `addr` (host:port); `None` when the node
/// does not answer or has no such metric.
pub async fn metric(addr: &str, name: &str) -> Option<f64> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut page = String::new();
        stream.read_to_string(&mut page).await.ok()?;
        page.lines().find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.trim().parse().ok())?
        })
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

/// A minimal HTTP/1.0 GET: true when the answer's status is 200.
pub async fn http_ok(addr: &str, path: &str) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.0 200") || head.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The span of each kind of port above a local cluster's base port: node `i` (1 to
/// `PORT_BLOCK - 1`) listens on gRPC port `base_port + i`, peer port
/// `base_port + PORT_BLOCK + i` and HTTP port `base_port + 2 × PORT_BLOCK + i`.
pub const PORT_BLOCK: u16 = 40;

/// The gRPC, peer and HTTP ports of node `id` of a local cluster on `base_port`, or None when
/// they do not fit (an id outside its block, a port past 65,535).
pub fn local_ports(base_port: u16, id: u64) -> Option<[u16; 3]> {
    let id = u16::try_from(id)
        .ok()
        .filter(|id| (1..PORT_BLOCK).contains(id))?;
    let at = |block: u16| base_port.checked_add(block * PORT_BLOCK + id);
    Some([at(0)?, at(1)?, at(2)?])
}

/// A local cluster of `dossier-node` processes on loopback, node `i` (from 1) on the ports of
/// [`local_ports`] (the peer port only with TLS, for its internal services), with its data under
/// `root/node-i`.
#[derive(Debug)]
pub struct LocalCluster {
    pub procs: Vec<NodeProc>,
    pub seeds: Vec<String>,
    /// TLS of the cluster's clients, when its nodes serve TLS (`spawn_secure`).
    pub tls: Option<dossier_client::ClientTls>,
}

/// The user whose client certificate a secure local cluster makes for its own clients.
pub const LOCAL_USER: &str = "local-service";

/// The operator of a local cluster started with TLS: a client certificate of role `admin`
/// (cluster operations; no clinical data).
pub const LOCAL_ADMIN: &str = "local-admin";

impl LocalCluster {
    /// Starts the processes and waits until each answers `/healthz`.
    pub async fn spawn(
        root: &Path,
        nodes: u64,
        base_port: u16,
        bin: &Path,
    ) -> Result<LocalCluster> {
        Self::spawn_with(root, nodes, base_port, bin, &[]).await
    }

    /// Starts prepared node processes and waits until each answers `/healthz`.
    pub async fn from_procs(mut procs: Vec<NodeProc>) -> Result<LocalCluster> {
        for p in &mut procs {
            p.spawn()?;
        }
        for p in &procs {
            p.wait_http_ok("healthz", Duration::from_secs(20)).await?;
        }
        let seeds = procs.iter().map(|p| p.grpc.clone()).collect();
        Ok(LocalCluster {
            procs,
            seeds,
            tls: None,
        })
    }

    /// As `spawn_with`, with TLS everywhere: a CA and certificates are made in `root/certs`
    /// (`dossier cert`: the nodes' for 127.0.0.1, a `service` client certificate for
    /// [`LOCAL_USER`] and an `admin` one for [`LOCAL_ADMIN`]) with a development token issuer
    /// (`dossier token`) the nodes trust; the nodes serve TLS and call each other over it, on
    /// peer ports of their own that admit node certificates only. The
    /// clients of this cluster act as [`LOCAL_USER`], the operations of [`crate::ops`] in this
    /// process as [`LOCAL_ADMIN`].
    pub async fn spawn_secure(
        root: &Path,
        nodes: u64,
        base_port: u16,
        bin: &Path,
        extra_args: &[String],
    ) -> Result<LocalCluster> {
        let certs = Self::certs_dir(root);
        let life = crate::certs::Lifetimes::default();
        crate::certs::create_ca(&certs, life, true)?;
        crate::certs::create_node(
            &certs,
            &["127.0.0.1".into(), "localhost".into()],
            life,
            true,
        )?;
        crate::certs::create_client(&certs, LOCAL_USER, "service", life, true)?;
        crate::certs::create_client(&certs, LOCAL_ADMIN, "admin", life, true)?;
        crate::tokens::create_issuer(&certs, true)?;
        let tls = dossier_client::ClientTls::from_certs_dir(&certs, Some(LOCAL_USER))?;
        crate::ops::use_tls(dossier_client::ClientTls::from_certs_dir(
            &certs,
            Some(LOCAL_ADMIN),
        )?);
        let mut args = extra_args.to_vec();
        args.extend(Self::secure_args(&certs));
        let mut cluster = Self::spawn_procs(root, nodes, base_port, bin, &args, true).await?;
        cluster.tls = Some(tls);
        Ok(cluster)
    }

    /// A node's flags for TLS with the certificates in `certs` and bearer tokens of the
    /// development issuer there (`crate::tokens`).
    pub fn secure_args(certs: &Path) -> Vec<String> {
        vec![
            format!("--certs-dir={}", certs.display()),
            format!("--token-jwks={}", certs.join(crate::tokens::JWKS).display()),
            format!("--token-issuer={}", crate::tokens::LOCAL_ISSUER),
            format!("--token-audience={}", crate::tokens::LOCAL_AUDIENCE),
        ]
    }

    /// Where `spawn_secure` keeps the certificates of a cluster rooted at `root`.
    pub fn certs_dir(root: &Path) -> PathBuf {
        root.join("certs")
    }

    /// As `spawn`, passing `extra_args` to every node.
    pub async fn spawn_with(
        root: &Path,
        nodes: u64,
        base_port: u16,
        bin: &Path,
        extra_args: &[String],
    ) -> Result<LocalCluster> {
        Self::spawn_procs(root, nodes, base_port, bin, extra_args, false).await
    }

    /// The process of node `id` of a cluster on `base_port` ([`local_ports`]), with its peer
    /// port when `peer_port`, its data in `data`.
    pub fn node(
        base_port: u16,
        id: u64,
        data: PathBuf,
        bin: PathBuf,
        peer_port: bool,
    ) -> Result<NodeProc> {
        let [grpc, peer, http] = local_ports(base_port, id).with_context(|| {
            format!(
                "node {id} has no ports above base port {base_port} (node ids go from 1 to {}, ports up to 65535)",
                PORT_BLOCK - 1
            )
        })?;
        let mut p = NodeProc::new(id, grpc, http, data, bin);
        if peer_port {
            p.peer = Some(format!("127.0.0.1:{peer}"));
        }
        Ok(p)
    }

    async fn spawn_procs(
        root: &Path,
        nodes: u64,
        base_port: u16,
        bin: &Path,
        extra_args: &[String],
        peer_ports: bool,
    ) -> Result<LocalCluster> {
        let mut procs = (1..=nodes)
            .map(|id| {
                let mut p = Self::node(
                    base_port,
                    id,
                    root.join(format!("node-{id}")),
                    bin.to_path_buf(),
                    peer_ports,
                )?;
                p.extra_args = extra_args.to_vec();
                Ok(p)
            })
            .collect::<Result<Vec<NodeProc>>>()?;
        for p in &mut procs {
            p.spawn()?;
        }
        for p in &procs {
            p.wait_http_ok("healthz", Duration::from_secs(20)).await?;
        }
        let seeds = procs.iter().map(|p| p.grpc.clone()).collect();
        Ok(LocalCluster {
            procs,
            seeds,
            tls: None,
        })
    }

    /// `cluster init` with every node, then waits until each is ready (map known, leaders elected).
    pub async fn init(&self, shards: u32, replicas: u32) -> Result<()> {
        let infos = self
            .procs
            .iter()
            .map(|p| dossier_api::v1::NodeInfo {
                node_id: p.id,
                address: p.grpc.clone(),
                ..dossier_api::v1::NodeInfo::default()
            })
            .collect();
        crate::ops::init(infos, shards, replicas, Duration::from_secs(30)).await?;
        for p in &self.procs {
            p.wait_http_ok("readyz", Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    /// A client for this cluster with short attempts (fast failover) and a 10 s deadline.
    pub async fn client(&self) -> Result<dossier_client::Client> {
        self.client_with(|_| {}).await
    }

    /// As [`Self::client`], with `tweak` applied to the configuration before connecting.
    pub async fn client_with(
        &self,
        tweak: impl FnOnce(&mut dossier_client::ClientConfig),
    ) -> Result<dossier_client::Client> {
        let mut config = dossier_client::ClientConfig::new(self.seeds.clone());
        config.attempt_timeout = Duration::from_millis(500);
        config.deadline = Duration::from_secs(10);
        config.tls = self.tls.clone();
        tweak(&mut config);
        Ok(dossier_client::Client::connect(config).await?)
    }

    pub fn node_mut(&mut self, id: u64) -> Option<&mut NodeProc> {
        self.procs.iter_mut().find(|p| p.id == id)
    }
}
