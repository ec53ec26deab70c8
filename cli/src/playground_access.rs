//! The playground's access-control step: the demo patient's GP reads the record with a bearer
//! token, another clinician is refused, then breaks the glass (docs/security.md).

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use dossier_api::v1::{reference, resource};
use dossier_cli::procs::LocalCluster;
use dossier_cli::tokens::{self, LOCAL_AUDIENCE, LOCAL_ISSUER, TokenClaims};
use dossier_client::{BearerToken, BreakGlass, Client, ClientError, ClientTls};
use dossier_records::synth::SynthPatient;

/// Runs the step against `local` (TLS on) for `sample`, whose records name its GP.
pub async fn show(local: &LocalCluster, certs: &Path, sample: &SynthPatient) -> Result<()> {
    let gp = sample
        .records
        .iter()
        .find_map(|r| match &r.kind {
            Some(resource::Kind::CareRelationship(c)) => {
                match c.participant.as_ref().and_then(|p| p.target.as_ref()) {
                    Some(reference::Target::Identifier(x)) => {
                        Some(format!("{}|{}", x.system, x.value))
                    }
                    _ => None,
                }
            }
            _ => None,
        })
        .context("the demo patient names no GP")?;
    let system = gp.split_once('|').map_or("", |(s, _)| s).to_owned();
    let patient = sample.id();
    let clinician = |name: &str, practitioner: String| TokenClaims {
        subject: name.into(),
        role: "clinician".into(),
        practitioner: Some(practitioner),
        ..TokenClaims::default()
    };
    let gp_client = as_clinician(local, certs, clinician("dr-gp", gp.clone()), None).await?;
    println!(
        "the GP ({gp}, care relationship): {} records",
        count(&gp_client, patient).await?
    );
    let other = clinician("dr-other", format!("{system}|19999999999"));
    let refused = as_clinician(local, certs, other.clone(), None).await?;
    match count(&refused, patient).await {
        Err(ClientError::PermissionDenied(why)) => {
            println!("another clinician: refused ({why})")
        }
        other => anyhow::bail!("another clinician was not refused: {other:?}"),
    }
    let reason = "patient unconscious in the emergency room";
    let glass = as_clinician(local, certs, other, Some(reason)).await?;
    println!(
        "the same clinician breaking the glass: {} records (flagged for review)",
        count(&glass, patient).await?
    );
    println!(
        "tokens: dossier --certs-dir {} token issue NAME --role clinician --practitioner '{gp}'",
        certs.display()
    );
    Ok(())
}

/// A client of `local` acting as the clinician `claims` name, with a token of the development
/// issuer and, if given, a break-the-glass reason.
async fn as_clinician(
    local: &LocalCluster,
    certs: &Path,
    claims: TokenClaims,
    glass: Option<&str>,
) -> Result<Client> {
    let token = tokens::issue(
        certs,
        &claims,
        LOCAL_ISSUER,
        LOCAL_AUDIENCE,
        SystemTime::now(),
        Duration::from_secs(600),
    )?;
    let token = BearerToken::new(&token)?;
    let glass = glass.map(BreakGlass::new).transpose()?;
    let ca_only = ClientTls::from_certs_dir(certs, None)?;
    local
        .client_with(|c| {
            c.tls = Some(ca_only);
            c.token = Some(token);
            c.break_glass = glass;
        })
        .await
}

/// The records Everything streams of `patient`.
async fn count(client: &Client, patient: &str) -> Result<usize, ClientError> {
    let mut records = 0usize;
    client
        .everything(patient, 0, &[], false, |rs| {
            records += rs.len();
            Ok(())
        })
        .await?;
    Ok(records)
}
