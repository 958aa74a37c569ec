//! Sealing a GGUF file, and unsealing one back (for tests and tools).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use flexserve_gguf::GgufFile;
use ring::aead;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::device::wrap_model_key;
use crate::format::{
    canonical_chunk_count, check_data_len_slack, chunk_aad, chunk_nonce, for_each_canonical_chunk, name_digest,
    FileKeys, Preamble, SealedHeader, CHUNK_ENTRY_LEN, CHUNK_TAG_LEN, DEFAULT_CHUNK_SIZE, HEADER_TAG_LEN,
    MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, PREAMBLE_LEN,
};
use crate::format::{FLAG_DEVICE_WRAPPED, FLAG_VENDOR_SIGNED};
use crate::key::TempPath;
use crate::signature::SIGNATURE_SECTION_LEN;
use crate::{ChunkInfo, DevicePublicKey, ModelKey, SealError, SealedModel, VendorSigningKey};

/// How to seal.
#[derive(Debug, Clone)]
pub struct SealOptions {
    /// Largest plaintext chunk in bytes, within 4 KiB..=64 MiB (default 1 MiB).
    pub chunk_size: usize,
    /// Also wrap the model key to this device key, so that the device can
    /// open the file with its secret key alone.
    pub to_device: Option<DevicePublicKey>,
}

impl Default for SealOptions {
    fn default() -> Self {
        SealOptions { chunk_size: DEFAULT_CHUNK_SIZE, to_device: None }
    }
}

/// What [`seal_file`] wrote.
#[derive(Debug, Clone)]
pub struct SealReport {
    pub output: PathBuf,
    pub file_id: [u8; 32],
    pub tensors: usize,
    pub chunks: usize,
    pub chunk_size: usize,
    /// Bytes of tensor data encrypted.
    pub plaintext_bytes: u64,
    /// Length of the sealed file.
    pub sealed_bytes: u64,
}

/// Seals the GGUF file `input` into `output` with `key`. Writes a temporary
/// file in the output's directory and renames it over `output` only when
/// everything was written and synced. `progress(done, total)` reports
/// encrypted tensor bytes as chunks are written.
pub fn seal_file(
    input: &Path,
    output: &Path,
    key: &ModelKey,
    opts: &SealOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SealReport, SealError> {
    seal_file_signed(input, output, key, opts, None, progress)
}

/// [`seal_file`], and with `sign_with` the header region (preamble,
/// key-wrap section, GGUF header, chunk table) is signed with that vendor
/// key; the signature section follows the header tag.
pub fn seal_file_signed(
    input: &Path,
    output: &Path,
    key: &ModelKey,
    opts: &SealOptions,
    sign_with: Option<&VendorSigningKey>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SealReport, SealError> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&opts.chunk_size) {
        return Err(SealError::Options(format!(
            "chunk size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes",
            opts.chunk_size
        )));
    }
    let chunk_size = opts.chunk_size as u32;
    let unsealable = |reason: String| SealError::Unsealable { path: input.to_owned(), reason };
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            return Err(unsealable("the output path is the input file".to_owned()));
        }
    }
    let file = GgufFile::open(input).map_err(|source| SealError::Input { path: input.to_owned(), source })?;
    let gguf = &file.header;
    let bytes = file.bytes();
    let header_len = gguf.data_offset;
    let data = file.data();
    let data_len = data.len() as u64;
    check_data_len_slack(gguf, data_len).map_err(|e| unsealable(e.to_string()))?;
    check_padding_is_zero(gguf, data).map_err(unsealable)?;
    if gguf.tensors.len() > u32::MAX as usize {
        return Err(unsealable("too many tensors".to_owned()));
    }
    let chunk_count = canonical_chunk_count(gguf, chunk_size).map_err(|e| unsealable(e.to_string()))?;

    let mut file_id = [0u8; 32];
    SystemRandom::new().fill(&mut file_id).map_err(|_| SealError::Crypto("operating system random source failed"))?;
    let keys = FileKeys::derive(key, &file_id)?;

    // The authenticated prefix: preamble, GGUF header verbatim, chunk table, tag.
    let key_wrap = opts.to_device.as_ref().map(|d| wrap_model_key(key, d, &file_id)).transpose()?;
    let key_wrap_len = key_wrap.as_ref().map_or(0, |w| w.len());
    let preamble = Preamble {
        flags: if key_wrap.is_some() { FLAG_DEVICE_WRAPPED } else { 0 }
            | if sign_with.is_some() { FLAG_VENDOR_SIGNED } else { 0 },
        key_wrap_len: key_wrap_len as u32,
        file_id,
        key_check: *keys.key_check,
        chunk_size,
        gguf_header_len: header_len,
        data_len,
        chunk_count,
    };
    let table_len = chunk_count as usize * CHUNK_ENTRY_LEN;
    let signature_len = if sign_with.is_some() { SIGNATURE_SECTION_LEN } else { 0 };
    let chunks_offset =
        (PREAMBLE_LEN + key_wrap_len + header_len as usize + table_len + HEADER_TAG_LEN + signature_len) as u64;
    let mut prefix = Vec::with_capacity(chunks_offset as usize);
    prefix.extend_from_slice(&preamble.encode());
    prefix.extend_from_slice(key_wrap.as_ref().map_or(&[][..], |w| &w[..]));
    prefix.extend_from_slice(&bytes[..header_len as usize]);
    let mut chunks = Vec::with_capacity(chunk_count as usize);
    let mut file_offset = chunks_offset;
    for_each_canonical_chunk(gguf, chunk_size, |tensor_index, tensor_offset, len| {
        let chunk = ChunkInfo { tensor_index, tensor_offset, len, file_offset };
        prefix.extend_from_slice(&tensor_index.to_le_bytes());
        prefix.extend_from_slice(&len.to_le_bytes());
        prefix.extend_from_slice(&tensor_offset.to_le_bytes());
        prefix.extend_from_slice(&file_offset.to_le_bytes());
        file_offset += chunk.sealed_len() as u64;
        chunks.push(chunk);
        Ok(())
    })?;
    let tag = hmac::sign(&keys.header_key, &prefix);
    let signature = sign_with.map(|vendor| vendor.sign_section(&prefix));
    prefix.extend_from_slice(tag.as_ref());
    prefix.extend_from_slice(signature.as_ref().map_or(&[][..], |s| &s[..]));
    // Self-check: the reader accepts exactly what was written.
    let parsed = SealedHeader::read(&prefix)
        .and_then(|h| h.verify_signature(&prefix, sign_with.map(|v| v.public_key()).as_ref()).map(|()| h))
        .map_err(|e| unsealable(format!("internal error: the sealed header does not read back: {e}")))?;
    debug_assert_eq!(parsed.file_len, file_offset);

    let tmp = TempPath::create(output, 0o644)?;
    let io = |what| crate::io_error(&tmp.path, what);
    let mut out = tmp.file.as_ref().expect("temporary file is open");
    out.write_all(&prefix).map_err(io("cannot write the sealed header"))?;

    let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
    let mut done = 0u64;
    progress(done, total);
    let mut buf = Zeroizing::new(vec![0u8; opts.chunk_size + CHUNK_TAG_LEN]);
    let mut digests: Vec<[u8; 32]> = Vec::with_capacity(gguf.tensors.len());
    digests.extend(gguf.tensors.iter().map(|t| name_digest(&t.name)));
    for (index, chunk) in chunks.iter().enumerate() {
        let tensor = &gguf.tensors[chunk.tensor_index as usize];
        let start = (tensor.offset + chunk.tensor_offset) as usize;
        let len = chunk.len as usize;
        let (body, tag_space) = buf[..len + CHUNK_TAG_LEN].split_at_mut(len);
        body.copy_from_slice(&data[start..start + len]);
        let aad = chunk_aad(&file_id, index as u64, chunk, &digests[chunk.tensor_index as usize]);
        let tag = keys
            .chunk_key
            .seal_in_place_separate_tag(chunk_nonce(index as u64), aead::Aad::from(aad), body)
            .map_err(|_| SealError::Crypto("AES-256-GCM encryption failed"))?;
        tag_space.copy_from_slice(tag.as_ref());
        out.write_all(&buf[..len + CHUNK_TAG_LEN]).map_err(io("cannot write a chunk"))?;
        done += chunk.len as u64;
        progress(done, total);
    }
    out.sync_all().map_err(io("cannot sync the sealed file"))?;
    tmp.persist(output)?;
    Ok(SealReport {
        output: output.to_owned(),
        file_id,
        tensors: gguf.tensors.len(),
        chunks: chunks.len(),
        chunk_size: opts.chunk_size,
        plaintext_bytes: total,
        sealed_bytes: file_offset,
    })
}

/// Bytes of the data section outside every tensor must be zero: the sealed
/// format carries no unencrypted data bytes and rebuilds padding as zeros.
fn check_padding_is_zero(gguf: &flexserve_gguf::GgufHeader, data: &[u8]) -> Result<(), String> {
    let mut ranges: Vec<(u64, u64)> = gguf.tensors.iter().map(|t| (t.offset, t.offset + t.byte_size())).collect();
    ranges.sort_unstable();
    let mut pos = 0u64;
    let gaps = ranges.iter().map(|&(s, e)| (s, e)).chain(std::iter::once((data.len() as u64, data.len() as u64)));
    for (start, end) in gaps {
        if let Some(i) = data[pos as usize..start as usize].iter().position(|&b| b != 0) {
            return Err(format!(
                "padding byte at data offset {} is {:#04x}, not zero; only zero padding can be sealed",
                pos + i as u64,
                data[pos as usize + i]
            ));
        }
        pos = pos.max(end);
    }
    Ok(())
}

/// Opens a whole sealed file and rebuilds the original GGUF file's bytes.
pub fn unseal_to_gguf_bytes(path: &Path, key: &ModelKey) -> Result<Vec<u8>, SealError> {
    let io = |what| crate::io_error(path, what);
    let file = File::open(path).map_err(io("cannot open"))?;
    let actual = file.metadata().map_err(io("cannot read the file size"))?.len();
    let prefix = SealedHeader::read_prefix(std::io::BufReader::new(&file)).map_err(|e| match e {
        SealError::Io { what, source, .. } => SealError::Io { path: path.to_owned(), what, source },
        other => other,
    })?;
    let model = SealedModel::open(&prefix, key)?;
    let header = model.header();
    if actual != header.file_len {
        return Err(SealError::FileSize { path: path.to_owned(), expected: header.file_len, actual });
    }
    let header_len = header.gguf_header_len as usize;
    let mut gguf = vec![0u8; header_len + header.data_len as usize];
    let start = header.gguf_header_offset as usize;
    gguf[..header_len].copy_from_slice(&prefix[start..start + header_len]);
    let mut sealed = vec![0u8; header.chunk_size as usize + CHUNK_TAG_LEN];
    for (index, chunk) in header.chunks.iter().enumerate() {
        let sealed = &mut sealed[..chunk.sealed_len()];
        file.read_exact_at(sealed, chunk.file_offset).map_err(io("cannot read a chunk"))?;
        let tensor = &header.gguf.tensors[chunk.tensor_index as usize];
        let at = header_len + (tensor.offset + chunk.tensor_offset) as usize;
        if let Err(e) = model.open_chunk(index, sealed, &mut gguf[at..at + chunk.len as usize]) {
            gguf.fill(0);
            return Err(e);
        }
    }
    Ok(gguf)
}
