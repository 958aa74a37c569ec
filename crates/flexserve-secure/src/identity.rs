//! The identity report: who this secure world is, signed by its identity
//! key, so that a client can pin that key and check what it talks to.
//!
//! On Linux nothing in hardware vouches for the report: the launcher (root)
//! and the operating system that started this process under its own uid
//! do, and the report says so. A TrustZone backend would have it signed by
//! a hardware-rooted key.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use flexserve_protocol::{Deployment, IDENTITY_REPORT_FORMAT, PROTOCOL_VERSION};

use crate::state::Principal;

/// A JSON string literal.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quoted(s)).collect();
    format!("[{}]", quoted.join(","))
}

/// The report (JSON) and its Ed25519 signature (hex) over exactly those bytes.
pub fn report(principal: &Principal, protection: &str) -> (String, String) {
    let id = &principal.identity;
    let posture = &principal.posture;
    let counter = id.counter.fetch_add(1, Ordering::Relaxed) + 1;
    let timestamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (deployment, vouched) = match posture.deployment {
        Deployment::Service => (
            "service",
            "the Linux operating system and flexserve-launcher (root), which started this secure world under \
             a uid of its own; no hardware vouches for it on this backend (TrustZone would sign this report \
             with a hardware-rooted key)",
        ),
        Deployment::Development => (
            "development",
            "nothing: a development secure world, started by the normal world's own user, which can read \
             and change everything it holds",
        ),
    };
    let device = principal.keys.device.as_ref().map(|d| d.public_key().to_hex()).unwrap_or_default();
    let report = format!(
        "{{\"format\":{},\"identity_ed25519\":{},\"identity_x25519\":{},\"device_key\":{},\
         \"executable_sha256\":{},\"deployment\":{},\"vouched_for_by\":{},\"uid\":{},\"protection\":{},\
         \"policy\":{},\"warnings\":{},\"protocol_version\":{},\"boot_id\":{},\"counter\":{},\"timestamp\":{}}}",
        quoted(IDENTITY_REPORT_FORMAT),
        quoted(&id.keys.signing_public_hex()),
        quoted(&id.keys.agreement_public_hex()),
        quoted(&device),
        quoted(&id.executable_sha256),
        quoted(deployment),
        quoted(vouched),
        posture.uid,
        quoted(protection),
        list(&principal.policy.describe()),
        list(&posture.warnings),
        PROTOCOL_VERSION,
        quoted(&id.boot_id),
        counter,
        timestamp,
    );
    let signature = id.keys.sign_hex(report.as_bytes());
    (report, signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_json() {
        assert_eq!(quoted("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(list(&["x".to_string(), "y'z".to_string()]), "[\"x\",\"y'z\"]");
    }
}
