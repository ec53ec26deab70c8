//! TLS to the nodes: the cluster's CA to trust, and the client's own certificate when it has one
//! (a service or operator identity made by `dossier cert create-client`).

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::ClientError;

/// What the client trusts and who it is.
#[derive(Clone)]
pub struct ClientTls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    // The key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl ClientTls {
    /// Trusts the CA certificate `ca_pem`; no client certificate.
    pub fn new(ca_pem: Vec<u8>) -> ClientTls {
        ClientTls {
            ca_pem,
            identity: None,
        }
    }

    /// Presents `cert_pem` (with its private key `key_pem`) to the nodes.
    pub fn with_identity(mut self, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> ClientTls {
        self.identity = Some((cert_pem, key_pem));
        self
    }

    /// `ca.crt` from `dir`, and `client.USER.crt` / `client.USER.key` when `user` is given (the
    /// layout `dossier cert` writes).
    pub fn from_certs_dir(dir: &Path, user: Option<&str>) -> Result<ClientTls, ClientError> {
        let read = |name: String| {
            let path = dir.join(&name);
            std::fs::read(&path).map_err(|e| ClientError::InvalidArgument {
                field: "certs-dir".into(),
                message: format!("read {}: {e}", path.display()),
                limit: None,
            })
        };
        let tls = ClientTls::new(read("ca.crt".into())?);
        Ok(match user {
            Some(user) => tls.with_identity(
                read(format!("client.{user}.crt"))?,
                read(format!("client.{user}.key"))?,
            ),
            None => tls,
        })
    }

    pub(crate) fn config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        match &self.identity {
            Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
            None => config,
        }
    }

    /// An endpoint for `addr` (host:port) over TLS.
    pub fn endpoint(
        &self,
        addr: &str,
    ) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
        tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(self.config())
    }
}
