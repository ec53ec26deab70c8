//! Authentication and authorisation on real nodes with TLS and bearer tokens: every caller
//! (service, admin, auditor, clinicians by practitioner and by organisation, a patient, callers
//! with no, expired, misdirected or forged credentials) × every kind of call (Kv read and
//! write, record read, write, history, Everything, identifier lookup, cluster map, status,
//! change) × patients with and without a care relationship, with a denying consent, with an
//! ended relationship, with and without break-the-glass. The expected answer of each cell is
//! written out here from the rules of docs/security.md, independently of the node's code, and
//! every cell is asserted: an allowed call succeeds, a refused one gets exactly
//! PERMISSION_DENIED or UNAUTHENTICATED.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{ADMIN_USER, SERVICE_USER, TestCluster, make_certs, secure};
use dossier_api::v1::admin_client::AdminClient;
use dossier_api::v1::kv_client::KvClient;
use dossier_api::v1::records_client::RecordsClient;
use dossier_api::v1::{
    AccessLogRequest, AuditAction, AuditGround, CareRelationship, CareRelationshipStatus,
    ClusterMapRequest, CodeableConcept, Coding, Consent, ConsentActor, ConsentDecision,
    ConsentStatus, CreateRecordRequest, DateTime, EntityType, EverythingRequest, GetRequest,
    HistoryRequest, HumanName, Identifier, LookupIdentifierRequest, Meta, NodeStatusRequest,
    Observation, ObservationStatus, ObservationValue, Patient, Period, PutRequest, Quantity,
    ReadConsistency, ReadRecordRequest, Reference, RemoveNodeRequest, Resource, ResourceType,
    RouteHeader, WriteHeader, observation_value, reference, resource,
};
use dossier_cli::tokens::{self, LOCAL_AUDIENCE, LOCAL_ISSUER, TokenClaims};
use dossier_client::{ClientTls, WriteOptions, is_applied};
use tonic::Code;
use tonic::transport::Channel;

const NIHDI: &str = "https://www.ehealth.fgov.be/standards/fhir/core/NamingSystem/nihdi";
const ORGS: &str =
    "https://www.ehealth.fgov.be/standards/fhir/core/NamingSystem/nihdi-organization";
const DR_X: &str = "10000001";
const DR_Z: &str = "10000002";
const WARD_O: &str = "71000001";
const DAY_MICROS: i64 = 86_400_000_000;

/// The patients, by their standing with the clinicians.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    /// An active care relationship with Dr X.
    CaredByX,
    /// No care relationship at all.
    Nobody,
    /// A relationship with Dr X and an active consent denying Dr X.
    DeniesX,
    /// A relationship with Dr X that ended yesterday.
    EndedX,
    /// An active relationship with ward O (Dr Z works for it).
    CaredByWard,
}

const PATIENTS: [Who; 5] = [
    Who::CaredByX,
    Who::Nobody,
    Who::DeniesX,
    Who::EndedX,
    Who::CaredByWard,
];

fn patient_id(who: Who) -> &'static str {
    match who {
        Who::CaredByX => "acl-cared-x",
        Who::Nobody => "acl-nobody",
        Who::DeniesX => "acl-denies-x",
        Who::EndedX => "acl-ended-x",
        Who::CaredByWard => "acl-cared-ward",
    }
}

/// The callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Service,
    Admin,
    Auditor,
    DrX,
    DrZ,
    /// The patient `Who::CaredByX`, through the portal.
    PatientX,
    NoIdentity,
    Expired,
    WrongAudience,
    Forged,
}

const CALLERS: [Caller; 10] = [
    Caller::Service,
    Caller::Admin,
    Caller::Auditor,
    Caller::DrX,
    Caller::DrZ,
    Caller::PatientX,
    Caller::NoIdentity,
    Caller::Expired,
    Caller::WrongAudience,
    Caller::Forged,
];

/// The auditor reading the chains at the end of the matrix.
const CHAIN_READER: &str = "chain-reader";

/// The calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    KvGet,
    KvPut,
    Read,
    Create,
    History,
    Everything,
    Lookup,
    AccessLog,
    Map,
    Status,
    Change,
}

const OPS: [Op; 11] = [
    Op::KvGet,
    Op::KvPut,
    Op::Read,
    Op::Create,
    Op::History,
    Op::Everything,
    Op::Lookup,
    Op::AccessLog,
    Op::Map,
    Op::Status,
    Op::Change,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Allowed,
    Denied,
    Unauthenticated,
}

/// The rules of docs/security.md, written out.
fn expected(caller: Caller, op: Op, who: Who, glass: bool) -> Expect {
    use Expect::*;
    let on_patient = matches!(op, Op::Read | Op::Create | Op::History | Op::Everything);
    match caller {
        Caller::NoIdentity | Caller::Expired | Caller::WrongAudience | Caller::Forged => {
            Unauthenticated
        }
        _ if op == Op::Map => Allowed,
        Caller::Service => match op {
            Op::Change => Denied,
            _ => Allowed,
        },
        Caller::Admin => match op {
            Op::Status | Op::Change => Allowed,
            _ => Denied,
        },
        Caller::Auditor => match op {
            Op::Status | Op::AccessLog => Allowed,
            _ => Denied,
        },
        Caller::PatientX => match op {
            Op::Read | Op::History | Op::Everything | Op::AccessLog if who == Who::CaredByX => {
                Allowed
            }
            _ => Denied,
        },
        Caller::DrX | Caller::DrZ => {
            let related = match caller {
                Caller::DrX => who == Who::CaredByX,
                _ => who == Who::CaredByWard,
            };
            match op {
                _ if on_patient && (related || glass) => Allowed,
                Op::Lookup if glass => Allowed,
                _ => Denied,
            }
        }
    }
}

/// The event an allowed call leaves on its patient's audit chain: who, what, on what ground.
fn audit_event(caller: Caller, op: Op, who: Who, glass: bool) -> Option<(String, i32, i32)> {
    let action = match op {
        Op::KvGet => AuditAction::KvGet,
        Op::KvPut => AuditAction::KvPut,
        Op::Read => AuditAction::Read,
        Op::Create => AuditAction::Create,
        Op::History => AuditAction::History,
        Op::Everything => AuditAction::Everything,
        Op::AccessLog => AuditAction::AccessLog,
        _ => return None,
    };
    let (actor, ground) = match caller {
        Caller::Service => (SERVICE_USER, AuditGround::Role),
        Caller::Auditor => ("audit-1", AuditGround::Role),
        Caller::PatientX => ("portal-user-1", AuditGround::Own),
        Caller::DrX if who == Who::CaredByX => ("dr-x", AuditGround::Care),
        Caller::DrZ if who == Who::CaredByWard => ("dr-z", AuditGround::Care),
        Caller::DrX if glass => ("dr-x", AuditGround::BreakGlass),
        Caller::DrZ if glass => ("dr-z", AuditGround::BreakGlass),
        _ => return None,
    };
    Some((actor.to_owned(), action as i32, ground as i32))
}

fn meta(id: &str) -> Option<Meta> {
    Some(Meta {
        id: id.into(),
        ..Meta::default()
    })
}

fn record(id: &str, kind: resource::Kind) -> Resource {
    Resource {
        meta: meta(id),
        kind: Some(kind),
        unmodelled_json: String::new(),
    }
}

fn identifier_ref(entity: EntityType, system: &str, value: &str) -> Option<Reference> {
    Some(Reference {
        target: Some(reference::Target::Identifier(Identifier {
            system: system.into(),
            value: value.into(),
            r#type: None,
        })),
        entity_type: entity as i32,
        display: String::new(),
    })
}

fn at(micros: i64) -> Option<DateTime> {
    Some(DateTime {
        unix_micros: micros,
        precision: dossier_api::v1::DatePrecision::Time as i32,
        utc_offset_minutes: 0,
    })
}

fn concept(system: &str, code: &str) -> Option<CodeableConcept> {
    Some(CodeableConcept {
        codings: vec![Coding {
            system: system.into(),
            code: code.into(),
            display: String::new(),
        }],
        text: String::new(),
    })
}

fn relationship(id: &str, entity: EntityType, system: &str, value: &str, ended: bool) -> Resource {
    let now = dossier_records::now_micros() as i64;
    record(
        id,
        resource::Kind::CareRelationship(CareRelationship {
            status: CareRelationshipStatus::Active as i32,
            participant: identifier_ref(entity, system, value),
            period: Some(Period {
                start: at(now - 30 * DAY_MICROS),
                end: if ended { at(now - DAY_MICROS) } else { None },
            }),
            ..CareRelationship::default()
        }),
    )
}

fn consent_denying(id: &str, value: &str) -> Resource {
    record(
        id,
        resource::Kind::Consent(Consent {
            status: ConsentStatus::Active as i32,
            scope: concept(
                "http://terminology.hl7.org/CodeSystem/consentscope",
                "patient-privacy",
            ),
            categories: vec![concept("http://loinc.org", "59284-0").unwrap()],
            decision: ConsentDecision::Deny as i32,
            actors: vec![ConsentActor {
                role: concept(
                    "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                    "IRCP",
                ),
                reference: identifier_ref(EntityType::Practitioner, NIHDI, value),
            }],
            ..Consent::default()
        }),
    )
}

fn observation(id: &str) -> Resource {
    record(
        id,
        resource::Kind::Observation(Observation {
            status: ObservationStatus::Final as i32,
            code: concept("http://loinc.org", "8302-2"),
            value: Some(ObservationValue {
                kind: Some(observation_value::Kind::Quantity(Quantity {
                    value: "172".into(),
                    unit: "cm".into(),
                    ..Quantity::default()
                })),
            }),
            ..Observation::default()
        }),
    )
}

fn route(patient: &str) -> Option<RouteHeader> {
    // Shard 0: the node routes (every node holds every shard here).
    Some(RouteHeader {
        shard_id: 0,
        epoch: 0,
        patient_id: patient.into(),
    })
}

/// The credentials of a caller: a TLS identity and maybe a token.
struct Credentials {
    channel: Channel,
    token: Option<String>,
}

fn token(dir: &Path, claims: TokenClaims, audience: &str, issued: SystemTime) -> String {
    tokens::issue(
        dir,
        &claims,
        LOCAL_ISSUER,
        audience,
        issued,
        Duration::from_secs(3600),
    )
    .unwrap()
}

async fn credentials(caller: Caller, certs: &Path, forger: &Path, addr: &str) -> Credentials {
    let user = match caller {
        Caller::Service => Some(SERVICE_USER),
        Caller::Admin => Some(ADMIN_USER),
        Caller::Auditor => Some("audit-1"),
        _ => None,
    };
    let channel = ClientTls::from_certs_dir(certs, user)
        .unwrap()
        .endpoint(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let clinician = |sub: &str, practitioner: Option<&str>, orgs: &[&str]| TokenClaims {
        subject: sub.into(),
        role: "clinician".into(),
        practitioner: practitioner.map(|v| format!("{NIHDI}|{v}")),
        organizations: orgs.iter().map(|o| format!("{ORGS}|{o}")).collect(),
        patient: None,
        grants: Vec::new(),
    };
    let now = SystemTime::now();
    let token = match caller {
        Caller::DrX => Some(token(
            certs,
            clinician("dr-x", Some(DR_X), &[]),
            LOCAL_AUDIENCE,
            now,
        )),
        Caller::DrZ => Some(token(
            certs,
            clinician("dr-z", Some(DR_Z), &[WARD_O]),
            LOCAL_AUDIENCE,
            now,
        )),
        Caller::PatientX => Some(token(
            certs,
            TokenClaims {
                subject: "portal-user-1".into(),
                role: "patient".into(),
                patient: Some(patient_id(Who::CaredByX).into()),
                ..TokenClaims::default()
            },
            LOCAL_AUDIENCE,
            now,
        )),
        // Issued two hours ago for one hour: past its expiry and the clock-skew leeway.
        Caller::Expired => Some(token(
            certs,
            clinician("dr-x", Some(DR_X), &[]),
            LOCAL_AUDIENCE,
            now - Duration::from_secs(7200),
        )),
        Caller::WrongAudience => Some(token(
            certs,
            clinician("dr-x", Some(DR_X), &[]),
            "another-cluster",
            now,
        )),
        // Another issuer's key, with the same key id: the signature does not verify.
        Caller::Forged => Some(token(
            forger,
            clinician("dr-x", Some(DR_X), &[]),
            LOCAL_AUDIENCE,
            now,
        )),
        _ => None,
    };
    Credentials { channel, token }
}

fn request<T>(message: T, creds: &Credentials, glass: bool) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(Duration::from_secs(5));
    if let Some(t) = &creds.token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if glass {
        r.metadata_mut().insert(
            "x-dossier-break-glass",
            "unconscious patient in the emergency room".parse().unwrap(),
        );
    }
    r
}

/// Makes the call; Ok for an answer, the status code for a refusal.
async fn call(op: Op, who: Who, creds: &Credentials, glass: bool, n: usize) -> Result<(), Code> {
    let pid = patient_id(who);
    let ch = creds.channel.clone();
    let linear = ReadConsistency::Linearizable as i32;
    let result = match op {
        Op::KvGet => KvClient::new(ch)
            .get(request(
                GetRequest {
                    route: route(pid),
                    key: b"k".to_vec(),
                    consistency: linear,
                },
                creds,
                glass,
            ))
            .await
            .map(drop),
        Op::KvPut => KvClient::new(ch)
            .put(request(
                PutRequest {
                    route: route(pid),
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                    ..PutRequest::default()
                },
                creds,
                glass,
            ))
            .await
            .map(drop),
        Op::Read => RecordsClient::new(ch)
            .read(request(
                ReadRecordRequest {
                    route: route(pid),
                    r#type: ResourceType::Observation as i32,
                    id: "obs-1".into(),
                    consistency: linear,
                },
                creds,
                glass,
            ))
            .await
            .map(|r| assert!(r.into_inner().found, "{pid}: obs-1 not found")),
        Op::Create => RecordsClient::new(ch)
            .create(request(
                CreateRecordRequest {
                    route: route(pid),
                    header: Some(WriteHeader {
                        // 16 bytes, unique per cell.
                        request_id: format!("acl-{n:012}").into_bytes(),
                        author: None,
                    }),
                    resource: Some(observation(&format!("obs-acl-{n}"))),
                },
                creds,
                glass,
            ))
            .await
            .map(|r| {
                let w = r.into_inner();
                assert!(is_applied(&w), "{pid}: create not applied: {w:?}");
            }),
        Op::History => RecordsClient::new(ch)
            .history(request(
                HistoryRequest {
                    route: route(pid),
                    r#type: ResourceType::Observation as i32,
                    id: "obs-1".into(),
                    limit: 10,
                    ..HistoryRequest::default()
                },
                creds,
                glass,
            ))
            .await
            .map(drop),
        Op::Everything => {
            match RecordsClient::new(ch)
                .everything(request(
                    EverythingRequest {
                        route: route(pid),
                        consistency: linear,
                        ..EverythingRequest::default()
                    },
                    creds,
                    glass,
                ))
                .await
            {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    let mut records = 0;
                    while let Some(page) = stream.message().await.map_err(|s| s.code())? {
                        records += page.resources.len();
                    }
                    assert!(records >= 2, "{pid}: Everything streamed {records} records");
                    Ok(())
                }
                Err(s) => Err(s),
            }
        }
        Op::Lookup => {
            let x = format!("mpi:{}|{}", dossier_records::SYSTEM_INSZ, "85073003328");
            RecordsClient::new(ch)
                .lookup_identifier(request(
                    LookupIdentifierRequest {
                        route: route(&x),
                        system: dossier_records::SYSTEM_INSZ.into(),
                        value: "85073003328".into(),
                        consistency: linear,
                    },
                    creds,
                    glass,
                ))
                .await
                .map(drop)
        }
        Op::AccessLog => RecordsClient::new(ch)
            .access_log(request(
                AccessLogRequest {
                    route: route(pid),
                    consistency: linear,
                    ..AccessLogRequest::default()
                },
                creds,
                glass,
            ))
            .await
            .map(|r| assert!(r.into_inner().head_seq > 0, "{pid}: an empty audit chain")),
        Op::Map => AdminClient::new(ch)
            .get_cluster_map(request(ClusterMapRequest {}, creds, glass))
            .await
            .map(drop),
        Op::Status => AdminClient::new(ch)
            .node_status(request(NodeStatusRequest::default(), creds, glass))
            .await
            .map(drop),
        // Removing a node that does not exist: refused for its argument once authorised.
        Op::Change => match AdminClient::new(ch)
            .remove_node(request(RemoveNodeRequest { node_id: 999 }, creds, glass))
            .await
        {
            Ok(_) => panic!("node 999 was removed"),
            Err(s) if matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated) => Err(s),
            Err(_) => Ok(()),
        },
    };
    result.map_err(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_gets_exactly_the_calls_its_rules_allow() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    for auditor in ["audit-1", CHAIN_READER] {
        dossier_cli::certs::create_client(
            certs.path(),
            auditor,
            "auditor",
            dossier_cli::certs::Lifetimes::default(),
            false,
        )
        .unwrap();
    }
    let forger = tempfile::tempdir().unwrap();
    tokens::create_issuer(forger.path(), false).unwrap();
    let dir = certs.path().to_path_buf();
    // One data shard on every node, so that any node holds every patient.
    let cluster = TestCluster::start(3, 1, 3, &|c| secure(c, &dir)).await;

    // The patients and their standing, written by the service.
    let service = cluster.client().await;
    let options = WriteOptions::default();
    let mut events: std::collections::BTreeMap<Who, Vec<(String, i32, i32)>> = Default::default();
    let by_service = |action: AuditAction| {
        (
            SERVICE_USER.to_owned(),
            action as i32,
            AuditGround::Role as i32,
        )
    };
    for who in PATIENTS {
        let pid = patient_id(who);
        let patient = record(
            pid,
            resource::Kind::Patient(Patient {
                names: vec![HumanName {
                    family: "Janssens".into(),
                    given: vec!["Els".into()],
                    ..HumanName::default()
                }],
                ..Patient::default()
            }),
        );
        assert!(is_applied(
            &service.create_patient(patient, &options).await.unwrap()
        ));
        events
            .entry(who)
            .or_default()
            .push(by_service(AuditAction::CreatePatient));
        let mut records = vec![observation("obs-1")];
        match who {
            Who::CaredByX => records.push(relationship(
                "cr-1",
                EntityType::Practitioner,
                NIHDI,
                DR_X,
                false,
            )),
            Who::Nobody => {}
            Who::DeniesX => {
                records.push(relationship(
                    "cr-1",
                    EntityType::Practitioner,
                    NIHDI,
                    DR_X,
                    false,
                ));
                records.push(consent_denying("consent-1", DR_X));
            }
            Who::EndedX => records.push(relationship(
                "cr-1",
                EntityType::Practitioner,
                NIHDI,
                DR_X,
                true,
            )),
            Who::CaredByWard => records.push(relationship(
                "cr-1",
                EntityType::Organization,
                ORGS,
                WARD_O,
                false,
            )),
        }
        for r in records {
            let w = service.create_record(pid, r, &options).await.unwrap();
            assert!(is_applied(&w), "{pid}: {w:?}");
            events
                .entry(who)
                .or_default()
                .push(by_service(AuditAction::Create));
        }
    }

    // The leader of the data shard answers everything (writes and linearizable reads).
    let leader = cluster.leader_of(1).await.expect("a leader of shard 1");
    let addr = cluster.nodes[cluster.node_index(leader)].grpc.clone();
    let mut n = 0;
    let mut cells = 0;
    let mut refused_for_identity = 0;
    // Break-the-glass accesses served: each must be on the review list.
    let mut reviews = 0;
    for caller in CALLERS {
        let creds = credentials(caller, certs.path(), forger.path(), &addr).await;
        for op in OPS {
            for who in PATIENTS {
                for glass in [false, true] {
                    n += 1;
                    let want = expected(caller, op, who, glass);
                    let got = call(op, who, &creds, glass, n).await;
                    let verdict = match got {
                        Ok(()) => Expect::Allowed,
                        Err(Code::PermissionDenied) => Expect::Denied,
                        Err(Code::Unauthenticated) => Expect::Unauthenticated,
                        Err(code) => panic!(
                            "{caller:?} {op:?} on {who:?} (glass {glass}): unexpected {code:?}"
                        ),
                    };
                    assert_eq!(
                        verdict, want,
                        "{caller:?} {op:?} on {who:?} (glass {glass})"
                    );
                    cells += 1;
                    refused_for_identity += usize::from(verdict == Expect::Unauthenticated);
                    if verdict == Expect::Allowed
                        && let Some(e) = audit_event(caller, op, who, glass)
                    {
                        reviews += usize::from(e.2 == AuditGround::BreakGlass as i32);
                        events.entry(who).or_default().push(e);
                    }
                    reviews += usize::from(
                        verdict == Expect::Allowed
                            && op == Op::Lookup
                            && matches!(caller, Caller::DrX | Caller::DrZ),
                    );
                }
            }
        }
    }
    assert_eq!(cells, CALLERS.len() * OPS.len() * PATIENTS.len() * 2);
    assert_eq!(refused_for_identity, 4 * OPS.len() * PATIENTS.len() * 2);

    // Every allowed access to a patient's record left exactly one event on its chain, and
    // the chain verifies; refused calls left none.
    // Reads' events come from their serving node's journal: the node answering the access log
    // moves its own first; another node's (had leadership moved) follow within moments.
    // The chains are read by an auditor of their own, whose reads of the log are audited too.
    let reader = cluster.client_as(CHAIN_READER).await;
    for who in PATIENTS {
        let mut want = events.remove(&who).unwrap_or_default();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut reads = 0;
        let (mut seen, report, reader_events) = loop {
            let mut seen = Vec::new();
            let mut reader_events = 0;
            let report = dossier_cli::audit_log::read_chain(&reader, patient_id(who), |_, e| {
                if e.actor == CHAIN_READER {
                    assert_eq!(e.action, AuditAction::AccessLog as i32);
                    reader_events += 1;
                    return;
                }
                seen.push((e.actor.clone(), e.action, e.ground));
                if e.ground == AuditGround::BreakGlass as i32 {
                    assert_eq!(e.reason, "unconscious patient in the emergency room");
                }
            })
            .await
            .unwrap();
            reads += 1;
            if (seen.len() >= want.len() && reader_events > 0)
                || std::time::Instant::now() > deadline
            {
                break (seen, report, reader_events);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(report.broken, None, "{who:?}");
        want.sort();
        seen.sort();
        assert_eq!(seen, want, "{who:?}: audit events");
        // Each page the reader read before its last read left one event (one page a read: the
        // chains are short); the last read's own follows it.
        assert!(
            (1..reads).contains(&reader_events),
            "{who:?}: {reader_events} events of the reader's {reads} reads"
        );
        assert_eq!(report.entries as usize, want.len() + reader_events);
    }

    // Every break-the-glass access is on the cluster's review list, for auditors only.
    let auditor = credentials(Caller::Auditor, certs.path(), forger.path(), &addr).await;
    let list = AdminClient::new(auditor.channel.clone())
        .list_break_glass(request(
            dossier_api::v1::ListBreakGlassRequest::default(),
            &auditor,
            false,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(reviews > 0);
    assert_eq!(list.accesses.len(), reviews, "{:#?}", list.accesses);
    assert!(list.accesses.iter().all(|a| {
        a.reason == "unconscious patient in the emergency room"
            && (a.actor == "dr-x" || a.actor == "dr-z")
    }));
    assert!(
        list.accesses
            .iter()
            .any(|a| a.call == "identifier-lookup" && a.patient_id.is_empty())
    );
    let admin = credentials(Caller::Admin, certs.path(), forger.path(), &addr).await;
    let refused = AdminClient::new(admin.channel.clone())
        .list_break_glass(request(
            dossier_api::v1::ListBreakGlassRequest::default(),
            &admin,
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // The clinicians' writes are there, readable by the service.
    let cared = service
        .read_record(
            patient_id(Who::CaredByX),
            ResourceType::Observation,
            "obs-1",
        )
        .await
        .unwrap();
    assert!(cared.is_some());
    // Served break-the-glass calls are counted on the node.
    let glass = common::metric(
        &cluster.nodes[cluster.node_index(leader)],
        "dossier_break_glass_total",
    )
    .await;
    assert!(glass > 0.0, "no break-the-glass call counted");
}

/// Whoever rewrites a patient's audit chain underneath the API (here a holder of a node
/// certificate writing the store's keys directly through the internal ShardAccess service) is
/// found out by the reader: a changed entry, a removed one and a cut-off tail each break the
/// chain where they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_an_audit_chain_is_detected() {
    use dossier_api::raft::v1::ShardWriteRequest;
    use dossier_api::raft::v1::shard_access_client::ShardAccessClient;
    use dossier_storage::chain::{self, Break};

    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let dir = certs.path().to_path_buf();
    let cluster = TestCluster::start(3, 1, 3, &|c| secure(c, &dir)).await;
    let service = cluster.client().await;
    let options = WriteOptions::default();
    let patients = [
        "tamper-changed",
        "tamper-removed",
        "tamper-cut",
        "tamper-none",
    ];
    for pid in patients {
        let patient = record(
            pid,
            resource::Kind::Patient(Patient {
                names: vec![HumanName {
                    family: "Maes".into(),
                    ..HumanName::default()
                }],
                ..Patient::default()
            }),
        );
        assert!(is_applied(
            &service.create_patient(patient, &options).await.unwrap()
        ));
        // Four reads: a chain of five entries.
        for _ in 0..4 {
            service
                .read_record(pid, ResourceType::Patient, pid)
                .await
                .unwrap();
        }
    }
    // Reading an access log adds to it (and first moves the node's journal, the reads above of
    // every patient included): the chain whose tail is cut is not read before.
    for pid in patients.iter().filter(|p| **p != "tamper-cut") {
        let report = dossier_cli::audit_log::read_chain(&service, pid, |_, _| {})
            .await
            .unwrap();
        assert_eq!((report.entries, report.broken), (5, None), "{pid}");
    }

    // The node certificate opens the internal service of the shard's leader.
    let leader = cluster.leader_of(1).await.expect("a leader of shard 1");
    let addr = cluster.nodes[cluster.node_index(leader)].grpc.clone();
    let node_tls = ClientTls::from_certs_dir(certs.path(), None)
        .unwrap()
        .with_identity(
            std::fs::read(certs.path().join("node.crt")).unwrap(),
            std::fs::read(certs.path().join("node.key")).unwrap(),
        );
    let mut inside =
        ShardAccessClient::new(node_tls.endpoint(&addr).unwrap().connect().await.unwrap());
    let entries = |pid: &str| {
        dossier_records::PatientKeys::new(&dossier_records::PatientId::parse(pid, "p").unwrap())
            .audit_entries()
    };
    let mut tamper = async |ops: Vec<dossier_storage::Op>| {
        let batch = dossier_storage::Batch {
            conditions: Vec::new(),
            ops,
        };
        let answer = inside
            .write(ShardWriteRequest {
                shard_id: 1,
                batch: postcard::to_allocvec(&batch).unwrap(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(answer.applied);
    };

    // One entry's event changed (say, another actor named), its stored hash kept.
    let page = service.access_log("tamper-changed", 0, 0).await.unwrap();
    let mut forged = page.entries[1].hash.clone();
    let mut event = page.entries[1].event.clone();
    *event.last_mut().unwrap() ^= 0x01;
    forged.extend_from_slice(&event);
    tamper(vec![dossier_storage::Op::Put {
        key: chain::entry_key(&entries("tamper-changed"), 2).into(),
        value: forged.into(),
    }])
    .await;
    // One entry removed.
    tamper(vec![dossier_storage::Op::Delete {
        key: chain::entry_key(&entries("tamper-removed"), 3).into(),
    }])
    .await;
    // The last entry removed (the head still names it).
    tamper(vec![dossier_storage::Op::Delete {
        key: chain::entry_key(&entries("tamper-cut"), 5).into(),
    }])
    .await;

    let broken = async |pid: &str| {
        dossier_cli::audit_log::read_chain(&service, pid, |_, _| {})
            .await
            .unwrap()
            .broken
    };
    assert_eq!(
        broken("tamper-changed").await,
        Some(Break::Altered { seq: 2 })
    );
    assert!(matches!(
        broken("tamper-removed").await,
        Some(Break::Missing { seq: 3, .. })
    ));
    assert_eq!(
        broken("tamper-cut").await,
        Some(Break::Truncated {
            head_seq: 5,
            last: 4
        })
    );
    assert_eq!(broken("tamper-none").await, None);
}

/// A clinician over `limits.person-calls-per-second` is refused with RESOURCE_EXHAUSTED (and a
/// RetryInfo), on their own identity only: another clinician and the services go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clinician_over_their_rate_is_refused_alone() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let forger = tempfile::tempdir().unwrap();
    tokens::create_issuer(forger.path(), false).unwrap();
    let dir = certs.path().to_path_buf();
    // One call a second, five at once.
    let cluster = TestCluster::start(3, 1, 3, &|c| {
        secure(c, &dir);
        c.limits.person_calls_per_second = 1;
        c.limits.person_calls_burst = 5;
    })
    .await;
    let addr = cluster.seeds()[0].clone();
    let map = async |caller: Caller| {
        let creds = credentials(caller, certs.path(), forger.path(), &addr).await;
        let mut answers = Vec::new();
        for _ in 0..20 {
            answers.push(
                AdminClient::new(creds.channel.clone())
                    .get_cluster_map(request(ClusterMapRequest {}, &creds, false))
                    .await
                    .map(drop)
                    .map_err(|s| {
                        let detail = dossier_api::error_detail(s.details()).unwrap();
                        (s.code(), detail.reason)
                    }),
            );
        }
        answers
    };
    let x = map(Caller::DrX).await;
    let refused: Vec<_> = x.iter().filter(|a| a.is_err()).collect();
    assert!(x[..5].iter().all(Result::is_ok), "the burst: {x:?}");
    // 20 calls take well under 9 s even on a loaded machine: at least 5 are over the rate.
    assert!(refused.len() >= 5, "over the rate: {x:?}");
    assert!(refused.iter().all(|a| **a
        == Err((
            Code::ResourceExhausted,
            dossier_api::v1::ErrorReason::ResourceExhausted as i32
        ))));
    assert!(
        map(Caller::DrZ).await[..5].iter().all(Result::is_ok),
        "another clinician"
    );
    assert!(
        map(Caller::Service).await.iter().all(Result::is_ok),
        "services are not limited"
    );
}

/// Resolving a patient's national number leaves an event on that patient's chain: the patient's
/// access log shows who found them by their identifier; a number nobody holds leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identifier_lookup_is_on_the_holders_chain() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let dir = certs.path().to_path_buf();
    let cluster = TestCluster::start(3, 2, 3, &|c| secure(c, &dir)).await;
    let service = cluster.client().await;
    let number = dossier_records::insz_with_check(850_730_033, false);
    let mut patient = record(
        "lookup-holder",
        resource::Kind::Patient(Patient {
            identifiers: vec![Identifier {
                system: dossier_records::SYSTEM_INSZ.into(),
                value: number.clone(),
                r#type: None,
            }],
            ..Patient::default()
        }),
    );
    patient.meta = meta("lookup-holder");
    assert!(is_applied(
        &service
            .create_patient(patient, &WriteOptions::default())
            .await
            .unwrap()
    ));
    let found = service
        .lookup_identifier(dossier_records::SYSTEM_INSZ, &number)
        .await
        .unwrap();
    assert_eq!(found.as_deref(), Some("lookup-holder"));
    let other = dossier_records::insz_with_check(850_730_034, false);
    assert_eq!(
        service
            .lookup_identifier(dossier_records::SYSTEM_INSZ, &other)
            .await
            .unwrap(),
        None
    );

    // The lookup was served by the index key's shard, maybe on another node than the holder's:
    // its event reaches the holder's chain from that node's journal, within moments.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let mut seen = Vec::new();
        let report = dossier_cli::audit_log::read_chain(&service, "lookup-holder", |_, e| {
            // This loop's own reads of the log are on it too.
            if e.action != AuditAction::AccessLog as i32 {
                seen.push((e.actor.clone(), e.action, e.ground))
            }
        })
        .await
        .unwrap();
        assert_eq!(report.broken, None);
        if seen.len() >= 2 || std::time::Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        seen,
        vec![
            (
                SERVICE_USER.to_owned(),
                AuditAction::CreatePatient as i32,
                AuditGround::Role as i32
            ),
            (
                SERVICE_USER.to_owned(),
                AuditAction::LookupIdentifier as i32,
                AuditGround::Role as i32
            ),
        ]
    );
    // Every node's journal is drained, and says so.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for node in &cluster.nodes {
        while !common::metrics_page(node)
            .await
            .lines()
            .any(|l| l == "dossier_audit_backlog 0")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "node {} reports audit events left in its journal",
                node.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A secure 3-node cluster of one shard, its service client, and patient `pid` registered.
async fn cluster_with_patient(certs: &Path, pid: &str) -> (TestCluster, dossier_client::Client) {
    let dir = certs.to_path_buf();
    let cluster = TestCluster::start(3, 1, 3, &|c| secure(c, &dir)).await;
    let service = cluster.client().await;
    let patient = record(pid, resource::Kind::Patient(Patient::default()));
    let written = service
        .create_patient(patient, &WriteOptions::default())
        .await
        .unwrap();
    assert!(is_applied(&written));
    (cluster, service)
}

/// A service scoped by grants makes the calls they name and no other: a certificate granting
/// records-read reads records but writes none, touches no Kv key, resolves no identifier and
/// reads no access log; a token granting kv and access-log the other way round. Grants are
/// checked when the certificate or token is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_makes_only_the_calls_its_grants_name() {
    use dossier_client::{BearerToken, Client, ClientError};

    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let life = dossier_cli::certs::Lifetimes::default();
    dossier_cli::certs::create_client_with_grants(
        certs.path(),
        "lab-reader",
        "service",
        &["records-read".into()],
        life,
        false,
    )
    .unwrap();
    dossier_cli::certs::create_client_with_grants(
        certs.path(),
        "kv-app",
        "service",
        &["kv".into(), "access-log".into()],
        life,
        false,
    )
    .unwrap();
    for (role, grants) in [("service", "everything"), ("auditor", "records-read")] {
        assert!(
            dossier_cli::certs::create_client_with_grants(
                certs.path(),
                "refused",
                role,
                &[grants.into()],
                life,
                false,
            )
            .is_err(),
            "{role} with {grants}"
        );
    }
    let pid = "grant-1";
    let (cluster, service) = cluster_with_patient(certs.path(), pid).await;
    let options = WriteOptions::default();
    assert!(is_applied(
        &service
            .create_record(pid, observation("obs-1"), &options)
            .await
            .unwrap()
    ));
    let connect = async |user: Option<&str>, token: Option<String>| {
        let mut config = cluster.client_config(user);
        config.token = token.map(|t| BearerToken::new(&t).unwrap());
        config.deadline = Duration::from_secs(5);
        Client::connect(config).await.unwrap()
    };
    let denied = |r: Result<(), ClientError>, what: &str| match r {
        Err(ClientError::PermissionDenied(m)) => assert!(m.contains("grants"), "{what}: {m}"),
        other => panic!("{what}: want PERMISSION_DENIED, got {other:?}"),
    };

    let reader = connect(Some("lab-reader"), None).await;
    assert!(
        reader
            .read_record(pid, ResourceType::Observation, "obs-1")
            .await
            .unwrap()
            .is_some()
    );
    denied(
        reader
            .create_record(pid, observation("obs-2"), &options)
            .await
            .map(drop),
        "write",
    );
    denied(reader.put(pid, b"k", b"v").await.map(drop), "Kv put");
    denied(
        reader
            .lookup_identifier(dossier_records::SYSTEM_INSZ, "85073003328")
            .await
            .map(drop),
        "lookup",
    );
    denied(reader.access_log(pid, 0, 0).await.map(drop), "access log");

    let kv_app = connect(Some("kv-app"), None).await;
    kv_app.put(pid, b"k", b"v").await.unwrap();
    assert_eq!(
        kv_app.get(pid, b"k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert!(kv_app.access_log(pid, 0, 0).await.unwrap().head_seq > 0);
    denied(
        kv_app
            .read_record(pid, ResourceType::Observation, "obs-1")
            .await
            .map(drop),
        "record read",
    );

    // A token's grants (a service authenticating through the identity provider).
    let claims = TokenClaims {
        subject: "lab-app".into(),
        role: "service".into(),
        grants: vec!["records-read".into(), "kv".into()],
        ..TokenClaims::default()
    };
    let lab_app = connect(
        None,
        Some(token(
            certs.path(),
            claims,
            LOCAL_AUDIENCE,
            SystemTime::now(),
        )),
    )
    .await;
    assert!(
        lab_app
            .read_record(pid, ResourceType::Observation, "obs-1")
            .await
            .unwrap()
            .is_some()
    );
    denied(lab_app.access_log(pid, 0, 0).await.map(drop), "access log");
    // The token travels with Kv calls too (bundled or alone).
    lab_app.put(pid, b"lab", b"1").await.unwrap();
    assert_eq!(
        lab_app.get(pid, b"lab").await.unwrap().as_deref(),
        Some(&b"1"[..])
    );
    let bad = TokenClaims {
        subject: "kv-app".into(),
        role: "clinician".into(),
        practitioner: Some(format!("{NIHDI}|{DR_X}")),
        grants: vec!["kv".into()],
        ..TokenClaims::default()
    };
    assert!(
        tokens::issue(
            certs.path(),
            &bad,
            LOCAL_ISSUER,
            LOCAL_AUDIENCE,
            SystemTime::now(),
            Duration::from_secs(60)
        )
        .is_err()
    );
}

/// A consent that withholds a kind of record from a clinician withholds that kind only: the
/// clinician in care reads the patient's other records, is refused its observations (read,
/// write, Everything asked for them), gets an Everything without them, and reaches them only by
/// breaking the glass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_withholds_only_the_kinds_of_record_it_names() {
    use dossier_client::{BearerToken, BreakGlass, Client, ClientError};

    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let pid = "consent-typed";
    let (cluster, service) = cluster_with_patient(certs.path(), pid).await;
    let options = WriteOptions::default();
    let mut consent = consent_denying("consent-obs", DR_X);
    if let Some(resource::Kind::Consent(c)) = &mut consent.kind {
        c.resource_types = vec![ResourceType::Observation as i32];
    }
    for r in [
        observation("obs-1"),
        relationship("cr-1", EntityType::Practitioner, NIHDI, DR_X, false),
        consent,
    ] {
        assert!(is_applied(
            &service.create_record(pid, r, &options).await.unwrap()
        ));
    }
    let claims = TokenClaims {
        subject: "dr-x".into(),
        role: "clinician".into(),
        practitioner: Some(format!("{NIHDI}|{DR_X}")),
        ..TokenClaims::default()
    };
    let jwt = token(certs.path(), claims, LOCAL_AUDIENCE, SystemTime::now());
    let connect = async |glass: bool| {
        let mut config = cluster.client_config(None);
        config.token = Some(BearerToken::new(&jwt).unwrap());
        if glass {
            config.break_glass =
                Some(BreakGlass::new("unconscious patient in the emergency room").unwrap());
        }
        config.deadline = Duration::from_secs(5);
        Client::connect(config).await.unwrap()
    };
    let withheld = |r: Result<(), ClientError>, what: &str| match r {
        Err(ClientError::PermissionDenied(m)) => assert!(m.contains("withholds"), "{what}: {m}"),
        other => panic!("{what}: want PERMISSION_DENIED, got {other:?}"),
    };

    let dr_x = connect(false).await;
    assert!(
        dr_x.read_record(pid, ResourceType::Patient, pid)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        dr_x.read_record(pid, ResourceType::CareRelationship, "cr-1")
            .await
            .unwrap()
            .is_some()
    );
    withheld(
        dr_x.read_record(pid, ResourceType::Observation, "obs-1")
            .await
            .map(drop),
        "read",
    );
    withheld(
        dr_x.create_record(pid, observation("obs-2"), &options)
            .await
            .map(drop),
        "write",
    );
    withheld(
        dr_x.everything(pid, 0, &[ResourceType::Observation], false, |_| Ok(()))
            .await
            .map(drop),
        "Everything of observations",
    );
    let mut kinds = Vec::new();
    dr_x.everything(pid, 0, &[], false, |page| {
        kinds.extend(
            page.iter()
                .filter_map(|r| r.kind.as_ref().map(std::mem::discriminant)),
        );
        Ok(())
    })
    .await
    .unwrap();
    let observation_kind = std::mem::discriminant(observation("x").kind.as_ref().unwrap());
    assert_eq!(kinds.len(), 3, "Patient, CareRelationship and Consent");
    assert!(!kinds.contains(&observation_kind));

    let glass = connect(true).await;
    assert!(
        glass
            .read_record(pid, ResourceType::Observation, "obs-1")
            .await
            .unwrap()
            .is_some()
    );
}

/// A node reports the audit events of the reads it served that are not yet in their chains
/// (`NodeStatus.audit_backlog`, what `dossier node remove` waits on before the node's disk may
/// be wiped): a stale read served while the patient's shard has no quorum is answered from the
/// journal, its event cannot be moved, and the node says so until the quorum is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reports_the_audit_events_it_has_not_moved() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let (mut cluster, service) = cluster_with_patient(certs.path(), "backlog-holder").await;
    let admin = cluster.admin(0).await;
    let empty = dossier_cli::elastic::AuditJournal::Empty;
    assert_eq!(
        dossier_cli::elastic::wait_audit_moved(admin.clone(), 1, Duration::from_secs(10))
            .await
            .unwrap(),
        empty
    );

    // No quorum left for node 1: its reads' events stay in its journal.
    cluster.nodes[1].stop().await;
    cluster.nodes[2].stop().await;
    let channel = ClientTls::from_certs_dir(certs.path(), Some(SERVICE_USER))
        .unwrap()
        .endpoint(&cluster.nodes[0].grpc)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut kv = KvClient::new(channel);
    for _ in 0..3 {
        let mut r = tonic::Request::new(GetRequest {
            route: route("backlog-holder"),
            key: b"k".to_vec(),
            consistency: ReadConsistency::Stale as i32,
        });
        r.set_timeout(Duration::from_secs(5));
        kv.get(r).await.unwrap();
    }
    let backlog = admin
        .clone()
        .node_status(NodeStatusRequest { count_keys: false })
        .await
        .unwrap()
        .into_inner()
        .audit_backlog;
    assert_eq!(backlog, Some(3), "three reads' events wait in the journal");
    let refused =
        dossier_cli::elastic::wait_audit_moved(admin.clone(), 1, Duration::from_millis(500))
            .await
            .unwrap_err();
    assert!(
        format!("{refused:#}").contains("still holds 3 audit events"),
        "{refused:#}"
    );

    // The quorum is back: the events reach the chain and the backlog empties.
    cluster.nodes[1].start();
    cluster.nodes[2].start();
    assert_eq!(
        dossier_cli::elastic::wait_audit_moved(admin, 1, Duration::from_secs(60))
            .await
            .unwrap(),
        empty
    );
    // A move retried after its proposal timed out without a quorum may commit twice: events
    // are counted once per node and journal seq, as the access log shows them.
    let mut gets = 0;
    let report = dossier_cli::audit_log::read_accesses(&service, "backlog-holder", |_, e| {
        if e.action == AuditAction::KvGet as i32 {
            gets += 1;
        }
    })
    .await
    .unwrap();
    assert_eq!(report.broken, None);
    assert_eq!(gets, 3);
}
