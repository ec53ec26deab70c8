//! The gRPC floor: the cheapest server that speaks the benchmark's key-value protocol.
//!
//! Three processes, each a tonic server (the same server stack and runtime as `dossier-node`)
//! answering etcd's KV `Put` and `Range` from an in-memory map: no replication, no disk, no
//! consensus. Driven by the same load generator and client as etcd, it measures what one gRPC
//! request costs on this machine, and so the most any tonic-served design could reach here: a
//! system that replicates and persists can only be slower.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::etcdpb::kv_server::{Kv, KvServer};
use super::etcdpb::{
    KeyValue, PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader,
};

#[derive(Debug, Default)]
struct MemoryKv {
    map: RwLock<HashMap<Vec<u8>, Vec<u8>>>,
}

#[tonic::async_trait]
impl Kv for MemoryKv {
    async fn range(
        &self,
        request: tonic::Request<RangeRequest>,
    ) -> Result<tonic::Response<RangeResponse>, tonic::Status> {
        let key = request.into_inner().key;
        let value = self
            .map
            .read()
            .map_err(|_| tonic::Status::internal("map lock poisoned"))?
            .get(&key)
            .cloned();
        let kvs = value
            .map(|value| KeyValue {
                key,
                value,
                ..KeyValue::default()
            })
            .into_iter()
            .collect::<Vec<_>>();
        Ok(tonic::Response::new(RangeResponse {
            header: Some(ResponseHeader::default()),
            count: kvs.len() as i64,
            kvs,
            more: false,
        }))
    }

    async fn put(
        &self,
        request: tonic::Request<PutRequest>,
    ) -> Result<tonic::Response<PutResponse>, tonic::Status> {
        let PutRequest { key, value, .. } = request.into_inner();
        self.map
            .write()
            .map_err(|_| tonic::Status::internal("map lock poisoned"))?
            .insert(key, value);
        Ok(tonic::Response::new(PutResponse {
            header: Some(ResponseHeader::default()),
            prev_kv: None,
        }))
    }
}

/// Serves the in-memory KV on `listen` until the process is killed; a runtime with one worker
/// per core, as `dossier-node` builds.
pub fn serve(listen: SocketAddr) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(KvServer::new(MemoryKv::default()))
            .serve(listen)
            .await
            .with_context(|| format!("serving the gRPC floor on {listen}"))
    })
}

/// Three floor servers (this executable, `floor-serve`), killed when dropped.
#[derive(Debug)]
pub struct FloorServers {
    children: Vec<Child>,
    pub endpoints: Vec<String>,
}

impl FloorServers {
    /// Starts three servers on `base_port`, +1, +2 and waits until each accepts connections.
    pub async fn start(base_port: u16) -> Result<FloorServers> {
        let exe = std::env::current_exe().context("locating dossier-bench")?;
        let mut servers = FloorServers {
            children: Vec::new(),
            endpoints: Vec::new(),
        };
        for i in 0..3u16 {
            let endpoint = format!("127.0.0.1:{}", base_port + i);
            let child = Command::new(&exe)
                .args(["floor-serve", "--listen", &endpoint])
                .stdin(Stdio::null())
                .spawn()
                .with_context(|| format!("starting a floor server on {endpoint}"))?;
            servers.children.push(child);
            servers.endpoints.push(endpoint);
        }
        for endpoint in &servers.endpoints {
            let started = Instant::now();
            while tokio::net::TcpStream::connect(endpoint).await.is_err() {
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(10),
                    "the floor server on {endpoint} did not accept connections within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(servers)
    }
}

impl Drop for FloorServers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
