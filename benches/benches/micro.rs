//! Micro-benchmarks (criterion), to see regressions in the log engine's append path and the
//! codecs. The log runs in a tmpfs directory when `/dev/shm` exists, so that the figures measure
//! the engine's CPU path, not the disk (the disk is measured by `dossier-bench log-*`).
//!
//! `cargo bench -p dossier-bench --bench micro`

#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use dossier_storage::{LogConfig, LogEngine, WriteBatch};

fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn log_append(c: &mut Criterion) {
    let dir = scratch();
    let config = LogConfig {
        dir: dir.path().join("log"),
        group_commit_linger_us: 0,
        ..LogConfig::default()
    }
    .validate()
    .unwrap();
    let engine = Arc::new(LogEngine::open(config).unwrap());
    let payload = Bytes::from(vec![7u8; 256]);
    let mut group = c.benchmark_group("log");
    group.throughput(Throughput::Elements(1));
    let mut last = 0u64;
    group.bench_function("write 1 x 256 B entry (submit + durable)", |b| {
        b.iter(|| {
            last += 1;
            let mut batch = WriteBatch::new();
            batch.append(1, last, payload.clone());
            engine.write(batch).unwrap();
        })
    });
    let mut index = 0u64;
    group.throughput(Throughput::Elements(64));
    group.bench_function(
        "write 64 x 256 B entries over 64 groups in one batch",
        |b| {
            b.iter_batched(
                || {
                    let mut batch = WriteBatch::new();
                    index += 1;
                    for g in 0..64u64 {
                        batch.append(100 + g, index, payload.clone());
                    }
                    batch
                },
                |batch| engine.write(batch).unwrap(),
                BatchSize::SmallInput,
            )
        },
    );
    group.throughput(Throughput::Elements(100));
    assert!(last >= 100, "the write benchmark left entries to read");
    group.bench_function("read 100 cached entries", |b| {
        b.iter(|| {
            let entries = engine.entries(1, last - 99..last + 1).unwrap();
            assert_eq!(entries.len(), 100);
            black_box(entries)
        })
    });
    group.finish();
}

fn codecs(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.bench_function("patient hash (xxh3, 16 B id)", |b| {
        b.iter(|| dossier_api::patient_hash(black_box("85.07.30-033.28")))
    });
    let command = dossier_storage::Command::Txn {
        session: Some(dossier_storage::Session { client: 42, seq: 7 }),
        batch: dossier_storage::Batch::put(
            Bytes::from_static(b"patient-42\0allergies"),
            Bytes::from(vec![1u8; 256]),
        ),
    };
    let request = dossier_raft::Request(command);
    group.bench_function("raft request encode (postcard, 256 B value)", |b| {
        b.iter(|| black_box(postcard::to_allocvec(black_box(&request)).unwrap()))
    });
    let encoded = postcard::to_allocvec(&request).unwrap();
    group.bench_function("raft request decode", |b| {
        b.iter(|| {
            black_box(postcard::from_bytes::<dossier_raft::Request>(black_box(&encoded)).unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, log_append, codecs);
criterion_main!(benches);
