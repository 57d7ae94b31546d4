"""Stage 1 recipe: patch-GAN, adaptive weight, manual optimization with two optimizers, reconstruction metrics."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.autoencoder.discriminator import NLayerDiscriminator
from ldm.autoencoder.loss import VAELoss, adaptive_weight, hinge_d_loss, vanilla_d_loss
from ldm.autoencoder.module import AutoencoderModule
from ldm.metrics.fid import SmallFeatureExtractor
from ldm.metrics.reconstruction import ReconstructionMetrics

TINY_AE = dict(embed_dim=4, z_channels=4, ch=16, ch_mult=[1, 2], num_res_blocks=1, resolution=16)


@pytest.mark.parametrize("num_layers,size,out", [(3, 32, 2), (2, 32, 6), (1, 16, 6)])
def test_patch_discriminator_gives_a_logit_map(num_layers, size, out):
    d = NLayerDiscriminator(ndf=8, num_layers=num_layers)
    assert d(torch.randn(2, 3, size, size)).shape == (2, 1, out, out)


def test_gan_losses():
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert hinge_d_loss(real, fake).item() == 0.0  # both beyond the margin
    assert hinge_d_loss(fake, real).item() == pytest.approx(3.0)
    expected = torch.nn.functional.softplus(torch.tensor(-2.0)).item()
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)


def test_adaptive_weight_is_the_gradient_norm_ratio_and_scale_invariant():
    w = torch.nn.Parameter(torch.randn(3, 3))
    nll = (w * 4.0).sum()  # gradient 4 everywhere
    g = (w * -0.5).sum()  # gradient -0.5 everywhere
    ratio = adaptive_weight(nll, g, w)
    assert ratio.item() == pytest.approx(4.0 / (0.5 + 1e-4 / 3), rel=1e-4)
    assert adaptive_weight(nll, g, w, scale=torch.tensor(1024.0)).item() == pytest.approx(ratio.item(), rel=1e-5)
    huge = adaptive_weight(nll, (w * 0.0).sum(), w)
    assert huge.item() == pytest.approx(1e4)  # clamped


def test_generator_loss_adds_the_gan_term_only_from_disc_start():
    loss = VAELoss(perceptual_weight=0.0, disc_start=5, disc_ndf=8, disc_num_layers=1)
    x = torch.randn(2, 3, 16, 16)
    last = torch.nn.Parameter(torch.randn(3, 8, 3, 3))
    recon = torch.nn.functional.conv2d(torch.randn(2, 8, 16, 16), last, padding=1)
    from ldm.autoencoder.distribution import DiagonalGaussian

    post = DiagonalGaussian(torch.randn(2, 8, 8, 8))
    _, logs = loss.generator(x, recon, post, global_step=4, last_layer=last)
    assert "g_loss" not in logs
    total, logs = loss.generator(x, recon, post, global_step=5, last_layer=last)
    assert {"g_loss", "adaptive_weight", "logits_fake_g"} <= set(logs)
    rec_only, _, _ = loss.reconstruction(x, recon, post)
    expected = rec_only + logs["adaptive_weight"] * logs["g_loss"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    d_loss, d_logs = loss.discriminator_loss(x, recon, global_step=4)
    assert d_loss.item() == 0.0 and "logits_real" in d_logs  # factor 0 before disc_start


def _loader(n: int = 40, size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    items = [{"image": images[i], "caption": "x", "key": str(i)} for i in range(n)]
    return DataLoader(items, batch_size=4, collate_fn=lambda b: {
        "image": torch.stack([s["image"] for s in b]), "caption": [s["caption"] for s in b],
        "key": [s["key"] for s in b]})


def _module(**kw) -> AutoencoderModule:
    loss = dict(perceptual_weight=0.0, disc_start=2, disc_ndf=8, disc_num_layers=1)
    return AutoencoderModule(autoencoder=TINY_AE, loss=loss, lr=1e-3, image_log_every=0,
                             metrics={"fid": {"extractor": "small", "num_features": 16}}, **kw)


def _trainer(tmp_path, max_steps: int, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=2,
                val_check_interval=max_steps)
    return pl.Trainer(**{**args, **kw})


def test_manual_optimization_counts_only_autoencoder_steps(tmp_path):
    module = _module(grad_clip=1.0)
    disc_before = [p.detach().clone() for p in module.loss.discriminator.parameters()]
    trainer = _trainer(tmp_path, 5, enable_checkpointing=True)
    trainer.fit(module, train_dataloaders=_loader(), val_dataloaders=_loader(8))
    assert trainer.global_step == 5  # max_steps means autoencoder updates, not updates of both optimizers
    assert module.optimizer_steps == [5, 3]  # discriminator from step 2 on
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.loss.discriminator.parameters(), strict=True))
    for key in ("val/psnr", "val/ssim", "val/lpips", "val/rfid"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("loss.discriminator.") for k in keys)  # needed to resume the GAN
    assert not any(k.startswith(("loss.lpips.", "val_metrics.")) for k in keys)  # frozen nets stay out
    assert len(ckpt["optimizer_states"]) == 2 and ckpt["optimizer_steps"] == [5, 3]


def test_bf16_mixed_trains_with_finite_losses(tmp_path):
    module = _module()
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["loss"]))

    trainer = _trainer(tmp_path, 3, precision="bf16-mixed", callbacks=[Record()], enable_checkpointing=False,
                       limit_val_batches=0)
    trainer.fit(module, train_dataloaders=_loader())
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert module.optimizer_steps == [3, 1]


def test_reconstruction_metrics():
    m = ReconstructionMetrics(fid={"extractor": "small", "num_features": 16})
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    noisy = x + 0.05 * torch.randn_like(x)
    m.update(x, noisy)
    out = m.compute()
    mse = ((noisy.clamp(-1, 1) - x) ** 2).mean()
    assert out["psnr"].item() == pytest.approx((10 * torch.log10(4.0 / mse)).item(), rel=1e-4)
    assert 0.9 < out["ssim"].item() <= 1.0
    assert out["lpips"].item() >= 0 and torch.isfinite(out["rfid"])
    m.reset()
    m.update(x, x)
    assert m.compute()["ssim"].item() == pytest.approx(1.0, abs=1e-4)


def test_small_fid_extractor_is_identical_on_every_rank():
    a, b = SmallFeatureExtractor(16), SmallFeatureExtractor(16)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(a(x), b(x)) and a(x).shape == (2, 16)


def test_lpips_heads_load_from_a_local_file(tmp_path):
    """The offline path of `lpips_weights_path`: the published heads' key layout, read with weights_only."""
    from ldm.autoencoder.lpips import _VGG_CHANNELS, LPIPS

    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(_VGG_CHANNELS)}
    path = tmp_path / "vgg.pth"
    torch.save(heads, path)
    lp = LPIPS(pretrained=False, weights_path=str(path))
    for i, lin in enumerate(lp.lins):
        assert torch.equal(lin.weight, heads[f"lin{i}.model.1.weight"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert lp(x, x).item() == pytest.approx(0.0, abs=1e-6) and lp(x, -x).item() > 0


def test_equivariance_loss_decodes_the_downscaled_turned_latent():
    torch.manual_seed(0)
    module = _module(equivariance_weight=1.0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = module.autoencoder.encode(x)
    for step in range(4):  # the quarter turn is the step's, so a resumed run computes the same term
        z = torch.rot90(torch.nn.functional.avg_pool2d(posterior.mode(), 2), step, dims=(2, 3))
        target = torch.rot90(torch.nn.functional.avg_pool2d(x, 2), step, dims=(2, 3))
        expected = (module.autoencoder.decode(z) - target).abs().mean() * x[0].numel()  # the L1 term's scale
        assert module.equivariance_loss(x, posterior, step).item() == pytest.approx(expected.item(), rel=1e-6)
    # a turn matters: a random decoder is not rotation-equivariant
    assert module.equivariance_loss(x, posterior, 0).item() != pytest.approx(
        module.equivariance_loss(x, posterior, 1).item(), rel=1e-4)


def test_equivariance_weight_trains_the_term_down(tmp_path, one_thread):
    """With the weight on, training lowers the equivariance error below the same run's without it.

    One thread: the same sums in the same order every time, so the two runs differ only by the term."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 1, 1, generator=g).expand(8, 3, 16, 16).clone() * 2 - 1  # flat backgrounds
    for i in range(8):  # one flat square each, as on the built-in data
        top, left = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
        images[i, :, top:top + 6, left:left + 6] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    loader = DataLoader([{"image": im} for im in images], batch_size=4,
                        collate_fn=lambda b: {"image": torch.stack([s["image"] for s in b])})

    def train(weight: float) -> float:
        torch.manual_seed(0)
        module = AutoencoderModule(autoencoder=TINY_AE, loss=dict(perceptual_weight=0.0, disc_start=10_000),
                                   lr=5e-3, image_log_every=0, equivariance_weight=weight)
        trainer = _trainer(tmp_path / str(weight), 100, enable_checkpointing=False, limit_val_batches=0)
        trainer.fit(module, train_dataloaders=loader)
        x = images
        with torch.no_grad():
            return float(sum(module.equivariance_loss(x, module.autoencoder.encode(x), k) for k in range(4)) / 4)

    off, on = train(0.0), train(1.0)
    assert on < 0.85 * off, (on, off)  # 0.67 measured (one thread); without the term applied the two runs match
