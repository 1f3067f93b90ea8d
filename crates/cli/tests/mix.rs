//! Every kind of concept in one prompt (issue 14): Textual Inversion, P+, LoRA, Perfusion, Custom
//! Diffusion and SVDiff, each trained here for two steps on the diffusers-made tiny model, and an
//! IP-Adapter, all applied to one `debug sample`. Each one must act (the sample moves when it is
//! left out of the prompt or its scale changes), so none is silently dropped by the others.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn model() -> PathBuf {
    fixtures().join("diffusers-made/model")
}

/// `imprint train KIND ARGS` on the toy images for two steps; the model's caches go to `cache`.
fn train(kind: &str, args: &[&str], out: &Path, cache: &Path) {
    run_ok(
        imprint()
            .env("IMPRINT_CACHE_DIR", cache)
            .args(["train", kind, "--model"])
            .arg(model())
            .arg("--images")
            .arg(toy_images())
            .args(args)
            .args(["--steps", "2", "--resolution", "64", "--save-every", "0"])
            .arg("--out")
            .arg(out),
    );
}

#[test]
fn every_kind_of_concept_acts_in_one_prompt() {
    let dir = scratch("mix");
    let cache = dir.join("cache");
    let file = |name: &str| dir.join(format!("{name}.safetensors"));
    train(
        "ti",
        &["--token", "<ti>", "--init-word", "one", "--lr", "5e-2"],
        &file("ti"),
        &cache,
    );
    train(
        "xti",
        &["--token", "<xti>", "--init-word", "one", "--lr", "5e-2"],
        &file("xti"),
        &cache,
    );
    train(
        "lora",
        &[
            "--instance-prompt",
            "a photo of sks toy",
            "--rank",
            "2",
            "--lr",
            "1e-2",
        ],
        &file("lora"),
        &cache,
    );
    train(
        "perfusion",
        &["--token", "<pf>", "--superclass", "one", "--lr", "5e-2"],
        &file("perfusion"),
        &cache,
    );
    // Custom Diffusion writes diffusers' folder at --out and its native file beside it.
    train(
        "custom-diffusion",
        &[
            "--token",
            "<cd>",
            "--init-word",
            "one",
            "--instance-prompt",
            "a <cd> one",
            "--lr",
            "1e-2",
        ],
        &dir.join("cd"),
        &cache,
    );
    train(
        "svdiff",
        &["--instance-prompt", "a photo of zwx toy", "--lr", "1e-2"],
        &file("svdiff"),
        &cache,
    );
    let concepts = [
        file("ti"),
        file("xti"),
        file("lora"),
        file("perfusion"),
        dir.join("cd.safetensors"),
        file("svdiff"),
    ];
    for c in &concepts {
        assert!(c.is_file(), "{}", c.display());
    }
    let ip = fixtures().join("ip_adapter");
    let prompt = "a photo of <ti> <xti> <pf> <cd> sks zwx toy";
    // One sample with every concept at scale 1 except `scaled` (index into `concepts`, or 6 for
    // the IP-Adapter) at 0.5.
    let sample = |name: &str, prompt: &str, scaled: Option<usize>| {
        let out = dir.join(format!("{name}.out.safetensors"));
        let scale = |i: usize| if scaled == Some(i) { "0.5" } else { "1" };
        let mut cmd = imprint();
        cmd.env("IMPRINT_CACHE_DIR", &cache)
            .args(["debug", "sample", "--model"])
            .arg(model())
            .args(["--prompt", prompt, "--scheduler", "ddim", "--steps", "4"])
            .args(["--guidance", "7.5", "--latents"])
            .arg(ip.join("case_0.safetensors"))
            .arg("--output")
            .arg(&out);
        for (i, c) in concepts.iter().enumerate() {
            cmd.arg("--concept")
                .arg(format!("{}:{}", c.display(), scale(i)));
        }
        cmd.arg("--ip-adapter")
            .arg(format!(
                "{}:{}",
                ip.join("ip-adapter.safetensors").display(),
                scale(6)
            ))
            .arg("--ip-image")
            .arg(ip.join("image.png"));
        run_ok(&mut cmd);
        load(&out)["latents"].clone()
    };
    let all = sample("all", prompt, None);
    // The embedding concepts act through their words: the prompt without the word differs.
    for word in ["<ti>", "<xti>", "<pf>", "<cd>"] {
        let without = sample(
            &format!("without-{word}"),
            &prompt.replace(&format!("{word} "), ""),
            None,
        );
        assert!(rel_err(&without, &all) > 1e-4, "{word} has no effect");
    }
    // The weight concepts and the image prompt act at their scale.
    for (i, name) in [
        (2, "lora"),
        (3, "perfusion"),
        (4, "custom diffusion"),
        (5, "svdiff"),
        (6, "ip-adapter"),
    ] {
        let half = sample(&format!("half-{i}"), prompt, Some(i));
        assert!(
            rel_err(&half, &all) > 1e-6,
            "{name} at scale 0.5 gives the same sample as at 1"
        );
    }
}
