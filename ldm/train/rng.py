"""Per-step random generators, so that a resumed run draws what an uninterrupted one would have drawn."""

from __future__ import annotations

import torch


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed that depends on (run seed, step, rank) alone, not on how many numbers were drawn before."""
    return ((int(seed) * 1_000_003 + int(step)) * 1_009 + int(rank)) % 2**63


def step_generators(seed: int, step: int, rank: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(CPU, device) generators seeded by `step_seed`; one generator serves both on a CPU run."""
    value = step_seed(seed, step, rank)
    cpu = torch.Generator().manual_seed(value)
    if torch.device(device).type == "cpu":
        return cpu, cpu
    return cpu, torch.Generator(device=device).manual_seed(value)
