//! The audit of every access to a patient's record: each allowed Records call on a patient adds
//! an [`AuditEvent`] to the patient's own hash-chained log (`P 0x01 A`, `P 0x01 a/<seq>`, in the
//! patient's shard; `dossier_storage::chain`). A write carries its event in the same atomic
//! batch; a read's event is made durable in the node's audit journal before the data leaves the
//! node, then moved to the chain (`audit_journal.rs`, `audit_batch.rs`). Only calls with an identity are
//! audited: a node without TLS (`--insecure`) has no one to name.

use bytes::Bytes;
use dossier_api::v1::{AuditAction, AuditEvent, AuditGround, Identifier, RecordRef, ResourceType};
use dossier_records::kv;
use dossier_records::{PatientId, PatientKeys};
use prost::Message;

use crate::access::Ground;
use crate::authn::{Caller, Principal};
use crate::errors::ApiError;

/// Who a call is served for and on what ground: the parts of its audit event known before the
/// call runs (`None`: not audited), and the kinds of record the patient's consents withhold
/// from the caller on that ground.
#[derive(Debug, Clone)]
pub struct Audit {
    event: Option<AuditEvent>,
    withheld: Vec<ResourceType>,
}

impl Audit {
    /// The audit of a call `principal` makes on `ground`, served by `node_id`.
    pub fn new(principal: &Principal, ground: &Ground, node_id: u64) -> Audit {
        let none = Audit {
            event: None,
            withheld: Vec::new(),
        };
        let Principal::Caller(caller) = principal else {
            return none;
        };
        let (ground, reason) = match ground {
            Ground::Open => return none,
            Ground::Role => (AuditGround::Role, String::new()),
            Ground::Own => (AuditGround::Own, String::new()),
            Ground::Care => (AuditGround::Care, String::new()),
            Ground::BreakGlass(reason) => (AuditGround::BreakGlass, reason.clone()),
        };
        Audit {
            event: Some(AuditEvent {
                actor: caller.name.clone(),
                role: caller.role.name().to_owned(),
                via: caller.via.clone().unwrap_or_default(),
                actor_identifiers: identifiers(caller),
                ground: ground as i32,
                reason,
                node_id,
                ..AuditEvent::default()
            }),
            withheld: Vec::new(),
        }
    }

    /// The same, with `types` withheld from the caller by the patient's consents.
    pub fn withholding(self, types: Vec<ResourceType>) -> Audit {
        Audit {
            withheld: types,
            ..self
        }
    }

    /// Whether the patient's consents withhold records of type `t` from the caller.
    pub fn withholds(&self, t: ResourceType) -> bool {
        self.withheld.contains(&t)
    }

    /// Refuses a call on records of type `t` (its wire value) that the patient's consents
    /// withhold.
    pub fn check_type(&self, t: i32) -> Result<(), ApiError> {
        let Some(t) = ResourceType::try_from(t)
            .ok()
            .filter(|t| self.withholds(*t))
        else {
            return Ok(());
        };
        Err(ApiError::PermissionDenied(format!(
            "a consent of the patient withholds {} records from {:?}; in an emergency, break the glass ({}: <reason>)",
            dossier_records::type_name(t).unwrap_or("these"),
            self.event
                .as_ref()
                .map_or("the caller", |e| e.actor.as_str()),
            crate::access::BREAK_GLASS_HEADER
        )))
    }

    /// The op appending the event of `action` on `records` (or `types`) to the patient's chain,
    /// or None when the call is not audited.
    pub fn op(
        &self,
        keys: &PatientKeys,
        action: AuditAction,
        records: Vec<RecordRef>,
        types: &[ResourceType],
    ) -> Option<kv::Op> {
        let mut event = self.event.clone()?;
        event.records = records;
        event.types = types.iter().map(|t| *t as i32).collect();
        Some(append(keys, action, event))
    }

    /// As [`Self::op`], for a Kv call on `patient`'s `kv_keys` (the caller's keys, without the
    /// patient's prefix).
    pub fn kv_op(
        &self,
        patient: &PatientId,
        action: AuditAction,
        kv_keys: Vec<Vec<u8>>,
    ) -> Option<kv::Op> {
        let mut event = self.event.clone()?;
        event.kv_keys = kv_keys;
        Some(append(&PatientKeys::new(patient), action, event))
    }
}

/// The append of `event`, stamped now with `action`, to the chain of `keys`' patient.
fn append(keys: &PatientKeys, action: AuditAction, mut event: AuditEvent) -> kv::Op {
    event.time_micros = dossier_records::now_micros() as i64;
    event.action = action as i32;
    kv::Op::Append {
        head: keys.audit_head(),
        prefix: keys.audit_entries(),
        value: Bytes::from(event.encode_to_vec()),
    }
}

fn identifiers(caller: &Caller) -> Vec<Identifier> {
    caller
        .care
        .idents()
        .map(|x| Identifier {
            system: x.system.clone(),
            value: x.value.clone(),
            r#type: None,
        })
        .collect()
}
