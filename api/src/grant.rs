//! What a service may do: the grants that scope an application service to some of the calls a
//! service may make. A service's certificate carries them as subject alternative names
//! `urn:dossier:grant:<name>` (`dossier cert create-client --grant`), a token as its `grants`
//! claim (`dossier token issue --grant`). A service with no grant listed may make every call a
//! service may (certificates made before grants existed keep working); one with grants, those
//! only.

/// One kind of call a service may be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grant {
    /// Read a patient's records (Read, VRead, History, Everything, Search).
    RecordsRead,
    /// Write a patient's records (create, update, delete, transactions), and set aside or list
    /// quarantined records.
    RecordsWrite,
    /// Register new patients.
    PatientsCreate,
    /// Resolve an identifier to the patient holding it.
    Lookup,
    /// The Kv service.
    Kv,
    /// Read a patient's access log.
    AccessLog,
}

/// The prefix of a grant in a certificate's subject alternative names.
pub const GRANT_URI_PREFIX: &str = "urn:dossier:grant:";

impl Grant {
    pub const ALL: [Grant; 6] = [
        Grant::RecordsRead,
        Grant::RecordsWrite,
        Grant::PatientsCreate,
        Grant::Lookup,
        Grant::Kv,
        Grant::AccessLog,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Grant::RecordsRead => "records-read",
            Grant::RecordsWrite => "records-write",
            Grant::PatientsCreate => "patients-create",
            Grant::Lookup => "lookup",
            Grant::Kv => "kv",
            Grant::AccessLog => "access-log",
        }
    }

    /// The grant named `name`, or an error naming the known ones.
    pub fn parse(name: &str) -> Result<Grant, String> {
        Grant::ALL
            .into_iter()
            .find(|g| g.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown grant {name:?}: one of {}",
                    Grant::ALL.map(Grant::name).join(", ")
                )
            })
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::Grant;

    #[test]
    fn every_grant_parses_back_from_its_name() {
        for g in Grant::ALL {
            assert_eq!(Grant::parse(g.name()), Ok(g));
        }
        assert!(
            Grant::parse("everything")
                .unwrap_err()
                .contains("records-read")
        );
    }
}
