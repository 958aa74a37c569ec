//! Opening a sealed model with its key.

use ring::{aead, hmac};

use crate::format::{chunk_aad, chunk_nonce, name_digest, FileKeys, SealedHeader, CHUNK_TAG_LEN, HEADER_TAG_LEN};
use crate::{ChunkInfo, DeviceSecretKey, ModelKey, SealError, VendorPublicKey};

/// A sealed model whose header is authenticated with the model key. Chunks
/// are opened independently with `&self`, from any number of threads.
pub struct SealedModel {
    header: SealedHeader,
    chunk_key: aead::LessSafeKey,
    /// SHA-256 of each tensor's name, computed once so that opening a chunk
    /// allocates nothing.
    name_digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for SealedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedModel")
            .field("file_id", &self.header.file_id)
            .field("chunks", &self.header.chunks.len())
            .finish_non_exhaustive()
    }
}

impl SealedModel {
    /// Parses the header at the start of `header_bytes` (the file's first
    /// `chunks_offset` bytes or more; see [`SealedHeader::read_prefix`]),
    /// checks the key, then the header tag over everything before it. A
    /// signed file's signature must verify under the vendor key it names;
    /// unsigned files are accepted. To require a particular vendor, use
    /// [`SealedModel::open_verified`].
    pub fn open(header_bytes: &[u8], key: &ModelKey) -> Result<SealedModel, SealError> {
        SealedModel::open_verified(header_bytes, key, None)
    }

    /// Like [`SealedModel::open`], and with `vendor` the file must carry a
    /// valid signature by exactly that key (else [`SealError::Signature`]:
    /// missing, by another vendor, or not verifying). The signature is
    /// checked before the model key and header tag.
    pub fn open_verified(
        header_bytes: &[u8],
        key: &ModelKey,
        vendor: Option<&VendorPublicKey>,
    ) -> Result<SealedModel, SealError> {
        SealedModel::open_header(SealedHeader::read(header_bytes)?, header_bytes, key, vendor)
    }

    /// Opens with whichever key fits, parsing the header once (a large
    /// vocabulary makes parsing cost): the device key when the file is wrapped
    /// to a device, else the first of `model_keys` whose key check matches.
    /// Fails with the device key's error, or [`SealError::WrongKey`] when no
    /// key fits.
    pub fn open_with_keys(
        header_bytes: &[u8],
        device: Option<&DeviceSecretKey>,
        model_keys: &[ModelKey],
        vendor: Option<&VendorPublicKey>,
    ) -> Result<SealedModel, SealError> {
        let header = SealedHeader::read(header_bytes)?;
        if header.wrapped_to_device().is_some() {
            if let Some(device) = device {
                let key = ModelKey::unwrap_for_device(&header, device)?;
                return SealedModel::open_header(header, header_bytes, &key, vendor);
            }
        }
        let fitting = model_keys.iter().find(|k| {
            FileKeys::derive(k, &header.file_id)
                .map(|keys| equal_in_constant_time(&keys.key_check[..], &header.key_check))
                .unwrap_or(false)
        });
        match fitting {
            Some(key) => SealedModel::open_header(header, header_bytes, key, vendor),
            None => Err(SealError::WrongKey),
        }
    }

    /// The rest of opening, on a header parsed from exactly `header_bytes`.
    fn open_header(
        header: SealedHeader,
        header_bytes: &[u8],
        key: &ModelKey,
        vendor: Option<&VendorPublicKey>,
    ) -> Result<SealedModel, SealError> {
        header.verify_signature(header_bytes, vendor)?;
        let keys = FileKeys::derive(key, &header.file_id)?;
        if !equal_in_constant_time(&keys.key_check[..], &header.key_check) {
            return Err(SealError::WrongKey);
        }
        let tag_offset = header.tag_offset as usize;
        let tag = &header_bytes[tag_offset..tag_offset + HEADER_TAG_LEN];
        hmac::verify(&keys.header_key, &header_bytes[..tag_offset], tag).map_err(|_| SealError::HeaderAuth)?;
        let name_digests = header.gguf.tensors.iter().map(|t| name_digest(&t.name)).collect();
        Ok(SealedModel { header, chunk_key: keys.chunk_key, name_digests })
    }

    /// The authenticated header.
    pub fn header(&self) -> &SealedHeader {
        &self.header
    }

    /// Decrypts chunk `index` from `ciphertext` (exactly the chunk's bytes on
    /// file, ciphertext then tag) into `out` (exactly the plaintext length).
    /// On any failure `out` is zeroed, so it never holds unauthenticated data.
    pub fn open_chunk(&self, index: usize, ciphertext: &[u8], out: &mut [u8]) -> Result<(), SealError> {
        let result = self.open_chunk_inner(index, ciphertext, out);
        if result.is_err() {
            out.fill(0);
        }
        result
    }

    /// Decrypts chunk `index` in place: `sealed` holds exactly the chunk's
    /// bytes on file (ciphertext then tag); on success its first `len` bytes
    /// are the plaintext, returned as a slice. Saves the copy
    /// [`SealedModel::open_chunk`] makes, for callers that read each chunk
    /// into a staging buffer anyway. On any failure `sealed` is zeroed.
    pub fn open_chunk_in_place<'a>(&self, index: usize, sealed: &'a mut [u8]) -> Result<&'a mut [u8], SealError> {
        let result = self.checked_chunk(index, sealed.len(), None).and_then(|chunk| {
            let (body, tag) = sealed.split_at_mut(chunk.len as usize);
            let tag: [u8; CHUNK_TAG_LEN] = (&*tag).try_into().expect("16-byte tag");
            self.decrypt(index, &chunk, tag, body)
        });
        match result {
            Ok(len) => Ok(&mut sealed[..len]),
            Err(e) => {
                sealed.fill(0);
                Err(e)
            }
        }
    }

    /// Decrypts chunk `index` in place when its ciphertext and tag were
    /// already copied apart: `body` (exactly the plaintext length) becomes the
    /// plaintext. Lets a caller copy ciphertext straight into its final home
    /// (secure memory) and decrypt it there. On any failure `body` is zeroed.
    pub fn open_chunk_detached(
        &self,
        index: usize,
        body: &mut [u8],
        tag: [u8; CHUNK_TAG_LEN],
    ) -> Result<(), SealError> {
        let result = self
            .checked_chunk(index, body.len() + CHUNK_TAG_LEN, None)
            .and_then(|chunk| self.decrypt(index, &chunk, tag, body).map(|_| ()));
        if result.is_err() {
            body.fill(0);
        }
        result
    }

    fn open_chunk_inner(&self, index: usize, ciphertext: &[u8], out: &mut [u8]) -> Result<(), SealError> {
        let chunk = self.checked_chunk(index, ciphertext.len(), Some(out.len()))?;
        let (body, tag) = ciphertext.split_at(chunk.len as usize);
        let tag: [u8; CHUNK_TAG_LEN] = tag.try_into().expect("16-byte tag");
        out.copy_from_slice(body);
        self.decrypt(index, &chunk, tag, out).map(|_| ())
    }

    /// Chunk `index`'s table entry, once the sealed and output lengths match it.
    fn checked_chunk(&self, index: usize, sealed_len: usize, out_len: Option<usize>) -> Result<ChunkInfo, SealError> {
        let count = self.header.chunks.len();
        let chunk = *self.header.chunks.get(index).ok_or(SealError::ChunkIndex { index, count })?;
        let length_error = |what, got, expected| SealError::ChunkLength {
            index,
            tensor: self.header.chunk_tensor_name(index).to_owned(),
            what,
            got,
            expected,
        };
        if sealed_len != chunk.sealed_len() {
            return Err(length_error("ciphertext", sealed_len, chunk.sealed_len()));
        }
        match out_len {
            Some(got) if got != chunk.len as usize => Err(length_error("output buffer", got, chunk.len as usize)),
            _ => Ok(chunk),
        }
    }

    /// Opens `body` (the chunk's ciphertext) in place with its tag; returns
    /// the plaintext length.
    fn decrypt(
        &self,
        index: usize,
        chunk: &ChunkInfo,
        tag: [u8; CHUNK_TAG_LEN],
        body: &mut [u8],
    ) -> Result<usize, SealError> {
        let aad = chunk_aad(&self.header.file_id, index as u64, chunk, &self.name_digests[chunk.tensor_index as usize]);
        self.chunk_key
            .open_in_place_separate_tag(
                chunk_nonce(index as u64),
                aead::Aad::from(aad),
                aead::Tag::from(tag),
                body,
                0..,
            )
            .map_err(|_| SealError::ChunkAuth {
                index,
                tensor: self.header.chunk_tensor_name(index).to_owned(),
                tensor_offset: chunk.tensor_offset,
                tensor_end: chunk.tensor_offset + u64::from(chunk.len),
            })?;
        Ok(body.len())
    }
}

/// Compares without an early exit, so timing says nothing about where the
/// values differ.
fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    a.len() == b.len() && std::hint::black_box(diff) == 0
}
