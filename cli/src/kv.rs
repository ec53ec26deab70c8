//! `dossier kv`: get, put, del and scan one patient's keys.

use anyhow::{Result, bail};
use clap::Subcommand;
use dossier_client::ReadConsistency;

use crate::Cli;

#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Print a key's value (linearizable unless --stale).
    Get {
        patient: String,
        key: String,
        /// Accept a possibly stale value from any replica.
        #[arg(long)]
        stale: bool,
    },
    /// Set a key.
    Put {
        patient: String,
        key: String,
        value: String,
    },
    /// Delete a key.
    Del { patient: String, key: String },
    /// List a patient's keys (and values) in order.
    Scan {
        patient: String,
        /// Only keys starting with this prefix.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Most keys to print (pages through the rest).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

pub async fn run(cli: &Cli, command: &KvCommand) -> Result<()> {
    let client = cli.client().await?;
    match command {
        KvCommand::Get {
            patient,
            key,
            stale,
        } => {
            let consistency = if *stale {
                ReadConsistency::Stale
            } else {
                ReadConsistency::Linearizable
            };
            match client
                .get_with(patient, key.as_bytes(), consistency, client_deadline(cli))
                .await?
            {
                Some(v) => println!("{}", String::from_utf8_lossy(&v)),
                None => bail!("{patient}/{key}: not found"),
            }
        }
        KvCommand::Put {
            patient,
            key,
            value,
        } => {
            let w = client
                .put(patient, key.as_bytes(), value.as_bytes())
                .await?;
            println!("ok (index {})", w.index);
        }
        KvCommand::Del { patient, key } => {
            let w = client.delete(patient, key.as_bytes()).await?;
            println!("ok (index {})", w.index);
        }
        KvCommand::Scan {
            patient,
            prefix,
            limit,
        } => {
            let mut after: Option<Vec<u8>> = None;
            let mut printed = 0;
            while printed < *limit {
                let page_size = (*limit - printed).min(500) as u32;
                let page = client
                    .scan(
                        patient,
                        prefix.as_bytes(),
                        after.as_deref(),
                        page_size,
                        ReadConsistency::Linearizable,
                    )
                    .await?;
                for (k, v) in &page.items {
                    println!(
                        "{}\t{}",
                        String::from_utf8_lossy(k),
                        String::from_utf8_lossy(v)
                    );
                }
                printed += page.items.len();
                match (page.more, page.items.last()) {
                    (true, Some((k, _))) => after = Some(k.to_vec()),
                    _ => break,
                }
            }
        }
    }
    Ok(())
}

fn client_deadline(cli: &Cli) -> std::time::Duration {
    std::time::Duration::from_millis(cli.timeout_ms)
}
