//! `dossier cluster init | status`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use dossier_api::v1::NodeInfo;
use dossier_cli::ops;

use crate::Cli;

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Initialise a fresh cluster: the meta group on the given nodes, then `--shards` shards of
    /// `--replicas` replicas, leaders spread over the nodes. Sent to the first node.
    Init {
        /// The cluster's nodes as id=host:port, comma separated (e.g. 1=127.0.0.1:7001,2=...);
        /// `id=host:port@zone` also names the node's zone (data centre, site).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        #[arg(long, default_value_t = 8)]
        shards: u32,
        #[arg(long, default_value_t = 3)]
        replicas: u32,
    },
    /// Show nodes and shards: leader, term, applied index and lag per shard, disk use.
    Status {
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
        /// Also count each shard's keys: a scan of every replica, slow on large shards.
        #[arg(long)]
        keys: bool,
    },
}

fn parse_nodes(specs: &[String]) -> Result<Vec<NodeInfo>> {
    specs
        .iter()
        .map(|spec| {
            let (id, addr) = spec
                .split_once('=')
                .with_context(|| format!("node {spec:?} is not id=host:port[@zone]"))?;
            let (addr, zone) = addr.split_once('@').unwrap_or((addr, ""));
            let node_id: u64 = id
                .parse()
                .with_context(|| format!("node id {id:?} is not a number"))?;
            if node_id == 0 {
                bail!("node ids start at 1");
            }
            Ok(NodeInfo {
                node_id,
                address: addr.to_owned(),
                zone: zone.to_owned(),
                ..NodeInfo::default()
            })
        })
        .collect()
}

pub async fn run(cli: &Cli, command: &ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Init {
            nodes,
            shards,
            replicas,
        } => {
            let nodes = parse_nodes(nodes)?;
            let map = ops::init(
                nodes,
                *shards,
                *replicas,
                Duration::from_millis(cli.timeout_ms.max(15_000)),
            )
            .await?;
            println!(
                "initialised: {} nodes, {} shards",
                map.nodes.len(),
                map.shards.len()
            );
        }
        ClusterCommand::Status { json, keys } => {
            let s = ops::status(&cli.seeds, *keys).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&ops::status_json(&s))?);
            } else {
                ops::print_status(&s);
            }
        }
    }
    Ok(())
}
