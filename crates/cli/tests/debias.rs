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

/// The header metadata of a safetensors file.
fn metadata(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].clone()
}

/// `--method ti`: one Textual Inversion concept per category, trained through the model, saved
/// as the same inclusive-token concept `--balance` uses; the scratch folder is removed. Each
/// method refuses to run without the model or CLIP it needs, writing nothing.
#[test]
fn inclusive_tokens_learned_as_textual_inversion() {
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    smoke_world(&world);
    let cats = tmp.path().join("cats");
    ok(imprint()
        .args(["world", "categories", "--count", "2", "--out"])
        .arg(&cats)
        .output()
        .unwrap());
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let tokens = out_dir.join("color.safetensors");
    let train = |extra: &[&str], out: &Path| {
        imprint()
            .args([
                "train",
                "debias",
                "--attribute",
                "color",
                "--prompt",
                "a circle",
            ])
            .args(extra)
            .arg("--categories")
            .arg(&cats)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let model = world.join("model").display().to_string();
    ok(train(
        &[
            "--method",
            "ti",
            "--model",
            &model,
            "--steps",
            "2",
            "--batch-size",
            "1",
        ],
        &tokens,
    ));
    let meta = metadata(&tokens);
    assert_eq!(
        meta["inclusive.learned_with"], "textual-inversion",
        "{meta}"
    );
    assert_eq!(meta["inclusive.attribute"], "color");
    assert_eq!(
        meta["inclusive.triggers"],
        "<color-blue>,<color-green>,<color-red>,<color-yellow>"
    );
    let left: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        left,
        ["color.safetensors"],
        "the scratch folder stays behind"
    );

    let gen = tmp.path().join("gen");
    std::fs::create_dir(&gen).unwrap();
    let out = imprint()
        .args([
            "generate",
            "--prompt",
            "a circle",
            "--num-images",
            "4",
            "--steps",
            "2",
        ])
        .args([
            "--width",
            "64",
            "--height",
            "64",
            "--balance",
            "color",
            "--model",
        ])
        .arg(&model)
        .arg("--concept")
        .arg(&tokens)
        .arg("--out")
        .arg(gen.join("b.png"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    ok(out);
    assert!(stderr.contains("1 image(s) of 'red'"), "{stderr}");

    let none = tmp.path().join("none.safetensors");
    let err = fails(train(&["--method", "ti"], &none));
    assert!(err.contains("--method ti needs --model"), "{err}");
    let err = fails(train(&["--model", &model], &none));
    assert!(err.contains("needs --clip"), "{err}");
    assert!(!none.exists());
}
