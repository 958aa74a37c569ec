//! The secure world's identity report: its signature checked with the key it
//! names, and that key held against the one the user expects or pinned the
//! first time (trust on first use).

use std::io::Write;
use std::path::Path;

use crate::{ClientError, Result};

/// What checking a report established.
#[derive(Debug, Clone)]
pub struct CheckedIdentity {
    /// The identity key (Ed25519, hex).
    pub key: String,
    /// The key sessions are agreed with (X25519), from the verified report.
    pub x25519: [u8; 32],
    /// How the key was trusted ("as expected", "first use: pinned in ...").
    pub pin_note: String,
    /// The report, parsed.
    pub report: serde_json::Value,
}

fn refuse(message: String) -> ClientError {
    ClientError::Identity(message)
}

/// Verifies `report`'s signature with the Ed25519 key it names, then holds
/// that key against `expect` if given, else against the key pinned in
/// `pin_path` (pinning it there, mode 0600, the first time).
pub fn check_identity(report: &str, signature: &str, expect: Option<&str>, pin_path: &Path) -> Result<CheckedIdentity> {
    let r: serde_json::Value =
        serde_json::from_str(report).map_err(|e| refuse(format!("the identity report is not JSON: {e}")))?;
    if r["format"] != flexserve_protocol::IDENTITY_REPORT_FORMAT {
        return Err(refuse(format!(
            "the identity report's format is {}, expected {}",
            r["format"],
            flexserve_protocol::IDENTITY_REPORT_FORMAT
        )));
    }
    let key = r["identity_ed25519"]
        .as_str()
        .ok_or_else(|| refuse("the identity report names no identity key".to_string()))?
        .to_string();
    flexserve_sealed::verify_identity_signature(&key, report.as_bytes(), signature)
        .map_err(|e| refuse(format!("the identity report does not verify: {e}")))?;
    let mut x25519 = [0u8; 32];
    let agreement = r["identity_x25519"].as_str().unwrap_or_default();
    flexserve_sealed::decode_hex(agreement.as_bytes(), &mut x25519)
        .map_err(|e| refuse(format!("the identity report's identity_x25519 is not 64 hex digits: {e}")))?;
    let pin_note = match expect {
        Some(e) if e.trim() != key => {
            return Err(refuse(format!("the secure world's identity key is {key}, not the expected {}", e.trim())))
        }
        Some(_) => "as expected".to_string(),
        None => match std::fs::read_to_string(pin_path) {
            Ok(pinned) if pinned.trim() == key => format!("matches the key pinned in {}", pin_path.display()),
            Ok(pinned) => {
                return Err(refuse(format!(
                    "the secure world's identity key changed: {} is pinned in {}, this one is {key}; refusing it \
                     (remove the pin file only if its device key was replaced on purpose)",
                    pinned.trim(),
                    pin_path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                pin(pin_path, &key)?;
                format!("first use: pinned in {}", pin_path.display())
            }
            Err(e) => return Err(refuse(format!("reading {}: {e}", pin_path.display()))),
        },
    };
    Ok(CheckedIdentity { key, x25519, pin_note, report: r })
}

/// Writes the pin (mode 0600) under a temporary name, then renames it.
fn pin(path: &Path, key: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| refuse(format!("creating {}: {e}", dir.display())))?;
    }
    write_private(path, format!("{key}\n").as_bytes()).map_err(|e| refuse(format!("writing {}: {e}", path.display())))
}

/// Writes `bytes` to `path` readable by its owner alone (mode 0600): under a
/// temporary name first, synced, then renamed, so that no half-written file
/// is ever left under `path`.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes).and_then(|_| f.sync_all())?;
    std::fs::rename(&tmp, path)
}
