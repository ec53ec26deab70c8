//! Founding a cluster: `Admin.InitCluster` (the meta group on the listed nodes, then the first
//! map) and a lone node's auto-init.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dossier_api::v1::{ClusterMap, NodeInfo};
use dossier_raft::openraft::BasicNode;
use dossier_storage::{Batch, Command, Condition, Expect, Op};
use tracing::info;

use crate::errors::ApiError;
use crate::meta::{self, META_SHARD};
use crate::node::{Node, leader_of};

impl Node {
    /// Initialises a fresh cluster: the meta group on `nodes` (this node among them), then the map
    /// of `shards` shards with `replicas` replicas. Idempotent: an existing map is returned.
    pub async fn init_cluster(
        &self,
        nodes: Vec<NodeInfo>,
        shards: u32,
        replicas: u32,
    ) -> Result<ClusterMap, ApiError> {
        if let Some(map) = self.refresh_map() {
            return Ok(map);
        }
        if nodes.is_empty() {
            return Err(ApiError::invalid("nodes", "at least one node is needed"));
        }
        if !(1..=1024).contains(&shards) {
            return Err(ApiError::InvalidArgument {
                field: "shards".into(),
                message: "must be within 1..1024".into(),
                limit: Some(1024),
            });
        }
        if replicas == 0 || replicas as usize > nodes.len() {
            return Err(ApiError::invalid(
                "replicas",
                format!("must be within 1..{} (the node count)", nodes.len()),
            ));
        }
        let mut ids: Vec<u64> = nodes.iter().map(|n| n.node_id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != nodes.len()
            || ids.contains(&0)
            || nodes.iter().any(|n| n.address.is_empty())
        {
            return Err(ApiError::invalid(
                "nodes",
                "node ids must be unique and non-zero, addresses set",
            ));
        }
        if !ids.contains(&self.node_id()) {
            return Err(ApiError::invalid(
                "nodes",
                format!("must include this node ({})", self.node_id()),
            ));
        }
        let nodes = self.learn_peer_addresses(nodes).await?;
        let meta = self
            .group(META_SHARD)
            .ok_or(ApiError::shard_not_found(META_SHARD))?;
        let members: BTreeMap<u64, BasicNode> = nodes
            .iter()
            .map(|n| (n.node_id, BasicNode::new(meta::peer_of(n))))
            .collect();
        if let Err(e) = meta.initialize(members).await {
            // Already initialised (a retry): carry on and write the map if it is missing.
            info!(error = %e, "meta group initialisation refused");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while leader_of(&meta).is_none() {
            if Instant::now() > deadline {
                return Err(ApiError::Unavailable(
                    "the meta group elected no leader within 10 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let plan = meta::plan(&nodes, shards, replicas);
        let batch = Batch {
            conditions: vec![Condition {
                key: meta::MAP_KEY.into(),
                expect: Expect::Absent,
            }],
            ops: vec![Op::Put {
                key: meta::MAP_KEY.into(),
                value: meta::encode(&plan).into(),
            }],
        };
        self.write(
            META_SHARD,
            Command::Txn {
                session: None,
                batch,
            },
            Duration::from_secs(10),
        )
        .await?;
        self.reconcile()
            .await
            .map_err(|e| ApiError::Unavailable(format!("{e:#}")))?;
        self.map()
            .ok_or_else(|| ApiError::ClusterState("the map is not applied here yet; retry".into()))
    }

    /// Initialises a single-node cluster if this node has never been part of one.
    pub async fn auto_init(&self) -> Result<()> {
        let meta = self.group(META_SHARD).context("meta group")?;
        if meta.is_initialized().await? {
            return Ok(());
        }
        let me = NodeInfo {
            node_id: self.node_id(),
            address: self.config.advertise.clone(),
            zone: self.config.node.zone.clone(),
            peer_address: self.config.own_peer_address(),
            ..NodeInfo::default()
        };
        let map = self
            .init_cluster(vec![me], self.config.node.auto_init_shards, 1)
            .await
            .map_err(|e| anyhow::anyhow!("auto-init: {e}"))?;
        info!(
            shards = map.shards.len(),
            "initialised a single-node cluster"
        );
        Ok(())
    }
}
