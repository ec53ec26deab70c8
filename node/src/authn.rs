//! Who is calling: the identity of every call to the public services (Kv, Records, Admin), taken
//! from a bearer token or the client certificate, put in the request's extensions as a
//! [`Principal`] for the services' authorisation (`access.rs`, docs/security.md).
//!
//! - A bearer token (`authorization: Bearer <JWT>`) is checked against the configured JWKS,
//!   issuer and audience: signature (ES256/ES384/RS256/PS256/EdDSA; never a shared secret),
//!   `exp` (required), `nbf`, `iss`, `aud`. Its claims name the person: `sub`, `role`
//!   (`clinician`, `patient`, `service`, `auditor`, `admin`), for a clinician `practitioner` and
//!   `organizations` (identifiers as `system|value`), for a patient `patient` (their patient id).
//!   A token wins over the certificate of the connection it comes on: an application service
//!   forwarding a clinician's token acts for the clinician (the service is recorded as `via`).
//! - Without a token, the client certificate (already chained to the cluster's CA by rustls)
//!   names the caller: common name = user, organizational unit = role (`dossier cert
//!   create-client`). Certificates carry roles of services and operators only; clinicians and
//!   patients come with tokens.
//! - Neither: UNAUTHENTICATED. Without TLS (`--insecure`) there is no identity to take and every
//!   call is [`Principal::Open`]: development only.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use anyhow::{Context, Result, bail, ensure};
use dossier_api::Grant;
use dossier_records::{Ident, PatientId, care::CareIdentity};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use tonic::{Request, Status};

use crate::errors::ApiError;
use crate::tls::file_stamp;

/// What a caller may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Cluster operations only; no clinical data (separation of duties).
    Admin,
    /// An application service: every patient's data, as the application decides.
    Service,
    /// A patient's records, with an active care relationship or by breaking the glass.
    Clinician,
    /// Their own record, read only.
    Patient,
    /// Access logs and their verification; no clinical data.
    Auditor,
    /// Another node of the cluster (its node certificate): cluster operations.
    Node,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Service => "service",
            Role::Clinician => "clinician",
            Role::Patient => "patient",
            Role::Auditor => "auditor",
            Role::Node => "node",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "service" => Role::Service,
            "clinician" => Role::Clinician,
            "patient" => Role::Patient,
            "auditor" => Role::Auditor,
            "node" => Role::Node,
            _ => return None,
        })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The certificate's common name or the token's `sub`.
    pub name: String,
    pub role: Role,
    /// A clinician's own and organisations' identifiers.
    pub care: CareIdentity,
    /// A patient's own record.
    pub patient: Option<PatientId>,
    /// The certificate of the connection a token came on, when it differs from the caller.
    pub via: Option<String>,
    /// What a service is granted (`dossier_api::Grant`); `None`: every call a service may make.
    pub grants: Option<Vec<Grant>>,
}

impl Caller {
    /// Whether the caller's grants, if it has any, include `grant`.
    pub fn granted(&self, grant: Grant) -> bool {
        self.grants.as_ref().is_none_or(|g| g.contains(&grant))
    }
}

/// The identity a request was served under.
#[derive(Debug, Clone)]
pub enum Principal {
    /// The node runs without TLS (`--insecure`): no identity, no authorisation.
    Open,
    Caller(Arc<Caller>),
}

impl Principal {
    /// The principal the authentication interceptor put on `request`.
    pub fn of<T>(request: &Request<T>) -> Result<Principal, ApiError> {
        request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::Internal("the request passed no authentication".into()))
    }
}

/// Checks bearer tokens: the identity provider's keys, issuer and audience.
pub struct TokenVerifier {
    /// The JWKS file, read again when it changes (the identity provider rolled its keys).
    jwks: PathBuf,
    keys: RwLock<Arc<Keys>>,
    issuer: String,
    audience: String,
}

/// One reading of the JWKS file: its keys, and when it was changed and its size then.
struct Keys {
    stamp: (SystemTime, u64),
    keys: Vec<(Option<String>, DecodingKey, Algorithm)>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("keys", &self.keys().keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

/// The algorithms a token may be signed with: public-key ones only, so that a public key of the
/// JWKS can never be used as an HMAC secret.
const ALGORITHMS: [Algorithm; 5] = [
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::PS256,
    Algorithm::EdDSA,
];

/// Clock skew allowed on `exp` and `nbf`, in seconds.
const LEEWAY_SECONDS: u64 = 30;

/// The longest token accepted, in bytes (a header line; tokens are a few hundred bytes).
const TOKEN_BYTES_MAX: usize = 8 << 10;

impl TokenVerifier {
    /// Reads the JWKS file (`{"keys": [...]}`, as an identity provider publishes it).
    pub fn load(jwks: &Path, issuer: &str, audience: &str) -> Result<TokenVerifier> {
        ensure!(
            !issuer.is_empty(),
            "token-issuer is required with token-jwks"
        );
        ensure!(
            !audience.is_empty(),
            "token-audience is required with token-jwks"
        );
        Ok(TokenVerifier {
            jwks: jwks.to_path_buf(),
            keys: RwLock::new(Arc::new(read_keys(jwks)?)),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
        })
    }

    /// Reads the JWKS file again if it changed since the last reading (or whatever it is when
    /// `force`). `Ok(true)`: the new keys are in use. An error leaves the old ones.
    pub fn reload(&self, force: bool) -> Result<bool> {
        if !force && file_stamp(&self.jwks)? == self.keys().stamp {
            return Ok(false);
        }
        let next = read_keys(&self.jwks)?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        Ok(true)
    }

    fn keys(&self) -> Arc<Keys> {
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The keys of the JWKS file `jwks`: public-key algorithms only, each naming its algorithm.
fn read_keys(jwks: &Path) -> Result<Keys> {
    // Stamped before reading: a change made while reading is seen by the next check.
    let stamp = file_stamp(jwks)?;
    let text = std::fs::read_to_string(jwks).with_context(|| format!("read {}", jwks.display()))?;
    let set: JwkSet = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a JWKS (a JSON {{\"keys\": [...]}})",
            jwks.display()
        )
    })?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let alg = match jwk.common.key_algorithm {
            Some(a) => a
                .to_string()
                .parse::<Algorithm>()
                .with_context(|| format!("{}: key {i}: algorithm", jwks.display()))?,
            None => bail!(
                "{}: key {i} names no algorithm (\"alg\"); one of ES256, ES384, RS256, PS256, EdDSA is required",
                jwks.display()
            ),
        };
        ensure!(
            ALGORITHMS.contains(&alg),
            "{}: key {i}: algorithm {alg:?} is not accepted (public-key algorithms only)",
            jwks.display()
        );
        let key =
            DecodingKey::from_jwk(jwk).with_context(|| format!("{}: key {i}", jwks.display()))?;
        keys.push((jwk.common.key_id.clone(), key, alg));
    }
    ensure!(!keys.is_empty(), "{} holds no key", jwks.display());
    Ok(Keys { stamp, keys })
}

impl TokenVerifier {
    /// The caller a token names, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Caller, String> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(format!(
                "bearer token is {} bytes, above the limit of {TOKEN_BYTES_MAX}",
                token.len()
            ));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| format!("bearer token is not a JWT: {e}"))?;
        let keys = self.keys();
        let candidates: Vec<_> = keys
            .keys
            .iter()
            .filter(|(kid, _, alg)| {
                *alg == header.alg
                    && (header.kid.is_none() || kid.as_deref() == header.kid.as_deref())
            })
            .collect();
        if candidates.is_empty() {
            return Err(format!(
                "bearer token is signed with a key the node does not know (kid {:?}, alg {:?})",
                header.kid, header.alg
            ));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.required_spec_claims =
            HashSet::from(["exp", "iss", "aud", "sub"].map(String::from));
        let mut last = String::new();
        for (_, key, _) in candidates {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => return data.claims.caller(),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => "bearer token has expired".into(),
                        ErrorKind::ImmatureSignature => {
                            "bearer token is not valid yet (nbf)".into()
                        }
                        ErrorKind::InvalidIssuer => {
                            format!("bearer token is not issued by {:?}", self.issuer)
                        }
                        ErrorKind::InvalidAudience => {
                            format!("bearer token is not meant for audience {:?}", self.audience)
                        }
                        ErrorKind::InvalidSignature => "bearer token signature is invalid".into(),
                        ErrorKind::MissingRequiredClaim(c) => {
                            format!("bearer token lacks the {c:?} claim")
                        }
                        _ => format!("bearer token refused: {e}"),
                    };
                    if !matches!(e.kind(), ErrorKind::InvalidSignature) {
                        break;
                    }
                }
            }
        }
        Err(last)
    }
}

/// The claims Dossier reads from a token.
#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    patient: Option<String>,
    #[serde(default)]
    practitioner: Option<String>,
    #[serde(default)]
    organizations: Vec<String>,
    #[serde(default)]
    grants: Option<Vec<String>>,
}

impl Claims {
    fn caller(self) -> Result<Caller, String> {
        let role = Role::parse(&self.role)
            .filter(|r| *r != Role::Node)
            .ok_or_else(|| {
                format!(
                    "bearer token role {:?} is not one of clinician, patient, service, auditor, admin",
                    self.role
                )
            })?;
        let ident = |s: &str, claim: &str| {
            s.split_once('|')
                .filter(|(sys, val)| !sys.is_empty() && !val.is_empty())
                .map(|(system, value)| Ident {
                    system: system.to_owned(),
                    value: value.to_owned(),
                })
                .ok_or_else(|| format!("bearer token claim {claim} must be system|value"))
        };
        let care = CareIdentity {
            practitioner: self
                .practitioner
                .as_deref()
                .map(|p| ident(p, "practitioner"))
                .transpose()?,
            organizations: self
                .organizations
                .iter()
                .map(|o| ident(o, "organizations"))
                .collect::<Result<_, _>>()?,
        };
        let patient = match (&self.patient, role) {
            (Some(p), _) => Some(
                PatientId::parse(p, "patient")
                    .map_err(|e| format!("bearer token claim patient: {e}"))?,
            ),
            (None, Role::Patient) => {
                return Err("bearer token of role patient names no patient (claim patient)".into());
            }
            (None, _) => None,
        };
        if role == Role::Clinician && care.practitioner.is_none() && care.organizations.is_empty() {
            return Err(
                "bearer token of role clinician names neither practitioner nor organizations"
                    .into(),
            );
        }
        let grants = self
            .grants
            .map(|names| grant_list(names.iter().map(String::as_str)))
            .transpose()
            .map_err(|e| format!("bearer token claim grants: {e}"))?;
        Ok(Caller {
            name: self.sub,
            role,
            care,
            patient,
            via: None,
            grants,
        })
    }
}

/// The interceptor in front of the public services: puts the caller's [`Principal`] on every
/// request, or refuses it with UNAUTHENTICATED.
#[derive(Debug, Clone)]
pub struct Authenticate {
    pub tls: bool,
    pub tokens: Option<Arc<TokenVerifier>>,
    /// Limits the calls of clinicians and patients, per identity.
    pub people: Option<Arc<crate::rate_limit::RateLimiter>>,
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if !self.tls {
            request.extensions_mut().insert(Principal::Open);
            return Ok(request);
        }
        let certified = certificate_caller(&request)?;
        let token = match request.metadata().get("authorization") {
            None => None,
            Some(v) => {
                let v = v
                    .to_str()
                    .map_err(|_| unauthenticated("authorization header is not text"))?;
                let token = v
                    .strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .ok_or_else(|| {
                        unauthenticated("authorization header must be \"Bearer <token>\"")
                    })?;
                Some(token.trim().to_owned())
            }
        };
        let caller = match (token, certified) {
            (Some(token), certified) => {
                let Some(tokens) = &self.tokens else {
                    return Err(unauthenticated(
                        "this node accepts no bearer tokens (no token-jwks configured)",
                    ));
                };
                let mut caller = tokens.verify(&token).map_err(|e| unauthenticated(&e))?;
                caller.via = certified.map(|c| c.name);
                caller
            }
            (None, Some(caller)) if matches!(caller.role, Role::Clinician | Role::Patient) => {
                return Err(unauthenticated(&format!(
                    "the client certificate {:?} has role {}: clinicians and patients authenticate with bearer tokens",
                    caller.name,
                    caller.role.name()
                )));
            }
            (None, Some(caller)) => caller,
            (None, None) => {
                return Err(unauthenticated(
                    "no identity: present a client certificate of the cluster's CA (dossier cert create-client) or a bearer token",
                ));
            }
        };
        if let Some(limiter) = &self.people
            && matches!(caller.role, Role::Clinician | Role::Patient)
            && !limiter.admit(&caller.name, std::time::Instant::now())
        {
            return Err(Status::from(ApiError::RateLimited {
                caller: caller.name,
                per_second: limiter.per_second() as u64,
            }));
        }
        request
            .extensions_mut()
            .insert(Principal::Caller(Arc::new(caller)));
        Ok(request)
    }
}

fn unauthenticated(message: &str) -> Status {
    Status::from(ApiError::Unauthenticated(message.to_owned()))
}

/// The caller a client certificate names, if the connection presented one.
fn certificate_caller(request: &Request<()>) -> Result<Option<Caller>, Status> {
    let certs = request.peer_certs();
    let Some(first) = certs.as_deref().and_then(|c| c.first()) else {
        return Ok(None);
    };
    let crate::peer_auth::Subject {
        units,
        name,
        grants,
    } = crate::peer_auth::subject(first.as_ref())
        .ok_or_else(|| unauthenticated("the client certificate cannot be read"))?;
    let role = units.iter().find_map(|u| Role::parse(u)).ok_or_else(|| {
        unauthenticated(&format!(
            "the client certificate {name:?} names no known role (organizational unit {units:?})"
        ))
    })?;
    let grants = grants
        .map(|names| grant_list(names.iter().map(String::as_str)))
        .transpose()
        .map_err(|e| unauthenticated(&format!("the client certificate {name:?}: {e}")))?;
    Ok(Some(Caller {
        name,
        role,
        care: CareIdentity::default(),
        patient: None,
        via: None,
        grants,
    }))
}

/// Grants from their names, sorted, each once; an unknown name is an error.
fn grant_list<'a>(names: impl Iterator<Item = &'a str>) -> Result<Vec<Grant>, String> {
    let mut grants = names.map(Grant::parse).collect::<Result<Vec<_>, _>>()?;
    grants.sort_unstable();
    grants.dedup();
    Ok(grants)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, SystemTime};

    use dossier_cli::tokens::{self, LOCAL_AUDIENCE, LOCAL_ISSUER, TokenClaims};

    use super::TokenVerifier;

    fn token(dir: &std::path::Path) -> String {
        let claims = TokenClaims {
            subject: "ward-app".into(),
            role: "service".into(),
            ..TokenClaims::default()
        };
        tokens::issue(
            dir,
            &claims,
            LOCAL_ISSUER,
            LOCAL_AUDIENCE,
            SystemTime::now(),
            Duration::from_secs(600),
        )
        .unwrap()
    }

    /// The identity provider rolls its key: tokens of the new key are accepted once the JWKS
    /// file changed, those of the old one no longer; a file that does not parse is refused and
    /// the keys in use stay.
    #[test]
    fn token_keys_follow_the_jwks_file() {
        let dir = tempfile::tempdir().unwrap();
        tokens::create_issuer(dir.path(), false).unwrap();
        let jwks = dir.path().join(tokens::JWKS);
        let verifier = TokenVerifier::load(&jwks, LOCAL_ISSUER, LOCAL_AUDIENCE).unwrap();
        let old = token(dir.path());
        assert_eq!(verifier.verify(&old).unwrap().name, "ward-app");
        assert!(!verifier.reload(false).unwrap(), "nothing changed");

        tokens::create_issuer(dir.path(), true).unwrap();
        // The file's time as a later change leaves it, whatever the clock's granularity.
        std::fs::File::options()
            .append(true)
            .open(&jwks)
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        let new = token(dir.path());
        assert!(verifier.verify(&new).is_err(), "a key not yet loaded");
        assert!(verifier.reload(false).unwrap(), "the change was not seen");
        assert_eq!(verifier.verify(&new).unwrap().name, "ward-app");
        assert!(
            verifier.verify(&old).is_err(),
            "the rolled key still passes"
        );

        std::fs::write(&jwks, "{}").unwrap();
        assert!(verifier.reload(true).is_err());
        assert_eq!(verifier.verify(&new).unwrap().name, "ward-app");
    }
}
