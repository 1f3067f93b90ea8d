//! `imprint world bench` end to end on a smoke-trained world (a few steps per phase): one method,
//! two concepts, the multi-concept use with its TI and SVDiff Cut-Mix-Unmix variants.

mod common;

use common::*;

#[test]
fn bench_measures_methods_and_two_concepts_in_one_picture() {
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    smoke_world(&world);
    let out = tmp.path().join("bench");
    let stdout = ok(imprint()
        .args(["world", "bench", "--world"])
        .arg(&world)
        .args(["--methods", "ti", "--concepts", "0,1", "--references", "2"])
        .args([
            "--samples",
            "1",
            "--steps-scale",
            "0.005",
            "--uses",
            "multi",
        ])
        .args(["--json", "--out"])
        .arg(&out)
        .output()
        .unwrap());
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|l| l["method"] == "ti"));
    let multi = lines
        .iter()
        .find(|l| l["use"] == "multi")
        .expect("a multi line");
    let variants: Vec<&str> = multi["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        variants,
        [
            "joint",
            "regions",
            "svdiff cut-mix-unmix",
            "svdiff cut-mix, no unmix"
        ]
    );
    for v in multi["variants"].as_array().unwrap() {
        for c in v["concepts"].as_array().unwrap() {
            let appears = c["appears"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&appears));
            assert!(c["dino"].as_f64().unwrap().is_finite());
        }
    }
    // The Cut-Mix-Unmix run logged its unmix term; the control's weight was 0.
    let log =
        std::fs::read_to_string(out.join("multi/svdiff-cut-mix-unmix/concept.log.jsonl")).unwrap();
    assert!(log.contains("\"unmix\""));
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(report.contains("svdiff-cut-mix-unmix.png"));
    assert!(out.join("multi/svdiff-cut-mix-unmix.png").exists());
}
