//! The bench command works end to end (its numbers are recorded in docs/BENCHMARKS.md,
//! never asserted here): populate, then each scenario for a second, `--json` last.

mod common;

use std::process::Command;

fn bench(address: &str, args: &[&str]) -> String {
    let output = Command::new(common::binary())
        .args(["bench", "--server", &format!("http://{address}")])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn bench_populates_and_reports_every_scenario_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::ChildServer::start(dir.path());
    let populated = bench(
        &server.address,
        &["--scenario", "batch", "--populate", "300", "--batch", "100"],
    );
    assert!(
        populated.starts_with("populated 300 communications"),
        "{populated}"
    );
    let facts = bench(
        &server.address,
        &["--scenario", "check", "--populate", "1200"],
    );
    assert!(facts.starts_with("populated 1200 facts"), "{facts}");
    for scenario in ["noop", "append", "batch", "proof", "check"] {
        let output = bench(
            &server.address,
            &[
                "--scenario",
                scenario,
                "--duration",
                "1",
                "--concurrency",
                "4",
                "--batch",
                "10",
                "--json",
            ],
        );
        let json = output.lines().last().unwrap();
        assert!(
            json.starts_with(&format!("{{\"scenario\":\"{scenario}\",\"ops_per_sec\":")),
            "{json}"
        );
        for key in ["entries_per_sec", "p50_ms", "p99_ms", "p999_ms"] {
            assert!(json.contains(&format!("\"{key}\":")), "{json}");
        }
    }
    // A scenario measured against noop in alternating rounds: one ratio per round, and
    // the JSON line the median round's, with its noop ceiling.
    let output = bench(
        &server.address,
        &[
            "--scenario",
            "append",
            "--versus-noop",
            "3",
            "--duration",
            "1",
            "--concurrency",
            "4",
            "--json",
        ],
    );
    assert_eq!(
        output
            .lines()
            .filter(|line| line.starts_with("round "))
            .count(),
        3,
        "{output}"
    );
    let json: serde_json::Value = serde_json::from_str(output.lines().last().unwrap()).unwrap();
    assert_eq!(json["scenario"], "append");
    let (ops, noop) = (
        json["ops_per_sec"].as_f64().unwrap(),
        json["noop_ops_per_sec"].as_f64().unwrap(),
    );
    assert!(ops > 0.0 && noop > 0.0, "{json}");
    let ratio = json["ratio_to_noop"].as_f64().unwrap();
    assert!((ratio - ops / noop).abs() < 1e-3, "{json}");
    let ratios = json["ratios"].as_array().unwrap();
    assert_eq!(ratios.len(), 3);
    assert!(
        ratios
            .iter()
            .any(|r| (r.as_f64().unwrap() - ratio).abs() < 1e-4)
    );
    assert!(server.terminate().success());
    let output = Command::new(common::binary())
        .args(["bench", "--scenario", "verify", "--json", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout
            .lines()
            .last()
            .unwrap()
            .starts_with("{\"scenario\":\"verify\""),
        "{stdout}"
    );
}
