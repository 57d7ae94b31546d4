"""Conditioning modes: OpenCLIP text, learned class embeddings, unconditional; all through one module."""

from __future__ import annotations

import pytest
import torch

from ldm.conditioning import build_conditioner
from ldm.conditioning.class_embedding import ClassEmbedder
from tests.conftest import randomize
from tests.ldm_factory import tiny_ldm

torch.set_num_threads(1)


def batch(captions: list[str], resolution: int = 8) -> dict:
    images = torch.rand(len(captions), 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"image": images, "caption": captions}


def test_class_labels_by_index_name_and_null():
    emb = ClassEmbedder(3, 8, class_names=["cat", "dog", "owl"])
    assert emb.labels(["2", "dog", "", 0]).tolist() == [2, 1, 3, 0]
    assert emb(["cat", ""]).shape == (2, 1, 8)
    with pytest.raises(ValueError, match="'fox' is neither"):
        emb.labels(["fox"])
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        emb.labels(["3"])
    with pytest.raises(ValueError, match="2 names for num_classes=3"):
        ClassEmbedder(3, 8, class_names=["a", "b"])


def test_build_conditioner_kinds():
    assert isinstance(build_conditioner({"kind": "class", "num_classes": 4, "embed_dim": 8}), ClassEmbedder)
    assert build_conditioner({"kind": "none"})(["x"]) is None
    with pytest.raises(ValueError, match="openclip.*class.*none"):
        build_conditioner({"kind": "t5"})


def _one_step(module, captions: list[str]) -> torch.Tensor:
    module.train()
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    loss = module.training_step(batch(captions), 0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def test_class_conditional_module_trains_the_embedding_and_averages_it():
    module = tiny_ldm(text_encoder={"kind": "class", "num_classes": 4, "embed_dim": 16}, cond_drop_prob=0.0)
    module.log = lambda *a, **k: None
    assert module.unet.config["context_dim"] == 16
    assert module.text_encoder_ema is not None
    randomize(module.unet, seed=0, std=0.05)  # a fresh UNet's zero output layer would pass back no gradient
    before = module.text_encoder.embedding.weight.detach().clone()
    _one_step(module, ["0", "1", "1", "3"])
    changed = (module.text_encoder.embedding.weight - before).abs().sum(dim=1) > 0
    assert changed.tolist() == [True, True, False, True, False]  # the batch's classes (SGD, no decay)
    module.on_train_batch_end(None, None, 0)
    ema_w = module.text_encoder_ema.model.embedding.weight
    assert not torch.equal(ema_w, before) and not torch.equal(ema_w, module.text_encoder.embedding.weight)
    images = module.generate(["2", "3"], seed=5)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    torch.testing.assert_close(module.generate(["2", "3"], seed=5), images, atol=0, rtol=0)


def test_unconditional_module_has_no_context():
    module = tiny_ldm(text_encoder={"kind": "none"}, guidance_scale=1.0)
    module.log = lambda *a, **k: None
    assert module.unet.config["context_dim"] is None and module.text_encoder_ema is None
    assert torch.isfinite(_one_step(module, ["", ""]))
    assert module.generate(["", "", ""], seed=1).shape == (3, 3, 8, 8)


def test_text_module_keeps_the_text_tower_frozen():
    module = tiny_ldm()
    assert not module.conditioner_trains and module.text_encoder_ema is None
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("unet.") for n in names)


def test_trained_text_tower_takes_its_own_learning_rate_through_the_warm_up():
    module = tiny_ldm(text_encoder={"kind": "openclip", "width": 16, "heads": 2, "layers": 1, "context_length": 8,
                                    "freeze": False}, lr=1e-3, text_encoder_lr=1e-4, warmup_steps=4)
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    unet_group, text_group = opt.param_groups
    assert {id(p) for p in unet_group["params"]} == {id(p) for p in module.unet.parameters()}
    assert {id(p) for p in text_group["params"]} == {id(p) for p in module.text_encoder.parameters()}
    for _ in range(4):
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])  # warm-up over, ratio kept
    default = tiny_ldm(text_encoder={"kind": "openclip", "width": 16, "heads": 2, "layers": 1, "context_length": 8,
                                     "freeze": False}, lr=1e-3, warmup_steps=0)
    (group,) = default.configure_optimizers()["optimizer"].param_groups  # one group, as before the option
    trained = [*default.unet.parameters(), *default.text_encoder.parameters()]
    assert group["lr"] == 1e-3 and {id(p) for p in group["params"]} == {id(p) for p in trained}
