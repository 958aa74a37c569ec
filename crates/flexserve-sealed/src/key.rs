//! The model key and its on-disk form.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

use crate::SealError;

/// Length of a model key in bytes.
pub const MODEL_KEY_LEN: usize = 32;

/// A vendor's 32-byte model key. Wiped from memory when dropped; its `Debug`
/// form never shows the bytes.
pub struct ModelKey([u8; MODEL_KEY_LEN]);

impl Drop for ModelKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for ModelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ModelKey(<redacted>)")
    }
}

impl ModelKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        let mut key = ModelKey([0; MODEL_KEY_LEN]);
        // The system random source failing is not recoverable for a key generator.
        SystemRandom::new().fill(&mut key.0).expect("operating system random source failed");
        key
    }

    /// Wraps 32 key bytes (copied; the caller should wipe its own copy).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let bytes: [u8; MODEL_KEY_LEN] = bytes
            .try_into()
            .map_err(|_| SealError::InvalidKey(format!("key is {} bytes, expected {MODEL_KEY_LEN}", bytes.len())))?;
        Ok(ModelKey(bytes))
    }

    pub(crate) fn bytes(&self) -> &[u8; MODEL_KEY_LEN] {
        &self.0
    }

    /// Reads a key file: 64 hexadecimal digits, surrounding whitespace allowed.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SealError> {
        let mut key = ModelKey([0; MODEL_KEY_LEN]);
        read_hex_file(path.as_ref(), &mut key.0)?;
        Ok(key)
    }

    /// Writes the key as 64 hex digits and a newline, readable by the owner
    /// only (mode 0600): written to a temporary file in the same directory,
    /// synced, then renamed over `path`, so a crash never leaves half a key.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), SealError> {
        write_hex_file(path.as_ref(), &self.0, 0o600)
    }
}

/// Reads a file of exactly `2 * out.len()` hex digits (surrounding whitespace
/// allowed) into `out`.
pub(crate) fn read_hex_file(path: &Path, out: &mut [u8]) -> Result<(), SealError> {
    let bad = |reason: String| SealError::KeyFile { path: path.to_owned(), reason };
    let text = Zeroizing::new(fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?);
    decode_hex(text.trim_ascii(), out).map_err(bad)
}

/// Decodes exactly `2 * out.len()` hex digits into `out`.
pub fn decode_hex(digits: &[u8], out: &mut [u8]) -> Result<(), String> {
    if digits.len() != 2 * out.len() {
        return Err(format!("expected {} hexadecimal digits, found {} bytes", 2 * out.len(), digits.len()));
    }
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        let (Some(hi), Some(lo)) = (hex_value(pair[0]), hex_value(pair[1])) else {
            return Err(format!("byte {} is not a hexadecimal digit", 2 * i));
        };
        out[i] = (hi << 4) | lo;
    }
    Ok(())
}

/// Lower-case hex digits of `bytes`.
pub fn encode_hex(bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut text = Zeroizing::new(Vec::with_capacity(2 * bytes.len() + 1));
    for b in bytes {
        text.push(HEX[usize::from(b >> 4)]);
        text.push(HEX[usize::from(b & 15)]);
    }
    text
}

/// Writes `bytes` as hex digits and a newline with `mode`, through a synced
/// temporary file renamed over `path`.
pub(crate) fn write_hex_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SealError> {
    let mut text = encode_hex(bytes);
    text.push(b'\n');
    let tmp = TempPath::create(path, mode)?;
    let io = |what| crate::io_error(&tmp.path, what);
    {
        let mut file = tmp.file.as_ref().expect("temporary file is open");
        file.write_all(&text).map_err(io("cannot write key"))?;
        file.sync_all().map_err(io("cannot sync key"))?;
    }
    tmp.persist(path)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A freshly created file next to its final path, removed on drop unless persisted.
pub(crate) struct TempPath {
    pub(crate) path: PathBuf,
    pub(crate) file: Option<fs::File>,
}

impl TempPath {
    pub(crate) fn create(target: &Path, mode: u32) -> Result<TempPath, SealError> {
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let rng = SystemRandom::new();
        let mut last_error = None;
        for _ in 0..16 {
            let mut suffix = [0u8; 8];
            rng.fill(&mut suffix).map_err(|_| SealError::Crypto("operating system random source failed"))?;
            let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
            let path = dir.join(format!(".{name}.{suffix}.tmp"));
            match OpenOptions::new().write(true).create_new(true).mode(mode).open(&path) {
                Ok(file) => return Ok(TempPath { path, file: Some(file) }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
                Err(e) => {
                    return Err(SealError::Io { path, what: "cannot create temporary file", source: e });
                }
            }
        }
        Err(SealError::Io {
            path: dir,
            what: "cannot create a temporary file",
            source: last_error.unwrap_or_else(|| std::io::Error::other("no free name")),
        })
    }

    /// Renames the temporary file to `target`.
    pub(crate) fn persist(mut self, target: &Path) -> Result<(), SealError> {
        self.file = None;
        fs::rename(&self.path, target).map_err(|source| SealError::Io {
            path: target.to_owned(),
            what: "cannot rename the temporary file into place",
            source,
        })?;
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}
