//! TLS on every connection: a cluster whose nodes serve and call each other over TLS with
//! certificates from `dossier cert` works end to end; a plaintext client, a client that does not
//! trust the cluster's CA, and a client presenting a certificate of another CA are refused; the
//! internal services (Raft, ShardAccess) answer node certificates only.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{TestCluster, make_certs};
use dossier_client::{Client, ClientConfig, ClientTls};

/// A client of `cluster` with `tls`, trying for a short while only.
async fn client_with(cluster: &TestCluster, tls: Option<ClientTls>) -> Result<Client, String> {
    let mut config = ClientConfig::new(cluster.seeds());
    config.tls = tls;
    config.attempt_timeout = Duration::from_millis(700);
    config.deadline = Duration::from_secs(2);
    let client = Client::connect(config).await.map_err(|e| e.to_string())?;
    client
        .put("p-1", b"k", b"v")
        .await
        .map_err(|e| e.to_string())?;
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_its_clients_and_refuses_strangers() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let dir = certs.path().to_path_buf();
    // Raft between the nodes runs over TLS too: without it no write would commit.
    let cluster = TestCluster::start(3, 2, 3, &|c| c.certs_dir = Some(dir.clone())).await;

    let trusted = ClientTls::from_certs_dir(certs.path(), Some("ward-app")).unwrap();
    let client = client_with(&cluster, Some(trusted)).await.unwrap();
    for i in 0..20 {
        client
            .put(&format!("patient-{i}"), b"allergies", b"penicillin")
            .await
            .unwrap();
    }
    for i in 0..20 {
        assert_eq!(
            client
                .get(&format!("patient-{i}"), b"allergies")
                .await
                .unwrap()
                .as_deref(),
            Some(&b"penicillin"[..])
        );
    }
    // A client with the CA only has no identity: refused (clinicians and patients bring
    // tokens, services and operators their certificate).
    let anonymous = client_with(
        &cluster,
        Some(ClientTls::from_certs_dir(certs.path(), None).unwrap()),
    )
    .await
    .expect_err("a caller without identity was served");
    assert!(anonymous.contains("no identity"), "{anonymous}");

    // Plaintext to a TLS port.
    let plain = client_with(&cluster, None).await;
    assert!(plain.is_err(), "a plaintext client was served");

    // A client that trusts another CA does not accept the nodes' certificates.
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path());
    let wrong_ca = client_with(
        &cluster,
        Some(ClientTls::from_certs_dir(other.path(), None).unwrap()),
    )
    .await;
    let refusal = wrong_ca.expect_err("a client of another CA accepted the nodes");
    assert!(refusal.contains("certificate"), "{refusal}");

    // A client trusting the right CA but presenting a certificate of another CA is refused by
    // the nodes.
    let forged = ClientTls::new(std::fs::read(certs.path().join("ca.crt")).unwrap()).with_identity(
        std::fs::read(other.path().join("client.ward-app.crt")).unwrap(),
        std::fs::read(other.path().join("client.ward-app.key")).unwrap(),
    );
    let forged = client_with(&cluster, Some(forged)).await;
    assert!(forged.is_err(), "a certificate of another CA was accepted");
}

#[test]
fn a_node_refuses_unreadable_or_exposed_certificates() {
    use std::os::unix::fs::PermissionsExt;
    let certs = tempfile::tempdir().unwrap();
    let config = |dir: &std::path::Path| dossier_node::config::NodeConfig {
        certs_dir: Some(dir.to_path_buf()),
        ..dossier_node::config::NodeConfig::default()
    };
    // Nothing there yet.
    let err = config(certs.path()).validate().unwrap_err();
    assert!(format!("{err:#}").contains("ca.crt"), "{err:#}");
    make_certs(certs.path());
    config(certs.path()).validate().unwrap();
    // A key others may read.
    let key = certs.path().join("node.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = config(certs.path()).validate().unwrap_err();
    assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // TLS and insecure together.
    let both = dossier_node::config::NodeConfig {
        insecure: true,
        ..config(certs.path())
    };
    assert!(format!("{:#}", both.validate().unwrap_err()).contains("insecure"));
}

/// A client certificate of the cluster's CA, or none, cannot reach Raft or ShardAccess: no
/// forged Raft message, no snapshot installed, no shard key read or written (the cluster map
/// included) by anyone but a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_services_answer_node_certificates_only() {
    use dossier_api::raft::v1::raft_client::RaftClient;
    use dossier_api::raft::v1::shard_access_client::ShardAccessClient;
    use dossier_api::raft::v1::{PingRequest, ShardReadRequest};

    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let dir = certs.path().to_path_buf();
    let cluster = TestCluster::start(3, 1, 3, &|c| c.certs_dir = Some(dir.clone())).await;
    let addr = cluster.seeds()[0].clone();

    for (who, tls, code) in [
        ("a service", Some("ward-app"), tonic::Code::PermissionDenied),
        ("an operator", Some("dba"), tonic::Code::PermissionDenied),
        ("no certificate", None, tonic::Code::Unauthenticated),
    ] {
        let tls = ClientTls::from_certs_dir(certs.path(), tls).unwrap();
        let channel = tls.endpoint(&addr).unwrap().connect().await.unwrap();
        let read = ShardAccessClient::new(channel.clone())
            .read(ShardReadRequest {
                shard_id: 0,
                keys: vec![b"map".to_vec()],
            })
            .await
            .expect_err(&format!("{who} read the meta shard"));
        assert_eq!(read.code(), code, "{who}: {read:?}");
        let ping = RaftClient::new(channel)
            .ping(PingRequest {
                from_node: 2,
                incarnation: 1,
            })
            .await
            .expect_err(&format!("{who} reached the Raft service"));
        assert_eq!(ping.code(), code, "{who}: {ping:?}");
    }

    // The node certificate passes, and the nodes' own Raft traffic does: writes commit.
    let node_tls = ClientTls::from_certs_dir(certs.path(), None)
        .unwrap()
        .with_identity(
            std::fs::read(certs.path().join("node.crt")).unwrap(),
            std::fs::read(certs.path().join("node.key")).unwrap(),
        );
    let channel = node_tls.endpoint(&addr).unwrap().connect().await.unwrap();
    let answer = RaftClient::new(channel)
        .ping(PingRequest {
            from_node: 2,
            incarnation: 1,
        })
        .await;
    // The ping itself may be refused for its addressing headers, never for the identity.
    if let Err(status) = &answer {
        assert!(
            !matches!(
                status.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ),
            "{status:?}"
        );
    }
    cluster.client().await.put("p-2", b"k", b"v").await.unwrap();
}
