//! TLS from a certs directory (`node.certs-dir`, made by `dossier cert`): the node serves its
//! gRPC port over TLS with `node.crt`, asks callers for a certificate of the cluster's CA
//! (`ca.crt`) without requiring one (clinicians and patients will come with bearer tokens), and
//! calls its peers over TLS with the same certificate as its identity.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

const CA_CERT: &str = "ca.crt";
const NODE_CERT: &str = "node.crt";
const NODE_KEY: &str = "node.key";

/// A node's TLS settings, as server and as its peers' client.
#[derive(Debug, Clone)]
pub struct NodeTls {
    pub server: ServerTlsConfig,
    pub peer: ClientTlsConfig,
}

impl NodeTls {
    /// Reads `ca.crt`, `node.crt` and `node.key` from `dir`. A key that its group or others may
    /// read is refused, as is a file that is not PEM.
    pub fn load(dir: &Path) -> Result<NodeTls> {
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
        let identity = Identity::from_pem(&cert, &key);
        let ca = Certificate::from_pem(&ca);
        Ok(NodeTls {
            server: ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca.clone())
                .client_auth_optional(true),
            peer: ClientTlsConfig::new().ca_certificate(ca).identity(identity),
        })
    }
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
