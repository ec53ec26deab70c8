//! The checks of the `Records` service's requests that are not the record layer's own rules:
//! the write header, types and ids named by a request, page sizes, and a record entry of a write
//! (validated with the record layer's rules against this node's limits).

use dossier_api::v1::{Resource, ResourceType, WriteHeader};
use dossier_records::plan::{EntryOp, WriteEntry};
use dossier_records::{PatientId, kind_type, type_name, validate_new_record};

use super::records::RecordsService;
use crate::errors::ApiError;

impl RecordsService {
    pub(super) fn check_header(header: Option<&WriteHeader>) -> Result<&WriteHeader, ApiError> {
        let header = header.ok_or_else(|| {
            ApiError::invalid("header", "is required (it carries the request id)")
        })?;
        if header.request_id.len() != 16 || header.request_id.iter().all(|b| *b == 0) {
            return Err(ApiError::invalid(
                "header.request_id",
                "must be 16 bytes, not all zero",
            ));
        }
        Ok(header)
    }

    pub(super) fn read_type(raw: i32, field: &str) -> Result<&'static str, ApiError> {
        ResourceType::try_from(raw)
            .ok()
            .and_then(type_name)
            .ok_or_else(|| ApiError::invalid(field.to_owned(), "must be a resource type"))
    }

    pub(super) fn check_id(id: &str, field: &str) -> Result<(), ApiError> {
        if !dossier_records::is_valid_id(id) {
            return Err(ApiError::invalid(
                field.to_owned(),
                "must match [A-Za-z0-9.-]{1,64}",
            ));
        }
        Ok(())
    }

    /// Validates a create or update of one record and returns its entry.
    pub(super) fn entry<'a>(
        &self,
        patient: &PatientId,
        resource: Option<&'a Resource>,
        field: &str,
        op: EntryOp,
        patient_allowed: bool,
    ) -> Result<WriteEntry<'a>, ApiError> {
        let resource =
            resource.ok_or_else(|| ApiError::invalid(field.to_owned(), "is required"))?;
        validate_new_record(resource, field, patient.as_str(), &self.limits()).map_err(|e| {
            ApiError::InvalidArgument {
                field: e.field,
                message: e.message,
                limit: e.limit,
            }
        })?;
        let Some(kind) = &resource.kind else {
            return Err(ApiError::invalid(format!("{field}.kind"), "is required"));
        };
        let rtype = kind_type(kind);
        let id = resource
            .meta
            .as_ref()
            .map(|m| m.id.clone())
            .unwrap_or_default();
        if rtype == ResourceType::Patient {
            if !patient_allowed {
                return Err(ApiError::invalid(
                    format!("{field}.patient"),
                    "a Patient is written by CreatePatient or Update, not here",
                ));
            }
            if id != patient.as_str() {
                return Err(ApiError::invalid(
                    format!("{field}.meta.id"),
                    "a Patient's id must equal route.patient_id",
                ));
            }
        }
        Ok(WriteEntry {
            op,
            rtype,
            id,
            resource: Some(resource),
            field: field.to_owned(),
            holds: Vec::new(),
            token: [0; 16],
            releases: Vec::new(),
        })
    }

    /// A page size from a request's `limit` (0: the page limit).
    pub(super) fn page_limit(&self, limit: u32) -> Result<usize, ApiError> {
        let page_max = self.node.config.node.records.history_page_max;
        match limit {
            0 => Ok(page_max as usize),
            n if n > page_max => Err(ApiError::InvalidArgument {
                field: "limit".into(),
                message: format!("is {n}, above the page limit of {page_max}"),
                limit: Some(u64::from(page_max)),
            }),
            n => Ok(n as usize),
        }
    }
}
