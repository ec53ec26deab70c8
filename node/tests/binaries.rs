//! The real binaries: three `dossier-node` processes on loopback, `init`, writes, `kill -9` of a
//! shard leader under writes, and every acknowledged write read back afterwards.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dossier_api::v1::admin_client::AdminClient;
use dossier_api::v1::{InitClusterRequest, NodeInfo, NodeStatusRequest};
use dossier_client::{Client, ClientConfig};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(id: u64, grpc: &str, dir: &std::path::Path) -> Proc {
    let log = std::fs::File::create(dir.join(format!("node-{id}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_dossier-node"))
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
        .arg("--no-auto-init")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

/// SIGKILL of a shard leader while writes flow loses no acknowledged write, and the shard serves
/// again within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_leader_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut procs: Vec<Option<Proc>> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| Some(spawn(i as u64 + 1, a, dir.path())))
        .collect();
    let nodes: Vec<NodeInfo> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| NodeInfo {
            node_id: i as u64 + 1,
            address: a.clone(),
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut admin) = AdminClient::connect(format!("http://{}", addrs[0])).await
            && admin
                .init_cluster(InitClusterRequest {
                    nodes: nodes.clone(),
                    shards: 2,
                    replicas: 3,
                })
                .await
                .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "init failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut config = ClientConfig::new(addrs.clone());
    config.attempt_timeout = Duration::from_millis(700);
    config.deadline = Duration::from_secs(20);
    let client = Client::connect(config).await.unwrap();
    let mut acked = Vec::new();
    for i in 0..100u32 {
        client
            .put(
                &format!("patient-{}", i % 10),
                format!("obs/{i:04}").as_bytes(),
                &i.to_le_bytes(),
            )
            .await
            .unwrap();
        acked.push(i);
    }
    // Find shard 1's leader and kill -9 it.
    // Of the replicas that say they lead, the highest term is the real leader.
    let mut leader: Option<(u64, u64)> = None;
    for a in &addrs {
        let status = AdminClient::connect(format!("http://{a}"))
            .await
            .unwrap()
            .node_status(NodeStatusRequest {})
            .await
            .unwrap();
        for s in status
            .into_inner()
            .shards
            .iter()
            .filter(|s| s.shard_id == 1 && s.role == "leader")
        {
            if leader.is_none_or(|(_, term)| s.term > term) {
                leader = Some((s.node_id, s.term));
            }
        }
    }
    let leader = leader.map(|(id, _)| id);
    let leader = leader.expect("shard 1 has a leader") as usize;
    let victim = procs[leader - 1].take().unwrap();
    kill(Pid::from_raw(victim.0.id() as i32), Signal::SIGKILL).unwrap();
    drop(victim);
    for i in 100..160u32 {
        client
            .put(
                &format!("patient-{}", i % 10),
                format!("obs/{i:04}").as_bytes(),
                &i.to_le_bytes(),
            )
            .await
            .unwrap();
        acked.push(i);
    }
    for i in acked {
        let got = client
            .get(
                &format!("patient-{}", i % 10),
                format!("obs/{i:04}").as_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&i.to_le_bytes()[..]),
            "acknowledged write {i} lost"
        );
    }
}
