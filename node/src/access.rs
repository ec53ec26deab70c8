//! What a caller may do: the one authorisation rule of the public services, applied by every
//! handler before it touches data (docs/security.md, "Roles").
//!
//! | need            | admin | service | clinician                      | patient   | auditor | node |
//! |-----------------|-------|---------|--------------------------------|-----------|---------|------|
//! | cluster map     | yes   | yes     | yes                            | yes       | yes     | yes  |
//! | cluster status  | yes   | yes     | no                             | no        | yes     | yes  |
//! | cluster change  | yes   | no      | no                             | no        | no      | yes  |
//! | Kv (any)        | no    | yes     | no                             | no        | no      | no   |
//! | record read     | no    | yes     | care relationship, or glass    | own, only | no      | no   |
//! | record write    | no    | yes     | care relationship, or glass    | no        | no      | no   |
//! | patient create  | no    | yes     | yes (registration)             | no        | no      | no   |
//! | identifier      | no    | yes     | glass                          | no        | no      | no   |
//! | quarantine      | no    | yes     | no                             | no        | no      | no   |
//! | access log      | no    | yes     | no                             | own, only | yes     | no   |
//! | glass review    | no    | no      | no                             | no        | yes     | no   |
//!
//! A service whose certificate or token names grants (`dossier_api::Grant`) makes only the calls
//! they cover ([`grant_for`]).
//!
//! "Care relationship" means an active CareRelationship naming the clinician or one of their
//! organisations and no active Consent denying them the whole record (`dossier_records::care`;
//! a consent naming kinds of record withholds those only, checked by the handlers through
//! `Audit::check_type`); "glass" means
//! break-the-glass: the request carries `x-dossier-break-glass: <reason>`, and is served and
//! logged as such.

use dossier_api::Grant;
use dossier_api::v1::ResourceType;
use dossier_records::PatientId;
use dossier_records::care::Standing;
use tonic::Request;

use crate::authn::{Caller, Principal, Role};
use crate::errors::ApiError;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The cluster map: every client routes by it.
    Map,
    /// Node and placement status (no clinical data).
    ClusterStatus,
    /// Changes to the cluster: init, join, move, remove, split, drain.
    ClusterChange,
    /// The Kv keyspace of any patient (no record-level rule can apply to raw keys).
    Kv,
    /// A patient's records, read.
    RecordRead,
    /// A patient's records, written.
    RecordWrite,
    /// A new patient registered.
    PatientCreate,
    /// An identifier resolved to the patient holding it.
    Lookup,
    /// Records set aside on import (data stewardship).
    Quarantine,
    /// A patient's audit chain: who accessed the record.
    AccessLog,
    /// The cluster's list of break-the-glass accesses.
    BreakGlassReview,
}

/// The metadata key of a break-the-glass reason.
pub const BREAK_GLASS_HEADER: &str = "x-dossier-break-glass";

/// The shortest and longest break-the-glass reason, in bytes.
const REASON_BYTES: std::ops::RangeInclusive<usize> = 8..=512;

/// On what ground a call is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ground {
    /// No TLS, no identity (`--insecure`).
    Open,
    /// The caller's role allows it.
    Role,
    /// A patient reading their own record.
    Own,
    /// A clinician with an active care relationship.
    Care,
    /// A clinician breaking the glass, with their reason.
    BreakGlass(String),
}

/// The decision on a call, before or after the patient's records are read.
#[derive(Debug)]
pub enum Decision {
    Allowed(Ground),
    /// A clinician's call on a patient: decided by [`Access::with_standing`] once the
    /// patient's care relationships and consents are read.
    NeedsStanding(Access),
}

/// A clinician's pending call on a patient.
#[derive(Debug)]
pub struct Access {
    caller: std::sync::Arc<Caller>,
    glass: Option<String>,
}

impl Access {
    /// Whom the patient's records are read for.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Decides from the clinician's standing with the patient: the ground, and the kinds of
    /// record the patient's consents withhold from the clinician on that ground. Breaking the
    /// glass opens what consents withhold too.
    pub fn with_standing(
        self,
        standing: Standing,
    ) -> Result<(Ground, Vec<ResourceType>), ApiError> {
        if standing.related
            && !standing.denied
            && (standing.withheld.is_empty() || self.glass.is_none())
        {
            return Ok((Ground::Care, standing.withheld));
        }
        if let Some(reason) = self.glass {
            return Ok((Ground::BreakGlass(reason), Vec::new()));
        }
        Err(ApiError::PermissionDenied(if standing.denied {
            format!(
                "a consent of the patient denies {:?} access; in an emergency, break the glass ({BREAK_GLASS_HEADER}: <reason>)",
                self.caller.name
            )
        } else {
            format!(
                "{:?} has no active care relationship with this patient; in an emergency, break the glass ({BREAK_GLASS_HEADER}: <reason>)",
                self.caller.name
            )
        }))
    }
}

/// Decides a call of `request` needing `need` on `patient` (if the call is on one).
pub fn decide<T>(
    request: &Request<T>,
    need: Need,
    patient: Option<&PatientId>,
) -> Result<Decision, ApiError> {
    let caller = match Principal::of(request)? {
        Principal::Open => return Ok(Decision::Allowed(Ground::Open)),
        Principal::Caller(c) => c,
    };
    let role = caller.role;
    let denied = |what: &str| {
        Err(ApiError::PermissionDenied(format!(
            "{:?} (role {}) may not {what}",
            caller.name,
            role.name()
        )))
    };
    match (need, role) {
        (Need::Map, _) => Ok(Decision::Allowed(Ground::Role)),
        (Need::ClusterStatus, Role::Admin | Role::Service | Role::Auditor | Role::Node) => {
            Ok(Decision::Allowed(Ground::Role))
        }
        (Need::ClusterStatus, _) => denied("read the cluster's status"),
        (Need::ClusterChange, Role::Admin | Role::Node) => Ok(Decision::Allowed(Ground::Role)),
        (Need::ClusterChange, _) => denied("change the cluster"),
        (Need::BreakGlassReview, Role::Auditor) => Ok(Decision::Allowed(Ground::Role)),
        (Need::BreakGlassReview, _) => denied("review break-the-glass accesses (auditors only)"),
        (_, Role::Service) => match grant_for(need) {
            Some(grant) if !caller.granted(grant) => denied(&format!(
                "{} (its grants are {}; this call needs {grant})",
                what(need),
                caller
                    .grants
                    .iter()
                    .flatten()
                    .map(|g| g.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            _ => Ok(Decision::Allowed(Ground::Role)),
        },
        (Need::AccessLog, Role::Auditor) => Ok(Decision::Allowed(Ground::Role)),
        (Need::Kv, _) => denied("use the Kv service (services only)"),
        (Need::RecordRead | Need::AccessLog, Role::Patient) => match (&caller.patient, patient) {
            (Some(own), Some(p)) if own == p => Ok(Decision::Allowed(Ground::Own)),
            _ => denied("read another patient's record"),
        },
        (Need::PatientCreate, Role::Clinician) => Ok(Decision::Allowed(Ground::Role)),
        (Need::RecordRead | Need::RecordWrite, Role::Clinician) => {
            Ok(Decision::NeedsStanding(Access {
                glass: break_glass(request)?,
                caller,
            }))
        }
        (Need::Lookup, Role::Clinician) => match break_glass(request)? {
            Some(reason) => Ok(Decision::Allowed(Ground::BreakGlass(reason))),
            None => denied(&format!(
                "resolve an identifier without breaking the glass ({BREAK_GLASS_HEADER}: <reason>); find the patient through the application"
            )),
        },
        (_, Role::Admin) => {
            denied("touch clinical data (separation of duties: admin runs the cluster)")
        }
        (_, Role::Auditor) => denied("touch clinical data (auditors read access logs)"),
        (_, Role::Node) => denied("touch clinical data through the public services"),
        (Need::RecordWrite | Need::PatientCreate, Role::Patient) => {
            denied("write records (a patient reads their own record)")
        }
        (_, Role::Patient | Role::Clinician) => denied("use this call"),
    }
}

/// The grant a service needs for `need`; `None`: any service may.
fn grant_for(need: Need) -> Option<Grant> {
    match need {
        Need::Map | Need::ClusterStatus | Need::ClusterChange | Need::BreakGlassReview => None,
        Need::Kv => Some(Grant::Kv),
        Need::RecordRead => Some(Grant::RecordsRead),
        Need::RecordWrite | Need::Quarantine => Some(Grant::RecordsWrite),
        Need::PatientCreate => Some(Grant::PatientsCreate),
        Need::Lookup => Some(Grant::Lookup),
        Need::AccessLog => Some(Grant::AccessLog),
    }
}

/// What a call needing `need` does, for a refusal.
fn what(need: Need) -> &'static str {
    match need {
        Need::Map => "read the cluster map",
        Need::ClusterStatus => "read the cluster's status",
        Need::ClusterChange => "change the cluster",
        Need::Kv => "use the Kv service",
        Need::RecordRead => "read records",
        Need::RecordWrite => "write records",
        Need::PatientCreate => "register patients",
        Need::Lookup => "resolve identifiers",
        Need::Quarantine => "quarantine records",
        Need::AccessLog => "read access logs",
        Need::BreakGlassReview => "review break-the-glass accesses",
    }
}

/// The break-the-glass reason of `request`, if it gives one.
fn break_glass<T>(request: &Request<T>) -> Result<Option<String>, ApiError> {
    let Some(v) = request.metadata().get(BREAK_GLASS_HEADER) else {
        return Ok(None);
    };
    let reason = v
        .to_str()
        .map_err(|_| ApiError::invalid(BREAK_GLASS_HEADER, "must be text"))?
        .trim();
    if !REASON_BYTES.contains(&reason.len()) {
        return Err(ApiError::InvalidArgument {
            field: BREAK_GLASS_HEADER.into(),
            message: format!(
                "a reason of {} to {} bytes is required",
                REASON_BYTES.start(),
                REASON_BYTES.end()
            ),
            limit: Some(*REASON_BYTES.end() as u64),
        });
    }
    Ok(Some(reason.to_owned()))
}
