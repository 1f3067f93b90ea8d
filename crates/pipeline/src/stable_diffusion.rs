//! The Stable Diffusion pipeline: prompt encoding, the guided denoising loop, txt2img and img2img.
//! Follows diffusers' `StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline`.

use crate::image_io;
use crate::noise::SeededNoise;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use imprint_concepts::apply::{apply_textual_inversion, expand_prompt, missing_trigger_warning};
use imprint_concepts::lora::prepare_lora;
use imprint_concepts::lycoris::prepare_lycoris;
use imprint_concepts::per_layer::{select_layers, PerLayerTokens};
use imprint_concepts::perfusion::{apply_perfusion, detach_adapters, AppliedEdit};
use imprint_concepts::weights::prepare_projections;
use imprint_concepts::{Concept, PerfusionEdit, TEXT_ENCODER, UNET};
use imprint_models::clip::ClipTextTransformer;
use imprint_models::loading::ModelFolder;
use imprint_models::schedulers::{self, NoiseSource, Scheduler, SchedulerConfig, SchedulerKind};
use imprint_models::tokenizer::ClipTokenizer;
use imprint_models::unet::UNet2DConditionModel;
use imprint_models::vae::AutoencoderKL;
use imprint_models::TextStates;
use imprint_ops::Adapter;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The loaded components of one model folder.
#[derive(Clone)]
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextTransformer,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
    pub folder: ModelFolder,
    /// The applied concepts' `(trigger, number of vectors)`, in order: prompts are rewritten for
    /// them before tokenizing.
    pub concepts: Vec<(String, usize)>,
    /// Cut prompts longer than the text encoder takes, with a warning, as the reference pipelines
    /// do (`imprint debug sample`); otherwise such a prompt is an error.
    pub truncate_long_prompts: bool,
    /// Applied concepts whose words differ by UNet layer (P+, or concepts restricted to layers).
    pub per_layer: PerLayerTokens,
    /// Applied Perfusion edits with their scales, and the adapters that realize them together.
    perfusion: Vec<(PerfusionEdit, f64)>,
    perfusion_adapters: Vec<Arc<dyn Adapter>>,
    /// An IP-Adapter's image tokens `(negative, positive)`, each `[1, N, cross_dim]`, appended to
    /// the text states of every prompt.
    pub image_prompt: Option<(Tensor, Tensor)>,
}

/// How one concept is applied: at what scale, to which UNet layers, with which Perfusion gate.
#[derive(Clone, Debug)]
pub struct ConceptOptions {
    /// 1 = as trained.
    pub scale: f64,
    /// Restrict the concept's words to these cross-attention layers (`down`, `mid`, `up`, paths,
    /// kohya names, indices: `imprint_concepts::per_layer::select_layers`); style mixing.
    pub layers: Option<String>,
    /// Override a Perfusion concept's gate bias β / temperature τ.
    pub beta: Option<f64>,
    pub tau: Option<f64>,
}

impl Default for ConceptOptions {
    fn default() -> Self {
        Self {
            scale: 1.0,
            layers: None,
            beta: None,
            tau: None,
        }
    }
}

/// What the denoising loop needs besides the initial latents.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub scheduler: SchedulerKind,
    pub karras: bool,
    pub steps: usize,
    pub guidance: f64,
    /// Rescales the guided prediction toward the text prediction's standard deviation (Lin et
    /// al. 2024, §3.4; diffusers' `guidance_rescale`): 0 = off, 0.7 the paper's choice for
    /// models trained with zero terminal SNR, whose guided samples otherwise overexpose.
    pub guidance_rescale: f64,
    pub clip_skip: usize,
    /// Regional prompts (latent couple / MultiDiffusion): each region's prompt predicts the
    /// noise inside its weight map, `prompt` the rest. Empty: one prompt for the whole image.
    pub region_prompts: Vec<RegionPrompt>,
    /// Show a progress bar.
    pub progress: bool,
}

/// One prompt of regional prompting and where it acts.
#[derive(Clone, Debug)]
pub struct RegionPrompt {
    pub prompt: String,
    /// `[1, 1, h, w]` on the latent grid, in [0, 1]: the share of this prompt's noise prediction
    /// at each latent pixel (soft edges blend it with its neighbours').
    pub weight: Tensor,
}

/// The per-pixel weights `[1 + k, 1, h, w]` that mix the noise predictions of the base prompt
/// and `k` region prompts. In the manner of MultiDiffusion (Bar-Tal et al. 2023, eq. 5: the
/// step's result at a pixel is the weighted mean of every region's) with the base prompt as a
/// region that fills what the others leave: base = max(0, 1 − Σ mᵢ), then every weight is divided
/// by max(1, Σ mᵢ), so the weights sum to 1 at each pixel and overlapping regions share it.
/// A region painted at 0.8 keeps 0.2 of the base prompt, as A1111's Latent Couple base ratio.
pub fn region_weights(regions: &[RegionPrompt]) -> Result<Tensor> {
    let first = &regions
        .first()
        .context("regional prompting needs at least one region")?
        .weight;
    let mut weights = Vec::with_capacity(regions.len());
    for r in regions {
        if r.weight.dims() != first.dims() {
            bail!(
                "region masks of \"{}\" and \"{}\" differ in size: {:?} vs {:?}",
                regions[0].prompt,
                r.prompt,
                first.dims(),
                r.weight.dims()
            )
        }
        weights.push(r.weight.to_dtype(DType::F32)?.clamp(0f32, 1f32)?);
    }
    let sum = Tensor::cat(&weights, 0)?.sum_keepdim(0)?;
    let base = (1.0 - &sum)?.relu()?;
    let total = sum.maximum(1f32)?;
    let mut all = vec![base];
    all.extend(weights);
    Ok(Tensor::cat(&all, 0)?.broadcast_div(&total)?)
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            scheduler: SchedulerKind::Ddim,
            karras: false,
            steps: 30,
            guidance: 7.5,
            guidance_rescale: 0.0,
            clip_skip: 0,
            region_prompts: vec![],
            progress: false,
        }
    }
}

/// What inpainting adds to the denoising loop (diffusers' `StableDiffusionInpaintPipeline`).
#[derive(Clone, Debug)]
pub struct Inpainting {
    /// `[1, 1, h, w]` on the latent grid, 1 = repaint.
    pub mask: Tensor,
    /// The init image's latents `[1, 4, h, w]`, scaled by the VAE's factor.
    pub image_latents: Tensor,
    /// The masked image's latents (image × (mask < 0.5), encoded and scaled): the extra UNet
    /// input of 9-channel inpainting models.
    pub masked_image_latents: Option<Tensor>,
    /// The noise that re-noises the kept region at each step (4-channel models).
    pub noise: Tensor,
}

/// img2img's starting image and how far to move from it.
#[derive(Clone, Debug)]
pub struct InitImage {
    pub path: PathBuf,
    /// 0 keeps the image, 1 ignores it (diffusers' `strength`).
    pub strength: f64,
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub scheduler: SchedulerKind,
    pub karras: bool,
    pub steps: usize,
    pub guidance: f64,
    /// See [`SampleOptions::guidance_rescale`].
    pub guidance_rescale: f64,
    pub clip_skip: usize,
    pub seed: u64,
    pub num_images: usize,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub init_image: Option<InitImage>,
    /// With `init_image`: repaint where this mask is white (inpainting).
    pub mask: Option<PathBuf>,
    /// Inpainting: paste the original pixels back outside the mask (off in diffusers).
    pub keep_unmasked: bool,
    /// Regional prompts: (prompt, mask image; white = the prompt's region, gray blends).
    pub region_prompts: Vec<(String, PathBuf)>,
    pub progress: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        let s = SampleOptions::default();
        Self {
            prompt: s.prompt,
            negative_prompt: None,
            scheduler: s.scheduler,
            karras: false,
            steps: s.steps,
            guidance: s.guidance,
            guidance_rescale: 0.0,
            clip_skip: 0,
            seed: 0,
            num_images: 1,
            width: None,
            height: None,
            init_image: None,
            mask: None,
            keep_unmasked: false,
            region_prompts: vec![],
            progress: false,
        }
    }
}

impl StableDiffusion {
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let text_encoder = folder.load_text_encoder(dtype, device)?;
        let tokenizer = folder.tokenizer()?;
        Ok(Self {
            tokenizer,
            text_encoder,
            unet: folder.load_unet(dtype, device)?,
            vae: folder.load_vae(dtype, device)?,
            scheduler_config: folder.scheduler_config()?,
            device: device.clone(),
            dtype,
            folder,
            concepts: Vec::new(),
            truncate_long_prompts: false,
            per_layer: PerLayerTokens::default(),
            perfusion: Vec::new(),
            perfusion_adapters: Vec::new(),
            image_prompt: None,
        })
    }

    /// Loads a concept file (any supported format) and applies it at `scale` (1 = as trained):
    /// its token embeddings become new tokens of the tokenizer and text encoder (later prompts are
    /// rewritten for them as diffusers' `maybe_convert_prompt` does), and its LoRA deltas are
    /// attached to the UNet's and text encoder's projections, scaled like diffusers'
    /// `set_adapters(.., adapter_weights=scale)`. Everything is checked before anything changes.
    pub fn apply_concept(&mut self, path: &Path, scale: f64) -> Result<()> {
        self.apply_concept_with(
            path,
            &ConceptOptions {
                scale,
                ..Default::default()
            },
        )
    }

    /// [`apply_concept`](Self::apply_concept) with layer restrictions and gate overrides.
    pub fn apply_concept_with(&mut self, path: &Path, options: &ConceptOptions) -> Result<()> {
        let concept = imprint_concepts::formats::load_any(path)?;
        self.apply_loaded_concept_with(&concept, options)
            .with_context(|| path.display().to_string())
    }

    /// [`apply_concept`](Self::apply_concept) for a concept already in memory.
    pub fn apply_loaded_concept(&mut self, concept: &Concept, scale: f64) -> Result<()> {
        self.apply_loaded_concept_with(
            concept,
            &ConceptOptions {
                scale,
                ..Default::default()
            },
        )
    }

    /// [`apply_loaded_concept`](Self::apply_loaded_concept) with layer restrictions and gate
    /// overrides. Perfusion edits of all applied concepts are realized together (the paper's
    /// Appendix B), so applying one re-attaches the others.
    pub fn apply_loaded_concept_with(
        &mut self,
        concept: &Concept,
        options: &ConceptOptions,
    ) -> Result<()> {
        let scale = options.scale;
        if !scale.is_finite() {
            bail!("scale {scale} is not a finite number")
        }
        // Every new word is checked before anything changes: a clash must not leave half a
        // concept applied.
        let mut names: Vec<String> = vec![];
        if concept.has_tokens() {
            names.extend(imprint_concepts::apply::token_names(
                &concept.trigger,
                concept.num_vectors(),
            ));
        }
        for (t, v) in &concept.extra_tokens {
            names.extend(imprint_concepts::apply::token_names(t, v.dim(0)?));
        }
        for (i, n) in names.iter().enumerate() {
            if self.tokenizer.token_id(n).is_some() || names[..i].contains(n) {
                bail!("concept '{}': token '{n}' is already in the tokenizer's vocabulary (is the concept applied twice, or does a trigger collide with a word?); rename it with `imprint concept convert --trigger`", concept.trigger)
            }
        }
        let keys = self.unet.embedding_keys();
        let only = match &options.layers {
            None => None,
            Some(spec) => {
                if !concept.has_tokens() {
                    bail!(
                        "--concept …@{spec}: concept '{}' has no words to restrict to layers",
                        concept.trigger
                    )
                }
                Some(select_layers(spec, &keys)?)
            }
        };
        let perfusion_edit =
            imprint_concepts::perfusion::with_gate(concept, options.beta, options.tau);
        if let Some(edit) = &perfusion_edit {
            edit.validate(concept.dim())?;
        }
        let mut unet_lora = None;
        let mut te_lora = None;
        for net in concept.lora.networks() {
            match net {
                UNET => unet_lora = Some(prepare_lora(&mut self.unet, UNET, &concept.lora)?),
                TEXT_ENCODER => {
                    te_lora = Some(prepare_lora(
                        &mut self.text_encoder,
                        TEXT_ENCODER,
                        &concept.lora,
                    )?)
                }
                other => bail!("the LoRA has weights for '{other}', which Stable Diffusion 1.x/2.x does not have: is it a LoRA for another architecture (SDXL)?"),
            }
        }
        // LyCORIS changes: computed and checked for both networks before any weight changes.
        if let Some(net) = concept
            .lycoris
            .iter()
            .map(|m| m.network.as_str())
            .find(|n| *n != UNET && *n != TEXT_ENCODER)
        {
            bail!("the LyCORIS file has weights for '{net}', which Stable Diffusion 1.x/2.x does not have: is it for another architecture (SDXL)?")
        }
        if let Some(p) = concept
            .projections
            .iter()
            .find(|p| p.network != UNET && p.network != TEXT_ENCODER)
        {
            bail!("the concept replaces weights of '{}', which Stable Diffusion 1.x/2.x does not have", p.network)
        }
        let te_lycoris = prepare_lycoris(
            &mut self.text_encoder,
            TEXT_ENCODER,
            &concept.lycoris,
            scale,
        )?;
        let unet_lycoris = prepare_lycoris(&mut self.unet, UNET, &concept.lycoris, scale)?;
        let te_weights = prepare_projections(
            &mut self.text_encoder,
            TEXT_ENCODER,
            &concept.projections,
            scale,
        )?;
        let unet_weights = prepare_projections(&mut self.unet, UNET, &concept.projections, scale)?;
        // SVDiff: σ + scale·δ (the SVDs come from the cache or are computed once per model).
        if let Some(s) = concept
            .spectral_shifts
            .iter()
            .find(|s| s.network != UNET && s.network != TEXT_ENCODER)
        {
            bail!(
                "the concept shifts weights of '{}', which Stable Diffusion 1.x/2.x does not have",
                s.network
            )
        }
        let te_tables = if concept
            .spectral_shifts
            .iter()
            .any(|s| s.network == TEXT_ENCODER)
        {
            imprint_concepts::spectral::embedding_weights(&self.text_encoder)?
        } else {
            Default::default()
        };
        let te_spectral = imprint_concepts::spectral::prepare_spectral(
            &mut self.text_encoder,
            te_tables,
            TEXT_ENCODER,
            &concept.spectral_shifts,
            scale,
        )?;
        let unet_spectral = imprint_concepts::spectral::prepare_spectral(
            &mut self.unet,
            Default::default(),
            UNET,
            &concept.spectral_shifts,
            scale,
        )?;
        // Further words (Custom Diffusion's joint modifier tokens) are checked as whole concepts.
        let extra: Vec<Concept> = concept
            .extra_tokens
            .iter()
            .map(|(t, v)| Concept::textual_inversion(t, v.clone()))
            .collect::<Result<_>>()?;
        let previous = self.perfusion.clone();
        if let Some(edit) = perfusion_edit {
            let mut set = previous.clone();
            set.push((edit, scale));
            self.set_perfusion(set)?;
        }
        let tokens = if !concept.layer_embeddings.is_empty() || only.is_some() {
            Some(self.per_layer.apply(
                &mut self.tokenizer,
                &mut self.text_encoder,
                concept,
                scale,
                &keys,
                only,
            ))
        } else if !concept.embeddings.is_empty() {
            Some(apply_textual_inversion(
                &mut self.tokenizer,
                &mut self.text_encoder,
                concept,
                scale,
            ))
        } else {
            None
        };
        match tokens {
            Some(Err(e)) => {
                if self.perfusion.len() != previous.len() {
                    self.set_perfusion(previous)?;
                }
                return Err(e);
            }
            Some(Ok(tokens)) => self.concepts.push((concept.trigger.clone(), tokens.len())),
            None => {}
        }
        for e in &extra {
            let tokens =
                apply_textual_inversion(&mut self.tokenizer, &mut self.text_encoder, e, scale)?;
            self.concepts.push((e.trigger.clone(), tokens.len()));
        }
        // The weight changes, checked above, go in once the words are in place.
        te_lycoris.apply(&mut self.text_encoder)?;
        unet_lycoris.apply(&mut self.unet)?;
        te_weights.apply(&mut self.text_encoder)?;
        unet_weights.apply(&mut self.unet)?;
        if let Some(c) = &te_spectral {
            c.apply(&mut self.text_encoder)?;
            c.apply_embeddings(&mut self.text_encoder)?;
        }
        if let Some(c) = &unet_spectral {
            c.apply(&mut self.unet)?;
        }
        if !(unet_lycoris.is_empty() && unet_weights.is_empty() && unet_spectral.is_none())
            && !self.perfusion.is_empty()
        {
            // Perfusion's edits read the projection weights: rebuild them on the new ones.
            self.set_perfusion(self.perfusion.clone())?;
        }
        if let Some(p) = unet_lora {
            p.attach(&mut self.unet, scale);
        }
        if let Some(p) = te_lora {
            p.attach(&mut self.text_encoder, scale);
        }
        Ok(())
    }

    /// Replaces the attached Perfusion edits by `set`, all realized together; on failure the
    /// previous set stays attached.
    fn set_perfusion(&mut self, set: Vec<(PerfusionEdit, f64)>) -> Result<()> {
        fn attach(
            unet: &mut UNet2DConditionModel,
            set: &[(PerfusionEdit, f64)],
        ) -> Result<Vec<Arc<dyn Adapter>>> {
            let edits: Vec<AppliedEdit> = set
                .iter()
                .map(|(edit, scale)| AppliedEdit {
                    edit,
                    scale: *scale,
                })
                .collect();
            apply_perfusion(unet, &edits)
        }
        detach_adapters(&mut self.unet, &self.perfusion_adapters);
        match attach(&mut self.unet, &set) {
            Ok(adapters) => {
                self.perfusion_adapters = adapters;
                self.perfusion = set;
                Ok(())
            }
            Err(e) => {
                self.perfusion_adapters = attach(&mut self.unet, &self.perfusion)?;
                Err(e)
            }
        }
    }

    /// A warning when concepts are applied but `prompt` uses none of their triggers.
    pub fn trigger_warning(&self, prompt: &str) -> Option<String> {
        missing_trigger_warning(prompt, &self.concepts)
    }

    /// Pixels per latent cell: 2^(VAE blocks − 1), 8 for Stable Diffusion.
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.vae.config.block_out_channels.len() - 1)
    }

    /// The model's native resolution: the UNet's `sample_size` in pixels.
    pub fn default_size(&self) -> usize {
        self.unet.config.sample_size.unwrap_or(64) * self.vae_scale_factor()
    }

    /// Token ids `[1, 77]` for a prompt; a prompt longer than the text encoder takes is an error
    /// (rather than silently cut, as the reference does with a warning).
    /// Multi-vector concept triggers are expanded first (`<t>` → `<t> <t>_1 …`).
    pub fn tokenize(&self, prompt: &str) -> Result<Tensor> {
        let expanded = expand_prompt(prompt, &self.concepts);
        let prompt = expanded.as_str();
        let max = self.tokenizer.model_max_length();
        let n = self.tokenizer.encode_unpadded(prompt)?.len();
        if n > max {
            if !self.truncate_long_prompts {
                bail!("prompt is {n} tokens long; the text encoder takes at most {max} (including start and end): shorten it")
            }
            eprintln!("warning: prompt is {n} tokens long; only the first {max} (including start and end) are used");
        }
        let ids = self.tokenizer.encode(prompt)?;
        Ok(Tensor::from_vec(
            ids.into_iter().map(|i| i as i64).collect::<Vec<_>>(),
            (1, max),
            &self.device,
        )?)
    }

    /// Text states `[1, 77, D]` for a prompt (one per cross-attention layer when it names a
    /// per-layer concept).
    pub fn encode_prompt(&self, prompt: &str, clip_skip: usize) -> Result<TextStates> {
        let ids = self.tokenize(prompt)?;
        self.encode_ids(&ids, clip_skip)
    }

    /// Text states for token ids `[B, 77]`, through the applied per-layer concepts.
    pub fn encode_ids(&self, ids: &Tensor, clip_skip: usize) -> Result<TextStates> {
        if self.per_layer.is_empty() {
            return Ok(TextStates::Shared(
                self.text_encoder.forward(ids, clip_skip)?.last_hidden_state,
            ));
        }
        self.per_layer.encode(
            &self.text_encoder,
            ids,
            clip_skip,
            self.unet.num_cross_attention_layers,
        )
    }

    pub fn build_scheduler(
        &self,
        kind: SchedulerKind,
        steps: usize,
        karras: bool,
    ) -> Result<Box<dyn Scheduler>> {
        schedulers::build(kind, &self.scheduler_config, steps, karras)
    }

    /// The text states the denoising loop attends to: `[negative; prompt; region prompts…]`
    /// (the negative one only when guided).
    pub fn prompt_context(&self, opts: &SampleOptions) -> Result<TextStates> {
        let mut states = vec![];
        if opts.guidance > 1.0 {
            // diffusers applies clip skip to the prompt only; the negative prompt takes the last layer.
            let uncond = self.encode_prompt(opts.negative_prompt.as_deref().unwrap_or(""), 0)?;
            states.push(self.with_image_prompt(uncond, false)?);
        }
        let prompts = std::iter::once(opts.prompt.as_str())
            .chain(opts.region_prompts.iter().map(|r| r.prompt.as_str()));
        for prompt in prompts {
            let cond = self
                .encode_prompt(prompt, opts.clip_skip)
                .with_context(|| format!("the prompt \"{prompt}\""))?;
            states.push(self.with_image_prompt(cond, true)?);
        }
        if states.len() == 1 {
            return Ok(states.pop().expect("one state"));
        }
        Ok(TextStates::cat(&states.iter().collect::<Vec<_>>())?)
    }

    /// Attaches a loaded image prompt: every cross-attention layer gets the adapter's image
    /// branch, and every prompt's text states get its image tokens.
    pub fn apply_image_prompt(&mut self, prompt: &crate::ip_adapter::ImagePrompt) -> Result<()> {
        if self.image_prompt.is_some() {
            bail!(
                "one IP-Adapter at a time: {} would be the second",
                prompt.path().display()
            )
        }
        prompt.attach(&mut self.unet)?;
        self.image_prompt = Some(prompt.tokens.clone());
        Ok(())
    }

    /// Regional prompting (`--region WORD:MASK`): in every cross-attention layer, pixels outside
    /// a region's mask (white = inside, at `width × height` pixels, binarized at 0.5 and
    /// sampled to the latents) do not attend to that word's tokens in `prompt`. `guided`: the
    /// batch holds `[uncond; cond]`, and only the conditional row is masked.
    pub fn set_regions(
        &mut self,
        prompt: &str,
        regions: &[(String, PathBuf)],
        width: usize,
        height: usize,
        guided: bool,
    ) -> Result<()> {
        let ids: Vec<i64> = self.tokenize(prompt)?.flatten_all()?.to_vec1()?;
        let factor = self.vae_scale_factor();
        let mut masks = vec![];
        for (word, path) in regions {
            let tokens = self
                .word_positions(&ids, word)
                .with_context(|| format!("--region: in the prompt \"{prompt}\""))?;
            let (_, latent) =
                crate::image_io::read_mask(path, width, height, factor, &self.device)?;
            let mask = latent.squeeze(0)?.squeeze(0)?;
            masks.push(imprint_models::attention::RegionMask {
                tokens,
                mask,
                rows: vec![usize::from(guided)],
            });
        }
        for (_, block) in self.unet.transformer_blocks_in_processor_order_mut() {
            block.attn2.regions = masks.clone();
        }
        Ok(())
    }

    /// Appends the image prompt's tokens (negative or positive) to text states.
    /// Positions of `word`'s tokens (applied concepts expanded) at every place they occur in a
    /// prompt's token ids; an error if it has no tokens or does not occur.
    pub fn word_positions(&self, ids: &[i64], word: &str) -> Result<Vec<usize>> {
        let expanded = expand_prompt(word, &self.concepts);
        let word_ids: Vec<i64> = self
            .tokenizer
            .tokenize(&expanded)
            .into_iter()
            .map(|i| i as i64)
            .collect();
        if word_ids.is_empty() {
            bail!("'{word}' has no tokens")
        }
        let mut tokens = vec![];
        for start in 0..ids.len().saturating_sub(word_ids.len() - 1) {
            if ids[start..start + word_ids.len()] == word_ids[..] {
                tokens.extend(start..start + word_ids.len());
            }
        }
        if tokens.is_empty() {
            bail!("'{word}' does not occur")
        }
        Ok(tokens)
    }

    /// Appends the image prompt's tokens, if any, to `states` (the negative ones unless `positive`).
    pub fn with_image_prompt(&self, states: TextStates, positive: bool) -> Result<TextStates> {
        let Some((neg, pos)) = &self.image_prompt else {
            return Ok(states);
        };
        let tokens = if positive { pos } else { neg };
        let append = |t: &Tensor| -> Result<Tensor> {
            let b = t.dim(0)?;
            let tok = tokens.to_dtype(t.dtype())?;
            let tok = tok.broadcast_as((b, tok.dim(1)?, tok.dim(2)?))?;
            Ok(Tensor::cat(&[t, &tok], 1)?)
        };
        Ok(match states {
            TextStates::Shared(t) => TextStates::Shared(append(&t)?),
            TextStates::PerLayer(ts) => {
                TextStates::PerLayer(ts.iter().map(append).collect::<Result<_>>()?)
            }
        })
    }

    /// The guided denoising loop from `latents` (already at the noise level of step `begin`) to
    /// the final latents.
    pub fn denoise(
        &self,
        opts: &SampleOptions,
        scheduler: &mut dyn Scheduler,
        latents: Tensor,
        begin: usize,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let context = self.prompt_context(opts)?;
        self.denoise_with_context(opts, scheduler, latents, begin, noise, &context)
    }

    /// [`Self::denoise`] with the text states given (`[uncond; prompt; region prompts…]`, the
    /// negative row only when `opts.guidance > 1`): training validation passes states computed
    /// through trainable embeddings.
    pub fn denoise_with_context(
        &self,
        opts: &SampleOptions,
        scheduler: &mut dyn Scheduler,
        latents: Tensor,
        begin: usize,
        noise: &mut dyn NoiseSource,
        context: &TextStates,
    ) -> Result<Tensor> {
        self.denoise_loop(opts, scheduler, latents, begin, noise, context, None)
    }

    /// The guided loop, with inpainting's extra inputs and blending when given.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_loop(
        &self,
        opts: &SampleOptions,
        scheduler: &mut dyn Scheduler,
        latents: Tensor,
        begin: usize,
        noise: &mut dyn NoiseSource,
        context: &TextStates,
        inpaint: Option<&Inpainting>,
    ) -> Result<Tensor> {
        let guided = opts.guidance > 1.0;
        let nine = self.unet.config.in_channels == 9;
        // Batch rows: [uncond (when guided); prompt; region prompts…].
        let conds = 1 + opts.region_prompts.len();
        let rows = usize::from(guided) + conds;
        let repeated = |t: &Tensor| -> Result<Tensor> {
            Ok(if rows == 1 {
                t.clone()
            } else {
                Tensor::cat(&vec![t; rows], 0)?
            })
        };
        let context_rows = context.layer(0)?.dim(0)?;
        if context_rows != rows {
            bail!("the text states hold {context_rows} prompts; this sampling needs {rows} (negative, prompt and region prompts)")
        }
        let region_weights = if opts.region_prompts.is_empty() {
            None
        } else {
            let w = region_weights(&opts.region_prompts)?;
            let (_, _, h, wd) = latents.dims4()?;
            if w.dims()[2..] != [h, wd] {
                bail!(
                    "region masks are {:?} on the latent grid, the latents {h}×{wd}",
                    &w.dims()[2..]
                )
            }
            Some(w.to_dtype(latents.dtype())?)
        };
        let extra = match (inpaint, nine) {
            (Some(p), true) => {
                let masked = p.masked_image_latents.as_ref().context(
                    "a 9-channel inpainting UNet needs the masked image's latents",
                )?;
                let mask = p.mask.to_dtype(masked.dtype())?;
                Some(Tensor::cat(&[repeated(&mask)?, repeated(masked)?], 1)?)
            }
            (None, true) => bail!("this UNet has 9 input channels (an inpainting model): give --init-image and --mask"),
            _ => None,
        };
        let timesteps = scheduler.timesteps().to_vec();
        let bar = if opts.progress {
            ProgressBar::new((timesteps.len() - begin) as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} steps, {elapsed} elapsed, ETA {eta}",
        )?);
        bar.set_message("denoising");
        let mut latents = latents;
        for (i, &t) in timesteps.iter().enumerate().skip(begin) {
            let model_in = scheduler.scale_model_input(&repeated(&latents)?, i)?;
            let model_in = match &extra {
                Some(e) => Tensor::cat(&[&model_in, &e.to_dtype(model_in.dtype())?], 1)?,
                None => model_in,
            };
            let t_tensor = Tensor::new(t as f32, &self.device)?;
            let pred = self
                .unet
                .forward(&model_in, &t_tensor, context.conditioning())?;
            let cond = pred.narrow(0, usize::from(guided), conds)?;
            let text = match &region_weights {
                // Each prompt's prediction where its region lies (the weights sum to 1).
                Some(w) => cond.broadcast_mul(w)?.sum_keepdim(0)?,
                None => cond,
            };
            let pred = if guided {
                let uncond = pred.narrow(0, 0, 1)?;
                let guided = (&uncond + ((&text - &uncond)? * opts.guidance)?)?;
                rescale_guidance(&guided, &text, opts.guidance_rescale)?
            } else {
                text
            };
            latents = scheduler.step(&pred, i, &latents, noise)?;
            if let (Some(p), false) = (inpaint, nine) {
                // Regular models: the kept region follows the image, noised to the next step.
                let proper = if i + 1 < timesteps.len() {
                    scheduler.add_noise(&p.image_latents, &p.noise, i + 1)?
                } else {
                    p.image_latents.clone()
                };
                let m = p.mask.to_dtype(latents.dtype())?;
                latents = (proper.broadcast_mul(&(1.0 - &m)?)? + latents.broadcast_mul(&m)?)?;
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(latents)
    }

    /// txt2img from unit-variance initial noise `[1, 4, h, w]`: scales it by the scheduler's initial
    /// sigma and denoises all steps. Returns the final (scaled) latents.
    pub fn sample(
        &self,
        opts: &SampleOptions,
        initial_noise: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let mut scheduler = self.build_scheduler(opts.scheduler, opts.steps, opts.karras)?;
        let latents = (initial_noise.to_dtype(self.dtype)? * scheduler.init_noise_sigma())?;
        self.denoise(opts, scheduler.as_mut(), latents, 0, noise)
    }

    /// Inpainting from unit-variance noise, as diffusers' inpainting pipeline given `latents`:
    /// the noise scaled by the scheduler's initial sigma, the last `int(steps · strength)` steps
    /// run. (Without given latents, diffusers starts a strength < 1 run from the noised image:
    /// [`Self::generate`] does that.)
    pub fn sample_inpaint(
        &self,
        opts: &SampleOptions,
        strength: f64,
        initial_noise: &Tensor,
        inpaint: &Inpainting,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let mut scheduler = self.build_scheduler(opts.scheduler, opts.steps, opts.karras)?;
        let begin = self.strength_begin(scheduler.as_ref(), opts.steps, strength)?;
        let latents = (initial_noise.to_dtype(self.dtype)? * scheduler.init_noise_sigma())?;
        let context = self.prompt_context(opts)?;
        self.denoise_loop(
            opts,
            scheduler.as_mut(),
            latents,
            begin,
            noise,
            &context,
            Some(inpaint),
        )
    }

    /// The first step a strength runs from (diffusers' `get_timesteps`); at least one step runs.
    fn strength_begin(
        &self,
        scheduler: &dyn Scheduler,
        steps: usize,
        strength: f64,
    ) -> Result<usize> {
        if !(0.0..=1.0).contains(&strength) {
            bail!("--strength must be within [0, 1] (got {strength})")
        }
        let n = scheduler.timesteps().len();
        let run = ((steps as f64 * strength) as usize).min(n);
        if run == 0 {
            bail!("--strength {strength} with {steps} steps runs no step: raise one of them")
        }
        Ok(n - run)
    }

    /// Inpainting inputs from an image `[1, 3, H, W]` and a mask file: the latent mask, the pixel
    /// mask, and the latents of the image and of the masked image (encoded with noise from `rng`).
    pub fn inpainting_inputs(
        &self,
        pixels: &Tensor,
        mask_path: &Path,
        width: usize,
        height: usize,
        rng: &mut SeededNoise,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let f = self.vae_scale_factor();
        let (full, latent) = image_io::read_mask(mask_path, width, height, f, &self.device)?;
        let encode = |x: &Tensor, rng: &mut SeededNoise| -> Result<Tensor> {
            let dist = self.vae.encode(x)?;
            let eps = rng
                .randn(dist.mean.shape().clone(), &self.device)?
                .to_dtype(self.dtype)?;
            self.vae.scale_latents(&dist.sample(&eps)?)
        };
        let image_latents = encode(pixels, rng).context("encoding the init image")?;
        let keep = (1.0 - &full)?.to_dtype(self.dtype)?;
        let masked =
            encode(&pixels.broadcast_mul(&keep)?, rng).context("encoding the masked image")?;
        Ok((latent, full, image_latents, masked))
    }

    /// Latents → pixels `[1, 3, H, W]` in about [−1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode(&self.vae.unscale_latents(latents)?)
    }

    /// Regional prompts from (prompt, mask image) pairs, their masks read soft on the latent grid
    /// of a `width × height` picture.
    pub fn read_region_prompts(
        &self,
        regions: &[(String, PathBuf)],
        width: usize,
        height: usize,
    ) -> Result<Vec<RegionPrompt>> {
        let f = self.vae_scale_factor();
        regions
            .iter()
            .map(|(prompt, path)| {
                Ok(RegionPrompt {
                    prompt: prompt.clone(),
                    weight: image_io::read_weight_map(path, width, height, f, &self.device)
                        .with_context(|| format!("the region of \"{prompt}\""))?,
                })
            })
            .collect()
    }

    /// Generates `num_images` images; image `i` uses seed `seed + i`, so each is reproducible alone.
    pub fn generate(&self, o: &GenerateOptions) -> Result<Vec<RgbImage>> {
        let f = self.vae_scale_factor();
        let init_rgb = match &o.init_image {
            Some(init) => Some(image_io::read_rgb(&init.path)?),
            None => None,
        };
        // Default size: the init image's, rounded down to the latent grid (diffusers'
        // `get_default_height_width`), else the model's native size.
        let (default_w, default_h) = match &init_rgb {
            Some(img) => (
                (img.width() as usize / f) * f,
                (img.height() as usize / f) * f,
            ),
            None => (self.default_size(), self.default_size()),
        };
        let width = o.width.unwrap_or(default_w);
        let height = o.height.unwrap_or(default_h);
        if width % f != 0 || height % f != 0 || width == 0 || height == 0 {
            bail!("width and height must be positive multiples of {f} (got {width}×{height})")
        }
        if o.num_images == 0 {
            bail!("--num-images must be at least 1")
        }
        let init = match (&o.init_image, &init_rgb) {
            (Some(init), Some(rgb)) => {
                if !(0.0..=1.0).contains(&init.strength) {
                    bail!("--strength must be within [0, 1] (got {})", init.strength)
                }
                Some((
                    image_io::rgb_to_tensor(rgb, width, height, &self.device)?
                        .to_dtype(self.dtype)?,
                    init.strength,
                ))
            }
            _ => None,
        };
        let region_prompts = self.read_region_prompts(&o.region_prompts, width, height)?;
        let opts = SampleOptions {
            prompt: o.prompt.clone(),
            negative_prompt: o.negative_prompt.clone(),
            scheduler: o.scheduler,
            karras: o.karras,
            steps: o.steps,
            guidance: o.guidance,
            guidance_rescale: o.guidance_rescale,
            clip_skip: o.clip_skip,
            region_prompts,
            progress: o.progress,
        };
        let latent_shape = (1, self.unet.config.out_channels, height / f, width / f);
        let mut images = Vec::with_capacity(o.num_images);
        for i in 0..o.num_images {
            let mut rng = SeededNoise::new(o.seed.wrapping_add(i as u64));
            let latents = match (&init, &o.mask) {
                (None, Some(_)) => bail!("--mask needs --init-image (the picture to repaint)"),
                (None, None) => {
                    let initial = rng.randn(latent_shape, &self.device)?;
                    self.sample(&opts, &initial, &mut rng)?
                }
                (Some((pixels, strength)), None) => {
                    self.img2img(&opts, pixels, *strength, &mut rng)?
                }
                (Some((pixels, strength)), Some(mask)) => {
                    let (latent_mask, full, image_latents, masked) =
                        self.inpainting_inputs(pixels, mask, width, height, &mut rng)?;
                    let noise = rng
                        .randn(latent_shape, &self.device)?
                        .to_dtype(self.dtype)?;
                    let inpaint = Inpainting {
                        mask: latent_mask,
                        image_latents: image_latents.clone(),
                        masked_image_latents: Some(masked),
                        noise: noise.clone(),
                    };
                    let mut scheduler =
                        self.build_scheduler(opts.scheduler, opts.steps, opts.karras)?;
                    let begin = self.strength_begin(scheduler.as_ref(), opts.steps, *strength)?;
                    // diffusers: pure noise at strength 1, else the image noised to the start.
                    let start = if *strength >= 1.0 {
                        (&noise * scheduler.init_noise_sigma())?
                    } else {
                        scheduler.add_noise(&image_latents, &noise, begin)?
                    };
                    let context = self.prompt_context(&opts)?;
                    let latents = self.denoise_loop(
                        &opts,
                        scheduler.as_mut(),
                        start,
                        begin,
                        &mut rng,
                        &context,
                        Some(&inpaint),
                    )?;
                    if o.keep_unmasked {
                        let decoded = self.decode(&latents)?;
                        let m = full.to_dtype(decoded.dtype())?;
                        let pasted =
                            (pixels.broadcast_mul(&(1.0 - &m)?)? + decoded.broadcast_mul(&m)?)?;
                        images.push(image_io::tensor_to_rgb(&pasted)?);
                        continue;
                    }
                    latents
                }
            };
            images.push(image_io::tensor_to_rgb(&self.decode(&latents)?)?);
        }
        Ok(images)
    }

    /// img2img: encodes the image, noises it to the step that `strength` selects, and denoises the
    /// remaining steps (diffusers' `get_timesteps`: `int(steps · strength)` steps are run).
    pub fn img2img(
        &self,
        opts: &SampleOptions,
        pixels: &Tensor,
        strength: f64,
        rng: &mut SeededNoise,
    ) -> Result<Tensor> {
        let mut scheduler = self.build_scheduler(opts.scheduler, opts.steps, opts.karras)?;
        let n = scheduler.timesteps().len();
        let run = ((opts.steps as f64 * strength) as usize).min(n);
        let begin = n - run;
        let dist = self.vae.encode(pixels).context("encoding the init image")?;
        let eps = rng
            .randn(dist.mean.shape().clone(), &self.device)?
            .to_dtype(self.dtype)?;
        let init_latents = self.vae.scale_latents(&dist.sample(&eps)?)?;
        if run == 0 {
            return Ok(init_latents);
        }
        let noise = rng
            .randn(init_latents.shape().clone(), &self.device)?
            .to_dtype(self.dtype)?;
        let latents = scheduler.add_noise(&init_latents, &noise, begin)?;
        self.denoise(opts, scheduler.as_mut(), latents, begin, rng)
    }
}

/// diffusers' `rescale_noise_cfg` (Lin et al. 2024, eq. 15–16): the guided prediction scaled to
/// the text prediction's standard deviation (unbiased, over all but the batch axis), mixed with
/// the unscaled one by `phi`.
pub fn rescale_guidance(guided: &Tensor, text: &Tensor, phi: f64) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&phi) {
        bail!("--guidance-rescale must lie in [0, 1] (got {phi})")
    }
    if phi == 0.0 {
        return Ok(guided.clone());
    }
    let std = |x: &Tensor| -> Result<Tensor> {
        let flat = x.flatten_from(1)?.to_dtype(DType::F32)?;
        let n = flat.dim(1)?;
        let centered = flat.broadcast_sub(&flat.mean_keepdim(1)?)?;
        Ok((centered.sqr()?.sum_keepdim(1)? / (n.max(2) - 1) as f64)?.sqrt()?)
    };
    let ratio = (std(text)? / std(guided)?)?.to_dtype(guided.dtype())?;
    let mut shape = vec![guided.dim(0)?];
    shape.extend(std::iter::repeat_n(1, guided.rank() - 1));
    let rescaled = guided.broadcast_mul(&ratio.reshape(shape)?)?;
    Ok(((rescaled * phi)? + (guided * (1.0 - phi))?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_weights_sum_to_one_and_the_base_fills_the_rest() -> Result<()> {
        let dev = Device::Cpu;
        // One row of four latent pixels: region a covers 1, 1, 0.5, 0; region b 0, 1, 0.25, 0.
        let region = |w: [f32; 4]| -> Result<RegionPrompt> {
            Ok(RegionPrompt {
                prompt: "x".into(),
                weight: Tensor::new(&w, &dev)?.reshape((1, 1, 1, 4))?,
            })
        };
        let w = region_weights(&[
            region([1.0, 1.0, 0.5, 0.0])?,
            region([0.0, 1.0, 0.25, 0.0])?,
        ])?;
        assert_eq!(w.dims(), &[3, 1, 1, 4]);
        let rows: Vec<Vec<f32>> = w.flatten_from(1)?.to_vec2()?;
        let want = [
            [0.0, 0.0, 0.25, 1.0], // base: what the regions leave
            [1.0, 0.5, 0.5, 0.0],  // a: shares the overlap with b
            [0.0, 0.5, 0.25, 0.0], // b
        ];
        for (got, want) in rows.iter().zip(want) {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{rows:?}");
            }
        }
        let mut other = region([1.0; 4])?;
        other.weight = Tensor::ones((1, 1, 2, 2), DType::F32, &dev)?;
        assert!(region_weights(&[region([1.0; 4])?, other]).is_err());
        assert!(region_weights(&[]).is_err());
        Ok(())
    }

    #[test]
    fn guidance_rescale_matches_the_formula() -> Result<()> {
        let dev = Device::Cpu;
        let guided = Tensor::new(&[[[1f32, 3.0], [5.0, 7.0]]], &dev)?;
        let text = Tensor::new(&[[[0f32, 1.0], [0.0, 1.0]]], &dev)?;
        // Unbiased standard deviations: guided sqrt(20/3), text sqrt(1/3).
        let ratio = (1.0f64 / 20.0).sqrt();
        let got: Vec<f32> = rescale_guidance(&guided, &text, 0.7)?
            .flatten_all()?
            .to_vec1()?;
        for (g, x) in got.iter().zip([1.0, 3.0, 5.0, 7.0]) {
            let want = 0.7 * x * ratio + 0.3 * x;
            assert!((*g as f64 - want).abs() < 1e-5, "{g} vs {want}");
        }
        // Each batch row is rescaled by its own spread.
        let pair = Tensor::cat(&[&guided, &(&guided * 10.0)?], 0)?;
        let texts = Tensor::cat(&[&text, &text], 0)?;
        let rows: Vec<Vec<f32>> = rescale_guidance(&pair, &texts, 1.0)?
            .flatten_from(1)?
            .to_vec2()?;
        for (i, x) in [1.0f64, 3.0, 5.0, 7.0].iter().enumerate() {
            assert!((rows[0][i] as f64 - x * ratio).abs() < 1e-5);
            assert!((rows[1][i] as f64 - x * ratio).abs() < 1e-5);
        }
        assert!(rescale_guidance(&guided, &text, 1.5).is_err());
        let off: Vec<f32> = rescale_guidance(&guided, &text, 0.0)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(off, vec![1.0, 3.0, 5.0, 7.0]);
        Ok(())
    }
}
