//! Stable Diffusion's networks and their loading.

pub mod tokenizer;
