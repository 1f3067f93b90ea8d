//! Bias correction end to end on a smoke-trained world (a few steps per phase, so its text encoder
//! is its CLIP's text tower as in the committed world): `world categories`, `train debias`,
//! `generate --balance` and `eval classify`.

mod common;

use common::*;
use std::path::Path;

#[test]
fn inclusive_tokens_balance_generation_over_the_categories() {
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    smoke_world(&world);
    let cats = tmp.path().join("cats");
    ok(imprint()
        .args(["world", "categories", "--count", "3", "--out"])
        .arg(&cats)
        .output()
        .unwrap());
    let tokens = tmp.path().join("color.safetensors");
    ok(imprint()
        .args(["train", "debias", "--attribute", "color", "--steps", "5"])
        .args(["--prompt", "a circle", "--categories"])
        .arg(&cats)
        .arg("--clip")
        .arg(world.join("clip"))
        .arg("--model")
        .arg(world.join("model"))
        .arg("--out")
        .arg(&tokens)
        .output()
        .unwrap());
    let generate = |balance: &str, out: &Path| {
        imprint()
            .args(["generate", "--prompt", "a circle", "--num-images", "5"])
            .args([
                "--steps",
                "2",
                "--width",
                "64",
                "--height",
                "64",
                "--balance",
                balance,
            ])
            .arg("--model")
            .arg(world.join("model"))
            .arg("--concept")
            .arg(&tokens)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let gen = tmp.path().join("gen");
    std::fs::create_dir(&gen).unwrap();
    let out = generate("color", &gen.join("balanced.png"));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    ok(out);
    // Five images over four colours: two of the first category, one of each other.
    assert!(stderr.contains("2 image(s) of 'blue'"), "{stderr}");
    assert!(stderr.contains("1 image(s) of 'yellow'"), "{stderr}");
    for i in 0..5 {
        assert!(gen.join(format!("balanced-{i}.png")).is_file());
    }
    std::fs::remove_file(gen.join("balanced.png")).unwrap();

    // An attribute the concept does not balance is refused before anything is written.
    let refused = generate("shape", &tmp.path().join("no.png"));
    assert!(!refused.status.success());
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert!(msg.contains("balance color instead"), "{msg}");
    assert!(!tmp.path().join("no.png").exists());

    // The classifier's histogram covers every image.
    let json = ok(imprint()
        .args([
            "eval",
            "classify",
            "--json",
            "--categories",
            "red,green,blue,yellow",
        ])
        .args(["--template", "a {} circle", "--generated"])
        .arg(&gen)
        .arg("--clip")
        .arg(world.join("clip"))
        .output()
        .unwrap());
    let h: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let counts: u64 = h["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(counts, 5);
    // The reported KL is the histogram's.
    let kl: f64 = h["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_f64().unwrap() / 5.0)
        .filter(|&p| p > 0.0)
        .map(|p| p * (p * 4.0).ln())
        .sum();
    assert!((h["kl_uniform"].as_f64().unwrap() - kl).abs() < 1e-9);

    // One category folder is not an attribute.
    let one = tmp.path().join("one");
    std::fs::create_dir_all(one.join("red")).unwrap();
    std::fs::copy(cats.join("red/00.png"), one.join("red/00.png")).unwrap();
    let out = imprint()
        .args(["train", "debias", "--attribute", "color", "--categories"])
        .arg(&one)
        .arg("--clip")
        .arg(world.join("clip"))
        .arg("--out")
        .arg(tmp.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least two"));
    assert!(!tmp.path().join("x.safetensors").exists());
}
