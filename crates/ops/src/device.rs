//! Devices by name, for the `--device` flag and `IMPRINT_DEVICE`.

use candle_core::{bail, Device, Result};

/// A device by name: `cpu`, `cuda` (`cuda:N` picks a GPU) or `metal`.
pub fn parse_device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        "metal" => Device::new_metal(0)?,
        s if s.starts_with("cuda:") => match s[5..].parse() {
            Ok(ordinal) => Device::new_cuda(ordinal)?,
            Err(_) => bail!("unknown device '{name}' (expected cpu, cuda, cuda:N or metal)"),
        },
        other => bail!("unknown device '{other}' (expected cpu, cuda, cuda:N or metal)"),
    })
}

/// The device `IMPRINT_DEVICE` names (`cpu` when unset): every command's `--device` defaults to
/// it, and the parity tests run on it (tools/cuda/device.sh sets `cuda` on the GPU machine).
pub fn device_from_env() -> Result<Device> {
    let name = std::env::var("IMPRINT_DEVICE").unwrap_or_else(|_| "cpu".into());
    parse_device(&name).map_err(|e| candle_core::Error::Msg(format!("IMPRINT_DEVICE={name}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_or_are_refused() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:x", ""] {
            let e = parse_device(bad).unwrap_err().to_string();
            assert!(e.contains("unknown device"), "{bad}: {e}");
        }
    }
}
