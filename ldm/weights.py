"""Which pretrained weights a composed run needs, where they live in the weights cache, how to fetch them.

One function, `needed_weights(cfg)`, serves both `python -m ldm.prefetch` (download what is missing, on a
login node) and `offline=true` (fail at start-up naming every missing file, then point each loader at the
cache), so the two can never disagree about what a run loads.

Cache layout under `paths.weights_cache`:

```
torch/hub/checkpoints/vgg16-397923af.pth                          torchvision VGG16 (LPIPS); TORCH_HOME layout
torch/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth   FID Inception (torch-fidelity)
lpips/vgg.pth                                                     LPIPS v0.1 linear heads
open_clip/<model>/<tag>/<weights file>                            OpenCLIP (text encoder, CLIP score)
```
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.errors import ConfigError

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # what torchmetrics' FID loads
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
OPENCLIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class Weight:
    """One file a run loads: where it goes in the cache, who asks for it, how offline mode points at it."""

    what: str                      # for people: "OpenCLIP ViT-H-14 / laion2b_s32b_b79k"
    key: str                       # the config key that asks for it
    path: Path                     # the file (for OpenCLIP: the folder that holds its one weights file)
    source: str                    # URL or hub repo, for the printout
    fetch: Callable[[Path], None] | None  # writes `path`; None: a file the user named, nothing to download
    settings: dict[str, Any] = field(default_factory=dict)  # config key -> value under offline=true
    folder: bool = False           # OpenCLIP: the file name depends on what the hub serves

    def present(self) -> bool:
        return find_openclip_file(self.path) is not None if self.folder else self.path.is_file()


# ---- downloads (the only network code; tests replace these two) ---------------------------------------

def download_url(url: str, dest: Path) -> None:
    """Fetch `url` to `dest` (torch.hub's downloader: progress bar, partial files never left behind)."""
    import torch.hub

    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dest), progress=True)


def download_openclip(model_name: str, tag: str, dest: Path) -> None:
    """Fetch an OpenCLIP checkpoint the way open_clip does (Hugging Face hub first, safetensors preferred,
    checksums on URLs), then move the one file into `dest/` so the cache is a plain folder of files."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name, tag)
    if not cfg:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {model_name!r}")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        got = Path(download_pretrained(cfg, cache_dir=tmp))
        os.replace(got.resolve(), dest / got.name)  # the hub cache holds a symlink to a blob: move the blob


# ---- what a config needs -------------------------------------------------------------------------------

def cache_root(cfg: Any) -> Path:
    return Path(str(cfg.paths.weights_cache)).expanduser()


def find_openclip_file(folder: str | os.PathLike) -> Path | None:
    """The weights file prefetch put in an OpenCLIP folder of the cache, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in OPENCLIP_SUFFIXES)
    return found[0] if found else None


def openclip_weights(cache_dir: str | os.PathLike, model_name: str, tag: str) -> Path | None:
    """A prefetched OpenCLIP file under an open_clip cache folder (`<cache>/open_clip`), or None.

    The text encoder (and any CLIP-score model) loads this file when it exists: no hub lookup at all.
    """
    return find_openclip_file(Path(cache_dir) / model_name / tag)


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, mapping) for `node` and every mapping below it."""
    from omegaconf import DictConfig

    if isinstance(node, (dict, DictConfig)):
        yield prefix, node
        for key, value in node.items():
            yield from _walk(value, f"{prefix}.{key}")


def _openclip(cache: Path, key: str, model_name: str, tag: str, settings: dict[str, Any]) -> Weight:
    folder = cache / "open_clip" / model_name / tag
    return Weight(f"OpenCLIP {model_name} / {tag}", key, folder, f"open_clip {model_name} {tag}",
                  lambda dest: download_openclip(model_name, tag, dest), settings, folder=True)


def _copy_lpips_heads(dest: Path) -> None:
    """The heads ship inside the `lpips` package; without it, download the same file."""
    try:
        import lpips

        shutil.copyfile(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", dest)
    except (ImportError, FileNotFoundError):
        download_url(LPIPS_URL, dest)


def needed_weights(cfg: Any) -> list[Weight]:
    """Every pretrained file the run `cfg` (a composed train.yaml) will load, in load order.

    Random-init settings (the defaults: tiny text tower, lpips_pretrained=false, the small FID extractor)
    need nothing. A path the user set explicitly (lpips_weights_path, feature_extractor_weights_path) is
    listed so offline mode checks it, but prefetch cannot fetch it.
    """
    cache = cache_root(cfg)
    hub = cache / "torch" / "hub" / "checkpoints"
    module = cfg.stage.module
    needed: list[Weight] = []
    if cfg.stage.name == "ldm" and not cfg.model.get("init_from"):  # with init_from the text tower is in the files
        text = cfg.model.text_encoder
        if text.get("kind", "openclip") == "openclip" and text.get("model_name") and text.get("pretrained"):
            needed.append(_openclip(cache, "model.text_encoder.pretrained", str(text.model_name), str(text.pretrained),
                                    {"model.text_encoder.cache_dir": str(cache / "open_clip")}))
    loss = module.get("loss") or {}
    if loss.get("lpips_pretrained"):
        key = "stage.module.loss.lpips_pretrained"
        needed.append(Weight("torchvision VGG16 (LPIPS features)", key, hub / Path(VGG16_URL).name, VGG16_URL,
                             lambda dest: download_url(VGG16_URL, dest)))
        if loss.get("lpips_weights_path"):
            needed.append(Weight("LPIPS heads", "stage.module.loss.lpips_weights_path",
                                 Path(str(loss.lpips_weights_path)), "your file", None))
        else:
            needed.append(Weight("LPIPS v0.1 heads", key, cache / "lpips" / "vgg.pth", "the lpips package",
                                 _copy_lpips_heads,
                                 {"stage.module.loss.lpips_weights_path": str(cache / "lpips" / "vgg.pth")}))
    for key, node in _walk(module.get("metrics") or {}, "stage.module.metrics"):
        if node.get("enabled", True) is False:
            continue
        if node.get("extractor") == "inception":
            if node.get("feature_extractor_weights_path"):
                needed.append(Weight("FID Inception", f"{key}.feature_extractor_weights_path",
                                     Path(str(node.feature_extractor_weights_path)), "your file", None))
            else:
                path = hub / Path(INCEPTION_URL).name
                needed.append(Weight("FID Inception (torch-fidelity)", f"{key}.extractor", path, INCEPTION_URL,
                                     lambda dest: download_url(INCEPTION_URL, dest),
                                     {f"{key}.feature_extractor_weights_path": str(path)}))
        if node.get("model_name") and node.get("pretrained"):  # an OpenCLIP scoring model (CLIP score)
            settings = {f"{key}.cache_dir": str(cache / "open_clip")} if "cache_dir" in node else {}
            needed.append(_openclip(cache, f"{key}.pretrained", str(node.model_name), str(node.pretrained), settings))
    seen: set[Path] = set()
    return [w for w in needed if not (w.path in seen or seen.add(w.path))]  # one entry per file


# ---- prefetch and offline ------------------------------------------------------------------------------

def prefetch(cfg: Any, log: Callable[[str], None] = print) -> list[Weight]:
    """Download every missing file `cfg` needs into the cache; returns the list, each present afterwards."""
    needed = needed_weights(cfg)
    if not needed:
        log("[ldm] this config loads no pretrained weights; nothing to fetch")
    for w in needed:
        if w.present():
            log(f"[ldm] present  {w.path}  ({w.what})")
            continue
        if w.fetch is None:
            raise ConfigError(f"{w.key}={w.path}: no such file, and prefetch cannot fetch a file you named")
        target = w.path if w.folder else w.path.with_name(w.path.name + ".part")
        target.parent.mkdir(parents=True, exist_ok=True)
        w.fetch(target)
        if target != w.path:
            os.replace(target, w.path)  # a crash mid-download never leaves a file offline mode would trust
        log(f"[ldm] fetched  {w.path}  ({w.what}, from {w.source})")
    return needed


def missing_message(cfg: Any, missing: list[Weight], overrides: list[str] | None = None) -> str:
    lines = [f"the weights cache paths.weights_cache={cache_root(cfg)} lacks "
             f"{len(missing)} file(s) this run loads:"]
    for w in missing:
        shown = f"{w.path}/ (a *.safetensors or *.bin file)" if w.folder else w.path
        lines.append(f"  {shown}   {w.what}; asked for by {w.key}")
    args = " ".join(overrides or []) or "<the same overrides>"
    lines.append(f"Fetch them where there is internet, with the same config: python -m ldm.prefetch {args}")
    return "\n".join(lines)


def use_offline_cache(cfg: Any, overrides: list[str] | None = None) -> list[Weight]:
    """offline=true at start-up: every needed file must be in the cache (a ConfigError names each missing
    one); then the hubs are switched off and each loader is pointed at its file, by config key."""
    from omegaconf import OmegaConf, open_dict

    needed = needed_weights(cfg)
    missing = [w for w in needed if not w.present()]
    if missing:
        raise ConfigError("offline=true: " + missing_message(cfg, missing, overrides))
    cache = cache_root(cfg)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    os.environ["TORCH_HOME"] = str((cache / "torch").resolve())  # torchvision's VGG16 is found in the cache
    os.environ.setdefault("WANDB_MODE", "offline")  # a compute node without internet: sync the run later
    try:  # huggingface_hub reads HF_HUB_OFFLINE once, at import
        import sys

        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    except AttributeError:  # pragma: no cover
        pass
    with open_dict(cfg):
        for w in needed:
            for key, value in w.settings.items():
                OmegaConf.update(cfg, key, value, force_add=True)
    return needed
