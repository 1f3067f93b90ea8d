//! Encoder-based personalization end to end on a smoke-trained world: `train encoder` on the
//! world's concepts and on a folder of concept folders, `personalize` with and without tuning,
//! and refused inputs.

mod common;

use common::*;
use std::path::Path;

fn concept_images(k: &str, subject: &str, out: &Path) {
    ok(imprint()
        .args([
            "world",
            "concept",
            "--id",
            k,
            "--count",
            "3",
            "--subject",
            subject,
            "--out",
        ])
        .arg(out)
        .output()
        .unwrap());
}

#[test]
fn an_encoder_trains_and_makes_concepts_in_one_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    smoke_world(&world);
    let train = |data: &str, out: &Path| {
        imprint()
            .args([
                "train",
                "encoder",
                "--data",
                data,
                "--steps",
                "3",
                "--batch-size",
                "2",
            ])
            .args(["--class-word", "star", "--model"])
            .arg(world.join("model"))
            .arg("--init-vision")
            .arg(world.join("clip"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let enc = tmp.path().join("enc");
    ok(train("world", &enc));
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        assert!(enc.join(f).is_file(), "{f}");
    }
    // An existing encoder is not overwritten.
    let again = train("world", &enc);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // A folder of concept folders (captions name the class word).
    let data = tmp.path().join("data");
    concept_images("0", "star", &data.join("checker-star"));
    concept_images("1", "heart", &data.join("zigzag-heart"));
    ok(train(
        data.to_str().unwrap(),
        &tmp.path().join("enc-folder"),
    ));

    let images = tmp.path().join("k0");
    concept_images("0", "<x>", &images);
    let personalize = |out: &Path, extra: &[&str]| {
        imprint()
            .args(["personalize", "--token", "<x>", "--encoder"])
            .arg(&enc)
            .arg("--model")
            .arg(world.join("model"))
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let one = tmp.path().join("one.safetensors");
    let o = personalize(&one, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    ok(o);
    assert!(stderr.contains("encoder pass"), "{stderr}");
    let tuned = tmp.path().join("tuned.safetensors");
    ok(personalize(&tuned, &["--tune-steps", "3"]));
    let a = load(&one)["text_encoder.token_embeddings"].clone();
    let b = load(&tuned)["text_encoder.token_embeddings"].clone();
    assert_eq!(a.dims(), b.dims());
    assert!(rel_err(&a, &b) > 0.0, "tuning changed nothing");
    // Both are ordinary concepts.
    ok(imprint()
        .args([
            "generate",
            "--prompt",
            "a <x> on a solid gray background",
            "--steps",
            "2",
        ])
        .args(["--width", "64", "--height", "64", "--model"])
        .arg(world.join("model"))
        .arg("--concept")
        .arg(&tuned)
        .arg("--out")
        .arg(tmp.path().join("x.png"))
        .output()
        .unwrap());
    // Over 15 tuning steps, and a folder without images, are refused with nothing written.
    let bad = tmp.path().join("bad.safetensors");
    let o = personalize(&bad, &["--tune-steps", "40"]);
    assert!(!o.status.success() && !bad.exists());
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = imprint()
        .args(["personalize", "--token", "<x>", "--encoder"])
        .arg(&enc)
        .arg("--model")
        .arg(world.join("model"))
        .arg("--images")
        .arg(&empty)
        .arg("--out")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success() && !bad.exists());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no images"));
}
