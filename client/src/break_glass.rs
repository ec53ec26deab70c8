//! Break-the-glass: a clinician's stated reason to open a record without a care relationship,
//! sent as `x-dossier-break-glass: <reason>` with Records calls. The node serves such calls,
//! counts them and logs them for review (docs/security.md).

use tonic::metadata::AsciiMetadataValue;

use crate::ClientError;

/// The metadata key of the reason.
pub const BREAK_GLASS_HEADER: &str = "x-dossier-break-glass";

/// A break-the-glass reason: 8 to 512 bytes of printable ASCII (header text).
#[derive(Debug, Clone)]
pub struct BreakGlass(AsciiMetadataValue);

impl BreakGlass {
    pub fn new(reason: &str) -> Result<BreakGlass, ClientError> {
        let reason = reason.trim();
        let invalid = |message: &str| ClientError::InvalidArgument {
            field: "break_glass".into(),
            message: message.into(),
            limit: Some(512),
        };
        if !(8..=512).contains(&reason.len()) {
            return Err(invalid("a reason of 8 to 512 bytes is required"));
        }
        if !reason.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
            return Err(invalid("must be printable ASCII"));
        }
        AsciiMetadataValue::try_from(reason)
            .map(BreakGlass)
            .map_err(|_| invalid("cannot travel in a header"))
    }

    /// Puts the reason on `request`.
    pub(crate) fn stamp<T>(&self, request: &mut tonic::Request<T>) {
        request
            .metadata_mut()
            .insert(BREAK_GLASS_HEADER, self.0.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_required_and_travels_as_given() {
        let glass = BreakGlass::new("  unconscious patient, ER  ").unwrap();
        let mut request = tonic::Request::new(());
        glass.stamp(&mut request);
        assert_eq!(
            request.metadata().get(BREAK_GLASS_HEADER).unwrap(),
            "unconscious patient, ER"
        );
        assert!(BreakGlass::new("urgent").is_err(), "too short");
        assert!(BreakGlass::new(&"x".repeat(513)).is_err(), "too long");
        assert!(BreakGlass::new("patiënt bewusteloos").is_err(), "not ASCII");
    }
}
