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

/// A peer port per node (`peer-listen`): the cluster's Raft traffic runs there (writes commit,
/// a joining node receives the map), the client port no longer serves Raft or ShardAccess, and
/// the peer port refuses a caller without a certificate in the handshake and a client
/// certificate of the cluster's CA at the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_port_serves_the_internal_services_to_nodes_only() {
    use dossier_api::raft::v1::raft_client::RaftClient;
    use dossier_api::raft::v1::shard_access_client::ShardAccessClient;
    use dossier_api::raft::v1::{PingRequest, ShardReadRequest};
    use dossier_api::v1::ClusterMapRequest;

    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let dir = certs.path().to_path_buf();
    let with_peer_port = |c: &mut dossier_node::NodeConfig| {
        c.certs_dir = Some(dir.clone());
        c.peer_listen = Some(
            format!("127.0.0.1:{}", common::free_port())
                .parse()
                .unwrap(),
        );
    };
    // Init names client addresses only: the nodes tell their peer endpoints.
    let cluster = TestCluster::start(3, 2, 3, &with_peer_port).await;
    let client = cluster.client().await;
    for i in 0..20 {
        client
            .put(&format!("patient-{i}"), b"k", b"v")
            .await
            .unwrap();
    }
    let map = client.refresh_map().await.unwrap();
    for (n, node) in map.nodes.iter().zip(&cluster.nodes) {
        let peer = node.config.peer_listen.unwrap().to_string();
        assert_eq!(
            (n.address.as_str(), n.peer_address.as_str()),
            (node.grpc.as_str(), peer.as_str())
        );
    }

    let node_tls = ClientTls::from_certs_dir(certs.path(), None)
        .unwrap()
        .with_identity(
            std::fs::read(certs.path().join("node.crt")).unwrap(),
            std::fs::read(certs.path().join("node.key")).unwrap(),
        );
    let ping = PingRequest {
        from_node: 2,
        incarnation: 1,
    };
    let read = ShardReadRequest {
        shard_id: 0,
        keys: vec![b"map".to_vec()],
    };
    // The client port: no internal service, whoever asks.
    let public = node_tls
        .endpoint(&cluster.nodes[0].grpc)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let refused = RaftClient::new(public.clone())
        .ping(ping)
        .await
        .expect_err("Raft answered on the client port");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    let refused = ShardAccessClient::new(public)
        .read(read.clone())
        .await
        .expect_err("ShardAccess answered on the client port");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");

    // The peer port: a service's certificate passes the handshake, not the service.
    let peer = cluster.nodes[0].config.peer_listen.unwrap().to_string();
    let service = ClientTls::from_certs_dir(certs.path(), Some("ward-app"))
        .unwrap()
        .endpoint(&peer)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let refused = ShardAccessClient::new(service.clone())
        .read(read.clone())
        .await
        .expect_err("a service read the meta shard");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = RaftClient::new(service)
        .ping(ping)
        .await
        .expect_err("a service reached Raft");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // Without a certificate the handshake fails: no call is served.
    let anonymous = ClientTls::from_certs_dir(certs.path(), None)
        .unwrap()
        .endpoint(&peer)
        .unwrap();
    let answer = match anonymous.connect().await {
        Ok(channel) => RaftClient::new(channel).ping(ping).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    let refused = answer.expect_err("a caller without certificate reached the peer port");
    assert!(
        !matches!(
            refused.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        ),
        "the handshake should have refused it, not the service: {refused:?}"
    );
    // A node's certificate is let through.
    let node_channel = node_tls.endpoint(&peer).unwrap().connect().await.unwrap();
    if let Err(status) = RaftClient::new(node_channel).ping(ping).await {
        assert!(
            !matches!(
                status.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ),
            "{status:?}"
        );
    }

    // A node joining with a peer port of its own gets the map over it.
    let joined = cluster.join_node(4, &client, &with_peer_port).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let known = match common::admin_at(Some(certs.path()), &joined.grpc).await {
            Ok(mut admin) => admin
                .get_cluster_map(ClusterMapRequest::default())
                .await
                .map(|m| m.into_inner().nodes.iter().any(|n| n.node_id == 4)),
            Err(_) => Ok(false),
        };
        if known.unwrap_or(false) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 4 got no map over its peer port"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let map = client.refresh_map().await.unwrap();
    let four = map.nodes.iter().find(|n| n.node_id == 4).unwrap();
    assert_eq!(
        four.peer_address,
        joined.config.peer_listen.unwrap().to_string()
    );
}

/// The certificate a node serves at `addr`, as a client trusting `certs/ca.crt` receives it.
async fn served_certificate(addr: &str, certs: &std::path::Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(certs.join("ca.crt")).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let host = ServerName::try_from(addr.split(':').next().unwrap().to_owned()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(host, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// The DER of the certificate in `path`.
fn certificate_file(path: &std::path::Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(path)
        .unwrap()
        .to_vec()
}

/// New node certificates put in the certs directory are served without a restart (new
/// connections get them; the cluster keeps committing over connections made with either), and
/// a directory that does not load is refused while the node keeps the certificates it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_are_reloaded_without_restart() {
    use dossier_cli::certs::{self, Lifetimes};

    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let dir = certs.path().to_path_buf();
    let cluster = TestCluster::start(3, 1, 3, &|c| {
        c.certs_dir = Some(dir.clone());
        c.peer_listen = Some(
            format!("127.0.0.1:{}", common::free_port())
                .parse()
                .unwrap(),
        );
    })
    .await;
    let addr = cluster.nodes[0].grpc.clone();
    let first = certificate_file(&certs.path().join("node.crt"));
    assert_eq!(served_certificate(&addr, certs.path()).await, first);

    // A certificate whose key is not beside it: refused, the old one is served on.
    let spare = tempfile::tempdir().unwrap();
    std::fs::copy(certs.path().join("ca.crt"), spare.path().join("ca.crt")).unwrap();
    std::fs::copy(certs.path().join("ca.key"), spare.path().join("ca.key")).unwrap();
    certs::create_node(
        spare.path(),
        &["127.0.0.1".into()],
        Lifetimes::default(),
        false,
    )
    .unwrap();
    let saved = std::fs::read(certs.path().join("node.crt")).unwrap();
    std::fs::copy(spare.path().join("node.crt"), certs.path().join("node.crt")).unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(served_certificate(&addr, certs.path()).await, first);
    std::fs::write(certs.path().join("node.crt"), saved).unwrap();

    // A whole new certificate and key: served once the node has seen them.
    certs::create_node(
        certs.path(),
        &["127.0.0.1".into()],
        Lifetimes::default(),
        true,
    )
    .unwrap();
    let second = certificate_file(&certs.path().join("node.crt"));
    assert_ne!(first, second);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for node in &cluster.nodes {
        for addr in [
            node.grpc.clone(),
            node.config.peer_listen.unwrap().to_string(),
        ] {
            while served_certificate(&addr, certs.path()).await != second {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{addr} still serves the old certificate"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let client = cluster.client().await;
    for i in 0..10 {
        client.put(&format!("p-{i}"), b"k", b"v").await.unwrap();
    }
}
