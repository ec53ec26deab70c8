//! The on-disk frame: `len: u32 LE | crc32(payload): u32 LE | payload`.
//!
//! Every record of the log and of a snapshot file is one frame. A frame is validated before it is
//! written (length within the configured maximum) and after it is read (length, then crc32).

/// Bytes of a frame header: payload length then crc32 of the payload, both little-endian `u32`.
pub const FRAME_HEADER_BYTES: usize = 8;
const _: () = assert!(FRAME_HEADER_BYTES == 2 * size_of::<u32>());

/// Why a byte range is not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFault {
    /// Fewer bytes than a header, or than the header announces: a torn write.
    Short,
    /// A zero length: payloads are never empty, so this is unwritten (zeroed) space.
    Empty,
    /// The announced length is above the configured maximum.
    TooLong,
    /// The payload does not match its crc32.
    Crc,
}

impl FrameFault {
    pub fn as_str(self) -> &'static str {
        match self {
            FrameFault::Short => "frame is cut short",
            FrameFault::Empty => "frame has zero length",
            FrameFault::TooLong => "frame length is above the configured maximum",
            FrameFault::Crc => "frame failed its crc32 check",
        }
    }
}

/// Appends one frame holding `payload` to `out`.
///
/// The caller enforces `payload_bytes_max` with a typed error first; here it is an invariant.
pub fn encode_frame(payload: &[u8], payload_bytes_max: u32, out: &mut Vec<u8>) {
    encode_frame_with(out, payload.len(), payload_bytes_max, |out| {
        out.extend_from_slice(payload)
    });
}

/// Appends one frame to `out` whose payload `write_payload` appends, without an extra copy.
///
/// Returns the frame's total length. `write_payload` must append exactly `payload_len` bytes: the
/// length is announced up front so that callers can decide on segment rolls before encoding.
pub fn encode_frame_with(
    out: &mut Vec<u8>,
    payload_len: usize,
    payload_bytes_max: u32,
    write_payload: impl FnOnce(&mut Vec<u8>),
) -> usize {
    let len = u32::try_from(payload_len).expect("caller enforces the payload limit");
    assert!(
        len <= payload_bytes_max,
        "caller enforces the payload limit"
    );
    assert!(len > 0, "payloads are never empty");
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    write_payload(out);
    assert_eq!(
        out.len() - start - FRAME_HEADER_BYTES,
        payload_len,
        "payload length as announced"
    );
    let crc = crc32fast::hash(&out[start + FRAME_HEADER_BYTES..]);
    out[start + 4..start + FRAME_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    debug_assert!(decode_frame(&out[start..], payload_bytes_max).is_ok());
    out.len() - start
}

/// Reads the header of a frame: the payload length it announces and the crc32 it carries.
pub fn decode_header(header: &[u8], payload_bytes_max: u32) -> Result<(u32, u32), FrameFault> {
    let Some(header) = header.get(..FRAME_HEADER_BYTES) else {
        return Err(FrameFault::Short);
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 {
        return Err(FrameFault::Empty);
    }
    if len > payload_bytes_max {
        return Err(FrameFault::TooLong);
    }
    Ok((len, crc))
}

/// Decodes the frame at the start of `bytes`: its payload and the frame's total length.
pub fn decode_frame(bytes: &[u8], payload_bytes_max: u32) -> Result<(&[u8], usize), FrameFault> {
    let (len, crc) = decode_header(bytes, payload_bytes_max)?;
    let end = FRAME_HEADER_BYTES + len as usize;
    let payload = bytes
        .get(FRAME_HEADER_BYTES..end)
        .ok_or(FrameFault::Short)?;
    if crc32fast::hash(payload) != crc {
        return Err(FrameFault::Crc);
    }
    Ok((payload, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame decodes to what was encoded; every damaged variant is reported, never accepted.
    #[test]
    fn frame_round_trip_and_faults() {
        let mut out = Vec::new();
        encode_frame(b"hello", 64, &mut out);
        assert_eq!(decode_frame(&out, 64), Ok((&b"hello"[..], 13)));
        assert_eq!(decode_frame(&out[..12], 64), Err(FrameFault::Short));
        assert_eq!(decode_frame(&out[..3], 64), Err(FrameFault::Short));
        assert_eq!(decode_frame(&out, 4), Err(FrameFault::TooLong));
        assert_eq!(decode_frame(&[0u8; 16], 64), Err(FrameFault::Empty));
        for bit in 0..out.len() * 8 {
            let mut bad = out.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_frame(&bad, 64).map(|(p, _)| p) != Ok(&b"hello"[..]),
                "bit {bit}"
            );
        }
    }
}
