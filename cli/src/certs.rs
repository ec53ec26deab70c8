//! Certificates for a cluster, in the manner of CockroachDB: one certificate authority per
//! cluster, one certificate per node (server and peer identity), one per client identity.
//!
//! A certs directory holds:
//! - `ca.crt`, `ca.key`: the cluster's CA (the key signs the others; keep it off the nodes);
//! - `node.crt`, `node.key`: a node's identity, valid for the host names and addresses it is
//!   reached at, for serving and for calling its peers;
//! - `client.NAME.crt`, `client.NAME.key`: a client identity. Its subject's common name is the
//!   user name, its organizational unit the role (`admin`, `service`, `auditor`; clinicians and
//!   patients authenticate with bearer tokens, see `tokens.rs`).
//!
//! Keys are ECDSA P-256, written with mode 0600; certificates are PEM. Nothing is overwritten
//! unless asked.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// File names in a certs directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.crt";
pub const NODE_KEY: &str = "node.key";

/// The roles a client certificate may carry.
pub const ROLES: &[&str] = &["admin", "service", "auditor"];

/// The organization every certificate of a cluster names.
const ORGANIZATION: &str = "Dossier";
/// The CA's common name. Leaf certificates name it as their issuer, so the CA's subject is
/// rebuilt from these two constants when it signs (no certificate parsing needed).
const CA_COMMON_NAME: &str = "Dossier CA";
/// The common name and unit of node certificates.
const NODE_NAME: &str = "node";

/// How long certificates are valid.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub ca_days: i64,
    pub leaf_days: i64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        // CockroachDB's defaults: 10 years for the CA, 5 for nodes and clients.
        Lifetimes {
            ca_days: 3653,
            leaf_days: 1826,
        }
    }
}

/// A client certificate's file names for `user`.
pub fn client_files(dir: &Path, user: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("client.{user}.crt")),
        dir.join(format!("client.{user}.key")),
    )
}

/// Creates the cluster's CA in `dir` (made if missing).
pub fn create_ca(dir: &Path, lifetimes: Lifetimes, overwrite: bool) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    refuse_existing(&[&cert, &key], overwrite)?;
    let key_pair = KeyPair::generate().context("generate the CA key")?;
    let params = ca_params(lifetimes.ca_days);
    let certificate = params
        .self_signed(&key_pair)
        .context("self-sign the CA certificate")?;
    write_key(&key, &key_pair.serialize_pem())?;
    write_public(&cert, &certificate.pem())?;
    Ok(vec![cert, key])
}

/// Creates `node.crt` / `node.key` in `dir`, signed by the CA there, valid for `hosts` (DNS
/// names or IP addresses the node is reached at).
pub fn create_node(
    dir: &Path,
    hosts: &[String],
    lifetimes: Lifetimes,
    overwrite: bool,
) -> Result<Vec<PathBuf>> {
    ensure!(
        !hosts.is_empty(),
        "name at least one host the node is reached at (a DNS name or an IP address)"
    );
    let mut sans = Vec::with_capacity(hosts.len());
    for host in hosts {
        sans.push(san(host)?);
    }
    let (cert, key) = (dir.join(NODE_CERT), dir.join(NODE_KEY));
    refuse_existing(&[&cert, &key], overwrite)?;
    let mut params = leaf_params(NODE_NAME, NODE_NAME, lifetimes.leaf_days);
    params.subject_alt_names = sans;
    // A node serves clients and peers, and calls its peers with the same identity.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    sign(dir, params, &cert, &key, lifetimes)?;
    Ok(vec![cert, key])
}

/// Creates `client.NAME.crt` / `.key` in `dir` for user `name` with `role`, signed by the CA
/// there.
pub fn create_client(
    dir: &Path,
    name: &str,
    role: &str,
    lifetimes: Lifetimes,
    overwrite: bool,
) -> Result<Vec<PathBuf>> {
    create_client_with_grants(dir, name, role, &[], lifetimes, overwrite)
}

/// As [`create_client`], for a service scoped to `grants` (`dossier_api::Grant` names; none:
/// every call a service may make), carried as subject alternative names
/// `urn:dossier:grant:<name>`.
pub fn create_client_with_grants(
    dir: &Path,
    name: &str,
    role: &str,
    grants: &[String],
    lifetimes: Lifetimes,
    overwrite: bool,
) -> Result<Vec<PathBuf>> {
    check_user_name(name)?;
    for g in grants {
        dossier_api::Grant::parse(g).map_err(anyhow::Error::msg)?;
    }
    ensure!(
        grants.is_empty() || role == "service",
        "grants scope a service; role {role:?} takes none"
    );
    ensure!(
        ROLES.contains(&role),
        "unknown role {role:?}: one of {}",
        ROLES.join(", ")
    );
    let (cert, key) = client_files(dir, name);
    refuse_existing(&[&cert, &key], overwrite)?;
    let mut params = leaf_params(name, role, lifetimes.leaf_days);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.subject_alt_names = grants
        .iter()
        .map(|g| {
            format!("{}{g}", dossier_api::GRANT_URI_PREFIX)
                .try_into()
                .map(SanType::URI)
                .context("a grant as a certificate name")
        })
        .collect::<Result<_>>()?;
    sign(dir, params, &cert, &key, lifetimes)?;
    Ok(vec![cert, key])
}

/// A user name: what follows `client.` in its files and names it in logs and audit events.
pub fn check_user_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && !name.starts_with('.'),
        "user name {name:?}: 1 to 64 characters of a-z, 0-9, '.', '_' and '-', not starting with '.'"
    );
    Ok(())
}

fn ca_params(days: i64) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_name();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    params
}

fn ca_name() -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, ORGANIZATION);
    name.push(DnType::CommonName, CA_COMMON_NAME);
    name
}

fn leaf_params(common_name: &str, unit: &str, days: i64) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, ORGANIZATION);
    name.push(DnType::OrganizationalUnitName, unit);
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    params
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // An hour back, for clocks a little behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

fn san(host: &str) -> Result<SanType> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        });
    ensure!(
        valid,
        "host {host:?} is neither an IP address nor a DNS name"
    );
    Ok(SanType::DnsName(
        host.to_owned()
            .try_into()
            .with_context(|| format!("host {host:?}"))?,
    ))
}

/// Signs `params` with the CA in `dir` and writes the certificate and its new key.
fn sign(
    dir: &Path,
    params: CertificateParams,
    cert: &Path,
    key: &Path,
    lifetimes: Lifetimes,
) -> Result<()> {
    let ca_key_path = dir.join(CA_KEY);
    let ca_key_pem = fs::read_to_string(&ca_key_path).with_context(|| {
        format!(
            "read the CA key {} (create it first: dossier cert create-ca --certs-dir {})",
            ca_key_path.display(),
            dir.display()
        )
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("{} is not a PEM private key", ca_key_path.display()))?;
    ensure!(
        dir.join(CA_CERT).exists(),
        "{} is missing beside its key",
        dir.join(CA_CERT).display()
    );
    let issuer = Issuer::new(ca_params(lifetimes.ca_days), ca_key);
    let key_pair = KeyPair::generate().context("generate a key")?;
    let certificate = params
        .signed_by(&key_pair, &issuer)
        .context("sign the certificate")?;
    write_key(key, &key_pair.serialize_pem())?;
    write_public(cert, &certificate.pem())?;
    Ok(())
}

pub(crate) fn refuse_existing(paths: &[&Path], overwrite: bool) -> Result<()> {
    if overwrite {
        return Ok(());
    }
    for path in paths {
        if path.exists() {
            bail!("{} exists; pass --overwrite to replace it", path.display());
        }
    }
    Ok(())
}

/// Writes a private key readable by its owner only (0600), created that way.
pub(crate) fn write_key(path: &Path, pem: &str) -> Result<()> {
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", path.display()))
}

pub(crate) fn write_public(path: &Path, pem: &str) -> Result<()> {
    fs::write(path, pem).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_certs_dir_is_made_with_private_keys_and_no_silent_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        create_ca(d, Lifetimes::default(), false).unwrap();
        create_node(
            d,
            &["127.0.0.1".into(), "node-1.local".into()],
            Lifetimes::default(),
            false,
        )
        .unwrap();
        create_client(d, "ward-app", "service", Lifetimes::default(), false).unwrap();
        for key in [CA_KEY, NODE_KEY, "client.ward-app.key"] {
            let mode = fs::metadata(d.join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        let again = create_node(d, &["127.0.0.1".into()], Lifetimes::default(), false);
        assert!(again.unwrap_err().to_string().contains("--overwrite"));
        create_node(d, &["127.0.0.1".into()], Lifetimes::default(), true).unwrap();

        assert!(create_client(d, "x", "root", Lifetimes::default(), false).is_err());
        assert!(create_client(d, "Bad Name", "admin", Lifetimes::default(), false).is_err());
        assert!(create_node(d, &["not a host".into()], Lifetimes::default(), true).is_err());
        let no_ca = tempfile::tempdir().unwrap();
        let err = create_node(no_ca.path(), &["h".into()], Lifetimes::default(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("create-ca"), "{err}");
    }
}
