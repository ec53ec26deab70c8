//! `dossier`: the Dossier admin command line. See `dossier --help`.

mod audit;
mod cluster;
mod kv;
mod patient;
mod playground;
mod playground_access;
mod token;

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use dossier_client::{Client, ClientConfig};

#[derive(Debug, Parser)]
#[command(
    name = "dossier",
    version,
    about = "Administer a Dossier cluster: init, status, key-value access, clinical records (FHIR R4 in and out), a local playground."
)]
struct Cli {
    /// Addresses (host:port) of one or more nodes, comma separated.
    #[arg(
        long,
        global = true,
        env = "DOSSIER_SEEDS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7000"
    )]
    seeds: Vec<String>,
    /// Deadline of each request, in milliseconds (retries included).
    #[arg(long, global = true, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Directory with the cluster's ca.crt (and client.USER.crt/.key for --user): talk to the
    /// nodes over TLS. Without it, plaintext (nodes run with --insecure).
    #[arg(long, global = true, env = "DOSSIER_CERTS_DIR")]
    certs_dir: Option<std::path::PathBuf>,
    /// The user whose client certificate (client.USER.crt in --certs-dir) identifies this caller.
    #[arg(long, global = true, env = "DOSSIER_USER")]
    user: Option<String>,
    /// A bearer token (a clinician's or patient's, from the identity provider or `dossier token
    /// issue`) sent with record commands instead of acting as --user.
    #[arg(long, global = true, env = "DOSSIER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Break the glass: open a patient's record without a care relationship, for this reason
    /// (a clinician's --token; the access is flagged for review).
    #[arg(long, global = true)]
    break_glass: Option<String>,
    /// TLS settings read from --certs-dir and --user.
    #[arg(skip)]
    tls: Option<dossier_client::ClientTls>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Cluster-wide operations.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Read and write a patient's keys.
    #[command(subcommand)]
    Kv(kv::KvCommand),
    /// Node maintenance.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Shard placement.
    #[command(subcommand)]
    Shard(ShardCommand),
    /// Clinical records of patients: create, read, history, everything, FHIR import and export.
    #[command(subcommand)]
    Patient(patient::PatientCommand),
    /// Start a local 3-node cluster, load demo patients, kill a leader under load, and show that
    /// nothing acknowledged was lost; then serve until Ctrl-C.
    Playground(playground::PlaygroundArgs),
    /// Certificates: the cluster's CA, node certificates, client certificates (docs/security.md).
    #[command(subcommand)]
    Cert(CertCommand),
    /// Patients' audit chains: verify them (docs/security.md).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Bearer tokens from a development identity provider (docs/security.md).
    #[command(subcommand)]
    Token(token::TokenCommand),
}

// The variants are the subcommands' names: create-ca, create-node, create-client.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Create the cluster's certificate authority: ca.crt (give it to every node and client) and
    /// ca.key (it signs the other certificates; keep it off the nodes).
    CreateCa {
        #[command(flatten)]
        common: CertArgs,
    },
    /// Create node.crt and node.key, signed by the CA in --certs-dir, valid for every HOST (DNS
    /// name or IP address) clients and peers reach the node at. Copy them with ca.crt to the node.
    CreateNode {
        /// Host names and addresses of the node, e.g. node-1.hospital.internal 10.0.0.11.
        #[arg(required = true)]
        hosts: Vec<String>,
        #[command(flatten)]
        common: CertArgs,
    },
    /// Create client.NAME.crt and client.NAME.key for user NAME with a role, signed by the CA in
    /// --certs-dir. Commands use it with --user NAME.
    CreateClient {
        /// The user name (a-z, 0-9, '.', '_', '-').
        name: String,
        /// admin (cluster operations, no clinical data), service (application services) or
        /// auditor. Clinicians and patients authenticate with bearer tokens (dossier token).
        #[arg(long)]
        role: String,
        /// Scope a service to these calls only (comma separated): records-read, records-write,
        /// patients-create, lookup, kv, access-log. Without: every call a service may make.
        #[arg(long, value_delimiter = ',')]
        grant: Vec<String>,
        #[command(flatten)]
        common: CertArgs,
    },
}

#[derive(Debug, clap::Args)]
struct CertArgs {
    /// Replace existing files.
    #[arg(long)]
    overwrite: bool,
    /// Validity of a new CA, in days.
    #[arg(long, default_value_t = 3653)]
    ca_days: i64,
    /// Validity of a new node or client certificate, in days.
    #[arg(long, default_value_t = 1826)]
    days: i64,
}

impl CertArgs {
    fn lifetimes(&self) -> Result<dossier_cli::certs::Lifetimes> {
        anyhow::ensure!(
            self.ca_days > 0 && self.days > 0,
            "validity must be at least one day"
        );
        Ok(dossier_cli::certs::Lifetimes {
            ca_days: self.ca_days,
            leaf_days: self.days,
        })
    }
}

fn cert(command: &CertCommand, certs_dir: Option<&std::path::Path>) -> Result<()> {
    use dossier_cli::certs;
    let Some(dir) = certs_dir else {
        anyhow::bail!("name the certificates' directory with --certs-dir (or DOSSIER_CERTS_DIR)");
    };
    let written = match command {
        CertCommand::CreateCa { common } => {
            certs::create_ca(dir, common.lifetimes()?, common.overwrite)?
        }
        CertCommand::CreateNode { hosts, common } => {
            certs::create_node(dir, hosts, common.lifetimes()?, common.overwrite)?
        }
        CertCommand::CreateClient {
            name,
            role,
            grant,
            common,
        } => certs::create_client_with_grants(
            dir,
            name,
            role,
            grant,
            common.lifetimes()?,
            common.overwrite,
        )?,
    };
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum ShardCommand {
    /// Move a shard's replica from one node to another: the target catches up as a learner,
    /// then takes the source's place among the voters; the source drops its copy. Sent to the
    /// meta group's leader (found through --seeds). Safe to repeat: an interrupted move is
    /// finished by running it again.
    Move {
        /// The shard id (see `dossier cluster status`).
        shard: u64,
        /// The node that holds the replica now.
        #[arg(long)]
        from: u64,
        /// The node that receives it (see `dossier node list`).
        #[arg(long)]
        to: u64,
    },
    /// Split a shard in two: it keeps the lower part of its hash range and a new shard, on the
    /// same nodes, takes the upper part from --at (default: the hash that leaves half of the
    /// shard's patients on each side). A patient's records never span two shards. Clients
    /// re-route by themselves. Safe to repeat: an interrupted split is finished, not repeated.
    Split {
        /// The shard id (see `dossier cluster status`).
        shard: u64,
        /// The first patient hash of the new shard (decimal), inside the shard's range.
        #[arg(long)]
        at: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Every node of the cluster map: id, address, zone, state, and the replicas and
    /// leaderships it holds (asked of every node; an unreachable one is marked).
    List,
    /// Hand every leadership the node holds to other replicas (before stopping it for
    /// maintenance); prints what moved and what stayed.
    Drain {
        /// The node's gRPC address (host:port).
        address: String,
    },
    /// Decommission a node: it is marked draining, the placement driver moves its replicas to
    /// other nodes one at a time (zones respected), its meta group vote goes to another node,
    /// and it ends removed; the command then waits until the node has moved the audit events of
    /// the reads it served from its journal to their chains, and only then says it may be
    /// stopped and its disk wiped. Refused when the other up nodes could not hold every shard's
    /// replicas. Waits and prints progress unless --no-wait; safe to repeat.
    Remove {
        /// The node id (see `dossier node list`).
        id: u64,
        /// Return once the node is marked draining.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the drain goes on); the audit-journal check
        /// that follows the removal gets at least 60 s, whatever is left.
        #[arg(long, default_value_t = 3600)]
        wait_secs: u64,
    },
}

async fn drain(address: &str, timeout_ms: u64) -> Result<()> {
    let channel = dossier_cli::ops::endpoint(address)?
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await?;
    let mut request = tonic::Request::new(dossier_api::v1::DrainRequest {});
    request.set_timeout(Duration::from_millis(timeout_ms));
    let r = dossier_api::v1::admin_client::AdminClient::new(channel)
        .drain(request)
        .await?
        .into_inner();
    println!("handed over: {:?}", r.transferred);
    if r.remaining.is_empty() {
        println!("the node leads no shard now");
    } else {
        println!(
            "still led by this node (no other replica took over in time): {:?}",
            r.remaining
        );
    }
    Ok(())
}

impl Cli {
    fn client_config(&self) -> Result<ClientConfig> {
        let mut config = ClientConfig::new(self.seeds.clone());
        config.deadline = Duration::from_millis(self.timeout_ms);
        config.tls = self.tls.clone();
        config.token = match &self.token {
            Some(t) => {
                anyhow::ensure!(
                    self.tls.is_some(),
                    "--token needs --certs-dir: a token never travels over plaintext"
                );
                Some(dossier_client::BearerToken::new(t)?)
            }
            None => None,
        };
        config.break_glass = self
            .break_glass
            .as_deref()
            .map(dossier_client::BreakGlass::new)
            .transpose()?;
        Ok(config)
    }

    /// Reads --certs-dir and --user into the TLS every connection of this command uses (not for
    /// `dossier cert`, which makes those files).
    fn load_tls(&mut self) -> Result<()> {
        if matches!(self.command, Command::Cert(_) | Command::Token(_)) {
            return Ok(());
        }
        let Some(dir) = &self.certs_dir else {
            anyhow::ensure!(
                self.user.is_none(),
                "--user needs --certs-dir, where its client certificate is"
            );
            return Ok(());
        };
        if let Some(user) = &self.user {
            dossier_cli::certs::check_user_name(user)?;
        }
        let tls = dossier_client::ClientTls::from_certs_dir(dir, self.user.as_deref())?;
        dossier_cli::ops::use_tls(tls.clone());
        self.tls = Some(tls);
        Ok(())
    }

    async fn client(&self) -> Result<Client> {
        Ok(Client::connect(self.client_config()?).await?)
    }
}

fn main() -> std::process::ExitCode {
    let mut cli = Cli::parse();
    if let Err(e) = cli.load_tls() {
        eprintln!("dossier: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dossier: failed to start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Cluster(c) => cluster::run(&cli, c).await,
            Command::Kv(c) => kv::run(&cli, c).await,
            Command::Patient(c) => patient::run(&cli, c).await,
            Command::Node(NodeCommand::Drain { address }) => drain(address, cli.timeout_ms).await,
            Command::Shard(ShardCommand::Move { shard, from, to }) => {
                let started = std::time::Instant::now();
                let d = dossier_cli::elastic::move_replica(&cli.seeds, *shard, *from, *to).await?;
                println!(
                    "shard {} moved from node {from} to node {to} in {:.2?}: replicas {:?}, epoch {}",
                    d.shard_id,
                    started.elapsed(),
                    d.replicas,
                    d.epoch
                );
                Ok(())
            }
            Command::Node(NodeCommand::Remove {
                id,
                no_wait,
                wait_secs,
            }) => {
                let started = std::time::Instant::now();
                dossier_cli::elastic::remove_node(&cli.seeds, *id).await?;
                println!("node {id} is draining: its replicas move to other nodes");
                if !*no_wait {
                    let limit = Duration::from_secs(*wait_secs);
                    let map = dossier_cli::elastic::wait_removed(&cli.seeds, *id, limit).await?;
                    println!(
                        "node {id} removed in {:.1?}: it holds no replica",
                        started.elapsed()
                    );
                    // The removed node's journal may still hold audit events of reads it served.
                    let address = map
                        .nodes
                        .iter()
                        .find(|n| n.node_id == *id)
                        .map(|n| n.address.clone())
                        .unwrap_or_default();
                    // Its own time, whatever the drain took of --wait-secs.
                    let left = limit
                        .saturating_sub(started.elapsed())
                        .max(Duration::from_secs(60));
                    let client =
                        dossier_cli::ops::admin_client(&address, Duration::from_secs(30))?;
                    use dossier_cli::elastic::AuditJournal;
                    let unchecked = |why: String| {
                        anyhow::anyhow!(
                            "node {id} is removed, but {why}: its disk may still hold audit events of the reads it served; do not wipe it until, running, it reports an audit backlog of 0 (dossier_audit_backlog on its /metrics page)"
                        )
                    };
                    match dossier_cli::elastic::wait_audit_moved(client, *id, left).await {
                        Ok(AuditJournal::Empty) => println!(
                            "node {id}'s audit journal is empty: it may be stopped and its disk wiped"
                        ),
                        Ok(AuditJournal::Unreachable(e)) => {
                            return Err(unchecked(format!("it did not answer ({e})")));
                        }
                        Ok(AuditJournal::Unreported) => {
                            return Err(unchecked(
                                "its version does not report its audit backlog".into(),
                            ));
                        }
                        Err(e) => anyhow::bail!(
                            "{e:#}\nnode {id} is removed, but its disk may still hold audit events of the reads it served: do not wipe it yet"
                        ),
                    }
                }
                Ok(())
            }
            Command::Shard(ShardCommand::Split { shard, at }) => {
                let started = std::time::Instant::now();
                let (left, right) =
                    dossier_cli::elastic::split_shard(&cli.seeds, *shard, at.unwrap_or(0)).await?;
                println!(
                    "shard {} split in {:.2?}: shard {} keeps [{}, {}) (epoch {}), shard {} takes [{}, {}) on nodes {:?}",
                    left.shard_id,
                    started.elapsed(),
                    left.shard_id,
                    left.hash_lo,
                    left.hash_hi,
                    left.epoch,
                    right.shard_id,
                    right.hash_lo,
                    if right.hash_hi_max { "end".to_owned() } else { right.hash_hi.to_string() },
                    right.replicas
                );
                Ok(())
            }
            Command::Node(NodeCommand::List) => {
                let status = dossier_cli::ops::status(&cli.seeds, false).await?;
                dossier_cli::ops::print_nodes(&status);
                Ok(())
            }
            Command::Playground(args) => playground::run(args).await,
            Command::Cert(c) => cert(c, cli.certs_dir.as_deref()),
            Command::Token(c) => token::run(c, cli.certs_dir.as_deref()),
            Command::Audit(c) => audit::run(&cli, c).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dossier: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
