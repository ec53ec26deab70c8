//! `dossier token`: the development identity provider (`dossier_cli::tokens`).

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use dossier_cli::tokens::{self, TokenClaims};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a development token issuer in --certs-dir: token-issuer.key (signs tokens; 0600)
    /// and jwks.json (its public key; give it to the nodes with --token-jwks). In production the
    /// nodes trust the hospital's identity provider's JWKS instead.
    CreateIssuer {
        /// Replace existing files.
        #[arg(long)]
        overwrite: bool,
    },
    /// Print a bearer token signed by the issuer in --certs-dir; pass it to commands with
    /// --token (or DOSSIER_TOKEN).
    Issue {
        /// Whom the token names (`sub`), e.g. dr-peeters.
        subject: String,
        /// clinician, patient, service, auditor or admin.
        #[arg(long)]
        role: String,
        /// A clinician's own identifier, system|value (care relationships name it).
        #[arg(long)]
        practitioner: Option<String>,
        /// An organisation the clinician acts for, system|value (repeatable).
        #[arg(long = "organization")]
        organizations: Vec<String>,
        /// A patient's own patient id (role patient).
        #[arg(long)]
        patient: Option<String>,
        /// Scope a service to these calls only (comma separated): records-read, records-write,
        /// patients-create, lookup, kv, access-log.
        #[arg(long, value_delimiter = ',')]
        grant: Vec<String>,
        /// Validity, in minutes.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        /// The issuer (`iss`) the nodes expect (--token-issuer).
        #[arg(long, default_value = tokens::LOCAL_ISSUER)]
        issuer: String,
        /// The audience (`aud`) the nodes expect (--token-audience).
        #[arg(long, default_value = tokens::LOCAL_AUDIENCE)]
        audience: String,
    },
}

pub fn run(command: &TokenCommand, certs_dir: Option<&Path>) -> Result<()> {
    let Some(dir) = certs_dir else {
        anyhow::bail!("name the certificates' directory with --certs-dir (or DOSSIER_CERTS_DIR)");
    };
    match command {
        TokenCommand::CreateIssuer { overwrite } => {
            for path in tokens::create_issuer(dir, *overwrite)? {
                println!("wrote {}", path.display());
            }
        }
        TokenCommand::Issue {
            subject,
            role,
            practitioner,
            organizations,
            patient,
            grant,
            minutes,
            issuer,
            audience,
        } => {
            anyhow::ensure!(*minutes > 0, "--minutes must be at least 1");
            let claims = TokenClaims {
                subject: subject.clone(),
                role: role.clone(),
                practitioner: practitioner.clone(),
                organizations: organizations.clone(),
                patient: patient.clone(),
                grants: grant.clone(),
            };
            let lifetime = Duration::from_secs(minutes.saturating_mul(60));
            println!(
                "{}",
                tokens::issue(
                    dir,
                    &claims,
                    issuer,
                    audience,
                    std::time::SystemTime::now(),
                    lifetime,
                )?
            );
        }
    }
    Ok(())
}
