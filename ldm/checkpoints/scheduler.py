"""Our noise schedule and prediction type <-> a diffusers scheduler config (scheduler/scheduler_config.json).

One table of beta-schedule names serves both directions. We write a `DDIMScheduler` with "trailing" timestep
spacing and `set_alpha_to_one`, which is exactly our DDIM sampler (ldm.diffusion.samplers.ddim_timesteps), so
diffusers draws our picture from the same seed, for step counts that divide num_train_timesteps: diffusers
steps from t to t - num_train_timesteps // steps, which is its next timestep only then.
"""

from __future__ import annotations

from typing import Any

# our beta_schedule -> diffusers beta_schedule
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
DEFAULT_SCHEDULE = {"beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085,
                    "beta_end": 0.012, "rescale_zero_terminal_snr": False}


def scheduler_config(prediction_type: str, schedule: dict[str, Any] | None) -> dict[str, Any]:
    """A DDIMScheduler config sampling like our DDIM; ValueError for what a diffusers scheduler cannot express."""
    if prediction_type not in ("epsilon", "v_prediction"):
        # Checked against diffusers 0.42: FlowMatchEulerDiscreteScheduler has no scale_model_input (which
        # StableDiffusionPipeline calls) and spaces 4 steps as sigmas 1, .667, .334, .001 where our Euler uses
        # 1, .75, .5, .25, so diffusers would not draw our picture.
        raise ValueError(f"prediction_type={prediction_type!r}: StableDiffusionPipeline cannot sample it as we do "
                         f"(FlowMatchEulerDiscreteScheduler lacks scale_model_input and spaces its sigmas down to "
                         f"1/num_train_timesteps, ours down to 0); epsilon and v_prediction models export")
    s = {**DEFAULT_SCHEDULE, **(schedule or {})}
    return {"_class_name": "DDIMScheduler", "_diffusers_version": _diffusers_version(),
            "num_train_timesteps": int(s["num_train_timesteps"]), "beta_start": float(s["beta_start"]),
            "beta_end": float(s["beta_end"]), "beta_schedule": BETA_SCHEDULES[s["beta_schedule"]],
            "trained_betas": None, "prediction_type": prediction_type, "timestep_spacing": "trailing",
            # steps_offset is unused by trailing spacing; diffusers rewrites other values with a warning
            "steps_offset": 1, "set_alpha_to_one": True, "clip_sample": False, "thresholding": False,
            "rescale_betas_zero_snr": bool(s["rescale_zero_terminal_snr"]), "sample_max_value": 1.0,
            "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995}


def settings_from_scheduler(cfg: dict[str, Any], source: str = "scheduler_config.json") -> dict[str, Any]:
    """A diffusers scheduler config -> {"prediction_type", "schedule"} as stage.module takes them."""
    inverse = {v: k for k, v in BETA_SCHEDULES.items()}
    kind = cfg.get("beta_schedule", "linear")
    if kind not in inverse or cfg.get("trained_betas"):
        raise ValueError(f"{source}: beta_schedule={kind!r} (trained_betas={cfg.get('trained_betas')!r}) has no "
                         f"counterpart here; choose one of {sorted(inverse)}")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"{source}: prediction_type={prediction!r}; expected epsilon or v_prediction")
    return {"prediction_type": prediction,
            "schedule": {"beta_schedule": inverse[kind], "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000)),
                         "beta_start": float(cfg.get("beta_start", 0.0001)),
                         "beta_end": float(cfg.get("beta_end", 0.02)),
                         "rescale_zero_terminal_snr": bool(cfg.get("rescale_betas_zero_snr", False))}}


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.30.0"
