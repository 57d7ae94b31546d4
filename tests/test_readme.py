"""Every command in the code blocks of README.md and docs/*.md runs as typed, in bash, in one scratch folder.

Pages run in reading order: README.md, then the docs/ pages in the order its "Documentation" table links them
(then any other docs/*.md by name), each page top to bottom, so a page may use what an earlier one made.
A command's test id is `<page>-<nn>` (`README-03`, `stage2-00`): `-k "[README- or [stage2-"` runs one page
with the README's setup (the bracket keeps `README` from matching this module's name).

What the test changes, and only that: tiny sizes and temporary paths (substitutions below, and overrides
appended to each train.py / sample.py line, which Hydra applies last), so the command keeps its keys and
its quoting. Brace patterns stay brace patterns. Commands that need a GPU, a cluster, the internet or the
whole 20-minute run are skipped, each with its reason in SKIP; a command that is in neither list fails the
test, so a new command on any page must be added to one of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"

SKIP = {
    "make train": "the 20-minute built-in run; its steps (train.py stage=vae, python -m ldm.data.latents, "
        "stage=ldm data.latents=true, sample.py) run below",
    "make test": "this test suite itself",
    ". .venv/bin/activate": "activates the environment this test already runs in",
    "python train.py stage=vae experiment=kl_f8_paper":
        "internet: downloads the published VGG16 + LPIPS heads and the FID Inception (lpips_pretrained=true, "
        "extractor=inception); offline, tests/test_prefetch.py covers those loaders with local files and "
        "tests/test_presets.py runs the preset for two steps shrunk, weights random",
    "python train.py stage=ldm experiment=txt2img_256_from_scratch":
        "8 GPUs and the published OpenCLIP ViT-H/14; tests/test_presets.py runs the preset shrunk on the CPU",
    "python train.py stage=ldm experiment=txt2img_512_from_256":
        "8 GPUs and the 256 run's export; tests/test_presets.py runs it shrunk on the CPU from a shrunk 256 export",
    "python train.py stage=vae model/autoencoder=sd model.autoencoder.init_from=/models/":
        "internet: a published Stable Diffusion VAE file; tests/test_autoencoder_compat.py loads test-made ones",
    "python train.py stage=ldm model.autoencoder.init_from=/models/":
        "internet: a published Stable Diffusion VAE folder; tests/test_autoencoder_compat.py loads test-made ones",
    "python -m ldm.prefetch": "internet: downloads published weights; tests/test_prefetch.py covers it offline",
    "python train.py stage=ldm model/text_encoder=openclip_vit_h14 paths.weights_cache=/shared/weights offline=true":
        "needs the cache that the prefetch above fills from the internet; tests/test_prefetch.py covers offline=true",
    "sbatch ": "cluster: tests/test_slurm.py runs the sbatch scripts on a local one-node SLURM",
    "squeue ": "cluster",
    "slurm/local_cluster.sh": "cluster: root and apt-get; tests/test_slurm.py starts and stops it",
    "python train.py -m hydra/launcher=slurm": "cluster: tests/test_slurm.py runs a sweep through the launcher",
    "python train.py stage=ldm trainer=gpu": "GPU",
    "python train.py stage=vae trainer=ddp trainer.devices=8": "8 then 4 GPUs; tests/test_data_resume.py resumes "
        "2 CPU ranks on 1, 1 on 3 and 2 -> 3 -> 1 with workers and checks the keys logs",
    "python train.py stage=vae trainer=ddp trainer.devices=4": "GPUs (see the line above)",
    "tensorboard --logdir": "a server that runs until stopped",
    '.to("cuda")': "GPU; tests/test_pipeline_compat.py runs the same from_pretrained and pipeline call on the CPU",
    'from_pretrained("exports/ldm/diffusers")':
        "needs a model diffusers can express (level widths multiples of 32; this test's tiny models use 16) that is "
        "not flow (the shapes recipe); tests/test_pipeline_compat.py runs the same calls on SD-shaped exports",
    "from ldm.autoencoder.model import AutoencoderKL":
        "internet: published Stable Diffusion files; tests/test_unet_compat.py and test_autoencoder_compat.py "
        "run the same calls on test-made ones",
}

RUN = ("python train.py", "python sample.py", "python -m ldm.", "python bench/")

# Temporary paths and tiny sizes for what the README names (its keys and quoting stay as they are).
SUBSTITUTIONS = [
    ("/data/laion/{00000..01023}.tar", "<tmp>/laion/{00000..00002}.tar"),
    ("/data/laion-val/{00000..00003}.tar", "<tmp>/laion-val/{00000..00001}.tar"),
    ("runs/ldm/2026-01-02_10-00-00", "<last_ldm_run>"),
    ("data.resolution=256", "data.resolution=32"),  # 32: room for an f8 autoencoder and the UNet's levels
    ("--shard-size 10000", "--shard-size 8"),
    ("--resolution 256 --text-encoder tiny", "--resolution 32 --text-encoder tiny width=32"),  # as TINY's tower
    ("--resolution 256", "--resolution 32"),  # the README's latents: the tiny runs' 32 px
    ("device=cuda", "device=cpu"),  # the GPU flag: the CPU runs the same path
    ("height=48 width=64", "height=32 width=64"),  # the README's earlier kl_f8 run left an f8 x 4 = 32 model
]
TINY_TRAIN = ["logger=csv", "trainer.accelerator=cpu", "data.resolution=32", "data.batch_size=4",
              "data.val_batch_size=4", "model.autoencoder.ch=16", "model.unet.model_channels=32",
              "model.unet.num_head_channels=16", "trainer.max_steps=2", "trainer.val_check_interval=2",
              "trainer.limit_val_batches=1", "checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false"]
TINY_LDM = ["stage.num_val_prompts=2", "stage.module.num_inference_steps=2", "stage.module.metrics.num_samples=4"]
TINY_SAMPLE = ["steps=2"]


def split_comment(line: str) -> str:
    """`line` without a trailing shell comment (a # outside quotes, after a space)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def pages() -> list[Path]:
    """README.md, then docs/*.md in the order the README's Documentation table links them, then the rest."""
    toc = README.read_text().split("\n## Documentation", 1)[-1]
    linked = [ROOT / name for name in dict.fromkeys(re.findall(r"\]\((docs/[\w.-]+\.md)\)", toc))]
    found = [page for page in linked if page.exists()]
    return [README, *found, *sorted(set(DOCS.glob("*.md")) - set(found))]


def page_commands(page: Path) -> list[tuple[str, str]]:
    """(language, command) for every shell line and every Python block of a page's code blocks."""
    commands = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", page.read_text(), re.S):
        if lang == "python":
            commands.append(("python", body))
        elif lang in ("bash", "sh", "shell"):
            for line in body.replace("\\\n", " ").splitlines():
                line = re.sub(r" {2,}", " ", split_comment(line.strip()))
                if line:
                    commands.append(("bash", line))
    return commands


def readme_commands() -> list[tuple[str, str, str]]:
    """(page id, language, command) over every page, in reading order; the page id is `README` or the docs stem."""
    return [(page.stem, lang, command) for page in pages() for lang, command in page_commands(page)]


def _matches(key: str, command: str) -> bool:
    """A SKIP key matches a shell line it starts, or a Python block it appears in."""
    return command.lstrip().startswith(key) or ("\n" in command and key in command)


def skip_reason(command: str) -> str | None:
    return next((reason for key, reason in SKIP.items() if _matches(key, command)), None)


def tiny(command: str, ctx: dict[str, str]) -> str:
    for old, new in SUBSTITUTIONS:
        for key, value in ctx.items():
            new = new.replace(f"<{key}>", value)
        command = command.replace(old, new)
    if command.startswith("python train.py"):
        # a key the command sets itself (logger=tensorboard, data.resolution) keeps the command's value
        extra = [o for o in TINY_TRAIN if f" {o.split('=')[0]}=" not in command]
        if not re.search(r"model/text_encoder=(class|none)", command):
            extra.append("model.text_encoder.width=32")
        if "model/autoencoder=identity" in command:  # no autoencoder to size
            extra.remove("model.autoencoder.ch=16")
        if "stage=ldm" in command:
            extra += TINY_LDM
        command += " " + " ".join(extra)
    elif command.startswith("python sample.py"):
        command += " " + " ".join(TINY_SAMPLE)
    elif command.startswith("python -m ldm.data.shapes"):
        command += " --num 64 --num-val 16 --resolution 32"
    return command


def prepare(tmp: Path) -> None:
    """What the README assumes the user has: photos with captions, a CSV list, a prompts file, shards."""
    import random

    from ldm.data.shapes import make_caption, render, write_shapes

    src = tmp / "_shapes"
    write_shapes(src, num_train=48, num_val=16, resolution=16, seed=3, shard_size=16)
    for split, target, count in (("train", "laion", 3), ("val", "laion-val", 1)):
        (tmp / target).mkdir()
        for i, shard in enumerate(sorted((src / split).glob("*.tar"))[:count]):
            shutil.copy(shard, tmp / target / f"{i:05d}.tar")
    (tmp / "laion-val" / "00001.tar").write_bytes((tmp / "laion-val" / "00000.tar").read_bytes())
    photos = tmp / "photos"
    photos.mkdir()
    rows = ["path,caption"]
    rng = random.Random(0)
    for i in range(12):
        image, attrs = render(rng, resolution=24)
        caption = make_caption(attrs["color"], attrs["shape"], attrs["background"])
        image.save(photos / f"{i:03d}.png")
        (photos / f"{i:03d}.txt").write_text(caption)
        rows.append(f"photos/{i:03d}.png,{caption}")
    (tmp / "val.csv").write_text("\n".join(rows) + "\n")
    (tmp / "prompts.txt").write_text("a red circle on a blue background\n\na green square on a white background\n")
    for name in ("train.py", "sample.py", "conf", "bench", "slurm"):
        (tmp / name).symlink_to(ROOT / name)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme")
    prepare(tmp)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return tmp, env


COMMANDS = readme_commands()


def command_ids(commands: list[tuple[str, str, str]]) -> list[str]:
    """`<page>-<nn>`, numbered within each page, so `-k stage2` selects a page (with `README or ...`: its setup)."""
    counts: dict[str, int] = {}
    ids = []
    for page, _, _ in commands:
        ids.append(f"{page}-{counts.get(page, 0):02d}")
        counts[page] = counts.get(page, 0) + 1
    return ids


def status(lang: str, command: str) -> str:
    """What the test does with a command: `run`, `skip` (with a reason in SKIP), or `unknown` (a failure)."""
    if skip_reason(command):
        return "skip"
    return "run" if lang == "python" or command.startswith(RUN) else "unknown"


def test_every_command_is_run_or_skipped_with_a_reason():
    unknown = [f"{page}: {c}" for page, lang, c in COMMANDS if status(lang, c) == "unknown"]
    assert not unknown, f"commands of README.md / docs/ the test neither runs nor skips (add them to RUN or SKIP): {unknown}"
    stale = [s for s in SKIP if not any(_matches(s, c) for _, _, c in COMMANDS)]
    assert not stale, f"SKIP entries that match no command of README.md / docs/: {stale}"


@pytest.mark.parametrize("page,lang,command", COMMANDS, ids=command_ids(COMMANDS))
def test_readme_command(scratch, page, lang, command):
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    tmp, env = scratch
    runs = sorted((tmp / "runs" / "ldm").glob("*/"), key=lambda p: p.stat().st_mtime)
    ctx = {"tmp": str(tmp), "last_ldm_run": str(runs[-1].relative_to(tmp)) if runs else "runs/ldm/none"}
    line = tiny(command, ctx)
    argv = [sys.executable, "-c", line] if lang == "python" else ["bash", "-c", line]
    proc = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{page}: $ {command}\n(ran: {tiny(command, ctx)})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    log = tmp / "ran.jsonl"
    with log.open("a") as f:
        f.write(json.dumps({"page": page, "command": command}) + "\n")


def _section(page: Path, heading: str) -> str:
    """The text under `heading` of `page`, up to the next heading of its level or above."""
    return page.read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def _table_first_column(page: Path, heading: str) -> list[str]:
    """The backticked names in the first column of the tables under `heading`."""
    rows = [line for line in _section(page, heading).splitlines() if line.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])]


def test_sampling_table_lists_every_option_and_no_other():
    from omegaconf import OmegaConf

    conf = OmegaConf.load(ROOT / "conf" / "sample.yaml")
    keys = {k for k in conf if k not in ("defaults", "hydra", "paths")} | {f"paths.{k}" for k in conf.paths}
    assert set(_table_first_column(DOCS / "stage2.md", "## Sampling")) == keys


def test_top_level_keys_table_lists_every_key_of_train_yaml():
    from omegaconf import OmegaConf

    conf = OmegaConf.load(ROOT / "conf" / "train.yaml")
    keys = set()
    for key in (k for k in conf if k not in ("defaults", "hydra")):
        value = conf[key]
        # perf.* is one row here: its keys are the speed-switch table of docs/performance.md
        nested = OmegaConf.is_dict(value) and key != "perf"
        keys |= {f"{key}.{sub}" for sub in value} if nested else {f"{key}.*" if key == "perf" else key}
    assert set(_table_first_column(DOCS / "configuration.md", "## Top-level keys")) == keys


def test_configuration_table_lists_every_group_and_choice():
    section = _section(DOCS / "configuration.md", "## Config groups")
    table = {}
    for row in (line for line in section.splitlines() if line.startswith("| `")):
        cells = row.split("|")
        table[re.findall(r"`([^`]+)`", cells[1])[0]] = set(re.findall(r"`([^`]+)`", cells[2]))
    on_disk = {}
    for folder in sorted(p for p in (ROOT / "conf").rglob("*") if p.is_dir() and list(p.glob("*.yaml"))):
        group = str(folder.relative_to(ROOT / "conf"))
        if group != "hydra/launcher":
            on_disk[group] = {p.stem for p in folder.glob("*.yaml")}
    assert table == on_disk


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_links_between_pages_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists and, with #anchor, a heading of it."""
    broken = []
    for page in pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)
