//! Sealed models: a GGUF file whose metadata and tensor directory stay
//! readable while every tensor's data is encrypted and authenticated in
//! independent chunks (AES-256-GCM), so that the secure world can fetch and
//! open any single chunk on its own. The byte layout, key schedule and the
//! attacks each check stops are described in docs/sealed-format.md.
//!
//! - [`seal_file`] turns a GGUF into a sealed file with a [`ModelKey`].
//! - [`SealedHeader::read`] parses the public part (no key): tensor names,
//!   shapes, and where each chunk lies in the file.
//! - [`SealedModel::open`] authenticates the header with the key; then
//!   [`SealedModel::open_chunk`] (or [`SealedModel::open_chunk_in_place`])
//!   decrypts one chunk, from any thread.
//! - [`SealOptions::to_device`] also wraps the model key to a device's X25519
//!   key; the device recovers it with [`ModelKey::unwrap_for_device`].
//! - [`seal_file_signed`] also signs the header region with a vendor's
//!   Ed25519 key ([`VendorSigningKey`]); [`SealedModel::open_verified`]
//!   requires a valid signature by a given [`VendorPublicKey`].

mod device;
mod error;
mod format;
mod identity;
mod key;
mod model;
mod seal;
mod signature;
mod stored;

pub use device::{DevicePublicKey, DeviceSecretKey};
pub use error::SealError;
pub use format::{
    ChunkInfo, SealedHeader, CHUNK_ENTRY_LEN, CHUNK_TAG_LEN, DEFAULT_CHUNK_SIZE, FLAG_DEVICE_WRAPPED,
    FLAG_VENDOR_SIGNED, FORMAT_VERSION, HEADER_TAG_LEN, KEY_WRAP_LEN, MAGIC, MAX_CHUNK_SIZE, MAX_PREFIX_LEN,
    MIN_CHUNK_SIZE, PREAMBLE_LEN,
};
pub use identity::{verify_identity_signature, Identity};
pub use key::{decode_hex, encode_hex, ModelKey, MODEL_KEY_LEN};
pub use model::SealedModel;
pub use seal::{seal_file, seal_file_signed, unseal_to_gguf_bytes, SealOptions, SealReport};
pub use signature::{
    SignatureFailure, VendorPublicKey, VendorSigningKey, SIGNATURE_LEN, SIGNATURE_SECTION_LEN, VENDOR_PUBLIC_KEY_LEN,
};
pub use stored::STORED_KEY_LEN;

/// Maps an I/O error to [`SealError::Io`] naming `path`.
pub(crate) fn io_error(path: &std::path::Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SealError {
    let path = path.to_owned();
    move |source| SealError::Io { path, what, source }
}

/// File name extension of sealed models.
pub const EXTENSION: &str = "fsm";

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn opener_is_shareable_between_threads() {
        assert_send_sync::<SealedModel>();
        assert_send_sync::<ModelKey>();
        assert_send_sync::<DeviceSecretKey>();
        assert_send_sync::<VendorSigningKey>();
    }

    #[test]
    fn model_key_debug_hides_bytes() {
        let key = ModelKey::from_bytes(&[0xab; 32]).unwrap();
        assert_eq!(format!("{key:?}"), "ModelKey(<redacted>)");
    }
}
