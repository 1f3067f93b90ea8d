//! Learning-rate schedules (diffusers' `get_scheduler`: constant, constant with warm-up, cosine).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    /// Linear warm-up over `warmup_steps`, then constant (`constant_with_warmup`).
    Warmup,
    /// Linear warm-up, then half a cosine period down to zero at the last step.
    Cosine,
}

impl std::str::FromStr for LrSchedule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "constant" => Self::Constant,
            "warmup" | "constant_with_warmup" => Self::Warmup,
            "cosine" => Self::Cosine,
            other => anyhow::bail!(
                "unknown learning-rate schedule '{other}' (expected constant, warmup or cosine)"
            ),
        })
    }
}

impl LrSchedule {
    /// The multiplier of the base learning rate at optimizer step `step` (0-based), as the
    /// `LambdaLR` of diffusers' `get_scheduler`.
    pub fn factor(&self, step: usize, warmup_steps: usize, total_steps: usize) -> f64 {
        let warm = |s: usize| {
            if s < warmup_steps {
                s as f64 / warmup_steps.max(1) as f64
            } else {
                1.0
            }
        };
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Warmup => warm(step),
            LrSchedule::Cosine => {
                if step < warmup_steps {
                    return warm(step);
                }
                let progress = (step - warmup_steps) as f64
                    / (total_steps.saturating_sub(warmup_steps)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(LrSchedule::Constant.factor(5, 10, 100), 1.0);
        assert_eq!(LrSchedule::Warmup.factor(5, 10, 100), 0.5);
        assert_eq!(LrSchedule::Warmup.factor(50, 10, 100), 1.0);
        assert_eq!(LrSchedule::Cosine.factor(10, 10, 110), 1.0);
        assert!((LrSchedule::Cosine.factor(60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(LrSchedule::Cosine.factor(110, 10, 110).abs() < 1e-12);
    }
}
