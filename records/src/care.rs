//! A clinician's standing with a patient, read from the patient's own records: whether an
//! active CareRelationship names the clinician or one of their organisations, and whether an
//! active Consent denies them. The node's authorisation decides with it (docs/security.md).
//!
//! The rules, all evaluated at `now`:
//! - a CareRelationship counts when its status is ACTIVE, its period has started and not ended,
//!   it is not entered-in-error, and its participant is the clinician's practitioner identifier
//!   or one of their organisation identifiers;
//! - a Consent denies when its status is ACTIVE, its decision is DENY, its period (if any)
//!   covers now, it is not entered-in-error, and one of its actors is the clinician or one of
//!   their organisations. A denying consent without `resource_types` denies the whole record;
//!   one with `resource_types` withholds those kinds of record only (the call is refused when it
//!   names one, and Everything leaves them out).

use dossier_api::v1::{
    CareRelationshipStatus, ConsentDecision, ConsentStatus, RecordStatus, Reference, Resource,
    reference, resource,
};

use crate::keys::{Ident, PatientKeys};
use crate::kv::Reads;
use crate::{Error, plan, type_name};

/// Whom a clinician acts as: their own identifier and their organisations'.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CareIdentity {
    pub practitioner: Option<Ident>,
    pub organizations: Vec<Ident>,
}

impl CareIdentity {
    /// The practitioner's identifier, then the organisations'.
    pub fn idents(&self) -> impl Iterator<Item = &Ident> {
        self.practitioner.iter().chain(&self.organizations)
    }

    fn names(&self, r: Option<&Reference>) -> bool {
        let Some(reference::Target::Identifier(x)) = r.and_then(|r| r.target.as_ref()) else {
            return false;
        };
        self.idents()
            .any(|i| i.system == x.system && i.value == x.value)
    }
}

/// What the patient's records say of a clinician.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Standing {
    /// An active care relationship names them.
    pub related: bool,
    /// An active consent denies them the whole record.
    pub denied: bool,
    /// Kinds of record active consents withhold from them (the rest stays open).
    pub withheld: Vec<dossier_api::v1::ResourceType>,
}

/// The most records of one kind a standing check reads; a patient with more care relationships
/// or consents than this is refused with a clear error rather than read without bound.
pub const STANDING_RECORDS_MAX: usize = 1_000;

/// Reads the patient's care relationships and consents and says where `who` stands at
/// `now_micros`.
pub fn standing<R: Reads>(
    reads: &R,
    keys: &PatientKeys,
    who: &CareIdentity,
    now_micros: i64,
) -> Result<Standing, R::Error> {
    let mut standing = Standing::default();
    for resource in current(reads, keys, dossier_api::v1::ResourceType::CareRelationship)? {
        if let Some(resource::Kind::CareRelationship(c)) = &resource.kind
            && c.status == CareRelationshipStatus::Active as i32
            && covers(c.period.as_ref(), now_micros)
            && who.names(c.participant.as_ref())
        {
            standing.related = true;
        }
    }
    for resource in current(reads, keys, dossier_api::v1::ResourceType::Consent)? {
        if let Some(resource::Kind::Consent(c)) = &resource.kind
            && c.status == ConsentStatus::Active as i32
            && c.decision == ConsentDecision::Deny as i32
            && covers(c.period.as_ref(), now_micros)
            && c.actors.iter().any(|a| who.names(a.reference.as_ref()))
        {
            if c.resource_types.is_empty() {
                standing.denied = true;
            }
            for t in &c.resource_types {
                if let Ok(t) = dossier_api::v1::ResourceType::try_from(*t)
                    && !standing.withheld.contains(&t)
                {
                    standing.withheld.push(t);
                }
            }
        }
    }
    Ok(standing)
}

/// The current versions of the patient's records of type `t` that are not entered-in-error.
fn current<R: Reads>(
    reads: &R,
    keys: &PatientKeys,
    t: dossier_api::v1::ResourceType,
) -> Result<Vec<Resource>, R::Error> {
    let name = type_name(t).expect("a modelled type");
    let prefix = keys.head(name, "");
    let heads = reads.scan_prefix(&prefix, None, STANDING_RECORDS_MAX + 1)?;
    if heads.len() > STANDING_RECORDS_MAX {
        return Err(Error::InvalidArgument {
            field: "route.patient_id".into(),
            message: format!(
                "the patient holds more than {STANDING_RECORDS_MAX} {name} records; the access check reads at most that many"
            ),
            limit: Some(STANDING_RECORDS_MAX as u64),
        }
        .into());
    }
    let mut out = Vec::with_capacity(heads.len());
    for (key, value) in heads {
        let id = std::str::from_utf8(&key[prefix.len()..])
            .map_err(|_| Error::corrupt(format!("{name} head key")))?;
        let version = crate::keys::be_u64(&value)
            .ok_or_else(|| Error::corrupt(format!("head of {name}/{id}")))?;
        let r = plan::version(reads, keys, name, id, version)?;
        if r.meta.as_ref().map(|m| m.status) != Some(RecordStatus::EnteredInError as i32) {
            out.push(r);
        }
    }
    Ok(out)
}

/// Whether `period` (open bounds allowed) covers `now`.
fn covers(period: Option<&dossier_api::v1::Period>, now: i64) -> bool {
    let Some(p) = period else { return true };
    let started = p.start.as_ref().is_none_or(|s| s.unix_micros <= now);
    let not_ended = p.end.as_ref().is_none_or(|e| now < e.unix_micros);
    started && not_ended
}
