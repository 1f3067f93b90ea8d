//! Scheduler config values imprint does not compute are refused, not silently changed.

use imprint_models::schedulers::{build, SchedulerConfig, SchedulerKind};

fn cfg(json: &str) -> SchedulerConfig {
    serde_json::from_str(json).unwrap()
}

#[test]
fn unsupported_math_changing_values_are_refused() {
    let dpm = cfg(r#"{"algorithm_type": "sde-dpmsolver++", "beta_schedule": "scaled_linear"}"#);
    let err = build(SchedulerKind::DpmPlusPlus2M, &dpm, 8, false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("algorithm_type") && err.contains("scheduler_config.json"),
        "{err}"
    );
    // The same field is irrelevant to another scheduler.
    assert!(build(SchedulerKind::Ddim, &dpm, 8, false).is_ok());
    let euler = cfg(r#"{"timestep_type": "continuous"}"#);
    assert!(build(SchedulerKind::Euler, &euler, 8, false).is_err());
    let thresholding = cfg(r#"{"thresholding": true}"#);
    assert!(build(SchedulerKind::Ddim, &thresholding, 8, false).is_err());
    // Defaults written out explicitly, as saved configs do, are fine.
    let saved = cfg(
        r#"{"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero", "thresholding": false, "skip_prk_steps": true}"#,
    );
    assert!(build(SchedulerKind::DpmPlusPlus2M, &saved, 8, false).is_ok());
}
