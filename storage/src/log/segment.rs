//! Segment files: `{id:020}.log`, a 16-byte header (`DSSLOG01` then the id, u64 LE), then frames.
//!
//! Segments are written strictly in id order, and a segment file is created only after every
//! earlier segment is fully written and fdatasync'ed. So only the newest segment can end in a torn
//! write; damage anywhere else is corruption.

use crate::log::frame::{self, FRAME_HEADER_BYTES, FrameFault};
use crate::log::record::Record;

pub const SEGMENT_HEADER_BYTES: usize = 16;
const MAGIC: &[u8; 8] = b"DSSLOG01";
const _: () = assert!(SEGMENT_HEADER_BYTES == MAGIC.len() + size_of::<u64>());

pub type SegmentId = u64;

pub fn file_name(id: SegmentId) -> String {
    format!("{id:020}.log")
}

/// The id of a segment file name, or `None` for any other file.
pub fn parse_file_name(name: &str) -> Option<SegmentId> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn encode_header(id: SegmentId, out: &mut Vec<u8>) {
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&id.to_le_bytes());
}

/// What the first bytes of a segment file say.
#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    Valid,
    /// Shorter than a header, or all zeroes: the file was being created when the node stopped.
    Unwritten,
    Invalid(&'static str),
}

pub fn check_header(bytes: &[u8], id: SegmentId) -> Header {
    let Some(header) = bytes.get(..SEGMENT_HEADER_BYTES) else {
        return Header::Unwritten;
    };
    if header.iter().all(|&b| b == 0) {
        return Header::Unwritten;
    }
    if &header[..MAGIC.len()] != MAGIC {
        return Header::Invalid("segment header has a wrong magic number");
    }
    if header[MAGIC.len()..] != id.to_le_bytes() {
        return Header::Invalid("segment header names another segment id");
    }
    Header::Valid
}

/// How a scan of a segment's frames ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte belongs to a valid frame.
    Clean,
    /// The frame at `offset` is damaged; the valid frames before it were visited.
    Damaged { offset: u64, fault: FrameFault },
}

/// A frame that passed its crc32 check but whose payload does not decode.
#[derive(Debug, PartialEq, Eq)]
pub struct Undecodable {
    pub offset: u64,
    pub reason: &'static str,
}

/// Visits every valid frame of a segment's bytes (header included) in order, with its offset and
/// length, until the end or the first damaged frame.
pub fn scan<E: From<Undecodable>>(
    bytes: &[u8],
    payload_bytes_max: u32,
    mut visit: impl FnMut(u64, u32, Record) -> Result<(), E>,
) -> Result<ScanEnd, E> {
    let mut offset = SEGMENT_HEADER_BYTES;
    while offset < bytes.len() {
        match frame::decode_frame(&bytes[offset..], payload_bytes_max) {
            Ok((payload, len)) => {
                let record = Record::decode(payload).map_err(|reason| {
                    E::from(Undecodable {
                        offset: offset as u64,
                        reason,
                    })
                })?;
                debug_assert!(len > FRAME_HEADER_BYTES);
                let len32 =
                    u32::try_from(len).expect("frame length is bounded by payload_bytes_max");
                visit(offset as u64, len32, record)?;
                offset += len;
            }
            Err(fault) => {
                return Ok(ScanEnd::Damaged {
                    offset: offset as u64,
                    fault,
                });
            }
        }
    }
    Ok(ScanEnd::Clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_reject_others() {
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(parse_file_name(&file_name(u64::MAX)), Some(u64::MAX));
        for other in [
            "LOCK",
            "42.log",
            "0000000000000000004a.log",
            "00000000000000000042.tmp",
        ] {
            assert_eq!(parse_file_name(other), None, "{other}");
        }
    }

    #[test]
    fn header_distinguishes_unwritten_from_invalid() {
        let mut h = Vec::new();
        encode_header(7, &mut h);
        assert_eq!(check_header(&h, 7), Header::Valid);
        assert!(matches!(check_header(&h, 8), Header::Invalid(_)));
        assert_eq!(check_header(&h[..10], 7), Header::Unwritten);
        assert_eq!(check_header(&[0; 16], 7), Header::Unwritten);
        h[0] ^= 1;
        assert!(matches!(check_header(&h, 7), Header::Invalid(_)));
    }
}
