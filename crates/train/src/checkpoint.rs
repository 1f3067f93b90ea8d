//! Resumable checkpoints: the trainable tensors, the optimizer moments, the step and the random
//! stream position, written atomically so an interrupted save never damages the previous one.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use imprint_models::io::save_safetensors_atomic;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Everything needed to continue a run exactly where it stopped.
pub struct Checkpoint {
    /// Optimizer steps completed.
    pub step: usize,
    /// Named trainable tensors.
    pub params: Vec<(String, Tensor)>,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    pub rng_seed: u64,
    pub rng_word_pos: u128,
    /// The run's configuration (TOML), to refuse resuming a different run.
    pub config: String,
    /// A method's state outside the trainable tensors (Perfusion's target input EMA).
    pub state: Vec<(String, Tensor)>,
}

const PARAM: &str = "param.";
const M: &str = "exp_avg.";
const V: &str = "exp_avg_sq.";
const STATE: &str = "state.";

impl Checkpoint {
    pub fn file_name(step: usize) -> String {
        format!("step-{step:06}.safetensors")
    }

    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut tensors = HashMap::new();
        let mut order = vec![];
        for (i, (name, t)) in self.params.iter().enumerate() {
            tensors.insert(format!("{PARAM}{name}"), t.to_device(&Device::Cpu)?);
            tensors.insert(
                format!("{M}{name}"),
                self.exp_avg[i].to_device(&Device::Cpu)?,
            );
            tensors.insert(
                format!("{V}{name}"),
                self.exp_avg_sq[i].to_device(&Device::Cpu)?,
            );
            order.push(name.clone());
        }
        for (name, t) in &self.state {
            tensors.insert(format!("{STATE}{name}"), t.to_device(&Device::Cpu)?);
        }
        let state_names: Vec<&str> = self.state.iter().map(|(n, _)| n.as_str()).collect();
        let meta = HashMap::from([
            ("state".to_string(), state_names.join(",")),
            ("imprint.format".to_string(), "checkpoint".to_string()),
            ("step".to_string(), self.step.to_string()),
            ("params".to_string(), order.join(",")),
            ("rng_seed".to_string(), self.rng_seed.to_string()),
            ("rng_word_pos".to_string(), self.rng_word_pos.to_string()),
            ("config".to_string(), self.config.clone()),
        ]);
        let path = dir.join(Self::file_name(self.step));
        save_safetensors_atomic(&path, &tensors, Some(meta))?;
        Ok(path)
    }

    /// Loads a checkpoint file, or the latest checkpoint of a checkpoints folder.
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            latest(path)?
                .with_context(|| format!("{}: no checkpoint in this folder", path.display()))?
        } else {
            path.to_path_buf()
        };
        let ctx = || file.display().to_string();
        imprint_models::loading::check_safetensors(&file).with_context(ctx)?;
        let bytes = std::fs::read(&file).with_context(ctx)?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).with_context(ctx)?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("imprint.format").map(String::as_str) != Some("checkpoint") {
            bail!("{}: not an imprint training checkpoint", ctx())
        }
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .with_context(|| format!("{}: checkpoint lacks '{k}'", ctx()))
        };
        let tensors =
            candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).with_context(ctx)?;
        let take = |k: String| {
            tensors
                .get(&k)
                .cloned()
                .with_context(|| format!("{}: missing tensor {k}", ctx()))
        };
        let names: Vec<String> = get("params")?.split(',').map(str::to_string).collect();
        let mut params = vec![];
        let (mut m, mut v) = (vec![], vec![]);
        for n in &names {
            params.push((n.clone(), take(format!("{PARAM}{n}"))?));
            m.push(take(format!("{M}{n}"))?);
            v.push(take(format!("{V}{n}"))?);
        }
        let mut state = vec![];
        for n in meta
            .get("state")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
        {
            if !n.is_empty() {
                state.push((n.to_string(), take(format!("{STATE}{n}"))?));
            }
        }
        Ok(Self {
            state,
            step: get("step")?.parse()?,
            params,
            exp_avg: m,
            exp_avg_sq: v,
            rng_seed: get("rng_seed")?.parse()?,
            rng_word_pos: get("rng_word_pos")?.parse()?,
            config: get("config")?,
        })
    }
}

/// The checkpoint with the highest step in `dir`.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))? {
        let p = e?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.strip_suffix(".safetensors"))
            .and_then(|s| s.parse().ok())
        {
            if best.as_ref().is_none_or(|(b, _)| step > *b) {
                best = Some((step, p));
            }
        }
    }
    Ok(best.map(|(_, p)| p))
}
