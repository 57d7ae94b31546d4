"""Precision under bf16-mixed: validation metrics equal their float32 values on the same images (issue 27,
finding 6), and validation sampling runs under the trainer's precision, with an attention kernel that cannot
serve a shape falling back with a warning (finding 8)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from .test_autoencoder_training import _loader, _module


def _validate(module: pl.LightningModule, loader: DataLoader, precision: str, tmp_path) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=2)
    trainer.validate(module, loader, verbose=False)
    return {k: v for k, v in trainer.callback_metrics.items()}


def _fixed_reconstruction(module) -> None:
    """The same reconstruction under any precision: the metrics, not the autoencoder, are under test."""
    reconstruct = module.reconstruct

    def fixed(x, **kwargs):
        _, posterior = reconstruct(x, **kwargs)
        x = x.float()
        return x * 0.8 + 0.15 * torch.sin(5 * x), posterior

    module.reconstruct = fixed


def test_stage1_metrics_are_float32_under_bf16_mixed(tmp_path, one_thread):
    """PSNR, SSIM, LPIPS and rFID through AutoencoderModule's validation: bf16-mixed equals 32-true."""
    values = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        module = _module()
        _fixed_reconstruction(module)
        values[precision] = _validate(module, _loader(n=16), precision, tmp_path)
    keys = ["val/psnr", "val/ssim", "val/lpips", "val/rfid"]
    for key in keys:
        full, mixed = values["32-true"][key], values["bf16-mixed"][key]
        assert mixed.dtype == torch.float32, (key, mixed.dtype)
        assert torch.equal(full, mixed), (key, float(full), float(mixed))


def _generation_metrics():
    from ldm.metrics.generation import GenerationMetrics

    return GenerationMetrics(fid={"extractor": "small", "num_features": 16}, clip_score={"model_name": None})


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_generation_metrics_are_float32_under_the_trainers_autocast(one_thread):
    """FID and CLIP score updated and computed inside bf16-mixed's forward context equal the float32 values."""
    from lightning_fabric.plugins.precision.amp import MixedPrecision

    prompts = ["a red circle", "a blue square", "a green triangle", "a red square"]
    values = {}
    for name, context in (("32", torch.autocast("cpu", enabled=False)),
                          ("bf16", MixedPrecision("bf16-mixed", "cpu").forward_context())):
        metrics = _generation_metrics()
        with context:
            metrics.update_real(_images(4, 0))
            metrics.update_generated(_images(4, 1), prompts)
            values[name] = metrics.compute()
        states = [s for m in (metrics.fid, metrics.clip_score) for s in m.metric_state.values()
                  if isinstance(s, torch.Tensor) and s.is_floating_point()]
        assert states and all(s.dtype in (torch.float32, torch.float64) for s in states)  # FID sums in float64
    for key in ("fid", "clip_score"):
        assert values["bf16"][key].dtype == torch.float32, (key, values["bf16"][key].dtype)
        assert torch.equal(values["32"][key], values["bf16"][key]), (key, values["32"][key], values["bf16"][key])


def test_stage2_metrics_are_float32_under_bf16_mixed(tmp_path, one_thread):
    """FID and CLIP score through LatentDiffusionModule's validation (the same generated images): bf16 == fp32."""
    from tests.ldm_factory import tiny_ldm

    def fixed_samples(prompts, seeds=None, **kwargs):
        return torch.cat([_images(1, s) for s in seeds])

    images = [{"image": img, "caption": f"caption {i}"} for i, img in enumerate(_images(8, 3))]
    values = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        module = tiny_ldm(resolution=16, metrics={"num_samples": 4, "fid": {"extractor": "small", "num_features": 16},
                                                  "clip_score": {"model_name": None}})
        module.generate = fixed_samples
        values[precision] = _validate(module, DataLoader(images, batch_size=4), precision, tmp_path)
    for key in ("val/fid", "val/clip_score"):
        assert torch.equal(values["32-true"][key], values["bf16-mixed"][key]), key


def _dtypes_of(module: torch.nn.Module, seen: list[torch.dtype]):
    return module.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))


def test_validation_sampling_runs_in_bf16_and_unservable_attention_falls_back(tmp_path, one_thread):
    """bf16-mixed: validation's EMA UNet and decoder run under the trainer's autocast (Lightning's epoch-end hooks
    do not), and with an attention kernel allowed that serves none of the calls (the efficient kernel has no CPU
    implementation, as flash has no float32 one and no head dim 512 on a GPU) they fall back with a warning."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldm.nn import attention
    from tests.ldm_factory import tiny_ldm

    torch.manual_seed(0)
    module = tiny_ldm(resolution=16, val_prompts=["a red circle", "a blue square"], num_inference_steps=2)
    unet_dtypes, decoder_dtypes = [], []
    _dtypes_of(module.ema.model.out[2], unet_dtypes)
    _dtypes_of(module.autoencoder.decoder.conv_out, decoder_dtypes)
    images = [{"image": img, "caption": f"caption {i}"} for i, img in enumerate(_images(4, 3))]
    attention._probe.cache_clear()
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), pytest.warns(UserWarning, match="fall back") as caught:
        _validate(module, DataLoader(images, batch_size=4), "bf16-mixed", tmp_path)
    assert unet_dtypes and set(unet_dtypes) == {torch.bfloat16}, unet_dtypes
    assert decoder_dtypes and set(decoder_dtypes) == {torch.bfloat16}, decoder_dtypes
    fallbacks = [str(w.message) for w in caught if "fall back" in str(w.message)]
    assert any("head dim" in m and "bfloat16" in m for m in fallbacks), fallbacks
    # Once per kind of call (with autocast on and off), not per call: the loop ran dozens of attention calls.
    assert len(fallbacks) <= 2 * len(set(fallbacks)) <= 8, fallbacks


def test_attention_fallback_under_compile(one_thread):
    """The fallback is decided at trace time under torch.compile (fullgraph: no graph break) and gives what
    PyTorch's own kernel choice gives."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldm.nn import attention
    from ldm.nn.attention import SpatialSelfAttention

    torch.manual_seed(0)
    layer = SpatialSelfAttention(32, groups=4).eval()
    x = torch.randn(1, 32, 4, 4)
    expected = layer(x)
    attention._probe.cache_clear()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), pytest.warns(UserWarning, match="head dim 32 in float32"):
        out = compiled(x)
    torch.testing.assert_close(out, expected)
