//! Secret tokens: `<kind>.<id>.<secret>`, where the id names the token in the store and the
//! 256-bit secret proves possession. The store keeps only a SHA-256 hash of the secret, so a
//! leaked store does not leak usable tokens.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};

/// Token kind prefix of workload tokens.
pub const WORKLOAD_PREFIX: &str = "twt1";

/// Why a token string was refused before any lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is empty")]
    Empty,
    #[error("the token is malformed: expected '{expected}.<id>.<secret>' as printed when it was created")]
    Malformed { expected: &'static str },
    #[error("no random source is available to create a token")]
    Random,
}

/// A parsed token: its id (public) and secret (never logged).
#[derive(Clone, PartialEq, Eq)]
pub struct TokenParts {
    /// Public id, 16 hex digits.
    pub id: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenParts").field("id", &self.id).field("secret", &"<redacted>").finish()
    }
}

impl TokenParts {
    /// Creates a new random token of kind `prefix`; returns it with its printable form.
    pub fn generate(prefix: &str) -> Result<(Self, String), TokenError> {
        let rng = SystemRandom::new();
        let mut id = [0u8; 8];
        let mut secret = vec![0u8; 32];
        rng.fill(&mut id).map_err(|_| TokenError::Random)?;
        rng.fill(&mut secret).map_err(|_| TokenError::Random)?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let text = format!("{prefix}.{id}.{}", URL_SAFE_NO_PAD.encode(&secret));
        Ok((Self { id, secret }, text))
    }

    /// Parses a token of kind `prefix`.
    pub fn parse(text: &str, prefix: &'static str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Empty);
        }
        let bad = TokenError::Malformed { expected: prefix };
        let mut parts = text.splitn(3, '.');
        let (Some(p), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad);
        };
        if p != prefix || id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad);
        }
        let secret = URL_SAFE_NO_PAD.decode(secret).map_err(|_| bad.clone())?;
        if secret.len() != 32 {
            return Err(bad);
        }
        Ok(Self { id: id.to_ascii_lowercase(), secret })
    }

    /// The hash kept in the store.
    pub fn secret_hash(&self) -> String {
        hash_hex(&self.secret)
    }

    /// Whether this token's secret matches a stored hash. Compares in constant time.
    pub fn matches(&self, stored_hash: &str) -> bool {
        let mine = self.secret_hash();
        mine.len() == stored_hash.len()
            && mine.bytes().zip(stored_hash.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Lowercase hex SHA-256.
pub fn hash_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_parse_and_match() {
        let (parts, text) = TokenParts::generate(WORKLOAD_PREFIX).unwrap();
        let parsed = TokenParts::parse(&text, WORKLOAD_PREFIX).unwrap();
        assert_eq!(parsed, parts);
        assert!(parsed.matches(&parts.secret_hash()));
        let (other, _) = TokenParts::generate(WORKLOAD_PREFIX).unwrap();
        assert!(!parsed.matches(&other.secret_hash()));
        assert!(!format!("{parsed:?}").contains(&text[22..]), "secret must not appear in Debug");
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let (_, good) = TokenParts::generate(WORKLOAD_PREFIX).unwrap();
        let cases = [
            ("", TokenError::Empty),
            ("   ", TokenError::Empty),
            ("twt1", TokenError::Malformed { expected: WORKLOAD_PREFIX }),
            ("xyz1.0123456789abcdef.AAAA", TokenError::Malformed { expected: WORKLOAD_PREFIX }),
            ("twt1.0123.AAAA", TokenError::Malformed { expected: WORKLOAD_PREFIX }),
            ("twt1.0123456789abcdeg.AAAA", TokenError::Malformed { expected: WORKLOAD_PREFIX }),
            ("twt1.0123456789abcdef.!!!", TokenError::Malformed { expected: WORKLOAD_PREFIX }),
            ("twt1.0123456789abcdef.AAAA", TokenError::Malformed { expected: WORKLOAD_PREFIX }),
        ];
        for (input, want) in cases {
            assert_eq!(TokenParts::parse(input, WORKLOAD_PREFIX).unwrap_err(), want, "{input:?}");
        }
        let truncated = &good[..good.len() - 2];
        assert!(TokenParts::parse(truncated, WORKLOAD_PREFIX).is_err());
    }
}
