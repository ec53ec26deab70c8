//! A patient's access log as FHIR R4 AuditEvent resources (the "who looked at my record" feed of
//! a patient portal, and the exchange format auditors expect).
//!
//! Mapping of one `AuditEvent` of the chain (entry `seq` of patient P):
//! - `id` = `P-audit-<seq>`; `type` = DICOM 110110 "Patient Record"; `subtype` = the FHIR
//!   restful interaction (`read`, `vread`, `history-instance`, `search-type`, `create`, `update`,
//!   `delete`, `transaction`); `action` = C, R, U, D or E; `recorded` = the event's time;
//!   `outcome` = 0 (only allowed accesses are recorded);
//! - `agent[0]`: who (`who.identifier` for each of a clinician's identifiers, else
//!   `who.display` = the actor's name), `type` = the role, `requestor` = true; for
//!   break-the-glass `purposeOfUse` = v3-ActReason BTG with the reason as text; `agent[1]`: the
//!   service a token came through, if any;
//! - `source.observer.display` = the serving node; `entity`: the patient, then each record named
//!   (`what.reference` = `Type/id`), or the kinds asked for (`what.display`), or Kv keys.

use dossier_api::v1::{AuditAction, AuditEvent, AuditGround, ResourceType};
use serde_json::{Value, json};

use crate::time::format_instant;

const DICOM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const RESTFUL: &str = "http://hl7.org/fhir/restful-interaction";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
const DOSSIER_ROLES: &str = "https://dossier.example/fhir/CodeSystem/role";

/// The FHIR AuditEvent of entry `seq` of `patient`'s access log.
pub fn audit_event_to_fhir(patient: &str, seq: u64, e: &AuditEvent) -> Value {
    let action = AuditAction::try_from(e.action).unwrap_or(AuditAction::Unspecified);
    let (interaction, crude) = match action {
        AuditAction::Read
        | AuditAction::KvGet
        | AuditAction::ListQuarantine
        | AuditAction::AccessLog => ("read", "R"),
        AuditAction::Vread => ("vread", "R"),
        AuditAction::History => ("history-instance", "R"),
        AuditAction::Everything
        | AuditAction::Search
        | AuditAction::KvScan
        | AuditAction::LookupIdentifier => ("search-type", "E"),
        AuditAction::CreatePatient | AuditAction::Create => ("create", "C"),
        AuditAction::Update
        | AuditAction::KvPut
        | AuditAction::KvCompareAndSet
        | AuditAction::Quarantine => ("update", "U"),
        AuditAction::Delete | AuditAction::KvDelete => ("delete", "D"),
        AuditAction::Transaction | AuditAction::KvBatch => ("transaction", "E"),
        AuditAction::Unspecified => ("operation", "E"),
    };
    let who = if e.actor_identifiers.is_empty() {
        json!({"display": e.actor})
    } else {
        let x = &e.actor_identifiers[0];
        json!({"identifier": {"system": x.system, "value": x.value}, "display": e.actor})
    };
    let mut agent = json!({
        "type": {"coding": [{"system": DOSSIER_ROLES, "code": e.role}]},
        "who": who,
        "requestor": true,
    });
    if e.ground == AuditGround::BreakGlass as i32 {
        agent["purposeOfUse"] = json!([{
            "coding": [{"system": ACT_REASON, "code": "BTG", "display": "break the glass"}],
            "text": e.reason,
        }]);
    }
    let mut agents = vec![agent];
    if !e.via.is_empty() {
        agents.push(json!({"who": {"display": e.via}, "requestor": false}));
    }
    let mut entities = vec![json!({"what": {"reference": format!("Patient/{patient}")}})];
    entities.extend(e.records.iter().map(|r| {
        let t = ResourceType::try_from(r.r#type)
            .ok()
            .map(crate::fhir_type)
            .unwrap_or("Resource");
        json!({"what": {"reference": format!("{t}/{}", r.id)}})
    }));
    entities.extend(e.types.iter().map(|t| {
        let t = ResourceType::try_from(*t)
            .ok()
            .map(crate::fhir_type)
            .unwrap_or("Resource");
        json!({"what": {"display": format!("{t} records")}})
    }));
    entities.extend(
        e.kv_keys
            .iter()
            .map(|k| json!({"what": {"display": format!("key {}", String::from_utf8_lossy(k))}})),
    );
    json!({
        "resourceType": "AuditEvent",
        "id": format!("{patient}-audit-{seq}"),
        "type": {"system": DICOM, "code": "110110", "display": "Patient Record"},
        "subtype": [{"system": RESTFUL, "code": interaction}],
        "action": crude,
        "recorded": format_instant(e.time_micros),
        "outcome": "0",
        "agent": agents,
        "source": {"observer": {"display": format!("dossier node {}", e.node_id)}},
        "entity": entities,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dossier_api::v1::{Identifier, RecordRef};

    #[test]
    fn a_break_the_glass_read_maps_to_a_flagged_read_of_the_record() {
        let e = AuditEvent {
            time_micros: 1_796_000_000_000_000,
            actor: "dr-other".into(),
            role: "clinician".into(),
            via: "ward-app".into(),
            actor_identifiers: vec![Identifier {
                system: "https://nihdi.example".into(),
                value: "19999999999".into(),
                r#type: None,
            }],
            action: AuditAction::Read as i32,
            records: vec![RecordRef {
                r#type: ResourceType::Observation as i32,
                id: "obs-1".into(),
            }],
            ground: AuditGround::BreakGlass as i32,
            reason: "unconscious in the ER".into(),
            node_id: 2,
            ..AuditEvent::default()
        };
        let f = audit_event_to_fhir("p-1", 7, &e);
        assert_eq!(f["resourceType"], "AuditEvent");
        assert_eq!(f["id"], "p-1-audit-7");
        assert_eq!(f["action"], "R");
        assert_eq!(f["subtype"][0]["code"], "read");
        assert_eq!(f["outcome"], "0");
        assert_eq!(f["agent"][0]["who"]["identifier"]["value"], "19999999999");
        assert_eq!(f["agent"][0]["purposeOfUse"][0]["coding"][0]["code"], "BTG");
        assert_eq!(
            f["agent"][0]["purposeOfUse"][0]["text"],
            "unconscious in the ER"
        );
        assert_eq!(f["agent"][1]["who"]["display"], "ward-app");
        assert_eq!(f["entity"][0]["what"]["reference"], "Patient/p-1");
        assert_eq!(f["entity"][1]["what"]["reference"], "Observation/obs-1");
        assert!(f["recorded"].as_str().unwrap().starts_with("2026-"));
    }
}
