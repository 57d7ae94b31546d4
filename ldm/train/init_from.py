"""`model.init_from` / `model.unet.init_from`: start stage=ldm from a published or earlier model.

The architecture comes from the files; so do the settings the model was trained with (prediction type, beta
schedule, scale factor, text layer). Precedence: recipe and experiment presets < the files < the command line.
The sampler follows the prediction type: a recipe's flow sampler gives way to a diffusion one when the files
say epsilon or v_prediction, unless the command line names it. A command-line value the files contradict (an
architecture key, a sampler that cannot sample the loaded model) stops the run at start-up, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoints.pipeline import load_pretrained
from ldm.checkpoints.unet import load_unet
from ldm.diffusion.samplers import SAMPLERS, check_sampler
from ldm.train.checks import ConfigError

# Keys that do not change the weights' shapes or meaning: kept from the run's config.
UNET_RUN_KEYS = ("use_checkpoint", "dropout")
TEXT_RUN_KEYS = ("freeze", "cache_dir", "seed")
MODULE_SETTINGS = ("prediction_type", "schedule", "scale_factor", "flow")
# What a run samples with when the loaded prediction type rules out the configured sampler: stage/ldm.yaml's
# default for diffusion models, experiment=flow's for flow models.
DEFAULT_SAMPLERS = {"epsilon": "ddim", "v_prediction": "ddim", "flow": "euler"}


@dataclass
class InitPlan:
    """Config values the files decide, and weights to load once the module exists."""

    kwargs: dict[str, Any] = field(default_factory=dict)  # unet, text_encoder, and stage.module settings
    autoencoder_path: str | None = None
    unet_state: dict[str, torch.Tensor] | None = None
    text_state: dict[str, torch.Tensor] | None = None
    explicit: set[str] = field(default_factory=set)  # keys set on the command line

    def check_autoencoder(self, cfg: DictConfig, found: dict[str, Any]) -> None:
        """The autoencoder's architecture comes from its files too: a contradicting command-line value stops."""
        if self.autoencoder_path is not None:
            _arch("autoencoder", cfg, {k: v for k, v in found.items() if k != "resolution"}, self.explicit, ())

    def apply(self, cfg: DictConfig) -> DictConfig:
        """A copy of `cfg` with the files' architecture (model.unet, model.text_encoder) and settings."""
        cfg = cfg.copy()
        for key, value in self.kwargs.items():
            where = f"model.{key}" if key in ("unet", "text_encoder") else f"stage.module.{key}"
            OmegaConf.update(cfg, where, value, merge=False, force_add=True)
        return cfg


def explicit_keys(overrides: list[str] | None) -> set[str]:
    """Dotted keys set on the command line (`a.b=1`, `+a.b=1`, `++a.b=1`); config-group picks are not values."""
    keys = set()
    for item in overrides or []:
        key = item.split("=", 1)[0].lstrip("+~")
        keys.add(key)
    return keys


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _arch(group: str, cfg: DictConfig, found: dict[str, Any], explicit: set[str], run_keys: tuple[str, ...]
          ) -> dict[str, Any]:
    """The files' architecture for model.<group>, the run's own run-time keys, and refusals of contradictions."""
    own = OmegaConf.to_container(cfg.model[group], resolve=True)
    for key, value in found.items():
        name = f"model.{group}.{key}"
        if name in explicit and key not in run_keys and not _same(own.get(key), value):
            raise ConfigError(f"{name}={own.get(key)!r} contradicts the weights being loaded ({value!r}); the "
                              f"architecture comes from the files: drop the override")
    return {**found, **{k: own[k] for k in run_keys if k in own}}


def _settings(cfg: DictConfig, found: dict[str, Any], explicit: set[str], source: str) -> dict[str, Any]:
    """The files' training settings, except those the command line sets (those win, and are said)."""
    out = {}
    for key in MODULE_SETTINGS:
        if key not in found:
            continue
        name = f"stage.module.{key}"
        if name in explicit or any(k.startswith(name + ".") for k in explicit):
            print(f"[ldm] {name}: the command line's value wins over {source}'s {found[key]!r}")
            continue
        out[key] = found[key]
    return out


def _sampler(cfg: DictConfig, settings: dict[str, Any], explicit: set[str], source: str) -> dict[str, Any]:
    """{"sampler": ...} when the files' prediction type rules out the configured (recipe or preset) sampler."""
    if "prediction_type" not in settings:
        return {}
    prediction, sampler = settings["prediction_type"], cfg.stage.module.get("sampler")
    if sampler not in SAMPLERS:
        return {}  # an unknown name: check_ldm says so, naming the key
    try:
        check_sampler(sampler, prediction)
        return {}
    except ValueError as err:
        if "stage.module.sampler" in explicit:
            raise ConfigError(f"stage.module.sampler={sampler!r} (command line) cannot sample {source}, whose "
                              f"prediction_type is {prediction!r}: {err}") from None
    chosen = DEFAULT_SAMPLERS[prediction]
    print(f"[ldm] stage.module.sampler: {chosen!r} for {source}'s prediction_type={prediction!r} (the config's "
          f"{sampler!r} samples another kind of model; name one on the command line to choose)")
    return {"sampler": chosen}


def plan_init(cfg: DictConfig, overrides: list[str] | None) -> InitPlan | None:
    """What model.init_from / model.unet.init_from load; None when neither is set."""
    model = cfg.model
    whole, unet_only = model.get("init_from"), model.unet.get("init_from")
    if not whole and not unet_only:
        return None
    explicit = explicit_keys(overrides)
    if whole and unet_only:
        raise ConfigError(f"model.unet.init_from={unet_only} conflicts with model.init_from={whole}, which loads "
                          f"the UNet too; set one of them")
    use_ema = bool(model.get("use_ema", False))
    plan = InitPlan(explicit=explicit)
    if unet_only:
        try:
            unet = load_unet(unet_only, use_ema=use_ema)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(f"model.unet.init_from={unet_only}: cannot load a UNet: {err}") from err
        plan.kwargs["unet"] = _arch("unet", cfg, dict(unet.config), explicit, UNET_RUN_KEYS)
        plan.unet_state = unet.state_dict()
        return plan
    try:
        found = load_pretrained(whole, use_ema=use_ema)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"model.init_from={whole}: cannot load a whole model: {err}") from err
    plan.kwargs["unet"] = _arch("unet", cfg, found.unet_config, explicit, UNET_RUN_KEYS)
    plan.kwargs["text_encoder"] = _arch("text_encoder", cfg, found.text_config, explicit, TEXT_RUN_KEYS)
    plan.kwargs.update(_settings(cfg, found.settings, explicit, str(whole)))
    plan.kwargs.update(_sampler(cfg, plan.kwargs, explicit, str(whole)))
    if model.autoencoder.get("init_from"):
        print(f"[ldm] model.autoencoder.init_from={model.autoencoder.init_from} wins over {whole}'s autoencoder")
    else:
        plan.autoencoder_path = str(found.autoencoder_path)
    plan.unet_state, plan.text_state = found.unet_state, found.text_state
    return plan


def load_weights(module: Any, plan: InitPlan) -> None:
    """Put the planned weights into the live and EMA copies; every key must fit."""
    print(f"[ldm] init_from: UNet{' and text encoder' if plan.text_state is not None else ''} weights loaded")
    if plan.unet_state is not None:
        module.unet.load_state_dict(plan.unet_state, strict=True)
        module.ema.model.load_state_dict(plan.unet_state, strict=True)
    if plan.text_state is not None:
        module.text_encoder.load_state_dict(plan.text_state, strict=True)
        if getattr(module, "text_encoder_ema", None) is not None:
            module.text_encoder_ema.model.load_state_dict(plan.text_state, strict=True)
