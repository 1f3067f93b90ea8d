//! Run configuration: every training run is described by one of these, read from `--config
//! FILE.toml` (keys spelled as the command-line flags) with flags on top, and written beside the
//! output as the configuration actually used.

use crate::lr_schedule::LrSchedule;
use crate::methods::textual_inversion as ti;
use crate::optim::AdamWConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Options every method's trainer shares.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct TrainerOptions {
    pub model: PathBuf,
    pub images: PathBuf,
    pub out: PathBuf,
    pub steps: usize,
    pub lr: f64,
    /// Multiply `lr` by batch size × accumulation (diffusers' `--scale_lr`, on by default there).
    pub scale_lr: bool,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub resolution: usize,
    pub lr_schedule: LrSchedule,
    pub lr_warmup_steps: usize,
    /// `center` or `random` crop of the resized image.
    pub crop: String,
    /// Random horizontal flips.
    pub flip: bool,
    pub seed: u64,
    /// Write a resumable checkpoint every this many steps (0: only at the end or on interrupt).
    pub save_every: usize,
    pub resume: Option<PathBuf>,
    pub validation_prompt: Option<String>,
    pub validation_every: usize,
    pub num_validation_images: usize,
    pub validation_steps: usize,
    /// An IP-Adapter (`FILE[:SCALE]`, h94 layout) for the validation images only: it is attached
    /// to a copy of the model at each validation, so training never sees it.
    #[serde(default)]
    pub validation_ip_adapter: Option<String>,
    /// The validation's image prompt (repeatable; embeddings averaged).
    #[serde(default)]
    pub validation_ip_image: Vec<PathBuf>,
    /// The adapter's image encoder, if not `image_encoder/` beside the adapter file.
    #[serde(default)]
    pub validation_image_encoder: Option<PathBuf>,
    pub max_grad_norm: Option<f64>,
    /// Recompute UNet blocks in the backward pass instead of keeping their activations.
    pub gradient_checkpointing: bool,
    /// Update each weight inside a checkpointed block as soon as its gradient exists, so the
    /// gradients of the whole UNet never exist at once (kohya's `fused_backward_pass`). Needs
    /// gradient checkpointing, one micro-batch per step and no global-norm clipping.
    pub fused_backward: bool,
    /// Mixed precision, as diffusers' `--mixed_precision`: `no` (f32 throughout), `fp16` or
    /// `bf16`: the UNet's frozen weights and its activations in half precision; trainable
    /// weights, their gradients and the AdamW state in f32; fp16 with dynamic loss scaling.
    #[serde(default = "default_mixed_precision")]
    pub mixed_precision: String,
    /// Min-SNR loss weighting (Hang et al. 2023) with this γ (5 is the paper's choice).
    pub snr_gamma: Option<f64>,
    /// Adds `offset · N(0, 1)` per sample and channel to the noise (brighter/darker images).
    pub noise_offset: f64,
    /// Restrict the loss to the subject where an `IMAGE.mask.png` exists.
    pub use_masks: bool,
    /// Train an inpainting model (9-channel UNet): random rectangle/ellipse masks, the masked
    /// image's latents as extra input, as diffusers' DreamBooth-inpaint script.
    pub inpainting: bool,
    /// Prior preservation (DreamBooth, Ruiz et al. 2023): the class prompt, e.g. "a photo of a dog".
    pub class_prompt: Option<String>,
    /// Folder of class images; missing ones are generated with the base model first.
    pub class_images: Option<PathBuf>,
    pub num_class_images: usize,
    /// Weight of the class (prior) loss.
    pub prior_weight: f64,
    /// Cut-Mix-Unmix (SVDiff, Han et al. 2023, §3.3): a second subject's images, trained jointly
    /// with `images`' subject, plus cut-mix images of the two side by side.
    #[serde(default)]
    pub second_images: Option<PathBuf>,
    /// The caption of the second subject's images without an `IMAGE.txt`.
    #[serde(default)]
    pub second_instance_prompt: Option<String>,
    /// The phrases naming the two subjects in cut-mix captions, e.g. ["sks dog", "zwx cat"].
    #[serde(default)]
    pub subjects: Option<Vec<String>>,
    /// The cut-mix caption, with `{left}` and `{right}` (default [`DEFAULT_CUT_MIX_PROMPT`]).
    #[serde(default)]
    pub cut_mix_prompt: Option<String>,
    /// Share of training samples drawn from the cut-mix images (default
    /// [`DEFAULT_CUT_MIX_PROB`]).
    #[serde(default)]
    pub cut_mix_prob: Option<f64>,
    /// Weight of the unmix regularizer on the cut-mix samples (default [`DEFAULT_UNMIX_WEIGHT`]).
    #[serde(default)]
    pub unmix_weight: Option<f64>,
    pub adam: AdamWConfig,
    /// cpu, cuda, cuda:N or metal.
    pub device: String,
}

/// The cut-mix caption of SVDiff's paper ("photo of a [V1] dog on the left and a [V2] sculpture on
/// the right").
pub const DEFAULT_CUT_MIX_PROMPT: &str =
    "a photo of a {left} on the left and a {right} on the right";
/// Half of the samples are cut-mix images (our choice; the paper does not give one).
pub const DEFAULT_CUT_MIX_PROB: f64 = 0.5;
/// Weight of the unmix term against the diffusion loss (our choice, measured in the world bench).
pub const DEFAULT_UNMIX_WEIGHT: f64 = 1.0;

/// `imprint train textual-inversion`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct TextualInversionConfig {
    pub token: String,
    pub init_word: String,
    pub num_vectors: usize,
    /// `object` or `style` caption templates.
    pub templates: String,
    /// Start from this concept file's vectors instead of the init word's (e.g. an encoder's
    /// output, refined by `imprint personalize --tune-steps`).
    #[serde(default)]
    pub init_concept: Option<std::path::PathBuf>,
    #[serde(flatten)]
    pub trainer: TrainerOptions,
}

/// `imprint train perfusion`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct PerfusionConfig {
    pub token: String,
    /// The class word keys are locked to (e.g. "toy"); the word's embedding starts at it.
    pub superclass: String,
    /// `object` or `style` caption templates.
    pub templates: String,
    /// Learning rate of the value target outputs `o*_V` (`lr` is the embedding's).
    pub value_lr: f64,
    /// The gate's bias and temperature during training.
    pub beta: f64,
    pub tau: f64,
    #[serde(flatten)]
    pub trainer: TrainerOptions,
}

/// The defaults of a Perfusion run (the paper's).
pub fn perfusion_defaults() -> toml::Table {
    use crate::methods::perfusion as p;
    let mut t = common_defaults();
    let own: toml::Table = format!(
        r#"
templates = "object"
value-lr = {value_lr:e}
beta = {beta}
tau = {tau}
steps = {steps}
lr = {lr:e}
scale-lr = false
batch-size = {batch}
grad-accum = {accum}
"#,
        value_lr = p::DEFAULT_VALUE_LR,
        beta = p::TRAIN_BETA,
        tau = p::TRAIN_TAU,
        steps = p::DEFAULT_STEPS,
        lr = p::DEFAULT_LR,
        batch = p::DEFAULT_BATCH,
        accum = p::DEFAULT_GRAD_ACCUM,
    )
    .parse()
    .expect("valid defaults");
    merge(&mut t, own);
    t
}

/// `imprint train custom-diffusion`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct CustomDiffusionConfig {
    /// The modifier tokens, e.g. ["<new1>"]; several train jointly.
    pub token: Vec<String>,
    /// One single-token word per modifier token (default "ktn", "pll", "ucd").
    pub init_word: Vec<String>,
    /// The caption of every image without an `IMAGE.txt`, e.g. "a photo of <new1> cat".
    pub instance_prompt: Option<String>,
    /// Also train the cross-attention query and output projections (`--freeze_model crossattn`).
    pub train_q_out: bool,
    /// Custom Diffusion's resize augmentation and mask-normalized loss.
    pub augment: bool,
    /// Store the native file's weight changes as rank-R truncated SVDs.
    pub rank: Option<usize>,
    #[serde(flatten)]
    pub trainer: TrainerOptions,
}

/// The defaults of a Custom Diffusion run (diffusers' script, as its README runs it).
pub fn custom_diffusion_defaults() -> toml::Table {
    use crate::methods::custom_diffusion as c;
    let mut t = common_defaults();
    let own: toml::Table = format!(
        "token = []\ninit-word = []\ntrain-q-out = false\naugment = true\nsteps = {}\nlr = {:e}\nscale-lr = true\nbatch-size = {}\ngrad-accum = 1\nmax-grad-norm = 1.0\n",
        c::DEFAULT_STEPS,
        c::DEFAULT_LR,
        c::DEFAULT_BATCH
    )
    .parse()
    .expect("valid defaults");
    merge(&mut t, own);
    t
}

/// `imprint train lora`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct LoraConfig {
    /// The caption of every image without an `IMAGE.txt`, e.g. "a photo of sks dog".
    pub instance_prompt: Option<String>,
    pub rank: usize,
    /// Defaults to the rank (a delta scale of 1).
    pub alpha: Option<f64>,
    /// Comma-separated module names (trailing paths) of the UNet projections to adapt.
    pub targets: String,
    /// Also adapt the text encoder's attention and MLP projections.
    pub train_text_encoder: bool,
    /// LoRA dropout on the adapter input (0 only, for now).
    pub dropout: f64,
    #[serde(flatten)]
    pub trainer: TrainerOptions,
}

/// SVDiff: DreamBooth's data and prior preservation, spectral shifts trained.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct SvdiffConfig {
    /// The caption of every image without an `IMAGE.txt`, e.g. "a photo of sks dog".
    pub instance_prompt: Option<String>,
    /// Also shift the text encoder's singular values.
    pub train_text_encoder: bool,
    /// The rare word that names the subject in the instance prompt ("sks"), recorded as the
    /// concept's trigger; guessed from the prompt when absent.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(flatten)]
    pub trainer: TrainerOptions,
}

/// The defaults of an SVDiff run (svdiff-pytorch's README).
pub fn svdiff_defaults() -> toml::Table {
    use crate::methods::svdiff as s;
    let mut t = common_defaults();
    let own: toml::Table = format!(
        "train-text-encoder = false\nsteps = {}\nlr = {:e}\nscale-lr = false\nbatch-size = 1\ngrad-accum = 1\n",
        s::DEFAULT_STEPS,
        s::DEFAULT_LR
    )
    .parse()
    .expect("valid defaults");
    merge(&mut t, own);
    t
}

/// The defaults of a LoRA run (diffusers' `train_dreambooth_lora.py` recipe).
pub fn lora_defaults() -> toml::Table {
    use crate::methods::lora as l;
    let mut t = common_defaults();
    let own: toml::Table = format!(
        r#"
rank = {rank}
targets = "{targets}"
train-text-encoder = false
dropout = 0.0
steps = {steps}
lr = {lr:e}
scale-lr = false
batch-size = 1
grad-accum = 1
"#,
        rank = l::DEFAULT_RANK,
        targets = l::DEFAULT_TARGETS,
        steps = l::DEFAULT_STEPS,
        lr = l::DEFAULT_LR
    )
    .parse()
    .expect("valid defaults");
    merge(&mut t, own);
    t
}

/// `imprint train dreambooth`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct DreamBoothConfig {
    /// The caption of every image without an `IMAGE.txt`, e.g. "a photo of sks dog".
    pub instance_prompt: Option<String>,
    pub train_text_encoder: bool,
    /// Also write `OUT.lora.safetensors`: the change as a LoRA of this rank.
    pub extract_lora: Option<usize>,
    #[serde(flatten)]
    pub trainer: TrainerOptions,
}

/// The defaults of a DreamBooth run (diffusers' `train_dreambooth.py`).
pub fn dreambooth_defaults() -> toml::Table {
    use crate::methods::dreambooth as d;
    let mut t = common_defaults();
    let own: toml::Table = format!(
        "train-text-encoder = false\nsteps = {}\nlr = {:e}\nscale-lr = false\nbatch-size = 1\ngrad-accum = 1\n",
        d::DEFAULT_STEPS,
        d::DEFAULT_LR
    )
    .parse()
    .expect("valid defaults");
    merge(&mut t, own);
    t
}

/// What every method's defaults share.
fn common_defaults() -> toml::Table {
    r#"
resolution = 512
noise-offset = 0.0
gradient-checkpointing = false
fused-backward = false
mixed-precision = "no"
use-masks = true
inpainting = false
num-class-images = 100
prior-weight = 1.0
lr-schedule = "constant"
lr-warmup-steps = 0
crop = "center"
flip = true
seed = 0
save-every = 500
validation-every = 100
num-validation-images = 4
validation-steps = 25
device = "cpu"
[adam]
beta1 = 0.9
beta2 = 0.999
eps = 1e-8
weight_decay = 1e-2
"#
    .parse()
    .expect("valid defaults")
}

/// The defaults of a textual-inversion run, as a TOML table (merged under the user's values).
pub fn textual_inversion_defaults() -> toml::Table {
    let mut t = common_defaults();
    let own: toml::Table = format!(
        r#"
num-vectors = 1
templates = "object"
steps = {steps}
lr = {lr:e}
scale-lr = true
batch-size = {batch}
grad-accum = {accum}
resolution = {res}
"#,
        steps = ti::DEFAULT_STEPS,
        lr = ti::DEFAULT_LR,
        batch = ti::DEFAULT_BATCH,
        accum = ti::DEFAULT_GRAD_ACCUM,
        res = ti::DEFAULT_RESOLUTION
    )
    .parse()
    .expect("valid defaults");
    merge(&mut t, own);
    t
}

/// The defaults of an Extended Textual Inversion (P+) run: Textual Inversion's options with the
/// paper's recipe.
pub fn extended_textual_inversion_defaults() -> toml::Table {
    use crate::methods::extended_textual_inversion as x;
    let mut t = textual_inversion_defaults();
    let own: toml::Table = format!(
        "steps = {}\nlr = {:e}\nscale-lr = false\nbatch-size = {}\ngrad-accum = {}\n",
        x::DEFAULT_STEPS,
        x::DEFAULT_LR,
        x::DEFAULT_BATCH,
        x::DEFAULT_GRAD_ACCUM
    )
    .parse()
    .expect("valid defaults");
    merge(&mut t, own);
    t
}

/// Keys that are absent unless set (so they do not appear when a config is written back).
const OPTIONAL_KEYS: &[&str] = &[
    "resume",
    "validation-prompt",
    "validation-ip-adapter",
    "validation-image-encoder",
    "max-grad-norm",
    "instance-prompt",
    "alpha",
    "snr-gamma",
    "class-prompt",
    "class-images",
    "extract-lora",
    "rank",
    "second-images",
    "second-instance-prompt",
    "subjects",
    "cut-mix-prompt",
    "cut-mix-prob",
    "unmix-weight",
];

/// Defaults, then the config file, then the flags given on the command line. An unknown key in the
/// file is an error naming it (a typo must not silently train with a default).
pub fn resolve<T: serde::de::DeserializeOwned + Serialize>(
    defaults: toml::Table,
    file: Option<&Path>,
    flags: toml::Table,
) -> Result<T> {
    let mut table = defaults;
    let mut user_keys = vec![];
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let user: toml::Table = text
            .parse()
            .with_context(|| format!("{}: invalid TOML", path.display()))?;
        user_keys.extend(user.keys().cloned());
        merge(&mut table, user);
    }
    merge(&mut table, flags);
    let what = file
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "command line".into());
    let cfg: T = toml::Value::Table(table)
        .try_into()
        .with_context(|| format!("{what}: invalid training configuration"))?;
    let known = toml::Table::try_from(&cfg)?;
    if let Some(k) = user_keys
        .iter()
        .find(|k| !known.contains_key(*k) && !OPTIONAL_KEYS.contains(&k.as_str()))
    {
        bail!("{what}: unknown key '{k}'")
    }
    Ok(cfg)
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The half-precision dtype a `--mixed-precision` value names (`no` and others: none).
pub fn half_dtype(mixed_precision: &str) -> Option<candle_core::DType> {
    match mixed_precision {
        "fp16" => Some(candle_core::DType::F16),
        "bf16" => Some(candle_core::DType::BF16),
        _ => None,
    }
}

fn default_mixed_precision() -> String {
    "no".into()
}

impl TrainerOptions {
    /// The half-precision dtype `mixed_precision` asks for, if any.
    pub fn half_dtype(&self) -> Option<candle_core::DType> {
        half_dtype(&self.mixed_precision)
    }

    pub fn validate(&self) -> Result<()> {
        if !matches!(self.mixed_precision.as_str(), "no" | "fp16" | "bf16") {
            bail!(
                "mixed-precision must be 'no', 'fp16' or 'bf16' (got '{}')",
                self.mixed_precision
            )
        }
        if self.mixed_precision == "fp16" && self.fused_backward {
            bail!("--mixed-precision fp16 skips the steps whose scaled gradients overflow, which --fused-backward cannot (it updates during the backward pass): use bf16, or drop --fused-backward")
        }
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            bail!("steps, batch-size and grad-accum must be at least 1")
        }
        if self.resolution % 8 != 0 || self.resolution < 8 {
            bail!(
                "resolution must be a positive multiple of 8 (got {})",
                self.resolution
            )
        }
        if !matches!(self.crop.as_str(), "center" | "random") {
            bail!("crop must be 'center' or 'random' (got '{}')", self.crop)
        }
        if !(self.lr > 0.0) {
            bail!("lr must be positive")
        }
        if self.validation_ip_adapter.is_some() && self.validation_prompt.is_none() {
            bail!("--validation-ip-adapter gives the validation images an image prompt: it needs --validation-prompt")
        }
        if self.validation_ip_adapter.is_none()
            && (!self.validation_ip_image.is_empty() || self.validation_image_encoder.is_some())
        {
            bail!("--validation-ip-image and --validation-image-encoder need --validation-ip-adapter FILE[:SCALE]")
        }
        if self.second_images.is_some() {
            match &self.subjects {
                Some(s) if s.len() == 2 && s.iter().all(|p| !p.trim().is_empty()) => {}
                _ => bail!("--second-images (Cut-Mix-Unmix) needs --subjects \"PHRASE A,PHRASE B\": how the cut-mix captions name the two subjects, e.g. \"sks dog,zwx cat\""),
            }
            if self.gradient_checkpointing {
                bail!("Cut-Mix-Unmix's unmix term reads the cross-attention of the forward pass, which --gradient-checkpointing recomputes; drop one of the two")
            }
            if let Some(p) = self.cut_mix_prob {
                if !(0.0..=1.0).contains(&p) {
                    bail!("--cut-mix-prob must lie in [0, 1] (got {p})")
                }
            }
            if let Some(w) = self.unmix_weight {
                if !(w >= 0.0 && w.is_finite()) {
                    bail!("--unmix-weight must be a finite number ≥ 0 (got {w})")
                }
            }
        } else if self.subjects.is_some()
            || self.second_instance_prompt.is_some()
            || self.cut_mix_prompt.is_some()
            || self.cut_mix_prob.is_some()
            || self.unmix_weight.is_some()
        {
            bail!("--subjects, --second-instance-prompt, --cut-mix-prompt, --cut-mix-prob and --unmix-weight are Cut-Mix-Unmix options: they need --second-images DIR")
        }
        if self.class_prompt.is_some() != self.class_images.is_some() {
            bail!("prior preservation needs both --class-prompt and --class-images")
        }
        if self.class_prompt.is_some() && self.num_class_images == 0 {
            bail!("--num-class-images must be at least 1 with prior preservation")
        }
        if self.snr_gamma.is_some_and(|g| !(g > 0.0)) {
            bail!("--snr-gamma must be positive")
        }
        if self.fused_backward {
            if !self.gradient_checkpointing {
                bail!("--fused-backward needs --gradient-checkpointing: the fused step runs as each recomputed block finishes its backward")
            }
            if self.grad_accum != 1 {
                bail!("--fused-backward updates weights during the backward pass, so it cannot accumulate gradients over micro-batches; use --grad-accum 1 (and a larger --batch-size)")
            }
            if self.max_grad_norm.is_some() {
                bail!("--fused-backward updates each weight before the global gradient norm is known, so --max-grad-norm cannot be applied; drop one of the two")
            }
        }
        Ok(())
    }

    /// The learning rate the optimizer starts from.
    pub fn base_lr(&self) -> f64 {
        if self.scale_lr {
            self.lr * (self.batch_size * self.grad_accum) as f64
        } else {
            self.lr
        }
    }
}

/// Where a run writes, all beside `out`: `NAME.config.toml`, `NAME.log.jsonl`,
/// `NAME.checkpoints/`, `NAME.validation/`.
pub struct OutputPaths {
    pub concept: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub checkpoints: PathBuf,
    pub validation: PathBuf,
}

impl OutputPaths {
    pub fn new(out: &Path) -> Result<Self> {
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            bail!(
                "{}: output folder {} does not exist",
                out.display(),
                parent.display()
            )
        }
        let stem = out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "concept".into());
        let beside = |suffix: &str| parent.join(format!("{stem}{suffix}"));
        Ok(Self {
            concept: out.to_path_buf(),
            config: beside(".config.toml"),
            log: beside(".log.jsonl"),
            checkpoints: beside(".checkpoints"),
            validation: beside(".validation"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "model = \"m\"\nimages = \"i\"\nout = \"o.safetensors\"\ntoken = \"<t>\"\ninit-word = \"toy\"\nsteps = 7\nlr = 0.1\n[adam]\neps = 1e-6\n")?;
        let flags: toml::Table = "steps = 9".parse()?;
        let cfg: TextualInversionConfig =
            resolve(textual_inversion_defaults(), Some(&file), flags)?;
        assert_eq!(cfg.trainer.steps, 9);
        assert_eq!(cfg.trainer.lr, 0.1);
        assert_eq!(cfg.trainer.adam.eps, 1e-6);
        assert_eq!(cfg.trainer.adam.beta2, 0.999);
        assert_eq!(cfg.num_vectors, 1);
        let back: TextualInversionConfig = toml::from_str(&toml::to_string(&cfg)?)?;
        assert_eq!(back, cfg);
        std::fs::write(&file, "stepz = 3\n")?;
        assert!(resolve::<TextualInversionConfig>(
            textual_inversion_defaults(),
            Some(&file),
            toml::Table::new()
        )
        .is_err());
        Ok(())
    }
}
