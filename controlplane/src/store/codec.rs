//! The sealed format shared by every store backend: a CRC32 (little endian) of the payload, then
//! the payload (JSON of a [`Command`](crate::state::Command) or of a snapshot of the state).
//!
//! Backends store the same bytes so a damaged entry is recognised the same way everywhere; each
//! backend words its own error, because only it knows where the bytes came from and what an
//! operator can do about it.

/// The checksum of a sealed value does not match its payload (or the value is too short to hold
/// one): the bytes were damaged or were not written by a Trellis store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChecksumMismatch;

/// Prefixes `payload` with its CRC32.
pub(crate) fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the CRC32 of a sealed value and returns its payload.
pub(crate) fn unseal(bytes: &[u8]) -> Result<&[u8], ChecksumMismatch> {
    if bytes.len() < 4 {
        return Err(ChecksumMismatch);
    }
    let (sum, payload) = bytes.split_at(4);
    if sum != crc32fast::hash(payload).to_le_bytes() {
        return Err(ChecksumMismatch);
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_byte_is_caught() {
        let sealed = seal(b"{\"Noop\":null}");
        assert_eq!(unseal(&sealed), Ok(&b"{\"Noop\":null}"[..]));
        for i in 0..sealed.len() {
            let mut damaged = sealed.clone();
            damaged[i] ^= 0x01;
            assert_eq!(unseal(&damaged), Err(ChecksumMismatch), "flip at byte {i}");
        }
        assert_eq!(unseal(&sealed[..3]), Err(ChecksumMismatch));
        assert_eq!(unseal(&sealed[..sealed.len() - 1]), Err(ChecksumMismatch));
    }
}
