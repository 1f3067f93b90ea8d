//! `imprint world bench` end to end on a smoke-trained world (a few steps per phase): one method,
//! two concepts, the multi-concept use with its TI and SVDiff Cut-Mix-Unmix variants, the style
//! use (TI and LoRA from a style set on new shapes, P+ style mixing), and the debias use with both
//! ways of learning its tokens.

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
            "multi,debias,style",
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
    // The debias use: the bias before, and after tokens learned both ways, over 32 samples each.
    let debias = lines
        .iter()
        .find(|l| l["use"] == "debias")
        .expect("a debias line");
    for key in ["before", "after", "ti_after"] {
        let total: u64 = debias[key]["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum();
        assert_eq!(total, 32, "{key}: {debias}");
        assert!(debias[key]["kl_uniform"].as_f64().unwrap() >= 0.0);
    }
    for picture in ["before.png", "after-iti-gen.png", "after-ti.png"] {
        assert!(out.join("debias").join(picture).is_file(), "{picture}");
    }
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
            "region prompts",
            "svdiff cut-mix-unmix",
            "svdiff cut-mix, no unmix"
        ]
    );
    let floor = multi["empty_dino"].as_array().unwrap();
    assert_eq!(floor.len(), 2, "{multi}");
    assert!(floor.iter().all(|d| d.as_f64().unwrap().is_finite()));
    for v in multi["variants"].as_array().unwrap() {
        for c in v["concepts"].as_array().unwrap() {
            let appears = c["appears"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&appears));
            assert!(c["dino"].as_f64().unwrap().is_finite());
        }
    }
    let style = lines
        .iter()
        .find(|l| l["use"] == "style")
        .expect("a style line");
    let cases: Vec<&str> = style["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["case"].as_str().unwrap())
        .collect();
    for method in ["baseline", "ti", "lora"] {
        for shape in ["square", "circle", "star", "triangle"] {
            let case = format!("{method} on a {shape}");
            assert!(cases.contains(&case.as_str()), "{case} in {cases:?}");
        }
    }
    assert!(cases.iter().any(|c| c.starts_with("mix:")), "{cases:?}");
    for c in style["cases"].as_array().unwrap() {
        assert!((0.0..=1.0).contains(&c["pattern_colors"].as_f64().unwrap()));
    }
    let lora_caption = std::fs::read_dir(out.join("style/pattern-lora/images"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.path().extension().is_some_and(|x| x == "txt"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .expect("the style LoRA's captions");
    assert!(lora_caption.contains("sks "), "{lora_caption}");
    // The Cut-Mix-Unmix run logged its unmix term; the control's weight was 0.
    let log =
        std::fs::read_to_string(out.join("multi/svdiff-cut-mix-unmix/concept.log.jsonl")).unwrap();
    assert!(log.contains("\"unmix\""));
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(report.contains("svdiff-cut-mix-unmix.png"));
    assert!(out.join("multi/svdiff-cut-mix-unmix.png").exists());
}

/// `imprint world follow` on a smoke world: one JSON line per attribute with all four columns
/// in [0, 1], and a report showing each sample, its render and the render through the VAE.
/// `world train --recipe` refuses a file that is not a recipe, naming it.
#[test]
fn follow_scores_samples_renders_and_vae_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    smoke_world(&world);
    let out = tmp.path().join("follow");
    let stdout = ok(imprint()
        .args(["world", "follow", "--model"])
        .arg(world.join("model"))
        .args(["--captions", "3", "--steps", "2", "--json", "--out"])
        .arg(&out)
        .output()
        .unwrap());
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 5);
    for row in &rows {
        for key in ["samples", "ignoring_caption", "rendered", "through_vae"] {
            let v = row[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} in {row}"));
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
    }
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    for i in 0..3 {
        for kind in ["sample", "render", "vae"] {
            let name = format!("{i:03}-{kind}.png");
            assert!(report.contains(&name) && out.join(&name).exists(), "{name}");
        }
    }

    let bad = tmp.path().join("recipe.json");
    std::fs::write(&bad, r#"{"vae_stepz": 3}"#).unwrap();
    let err = fails(
        imprint()
            .args(["world", "train", "--out"])
            .arg(tmp.path().join("w2"))
            .arg("--recipe")
            .arg(&bad)
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("not a world recipe") && err.contains("recipe.json"),
        "{err}"
    );
}
