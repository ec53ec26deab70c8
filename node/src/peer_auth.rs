//! The internal services (`dossier.raft.v1.Raft` and `ShardAccess`) answer only the cluster's
//! nodes. With TLS on, a caller must present a certificate of the cluster's CA (rustls has
//! checked the chain during the handshake) whose subject names the unit `node`, as `dossier cert
//! create-node` makes it; a client certificate (a service, an operator) is refused. Without TLS
//! (`--insecure`) there is no identity to check, and the services stay open to whoever reaches
//! the port (docs/security.md).

use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The organizational unit of node certificates.
const NODE_UNIT: &str = "node";

/// An interceptor admitting only node certificates when `tls` is on.
#[derive(Debug, Clone, Copy)]
pub struct NodesOnly {
    pub tls: bool,
}

impl tonic::service::Interceptor for NodesOnly {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if !self.tls {
            return Ok(request);
        }
        let certs = request.peer_certs();
        let Some(first) = certs.as_deref().and_then(|c| c.first()) else {
            return Err(Status::unauthenticated(
                "internal service: only the cluster's nodes may call it, with their node certificate",
            ));
        };
        match subject(first.as_ref()) {
            Some(s) if s.units.iter().any(|u| u == NODE_UNIT) => Ok(request),
            Some(Subject { units, name, .. }) => Err(Status::permission_denied(format!(
                "internal service: only the cluster's nodes may call it; the caller's certificate \
                 is {name:?} with role {units:?}"
            ))),
            None => Err(Status::unauthenticated(
                "internal service: the caller's certificate cannot be read",
            )),
        }
    }
}

/// What a certificate says of its holder.
pub(crate) struct Subject {
    /// The organizational units: the role.
    pub units: Vec<String>,
    /// The common name.
    pub name: String,
    /// The grants it names (subject alternative names `urn:dossier:grant:<name>`); `None`: none.
    pub grants: Option<Vec<String>>,
}

/// The subject of a DER certificate, read in one parse.
pub(crate) fn subject(der: &[u8]) -> Option<Subject> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let dn = cert.subject();
    let units = dn
        .iter_organizational_unit()
        .filter_map(|u| u.as_str().ok().map(str::to_owned))
        .collect();
    let name = dn
        .iter_common_name()
        .next()
        .and_then(|n| n.as_str().ok())
        .unwrap_or("")
        .to_owned();
    let grants: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => uri
                        .strip_prefix(dossier_api::GRANT_URI_PREFIX)
                        .map(str::to_owned),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Subject {
        units,
        name,
        grants: (!grants.is_empty()).then_some(grants),
    })
}
