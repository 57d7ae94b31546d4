"""The speed switches of config `perf`: process-wide backend flags and torch.compile of the trained networks.

Applied by every rank before `fit` (Lightning relaunches train() per DDP rank, so process-wide flags reach all).
`nn.Module.compile` compiles in place: state-dict keys, checkpoints, EMA and exports are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.train.checks import ConfigError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
_SDPA_SETTERS = {"flash": "enable_flash_sdp", "efficient": "enable_mem_efficient_sdp",
                 "cudnn": "enable_cudnn_sdp", "math": "enable_math_sdp"}


def check_perf(perf: Mapping[str, Any]) -> None:
    """Refuse bad values at start-up, naming the key."""
    known = {"compile", "compile_mode", "compile_backend", "tf32", "cudnn_benchmark", "channels_last",
             "sdpa_backends", "progress_bar_refresh_steps"}
    unknown = sorted(set(perf) - known)
    if unknown:
        raise ConfigError(f"perf: unknown key(s) {unknown}; known: {sorted(known)}")
    mode = perf.get("compile_mode", "default")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"perf.compile_mode={mode!r}: choose one of {COMPILE_MODES}")
    backend = perf.get("compile_backend", "inductor")
    if perf.get("compile") and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"perf.compile_backend={backend!r}: not a torch.compile backend here; "
                          f"choose one of {torch._dynamo.list_backends(exclude_tags=())}")
    refresh = perf.get("progress_bar_refresh_steps")
    if refresh is not None and (not isinstance(refresh, int) or isinstance(refresh, bool) or refresh < 1):
        raise ConfigError(f"perf.progress_bar_refresh_steps={refresh!r}: null (trainer.log_every_n_steps) or an "
                          "integer >= 1")
    backends = perf.get("sdpa_backends")
    if backends is not None:
        if isinstance(backends, str) or not backends or any(b not in SDPA_BACKENDS for b in backends):
            raise ConfigError(f"perf.sdpa_backends={backends!r}: null (PyTorch picks) or a non-empty list "
                              f"of {SDPA_BACKENDS}")


def apply_backend_flags(perf: Mapping[str, Any]) -> list[str]:
    """TF32, cuDNN autotuning and the allowed SDPA kernels. CUDA only: on a CPU-only machine nothing is set, as
    float32 precision "high" would also let oneDNN use TF32 on CPUs that have it. Returns what was set."""
    if not torch.cuda.is_available():
        return []
    done = []
    tf32 = bool(perf.get("tf32", True))
    # The stable API only: torch refuses to report the matmul precision once legacy and new flags are mixed.
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    if tf32:
        done.append("tf32")
    torch.backends.cudnn.benchmark = bool(perf.get("cudnn_benchmark", True))
    if torch.backends.cudnn.benchmark:
        done.append("cudnn.benchmark")
    backends = perf.get("sdpa_backends")
    if backends is not None:
        for name, setter in _SDPA_SETTERS.items():
            getattr(torch.backends.cuda, setter)(name in backends)
        done.append(f"sdpa={','.join(backends)}")
    return done


def compile_targets(module: nn.Module) -> dict[str, nn.Module]:
    """The networks a stage trains, by name. The frozen parts (stage 2's autoencoder and text encoder, the EMA
    copy used for sampling) stay eager: they run once per batch or only at validation."""
    targets = getattr(module, "compile_targets", None)
    if targets is None:
        raise ConfigError(f"perf.compile=true: {type(module).__name__} does not name what to compile "
                          "(a compile_targets() method)")
    return dict(targets())


def apply_model_perf(module: nn.Module, perf: Mapping[str, Any]) -> list[str]:
    """channels_last and torch.compile, before Lightning moves the module to its device (formats survive `.to`)."""
    done = []
    if perf.get("channels_last"):
        module.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if perf.get("compile"):
        mode = perf.get("compile_mode", "default")
        backend = perf.get("compile_backend", "inductor")
        if getattr(module, "compile_retains_graph", False):
            # AOTAutograd frees ("donates") saved buffers during a compiled backward, which then cannot run twice;
            # stage 1's adaptive GAN weight differentiates through the decoder with retain_graph=True.
            torch._functorch.config.donated_buffer = False
        for name, target in compile_targets(module).items():
            target.compile(backend=backend, mode=None if mode == "default" or backend != "inductor" else mode)
            done.append(f"compile {name} ({backend}, {mode})")
    return done


def compile_per_shape(num_shapes: int) -> list[str]:
    """Aspect buckets under torch.compile: one static graph per bucket shape, and loud if that runs out.

    Dynamo would otherwise turn the sizes dynamic at the second shape (one slower symbolic graph), or,
    once a code object has recompiled `recompile_limit` times (8), silently run it eager. Each bucket
    needs a training graph and up to two validation graphs (no-grad, full and partial last batch).
    """
    config = torch._dynamo.config
    limit = 4 * num_shapes + 8
    config.automatic_dynamic_shapes = False
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)
    config.fail_on_recompile_limit_hit = True  # an error naming the limit, never a silent fall back to eager
    return [f"static graph per bucket shape ({num_shapes} buckets, recompile_limit {config.recompile_limit})"]
