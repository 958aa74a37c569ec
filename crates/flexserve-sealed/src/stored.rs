//! Model keys kept outside the secure world, sealed under its device key.
//!
//! A raw model key that a user imports (`flexserve key import`) must not stay
//! in a file the normal world can read. The secure world seals it under a key
//! derived from its device secret and hands back the blob; the normal world
//! stores the blob and sends it back in later sessions, and only that secure
//! world can open it (OP-TEE keeps its secure storage in the normal world's
//! file system the same way).
//!
//! Blob: `FSKEYST1` (8 bytes), a random 96-bit nonce, the 32-byte key
//! encrypted with AES-256-GCM, its 16-byte tag. The storage key is
//! HKDF-SHA256 of the device secret with a label of its own, so it is never
//! the key used for X25519.

use ring::aead;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::{DeviceSecretKey, ModelKey, SealError, MODEL_KEY_LEN};

const MAGIC: &[u8; 8] = b"FSKEYST1";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Length of a stored key blob in bytes.
pub const STORED_KEY_LEN: usize = MAGIC.len() + NONCE_LEN + MODEL_KEY_LEN + TAG_LEN;
const STORAGE_LABEL: &[u8] = b"flexserve stored model key v1";

fn storage_key(device: &DeviceSecretKey) -> Result<aead::LessSafeKey, SealError> {
    let key = device.derive_key(STORAGE_LABEL)?;
    let key = aead::UnboundKey::new(&aead::AES_256_GCM, &key[..])
        .map_err(|_| SealError::Crypto("AES-256-GCM key setup failed"))?;
    Ok(aead::LessSafeKey::new(key))
}

impl DeviceSecretKey {
    /// Seals a model key for storage outside the secure world.
    pub fn seal_stored_key(&self, key: &ModelKey) -> Result<[u8; STORED_KEY_LEN], SealError> {
        let cipher = storage_key(self)?;
        let mut blob = [0u8; STORED_KEY_LEN];
        blob[..8].copy_from_slice(MAGIC);
        let (nonce, rest) = blob[8..].split_at_mut(NONCE_LEN);
        SystemRandom::new().fill(nonce).map_err(|_| SealError::Crypto("random source failed"))?;
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Crypto("nonce length"))?;
        let (body, tag_out) = rest.split_at_mut(MODEL_KEY_LEN);
        body.copy_from_slice(key.bytes());
        let tag = cipher
            .seal_in_place_separate_tag(nonce, aead::Aad::from(MAGIC), body)
            .map_err(|_| SealError::Crypto("AES-256-GCM encryption failed"))?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(blob)
    }

    /// Opens a blob made by [`DeviceSecretKey::seal_stored_key`] with the same device key.
    pub fn open_stored_key(&self, blob: &[u8]) -> Result<ModelKey, SealError> {
        let malformed = |reason: String| SealError::Malformed { field: "stored key", reason };
        if blob.len() != STORED_KEY_LEN {
            return Err(malformed(format!("{} bytes, expected {STORED_KEY_LEN}", blob.len())));
        }
        if &blob[..8] != MAGIC {
            return Err(malformed("does not start with FSKEYST1".to_string()));
        }
        let cipher = storage_key(self)?;
        let nonce = aead::Nonce::try_assume_unique_for_key(&blob[8..8 + NONCE_LEN])
            .map_err(|_| SealError::Crypto("nonce length"))?;
        let mut body = Zeroizing::new([0u8; MODEL_KEY_LEN + TAG_LEN]);
        body.copy_from_slice(&blob[8 + NONCE_LEN..]);
        let plain =
            cipher.open_in_place(nonce, aead::Aad::from(MAGIC), &mut body[..]).map_err(|_| SealError::StoredKey)?;
        ModelKey::from_bytes(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_keys_open_only_on_their_device_and_untouched() {
        let device = DeviceSecretKey::generate();
        let key = ModelKey::generate();
        let blob = device.seal_stored_key(&key).unwrap();
        assert_eq!(device.open_stored_key(&blob).unwrap().bytes(), key.bytes());
        // Fresh nonce each time.
        assert_ne!(device.seal_stored_key(&key).unwrap(), blob);
        let other = DeviceSecretKey::generate();
        assert!(matches!(other.open_stored_key(&blob), Err(SealError::StoredKey)));
        for i in 8..STORED_KEY_LEN {
            let mut bad = blob;
            bad[i] ^= 1;
            assert!(matches!(device.open_stored_key(&bad), Err(SealError::StoredKey)), "byte {i}");
        }
        let mut bad = blob;
        bad[0] ^= 1;
        assert!(device.open_stored_key(&bad).unwrap_err().to_string().contains("FSKEYST1"));
        assert!(device.open_stored_key(&blob[1..]).unwrap_err().to_string().contains("expected 68"));
    }
}
