//! Stable Diffusion's networks and their loading.
