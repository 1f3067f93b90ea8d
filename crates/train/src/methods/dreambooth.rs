//! DreamBooth (Ruiz et al. 2023): fine-tune every UNet weight (and optionally the text encoder's)
//! on a few images of the subject, usually with prior preservation, and write a whole new model.
//!
//! * **Trainable**: all UNet weights (`--train-text-encoder`: also the text encoder's); VAE frozen.
//! * **Loss**: the shared denoising loss on the instance prompt (and the class prior, see the
//!   trainer's `--class-prompt`).
//! * **Output**: a complete diffusers folder (the base folder with the trained weights), written
//!   under a temporary name and renamed; `--extract-lora RANK` also writes `OUT.lora.safetensors`,
//!   the truncated SVD of each weight's change (kohya's `extract_lora_from_models.py` idea).
//! * **Defaults**: diffusers' `examples/dreambooth/train_dreambooth.py`: lr 5e-6 unscaled,
//!   batch 1, 400 steps, 512 px, constant schedule, AdamW(0.9, 0.999, wd 1e-2).

use crate::svd::low_rank;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use imprint_concepts::lora::{LoraModule, UNET};
use imprint_concepts::{Concept, TEXT_ENCODER};
use imprint_models::loading::{weight_files, SafetensorsReader};
use imprint_pipeline::StableDiffusion;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_LR: f64 = 5e-6;
pub const DEFAULT_STEPS: usize = 400;

pub struct DreamBoothMethod {
    pub unet_vars: Vec<(String, Var)>,
    pub text_encoder_vars: Vec<(String, Var)>,
    pub instance_prompt: Option<String>,
    /// The base model folder (copied for everything not trained).
    pub base: PathBuf,
    pub extract_lora: Option<usize>,
}

impl DreamBoothMethod {
    /// Makes `sd`'s UNet (and text encoder) trainable.
    pub fn setup(
        sd: &mut StableDiffusion,
        train_text_encoder: bool,
        instance_prompt: Option<String>,
        extract_lora: Option<usize>,
    ) -> Result<Self> {
        if extract_lora == Some(0) {
            bail!("--extract-lora needs a rank of at least 1")
        }
        let (unet, unet_vars) = sd.folder.load_unet_trainable(sd.dtype, &sd.device)?;
        sd.unet = unet;
        let text_encoder_vars = if train_text_encoder {
            let (te, vars) = sd
                .folder
                .load_text_encoder_trainable(sd.dtype, &sd.device)?;
            sd.text_encoder = te;
            vars
        } else {
            vec![]
        };
        Ok(Self {
            unet_vars,
            text_encoder_vars,
            instance_prompt,
            base: sd.folder.root.clone(),
            extract_lora,
        })
    }

    fn write_folder(&self, out: &Path) -> Result<()> {
        if out.exists() {
            bail!(
                "{}: already exists; DreamBooth writes a new model folder",
                out.display()
            )
        }
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let result = (|| -> Result<()> {
            let trained: Vec<(&str, &str, &Vec<(String, Var)>)> = [
                ("unet", "diffusion_pytorch_model", &self.unet_vars),
                ("text_encoder", "model", &self.text_encoder_vars),
            ]
            .into_iter()
            .filter(|(_, _, vars)| !vars.is_empty())
            .collect();
            copy_tree(&self.base, &tmp, &|rel: &Path| {
                // The trained components' weight files are replaced, in whatever form they came.
                let in_trained = trained.iter().any(|(c, _, _)| rel.starts_with(c));
                let weights = rel
                    .extension()
                    .is_some_and(|e| e == "safetensors" || e == "bin")
                    || rel.to_string_lossy().ends_with(".index.json");
                !(in_trained && weights)
            })?;
            for (component, stem, vars) in trained {
                let tensors: HashMap<String, Tensor> = vars
                    .iter()
                    .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
                    .collect::<Result<_>>()?;
                imprint_models::io::save_safetensors_atomic(
                    &tmp.join(component).join(format!("{stem}.safetensors")),
                    &tensors,
                    None,
                )?;
            }
            std::fs::rename(&tmp, out).with_context(|| {
                format!("{}: cannot move the new model into place", out.display())
            })?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// The LoRA of the change: for every trained projection weight, the best rank-`rank`
    /// factorization of `W_trained − W_base`.
    fn extract(&self, rank: usize) -> Result<Concept> {
        let mut modules = vec![];
        for (component, stem, network, vars) in [
            ("unet", "diffusion_pytorch_model", UNET, &self.unet_vars),
            (
                "text_encoder",
                "model",
                TEXT_ENCODER,
                &self.text_encoder_vars,
            ),
        ] {
            if vars.is_empty() {
                continue;
            }
            let base = SafetensorsReader::open(&weight_files(&self.base.join(component), stem)?)?;
            for (name, var) in vars.iter() {
                let Some(module) = name.strip_suffix(".weight") else {
                    continue;
                };
                let w = var.as_tensor().to_device(&Device::Cpu)?;
                if !(w.rank() == 2 || w.rank() == 4) || module.contains("embedding") {
                    continue;
                }
                let delta = (&w - base.read(name)?.to_dtype(w.dtype())?)?;
                if delta.abs()?.max_all()?.to_scalar::<f32>()? == 0.0 {
                    continue;
                }
                let dims = w.dims().to_vec();
                let cols: usize = dims[1..].iter().product();
                let r = rank.min(dims[0]).min(cols);
                let (up, down) = low_rank(&delta.reshape((dims[0], cols))?, r, 0)?;
                let (down, up) = if w.rank() == 4 {
                    (
                        down.reshape((r, dims[1], dims[2], dims[3]))?,
                        up.reshape((dims[0], r, 1, 1))?,
                    )
                } else {
                    (down, up)
                };
                // LoRA module paths of the text encoder carry transformers' `text_model.` prefix.
                let module = if network == TEXT_ENCODER && !module.starts_with("text_model.") {
                    format!("text_model.{module}")
                } else {
                    module.to_string()
                };
                modules.push(LoraModule::new(network, &module, down, up, r as f64, name)?);
            }
        }
        if modules.is_empty() {
            bail!("no weight changed: nothing to extract")
        }
        Ok(super::lora::lora_concept(
            modules,
            &self.instance_prompt,
            None,
        ))
    }
}

/// Copies `from` into `to` recursively, keeping the files `keep` accepts (paths relative to `from`).
fn copy_tree(from: &Path, to: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<()> {
    fn walk(root: &Path, dir: &Path, to: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<()> {
        for e in
            std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))?
        {
            let path = e?.path();
            let rel = path.strip_prefix(root)?;
            if path.is_dir() {
                std::fs::create_dir_all(to.join(rel))?;
                walk(root, &path, to, keep)?;
            } else if keep(rel) {
                std::fs::copy(&path, to.join(rel))
                    .with_context(|| format!("copying {}", path.display()))?;
            }
        }
        Ok(())
    }
    std::fs::create_dir_all(to)?;
    walk(from, from, to, keep)
}

impl super::Method for DreamBoothMethod {
    fn trainable(&self) -> Vec<(String, Var)> {
        let unet = self
            .unet_vars
            .iter()
            .map(|(n, v)| (format!("unet.{n}"), v.clone()));
        let te = self
            .text_encoder_vars
            .iter()
            .map(|(n, v)| (format!("text_encoder.{n}"), v.clone()));
        unet.chain(te).collect()
    }

    fn caption(
        &self,
        image: &crate::data::TrainImage,
        _rng: &mut rand_chacha::ChaCha20Rng,
    ) -> String {
        super::instance_caption(image, &self.instance_prompt)
    }

    fn concept(&self, _base_model: Option<String>) -> Result<Concept> {
        bail!(
            "DreamBooth writes a model folder, not a concept file (use --extract-lora for a LoRA)"
        )
    }

    fn save(&self, out: &Path, _base_model: Option<String>, _steps: usize) -> Result<()> {
        self.write_folder(out)?;
        if let Some(rank) = self.extract_lora {
            let concept = self.extract(rank)?;
            let lora_path = out.with_file_name(format!(
                "{}.lora.safetensors",
                out.file_name().unwrap_or_default().to_string_lossy()
            ));
            imprint_concepts::formats::save(
                &concept,
                &lora_path,
                imprint_concepts::formats::Format::Native,
            )?;
        }
        Ok(())
    }
}
