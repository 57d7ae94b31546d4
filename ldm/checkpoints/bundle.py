"""Old import path of the stage=ldm export folder: its layout now lives in `ldm.checkpoints.bundle_layout`, and
what builds or writes a whole LatentDiffusionModule in `ldm.bundle`, one layer above training.

Every name keeps working from here. The whole-model ones (`load_ldm`, `write_bundle`, ...) are looked up in
`ldm.bundle` when first asked for, so importing this path for the layout (sample.py's checks) loads no model code.
"""

from __future__ import annotations

from typing import Any

from ldm.checkpoints.bundle_layout import (  # noqa: F401  (re-exported)
    AUTOENCODER_DIR,
    BUNDLE_CONFIG,
    EMA_WEIGHTS,
    TEXT_WEIGHTS,
    is_bundle,
    latent_factor,
    plain,
    read_config,
    read_hparams,
    sampling_conditioner,
)

_WHOLE_MODEL = ("load_bundle", "load_ldm", "write_bundle", "write_outside_layouts")


def __getattr__(name: str) -> Any:
    if name in _WHOLE_MODEL:
        # reason: start-up time of sample.py, which checks its settings through this path before Lightning loads
        from ldm import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
