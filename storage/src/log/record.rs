//! Log records: what one frame of a segment holds.
//!
//! ```text
//! kind u8 | group u64 LE | body
//!   1 Entry        index u64 | data (rest of the frame)
//!   2 HardState    flags u8 (bit0 vote, bit1 committed) | vote_len u32 | vote | committed_len u32 | committed
//!   3 TruncateFrom index u64                 entries >= index are gone
//!   4 PurgeTo      index u64 | marker (rest) entries <= index are gone; marker is the caller's
//!   5 RoundEnd     start u64                 closes a write round (group is 0): the round's
//!                                            frames in this segment began at offset `start`
//!   6 Forget       (no body)                 the group's entries, hard state and purge point
//!                                            are gone (its replica left this node)
//! ```
//! A `RoundEnd` lets recovery tell a torn last round (which may be cut) from damage followed by
//! later, acknowledged rounds (which must not be): see `recovery.rs`.
//! Entry data, votes, committed ids and purge markers are opaque bytes: the layer above (openraft's
//! adaptor) encodes them. The engine knows only indexes.

use bytes::Bytes;

use crate::GroupId;

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_TRUNCATE_FROM: u8 = 3;
const KIND_PURGE_TO: u8 = 4;
const KIND_ROUND_END: u8 = 5;
const KIND_FORGET: u8 = 6;
/// Payload bytes of a `RoundEnd` record (kind, group, start).
pub const ROUND_END_PAYLOAD_BYTES: usize = 1 + 8 + 8;

/// Bytes a record adds around its opaque parts, at most (kind, group, index or flags and lengths).
pub const RECORD_OVERHEAD_MAX: usize = 1 + 8 + 1 + 4 + 4;
const _: () = assert!(RECORD_OVERHEAD_MAX >= 1 + 8 + 8);

/// The durable per-group Raft state that is not entries: the vote and the committed log id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HardState {
    pub vote: Option<Bytes>,
    pub committed: Option<Bytes>,
}

impl HardState {
    pub(crate) fn bytes(&self) -> usize {
        self.vote.as_ref().map_or(0, Bytes::len) + self.committed.as_ref().map_or(0, Bytes::len)
    }
}

/// One decoded log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Entry {
        group: GroupId,
        index: u64,
        data: Bytes,
    },
    HardState {
        group: GroupId,
        state: HardState,
    },
    TruncateFrom {
        group: GroupId,
        index: u64,
    },
    PurgeTo {
        group: GroupId,
        index: u64,
        marker: Bytes,
    },
    RoundEnd {
        start: u64,
    },
    Forget {
        group: GroupId,
    },
}

/// A record to encode, borrowing its opaque parts.
#[derive(Debug, Clone, Copy)]
pub enum RecordRef<'a> {
    Entry {
        group: GroupId,
        index: u64,
        data: &'a [u8],
    },
    HardState {
        group: GroupId,
        state: &'a HardState,
    },
    TruncateFrom {
        group: GroupId,
        index: u64,
    },
    PurgeTo {
        group: GroupId,
        index: u64,
        marker: &'a [u8],
    },
    RoundEnd {
        start: u64,
    },
    Forget {
        group: GroupId,
    },
}

impl RecordRef<'_> {
    /// The encoded length, known before encoding so that segment rolls are decided up front.
    pub fn encoded_len(&self) -> usize {
        1 + 8
            + match self {
                RecordRef::Entry { data, .. } => 8 + data.len(),
                RecordRef::HardState { state, .. } => 1 + 4 + 4 + state.bytes(),
                RecordRef::TruncateFrom { .. } => 8,
                RecordRef::PurgeTo { marker, .. } => 8 + marker.len(),
                RecordRef::RoundEnd { .. } => 8,
                RecordRef::Forget { .. } => 0,
            }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        match *self {
            RecordRef::Entry { group, index, data } => {
                put_head(out, KIND_ENTRY, group);
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(data);
            }
            RecordRef::HardState { group, state } => {
                put_head(out, KIND_HARD_STATE, group);
                let flags =
                    u8::from(state.vote.is_some()) | (u8::from(state.committed.is_some()) << 1);
                out.push(flags);
                for part in [&state.vote, &state.committed] {
                    let part = part.as_deref().unwrap_or_default();
                    let len = u32::try_from(part.len()).expect("caller enforces entry-bytes-max");
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(part);
                }
            }
            RecordRef::TruncateFrom { group, index } => {
                put_head(out, KIND_TRUNCATE_FROM, group);
                out.extend_from_slice(&index.to_le_bytes());
            }
            RecordRef::PurgeTo {
                group,
                index,
                marker,
            } => {
                put_head(out, KIND_PURGE_TO, group);
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(marker);
            }
            RecordRef::RoundEnd { start } => {
                put_head(out, KIND_ROUND_END, 0);
                out.extend_from_slice(&start.to_le_bytes());
            }
            RecordRef::Forget { group } => put_head(out, KIND_FORGET, group),
        }
        debug_assert_eq!(out.len() - start, self.encoded_len());
    }
}

fn put_head(out: &mut Vec<u8>, kind: u8, group: GroupId) {
    out.push(kind);
    out.extend_from_slice(&group.to_le_bytes());
}

/// A cursor over a payload whose every read is bounds-checked: payload bytes come from disk.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("record is shorter than its fields");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    fn finish(&self) -> Result<(), &'static str> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err("record has trailing bytes")
        }
    }
}

impl Record {
    /// Decodes a frame payload. A payload whose crc32 matched but does not decode is corruption
    /// (or a format from a newer version), never a torn write.
    pub fn decode(payload: &[u8]) -> Result<Record, &'static str> {
        let mut r = Reader(payload);
        let kind = r.u8()?;
        let group = r.u64()?;
        let record = match kind {
            KIND_ENTRY => {
                let index = r.u64()?;
                Record::Entry {
                    group,
                    index,
                    data: Bytes::copy_from_slice(r.rest()),
                }
            }
            KIND_HARD_STATE => {
                let flags = r.u8()?;
                if flags & !0b11 != 0 {
                    return Err("hard state has unknown flags");
                }
                let mut parts = [None, None];
                for (bit, part) in parts.iter_mut().enumerate() {
                    let len = r.u32()? as usize;
                    let bytes = r.take(len)?;
                    if flags & (1 << bit) != 0 {
                        *part = Some(Bytes::copy_from_slice(bytes));
                    } else if len != 0 {
                        return Err("hard state has bytes for an absent field");
                    }
                }
                let [vote, committed] = parts;
                Record::HardState {
                    group,
                    state: HardState { vote, committed },
                }
            }
            KIND_TRUNCATE_FROM => Record::TruncateFrom {
                group,
                index: r.u64()?,
            },
            KIND_PURGE_TO => {
                let index = r.u64()?;
                Record::PurgeTo {
                    group,
                    index,
                    marker: Bytes::copy_from_slice(r.rest()),
                }
            }
            KIND_ROUND_END if group == 0 => Record::RoundEnd { start: r.u64()? },
            KIND_ROUND_END => return Err("round end names a group"),
            KIND_FORGET => Record::Forget { group },
            _ => return Err("record has an unknown kind"),
        };
        r.finish()?;
        Ok(record)
    }

    #[cfg(test)]
    pub fn as_ref(&self) -> RecordRef<'_> {
        match self {
            Record::Entry { group, index, data } => RecordRef::Entry {
                group: *group,
                index: *index,
                data,
            },
            Record::HardState { group, state } => RecordRef::HardState {
                group: *group,
                state,
            },
            Record::TruncateFrom { group, index } => RecordRef::TruncateFrom {
                group: *group,
                index: *index,
            },
            Record::PurgeTo {
                group,
                index,
                marker,
            } => RecordRef::PurgeTo {
                group: *group,
                index: *index,
                marker,
            },
            Record::RoundEnd { start } => RecordRef::RoundEnd { start: *start },
            Record::Forget { group } => RecordRef::Forget { group: *group },
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn bytes() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
    }

    fn record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), bytes()).prop_map(|(group, index, data)| Record::Entry {
                group,
                index,
                data
            }),
            (
                any::<u64>(),
                proptest::option::of(bytes()),
                proptest::option::of(bytes())
            )
                .prop_map(|(group, vote, committed)| Record::HardState {
                    group,
                    state: HardState { vote, committed }
                }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(group, index)| Record::TruncateFrom { group, index }),
            (any::<u64>(), any::<u64>(), bytes()).prop_map(|(group, index, marker)| {
                Record::PurgeTo {
                    group,
                    index,
                    marker,
                }
            }),
            any::<u64>().prop_map(|start| Record::RoundEnd { start }),
            any::<u64>().prop_map(|group| Record::Forget { group }),
        ]
    }

    proptest! {
        /// Every record decodes to itself, its announced length is exact, and no strict prefix of
        /// its encoding decodes to the same record.
        #[test]
        fn record_round_trip(record in record()) {
            let mut out = Vec::new();
            record.as_ref().encode(&mut out);
            prop_assert_eq!(out.len(), record.as_ref().encoded_len());
            prop_assert_eq!(Record::decode(&out), Ok(record.clone()));
            for cut in 0..out.len() {
                prop_assert_ne!(Record::decode(&out[..cut]), Ok(record.clone()));
            }
        }
    }
}
