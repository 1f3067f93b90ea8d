//! Training: personalization methods on one shared loop.
//!
//! A run is a [`config`] (TOML with the command line's keys on top) that [`trainer`] executes:
//! images from [`data`] (oriented, cropped, flipped; VAE latents cached per augmentation variant),
//! captions from [`templates`], the method's trainable part ([`methods`]: Textual Inversion, P+,
//! Perfusion, LoRA, DreamBooth, Custom Diffusion; each states what it trains, its captions, its
//! text states and what it saves through the `Method` hooks), the shared denoising
//! loss, AdamW ([`optim`]) with a schedule ([`lr_schedule`]), a progress bar, a JSONL log,
//! validation grids, and [`checkpoint`]s that resume bit-exactly on CPU.
//!
//! Beside `--out NAME.safetensors` a run writes `NAME.config.toml` (the configuration used),
//! `NAME.log.jsonl` (one line per step), `NAME.checkpoints/step-N.safetensors` and
//! `NAME.validation/step-N.png`.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod lr_schedule;
pub mod methods;
pub mod optim;
pub mod svd;
pub mod templates;
pub mod trainer;
