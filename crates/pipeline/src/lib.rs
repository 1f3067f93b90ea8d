//! Generation with Stable Diffusion: text-to-image and image-to-image with classifier-free
//! guidance, on the networks of `imprint-models`.
//!
//! [`StableDiffusion`] holds the loaded components of one model folder; [`StableDiffusion::sample`]
//! is the denoising loop (shared by `imprint generate` and `imprint debug sample`), and
//! [`StableDiffusion::generate`] wraps it with seeds, img2img and decoding to images. Image files and
//! grids live in [`image_io`]; seeded Gaussian noise in [`noise`]. This crate orchestrates only:
//! the math lives in the models and schedulers.
//!
//! ```no_run
//! use imprint_pipeline::{GenerateOptions, StableDiffusion};
//! let sd = StableDiffusion::load("model", candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let images = sd.generate(&GenerateOptions { prompt: "a photo of a dog".into(), ..Default::default() })?;
//! imprint_pipeline::image_io::save_png(&images[0], "dog.png".as_ref())?;
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod image_io;
pub mod ip_adapter;
pub mod noise;
mod stable_diffusion;

pub use stable_diffusion::{
    region_weights, ConceptOptions, GenerateOptions, InitImage, Inpainting, RegionPrompt,
    SampleOptions, StableDiffusion,
};

pub use imprint_ops::{device_from_env, parse_device};
