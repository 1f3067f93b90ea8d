//! Stable Diffusion's networks and their loading, computing what diffusers/transformers compute.
//!
//! * [`tokenizer`]: CLIP BPE (`vocab.json` + `merges.txt` or `tokenizer.json`), new-token registration.
//! * [`clip`]: the CLIP text encoder, from token ids or from token embeddings, with clip skip.
//! * [`unet`]: `UNet2DConditionModel` for SD 1.x/2.x, with the two hooks personalization needs:
//!   per-layer text conditioning ([`attention::TextConditioning`]) and adapters on every
//!   projection ([`visit::VisitProjections`]).
//! * [`vae`]: `AutoencoderKL` encoder and decoder.
//! * [`schedulers`]: DDIM, Euler, Euler ancestral, DPM++ 2M, DDPM, and the training noise schedule.
//! * [`loading`]: the diffusers folder layout; [`init`]: random-weight folders of known architectures.
//!
//! Every layer computes through `imprint-ops`, so the forward pass here is the one training
//! differentiates. Weight names follow the reference modules through `vb.pp(...)`.
//!
//! ```no_run
//! use imprint_models::loading::ModelFolder;
//! let folder = ModelFolder::open("model")?;
//! let unet = folder.load_unet(candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! println!("{} cross-attention layers", unet.num_cross_attention_layers);
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod attention;
pub mod clip;
pub mod clip_vision;
pub mod image_processor;
pub mod init;
pub mod io;
pub mod loading;
pub mod resnet;
pub mod schedulers;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod visit;

pub use attention::{TextConditioning, TextStates};
pub use visit::{Projection, VisitProjections};
