//! Wrapping the model key to a device's X25519 key, so that a sealed file
//! can be opened by that device's secure world alone (ephemeral-static
//! X25519, HKDF-SHA256, AES-256-GCM; see docs/sealed-format.md).

use std::fmt;
use std::path::Path;

use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, hkdf};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::format::{SealedHeader, KDF_LABEL, KEY_WRAP_LEN};
use crate::key::{decode_hex, encode_hex, read_hex_file, write_hex_file};
use crate::{ModelKey, SealError, MODEL_KEY_LEN};

/// A device's X25519 public key: what a vendor seals to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DevicePublicKey([u8; 32]);

impl fmt::Debug for DevicePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevicePublicKey({})", self.to_hex())
    }
}

impl DevicePublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        DevicePublicKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        String::from_utf8(encode_hex(&self.0).to_vec()).expect("hex digits are ASCII")
    }

    /// Parses 64 hex digits (surrounding whitespace allowed).
    pub fn from_hex(text: &str) -> Result<Self, SealError> {
        let mut bytes = [0u8; 32];
        decode_hex(text.trim().as_bytes(), &mut bytes)
            .map_err(|e| SealError::InvalidKey(format!("device public key: {e}")))?;
        Ok(DevicePublicKey(bytes))
    }

    /// Reads a public key file (64 hex digits).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SealError> {
        let mut bytes = [0u8; 32];
        read_hex_file(path.as_ref(), &mut bytes)?;
        Ok(DevicePublicKey(bytes))
    }

    /// Writes the key as hex (mode 0644: it is public).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), SealError> {
        write_hex_file(path.as_ref(), &self.0, 0o644)
    }
}

/// A device's X25519 secret key, held by its secure world. Wiped on drop,
/// never shown by `Debug`.
pub struct DeviceSecretKey(StaticSecret);

impl fmt::Debug for DeviceSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceSecretKey(<redacted>)")
    }
}

impl DeviceSecretKey {
    pub fn generate() -> Self {
        DeviceSecretKey(StaticSecret::from(*random_32()))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        DeviceSecretKey(StaticSecret::from(bytes))
    }

    /// A key for another purpose, derived from the device secret with a
    /// label of its own (HKDF-SHA256; the label is salt and info).
    pub(crate) fn derive_key(&self, label: &[u8]) -> Result<Zeroizing<[u8; 32]>, SealError> {
        let secret = Zeroizing::new(self.0.to_bytes());
        hkdf32(label, &secret[..], &[label])
    }

    pub fn public_key(&self) -> DevicePublicKey {
        DevicePublicKey(PublicKey::from(&self.0).to_bytes())
    }

    /// Reads a secret key file (64 hex digits).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SealError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        read_hex_file(path.as_ref(), &mut bytes[..])?;
        Ok(DeviceSecretKey(StaticSecret::from(*bytes)))
    }

    /// Writes the key as hex, owner-only (mode 0600), atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), SealError> {
        let bytes = Zeroizing::new(self.0.to_bytes());
        write_hex_file(path.as_ref(), &bytes[..], 0o600)
    }
}

fn random_32() -> Zeroizing<[u8; 32]> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    // The system random source failing is not recoverable for key generation.
    SystemRandom::new().fill(&mut bytes[..]).expect("operating system random source failed");
    bytes
}

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// 32 bytes of HKDF-SHA256 output: extract with `salt` from `ikm`, expand with `info`.
pub(crate) fn hkdf32(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> Result<Zeroizing<[u8; 32]>, SealError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let mut out = Zeroizing::new([0u8; 32]);
    prk.expand(info, Len32)
        .and_then(|okm| okm.fill(&mut out[..]))
        .map_err(|_| SealError::Crypto("HKDF expansion failed"))?;
    Ok(out)
}

/// The key-encryption key and associated data for one wrap.
fn wrap_cipher(
    shared: &[u8; 32],
    file_id: &[u8; 32],
    device: &[u8; 32],
    ephemeral: &[u8; 32],
) -> Result<(aead::LessSafeKey, [u8; 96]), SealError> {
    let kek = hkdf32(file_id, shared, &[KDF_LABEL, file_id, b"device key wrap", ephemeral, device])?;
    let key = aead::UnboundKey::new(&aead::AES_256_GCM, &kek[..])
        .map_err(|_| SealError::Crypto("AES-256-GCM key setup failed"))?;
    let mut aad = [0u8; 96];
    aad[..32].copy_from_slice(file_id);
    aad[32..64].copy_from_slice(device);
    aad[64..].copy_from_slice(ephemeral);
    Ok((aead::LessSafeKey::new(key), aad))
}

/// Builds the key-wrap section: device public key, ephemeral public key,
/// model key encrypted under a key derived from their X25519 shared secret.
pub(crate) fn wrap_model_key(
    key: &ModelKey,
    device: &DevicePublicKey,
    file_id: &[u8; 32],
) -> Result<[u8; KEY_WRAP_LEN], SealError> {
    let ephemeral = StaticSecret::from(*random_32());
    let ephemeral_public = PublicKey::from(&ephemeral).to_bytes();
    let shared = ephemeral.diffie_hellman(&PublicKey::from(device.0));
    if !shared.was_contributory() {
        return Err(SealError::InvalidKey("device public key is a low-order point".to_owned()));
    }
    let (kek, aad) = wrap_cipher(shared.as_bytes(), file_id, &device.0, &ephemeral_public)?;
    let mut section = [0u8; KEY_WRAP_LEN];
    section[..32].copy_from_slice(&device.0);
    section[32..64].copy_from_slice(&ephemeral_public);
    let wrapped = &mut section[64..64 + MODEL_KEY_LEN];
    wrapped.copy_from_slice(key.bytes());
    // The key-encryption key is fresh for every wrap, so a fixed nonce is never reused.
    let tag = kek
        .seal_in_place_separate_tag(aead::Nonce::assume_unique_for_key([0; 12]), aead::Aad::from(aad), wrapped)
        .map_err(|_| SealError::Crypto("AES-256-GCM encryption failed"))?;
    section[96..].copy_from_slice(tag.as_ref());
    Ok(section)
}

impl ModelKey {
    /// Recovers the model key of a sealed file wrapped to this device. The
    /// result still has to pass [`crate::SealedModel::open`]'s header check.
    pub fn unwrap_for_device(header: &SealedHeader, device: &DeviceSecretKey) -> Result<ModelKey, SealError> {
        let Some(section) = header.key_wrap.as_ref() else {
            return Err(SealError::NotDeviceWrapped);
        };
        let recipient: [u8; 32] = section[..32].try_into().expect("32 bytes");
        let ours = device.public_key();
        if recipient != ours.0 {
            return Err(SealError::WrongDevice { expected: DevicePublicKey(recipient).to_hex(), found: ours.to_hex() });
        }
        let ephemeral: [u8; 32] = section[32..64].try_into().expect("32 bytes");
        let shared = device.0.diffie_hellman(&PublicKey::from(ephemeral));
        if !shared.was_contributory() {
            return Err(SealError::KeyUnwrap);
        }
        let (kek, aad) = wrap_cipher(shared.as_bytes(), &header.file_id, &recipient, &ephemeral)?;
        let mut wrapped = Zeroizing::new([0u8; MODEL_KEY_LEN]);
        wrapped.copy_from_slice(&section[64..96]);
        let tag: [u8; 16] = section[96..].try_into().expect("16 bytes");
        kek.open_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(aad),
            aead::Tag::from(tag),
            &mut wrapped[..],
            0..,
        )
        .map_err(|_| SealError::KeyUnwrap)?;
        ModelKey::from_bytes(&wrapped[..])
    }
}
