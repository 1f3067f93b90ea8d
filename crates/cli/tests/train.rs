//! `imprint train textual-inversion` end to end on the tiny model and the shipped example images,
//! then generation with the trained concept.

mod common;

use common::*;

#[test]
fn train_textual_inversion_then_generate_with_the_concept() {
    let model = tiny_model("tiny");
    let dir = scratch("train");
    let out = dir.join("toy.safetensors");
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        "num-vectors = 2\nresolution = 64\nbatch-size = 1\ngrad-accum = 1\nsave-every = 2\n",
    )
    .unwrap();
    run_ok(
        imprint()
            .args([
                "train",
                "ti",
                "--token",
                "<my-toy>",
                "--init-word",
                "toy",
                "--steps",
                "3",
                "--model",
            ])
            .arg(&model)
            .arg("--images")
            .arg(toy_images())
            .arg("--out")
            .arg(&out)
            .arg("--config")
            .arg(&config)
            .args([
                "--validation-prompt",
                "a photo of <my-toy>",
                "--validation-every",
                "2",
            ])
            .args(["--num-validation-images", "2", "--validation-steps", "2"]),
    );
    assert!(out.exists());
    let used = std::fs::read_to_string(dir.join("toy.config.toml")).unwrap();
    assert!(
        used.contains("num-vectors = 2") && used.contains("steps = 3"),
        "{used}"
    );
    let log = std::fs::read_to_string(dir.join("toy.log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!(first["loss"].as_f64().unwrap().is_finite());
    let grid = image::open(dir.join("toy.validation/step-000002.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (128, 64));
    assert!(dir.join("toy.validation/step-000003.png").exists());

    let image = dir.join("moon.png");
    run_ok(
        imprint()
            .args([
                "generate",
                "--prompt",
                "a photo of <my-toy> on the moon",
                "--steps",
                "3",
                "--model",
            ])
            .arg(&model)
            .arg("--concept")
            .arg(&out)
            .arg("--out")
            .arg(&image),
    );
    assert!(image.exists());
}

#[test]
fn training_refuses_an_existing_token() {
    let model = tiny_model("tiny");
    let dir = scratch("train-bad");
    let out = dir.join("x.safetensors");
    let o = imprint()
        .args([
            "train",
            "ti",
            "--token",
            "dog",
            "--init-word",
            "toy",
            "--steps",
            "1",
            "--resolution",
            "64",
            "--model",
        ])
        .arg(&model)
        .arg("--images")
        .arg(toy_images())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("already exists") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn print_config_shows_the_resolved_recipe_and_trains_nothing() {
    let dir = scratch("train-print-config");
    let out = dir.join("sks.safetensors");
    let config = dir.join("run.toml");
    std::fs::write(&config, "rank = 8\nbatch-size = 2\n").unwrap();
    // Defaults, then the file, then the flags: the method's default steps (500), the file's rank
    // and batch size, the flag's batch size over the file's.
    let printed = ok(train_on_toy(
        &[
            "lora",
            "--instance-prompt",
            "a photo of sks toy",
            "--print-config",
        ],
        &out,
    )
    .arg("--config")
    .arg(&config)
    .args(["--batch-size", "3"])
    .output()
    .unwrap());
    let table: toml::Table = printed.parse().unwrap();
    assert_eq!(table["steps"].as_integer(), Some(500), "{printed}");
    assert_eq!(table["rank"].as_integer(), Some(8), "{printed}");
    assert_eq!(table["batch-size"].as_integer(), Some(3), "{printed}");
    assert_eq!(table["resolution"].as_integer(), Some(512), "{printed}");
    assert_eq!(
        table["instance-prompt"].as_str(),
        Some("a photo of sks toy")
    );
    // Textual Inversion's recipe differs (diffusers' script: 3,000 steps × accumulation 4).
    let ti: toml::Table = ok(train_on_toy(
        &[
            "ti",
            "--token",
            "<t>",
            "--init-word",
            "toy",
            "--print-config",
        ],
        &out,
    )
    .output()
    .unwrap())
    .parse()
    .unwrap();
    assert_eq!(ti["steps"].as_integer(), Some(3000));
    assert_eq!(ti["grad-accum"].as_integer(), Some(4));
    // Nothing trained, nothing written.
    assert!(std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .all(|e| e.path() == config));
    // An invalid configuration is refused as a run would refuse it.
    let err = fails(
        train_on_toy(&["lora", "--print-config"], &out)
            .args([
                "--mixed-precision",
                "fp16",
                "--gradient-checkpointing",
                "--fused-backward",
            ])
            .output()
            .unwrap(),
    );
    assert!(err.contains("fused"), "{err}");
}

#[test]
fn train_lora_then_generate_and_export() {
    let model = tiny_model("tiny");
    let dir = scratch("train-lora");
    let out = dir.join("sks.safetensors");
    run_ok(
        imprint()
            .args([
                "train",
                "lora",
                "--instance-prompt",
                "a photo of sks toy",
                "--rank",
                "2",
                "--steps",
                "3",
            ])
            .args([
                "--resolution",
                "64",
                "--lr",
                "1e-3",
                "--train-text-encoder",
                "--model",
            ])
            .arg(&model)
            .arg("--images")
            .arg(toy_images())
            .arg("--out")
            .arg(&out),
    );
    let used = std::fs::read_to_string(dir.join("sks.config.toml")).unwrap();
    assert!(
        used.contains("rank = 2") && used.contains("train-text-encoder = true"),
        "{used}"
    );
    let image = dir.join("sks.png");
    run_ok(
        imprint()
            .args([
                "generate",
                "--prompt",
                "a photo of sks toy",
                "--steps",
                "2",
                "--model",
            ])
            .arg(&model)
            .arg("--concept")
            .arg(format!("{}:0.8", out.display()))
            .arg("--out")
            .arg(&image),
    );
    assert!(image.exists());
    let kohya = dir.join("sks-kohya.safetensors");
    run_ok(
        imprint()
            .args(["concept", "convert"])
            .arg(&out)
            .arg(&kohya)
            .args(["--format", "kohya"]),
    );
    let keys = load(&kohya);
    assert!(keys
        .keys()
        .any(|k| k.starts_with("lora_unet_") && k.ends_with(".lora_down.weight")));
    assert!(keys.keys().any(|k| k.starts_with("lora_te_")));
    let inspect = run_ok(imprint().args(["concept", "inspect"]).arg(&kohya));
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("lora"));
}

#[test]
fn lora_with_prior_preservation_masks_and_min_snr() {
    let model = tiny_model("tiny-sd2");
    let dir = scratch("train-prior");
    // Instance images with a caption and a mask for one of them.
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for e in std::fs::read_dir(toy_images()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, images.join(p.file_name().unwrap())).unwrap();
    }
    image::GrayImage::from_fn(160, 160, |x, _| {
        image::Luma([if x > 40 && x < 120 { 255 } else { 0 }])
    })
    .save(images.join("toy-0.mask.png"))
    .unwrap();
    std::fs::write(
        images.join("toy-2.txt"),
        "a photo of sks toy on a blue table",
    )
    .unwrap();
    let class = dir.join("class");
    let out = dir.join("prior.safetensors");
    let train = |steps: &str| {
        run_ok(
            imprint()
                .args([
                    "train",
                    "lora",
                    "--instance-prompt",
                    "a photo of sks toy",
                    "--steps",
                    steps,
                    "--resolution",
                    "64",
                ])
                .args([
                    "--class-prompt",
                    "a photo of a toy",
                    "--num-class-images",
                    "3",
                    "--prior-weight",
                    "0.5",
                ])
                .args([
                    "--snr-gamma",
                    "5",
                    "--noise-offset",
                    "0.05",
                    "--batch-size",
                    "2",
                    "--model",
                ])
                .arg(&model)
                .arg("--images")
                .arg(&images)
                .arg("--class-images")
                .arg(&class)
                .arg("--out")
                .arg(&out),
        )
    };
    train("2");
    let generated: Vec<_> = std::fs::read_dir(&class).unwrap().collect();
    assert_eq!(generated.len(), 3, "missing class images are generated");
    let first = std::fs::read(class.join("class-00000.png")).unwrap();
    assert_eq!(image::load_from_memory(&first).unwrap().width(), 64);
    train("1"); // reuses them
    assert_eq!(std::fs::read(class.join("class-00000.png")).unwrap(), first);
    assert_eq!(std::fs::read_dir(&class).unwrap().count(), 3);
    assert!(out.exists());
}

#[test]
fn dreambooth_writes_a_model_folder_and_an_exact_lora_of_the_change() {
    let model = tiny_model("tiny");
    let dir = scratch("dreambooth");
    let out = dir.join("tuned");
    let train = || {
        imprint()
            .args([
                "train",
                "dreambooth",
                "--instance-prompt",
                "a photo of sks toy",
                "--steps",
                "2",
                "--resolution",
                "64",
            ])
            .args([
                "--lr",
                "1e-3",
                "--train-text-encoder",
                "--extract-lora",
                "64",
                "--model",
            ])
            .arg(&model)
            .arg("--images")
            .arg(toy_images())
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = train();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.join("model_index.json").exists()
            && out
                .join("unet/diffusion_pytorch_model.safetensors")
                .exists()
    );
    let base = load(&model.join("unet/diffusion_pytorch_model.safetensors"));
    let tuned = load(&out.join("unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(base.len(), tuned.len());
    assert!(
        rel_err(&tuned["conv_in.weight"], &base["conv_in.weight"]) > 0.0,
        "the UNet was trained"
    );

    // The extracted LoRA at full rank is exactly the change of every projection weight (biases
    // and norms, which a LoRA cannot hold, are left out, as kohya's extraction does).
    let lora = imprint_concepts::formats::load_any(&dir.join("tuned.lora.safetensors")).unwrap();
    let unet_modules: Vec<_> = lora
        .lora
        .modules
        .iter()
        .filter(|m| m.network == "unet")
        .collect();
    assert!(
        unet_modules.len() > 20
            && lora
                .lora
                .modules
                .iter()
                .any(|m| m.network == "text_encoder")
    );
    for m in unet_modules {
        let key = format!("{}.weight", m.module);
        let change = (&tuned[&key] - &base[&key]).unwrap();
        let err = rel_err(
            &m.delta_weight().unwrap().reshape(change.shape()).unwrap(),
            &change,
        );
        assert!(err < 1e-5, "{key}: extracted delta differs by {err:e}");
    }
    // Applied to the base model it runs (and changes the output).
    let input = fixtures().join("tiny/unet.safetensors");
    let applied = dir.join("lora-out.safetensors");
    run_ok(
        imprint()
            .args(["debug", "forward", "--component", "unet", "--model"])
            .arg(&model)
            .arg("--concept")
            .arg(dir.join("tuned.lora.safetensors"))
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&applied),
    );
    assert!(rel_err(&load(&applied)["sample"], &load(&input)["expected"]) > 1e-6);

    let image = dir.join("tuned.png");
    run_ok(
        imprint()
            .args([
                "generate",
                "--prompt",
                "a photo of sks toy",
                "--steps",
                "2",
                "--model",
            ])
            .arg(&out)
            .arg("--out")
            .arg(&image),
    );
    // The model folder is never overwritten.
    let again = train();
    assert!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("already exists")
    );
}
