//! `dossier-client`: the library application services use (routing cache, leader hints, retries).
//!
//! Not built yet: this crate is intentionally empty. It will depend only on `dossier-api`.
