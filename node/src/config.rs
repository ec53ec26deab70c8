//! `dossier-node` configuration: embedded defaults, then a TOML file, then `DOSSIER_*` environment
//! variables and command-line flags (flags win). Validated once at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use dossier_raft::RaftConfig;
use dossier_storage::{LogConfig, StoreConfig};
use serde::Deserialize;

/// Request limits, enforced with typed errors (INVALID_ARGUMENT naming the field and limit,
/// RESOURCE_EXHAUSTED when the node is saturated).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Limits {
    /// No longer used: every service applies the one patient-id rule of the record layer
    /// (`[A-Za-z0-9.-]{1,64}`). Still accepted so that older configuration files load.
    pub patient_id_bytes_max: usize,
    /// Requests executing at once on this node; more are refused, never queued without bound.
    pub in_flight_max: usize,
    /// Deadline of a request that brings none (or a longer one), in milliseconds.
    pub request_deadline_ms: u64,
    /// Most keys one scan page returns.
    pub scan_page_max: u32,
    /// Most bytes of keys and values one scan page returns (a page holds at least one item).
    pub scan_page_bytes_max: usize,
    /// Largest request message a public service decodes, in bytes; a larger one is refused
    /// before it is read whole.
    pub request_bytes_max: usize,
    /// Most items in one `Kv.Bundle`; each item also takes its own in-flight slot.
    pub bundle_items_max: usize,
    /// An exactly-once session unused for this many log entries of its shard is forgotten (a
    /// retry after that is refused, never re-applied). Bounds each shard's session table; keep it
    /// far above the entries a shard commits during a client's longest retry window.
    pub session_idle_entries: u64,
    /// Calls a second each clinician and each patient (one identity: a token's subject) may
    /// make to this node, on average; 0: no limit. Services, operators and auditors are not
    /// limited by it. Only with TLS (callers are known).
    pub person_calls_per_second: u32,
    /// Calls such a caller may make at once before its rate applies.
    pub person_calls_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            patient_id_bytes_max: 128,
            in_flight_max: 4096,
            request_deadline_ms: 5_000,
            scan_page_max: 1_000,
            scan_page_bytes_max: 4 << 20,
            request_bytes_max: 16 << 20,
            bundle_items_max: 1_024,
            session_idle_entries: 1_000_000,
            person_calls_per_second: 50,
            person_calls_burst: 200,
        }
    }
}

/// Bounds of the clinical records layer (docs/schema.md §9).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RecordsConfig {
    /// Free text of a record (notes, descriptions, dosage text), in bytes.
    pub text_bytes_max: usize,
    /// Inline document content of a DocumentReference, in bytes.
    pub document_bytes_max: usize,
    /// The verbatim JSON of a record's source elements Dossier does not model
    /// (`Resource.unmodelled_json`), in bytes.
    pub unmodelled_bytes_max: usize,
    /// Items in any repeated field of a record.
    pub repeated_items_max: usize,
    /// Entries of one transaction.
    pub transaction_entries_max: usize,
    /// Versions in one History page.
    pub history_page_max: u32,
    /// Bytes of resources in one History page or Everything message.
    pub message_bytes_max: usize,
    /// Times a write is rebuilt when another write of the same patient committed in between.
    pub write_attempts_max: u32,
    /// Identifier systems of the master patient index: no two patients hold the same
    /// identifier of these systems, and LookupIdentifier finds the holder.
    pub indexed_identifier_systems: Vec<String>,
    /// How long a claim on an identifier whose patient write never came blocks other claimants,
    /// in milliseconds (above the request deadline: a slow but live write is not revoked).
    pub mpi_claim_grace_ms: u64,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        RecordsConfig {
            text_bytes_max: 64 * 1024,
            document_bytes_max: 512 * 1024,
            unmodelled_bytes_max: 64 * 1024,
            repeated_items_max: 256,
            transaction_entries_max: 128,
            history_page_max: 100,
            message_bytes_max: 1024 * 1024,
            write_attempts_max: 8,
            indexed_identifier_systems: vec![dossier_records::SYSTEM_INSZ.to_owned()],
            mpi_claim_grace_ms: 30_000,
        }
    }
}

/// The whole configuration of a node, as in `docs/config-template.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    /// This node's id, unique in the cluster, not 0.
    pub node_id: u64,
    /// Address of the gRPC endpoint: the public services (Kv, Records, Admin), and the internal
    /// ones (Raft, ShardAccess) unless `peer-listen` is set.
    pub listen: SocketAddr,
    /// Address other nodes and clients use to reach this node (default: `listen`).
    pub advertise: Option<String>,
    /// Address of a separate peer endpoint serving only the internal services (Raft,
    /// ShardAccess); with TLS it admits only callers presenting a node certificate of the
    /// cluster's CA. Unset: the internal services share `listen`. Chosen when the node first
    /// joins or founds the cluster: peers learn it from the cluster map.
    pub peer_listen: Option<SocketAddr>,
    /// Address peers use to reach `peer-listen` (default: `peer-listen`).
    pub peer_advertise: Option<String>,
    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz).
    pub http_listen: SocketAddr,
    /// Directory of everything this node stores (log, state, snapshots).
    pub data_dir: PathBuf,
    /// Name of the cluster, the same on all its nodes: every Raft message names the cluster and
    /// the node it is meant for, and a node refuses one meant for another.
    pub cluster_name: String,
    /// Initialise a single-node cluster by itself when none exists (the embedded default for
    /// trying Dossier). Turn off for nodes of a multi-node cluster, then run `dossier cluster init`.
    pub auto_init: bool,
    /// Shards of a self-initialised single-node cluster.
    pub auto_init_shards: u32,
    /// Threads of the async runtime (0: one per CPU core).
    pub worker_threads: usize,
    /// The node's failure domain (data centre, site), carried in the cluster map; empty: none.
    pub zone: String,
    /// Join as a standby node: it holds only warm-standby replicas (non-voting learners, one of
    /// every shard per standby zone) for a disaster-recovery or reporting site, never votes or
    /// leads, and answers stale reads. Takes effect when the node joins (with `join`).
    pub standby: bool,
    /// Nodes of an existing cluster (`host:port`) to join at start: the node asks them to add it
    /// to the map (the meta leader answers). Implies no auto-init. Ignored once the node is a
    /// member (it has cluster state).
    pub join: Vec<String>,
    /// Origins (`scheme://host[:port]`) of browser applications allowed to call the public
    /// services with gRPC-Web on `listen` (CORS); `"*"` allows any. gRPC-Web itself is always
    /// served; with no origin listed, browsers refuse the answers to pages of other origins.
    pub web_allowed_origins: Vec<String>,
    /// Directory of the node's certificates (`ca.crt`, `node.crt`, `node.key`; made by `dossier
    /// cert`): the gRPC port serves TLS, and peers are called over TLS with `node.crt`.
    pub certs_dir: Option<PathBuf>,
    /// Serve and call peers without TLS, on purpose (development only). Without `certs-dir` the
    /// node runs without TLS either way, and warns at start unless this is set.
    pub insecure: bool,
    /// The identity provider's public keys (a JWKS file, `{"keys": [...]}`): callers may then
    /// authenticate with `authorization: Bearer <JWT>` signed by one of them (clinicians and
    /// patients). Needs `certs-dir`, `token-issuer` and `token-audience`.
    pub token_jwks: Option<PathBuf>,
    /// The `iss` every bearer token must carry.
    pub token_issuer: String,
    /// The `aud` every bearer token must carry (this cluster's name at the identity provider).
    pub token_audience: String,
    /// While this node leads the meta group, move replicas and preferred leaders so that up nodes
    /// hold even shares and a shard's replicas sit in distinct zones (`node/src/balance.rs`).
    /// A cluster-wide policy: set it alike on every node. Draining a node being removed happens
    /// either way.
    pub placement_balance: bool,
    /// A shard led here whose data passes this many bytes is split in two at its middle
    /// patient (0: never by size). Measured after every eighth of it written.
    pub split_shard_bytes: u64,
    /// A shard led here that applies more than this many commands per second over three checks
    /// in a row (30 s) is split in two (0: never by write rate).
    pub split_writes_per_second: u64,
    /// UNSAFE, for testing the fault harness only: serve linearizable reads from whichever
    /// replica receives them, without a read barrier. Breaks linearizability on purpose so that
    /// `dossier-jepsen` can show it detects stale reads. Never enable it in production.
    pub unsafe_stale_reads_for_testing: bool,
    pub raft: RaftConfig,
    pub limits: Limits,
    pub records: RecordsConfig,
    /// Log engine limits; its `dir` is ignored (always `data-dir/log`).
    pub log: LogConfig,
    /// State store limits; its `dir` is ignored (always `data-dir/state`).
    pub state: StoreConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            advertise: None,
            peer_listen: None,
            peer_advertise: None,
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            data_dir: PathBuf::from("dossier-data"),
            cluster_name: "dossier".to_owned(),
            auto_init: true,
            auto_init_shards: 4,
            worker_threads: 0,
            zone: String::new(),
            standby: false,
            join: Vec::new(),
            web_allowed_origins: Vec::new(),
            certs_dir: None,
            insecure: false,
            token_jwks: None,
            token_issuer: String::new(),
            token_audience: String::new(),
            placement_balance: true,
            split_shard_bytes: 512 << 20,
            split_writes_per_second: 0,
            unsafe_stale_reads_for_testing: false,
            raft: RaftConfig::default(),
            limits: Limits::default(),
            records: RecordsConfig::default(),
            log: LogConfig::default(),
            state: StoreConfig::default(),
        }
    }
}

/// A validated configuration with derived paths.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: NodeConfig,
    pub advertise: String,
    /// Where peers reach this node's internal services: `peer-advertise`, `peer-listen`, or
    /// `advertise` when they share the client port.
    pub peer_advertise: String,
    pub log: Arc<LogConfig>,
    pub state: Arc<StoreConfig>,
    pub raft: Arc<dossier_raft::openraft::Config>,
    /// Loaded from `certs-dir`; None: no TLS.
    pub tls: Option<Arc<crate::tls::NodeTls>>,
    /// Loaded from `token-jwks`; None: no bearer tokens accepted.
    pub tokens: Option<Arc<crate::authn::TokenVerifier>>,
}

impl Config {
    /// The peer address this node writes into the cluster map: empty when its internal services
    /// share its client address.
    pub fn own_peer_address(&self) -> String {
        if self.peer_advertise == self.advertise {
            String::new()
        } else {
            self.peer_advertise.clone()
        }
    }

    pub fn request_deadline(&self) -> Duration {
        Duration::from_millis(self.node.limits.request_deadline_ms)
    }

    pub fn snapshot_root(&self) -> PathBuf {
        self.node.data_dir.join("snapshots")
    }
}

impl NodeConfig {
    /// Checks every field and the relations between them; messages name the field.
    pub fn validate(self) -> Result<Arc<Config>> {
        ensure!(self.node_id != 0, "node-id must not be 0");
        ensure!(
            !self.cluster_name.is_empty()
                && self.cluster_name.bytes().all(|b| b.is_ascii_graphic()),
            "cluster-name must be non-empty printable ASCII without spaces (it travels in a \
             header of every Raft message), is {:?}",
            self.cluster_name
        );
        ensure!(
            !(self.standby && self.auto_init && self.join.is_empty()),
            "standby needs join (or no auto-init): a standby node cannot start a cluster of its own"
        );
        ensure!(
            self.zone.len() <= 64 && self.zone.bytes().all(|b| b.is_ascii_graphic()),
            "zone must be at most 64 printable ASCII characters without spaces, is {:?}",
            self.zone
        );
        for seed in &self.join {
            ensure!(
                seed.rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()),
                "join: {seed:?} is not host:port"
            );
        }
        for origin in &self.web_allowed_origins {
            ensure!(
                origin == "*"
                    || origin
                        .strip_prefix("https://")
                        .or_else(|| origin.strip_prefix("http://"))
                        .is_some_and(|host| !host.is_empty() && !host.contains('/'))
                        && http::HeaderValue::from_str(origin).is_ok(),
                "web-allowed-origins: {origin:?} is not an origin (scheme://host[:port], no path, \
                 no trailing slash) nor \"*\""
            );
        }
        ensure!(
            self.listen != self.http_listen,
            "listen and http-listen must differ, both are {}",
            self.listen
        );
        if let Some(peer) = self.peer_listen {
            ensure!(
                peer != self.listen && peer != self.http_listen,
                "peer-listen ({peer}) must differ from listen and http-listen"
            );
        }
        ensure!(
            self.peer_advertise.is_none() || self.peer_listen.is_some(),
            "peer-advertise needs peer-listen"
        );
        let r = &self.raft;
        if r.election_timeout_min_ms <= 3 * r.heartbeat_interval_ms {
            bail!(
                "raft.election-timeout-min-ms ({}) must be more than 3 x raft.heartbeat-interval-ms ({}), \
                 or a few delayed heartbeats start elections",
                r.election_timeout_min_ms,
                r.heartbeat_interval_ms
            );
        }
        ensure!(
            r.election_timeout_max_ms > r.election_timeout_min_ms,
            "raft.election-timeout-max-ms ({}) must be above raft.election-timeout-min-ms ({})",
            r.election_timeout_max_ms,
            r.election_timeout_min_ms
        );
        // Quiescence's default follows election timeouts raised above its reach: a config that
        // raises them without naming quiesce-after-ms stays valid (and quiescent).
        ensure!(
            r.quiescence_ms() == 0
                || r.quiescence_ms() >= r.election_timeout_max_ms.saturating_mul(2),
            "raft.quiesce-after-ms ({}) must be 0 (off) or at least twice raft.election-timeout-max-ms ({})",
            r.quiescence_ms(),
            r.election_timeout_max_ms
        );
        ensure!(
            r.read_lease_margin_ms < r.election_timeout_max_ms,
            "raft.read-lease-margin-ms ({}) must be below raft.election-timeout-max-ms ({}), the \
             leader lease it shortens",
            r.read_lease_margin_ms,
            r.election_timeout_max_ms
        );
        ensure!(
            (64 << 10..=32 << 20).contains(&r.append_bytes_max),
            "raft.append-bytes-max must be within 64 KiB..32 MiB (one append-entries message), is {}",
            r.append_bytes_max
        );
        ensure!(
            self.log.entry_bytes_max <= 32 << 20,
            "log.entry-bytes-max must be at most 32 MiB (one entry must fit one Raft message), is {}",
            self.log.entry_bytes_max
        );
        ensure!(
            (1..=1024).contains(&self.auto_init_shards),
            "auto-init-shards must be within 1..1024, is {}",
            self.auto_init_shards
        );
        let rc = &self.records;
        for (name, value) in [
            ("records.text-bytes-max", rc.text_bytes_max),
            ("records.document-bytes-max", rc.document_bytes_max),
            ("records.unmodelled-bytes-max", rc.unmodelled_bytes_max),
            ("records.repeated-items-max", rc.repeated_items_max),
            (
                "records.transaction-entries-max",
                rc.transaction_entries_max,
            ),
            ("records.history-page-max", rc.history_page_max as usize),
            ("records.message-bytes-max", rc.message_bytes_max),
            ("records.write-attempts-max", rc.write_attempts_max as usize),
        ] {
            ensure!(value > 0, "{name} must be at least 1");
        }
        for system in &rc.indexed_identifier_systems {
            ensure!(
                !system.is_empty()
                    && !system.contains('|')
                    && !system.contains(char::is_whitespace),
                "records.indexed-identifier-systems: {system:?} must be a URI without '|' or white space"
            );
        }
        ensure!(
            rc.mpi_claim_grace_ms > self.limits.request_deadline_ms,
            "records.mpi-claim-grace-ms ({}) must be above limits.request-deadline-ms ({})",
            rc.mpi_claim_grace_ms,
            self.limits.request_deadline_ms
        );
        ensure!(
            rc.document_bytes_max < self.state.value_bytes_max,
            "records.document-bytes-max ({}) must be below state.value-bytes-max ({}): a version \
             holds its document",
            rc.document_bytes_max,
            self.state.value_bytes_max
        );
        let l = &self.limits;
        ensure!(
            l.in_flight_max > 0,
            "limits.in-flight-max must be at least 1"
        );
        ensure!(
            (10..=600_000).contains(&l.request_deadline_ms),
            "limits.request-deadline-ms must be within 10..600000"
        );
        ensure!(
            l.scan_page_max > 0,
            "limits.scan-page-max must be at least 1"
        );
        ensure!(
            (64 << 10..=64 << 20).contains(&l.scan_page_bytes_max),
            "limits.scan-page-bytes-max must be within 64 KiB..64 MiB, is {}",
            l.scan_page_bytes_max
        );
        ensure!(
            (1 << 20..=256 << 20).contains(&l.request_bytes_max),
            "limits.request-bytes-max must be within 1 MiB..256 MiB, is {}",
            l.request_bytes_max
        );
        ensure!(
            (32..=65_536).contains(&l.bundle_items_max),
            "limits.bundle-items-max must be within 32..65536 (the client library sends bundles of \
             up to 32 items)"
        );
        ensure!(
            l.session_idle_entries >= 10_000,
            "limits.session-idle-entries must be at least 10000"
        );
        let advertise = self
            .advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string());
        let peer_advertise = match (&self.peer_advertise, self.peer_listen) {
            (Some(a), _) => a.clone(),
            (None, Some(peer)) => peer.to_string(),
            (None, None) => advertise.clone(),
        };
        let log = LogConfig {
            dir: self.data_dir.join("log"),
            ..self.log.clone()
        }
        .validate()
        .context("invalid [log] section")?;
        let state = StoreConfig {
            dir: self.data_dir.join("state"),
            ..self.state.clone()
        }
        .validate()
        .context("invalid [state] section")?;
        let raft = self
            .raft
            .openraft(&self.cluster_name)
            .context("invalid [raft] section")?;
        ensure!(
            !(self.insecure && self.certs_dir.is_some()),
            "insecure and certs-dir contradict each other: pick one"
        );
        let tls = match &self.certs_dir {
            Some(dir) => Some(Arc::new(
                crate::tls::NodeTls::load(dir).context("certs-dir")?,
            )),
            None => None,
        };
        let tokens = match &self.token_jwks {
            Some(jwks) => {
                ensure!(
                    tls.is_some(),
                    "token-jwks needs certs-dir: bearer tokens are never accepted over plaintext"
                );
                Some(Arc::new(
                    crate::authn::TokenVerifier::load(
                        jwks,
                        &self.token_issuer,
                        &self.token_audience,
                    )
                    .context("token-jwks")?,
                ))
            }
            None => None,
        };
        Ok(Arc::new(Config {
            node: self,
            advertise,
            peer_advertise,
            log,
            state,
            raft,
            tls,
            tokens,
        }))
    }
}

/// Command-line flags; each also reads a `DOSSIER_*` environment variable. Unset ones leave the
/// file's (or the embedded default's) value.
#[derive(Debug, Parser)]
#[command(
    name = "dossier-node",
    version,
    about = "The Dossier server: a Raft-replicated, patient-sharded store for the shared patient record.",
    long_about = "The Dossier server.\n\nWith no configuration at all it runs a single-node cluster in ./dossier-data, \
                  initialising itself (auto-init), like etcd with no flags. For a multi-node cluster, start every \
                  node with --no-auto-init and its own --node-id, --listen, --http-listen and --data-dir, then run \
                  `dossier cluster init`. Precedence: flags > DOSSIER_* environment > --config file > defaults."
)]
pub struct Flags {
    /// TOML configuration file (see docs/config-template.toml).
    #[arg(long, env = "DOSSIER_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id: unique in the cluster, not 0.
    #[arg(long, env = "DOSSIER_NODE_ID")]
    pub node_id: Option<u64>,
    /// gRPC listen address (public Kv, Records and Admin services; the internal Raft and
    /// ShardAccess services too unless --peer-listen is given).
    #[arg(long, env = "DOSSIER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address peers and clients use to reach this node (default: the listen address).
    #[arg(long, env = "DOSSIER_ADVERTISE")]
    pub advertise: Option<String>,
    /// Serve the internal services (Raft, ShardAccess) on this separate address only; with TLS
    /// it admits node certificates of the cluster's CA only. Set it when the node first starts
    /// (founding or joining the cluster): peers learn it from the cluster map.
    #[arg(long, env = "DOSSIER_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Address peers use to reach --peer-listen (default: --peer-listen).
    #[arg(long, env = "DOSSIER_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// HTTP listen address for /metrics, /healthz and /readyz.
    #[arg(long, env = "DOSSIER_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Data directory (log, state, snapshots).
    #[arg(long, env = "DOSSIER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The node's failure domain (data centre, site), e.g. `dc-east`.
    #[arg(long, env = "DOSSIER_ZONE")]
    pub zone: Option<String>,
    /// Join as a standby node (with --join): warm-standby replicas of every shard, non-voting,
    /// for a disaster-recovery or reporting site; serves stale reads only.
    #[arg(long, env = "DOSSIER_STANDBY")]
    pub standby: bool,
    /// Join an existing cluster through these nodes (host:port, comma separated) when this node
    /// has no cluster state yet; implies --no-auto-init.
    #[arg(long, env = "DOSSIER_JOIN", value_delimiter = ',')]
    pub join: Option<Vec<String>>,
    /// Origins of browser applications allowed to call the gRPC-Web endpoint (CORS), comma
    /// separated, e.g. `https://portal.example` ("*": any).
    #[arg(long, env = "DOSSIER_WEB_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub web_allowed_origins: Option<Vec<String>>,
    /// Directory of ca.crt, node.crt and node.key (`dossier cert create-ca`, `create-node`):
    /// serve TLS and call peers over TLS.
    #[arg(long, env = "DOSSIER_CERTS_DIR")]
    pub certs_dir: Option<PathBuf>,
    /// Run without TLS on purpose (development only; a node without --certs-dir warns otherwise).
    #[arg(long, env = "DOSSIER_INSECURE")]
    pub insecure: bool,
    /// JWKS file of the identity provider whose bearer tokens (JWT) callers may present (needs
    /// --certs-dir, --token-issuer, --token-audience).
    #[arg(long, env = "DOSSIER_TOKEN_JWKS")]
    pub token_jwks: Option<PathBuf>,
    /// The issuer (`iss`) bearer tokens must name.
    #[arg(long, env = "DOSSIER_TOKEN_ISSUER")]
    pub token_issuer: Option<String>,
    /// The audience (`aud`) bearer tokens must name.
    #[arg(long, env = "DOSSIER_TOKEN_AUDIENCE")]
    pub token_audience: Option<String>,
    /// Do not initialise a single-node cluster when none exists; wait for `dossier cluster init`.
    #[arg(long, env = "DOSSIER_NO_AUTO_INIT")]
    pub no_auto_init: bool,
    /// Split a shard led here once its data passes this many bytes (0: never by size).
    #[arg(long, env = "DOSSIER_SPLIT_SHARD_BYTES")]
    pub split_shard_bytes: Option<u64>,
    /// Split a shard led here that applies more commands per second than this for 30 s (0: never).
    #[arg(long, env = "DOSSIER_SPLIT_WRITES_PER_SECOND")]
    pub split_writes_per_second: Option<u64>,
    /// Do not balance replicas and preferred leaders over the nodes while this node leads the
    /// meta group (draining a node being removed goes on).
    #[arg(long, env = "DOSSIER_NO_PLACEMENT_BALANCE")]
    pub no_placement_balance: bool,
    /// UNSAFE, testing only: serve linearizable reads from any replica without a read barrier, so
    /// that the fault harness can show it catches stale reads. Never in production.
    #[arg(long, env = "DOSSIER_UNSAFE_STALE_READS_FOR_TESTING")]
    pub unsafe_stale_reads_for_testing: bool,
    /// Raft heartbeat period in milliseconds.
    #[arg(long, env = "DOSSIER_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Minimum election timeout in milliseconds (must exceed 3 heartbeats).
    #[arg(long, env = "DOSSIER_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    /// Maximum election timeout in milliseconds.
    #[arg(long, env = "DOSSIER_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    /// Idle groups go quiescent after this many milliseconds without a new entry (no Raft timers
    /// until they are used again; followers watch the leader's node by ping instead); 0: never.
    /// Default 2000 (twice the election timeout's maximum when that is more).
    #[arg(long, env = "DOSSIER_QUIESCE_AFTER_MS")]
    pub quiesce_after_ms: Option<u64>,
    /// Threads of the async runtime (0: one per CPU core).
    #[arg(long, env = "DOSSIER_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `dossier_node=debug`.
    #[arg(long, env = "DOSSIER_LOG", default_value = "info,openraft=warn")]
    pub log: String,
}

impl Flags {
    /// Builds the configuration: defaults, then the file, then environment and flags.
    pub fn resolve(&self) -> Result<NodeConfig> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read config file {}", path.display()))?;
                toml::from_str::<NodeConfig>(&text)
                    .with_context(|| format!("parse config file {}", path.display()))?
            }
            None => NodeConfig::default(),
        };
        if let Some(v) = self.node_id {
            config.node_id = v;
        }
        if let Some(v) = self.listen {
            config.listen = v;
        }
        if let Some(v) = &self.advertise {
            config.advertise = Some(v.clone());
        }
        if let Some(v) = self.peer_listen {
            config.peer_listen = Some(v);
        }
        if let Some(v) = &self.peer_advertise {
            config.peer_advertise = Some(v.clone());
        }
        if let Some(v) = self.http_listen {
            config.http_listen = v;
        }
        if let Some(v) = &self.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = &self.zone {
            config.zone = v.clone();
        }
        if self.standby {
            config.standby = true;
        }
        if let Some(v) = &self.join {
            config.join = v.clone();
        }
        if let Some(v) = &self.web_allowed_origins {
            config.web_allowed_origins = v.clone();
        }
        if let Some(v) = &self.certs_dir {
            config.certs_dir = Some(v.clone());
        }
        if self.insecure {
            config.insecure = true;
        }
        if let Some(v) = &self.token_jwks {
            config.token_jwks = Some(v.clone());
        }
        if let Some(v) = &self.token_issuer {
            config.token_issuer = v.clone();
        }
        if let Some(v) = &self.token_audience {
            config.token_audience = v.clone();
        }
        if self.no_auto_init {
            config.auto_init = false;
        }
        if let Some(v) = self.split_shard_bytes {
            config.split_shard_bytes = v;
        }
        if let Some(v) = self.split_writes_per_second {
            config.split_writes_per_second = v;
        }
        if self.no_placement_balance {
            config.placement_balance = false;
        }
        if self.unsafe_stale_reads_for_testing {
            config.unsafe_stale_reads_for_testing = true;
        }
        if let Some(v) = self.worker_threads {
            config.worker_threads = v;
        }
        if let Some(v) = self.heartbeat_interval_ms {
            config.raft.heartbeat_interval_ms = v;
        }
        if let Some(v) = self.election_timeout_min_ms {
            config.raft.election_timeout_min_ms = v;
        }
        if let Some(v) = self.election_timeout_max_ms {
            config.raft.election_timeout_max_ms = v;
        }
        if let Some(v) = self.quiesce_after_ms {
            config.raft.quiesce_after_ms = Some(v);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raising the election timeouts without naming quiesce-after-ms keeps the config valid: the
    /// default follows them. An explicit value too short for them is refused, the default's own
    /// value included; 0 stays off.
    #[test]
    fn quiescence_default_follows_raised_election_timeouts() {
        let quiescence = |c: &NodeConfig| c.clone().validate().unwrap().node.raft.quiescence_ms();
        let mut c = NodeConfig::default();
        c.raft.election_timeout_min_ms = 1_000;
        c.raft.election_timeout_max_ms = 1_500;
        assert_eq!(quiescence(&c), 3_000);
        c.raft.quiesce_after_ms = Some(0);
        assert_eq!(quiescence(&c), 0);
        c.raft.quiesce_after_ms = Some(3_500);
        assert_eq!(quiescence(&c), 3_500);
        for short in [2_500, dossier_raft::QUIESCE_AFTER_DEFAULT_MS] {
            c.raft.quiesce_after_ms = Some(short);
            let e = c.clone().validate().unwrap_err().to_string();
            assert!(e.contains(&format!("quiesce-after-ms ({short})")), "{e}");
        }
        assert_eq!(
            quiescence(&NodeConfig::default()),
            dossier_raft::QUIESCE_AFTER_DEFAULT_MS
        );
    }

    /// Defaults are valid; a too-short election timeout is refused with a message naming both fields.
    #[test]
    fn validate_names_fields() {
        assert!(NodeConfig::default().validate().is_ok());
        let mut c = NodeConfig::default();
        c.raft.election_timeout_min_ms = 100;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("election-timeout-min-ms") && e.contains("heartbeat-interval-ms"),
            "{e}"
        );
        let c = NodeConfig {
            node_id: 0,
            ..NodeConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("node-id"));
        let mut c = NodeConfig::default();
        c.raft.read_lease_margin_ms = c.raft.election_timeout_max_ms;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("read-lease-margin-ms")
        );
        for bad in [
            "portal.example",
            "https://portal.example/",
            "https://portal.example/app",
        ] {
            let c = NodeConfig {
                web_allowed_origins: vec![bad.into()],
                ..NodeConfig::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("web-allowed-origins"), "{bad}: {e}");
        }
        let c = NodeConfig {
            web_allowed_origins: vec!["https://portal.example:8443".into(), "*".into()],
            ..NodeConfig::default()
        };
        assert!(c.validate().is_ok());
        let c = NodeConfig {
            cluster_name: "ward 7".into(),
            ..NodeConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("cluster-name")
        );
    }

    /// `docs/config-template.toml` is exactly the embedded defaults: the template cannot drift.
    #[test]
    fn config_template_matches_defaults() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/config-template.toml"
        ))
        .unwrap();
        let parsed: NodeConfig = toml::from_str(&text).unwrap();
        assert_eq!(parsed, NodeConfig::default());
    }

    /// Flags override the file, which overrides the defaults.
    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "node-id = 3\nlisten = \"127.0.0.1:9000\"\n[raft]\nheartbeat-interval-ms = 50\n",
        )
        .unwrap();
        let flags = Flags::parse_from([
            "dossier-node",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:9100",
        ]);
        let c = flags.resolve().unwrap();
        assert_eq!(
            (c.node_id, c.listen.port(), c.raft.heartbeat_interval_ms),
            (3, 9100, 50)
        );
        std::fs::write(&file, "no-such-field = 1\n").unwrap();
        assert!(
            Flags::parse_from(["dossier-node", "--config", file.to_str().unwrap()])
                .resolve()
                .is_err()
        );
    }
}
