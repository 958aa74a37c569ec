//! `flexserve bench ttft` on the real model: every design answers the same
//! tokens under every scenario, the JSON has the documented shape, the
//! breakdown says what each design did (no timing is asserted), and the
//! timelines are written.

use std::path::{Path, PathBuf};
use std::process::Command;

fn model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

fn flexserve(args: &[&str], home: &Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_flexserve"))
        .args(args)
        .env("FLEXSERVE_HOME", home)
        .env("FLEXSERVE_DEV", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "flexserve {args:?} failed: {stderr}");
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn every_design_and_scenario_answers_with_a_breakdown_and_a_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (key, sealed, timelines) = (home.join("m.key"), home.join("m.fsm"), home.join("timelines"));
    let (k, s, t) = (key.to_str().unwrap(), sealed.to_str().unwrap(), timelines.to_str().unwrap());
    let plain = model();
    flexserve(&["keygen", "-o", k], home);
    flexserve(&["seal", "--model", plain.to_str().unwrap(), "--key", k, "-o", s], home);
    for scenario in ["cold", "model-cold", "warm"] {
        let out = flexserve(
            &[
                "bench",
                "ttft",
                "--model",
                s,
                "--plain",
                plain.to_str().unwrap(),
                "--key",
                k,
                "--scenario",
                scenario,
                "--prompt-tokens",
                "32",
                "--gen-tokens",
                "4",
                "--repetitions",
                "1",
                "--threads",
                "2",
                "--json",
                "--timeline",
                t,
            ],
            home,
        );
        let last = out.lines().last().unwrap();
        let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
        assert_eq!(v["scenario"], scenario);
        assert_eq!(v["prompt_tokens"], 32);
        assert!(v["model"].as_str().unwrap().ends_with("m.fsm"), "{v}");
        let designs = v["designs"].as_array().unwrap();
        let names: Vec<&str> = designs.iter().map(|d| d["design"].as_str().unwrap()).collect();
        assert_eq!(names, ["plain", "strawman", "opt-strawman", "flexserve"]);
        let stage = |design: &str, key: &str| -> f64 {
            let d = designs.iter().find(|d| d["design"] == design).unwrap();
            d["breakdown_ms"][key].as_f64().unwrap_or_else(|| panic!("{design} {key}: {d}"))
        };
        for d in designs {
            let ttft = d["ttft_ms"].as_array().unwrap();
            assert_eq!(ttft.len(), 1, "{d}");
            assert!(ttft[0].as_f64().unwrap() > 0.0, "{d}");
            assert!(d["decode_tokens_per_s"][0].as_f64().unwrap() > 0.0, "{d}");
            let name = d["design"].as_str().unwrap();
            assert!(stage(name, "compute") > 0.0, "{d}");
            let svg = std::fs::read_to_string(timelines.join(format!("ttft-{scenario}-{name}.svg"))).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("compute") && svg.contains("first token"), "{svg}");
        }
        match scenario {
            // Nothing is loaded at request time once the model is resident.
            "warm" => {
                for design in ["strawman", "opt-strawman", "flexserve"] {
                    assert_eq!(stage(design, "read"), 0.0, "{design}");
                    assert_eq!(stage(design, "decrypt"), 0.0, "{design}");
                    assert_eq!(stage(design, "protect"), 0.0, "{design}");
                }
            }
            // The carve-out is made at request time; FlexServe's reserve was
            // prepared while the secure world was idle (model-cold), or is
            // granted as the request asks (cold).
            _ => {
                for design in ["strawman", "opt-strawman", "flexserve"] {
                    assert!(stage(design, "read") > 0.0, "{design}");
                    assert!(stage(design, "decrypt") > 0.0, "{design}");
                }
                assert!(stage("strawman", "protect") > 0.0);
                assert!(stage("opt-strawman", "protect") > 0.0);
                if scenario == "model-cold" {
                    assert_eq!(stage("flexserve", "protect"), 0.0);
                } else {
                    assert!(stage("flexserve", "protect") > 0.0);
                    assert!(stage("flexserve", "start") > 0.0);
                }
            }
        }
    }
}
