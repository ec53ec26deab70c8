//! `dossier playground`: a local 3-node cluster as child processes on loopback, demo patients, a
//! leader SIGKILLed under steady writes, the measured client-observed gap, a check that every
//! acknowledged write survived, the killed node restarted and caught up; then it serves until
//! Ctrl-C (or `--exit-after`) and stops its children cleanly.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use dossier_client::{Client, ReadConsistency};

use dossier_cli::ops as cluster;
use dossier_cli::procs::{LocalCluster, NodeProc, PORT_BLOCK, local_ports, node_binary};
use dossier_cli::records::TRANSACTION_ENTRIES;
use dossier_fhir::ImportedBundle;
use dossier_records::synth;

#[derive(Debug, Args)]
pub struct PlaygroundArgs {
    /// Where the nodes keep their data and logs (default: a temporary directory, removed at exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Nodes to start (3 to 38; the demo adds one).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    #[arg(long, default_value_t = 8)]
    shards: u32,
    /// gRPC ports are base-port+1..; HTTP ports base-port+81..
    #[arg(long, default_value_t = 7100)]
    base_port: u16,
    /// Demo patients to load.
    #[arg(long, default_value_t = 200)]
    patients: usize,
    /// Concurrent writers during the leader kill.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Stop by itself this many seconds after the demo (for scripts); default: run until Ctrl-C.
    #[arg(long)]
    exit_after: Option<u64>,
    /// The dossier-node binary (default: next to this executable).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// Run the nodes without TLS. By default the playground makes a CA and certificates in its
    /// data directory (`certs/`) and runs every connection over TLS.
    #[arg(long)]
    insecure: bool,
}

fn mark(step: &str) {
    println!("\n== {step}");
}

pub async fn run(args: &PlaygroundArgs) -> Result<()> {
    if args.nodes < 3 {
        bail!("--nodes must be at least 3 (a shard keeps 3 replicas)");
    }
    // The demo adds one node to those asked for; every node's ports must fit (`local_ports`).
    let last = args.nodes + 1;
    if last >= u64::from(PORT_BLOCK) {
        bail!(
            "--nodes must be at most {} (the playground gives each node a port in blocks of {PORT_BLOCK} above --base-port)",
            PORT_BLOCK - 2
        );
    }
    if local_ports(args.base_port, last).is_none() {
        bail!(
            "--base-port {} leaves no room for {last} nodes' ports (base+1 to base+{}); choose a lower one",
            args.base_port,
            2 * PORT_BLOCK + last as u16
        );
    }
    let bin = node_binary(args.node_bin.as_deref())?;
    let (_temp, root) = match &args.data_dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let t = tempfile::Builder::new()
                .prefix("dossier-playground-")
                .tempdir()
                .context("create a temporary directory")?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    mark(&format!(
        "starting {} nodes (data and logs in {})",
        args.nodes,
        root.display()
    ));
    let mut local = if args.insecure {
        LocalCluster::spawn_with(
            &root,
            args.nodes,
            args.base_port,
            &bin,
            &["--insecure".into()],
        )
        .await?
    } else {
        LocalCluster::spawn_secure(&root, args.nodes, args.base_port, &bin, &[]).await?
    };
    for p in &local.procs {
        println!("node {} up: gRPC {} HTTP {}", p.id, p.grpc, p.http);
    }
    // How to reach this cluster with the dossier command.
    let access = if args.insecure {
        println!("TLS off (--insecure)");
        String::new()
    } else {
        let certs = LocalCluster::certs_dir(&root);
        println!(
            "TLS on every connection: CA and certificates in {}; commands take --certs-dir {} and --user {} (a service: data) or --user {} (an operator: cluster changes, no clinical data)",
            certs.display(),
            certs.display(),
            dossier_cli::procs::LOCAL_USER,
            dossier_cli::procs::LOCAL_ADMIN
        );
        format!(
            " --certs-dir {} --user {}",
            certs.display(),
            dossier_cli::procs::LOCAL_USER
        )
    };
    mark(&format!(
        "cluster init: {} shards x 3 replicas",
        args.shards
    ));
    local.init(args.shards, 3).await?;
    let seeds = local.seeds.clone();
    let client = local.client().await?;

    mark(&format!(
        "writing {} synthetic patients (typed clinical records, seed 1)",
        args.patients
    ));
    let started = Instant::now();
    let mut records = 0usize;
    let mut next = 0usize;
    while next < args.patients {
        // Eight patients at a time, each its patient write then its transactions.
        let batch: Vec<_> = (next..args.patients.min(next + 8))
            .map(|n| {
                let client = client.clone();
                tokio::spawn(async move {
                    let p = synth::patient(1, n as u64);
                    let bundle = ImportedBundle {
                        patient: p.patient,
                        records: p.records,
                        ..ImportedBundle::default()
                    };
                    dossier_cli::records::write_bundle(&client, &bundle, TRANSACTION_ENTRIES).await
                })
            })
            .collect();
        next += batch.len();
        for t in batch {
            records += t.await.context("writer task")??;
        }
    }
    println!(
        "{} patients, {records} records in {:.2?}",
        args.patients,
        started.elapsed()
    );
    // Read one patient back: its Patient record and the kinds of its records.
    let sample_patient = synth::patient_id(1, 7.min(args.patients.saturating_sub(1)) as u64);
    if args.patients > 0 {
        let mut kinds = std::collections::BTreeMap::new();
        client
            .everything(&sample_patient, 0, &[], false, |rs| {
                for r in rs {
                    if let Some(k) = r.kind.as_ref() {
                        let t = dossier_fhir::fhir_type(dossier_records::kind_type(k));
                        *kinds.entry(t).or_insert(0usize) += 1;
                    }
                }
                Ok(())
            })
            .await?;
        println!("{sample_patient}: {kinds:?}");
        if !args.insecure {
            mark("access control: the patient's GP, another clinician, break-the-glass");
            let sample = synth::patient(1, 7.min(args.patients.saturating_sub(1)) as u64);
            crate::playground_access::show(&local, &LocalCluster::certs_dir(&root), &sample)
                .await?;
        }
    }
    cluster::print_status(&cluster::status(&seeds, true).await?);

    let outcome = kill_leader_under_load(&client, &seeds, &mut local.procs, args.writers).await?;

    cluster::print_status(&cluster::status(&seeds, true).await?);
    if outcome.lost > 0 {
        bail!("{} acknowledged writes were lost", outcome.lost);
    }
    let cluster_args = local.procs[0].extra_args.clone();
    let peer_ports = local.procs[0].peer.is_some();
    let joined = join_a_node(&root, &bin, args, &seeds, &cluster_args, peer_ports).await?;
    local.procs.push(joined);
    split_a_shard(&client, &seeds, &sample_patient).await?;
    let timer = match args.exit_after {
        Some(secs) => {
            mark(&format!(
                "serving for {secs} s (--exit-after, or until Ctrl-C or SIGTERM), then stopping"
            ));
            Duration::from_secs(secs)
        }
        None => {
            mark(&format!(
                "serving until Ctrl-C or SIGTERM; try: dossier --seeds {}{access} patient everything {sample_patient}",
                seeds[0]
            ));
            Duration::MAX
        }
    };
    // Stopped however it is stopped, the playground stops its nodes and removes their data.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("wait for SIGTERM")?;
    tokio::select! {
        _ = tokio::time::sleep(timer) => {}
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
        _ = terminate.recv() => {}
    }
    mark("stopping the nodes (SIGTERM: leaderships are handed over first)");
    for p in &mut local.procs {
        p.terminate(Duration::from_secs(10));
    }
    println!("stopped");
    Ok(())
}

/// Starts one more node with `--join` (with a peer port of its own when the others have one)
/// and waits until the cluster map holds it and it has taken its share of replicas and
/// leaderships (the placement driver).
async fn join_a_node(
    root: &std::path::Path,
    bin: &std::path::Path,
    args: &PlaygroundArgs,
    seeds: &[String],
    cluster_args: &[String],
    peer_port: bool,
) -> Result<NodeProc> {
    let id = args.nodes + 1;
    let zone = "dc-joined";
    mark(&format!(
        "node {id} joins the running cluster (--join {})",
        seeds[0]
    ));
    let mut node = LocalCluster::node(
        args.base_port,
        id,
        root.join(format!("node-{id}")),
        bin.to_path_buf(),
        peer_port,
    )?;
    node.extra_args = cluster_args.to_vec();
    node.extra_args.extend([
        "--join".into(),
        seeds.join(","),
        "--zone".into(),
        zone.into(),
    ]);
    node.spawn()?;
    let started = Instant::now();
    loop {
        let status = cluster::status(seeds, false).await?;
        if status.map.nodes.iter().any(|n| n.node_id == id) {
            println!("node {id} joined in {:.2?}", started.elapsed());
            cluster::print_nodes(&status);
            // The placement driver moves replicas onto it (each catches up as a learner, then
            // takes a voter's place) and makes it some shards' preferred leader.
            mark(&format!(
                "node {id} takes its share: the placement driver moves replicas onto it"
            ));
            let taking = Instant::now();
            let status = loop {
                let status = cluster::status(seeds, false).await?;
                let share = cluster::Share::of(&status, id);
                if share.taken() {
                    println!(
                        "node {id} holds {} replicas and leads {} shards after {:.2?}",
                        share.holds,
                        share.leads,
                        taking.elapsed()
                    );
                    break status;
                }
                if taking.elapsed() > Duration::from_secs(90) {
                    bail!(
                        "node {id} did not take its share within 90 s (replicas per up node {:?})",
                        share.replicas_per_node
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            cluster::print_nodes(&status);
            return Ok(node);
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "node {id} did not join within 30 s (its log: {})",
                node.data.join("node.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Splits the shard of the sample patient at its middle patient, and reads the patient's
/// record through the client (which re-routes by itself) afterwards.
async fn split_a_shard(client: &Client, seeds: &[String], sample_patient: &str) -> Result<()> {
    let map = client.refresh_map().await.context("map")?;
    let h = dossier_api::patient_hash(sample_patient);
    let shard = map
        .shards
        .iter()
        .find(|d| h >= d.hash_lo && (d.hash_hi_max || h < d.hash_hi))
        .context("the sample patient's shard")?
        .shard_id;
    mark(&format!(
        "splitting shard {shard} (dossier shard split {shard})"
    ));
    let started = Instant::now();
    let (left, right) = dossier_cli::elastic::split_shard(seeds, shard, 0).await?;
    println!(
        "shard {} split in {:.2?}: shard {} keeps hashes [{}, {}), new shard {} takes [{}, {}) on nodes {:?}",
        shard,
        started.elapsed(),
        left.shard_id,
        left.hash_lo,
        left.hash_hi,
        right.shard_id,
        right.hash_lo,
        if right.hash_hi_max {
            "end".to_owned()
        } else {
            right.hash_hi.to_string()
        },
        right.replicas
    );
    let mut records = 0usize;
    client
        .everything(sample_patient, 0, &[], false, |rs| {
            records += rs.len();
            Ok(())
        })
        .await
        .context("read the sample patient after the split")?;
    println!("{sample_patient} reads whole after the split: {records} records");
    let status = cluster::status(seeds, false).await?;
    cluster::print_nodes(&status);
    println!();
    cluster::print_status(&status);
    Ok(())
}

struct KillOutcome {
    lost: usize,
}

async fn kill_leader_under_load(
    client: &Client,
    seeds: &[String],
    procs: &mut [NodeProc],
    writers: usize,
) -> Result<KillOutcome> {
    let map = client.cluster_map().context("map")?;
    let target = map.shards.first().context("a shard")?.clone();
    let status = cluster::status(seeds, false).await?;
    let leader = cluster::leader_of(&status.replicas, target.shard_id)
        .map(|r| r.node_id)
        .context("shard 1 has a leader")?;
    // Patients whose records live in the target shard.
    let patients: Vec<String> = (0..)
        .map(|n| format!("load-{n:06}"))
        .filter(|p| {
            let h = dossier_api::patient_hash(p);
            h >= target.hash_lo && (target.hash_hi_max || h < target.hash_hi)
        })
        .take(writers)
        .collect();
    mark(&format!(
        "SIGKILL of node {leader}, leader of shard {}, while {writers} clients write to it",
        target.shard_id
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<(String, String), String>>> = Arc::default();
    let successes: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let tasks: Vec<_> = patients
        .iter()
        .enumerate()
        .map(|(w, patient)| {
            let (client, stop, acked, successes, patient) = (
                client.clone(),
                Arc::clone(&stop),
                Arc::clone(&acked),
                Arc::clone(&successes),
                patient.clone(),
            );
            tokio::spawn(async move {
                let mut seq = 0u64;
                let mut failures = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let key = format!("load/{w}/{seq:06}");
                    let value = format!("value-{w}-{seq}");
                    match client
                        .put_with(
                            &patient,
                            key.as_bytes(),
                            value.as_bytes(),
                            Duration::from_secs(5),
                        )
                        .await
                    {
                        Ok(_) => {
                            successes
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Instant::now());
                            acked
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert((patient.clone(), key), value);
                        }
                        Err(_) => failures += 1,
                    }
                }
                failures
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    let victim = procs
        .iter_mut()
        .find(|p| p.id == leader)
        .context("the leader's process")?;
    victim.kill9();
    println!("killed node {leader}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = 0;
    for t in tasks {
        failures += t.await.unwrap_or(0);
    }
    let times = successes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut sorted = times.clone();
    sorted.sort_unstable();
    // The longest stretch between two successes that ends after the kill: writes committed just
    // before the leader died may still return after it, and the gap is what follows them.
    let gap = sorted
        .windows(2)
        .filter(|w| w[1] >= killed_at)
        .map(|w| w[1] - w[0])
        .max();
    match gap {
        Some(gap) => println!(
            "client-observed gap: {:.0} ms (the longest stretch without a successful write after the kill); {} writes acknowledged, {} failed and were retried as new writes",
            gap.as_secs_f64() * 1000.0,
            acked.len(),
            failures
        ),
        None => println!("no success after the kill ({} acknowledged)", acked.len()),
    }

    mark("checking every acknowledged write (linearizable reads)");
    let mut lost = 0;
    for ((patient, key), value) in &acked {
        let got = client
            .get_with(
                patient,
                key.as_bytes(),
                ReadConsistency::Linearizable,
                Duration::from_secs(10),
            )
            .await?;
        if got.as_deref() != Some(value.as_bytes()) {
            lost += 1;
            println!("LOST: {patient}/{key}");
        }
    }
    println!("{} acknowledged writes checked, {lost} lost", acked.len());

    mark(&format!("restarting node {leader}"));
    let victim = procs
        .iter_mut()
        .find(|p| p.id == leader)
        .context("the leader's process")?;
    victim.spawn()?;
    let restarted = Instant::now();
    victim
        .wait_http_ok("healthz", Duration::from_secs(20))
        .await?;
    loop {
        let s = cluster::status(seeds, false).await?;
        let mine = s
            .replicas
            .iter()
            .find(|r| r.shard_id == target.shard_id && r.node_id == leader);
        let best = s
            .replicas
            .iter()
            .filter(|r| r.shard_id == target.shard_id)
            .map(|r| r.applied_index)
            .max()
            .unwrap_or(0);
        if let Some(m) = mine
            && m.applied_index >= best
        {
            println!(
                "node {leader} caught up on shard {} (applied index {}) in {:.2?}",
                target.shard_id,
                m.applied_index,
                restarted.elapsed()
            );
            break;
        }
        if restarted.elapsed() > Duration::from_secs(30) {
            bail!("node {leader} did not catch up within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(KillOutcome { lost })
}

#[cfg(test)]
mod tests {
    use super::{PlaygroundArgs, run};

    fn args(nodes: u64, base_port: u16) -> PlaygroundArgs {
        PlaygroundArgs {
            data_dir: None,
            nodes,
            shards: 8,
            base_port,
            patients: 1,
            writers: 1,
            exit_after: Some(0),
            node_bin: None,
            insecure: true,
        }
    }

    /// Node i's gRPC, peer and HTTP ports sit in blocks of 40 above the base port: more nodes
    /// than a block holds, or a base port too high for them, is refused before anything starts
    /// (with 40 nodes, node 40's gRPC port was node 0's peer port; near 65,535 the sums overflowed).
    #[tokio::test]
    async fn ports_outside_their_blocks_are_refused() {
        let e = run(&args(39, 7100)).await.unwrap_err().to_string();
        assert!(e.contains("--nodes must be at most 38"), "{e}");
        let e = run(&args(3, 65_460)).await.unwrap_err().to_string();
        assert!(e.contains("--base-port 65460 leaves no room"), "{e}");
        let e = run(&args(2, 7100)).await.unwrap_err().to_string();
        assert!(e.contains("at least 3"), "{e}");
    }
}
