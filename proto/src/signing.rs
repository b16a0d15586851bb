//! Model signatures: Ed25519 over a fixed signing payload, the same code on
//! the publishing side (the processor's model publisher, `edgeloop ctl
//! models rollback`) and on the device.
//!
//! The signing payload of a `ModelUpdate` (docs/device-protocol.md, "Model
//! signatures") is the concatenation of
//!
//! | bytes | what |
//! |---|---|
//! | 18 | the ASCII text `edgeloop-model-v1` and one zero byte |
//! | 4 + n | `task`: its UTF-8 length as a big-endian u32, then the bytes |
//! | 4 + n | `profile`, the same way |
//! | 8 | `version`, big-endian u64 |
//! | 4 + n | `format`, the same way as `task` |
//! | 32 | the SHA-256 of `artifact` |
//!
//! `published_at_micros` and `lineage_json` are informational and not
//! signed. A device checks, in this order: the SHA-256 of the artifact equals
//! `sha256`, and `signature` is a valid Ed25519 signature of the payload by
//! its provisioned public key ([`verify_update`]).
//!
//! Keys are exchanged as text: 64 lowercase hex digits, the 32-byte Ed25519
//! seed (private key) or the 32-byte public key ([`parse_signing_key`],
//! [`parse_verifying_key`], [`to_hex`]). This module does no I/O; reading the
//! key files is the caller's job.

use ed25519_dalek::{Signature, Signer as _, Verifier as _};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::v1::ModelUpdate;

/// The first bytes of every signing payload: names the scheme and its
/// version, so a signature cannot be replayed for another kind of message.
pub const DOMAIN: &[u8] = b"edgeloop-model-v1\0";

/// Why a model update or a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the artifact's SHA-256 is {actual}, but the update says {claimed}")]
    HashMismatch { claimed: String, actual: String },
    #[error("the update is not signed")]
    Unsigned,
    #[error("the signature is {0} bytes long, not 64")]
    BadSignatureLength(usize),
    #[error("the signature does not verify with the given public key")]
    BadSignature,
    #[error("{what}: {reason}")]
    BadKey { what: &'static str, reason: String },
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // A length above u32::MAX cannot occur in a message that fits in MQTT
    // (256 MiB at most); saturating keeps the function total.
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The bytes that are signed for `update`, with `artifact_sha256` as the
/// artifact's hash (see the module docs for the layout).
pub fn signing_payload(update: &ModelUpdate, artifact_sha256: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        DOMAIN.len() + 12 + update.task.len() + update.profile.len() + update.format.len() + 40,
    );
    out.extend_from_slice(DOMAIN);
    put_str(&mut out, &update.task);
    put_str(&mut out, &update.profile);
    out.extend_from_slice(&update.version.to_be_bytes());
    put_str(&mut out, &update.format);
    out.extend_from_slice(artifact_sha256);
    out
}

/// Sets `update.sha256` to the artifact's hash and `update.signature` to
/// the Ed25519 signature of the signing payload by `key`.
pub fn sign_update(update: &mut ModelUpdate, key: &SigningKey) {
    let hash = sha256(&update.artifact);
    let signature = key.sign(&signing_payload(update, &hash));
    update.sha256 = hash.to_vec().into();
    update.signature = signature.to_bytes().to_vec().into();
}

/// Checks that `update.sha256` is its artifact's hash and that
/// `update.signature` is `key`'s signature of the signing payload.
pub fn verify_update(update: &ModelUpdate, key: &VerifyingKey) -> Result<(), SignatureError> {
    let hash = sha256(&update.artifact);
    if update.sha256.as_ref() != hash.as_slice() {
        return Err(SignatureError::HashMismatch {
            claimed: to_hex(&update.sha256),
            actual: to_hex(&hash),
        });
    }
    if update.signature.is_empty() {
        return Err(SignatureError::Unsigned);
    }
    let bytes: [u8; 64] = update
        .signature
        .as_ref()
        .try_into()
        .map_err(|_| SignatureError::BadSignatureLength(update.signature.len()))?;
    key.verify(
        &signing_payload(update, &hash),
        &Signature::from_bytes(&bytes),
    )
    .map_err(|_| SignatureError::BadSignature)
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn key_bytes(text: &str, what: &'static str) -> Result<[u8; 32], SignatureError> {
    let text = text.trim();
    let bad = |reason: String| SignatureError::BadKey { what, reason };
    if text.len() != 64 {
        return Err(bad(format!(
            "expected 64 hex digits (32 bytes), found {} characters",
            text.len()
        )));
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => out[i] = (h * 16 + l) as u8,
            _ => return Err(bad(format!("character {} is not a hex digit", i * 2))),
        }
    }
    Ok(out)
}

/// A private key from its text form (64 hex digits of the 32-byte seed;
/// surrounding whitespace is ignored).
pub fn parse_signing_key(text: &str) -> Result<SigningKey, SignatureError> {
    Ok(SigningKey::from_bytes(&key_bytes(text, "signing key")?))
}

/// A public key from its text form (64 hex digits).
pub fn parse_verifying_key(text: &str) -> Result<VerifyingKey, SignatureError> {
    VerifyingKey::from_bytes(&key_bytes(text, "public key")?).map_err(|e| SignatureError::BadKey {
        what: "public key",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update() -> ModelUpdate {
        ModelUpdate {
            task: "anomaly".into(),
            profile: "int8".into(),
            version: 7,
            artifact: vec![1u8, 2, 3, 250].into(),
            format: "edgeloop-int8-v1".into(),
            published_at_micros: 1_700_000_000_000_000,
            lineage_json: "{}".into(),
            ..Default::default()
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_signed_update_verifies_with_the_public_key() {
        let mut u = update();
        sign_update(&mut u, &key(1));
        assert_eq!(u.sha256.as_ref(), sha256(&[1, 2, 3, 250]).as_slice());
        assert_eq!(verify_update(&u, &key(1).verifying_key()), Ok(()));
        // Unsigned fields may change.
        u.lineage_json = "{\"x\":1}".into();
        u.published_at_micros += 1;
        assert_eq!(verify_update(&u, &key(1).verifying_key()), Ok(()));
    }

    #[test]
    fn tampered_or_foreign_updates_are_refused_with_a_reason() {
        let mut signed = update();
        sign_update(&mut signed, &key(1));
        let public = key(1).verifying_key();

        let mut u = signed.clone();
        u.artifact = vec![1u8, 2, 3, 251].into();
        assert!(matches!(
            verify_update(&u, &public),
            Err(SignatureError::HashMismatch { .. })
        ));
        let mut u = signed.clone();
        u.version = 8;
        assert_eq!(
            verify_update(&u, &public),
            Err(SignatureError::BadSignature)
        );
        let mut u = signed.clone();
        u.profile = "f32".into();
        assert_eq!(
            verify_update(&u, &public),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            verify_update(&signed, &key(2).verifying_key()),
            Err(SignatureError::BadSignature)
        );
        let mut u = signed.clone();
        u.signature = Default::default();
        assert_eq!(verify_update(&u, &public), Err(SignatureError::Unsigned));
        u.signature = vec![0u8; 10].into();
        assert_eq!(
            verify_update(&u, &public),
            Err(SignatureError::BadSignatureLength(10))
        );
    }

    /// Pins the payload layout documented in docs/device-protocol.md:
    /// firmware that builds it by hand must get these bytes.
    #[test]
    fn signing_payload_layout_is_pinned() {
        let u = ModelUpdate {
            task: "t".into(),
            profile: "p".into(),
            version: 258,
            format: "f".into(),
            ..Default::default()
        };
        let payload = signing_payload(&u, &[0xab; 32]);
        let mut expected = b"edgeloop-model-v1\0".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 1, b't', 0, 0, 0, 1, b'p']);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        expected.extend_from_slice(&[0, 0, 0, 1, b'f']);
        expected.extend_from_slice(&[0xab; 32]);
        assert_eq!(payload, expected);
    }

    #[test]
    fn keys_round_trip_through_hex_and_bad_text_is_refused() {
        let k = key(9);
        let parsed = parse_signing_key(&format!(" {}\n", to_hex(&k.to_bytes()))).expect("seed");
        assert_eq!(parsed.to_bytes(), k.to_bytes());
        let public = parse_verifying_key(&to_hex(k.verifying_key().as_bytes())).expect("public");
        assert_eq!(public, k.verifying_key());
        assert!(matches!(
            parse_signing_key("abc"),
            Err(SignatureError::BadKey {
                what: "signing key",
                ..
            })
        ));
        assert!(parse_verifying_key(&"zz".repeat(32)).is_err());
    }
}
