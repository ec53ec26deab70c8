//! A development identity provider: bearer tokens (JWT, ES256) for clinicians and patients, so
//! that a local cluster, the tests and the benchmarks can exercise token authentication without
//! the hospital's identity provider. In production the nodes trust the provider's published
//! JWKS instead (`dossier-node --token-jwks`), and tokens come from it.
//!
//! In a certs directory:
//! - `token-issuer.key`: the signing key (ECDSA P-256, PKCS#8 PEM, mode 0600);
//! - `jwks.json`: its public key as a JWKS, for `dossier-node --token-jwks`.
//!
//! Claims of an issued token: `iss`, `aud`, `sub`, `iat`, `exp`, `role`, and as given
//! `practitioner` and `organizations` (identifiers `system|value`) and `patient` (a patient id).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

/// File names in a certs directory.
pub const ISSUER_KEY: &str = "token-issuer.key";
pub const JWKS: &str = "jwks.json";

/// The issuer and audience the development tokens and the local clusters use.
pub const LOCAL_ISSUER: &str = "https://idp.dossier.local";
pub const LOCAL_AUDIENCE: &str = "dossier";

/// The roles a token may carry.
pub const ROLES: &[&str] = &["clinician", "patient", "service", "auditor", "admin"];

/// The key id of the development issuer's key.
const KEY_ID: &str = "dossier-dev-1";

/// Creates `token-issuer.key` and `jwks.json` in `dir`.
pub fn create_issuer(dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let key_path = dir.join(ISSUER_KEY);
    let jwks_path = dir.join(JWKS);
    crate::certs::refuse_existing(&[&key_path, &jwks_path], overwrite)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generate a P-256 key")?;
    // The uncompressed point: 0x04 ‖ x (32 bytes) ‖ y (32 bytes).
    let point = key.public_key_raw();
    ensure!(
        point.len() == 65 && point[0] == 4,
        "unexpected P-256 public key encoding"
    );
    let jwks = serde_json::json!({
        "keys": [{
            "kty": "EC",
            "crv": "P-256",
            "alg": "ES256",
            "use": "sig",
            "kid": KEY_ID,
            "x": base64url(&point[1..33]),
            "y": base64url(&point[33..65]),
        }]
    });
    crate::certs::write_key(&key_path, &key.serialize_pem())?;
    crate::certs::write_public(
        &jwks_path,
        &format!("{}\n", serde_json::to_string_pretty(&jwks)?),
    )?;
    Ok(vec![key_path, jwks_path])
}

/// What an issued token says of its holder.
#[derive(Debug, Clone, Default)]
pub struct TokenClaims {
    pub subject: String,
    pub role: String,
    pub practitioner: Option<String>,
    pub organizations: Vec<String>,
    pub patient: Option<String>,
    /// A service's grants (`dossier_api::Grant` names); empty: none listed.
    pub grants: Vec<String>,
}

/// A token for `claims`, signed with `dir/token-issuer.key`, issued at `issued_at` and valid
/// for `lifetime` from then.
pub fn issue(
    dir: &Path,
    claims: &TokenClaims,
    issuer: &str,
    audience: &str,
    issued_at: SystemTime,
    lifetime: Duration,
) -> Result<String> {
    ensure!(
        ROLES.contains(&claims.role.as_str()),
        "unknown role {:?}: one of {}",
        claims.role,
        ROLES.join(", ")
    );
    ensure!(!claims.subject.is_empty(), "the subject must not be empty");
    for x in claims.practitioner.iter().chain(&claims.organizations) {
        ensure!(
            matches!(x.split_once('|'), Some((s, v)) if !s.is_empty() && !v.is_empty()),
            "identifier {x:?} must be system|value"
        );
    }
    for g in &claims.grants {
        dossier_api::Grant::parse(g).map_err(anyhow::Error::msg)?;
    }
    ensure!(
        claims.grants.is_empty() || claims.role == "service",
        "grants scope a service; role {:?} takes none",
        claims.role
    );
    if claims.role == "patient" {
        ensure!(claims.patient.is_some(), "a patient token needs --patient");
    }
    if claims.role == "clinician" {
        ensure!(
            claims.practitioner.is_some() || !claims.organizations.is_empty(),
            "a clinician token needs --practitioner or --organization"
        );
    }
    let key_path = dir.join(ISSUER_KEY);
    let pem = std::fs::read_to_string(&key_path).with_context(|| {
        format!(
            "read {} (make it with: dossier token create-issuer --certs-dir {})",
            key_path.display(),
            dir.display()
        )
    })?;
    let key = KeyPair::from_pem(&pem).with_context(|| format!("{}", key_path.display()))?;
    let now = issued_at
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let mut body = serde_json::json!({
        "iss": issuer,
        "aud": audience,
        "sub": claims.subject,
        "iat": now,
        "exp": now + lifetime.as_secs(),
        "role": claims.role,
    });
    if let Some(p) = &claims.practitioner {
        body["practitioner"] = p.clone().into();
    }
    if !claims.organizations.is_empty() {
        body["organizations"] = claims.organizations.clone().into();
    }
    if let Some(p) = &claims.patient {
        body["patient"] = p.clone().into();
    }
    if !claims.grants.is_empty() {
        body["grants"] = claims.grants.clone().into();
    }
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(KEY_ID.to_owned());
    jsonwebtoken::encode(
        &header,
        &body,
        &EncodingKey::from_ec_der(&key.serialize_der()),
    )
    .context("sign the token")
}

/// Base64url without padding (RFC 7515).
fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn an_issued_token_verifies_against_the_jwks_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        create_issuer(dir.path(), false).unwrap();
        let mode = std::fs::metadata(dir.path().join(ISSUER_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            create_issuer(dir.path(), false).is_err(),
            "no silent overwrite"
        );
        let claims = TokenClaims {
            subject: "dr-peeters".into(),
            role: "clinician".into(),
            practitioner: Some("https://www.riziv.be|12345678".into()),
            ..TokenClaims::default()
        };
        let token = issue(
            dir.path(),
            &claims,
            LOCAL_ISSUER,
            LOCAL_AUDIENCE,
            SystemTime::now(),
            Duration::from_secs(60),
        )
        .unwrap();
        let jwks: jsonwebtoken::jwk::JwkSet =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(JWKS)).unwrap()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_issuer(&[LOCAL_ISSUER]);
        validation.set_audience(&[LOCAL_AUDIENCE]);
        let data = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).unwrap();
        assert_eq!(data.claims["sub"], "dr-peeters");
        assert_eq!(data.claims["practitioner"], "https://www.riziv.be|12345678");
        // Another issuer's key does not verify it.
        let other = tempfile::tempdir().unwrap();
        create_issuer(other.path(), false).unwrap();
        let jwks: jsonwebtoken::jwk::JwkSet =
            serde_json::from_str(&std::fs::read_to_string(other.path().join(JWKS)).unwrap())
                .unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
        assert!(jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).is_err());
        // A clinician token without identifiers is refused at issue.
        let bare = TokenClaims {
            practitioner: None,
            ..claims
        };
        let refused = issue(
            dir.path(),
            &bare,
            LOCAL_ISSUER,
            LOCAL_AUDIENCE,
            SystemTime::now(),
            Duration::from_secs(60),
        );
        assert!(refused.is_err());
    }
}
