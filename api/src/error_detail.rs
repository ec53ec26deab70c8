//! Reading the `dossier.v1.ErrorDetail` of an error status, whichever server sent it.

use prost::Message;

use crate::google::rpc::Status;
use crate::v1::ErrorDetail;

/// The `type_url` of an `ErrorDetail` packed in an `Any`.
pub const ERROR_DETAIL_TYPE_URL: &str = "type.googleapis.com/dossier.v1.ErrorDetail";

/// The `ErrorDetail` of a status's details (`grpc-status-details-bin`): the `Any` of that type in
/// a `google.rpc.Status` (the standard error model every server of this version sends), or, from
/// a server of an older version, a bare `ErrorDetail`. None when there is none.
pub fn error_detail(details: &[u8]) -> Option<ErrorDetail> {
    if details.is_empty() {
        return None;
    }
    if let Ok(status) = Status::decode(details)
        && let Some(any) = status
            .details
            .iter()
            .find(|a| a.type_url == ERROR_DETAIL_TYPE_URL)
    {
        return ErrorDetail::decode(any.value.as_slice()).ok();
    }
    ErrorDetail::decode(details).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::ErrorReason;

    fn detail() -> ErrorDetail {
        ErrorDetail {
            reason: ErrorReason::NotLeader as i32,
            message: "not the leader".into(),
            leader_hint_node_id: 3,
            leader_hint_address: "127.0.0.1:7103".into(),
            ..ErrorDetail::default()
        }
    }

    #[test]
    fn both_the_standard_model_and_a_bare_detail_are_read() {
        let status = Status {
            code: 14,
            message: "not the leader".into(),
            details: vec![
                prost_types::Any {
                    type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                    value: vec![],
                },
                prost_types::Any {
                    type_url: ERROR_DETAIL_TYPE_URL.into(),
                    value: detail().encode_to_vec(),
                },
            ],
        };
        assert_eq!(error_detail(&status.encode_to_vec()), Some(detail()));
        assert_eq!(error_detail(&detail().encode_to_vec()), Some(detail()));
        assert_eq!(error_detail(&[]), None);
    }
}
