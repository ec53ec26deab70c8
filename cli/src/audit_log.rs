//! Reading and verifying a patient's audit chain (`Records.AccessLog`): every page is checked
//! link by link as it arrives (`dossier_storage::chain`), and the walk ends against the head the
//! first page reports, so that a changed, removed or truncated entry is found by the reader, not
//! taken on the node's word (and the reader's own reads, which the log gains as it is read, do
//! not keep the walk going).

use dossier_api::v1::AuditEvent;
use dossier_client::{Client, ClientError};
use dossier_storage::chain::{Break, Verifier};
use prost::Message;

/// What a walk of the chain found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Entries read and linked.
    pub entries: u64,
    /// The head's last seq and hash (hex); 0 and empty for an empty chain.
    pub head_seq: u64,
    pub head_hash: String,
    /// Where the chain breaks, if it does.
    pub broken: Option<Break>,
}

/// Why a chain could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("entry {seq} is not an AuditEvent: {message}")]
    Event { seq: u64, message: String },
    #[error("the node reported a head that does not decode")]
    Head,
}

/// Walks the chain of `patient` from its first entry, page by page, calling `each` with every
/// entry that links; stops at the first break.
pub async fn read_chain(
    client: &Client,
    patient: &str,
    mut each: impl FnMut(u64, &AuditEvent),
) -> Result<ChainReport, ReadError> {
    let mut verifier = Verifier::default();
    let mut after = 0;
    // The walk ends at the head the first page reports: reading the log adds to it (each page
    // read is an access, audited), so a walk that chased the moving end would never end.
    let mut page = client.access_log(patient, 0, 0).await?;
    let (head_seq, head_hash) = (page.head_seq, page.head_hash.clone());
    loop {
        for entry in page.entries.iter().take_while(|e| e.seq <= head_seq) {
            let mut stored = entry.hash.clone();
            stored.extend_from_slice(&entry.event);
            let bytes = match verifier.next(entry.seq, &stored) {
                Ok(bytes) => bytes,
                Err(b) => return Ok(report(&verifier, head_seq, &head_hash, Some(b))),
            };
            let event = AuditEvent::decode(bytes).map_err(|e| ReadError::Event {
                seq: entry.seq,
                message: e.to_string(),
            })?;
            each(entry.seq, &event);
            after = entry.seq;
        }
        if !page.more || page.entries.is_empty() || after >= head_seq {
            let head = match head_seq {
                0 => None,
                seq => Some((
                    seq,
                    head_hash
                        .as_slice()
                        .try_into()
                        .map_err(|_| ReadError::Head)?,
                )),
            };
            let broken = verifier.finish(head).err();
            return Ok(report(&verifier, head_seq, &head_hash, broken));
        }
        page = client.access_log(patient, after, 0).await?;
    }
}

/// As [`read_chain`], calling `each` once per access, as the access log shows them: an event of
/// a read moved to the chain twice (its node crashed between the move and forgetting it) names
/// the same serving node and journal seq as the first, and is skipped.
pub async fn read_accesses(
    client: &Client,
    patient: &str,
    mut each: impl FnMut(u64, &AuditEvent),
) -> Result<ChainReport, ReadError> {
    let mut seen = std::collections::HashSet::new();
    read_chain(client, patient, |seq, e| {
        if e.journal_seq == 0 || seen.insert((e.node_id, e.journal_seq)) {
            each(seq, e);
        }
    })
    .await
}

fn report(
    verifier: &Verifier,
    head_seq: u64,
    head_hash: &[u8],
    broken: Option<Break>,
) -> ChainReport {
    ChainReport {
        entries: verifier.position().0,
        head_seq,
        head_hash: hex(head_hash),
        broken,
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
