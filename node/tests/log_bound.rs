//! The shared log stays below `log.disk-bytes-target` however much is written, quiet groups (the
//! meta group, a shard nobody writes to) included.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{TestCluster, patient_in_shard};

const KIB: u64 = 1024;

/// 3 nodes, 4 shards (shard 4 never written), segments of 256 KiB and a 4 MiB target: 19 MiB
/// written per node, nearly five times the target. Sampled all along, every node's log folder stays
/// below the target, and the written data all reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_folder_stays_below_its_target() {
    let target = 4096 * KIB;
    let tweak = move |c: &mut dossier_node::NodeConfig| {
        c.log.segment_bytes_max = 256 * KIB;
        c.log.entry_bytes_max = 64 * KIB as u32;
        c.log.disk_bytes_target = target;
    };
    let cluster = Arc::new(TestCluster::start(3, 4, 3, &tweak).await);
    let client = cluster.client().await;
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let cluster = Arc::clone(&cluster);
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut peak = 0u64;
            let mut samples = 0u32;
            while !done.load(Ordering::Acquire) {
                for node in 0..3 {
                    let mut admin = cluster.admin(node).await;
                    let status = admin
                        .node_status(dossier_api::v1::NodeStatusRequest::default())
                        .await
                        .unwrap()
                        .into_inner();
                    peak = peak.max(status.log_bytes_on_disk);
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (peak, samples)
        })
    };
    let patients: Vec<String> = (1..=3)
        .map(|shard| patient_in_shard(&client, shard, "bound"))
        .collect();
    let value = vec![7u8; 2 * KIB as usize];
    let writers: Vec<_> = (0..12)
        .map(|w| {
            let client = client.clone();
            let patient = patients[w % 3].clone();
            let value = value.clone();
            tokio::spawn(async move {
                for i in 0..800 {
                    client
                        .put(&patient, format!("w{w}-{i}").as_bytes(), &value)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    done.store(true, Ordering::Release);
    let (peak, samples) = sampler.await.unwrap();
    assert!(samples > 10, "the log folder was sampled {samples} times");
    assert!(
        peak <= target,
        "a log folder reached {peak} bytes, above the {target} target"
    );
    for w in [0usize, 5, 11] {
        let got = client
            .get(&patients[w % 3], format!("w{w}-799").as_bytes())
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some(&value[..]));
    }
}
