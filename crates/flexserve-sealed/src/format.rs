//! The sealed file layout (see docs/sealed-format.md) and its key schedule.

use std::io::Read;
use std::ops::Range;

use flexserve_gguf::GgufHeader;
use ring::{aead, digest, hkdf, hmac};
use zeroize::Zeroizing;

use crate::signature::{SignatureFailure, VendorSignature, SIGNATURE_SECTION_LEN};
use crate::{ModelKey, SealError, VendorPublicKey};

/// First eight bytes of every sealed file.
pub const MAGIC: [u8; 8] = *b"FSMODEL1";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed preamble.
pub const PREAMBLE_LEN: usize = 96;
/// Size of one chunk table entry.
pub const CHUNK_ENTRY_LEN: usize = 24;
/// Size of the header tag (HMAC-SHA256).
pub const HEADER_TAG_LEN: usize = 32;
/// Size of the GCM tag after each chunk's ciphertext.
pub const CHUNK_TAG_LEN: usize = 16;
/// Size of the key check value in the preamble.
pub const KEY_CHECK_LEN: usize = 16;
/// Smallest and largest chunk sizes accepted.
pub const MIN_CHUNK_SIZE: usize = 4 << 10;
pub const MAX_CHUNK_SIZE: usize = 64 << 20;
/// Default chunk size: see docs/sealed-format.md for the trade-off.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// Upper bound on the authenticated prefix (preamble through header tag), so
/// that a reader never buffers an unbounded header.
pub const MAX_PREFIX_LEN: u64 = 1 << 30;

/// Flag bit: the file carries the model key wrapped to a device key.
pub const FLAG_DEVICE_WRAPPED: u32 = 1;
/// Flag bit: a vendor signature section follows the header tag.
pub const FLAG_VENDOR_SIGNED: u32 = 2;
/// Size of the key-wrap section when [`FLAG_DEVICE_WRAPPED`] is set: device
/// public key, ephemeral public key, wrapped model key, GCM tag.
pub const KEY_WRAP_LEN: usize = 32 + 32 + 32 + 16;

/// Domain label of the key schedule; every derived key's info starts with it.
pub(crate) const KDF_LABEL: &[u8] = b"flexserve sealed model v1";

/// One chunk: a run of at most `chunk_size` bytes of one tensor's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Index of the tensor in the GGUF tensor directory.
    pub tensor_index: u32,
    /// Offset of the chunk's first byte within the tensor's data.
    pub tensor_offset: u64,
    /// Plaintext length; the ciphertext on file is `len + 16` bytes.
    pub len: u32,
    /// Absolute file offset of the ciphertext.
    pub file_offset: u64,
}

impl ChunkInfo {
    /// Length of the chunk on file (ciphertext and tag).
    pub fn sealed_len(&self) -> usize {
        self.len as usize + CHUNK_TAG_LEN
    }

    /// Absolute file byte range of the ciphertext and tag.
    pub fn file_range(&self) -> Range<u64> {
        self.file_offset..self.file_offset + self.sealed_len() as u64
    }
}

/// The public part of a sealed file, parsed and checked for consistency but
/// not authenticated: the normal world uses it to schedule reads, `inspect`
/// to describe the file. Only [`crate::SealedModel::open`] authenticates it.
#[derive(Debug, Clone)]
pub struct SealedHeader {
    /// The original GGUF header (metadata and tensor directory).
    pub gguf: GgufHeader,
    pub chunks: Vec<ChunkInfo>,
    pub chunk_size: u32,
    /// Random per-file identifier; also the HKDF salt.
    pub file_id: [u8; 32],
    pub(crate) key_check: [u8; KEY_CHECK_LEN],
    /// The key-wrap section, when the model key is wrapped to a device key.
    pub(crate) key_wrap: Option<[u8; KEY_WRAP_LEN]>,
    /// Length of the original GGUF data section (file length minus header).
    pub data_len: u64,
    /// File offset of the GGUF header bytes inside the sealed file.
    pub gguf_header_offset: u64,
    /// Length of the GGUF header bytes (equal to the GGUF's `data_offset`).
    pub gguf_header_len: u64,
    /// File offset of the header tag; everything before it is authenticated
    /// (and, in a signed file, signed).
    pub tag_offset: u64,
    /// The vendor signature section, when the file is signed.
    pub(crate) signature: Option<VendorSignature>,
    /// Length of the header region, tag and signature section: where the
    /// first chunk starts.
    pub chunks_offset: u64,
    /// Total sealed file length.
    pub file_len: u64,
    /// First chunk of each tensor (and one past the last), so that
    /// `chunk_starts[t]..chunk_starts[t + 1]` are tensor `t`'s chunks.
    chunk_starts: Vec<usize>,
}

/// Little-endian field reader over a slice that reports where input ran out.
struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SealError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or(SealError::Truncated {
            what,
            start: self.pos as u64,
            end: self.pos as u64 + n as u64,
            available: self.bytes.len() as u64,
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, SealError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, SealError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], SealError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }
}

/// The fixed preamble's fields.
pub(crate) struct Preamble {
    pub flags: u32,
    pub key_wrap_len: u32,
    pub file_id: [u8; 32],
    pub key_check: [u8; KEY_CHECK_LEN],
    pub chunk_size: u32,
    pub gguf_header_len: u64,
    pub data_len: u64,
    pub chunk_count: u64,
}

impl Preamble {
    pub(crate) fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut out = [0u8; PREAMBLE_LEN];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.flags.to_le_bytes());
        out[16..48].copy_from_slice(&self.file_id);
        out[48..64].copy_from_slice(&self.key_check);
        out[64..68].copy_from_slice(&self.chunk_size.to_le_bytes());
        out[68..72].copy_from_slice(&self.key_wrap_len.to_le_bytes());
        out[72..80].copy_from_slice(&self.gguf_header_len.to_le_bytes());
        out[80..88].copy_from_slice(&self.data_len.to_le_bytes());
        out[88..96].copy_from_slice(&self.chunk_count.to_le_bytes());
        out
    }

    fn decode(f: &mut Fields<'_>) -> Result<Preamble, SealError> {
        let magic: [u8; 8] = f.array("magic")?;
        if magic != MAGIC {
            return Err(SealError::NotSealed { found: magic });
        }
        let version = f.u32("format version")?;
        if version != FORMAT_VERSION {
            return Err(SealError::UnsupportedVersion(version));
        }
        let flags = f.u32("flags")?;
        if flags & !(FLAG_DEVICE_WRAPPED | FLAG_VENDOR_SIGNED) != 0 {
            return Err(SealError::Malformed { field: "flags", reason: format!("unknown flags {flags:#x}") });
        }
        let file_id = f.array("file id")?;
        let key_check = f.array("key check value")?;
        let chunk_size = f.u32("chunk size")?;
        let key_wrap_len = f.u32("key-wrap section length")?;
        let p = Preamble {
            flags,
            key_wrap_len,
            file_id,
            key_check,
            chunk_size,
            gguf_header_len: f.u64("GGUF header length")?,
            data_len: f.u64("data section length")?,
            chunk_count: f.u64("chunk count")?,
        };
        Ok(p)
    }

    /// Length of the signature section after the header tag.
    fn signature_len(&self) -> u64 {
        if self.flags & FLAG_VENDOR_SIGNED != 0 {
            SIGNATURE_SECTION_LEN as u64
        } else {
            0
        }
    }

    /// Length of the authenticated prefix this preamble describes (up to the
    /// header tag), or an error if it is absurd.
    fn prefix_len(&self) -> Result<u64, SealError> {
        let bad = |field, reason: String| SealError::Malformed { field, reason };
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&(self.chunk_size as usize)) {
            return Err(bad(
                "chunk size",
                format!("{} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}", self.chunk_size),
            ));
        }
        let expected_wrap_len = if self.flags & FLAG_DEVICE_WRAPPED != 0 { KEY_WRAP_LEN as u32 } else { 0 };
        if self.key_wrap_len != expected_wrap_len {
            return Err(bad(
                "key-wrap section length",
                format!("{}, must be {expected_wrap_len} with flags {:#x}", self.key_wrap_len, self.flags),
            ));
        }
        let len = (PREAMBLE_LEN as u64 + u64::from(self.key_wrap_len))
            .checked_add(self.gguf_header_len)
            .and_then(|n| n.checked_add(self.chunk_count.checked_mul(CHUNK_ENTRY_LEN as u64)?))
            .filter(|&n| n <= MAX_PREFIX_LEN);
        len.ok_or_else(|| {
            bad(
                "GGUF header length / chunk count",
                format!(
                    "header of {} bytes with {} chunk table entries exceeds the {MAX_PREFIX_LEN}-byte limit",
                    self.gguf_header_len, self.chunk_count
                ),
            )
        })
    }
}

impl SealedHeader {
    /// Parses the header from the start of a sealed file (`bytes` may hold the
    /// whole file or just its first [`SealedHeader::chunks_offset`] bytes).
    /// Checks that every field is consistent, the embedded GGUF header parses,
    /// and the chunk table is exactly the canonical chunking of its tensors.
    pub fn read(bytes: &[u8]) -> Result<SealedHeader, SealError> {
        let mut f = Fields { bytes, pos: 0 };
        let p = Preamble::decode(&mut f)?;
        let tag_offset = p.prefix_len()?;
        let key_wrap = match p.key_wrap_len {
            0 => None,
            _ => Some(f.array::<KEY_WRAP_LEN>("key-wrap section")?),
        };
        let gguf_header_offset = f.pos as u64;
        let gguf_bytes = f.take(p.gguf_header_len as usize, "GGUF header")?;
        let gguf = GgufHeader::read(gguf_bytes).map_err(SealError::Directory)?;
        if gguf.data_offset != p.gguf_header_len {
            return Err(SealError::Malformed {
                field: "GGUF header length",
                reason: format!(
                    "{} bytes, but the GGUF header says its data starts at byte {}",
                    p.gguf_header_len, gguf.data_offset
                ),
            });
        }
        gguf.check_data_len(p.data_len).map_err(SealError::Directory)?;
        check_data_len_slack(&gguf, p.data_len)?;

        let table = f.take(p.chunk_count as usize * CHUNK_ENTRY_LEN, "chunk table")?;
        f.take(HEADER_TAG_LEN, "header tag")?;
        let signature = match p.signature_len() {
            0 => None,
            _ => Some(VendorSignature::parse(&f.array::<SIGNATURE_SECTION_LEN>("vendor signature section")?)),
        };
        let chunks_offset = tag_offset + HEADER_TAG_LEN as u64 + p.signature_len();
        debug_assert_eq!(f.pos as u64, chunks_offset);

        // Compare against the canonical chunking before allocating anything
        // sized by the tensor directory.
        let expected_count = canonical_chunk_count(&gguf, p.chunk_size)?;
        if expected_count != p.chunk_count {
            return Err(SealError::Malformed {
                field: "chunk count",
                reason: format!(
                    "{} chunks, but the tensors split into {expected_count} chunks of {} bytes",
                    p.chunk_count, p.chunk_size
                ),
            });
        }
        let mut chunks = Vec::with_capacity(p.chunk_count as usize);
        let mut chunk_starts = Vec::with_capacity(gguf.tensors.len() + 1);
        let mut start = 0usize;
        for t in &gguf.tensors {
            chunk_starts.push(start);
            start += t.byte_size().div_ceil(u64::from(p.chunk_size)) as usize;
        }
        chunk_starts.push(start);
        let mut entries = table.chunks_exact(CHUNK_ENTRY_LEN);
        let mut file_offset = chunks_offset;
        for_each_canonical_chunk(&gguf, p.chunk_size, |tensor_index, tensor_offset, len| {
            let index = chunks.len();
            let raw = entries.next().expect("table holds chunk_count entries");
            let entry = ChunkInfo {
                tensor_index: u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes")),
                len: u32::from_le_bytes(raw[4..8].try_into().expect("4 bytes")),
                tensor_offset: u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes")),
                file_offset: u64::from_le_bytes(raw[16..24].try_into().expect("8 bytes")),
            };
            let expected = ChunkInfo { tensor_index, tensor_offset, len, file_offset };
            if entry != expected {
                return Err(SealError::ChunkTable {
                    index,
                    reason: format!("entry is {entry:?}, expected {expected:?}"),
                });
            }
            file_offset += entry.sealed_len() as u64;
            chunks.push(entry);
            Ok(())
        })?;
        Ok(SealedHeader {
            gguf,
            chunks,
            chunk_size: p.chunk_size,
            file_id: p.file_id,
            key_check: p.key_check,
            key_wrap,
            data_len: p.data_len,
            gguf_header_offset,
            gguf_header_len: p.gguf_header_len,
            tag_offset,
            signature,
            chunks_offset,
            file_len: file_offset,
            chunk_starts,
        })
    }

    /// Reads exactly the header region (preamble through header tag) from the
    /// start of a sealed file, for [`SealedHeader::read`] or
    /// [`crate::SealedModel::open`]. Lengths are bounded before reading and
    /// buffers grow only with bytes actually read.
    pub fn read_prefix(mut r: impl Read) -> Result<Vec<u8>, SealError> {
        let mut preamble = [0u8; PREAMBLE_LEN];
        let got = read_up_to(&mut r, &mut preamble)?;
        let mut f = Fields { bytes: &preamble[..got], pos: 0 };
        let p = Preamble::decode(&mut f)?;
        let total = p.prefix_len()? + HEADER_TAG_LEN as u64 + p.signature_len();
        let mut bytes = preamble.to_vec();
        r.take(total - PREAMBLE_LEN as u64).read_to_end(&mut bytes).map_err(|source| SealError::Io {
            path: "<sealed header reader>".into(),
            what: "cannot read the sealed header",
            source,
        })?;
        if (bytes.len() as u64) < total {
            return Err(SealError::Truncated {
                what: "sealed header",
                start: 0,
                end: total,
                available: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    /// Indices of the chunks holding tensor `tensor_index`'s data, in order
    /// (empty for an unknown index or an empty tensor).
    pub fn chunks_of_tensor(&self, tensor_index: usize) -> Range<usize> {
        match (self.chunk_starts.get(tensor_index), self.chunk_starts.get(tensor_index + 1)) {
            (Some(&start), Some(&end)) => start..end,
            _ => 0..0,
        }
    }

    /// The device public key the model key is wrapped to, if any.
    pub fn wrapped_to_device(&self) -> Option<crate::DevicePublicKey> {
        self.key_wrap.map(|w| crate::DevicePublicKey::from_bytes(w[..32].try_into().expect("32 bytes")))
    }

    /// Whether the file carries a vendor signature.
    pub fn is_signed(&self) -> bool {
        self.signature.is_some()
    }

    /// The vendor public key the file claims to be signed by. Not trusted
    /// until [`SealedHeader::verify_signature`] (or an open, which runs it)
    /// has passed.
    pub fn signed_by(&self) -> Option<VendorPublicKey> {
        self.signature.map(|s| s.signer)
    }

    /// Checks the vendor signature over `header_bytes[..tag_offset]` (the
    /// bytes this header was read from). With `required`, the file must be
    /// signed by exactly that key; without, a signed file's signature must
    /// verify under the key it names and an unsigned file passes. Needs no
    /// model key, so the normal world can run it too.
    pub fn verify_signature(&self, header_bytes: &[u8], required: Option<&VendorPublicKey>) -> Result<(), SealError> {
        let fail = |failure| Err(SealError::Signature { failure });
        let Some(sig) = self.signature else {
            return match required {
                Some(r) => fail(SignatureFailure::Missing { required: r.to_hex() }),
                None => Ok(()),
            };
        };
        if let Some(r) = required {
            if *r != sig.signer {
                return fail(SignatureFailure::OtherVendor { required: r.to_hex(), found: sig.signer.to_hex() });
            }
        }
        let signed = header_bytes.get(..self.tag_offset as usize).ok_or(SealError::Truncated {
            what: "signed header region",
            start: 0,
            end: self.tag_offset,
            available: header_bytes.len() as u64,
        })?;
        if !sig.signer.verify(signed, &sig.signature) {
            return fail(SignatureFailure::Invalid { signer: sig.signer.to_hex() });
        }
        Ok(())
    }

    /// Name of the tensor chunk `index` belongs to ("?" if out of range).
    pub fn chunk_tensor_name(&self, index: usize) -> &str {
        self.chunks
            .get(index)
            .and_then(|c| self.gguf.tensors.get(c.tensor_index as usize))
            .map_or("?", |t| t.name.as_str())
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, SealError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(SealError::Io {
                    path: "<sealed header reader>".into(),
                    what: "cannot read the sealed preamble",
                    source,
                })
            }
        }
    }
    Ok(got)
}

/// The data section may hold, besides tensor data, only alignment padding:
/// at most one alignment unit per tensor plus one at the end. This bounds the
/// memory `unseal` allocates for a file whose chunks hold far less.
pub(crate) fn check_data_len_slack(gguf: &GgufHeader, data_len: u64) -> Result<(), SealError> {
    let tensor_bytes = gguf.tensors.iter().map(|t| t.byte_size()).fold(0u64, u64::saturating_add);
    let slack = (gguf.tensors.len() as u64 + 1).saturating_mul(gguf.alignment);
    if data_len.saturating_sub(tensor_bytes) > slack {
        return Err(SealError::Malformed {
            field: "data section length",
            reason: format!(
                "{data_len} bytes for {tensor_bytes} bytes of tensor data: more padding than alignment allows"
            ),
        });
    }
    Ok(())
}

/// Number of chunks the tensors split into, computed without iterating chunks.
pub(crate) fn canonical_chunk_count(gguf: &GgufHeader, chunk_size: u32) -> Result<u64, SealError> {
    let mut count = 0u64;
    for t in &gguf.tensors {
        count = count.saturating_add(t.byte_size().div_ceil(u64::from(chunk_size)));
    }
    if count > u64::from(u32::MAX) {
        return Err(SealError::Malformed {
            field: "chunk size",
            reason: format!("{chunk_size}-byte chunks split the tensors into {count} chunks, too many"),
        });
    }
    Ok(count)
}

/// Calls `f(tensor_index, offset_in_tensor, len)` for
/// each chunk in file order: tensors in directory order, each cut into
/// `chunk_size` pieces (the last one shorter).
pub(crate) fn for_each_canonical_chunk(
    gguf: &GgufHeader,
    chunk_size: u32,
    mut f: impl FnMut(u32, u64, u32) -> Result<(), SealError>,
) -> Result<(), SealError> {
    for (index, t) in gguf.tensors.iter().enumerate() {
        let size = t.byte_size();
        let mut offset = 0u64;
        while offset < size {
            let len = (size - offset).min(u64::from(chunk_size)) as u32;
            f(index as u32, offset, len)?;
            offset += u64::from(len);
        }
    }
    Ok(())
}

/// Per-file keys derived from the model key.
pub(crate) struct FileKeys {
    pub chunk_key: aead::LessSafeKey,
    pub header_key: hmac::Key,
    pub key_check: Zeroizing<[u8; KEY_CHECK_LEN]>,
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl FileKeys {
    /// HKDF-SHA256: extract with the file id as salt, then expand once per
    /// purpose with info = label || file id || purpose.
    pub(crate) fn derive(key: &ModelKey, file_id: &[u8; 32]) -> Result<FileKeys, SealError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, file_id).extract(key.bytes());
        let expand = |purpose: &[u8], out: &mut [u8]| {
            prk.expand(&[KDF_LABEL, file_id, purpose], Len(out.len()))
                .and_then(|okm| okm.fill(out))
                .map_err(|_| SealError::Crypto("HKDF expansion failed"))
        };
        let mut chunk_key = Zeroizing::new([0u8; 32]);
        let mut header_key = Zeroizing::new([0u8; 32]);
        let mut key_check = Zeroizing::new([0u8; KEY_CHECK_LEN]);
        expand(b"chunk encryption", &mut chunk_key[..])?;
        expand(b"header authentication", &mut header_key[..])?;
        expand(b"key check", &mut key_check[..])?;
        let chunk_key = aead::UnboundKey::new(&aead::AES_256_GCM, &chunk_key[..])
            .map_err(|_| SealError::Crypto("AES-256-GCM key setup failed"))?;
        Ok(FileKeys {
            chunk_key: aead::LessSafeKey::new(chunk_key),
            header_key: hmac::Key::new(hmac::HMAC_SHA256, &header_key[..]),
            key_check,
        })
    }
}

/// Length of a chunk's associated data.
pub(crate) const AAD_LEN: usize = 32 + 8 + 4 + 32 + 8 + 4;

/// SHA-256 of a tensor name, bound into each of its chunks' associated data.
pub(crate) fn name_digest(name: &str) -> [u8; 32] {
    digest::digest(&digest::SHA256, name.as_bytes()).as_ref().try_into().expect("32-byte digest")
}

/// Associated data of chunk `index`: file id, chunk index, tensor index,
/// tensor name digest, offset within the tensor, plaintext length.
pub(crate) fn chunk_aad(file_id: &[u8; 32], index: u64, c: &ChunkInfo, name_digest: &[u8; 32]) -> [u8; AAD_LEN] {
    let mut aad = [0u8; AAD_LEN];
    aad[0..32].copy_from_slice(file_id);
    aad[32..40].copy_from_slice(&index.to_le_bytes());
    aad[40..44].copy_from_slice(&c.tensor_index.to_le_bytes());
    aad[44..76].copy_from_slice(name_digest);
    aad[76..84].copy_from_slice(&c.tensor_offset.to_le_bytes());
    aad[84..88].copy_from_slice(&c.len.to_le_bytes());
    aad
}

/// Nonce of chunk `index`: the index as 8 big-endian bytes, then 4 zero bytes.
/// Unique per chunk; keys are unique per file.
pub(crate) fn chunk_nonce(index: u64) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[..8].copy_from_slice(&index.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}
