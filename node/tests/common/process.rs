//! Clusters of real `dossier-node` processes on loopback, for tests that signal them (SIGKILL,
//! SIGSTOP). Each node logs to `node-{id}.log` in the cluster's folder; the folder is removed
//! when the cluster is dropped, and kept (its path printed) when a test fails or
//! `DOSSIER_TEST_KEEP` is set.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use dossier_api::v1::admin_client::AdminClient;
use dossier_api::v1::{
    GetRequest, GetResponse, InitClusterRequest, NodeInfo, NodeStatusRequest, ReadConsistency,
    RouteHeader,
};
use dossier_client::{Client, ClientConfig};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::free_port;

/// A node process, killed when dropped.
pub struct Proc(Child);

impl Proc {
    pub fn new(child: Child) -> Proc {
        Proc(child)
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.0.id() as i32), signal).unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process takes SIGKILL too.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `dossier-node` under test: the one cargo built, or `DOSSIER_TEST_NODE_BIN` (to run a
/// test against another build, such as a release binary or an older version).
pub fn node_binary() -> std::ffi::OsString {
    std::env::var_os("DOSSIER_TEST_NODE_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_dossier-node").into())
}

fn spawn(id: u64, grpc: &str, dir: &Path, config: Option<&Path>) -> Proc {
    // Appended to: a restarted node's log follows its first life's.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("node-{id}.log")))
        .unwrap();
    let mut command = Command::new(node_binary());
    command
        .args([
            "--node-id",
            &id.to_string(),
            "--listen",
            grpc,
            "--http-listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .arg("--data-dir")
        .arg(dir.join(format!("node-{id}")))
        .arg("--no-auto-init");
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let child = command
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

/// `n` node processes (ids 1..=n), initialised with `shards` shards of `n` replicas.
pub struct ProcCluster {
    dir: Option<tempfile::TempDir>,
    config: Option<std::path::PathBuf>,
    pub addrs: Vec<String>,
    procs: Vec<Option<Proc>>,
}

impl ProcCluster {
    /// Starts the nodes with the TOML `config` (none if empty) and initialises the cluster.
    pub async fn start(n: usize, shards: u32, config: &str) -> ProcCluster {
        let dir = tempfile::tempdir().unwrap();
        let config_path = (!config.is_empty()).then(|| {
            let path = dir.path().join("node.toml");
            std::fs::write(&path, config).unwrap();
            path
        });
        let addrs: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let procs = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| Some(spawn(i as u64 + 1, a, dir.path(), config_path.as_deref())))
            .collect();
        let nodes: Vec<NodeInfo> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| NodeInfo {
                node_id: i as u64 + 1,
                address: a.clone(),
                ..NodeInfo::default()
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut admin) = AdminClient::connect(format!("http://{}", addrs[0])).await
                && admin
                    .init_cluster(InitClusterRequest {
                        nodes: nodes.clone(),
                        shards,
                        replicas: n as u32,
                    })
                    .await
                    .is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "cluster init failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ProcCluster {
            dir: Some(dir),
            config: config_path,
            addrs,
            procs,
        }
    }

    /// A client of the whole cluster whose attempts give up after `attempt_timeout` (then it
    /// tries elsewhere), within a 20 s deadline.
    pub async fn client(&self, attempt_timeout: Duration) -> Client {
        let mut config = ClientConfig::new(self.addrs.clone());
        config.attempt_timeout = attempt_timeout;
        config.deadline = Duration::from_secs(20);
        Client::connect(config).await.unwrap()
    }

    pub fn addr(&self, id: u64) -> &str {
        &self.addrs[id as usize - 1]
    }

    /// Sends `signal` to node `id`.
    pub fn signal(&self, id: u64, signal: Signal) {
        self.procs[id as usize - 1]
            .as_ref()
            .expect("node running")
            .signal(signal);
    }

    /// SIGKILLs node `id`.
    pub fn kill(&mut self, id: u64) {
        let victim = self.procs[id as usize - 1].take().expect("node running");
        victim.signal(Signal::SIGKILL);
    }

    /// SIGKILLs node `id` if it runs, and starts it again on its data.
    pub fn restart(&mut self, id: u64) {
        if let Some(victim) = self.procs[id as usize - 1].take() {
            victim.signal(Signal::SIGKILL);
        }
        let dir = self.dir.as_ref().expect("cluster folder").path();
        let node = spawn(
            id,
            &self.addrs[id as usize - 1],
            dir,
            self.config.as_deref(),
        );
        self.procs[id as usize - 1] = Some(node);
    }

    /// The node leading `shard`: of the replicas that say they lead, the one with the highest
    /// term; waits up to 10 s for one.
    pub async fn leader_of(&self, shard: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut leader: Option<(u64, u64)> = None;
            for (i, a) in self.addrs.iter().enumerate() {
                if self.procs[i].is_none() {
                    continue;
                }
                let Ok(mut admin) = AdminClient::connect(format!("http://{a}")).await else {
                    continue;
                };
                let Ok(status) = admin.node_status(NodeStatusRequest::default()).await else {
                    continue;
                };
                for s in status
                    .into_inner()
                    .shards
                    .iter()
                    .filter(|s| s.shard_id == shard && s.role == "leader")
                {
                    if leader.is_none_or(|(_, term)| s.term > term) {
                        leader = Some((s.node_id, s.term));
                    }
                }
            }
            if let Some((id, _)) = leader {
                return id;
            }
            assert!(Instant::now() < deadline, "shard {shard} has no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        // Stop the nodes before their folder goes.
        self.procs.clear();
        if let Some(dir) = self.dir.take()
            && (std::thread::panicking() || std::env::var_os("DOSSIER_TEST_KEEP").is_some())
        {
            eprintln!("node logs and data kept in {}", dir.keep().display());
        }
    }
}

/// A linearizable `Kv.Get` of `key` of `patient`, routed to `shard` at `epoch`, for sending to
/// one node directly (not through the client's routing).
pub fn linearizable_get(
    shard: u64,
    epoch: u64,
    patient: &str,
    key: &[u8],
    timeout: Duration,
) -> tonic::Request<GetRequest> {
    let mut request = tonic::Request::new(GetRequest {
        route: Some(RouteHeader {
            shard_id: shard,
            epoch,
            patient_id: patient.to_owned(),
        }),
        key: key.to_vec(),
        consistency: ReadConsistency::Linearizable as i32,
    });
    request.set_timeout(timeout);
    request
}

/// The register a test wrote as a big-endian u64; 0 when absent.
pub fn register_value(answer: &GetResponse) -> u64 {
    if answer.found {
        u64::from_be_bytes(answer.value[..].try_into().expect("8-byte register value"))
    } else {
        0
    }
}

/// The epoch of `shard` in `client`'s map.
pub fn shard_epoch(client: &Client, shard: u64) -> u64 {
    client
        .cluster_map()
        .unwrap()
        .shards
        .iter()
        .find(|d| d.shard_id == shard)
        .unwrap()
        .epoch
}
