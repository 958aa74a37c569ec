//! Optional vendor signatures (Ed25519) over a sealed file's header region,
//! so that a device can accept only files a given vendor made, not merely
//! files made by someone holding the model key (see docs/sealed-format.md).

use std::fmt;
use std::path::Path;

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use zeroize::Zeroizing;

use crate::key::{decode_hex, encode_hex, read_hex_file, write_hex_file};
use crate::SealError;

/// Length of an Ed25519 public key.
pub const VENDOR_PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Size of the signature section after the header tag of a signed file:
/// the vendor's public key, then the signature.
pub const SIGNATURE_SECTION_LEN: usize = VENDOR_PUBLIC_KEY_LEN + SIGNATURE_LEN;

/// Domain label that starts every signed message, so that a vendor key used
/// for other purposes can never have its signatures reinterpreted as ours.
const SIGNATURE_LABEL: &[u8] = b"flexserve sealed model v1 vendor signature";

/// Why a vendor signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureFailure {
    #[error("the file is not signed, but a signature by vendor key {required} is required")]
    Missing { required: String },
    #[error("the file is signed by vendor key {found}, not by the required vendor key {required}")]
    OtherVendor { required: String, found: String },
    #[error(
        "the signature by vendor key {signer} does not verify: the signature or the signed header \
         region (preamble, key-wrap section, GGUF header, chunk table) was modified"
    )]
    Invalid { signer: String },
}

/// A vendor's Ed25519 public key: what a device trusts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VendorPublicKey([u8; VENDOR_PUBLIC_KEY_LEN]);

impl fmt::Debug for VendorPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VendorPublicKey({})", self.to_hex())
    }
}

impl VendorPublicKey {
    /// Wraps 32 bytes; whether they are a valid point is checked when a
    /// signature is verified (an invalid key verifies nothing).
    pub fn from_bytes(bytes: [u8; VENDOR_PUBLIC_KEY_LEN]) -> Self {
        VendorPublicKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; VENDOR_PUBLIC_KEY_LEN] {
        &self.0
    }

    /// 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        String::from_utf8(encode_hex(&self.0).to_vec()).expect("hex digits are ASCII")
    }

    /// Parses 64 hex digits (surrounding whitespace allowed).
    pub fn from_hex(text: &str) -> Result<Self, SealError> {
        let mut bytes = [0u8; VENDOR_PUBLIC_KEY_LEN];
        decode_hex(text.trim().as_bytes(), &mut bytes)
            .map_err(|e| SealError::InvalidKey(format!("vendor public key: {e}")))?;
        Ok(VendorPublicKey(bytes))
    }

    /// Reads a public key file (64 hex digits).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SealError> {
        let mut bytes = [0u8; VENDOR_PUBLIC_KEY_LEN];
        read_hex_file(path.as_ref(), &mut bytes)?;
        Ok(VendorPublicKey(bytes))
    }

    /// Writes the key as hex (mode 0644: it is public), atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), SealError> {
        write_hex_file(path.as_ref(), &self.0, 0o644)
    }

    /// Checks `signature` over the header region `signed` (bytes 0 .. T).
    pub(crate) fn verify(&self, signed: &[u8], signature: &[u8; SIGNATURE_LEN]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0).verify(&signed_message(signed), signature).is_ok()
    }
}

/// A vendor's Ed25519 signing key, stored as its 32-byte seed. Its `Debug`
/// form never shows the seed; the seed copy is wiped on drop.
pub struct VendorSigningKey {
    seed: Zeroizing<[u8; 32]>,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for VendorSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VendorSigningKey(public {}, secret <redacted>)", self.public_key().to_hex())
    }
}

impl Clone for VendorSigningKey {
    fn clone(&self) -> Self {
        VendorSigningKey::from_seed(&self.seed[..]).expect("a held seed is 32 bytes")
    }
}

impl VendorSigningKey {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        // The system random source failing is not recoverable for key generation.
        SystemRandom::new().fill(&mut seed[..]).expect("operating system random source failed");
        VendorSigningKey::from_seed(&seed[..]).expect("32-byte seed")
    }

    /// The key pair of a 32-byte Ed25519 seed (copied; the caller should
    /// wipe its own copy).
    pub fn from_seed(seed: &[u8]) -> Result<Self, SealError> {
        let seed: [u8; 32] = seed
            .try_into()
            .map_err(|_| SealError::InvalidKey(format!("vendor signing seed is {} bytes, expected 32", seed.len())))?;
        let seed = Zeroizing::new(seed);
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed[..])
            .map_err(|_| SealError::InvalidKey("vendor signing seed rejected".to_owned()))?;
        Ok(VendorSigningKey { seed, pair })
    }

    pub fn public_key(&self) -> VendorPublicKey {
        VendorPublicKey(self.pair.public_key().as_ref().try_into().expect("Ed25519 public keys are 32 bytes"))
    }

    /// Reads a signing key file (the seed as 64 hex digits).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SealError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        read_hex_file(path.as_ref(), &mut seed[..])?;
        VendorSigningKey::from_seed(&seed[..])
    }

    /// Writes the seed as 64 hex digits and a newline, owner-only (mode
    /// 0600), through a synced temporary file renamed over `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), SealError> {
        write_hex_file(path.as_ref(), &self.seed[..], 0o600)
    }

    /// The signature section for the header region `signed` (bytes 0 .. T):
    /// public key, then the signature.
    pub(crate) fn sign_section(&self, signed: &[u8]) -> [u8; SIGNATURE_SECTION_LEN] {
        let mut section = [0u8; SIGNATURE_SECTION_LEN];
        section[..VENDOR_PUBLIC_KEY_LEN].copy_from_slice(self.public_key().as_bytes());
        section[VENDOR_PUBLIC_KEY_LEN..].copy_from_slice(self.pair.sign(&signed_message(signed)).as_ref());
        section
    }
}

/// The message that is signed: the domain label, then SHA-512 of the header
/// region. Hashing first keeps the message small whatever the header size.
fn signed_message(signed: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_LABEL.len() + 64);
    message.extend_from_slice(SIGNATURE_LABEL);
    message.extend_from_slice(digest::digest(&digest::SHA512, signed).as_ref());
    message
}

/// A parsed signature section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VendorSignature {
    pub signer: VendorPublicKey,
    pub signature: [u8; SIGNATURE_LEN],
}

impl VendorSignature {
    pub(crate) fn parse(section: &[u8; SIGNATURE_SECTION_LEN]) -> Self {
        VendorSignature {
            signer: VendorPublicKey(section[..VENDOR_PUBLIC_KEY_LEN].try_into().expect("32 bytes")),
            signature: section[VENDOR_PUBLIC_KEY_LEN..].try_into().expect("64 bytes"),
        }
    }
}
