//! `flexserve bench serve` against a real `flexserve serve` with the real model.

mod common;

use common::{flexserve, model, Daemon};

/// A running `flexserve serve` with the real model as `smol`.
fn start_server() -> Daemon {
    Daemon::spawn(tempfile::tempdir().unwrap(), |c| c.arg("--model").arg(format!("smol={}", model().display())))
}

#[test]
fn bench_serve_reports_each_concurrency_level_as_json() {
    let server = start_server();
    let o = flexserve(server.home.path())
        .args(["bench", "serve", "--url", &server.url, "--model", "smol", "--concurrency", "1,4"])
        .args(["--requests", "8", "--max-tokens", "8", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "bench serve failed: {stderr}");
    let stdout = String::from_utf8(o.stdout).unwrap();
    let last = stdout.trim_end().lines().last().unwrap_or_else(|| panic!("no output; stderr: {stderr}"));
    let r: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    assert_eq!(r["model"], "smol", "{r}");
    assert_eq!(r["url"], server.url.as_str(), "{r}");
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{r}");
    for (run, c) in runs.iter().zip([1, 4]) {
        assert_eq!(run["concurrency"], c, "{run}");
        assert_eq!(run["requests"], 8, "{run}");
        assert_eq!(run["errors"], 0, "{run}; stderr: {stderr}");
        assert!(run["tokens_per_s"].as_f64().unwrap() > 0.0, "{run}");
        let (p50, p90, p99) = (
            run["ttft_ms_p50"].as_f64().unwrap(),
            run["ttft_ms_p90"].as_f64().unwrap(),
            run["ttft_ms_p99"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p90 && p90 <= p99, "{run}");
        let (t50, t99) = (run["token_ms_p50"].as_f64().unwrap(), run["token_ms_p99"].as_f64().unwrap());
        assert!(0.0 < t50 && t50 <= t99, "{run}");
    }
    // The default output is a table with one row per level.
    let o = flexserve(server.home.path())
        .args(["bench", "serve", "--url", &server.url, "--model", "smol", "--concurrency", "2"])
        .args(["--requests", "2", "--max-tokens", "4", "--prompt-tokens", "32"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8(o.stdout).unwrap();
    assert!(table.contains("tokens/s") && table.contains("ttft p50 ms"), "{table}");
    // An unknown model is refused by the server, and said so.
    let o = flexserve(server.home.path())
        .args(["bench", "serve", "--url", &server.url, "--model", "nope", "--requests", "1", "--max-tokens", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("404") && stderr.contains(&server.url), "{stderr}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn bench_serve_says_which_url_it_could_not_reach() {
    // A port that nothing listens on: bind one, then close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let home = tempfile::tempdir().unwrap();
    let o = flexserve(home.path())
        .args(["bench", "serve", "--url", &url, "--model", "smol", "--requests", "1", "--timeout", "20"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains(&url) && stderr.to_lowercase().contains("refused"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Not a URL at all.
    let o =
        flexserve(home.path()).args(["bench", "serve", "--url", "localhost:8080", "--model", "smol"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("localhost:8080") && stderr.contains("expected an http:// URL"),
        "{stderr}"
    );
}
