"""FID and CLIP score of generated samples: values, real statistics kept across resets, and DDP sync."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.metrics.generation import GenerationMetrics

CONFIG = {"fid": {"extractor": "small", "num_features": 16}, "clip_score": {"model_name": None}}
N = 12


def data() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(0)
    real = torch.rand(N, 3, 16, 16, generator=g) * 2 - 1
    fake = (real + 0.5 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    prompts = [f"a {c} square on a {b} background" for c in ("red", "blue", "green") for b in ("white", "black",
                                                                                              "grey", "pink")]
    return real, fake, prompts


def compute(metrics: GenerationMetrics, rank: int, world: int) -> dict[str, float]:
    real, fake, prompts = data()
    metrics.update_real(real[rank::world])
    metrics.update_generated(fake[rank::world], prompts[rank::world])
    return {k: float(v) for k, v in metrics.compute().items()}


def _worker(rank: int, world: int, init_file: str, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out[rank] = compute(GenerationMetrics(**CONFIG), rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_thread")
def test_values_and_real_statistics_survive_reset():
    metrics = GenerationMetrics(**CONFIG)
    first = compute(metrics, 0, 1)
    assert first["fid"] > 0 and first["clip_score"] > 0
    # CLIP score by hand with the same tower: 100 x cosine(image, caption) floored at 0, averaged over samples
    from ldm.metrics.clip_score import build_openclip

    model, processor = build_openclip(None)
    _, fake, prompts = data()
    with torch.no_grad():
        image = model.get_image_features(processor(images=list((fake + 1) / 2 * 255))["pixel_values"])
        text = model.get_text_features(processor(text=prompts)["input_ids"])
    by_hand = (100 * torch.nn.functional.cosine_similarity(image, text)).clamp(min=0).mean()
    assert first["clip_score"] == pytest.approx(float(by_hand), rel=1e-4)
    metrics.reset()  # a new validation: generated samples again, the real statistics are kept
    _, fake, prompts = data()
    metrics.update_generated(fake, prompts)
    again = {k: float(v) for k, v in metrics.compute().items()}
    assert again == pytest.approx(first, rel=1e-5)
    metrics.reset()
    _, _, prompts = data()
    real, _, _ = data()
    metrics.update_generated(real, prompts)  # the real images themselves: FID ~ 0
    assert float(metrics.compute()["fid"]) < first["fid"] / 10


@pytest.mark.usefixtures("one_thread")
def test_two_ranks_equal_one_process(tmp_path):
    single = compute(GenerationMetrics(**CONFIG), 0, 1)
    with mp.Manager() as manager:
        out = manager.dict()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
        results = dict(out)
    assert results[0] == pytest.approx(single, rel=1e-4) and results[1] == pytest.approx(single, rel=1e-4)
