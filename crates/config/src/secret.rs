//! Password hashes: argon2id PHC strings, as the users file of `[auth]`
//! and `[[admin_token]]` hold them (`ternd hash-password`, `ternctl token new`).

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::Argon2;

pub use argon2::password_hash::Error as HashError;

/// An argon2id PHC string for `password`, with the crate's default
/// parameters and a random salt (`ternd hash-password`).
pub fn hash_password(password: &[u8]) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default().hash_password(password, &salt).map(|h| h.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_parameters() {
        let h = hash_password(b"pw").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
    }
}
