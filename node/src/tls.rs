//! TLS from a certs directory (`node.certs-dir`, made by `dossier cert`): the node serves over
//! TLS with `node.crt`, and calls its peers over TLS with the same certificate as its identity.
//! The client port asks callers for a certificate of the cluster's CA (`ca.crt`) without
//! requiring one (clinicians and patients come with bearer tokens); the peer port
//! (`peer-listen`) requires one.
//!
//! The files are read again when they change (checked every few seconds) or on SIGHUP: new
//! connections are served and made with the new certificate and CA, connections already open
//! keep theirs. A directory that no longer loads (a half-copied key, a certificate without its
//! key) is refused, and the node keeps what it had.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use anyhow::{Context, Result, ensure};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

const CA_CERT: &str = "ca.crt";
const NODE_CERT: &str = "node.crt";
const NODE_KEY: &str = "node.key";

/// Which endpoint a server configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The client port: a client certificate is asked for, not required.
    Public,
    /// The peer port: a certificate of the cluster's CA is required.
    Peers,
}

/// A node's TLS settings, as server and as its peers' client, reloadable.
#[derive(Debug)]
pub struct NodeTls {
    dir: PathBuf,
    current: RwLock<Arc<Loaded>>,
}

/// One reading of the certs directory.
#[derive(Debug)]
struct Loaded {
    /// Modification times and sizes of the three files when they were read.
    stamp: Vec<(SystemTime, u64)>,
    public: Arc<ServerConfig>,
    peers: Arc<ServerConfig>,
    client: ClientTlsConfig,
}

impl NodeTls {
    /// Reads `ca.crt`, `node.crt` and `node.key` from `dir`. A key that its group or others may
    /// read is refused, as is a file that is not PEM, or a certificate its key does not match.
    pub fn load(dir: &Path) -> Result<NodeTls> {
        Ok(NodeTls {
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(Loaded::read(dir)?)),
        })
    }

    /// The server configuration of `endpoint` as the files stand now.
    pub fn server(&self, endpoint: Endpoint) -> Arc<ServerConfig> {
        let current = self.current();
        match endpoint {
            Endpoint::Public => Arc::clone(&current.public),
            Endpoint::Peers => Arc::clone(&current.peers),
        }
    }

    /// How to call peers: the cluster's CA, this node's certificate as identity.
    pub fn client(&self) -> ClientTlsConfig {
        self.current().client.clone()
    }

    /// Reads the directory again if its files changed since the last reading (or whatever they
    /// are when `force`). `Ok(true)`: the new files are in use. An error leaves the old ones.
    pub fn reload(&self, force: bool) -> Result<bool> {
        if !force && stamp(&self.dir)? == self.current().stamp {
            return Ok(false);
        }
        let next = Loaded::read(&self.dir)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        Ok(true)
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Loaded {
    fn read(dir: &Path) -> Result<Loaded> {
        // Stamped before reading: a change made while reading is seen by the next check.
        let stamp = stamp(dir)?;
        let ca = read_pem(dir, CA_CERT, "CERTIFICATE")?;
        let cert = read_pem(dir, NODE_CERT, "CERTIFICATE")?;
        let key_path = dir.join(NODE_KEY);
        let mode = fs::metadata(&key_path)
            .with_context(|| {
                format!(
                    "{} (make it with: dossier cert create-node HOST... --certs-dir {})",
                    key_path.display(),
                    dir.display()
                )
            })?
            .permissions()
            .mode();
        ensure!(
            mode & 0o077 == 0,
            "{} may be read by others (mode {:o}): chmod 600 it",
            key_path.display(),
            mode & 0o777
        );
        let key = read_pem(dir, NODE_KEY, "PRIVATE KEY")?;

        let roots = {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&ca) {
                let c = c.with_context(|| format!("parse {}", dir.join(CA_CERT).display()))?;
                roots
                    .add(c)
                    .with_context(|| format!("{} is not a CA certificate", CA_CERT))?;
            }
            Arc::new(roots)
        };
        let chain = CertificateDer::pem_slice_iter(&cert)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parse {}", dir.join(NODE_CERT).display()))?;
        let private = PrivateKeyDer::from_pem_slice(&key)
            .with_context(|| format!("parse {}", key_path.display()))?;
        let server = |endpoint: Endpoint| -> Result<Arc<ServerConfig>> {
            let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider.clone());
            let verifier = match endpoint {
                Endpoint::Public => verifier.allow_unauthenticated(),
                Endpoint::Peers => verifier,
            }
            .build()
            .context("client certificate verifier")?;
            let mut config = ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .context("TLS versions")?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain.clone(), private.clone_key())
                .with_context(|| format!("{NODE_CERT} and {NODE_KEY} do not go together"))?;
            // HTTP/2 for gRPC; HTTP/1.1 for gRPC-Web from browsers.
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        };
        Ok(Loaded {
            stamp,
            public: server(Endpoint::Public)?,
            peers: server(Endpoint::Peers)?,
            client: ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca))
                .identity(Identity::from_pem(&cert, &key)),
        })
    }
}

/// When the three files were last changed, and their sizes.
fn stamp(dir: &Path) -> Result<Vec<(SystemTime, u64)>> {
    [CA_CERT, NODE_CERT, NODE_KEY]
        .iter()
        .map(|name| file_stamp(&dir.join(name)))
        .collect()
}

/// When `path` was last changed, and its size: a file read again when this changes.
pub(crate) fn file_stamp(path: &Path) -> Result<(SystemTime, u64)> {
    let meta = fs::metadata(path).with_context(|| format!("read {}", path.display()))?;
    Ok((meta.modified()?, meta.len()))
}

/// The file `name` in `dir`, which must hold a PEM block of `kind`.
fn read_pem(dir: &Path, name: &str, kind: &str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    let bytes = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    ensure!(
        String::from_utf8_lossy(&bytes).contains(&format!("{kind}-----")),
        "{} holds no PEM {kind}",
        path.display()
    );
    Ok(bytes)
}
