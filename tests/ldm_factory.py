"""Tiny stage-2 modules for tests, built from the real preset files (random weights, nothing loaded)."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from tests.conftest import ROOT


def preset(group: str, name: str, **overrides: Any) -> dict[str, Any]:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / group / f"{name}.yaml")
    out = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "init_from"}
    out.update(overrides)
    return out


def tiny_ldm(resolution: int = 8, text_encoder: dict[str, Any] | None = None, unet: dict[str, Any] | None = None,
             **module_kwargs: Any):
    """A LatentDiffusionModule at `resolution` px (latents resolution / 2) small enough for a CPU step in ms."""
    from ldm.diffusion.module import LatentDiffusionModule

    kwargs: dict[str, Any] = dict(scale_factor=1.0, ema_decay=0.9, num_inference_steps=3, guidance_scale=2.0)
    kwargs.update(module_kwargs)
    return LatentDiffusionModule(
        unet=preset("unet", "tiny", model_channels=16, channel_mult=[1, 2], attention_resolutions=[2],
                    num_head_channels=16, **(unet or {})),
        text_encoder=text_encoder or preset("text_encoder", "tiny", width=32, heads=2, layers=1),
        autoencoder=preset("autoencoder", "tiny", resolution=resolution),
        **kwargs)
