//! A record's versions, newest first, in pages bounded by count and bytes.

use dossier_api::v1::Resource;

use crate::keys::PatientKeys;
use crate::kv::Reads;
use crate::plan;

/// One page of a record's history.
#[derive(Debug, Clone, Default)]
pub struct HistoryPage {
    pub found: bool,
    pub versions: Vec<Resource>,
    pub more: bool,
}

/// The versions of `t/id` below `before_version` (0: from the current one), at most `limit` and
/// at most `bytes_max` bytes (one version at least).
pub fn history<R: Reads>(
    reads: &R,
    keys: &PatientKeys,
    t: &str,
    id: &str,
    before_version: u64,
    limit: usize,
    bytes_max: usize,
) -> Result<HistoryPage, R::Error> {
    let Some(current) = plan::head(reads, keys, t, id)? else {
        return Ok(HistoryPage::default());
    };
    let top = match before_version {
        0 => current,
        b => (b - 1).min(current),
    };
    let (mut versions, mut bytes) = (Vec::new(), 0usize);
    let mut v = top;
    while v >= 1 && versions.len() < limit {
        let raw = reads
            .get(&keys.version(t, id, v))?
            .ok_or_else(|| crate::Error::corrupt(format!("version {v} of {t}/{id} (missing)")))?;
        if !versions.is_empty() && bytes + raw.len() > bytes_max {
            break;
        }
        bytes += raw.len();
        versions.push(plan::decode(&raw)?);
        v -= 1;
    }
    Ok(HistoryPage {
        found: true,
        more: v >= 1,
        versions,
    })
}
