pub mod bench;
pub mod debug;
pub mod generate;
pub mod model;
pub mod train;

use anyhow::{bail, Result};
use candle_core::Device;

/// `--device cpu|cuda|metal` (`cuda:N` picks a GPU).
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        "metal" => Device::new_metal(0)?,
        s if s.starts_with("cuda:") => Device::new_cuda(s[5..].parse()?)?,
        other => bail!("unknown device '{other}' (expected cpu, cuda, cuda:N or metal)"),
    })
}
