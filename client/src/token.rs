//! A bearer token (an OAuth2/OIDC access token from the hospital's identity provider or the
//! patient portal) that the client sends as `authorization: Bearer <token>` with every call
//! (Records, Kv, cluster-map fetches): clinicians and patients are authenticated by it, and
//! services may be (docs/security.md). The token never appears in `Debug` output.

use tonic::metadata::AsciiMetadataValue;

use crate::ClientError;

#[derive(Clone)]
pub struct BearerToken(AsciiMetadataValue);

impl BearerToken {
    /// Checks that `token` can travel in a header (visible ASCII, no spaces).
    pub fn new(token: &str) -> Result<BearerToken, ClientError> {
        let token = token.trim();
        let invalid = |message: &str| ClientError::InvalidArgument {
            field: "token".into(),
            message: message.into(),
            limit: None,
        };
        if token.is_empty() {
            return Err(invalid("is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("must be visible ASCII without spaces (a JWT)"));
        }
        let mut value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| invalid("cannot travel in a header"))?;
        value.set_sensitive(true);
        Ok(BearerToken(value))
    }

    /// Puts the token on `request`.
    pub(crate) fn stamp<T>(&self, request: &mut tonic::Request<T>) {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_checked_and_never_printed() {
        let token = BearerToken::new(" eyJhbGciOiJFUzI1NiJ9.e30.c2ln ").expect("a JWT shape");
        assert_eq!(format!("{token:?}"), "BearerToken(..)");
        let mut request = tonic::Request::new(());
        token.stamp(&mut request);
        assert_eq!(
            request
                .metadata()
                .get("authorization")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer eyJhbGciOiJFUzI1NiJ9.e30.c2ln")
        );
        assert!(BearerToken::new("").is_err());
        assert!(BearerToken::new("two words").is_err());
        assert!(BearerToken::new("caf\u{e9}").is_err());
    }
}
