//! End-to-end tests of `imprint eval` (on the transformers fixtures) and `imprint world`.

mod common;

use common::*;
use std::path::PathBuf;

fn eval_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/eval")
}

#[test]
fn eval_prints_the_three_metrics_as_transformers_computes_them() {
    let f = eval_fixtures();
    let out = imprint()
        .args(["eval", "--json", "--prompt", "a photo of sks dog"])
        .arg("--generated")
        .arg(f.join("images/generated"))
        .arg("--references")
        .arg(f.join("images/references"))
        .arg("--clip")
        .arg(f.join("clip"))
        .arg("--dino")
        .arg(f.join("dino"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("expected.json")).unwrap()).unwrap();
    for (ours, theirs) in [
        ("clip_i", "clip_i"),
        ("clip_t", "clip_t_prompt0"),
        ("dino", "dino"),
    ] {
        let a = v[ours].as_f64().unwrap();
        let b = expected["metrics"][theirs].as_f64().unwrap();
        assert!((a - b).abs() < 1e-4, "{ours}: {a} vs {b}");
    }
}

#[test]
fn eval_refuses_folders_without_images_and_missing_models() {
    let f = eval_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let out = imprint()
        .args(["eval", "--prompt", "a dog"])
        .arg("--generated")
        .arg(dir.path())
        .arg("--references")
        .arg(f.join("images/references"))
        .arg("--clip")
        .arg(f.join("clip"))
        .arg("--dino")
        .arg(f.join("dino"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no images"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let out = imprint()
        .args([
            "eval",
            "--prompt",
            "a dog",
            "--generated",
            "a",
            "--references",
            "b",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--clip DIR and --dino DIR"),
        "{err}"
    );
}

#[test]
fn dreambench_runs_the_protocol_on_the_dataset_layout() {
    let f = eval_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dataset");
    let samples = dir.path().join("samples");
    std::fs::create_dir_all(data.join("dog")).unwrap();
    std::fs::create_dir_all(samples.join("dog/00")).unwrap();
    for (i, e) in std::fs::read_dir(f.join("images/references"))
        .unwrap()
        .enumerate()
    {
        std::fs::copy(e.unwrap().path(), data.join(format!("dog/{i:02}.png"))).unwrap();
    }
    for (i, e) in std::fs::read_dir(f.join("images/generated"))
        .unwrap()
        .enumerate()
    {
        std::fs::copy(e.unwrap().path(), samples.join(format!("dog/00/{i}.png"))).unwrap();
    }
    std::fs::write(
        data.join("prompts_and_classes.txt"),
        "Classes\nsubject_name,class\ndog,dog\n\nPrompts\nObject Prompts\nprompt_list = [\n'a {0} {1} in the jungle'.format(unique_token, class_token),\n]\n\nLive Subject Prompts\nprompt_list = [\n'a {0} {1} in the jungle'.format(unique_token, class_token),\n'a {0} {1} in the snow'.format(unique_token, class_token),\n]\n",
    )
    .unwrap();
    let out = imprint()
        .args(["eval", "dreambench", "--json"])
        .arg("--data")
        .arg(&data)
        .arg("--samples")
        .arg(&samples)
        .arg("--clip")
        .arg(f.join("clip"))
        .arg("--dino")
        .arg(f.join("dino"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            v["subjects"].as_u64(),
            v["prompts"].as_u64(),
            v["missing_prompts"].as_u64()
        ),
        (Some(1), Some(1), Some(1))
    );
    // Same images as the fixture's: DINO and CLIP-I are the fixture's values.
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("expected.json")).unwrap()).unwrap();
    assert!(
        (v["dino"].as_f64().unwrap() - expected["metrics"]["dino"].as_f64().unwrap()).abs() < 1e-4
    );
    assert!(v["real_dino"].as_f64().is_some());
}

#[test]
fn world_concept_writes_captioned_references() {
    let dir = tempfile::tempdir().unwrap();
    let out = imprint()
        .args(["world", "concept", "--id", "1", "--count", "3", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..3 {
        let img = image::open(dir.path().join(format!("{i:02}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
        let caption = std::fs::read_to_string(dir.path().join(format!("{i:02}.txt"))).unwrap();
        assert!(caption.contains("heart"), "{caption}");
    }
    let named = dir.path().join("named");
    let out = imprint()
        .args([
            "world",
            "concept",
            "--id",
            "0",
            "--count",
            "2",
            "--subject",
            "<my-star>",
            "--out",
        ])
        .arg(&named)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let caption = std::fs::read_to_string(named.join("00.txt")).unwrap();
    assert!(caption.starts_with("a <my-star> "), "{caption}");
    let list = imprint()
        .args(["world", "concept", "--list"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).lines().count() >= 5);
    let bad = imprint()
        .args(["world", "concept", "--id", "42", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("does not exist"));
}
