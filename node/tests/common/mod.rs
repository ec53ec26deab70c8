//! In-process clusters on loopback (real tonic), one tokio runtime per node so that a node can be
//! stopped gracefully or dropped abruptly (its runtime shut down: the in-process equivalent of
//! SIGKILL, minus the page cache).

#![allow(dead_code, clippy::unwrap_used)]

pub mod process;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dossier_api::v1::NodeInfo;
use dossier_api::v1::admin_client::AdminClient;
use dossier_client::{Client, ClientConfig};
use dossier_node::NodeConfig;
use tokio::sync::watch;

/// A loopback port free now and not handed out before in this process: the system may offer
/// a port it just gave to another call (released, not yet bound by its node), and two
/// endpoints of one node would then collide.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub struct TestNode {
    pub id: u64,
    pub grpc: String,
    pub config: NodeConfig,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestNode {
    pub fn new(id: u64, data: PathBuf, tweak: &dyn Fn(&mut NodeConfig)) -> Self {
        let grpc_port = free_port();
        let mut config = NodeConfig {
            node_id: id,
            listen: format!("127.0.0.1:{grpc_port}").parse().unwrap(),
            http_listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            data_dir: data,
            auto_init: false,
            ..NodeConfig::default()
        };
        tweak(&mut config);
        TestNode {
            id,
            grpc: format!("127.0.0.1:{grpc_port}"),
            config,
            runtime: None,
            stop: None,
            task: None,
        }
    }

    pub fn start(&mut self) {
        assert!(self.runtime.is_none(), "node {} already runs", self.id);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = watch::channel(false);
        let config = self.config.clone().validate().unwrap();
        self.task = Some(runtime.spawn(dossier_node::run(config, Some(rx))));
        self.stop = Some(tx);
        self.runtime = Some(runtime);
    }

    pub fn is_running(&self) -> bool {
        self.runtime.is_some()
    }

    /// Drops the node abruptly: every task of its runtime is cancelled where it stands.
    pub fn kill(&mut self) {
        self.stop = None;
        self.task = None;
        if let Some(rt) = self.runtime.take() {
            let shutdown = move || rt.shutdown_timeout(Duration::from_secs(10));
            if tokio::runtime::Handle::try_current().is_ok() {
                tokio::task::block_in_place(shutdown);
            } else {
                shutdown();
            }
        }
    }

    /// Stops the node as SIGTERM would (drain, stop, flush), then releases its runtime.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
        }
        self.kill();
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The service (`ward-app`, role service) and operator (`dba`, role admin) of the clusters
/// that tests run with TLS.
#[allow(dead_code)] // not every test binary runs TLS
pub const SERVICE_USER: &str = "ward-app";
pub const ADMIN_USER: &str = "dba";

/// A certs directory for a TLS test cluster: CA, node certificate for 127.0.0.1, the service and
/// admin client certificates, and a development token issuer.
#[allow(dead_code)] // not every test binary runs TLS
pub fn make_certs(dir: &std::path::Path) {
    use dossier_cli::certs::{self, Lifetimes};
    certs::create_ca(dir, Lifetimes::default(), false).unwrap();
    certs::create_node(dir, &["127.0.0.1".into()], Lifetimes::default(), false).unwrap();
    certs::create_client(dir, SERVICE_USER, "service", Lifetimes::default(), false).unwrap();
    certs::create_client(dir, ADMIN_USER, "admin", Lifetimes::default(), false).unwrap();
    dossier_cli::tokens::create_issuer(dir, false).unwrap();
}

/// Node settings for TLS from `dir` (made by `make_certs`) and its development tokens.
#[allow(dead_code)] // not every test binary runs TLS
pub fn secure(config: &mut NodeConfig, dir: &std::path::Path) {
    config.certs_dir = Some(dir.to_path_buf());
    config.token_jwks = Some(dir.join(dossier_cli::tokens::JWKS));
    config.token_issuer = dossier_cli::tokens::LOCAL_ISSUER.into();
    config.token_audience = dossier_cli::tokens::LOCAL_AUDIENCE.into();
}

/// An admin client of the node at `addr`, over TLS as `ADMIN_USER` of `certs_dir` when given.
pub async fn admin_at(
    certs_dir: Option<&std::path::Path>,
    addr: &str,
) -> Result<AdminClient<tonic::transport::Channel>, tonic::transport::Error> {
    let endpoint = match certs_dir {
        Some(dir) => dossier_client::ClientTls::from_certs_dir(dir, Some(ADMIN_USER))
            .unwrap()
            .endpoint(addr)?,
        None => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?,
    };
    Ok(AdminClient::new(endpoint.connect().await?))
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
}

impl TestCluster {
    /// Starts `n` nodes and initialises `shards` shards of `replicas` replicas.
    pub async fn start(
        n: u64,
        shards: u32,
        replicas: u32,
        tweak: &dyn Fn(&mut NodeConfig),
    ) -> TestCluster {
        // Clusters of one test binary run side by side on loopback with the same node ids: a
        // name of its own keeps a cluster from taking Raft traffic meant for another's node that
        // had the same port before.
        static CLUSTERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let name = format!(
            "test-{}",
            CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().unwrap();
        let mut nodes: Vec<TestNode> = (1..=n)
            .map(|id| TestNode::new(id, dir.path().join(format!("node-{id}")), tweak))
            .collect();
        for node in &mut nodes {
            node.config.cluster_name = name.clone();
            node.start();
        }
        let infos: Vec<NodeInfo> = nodes
            .iter()
            .map(|n| NodeInfo {
                node_id: n.id,
                address: n.grpc.clone(),
                zone: n.config.zone.clone(),
                ..NodeInfo::default()
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut admin = admin_at(nodes[0].config.certs_dir.as_deref(), &nodes[0].grpc).await;
            if let Ok(admin) = admin.as_mut() {
                let request = dossier_api::v1::InitClusterRequest {
                    nodes: infos.clone(),
                    shards,
                    replicas,
                };
                if admin.init_cluster(request).await.is_ok() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "cluster init did not complete");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let cluster = TestCluster { dir, nodes };
        cluster.wait_all_leaders(Duration::from_secs(30)).await;
        cluster
    }

    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.grpc.clone()).collect()
    }

    /// The certs directory the nodes serve TLS from, if they do.
    pub fn certs_dir(&self) -> Option<&std::path::Path> {
        self.nodes[0].config.certs_dir.as_deref()
    }

    /// A client configuration for this cluster: with TLS on, it presents `user`'s certificate
    /// (None: none, for callers with a token).
    pub fn client_config(&self, user: Option<&str>) -> ClientConfig {
        let mut config = ClientConfig::new(self.seeds());
        config.tls = self
            .certs_dir()
            .map(|d| dossier_client::ClientTls::from_certs_dir(d, user).unwrap());
        config.attempt_timeout = Duration::from_millis(700);
        config.deadline = Duration::from_secs(15);
        config
    }

    /// A client of the cluster's service (with TLS on, by its certificate).
    pub async fn client(&self) -> Client {
        self.client_as(SERVICE_USER).await
    }

    /// A client presenting `user`'s certificate (with TLS on).
    pub async fn client_as(&self, user: &str) -> Client {
        Client::connect(self.client_config(Some(user)))
            .await
            .unwrap()
    }

    pub async fn admin(&self, node: usize) -> AdminClient<tonic::transport::Channel> {
        admin_at(self.certs_dir(), &self.nodes[node].grpc)
            .await
            .unwrap()
    }

    /// Starts node `id` with `--join` (the cluster's nodes as seeds, its cluster name, then
    /// `tweak`) and waits up to 30 s until `client`'s map lists it.
    #[allow(dead_code)] // not every test binary adds nodes
    pub async fn join_node(
        &self,
        id: u64,
        client: &Client,
        tweak: &dyn Fn(&mut NodeConfig),
    ) -> TestNode {
        let name = self.nodes[0].config.cluster_name.clone();
        let seeds = self.seeds();
        let mut node = TestNode::new(id, self.dir.path().join(format!("n{id}")), &|c| {
            c.join = seeds.clone();
            c.cluster_name = name.clone();
            tweak(c);
        });
        node.start();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !client
            .refresh_map()
            .await
            .unwrap()
            .nodes
            .iter()
            .any(|n| n.node_id == id)
        {
            assert!(Instant::now() < deadline, "node {id} did not join");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        node
    }

    /// An admin client of the meta group's leader (waits up to 20 s for one).
    #[allow(dead_code)] // not every test binary changes the cluster's shape
    pub async fn meta_leader_admin(&self) -> AdminClient<tonic::transport::Channel> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let replicas = self.replicas().await;
            for (i, node) in self.nodes.iter().enumerate() {
                if node.runtime.is_some()
                    && replicas
                        .iter()
                        .any(|r| r.shard_id == 0 && r.role == "leader" && r.node_id == node.id)
                {
                    return self.admin(i).await;
                }
            }
            assert!(Instant::now() < deadline, "the meta group has no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Per (shard, node): (role, leader, applied index) from every running node.
    pub async fn replicas(&self) -> Vec<dossier_api::v1::ShardStatus> {
        let mut all = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.runtime.is_none() {
                continue;
            }
            let connect = admin_at(self.certs_dir(), &self.nodes[i].grpc);
            if let Ok(Ok(mut admin)) = tokio::time::timeout(Duration::from_secs(1), connect).await
                && let Ok(s) = admin
                    .node_status(dossier_api::v1::NodeStatusRequest::default())
                    .await
            {
                all.extend(s.into_inner().shards);
            }
        }
        all
    }

    /// The shard's leader: a restarted former leader may still believe it leads an old term, so
    /// of the replicas that say they lead, the one with the highest term.
    pub async fn leader_of(&self, shard: u64) -> Option<u64> {
        let replicas = self.replicas().await;
        replicas
            .into_iter()
            .filter(|r| r.shard_id == shard && r.role == "leader")
            .max_by_key(|r| r.term)
            .map(|r| r.node_id)
    }

    pub async fn wait_all_leaders(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let replicas = self.replicas().await;
            let shards: std::collections::BTreeSet<u64> =
                replicas.iter().map(|r| r.shard_id).collect();
            if !shards.is_empty()
                && shards.iter().all(|s| {
                    replicas
                        .iter()
                        .any(|r| r.shard_id == *s && r.role == "leader")
                })
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not every shard elected a leader: {replicas:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops (as SIGTERM would) a node that holds a replica of `shard` but does not lead it;
    /// returns its id and index.
    pub async fn stop_a_follower_of(&mut self, shard: u64) -> (u64, usize) {
        let leader = self.leader_of(shard).await.unwrap();
        let down = self
            .nodes
            .iter()
            .map(|n| n.id)
            .find(|id| *id != leader)
            .unwrap();
        let index = self.node_index(down);
        self.nodes[index].stop().await;
        (down, index)
    }

    pub fn node_index(&self, id: u64) -> usize {
        self.nodes.iter().position(|n| n.id == id).unwrap()
    }
}

/// A patient id whose shard is `shard` in `client`'s map.
pub fn patient_in_shard(client: &Client, shard: u64, salt: &str) -> String {
    let map = client.cluster_map().unwrap();
    let d = map
        .shards
        .iter()
        .find(|d| d.shard_id == shard)
        .unwrap()
        .clone();
    (0..)
        .map(|n| format!("{salt}-{n}"))
        .find(|p| {
            let h = dossier_api::patient_hash(p);
            h >= d.hash_lo && (d.hash_hi_max || h < d.hash_hi)
        })
        .unwrap()
}

pub fn shared<T>(v: T) -> Arc<T> {
    Arc::new(v)
}

/// The value of an unlabelled metric on a node's /metrics page (0 when absent, or while the
/// node does not listen yet).
pub async fn metric(node: &TestNode, name: &str) -> f64 {
    metrics_page(node)
        .await
        .lines()
        .find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0.0)
}

/// The node's `/metrics` page; empty when the node does not answer.
pub async fn metrics_page(node: &TestNode) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(node.config.http_listen).await else {
        return String::new();
    };
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).await.unwrap();
    page
}

/// A Patient record `id` holding the national numbers (INSZ) `insz`.
#[allow(dead_code)] // not every test binary registers patients
pub fn patient_with_insz(id: &str, insz: &[&str]) -> dossier_api::v1::Resource {
    use dossier_api::v1::{HumanName, Identifier, Meta, Patient, resource};
    use dossier_records::SYSTEM_INSZ;
    dossier_api::v1::Resource {
        unmodelled_json: String::new(),
        meta: Some(Meta {
            id: id.into(),
            ..Meta::default()
        }),
        kind: Some(resource::Kind::Patient(Patient {
            identifiers: insz
                .iter()
                .map(|v| Identifier {
                    system: SYSTEM_INSZ.into(),
                    value: (*v).into(),
                    r#type: None,
                })
                .collect(),
            names: vec![HumanName {
                family: "Janssens".into(),
                ..HumanName::default()
            }],
            ..Patient::default()
        })),
    }
}
