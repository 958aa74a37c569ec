//! The secure world's identity report: signed by an identity key derived from
//! the device key, verifiable with that public key alone (checked here with
//! Python's `cryptography`, outside FlexServe's code), changing with the
//! executable and the policy, pinned by the client on first use.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn flexserve(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flexserve"));
    c.env("FLEXSERVE_HOME", home).env("FLEXSERVE_DEV", "1").env_remove("FLEXSERVE_SECURE_BIN");
    c
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn identity(c: &mut Command) -> serde_json::Value {
    serde_json::from_str(ok(c.args(["identity", "--json"]).output().unwrap()).trim()).unwrap()
}

/// Verifies the report with Python's `cryptography`, and that a changed byte fails.
fn verify_in_python(id: &serde_json::Value) {
    let script = r#"
import json, sys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
d = json.load(sys.stdin)
text = d["report_text"].encode()
key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(json.loads(text)["identity_ed25519"]))
signature = bytes.fromhex(d["signature"])
key.verify(signature, text)
try:
    key.verify(signature, text.replace(b'"counter":', b'"counter":9'))
    print("tampered report accepted")
    sys.exit(1)
except InvalidSignature:
    print("verified")
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(id.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("verified"),
        "python: {}{} (scripts/test.sh installs the `cryptography` package)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_identity_report_verifies_outside_flexserve_and_follows_the_executable_and_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let first = identity(&mut flexserve(home));
    verify_in_python(&first);
    let report = &first["report"];
    assert_eq!(report["format"], "flexserve-identity-report-1");
    assert_eq!(report["deployment"], "development");
    assert!(report["vouched_for_by"].as_str().unwrap().starts_with("nothing"), "{report}");
    assert!(first["pinned"].as_str().unwrap().starts_with("first use"), "{first}");
    let key = report["identity_ed25519"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(home.join("secure-world.pin")).unwrap().trim(), key);

    // The policy changes the report, not the identity.
    std::fs::write(home.join("dev-secure-world/policy.conf"), "allow_perplexity = true\n").unwrap();
    let second = identity(&mut flexserve(home));
    verify_in_python(&second);
    assert_eq!(second["report"]["identity_ed25519"], key.as_str());
    assert_ne!(second["report"]["policy"], report["policy"]);
    assert!(second["pinned"].as_str().unwrap().starts_with("matches"), "{second}");

    // Another executable changes its digest.
    let secure = Path::new(env!("CARGO_BIN_EXE_flexserve")).with_file_name("flexserve-secure");
    let copy = home.join("flexserve-secure-copy");
    let mut bytes = std::fs::read(&secure).unwrap();
    bytes.extend_from_slice(b"a byte more");
    std::fs::write(&copy, bytes).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let third = identity(flexserve(home).env("FLEXSERVE_SECURE_BIN", &copy));
    assert_ne!(third["report"]["executable_sha256"], report["executable_sha256"]);
    assert_eq!(third["report"]["identity_ed25519"], key.as_str());

    // A substituted identity (a new device key) is refused by the client, as is an unexpected one.
    std::fs::remove_file(home.join("dev-secure-world/device.key")).unwrap();
    let o = flexserve(home).arg("identity").output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("identity key changed"), "{e}");
    let o = flexserve(home).args(["identity", "--expect", &"0".repeat(64)]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not the expected"));
}

#[test]
fn the_daemon_serves_the_identity_report_as_signed() {
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut daemon = flexserve(dir.path())
        .args(["serve", "--port", "0", "--model"])
        .arg(format!("p={}", model.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = common::listening_url(&mut daemon);
    let body = ok(Command::new("curl").args(["-sS", &format!("{url}/v1/secure/identity")]).output().unwrap());
    let _ = daemon.kill();
    let _ = daemon.wait();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = v["report"].as_str().unwrap();
    let report: serde_json::Value = serde_json::from_str(text).unwrap();
    let key = report["identity_ed25519"].as_str().unwrap();
    flexserve_sealed::verify_identity_signature(key, text.as_bytes(), v["signature"].as_str().unwrap()).unwrap();
    verify_in_python(&serde_json::json!({"report_text": text, "signature": v["signature"]}));
}
