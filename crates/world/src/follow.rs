//! `imprint world follow`: how well a model follows the world's captions.
//!
//! Random captions from the world's grammar (drawn from a stream base training never used) are
//! sampled with the model, and each sample is read back ([`crate::read`]) and scored on what its
//! caption asks for: the background's kind and colour, each named object's colour, its colour at
//! its place, and the number of objects. Two columns put the score in context:
//!
//! - **ignoring the caption**: the same samples scored against the *next* caption's requests, the
//!   agreement a model gets that draws plausible scenes without reading its prompt;
//! - **rendered**: the renderer's own pictures of the captions, read the same way, the most the
//!   reader can confirm (touching objects merge into one blob, a small object on a busy background
//!   can be missed);
//! - **through the VAE**: those pictures encoded and decoded by the model's own VAE (the latent
//!   mean), the most the UNet could reach if it drew the latents perfectly: a VAE that smears small
//!   objects caps every object score below it.
//!
//! A model follows captions to the degree its column beats the first and approaches the second.

use crate::caption::Requested;
use crate::read::{read, Reading};
use crate::scene::{sample_scene_requested, seeded_rng};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use image::RgbImage;
use imprint_pipeline::{GenerateOptions, StableDiffusion};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The captions' stream: not one the world recipe trains on.
const STREAM_FOLLOW: u64 = 0xf011_0000;

/// What the command measures.
#[derive(Clone, Debug)]
pub struct FollowConfig {
    pub model: PathBuf,
    pub captions: usize,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    /// diffusers' `guidance_rescale`.
    pub guidance_rescale: f64,
    /// Samples, renders and `report.html` go here when set.
    pub out: Option<PathBuf>,
}

/// One attribute's agreement: hits out of asked, for the samples, the control and the renders.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Agreement {
    pub attribute: &'static str,
    pub asked: usize,
    pub samples: f64,
    pub ignoring_caption: f64,
    pub rendered: f64,
    pub through_vae: f64,
}

/// The attributes scored, in report order.
const ATTRIBUTES: [&str; 5] = [
    "background kind",
    "background colour",
    "object colour",
    "object colour at its place",
    "object count",
];

/// `(attribute index, agrees)` for everything `requested` asks that `reading` can confirm.
pub fn agreements(requested: &Requested, reading: &Reading) -> Vec<(usize, bool)> {
    let mut out = vec![];
    if let Some(k) = requested.background_kind {
        out.push((0, reading.background_kind == k));
    }
    if let Some(c) = requested.background_color {
        out.push((1, reading.background_color == c));
    }
    for o in &requested.objects {
        if let Some(c) = o.color {
            out.push((2, reading.objects.iter().any(|b| b.color == c)));
            if let Some(p) = o.position {
                out.push((
                    3,
                    reading
                        .objects
                        .iter()
                        .any(|b| b.color == c && b.position == p),
                ));
            }
        }
    }
    out.push((4, reading.objects.len() == requested.objects.len()));
    out
}

/// Hit rate per attribute over `(requested, reading)` pairs, and how often each was asked.
fn rates<'a>(pairs: impl Iterator<Item = (&'a Requested, &'a Reading)>) -> Vec<(usize, f64)> {
    let mut hits = [0usize; ATTRIBUTES.len()];
    let mut asked = [0usize; ATTRIBUTES.len()];
    for (req, reading) in pairs {
        for (a, ok) in agreements(req, reading) {
            asked[a] += 1;
            hits[a] += usize::from(ok);
        }
    }
    (0..ATTRIBUTES.len())
        .map(|a| (asked[a], hits[a] as f64 / asked[a].max(1) as f64))
        .collect()
}

/// The captions of the measurement and their renders.
pub fn captions(seed: u64, n: usize) -> Vec<(Requested, String, RgbImage)> {
    (0..n)
        .map(|i| {
            let (scene, requested) =
                sample_scene_requested(&mut seeded_rng(seed ^ STREAM_FOLLOW, i as u64));
            let caption = requested.write();
            (
                requested,
                caption,
                scene.render(crate::recipe::IMAGE_SIZE as u32),
            )
        })
        .collect()
}

/// Samples every caption once (seed + i) and scores samples, control and renders.
pub fn run_follow(cfg: &FollowConfig, mut progress: impl FnMut(&str)) -> Result<Vec<Agreement>> {
    if cfg.captions < 2 {
        anyhow::bail!(
            "--captions must be at least 2 (the control pairs each sample with the next caption)"
        )
    }
    let sd = StableDiffusion::load(&cfg.model, DType::F32, &Device::Cpu)
        .with_context(|| format!("{}: cannot load the model", cfg.model.display()))?;
    let cases = captions(cfg.seed, cfg.captions);
    let mut samples = Vec::with_capacity(cases.len());
    for (i, (_, caption, _)) in cases.iter().enumerate() {
        let opts = GenerateOptions {
            prompt: caption.clone(),
            steps: cfg.steps,
            guidance: cfg.guidance,
            guidance_rescale: cfg.guidance_rescale,
            seed: cfg.seed.wrapping_add(i as u64),
            num_images: 1,
            width: Some(crate::recipe::IMAGE_SIZE),
            height: Some(crate::recipe::IMAGE_SIZE),
            ..Default::default()
        };
        samples.push(sd.generate(&opts)?.remove(0));
        progress(&format!("{}/{}: {caption}", i + 1, cases.len()));
    }
    let round_trips = cases
        .iter()
        .map(|(_, _, img)| vae_round_trip(&sd, img))
        .collect::<Result<Vec<_>>>()?;
    let sample_readings: Vec<Reading> = samples.iter().map(read).collect();
    let render_readings: Vec<Reading> = cases.iter().map(|(_, _, img)| read(img)).collect();
    let vae_readings: Vec<Reading> = round_trips.iter().map(read).collect();
    let n = cases.len();
    let own = rates(cases.iter().map(|c| &c.0).zip(&sample_readings));
    let control = rates((0..n).map(|i| (&cases[(i + 1) % n].0, &sample_readings[i])));
    let rendered = rates(cases.iter().map(|c| &c.0).zip(&render_readings));
    let through_vae = rates(cases.iter().map(|c| &c.0).zip(&vae_readings));
    let table: Vec<Agreement> = (0..ATTRIBUTES.len())
        .map(|a| Agreement {
            attribute: ATTRIBUTES[a],
            asked: own[a].0,
            samples: own[a].1,
            ignoring_caption: control[a].1,
            rendered: rendered[a].1,
            through_vae: through_vae[a].1,
        })
        .collect();
    if let Some(out) = &cfg.out {
        write_report(out, &cases, &samples, &round_trips, &table)?;
    }
    Ok(table)
}

/// `img` encoded to its latent mean and decoded by the model's VAE.
fn vae_round_trip(sd: &StableDiffusion, img: &RgbImage) -> Result<RgbImage> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let x = imprint_pipeline::image_io::rgb_to_tensor(img, w, h, &Device::Cpu)?;
    let z = sd.vae.encode(&x)?.mean;
    imprint_pipeline::image_io::tensor_to_rgb(&sd.vae.decode(&z)?)
}

fn write_report(
    out: &Path,
    cases: &[(Requested, String, RgbImage)],
    samples: &[RgbImage],
    round_trips: &[RgbImage],
    table: &[Agreement],
) -> Result<()> {
    use crate::bench::html_escape;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut rows = String::new();
    for a in table {
        rows += &format!(
            "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>",
            a.attribute, a.asked, a.samples, a.ignoring_caption, a.rendered, a.through_vae
        );
    }
    let mut cells = String::new();
    for (i, (((_, caption, render), sample), round_trip)) in
        cases.iter().zip(samples).zip(round_trips).enumerate()
    {
        let names = [
            format!("{i:03}-sample.png"),
            format!("{i:03}-render.png"),
            format!("{i:03}-vae.png"),
        ];
        for (img, name) in [sample, render, round_trip].into_iter().zip(&names) {
            img.save(out.join(name))
                .with_context(|| format!("{}: cannot write", out.join(name).display()))?;
        }
        let [s, r, v] = &names;
        cells += &format!(
            "<div class=c><img src=\"{s}\" width=96><img src=\"{r}\" width=96><img src=\"{v}\" width=96><div>{}</div></div>",
            html_escape(caption)
        );
    }
    let html = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>imprint world follow</title><style>body{{font-family:sans-serif}} img{{image-rendering:pixelated;margin:1px}} .c{{display:inline-block;width:300px;font-size:11px;vertical-align:top;margin:4px}} td,th{{border-bottom:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body><h1>How the model follows captions</h1><p>Share of what the captions ask that is read back from the samples; from the same samples scored against the next caption (a model ignoring its prompt); from the renderer's own pictures (what the reader can confirm); and from those pictures passed through the model's VAE (the most its UNet could reach).</p><table><tr><th>attribute</th><th>asked</th><th>samples</th><th>ignoring the caption</th><th>rendered</th><th>through the VAE</th></tr>{rows}</table><p>Each row of three: the sample, the render of its caption, and the render through the VAE.</p>{cells}</body></html>"
    );
    imprint_models::io::write_atomic(&out.join("report.html"), html.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_agree_with_their_captions_more_than_with_the_next_one() {
        let cases = captions(0, 64);
        let readings: Vec<Reading> = cases.iter().map(|(_, _, img)| read(img)).collect();
        let own = rates(cases.iter().map(|c| &c.0).zip(&readings));
        let n = cases.len();
        let shifted = rates((0..n).map(|i| (&cases[(i + 1) % n].0, &readings[i])));
        for a in 0..ATTRIBUTES.len() {
            assert!(own[a].0 > 0, "{} never asked", ATTRIBUTES[a]);
            assert!(
                own[a].1 > shifted[a].1,
                "{}: own {} vs shifted {}",
                ATTRIBUTES[a],
                own[a].1,
                shifted[a].1
            );
        }
        // The background is read off the border, which objects rarely reach.
        assert!(own[0].1 > 0.9 && own[1].1 > 0.9, "{own:?}");
    }
}
