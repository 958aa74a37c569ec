//! The secure world's identity: an Ed25519 key pair that signs its identity
//! report and an X25519 key pair for key agreement with clients, both
//! derived from the device secret (HKDF-SHA256, a label each), so the
//! identity is born with the device key inside the secure world, lasts as
//! long as it, and never leaves either.

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::key::encode_hex;
use crate::{DeviceSecretKey, SealError};

const SIGNING_LABEL: &[u8] = b"flexserve identity ed25519 v1";
const AGREEMENT_LABEL: &[u8] = b"flexserve identity x25519 v1";

/// The identity key pairs of one device's secure world.
pub struct Identity {
    signing: Ed25519KeyPair,
    agreement: StaticSecret,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.signing_public_hex())
    }
}

fn hex(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&encode_hex(bytes)).into_owned()
}

impl Identity {
    pub fn of_device(device: &DeviceSecretKey) -> Result<Identity, SealError> {
        let seed = device.derive_key(SIGNING_LABEL)?;
        let signing = Ed25519KeyPair::from_seed_unchecked(&seed[..])
            .map_err(|_| SealError::Crypto("Ed25519 key from seed failed"))?;
        let agreement = StaticSecret::from(*device.derive_key(AGREEMENT_LABEL)?);
        Ok(Identity { signing, agreement })
    }

    /// The Ed25519 public key that verifies identity reports (hex).
    pub fn signing_public_hex(&self) -> String {
        hex(self.signing.public_key().as_ref())
    }

    /// The X25519 public key clients agree session keys with (hex).
    pub fn agreement_public_hex(&self) -> String {
        hex(PublicKey::from(&self.agreement).as_bytes())
    }

    /// The X25519 secret that encrypted sessions are agreed with; it stays in
    /// the secure world (zeroized when dropped).
    pub fn agreement_secret(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.agreement.to_bytes())
    }

    /// An Ed25519 signature of `message` (hex).
    pub fn sign_hex(&self, message: &[u8]) -> String {
        hex(self.signing.sign(message).as_ref())
    }
}

/// Checks an Ed25519 signature (hex) of `message` under a public key (hex).
pub fn verify_identity_signature(public_hex: &str, message: &[u8], signature_hex: &str) -> Result<(), SealError> {
    let mut public = [0u8; 32];
    let mut signature = [0u8; 64];
    crate::decode_hex(public_hex.trim().as_bytes(), &mut public)
        .map_err(|e| SealError::InvalidKey(format!("identity public key: {e}")))?;
    crate::decode_hex(signature_hex.trim().as_bytes(), &mut signature)
        .map_err(|e| SealError::InvalidKey(format!("identity signature: {e}")))?;
    UnparsedPublicKey::new(&ED25519, &public)
        .verify(message, &signature)
        .map_err(|_| SealError::InvalidKey("the identity report's signature does not verify".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_follows_the_device_key_and_its_signatures_verify() {
        let device = DeviceSecretKey::generate();
        let a = Identity::of_device(&device).unwrap();
        let b = Identity::of_device(&device).unwrap();
        assert_eq!(a.signing_public_hex(), b.signing_public_hex());
        assert_eq!(a.agreement_public_hex(), b.agreement_public_hex());
        assert_ne!(a.agreement_public_hex(), device.public_key().to_hex(), "a key of its own, not the device key");
        let other = Identity::of_device(&DeviceSecretKey::generate()).unwrap();
        assert_ne!(a.signing_public_hex(), other.signing_public_hex());
        let sig = a.sign_hex(b"report");
        verify_identity_signature(&a.signing_public_hex(), b"report", &sig).unwrap();
        assert!(verify_identity_signature(&a.signing_public_hex(), b"rep0rt", &sig).is_err());
        assert!(verify_identity_signature(&other.signing_public_hex(), b"report", &sig).is_err());
    }
}
