//! No secret or identifier reaches the logs: a TLS cluster logging at debug (openraft at warn, as
//! nodes run by default) serves a patient registered with a national number, identifier
//! lookups that find it and that find nobody, a duplicate registration refused for the number,
//! a clinician refused then breaking the glass with a token, and forged and expired tokens;
//! every line the nodes logged is then searched for the national numbers, the tokens and the
//! private keys.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use common::{TestCluster, make_certs, patient_with_insz, secure};
use dossier_api::v1::{ResourceType, WriteOutcome};
use dossier_cli::tokens::{self, LOCAL_AUDIENCE, LOCAL_ISSUER, TokenClaims};
use dossier_client::{BearerToken, BreakGlass, Client, WriteOptions};
use dossier_records::SYSTEM_INSZ;

/// Every line logged in this test binary.
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn token(dir: &std::path::Path, issued: SystemTime, lifetime: Duration) -> String {
    let claims = TokenClaims {
        subject: "dr-elsewhere".into(),
        role: "clinician".into(),
        practitioner: Some("https://www.riziv.be|19999999999".into()),
        ..TokenClaims::default()
    };
    tokens::issue(dir, &claims, LOCAL_ISSUER, LOCAL_AUDIENCE, issued, lifetime).unwrap()
}

/// A client presenting the CA only (no certificate) and `token`, maybe breaking the glass.
async fn clinician(
    cluster: &TestCluster,
    token: &str,
    glass: bool,
) -> Result<Client, dossier_client::ClientError> {
    let mut config = cluster.client_config(None);
    config.token = Some(BearerToken::new(token).unwrap());
    if glass {
        config.break_glass =
            Some(BreakGlass::new("unconscious patient in the emergency room").unwrap());
    }
    config.deadline = Duration::from_secs(5);
    Client::connect(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_national_number_token_or_key_is_logged() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "debug,openraft=warn,h2=info,hyper=info,hyper_util=info,tower=info,tonic=info,rustls=info,sled=info",
        ))
        .with_writer(|| Capture)
        .with_ansi(false)
        .init();

    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let dir = certs.path().to_path_buf();
    let cluster = TestCluster::start(3, 2, 3, &|c| secure(c, &dir)).await;
    let service = cluster.client().await;
    let options = WriteOptions::default();
    let number = dossier_records::insz_with_check(750_101_123, false);
    let nobody = dossier_records::insz_with_check(750_101_124, false);

    service
        .create_patient(patient_with_insz("log-1", &[&number]), &options)
        .await
        .unwrap();
    // The same number for another patient: refused for the number.
    let second = service
        .create_patient(patient_with_insz("log-2", &[&number]), &options)
        .await
        .unwrap();
    assert_eq!(
        WriteOutcome::try_from(second.outcome).unwrap(),
        WriteOutcome::IdentifierHeld
    );
    assert!(
        service
            .lookup_identifier(SYSTEM_INSZ, &number)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        service
            .lookup_identifier(SYSTEM_INSZ, &nobody)
            .await
            .unwrap()
            .is_none()
    );

    let valid = token(certs.path(), SystemTime::now(), Duration::from_secs(600));
    let refused = clinician(&cluster, &valid, false).await.unwrap();
    assert!(
        refused
            .read_record("log-1", ResourceType::Patient, "log-1")
            .await
            .is_err()
    );
    let glass = clinician(&cluster, &valid, true).await.unwrap();
    assert!(
        glass
            .read_record("log-1", ResourceType::Patient, "log-1")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        glass
            .lookup_identifier(SYSTEM_INSZ, &number)
            .await
            .unwrap()
            .is_some()
    );
    let expired = token(
        certs.path(),
        SystemTime::now() - Duration::from_secs(7200),
        Duration::from_secs(60),
    );
    let forger = tempfile::tempdir().unwrap();
    tokens::create_issuer(forger.path(), false).unwrap();
    let forged = token(forger.path(), SystemTime::now(), Duration::from_secs(600));
    for bad in [&expired, &forged] {
        let refused = match clinician(&cluster, bad, true).await {
            Ok(client) => client
                .read_record("log-1", ResourceType::Patient, "log-1")
                .await
                .map(drop),
            Err(e) => Err(e),
        };
        assert!(refused.is_err(), "a bad token was served");
    }
    drop(cluster);

    let log = String::from_utf8_lossy(&LOG.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(log.contains("node started"), "nothing was logged");
    // The request paths' own lines were captured too.
    assert!(
        log.contains("break-the-glass access"),
        "the break-the-glass warning was not captured"
    );
    let mut secrets = vec![
        ("a national number", number.clone()),
        ("a national number nobody holds", nobody.clone()),
        ("a token", valid),
        ("an expired token", expired),
        ("a forged token", forged),
    ];
    for key in ["node.key", tokens::ISSUER_KEY] {
        let pem = std::fs::read_to_string(certs.path().join(key)).unwrap();
        let body = pem
            .lines()
            .find(|l| !l.starts_with("-----"))
            .unwrap()
            .to_owned();
        secrets.push(("a private key", body));
    }
    for (what, secret) in secrets {
        if let Some(line) = log.lines().find(|l| l.contains(&secret)) {
            panic!("{what} was logged: {line}");
        }
    }
}
