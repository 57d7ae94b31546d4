"""Post-hoc EMA: `python -m ldm.ema_reconstruct RUN sigma_rel=0.07` (or sigma_rel=[0.05,0.07,0.12]).

Solves, from the power-function EMA snapshots a stage=ldm run wrote (model.posthoc_ema, RUN/posthoc_ema/), for
the EMA of each asked length by least squares over the profiles' inner products (EDM2; ldm.diffusion.posthoc_ema),
and writes each as an export (the layout `python -m ldm.export` writes) to OUT/sigma_rel_<value>/, which
`python sample.py ckpt=...`, `python -m ldm.evaluate ckpt=...` and diffusers read.

Options (key=value): sigma_rel (one value or a list), step (reconstruct the EMA as of this global step, from the
snapshots up to it; default the last snapshot), out (default RUN/ema_reconstruct).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ldm.train.checks import ConfigError

KEYS = ("sigma_rel", "step", "out")


def reconstruct(run: str | Path, sigma_rels: list[float], step: int | None = None,
                out: str | Path | None = None) -> list[dict[str, Any]]:
    """One export per sigma_rel; returns what each one is (also written beside it as posthoc_ema.json)."""
    from ldm.checkpoints.bundle import load_ldm, write_bundle
    from ldm.checkpoints.ema_snapshots import SNAPSHOT_DIR, combine, list_snapshots
    from ldm.checkpoints.files import write_json
    from ldm.diffusion.posthoc_ema import reconstruction_error, sigma_rel_to_gamma, solve_coefficients
    from ldm.sampling import resolve_checkpoint

    run = Path(run)
    folder = run / SNAPSHOT_DIR
    snapshots = list_snapshots(folder, "profile") if folder.is_dir() else []
    if not snapshots:
        raise ConfigError(f"RUN={run}: no post-hoc EMA snapshots in {folder}; train with "
                          f"model.posthoc_ema.sigma_rels=[0.05,0.10] (docs/posthoc_ema.md)")
    if not sigma_rels:
        raise ConfigError("sigma_rel: give one length (sigma_rel=0.07) or a list (sigma_rel=[0.05,0.07])")
    try:
        gammas = [sigma_rel_to_gamma(float(s)) for s in sigma_rels]
    except ValueError as err:
        raise ConfigError(f"sigma_rel: {err}") from None
    last = max(s.step for s in snapshots)
    step = last if step is None else int(step)
    used = [s for s in snapshots if s.step <= step]
    if not used or step > last:
        raise ConfigError(f"step={step}: the snapshots cover steps {snapshots[0].step}..{last}")
    offsets = {s.step - s.t for s in used}  # the profiles' t counts from where they started (0, or a resume)
    if len(offsets) != 1:
        raise ConfigError(f"{folder}: snapshots of profiles that started at different steps ({sorted(offsets)}) "
                          f"cannot be combined")
    target_t = step - offsets.pop()
    basis = [(s.t, s.gamma) for s in used]
    coefficients = solve_coefficients(basis, [(target_t, g) for g in gammas])

    source = resolve_checkpoint(str(run), str(run.parent))
    try:
        module = load_ldm(source)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"RUN={run}: cannot load its stage=ldm model from {source}: {err}") from err
    out = Path(out) if out is not None else run / "ema_reconstruct"
    pixel_space = (module.hparams.get("autoencoder") or {}).get("kind") == "identity"
    results = []
    for j, (sigma_rel, gamma) in enumerate(zip(sigma_rels, gammas, strict=True)):
        x = coefficients[:, j]
        state = combine(used, x.tolist())
        _load_into(module, state)
        target = out / f"sigma_rel_{float(sigma_rel):.4f}"
        write_bundle(module, target, outside_layouts=not pixel_space)
        info = {"sigma_rel": float(sigma_rel), "gamma": gamma, "step": step, "t": target_t,
                "profile_error": reconstruction_error(basis, (target_t, gamma), x),
                "snapshots": [{"file": s.path.name, "sigma_rel": s.sigma_rel, "t": s.t, "coefficient": float(c)}
                              for s, c in zip(used, x, strict=True)],
                "run": str(run), "model_from": str(source), "export": str(target)}
        write_json(info, target / "posthoc_ema.json")
        results.append(info)
    return results


def _load_into(module: Any, state: dict[str, Any]) -> None:
    """The solved weights into the module's EMA copies, the ones write_bundle exports and sampling uses."""
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        name, _, rest = key.partition(".")
        parts.setdefault(name, {})[rest] = value
    targets = {"unet": module.ema.model}
    if getattr(module, "text_encoder_ema", None) is not None:
        targets["text_encoder"] = module.text_encoder_ema.model
    if set(parts) != set(targets):
        raise ConfigError(f"the snapshots hold {sorted(parts)} but the run's model averages {sorted(targets)}")
    for name, weights in parts.items():
        targets[name].load_state_dict(weights, strict=True)


def parse_args(argv: list[str]) -> tuple[str, dict[str, Any]]:
    from omegaconf import OmegaConf

    runs = [a for a in argv if "=" not in a]
    if len(runs) != 1 or any(a in ("-h", "--help") for a in argv):
        raise ConfigError(__doc__.strip() if any(a in ("-h", "--help") for a in argv) else
                          "usage: python -m ldm.ema_reconstruct RUN sigma_rel=0.07 [step=N] [out=DIR]")
    pairs = [a for a in argv if "=" in a]
    unknown = sorted({p.split("=", 1)[0] for p in pairs} - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known: {list(KEYS)}")
    options = OmegaConf.to_container(OmegaConf.from_dotlist(pairs), resolve=True)
    sigma = options.get("sigma_rel")
    options["sigma_rel"] = [] if sigma is None else [float(s) for s in (sigma if isinstance(sigma, list) else [sigma])]
    return runs[0], options


def main(argv: list[str] | None = None) -> int:
    try:
        run, options = parse_args(sys.argv[1:] if argv is None else argv)
        results = reconstruct(run, options["sigma_rel"], options.get("step"), options.get("out"))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'sigma_rel':>9}  {'step':>7}  {'profile error':>13}  export")
    for r in results:
        print(f"{r['sigma_rel']:9.4f}  {r['step']:7d}  {r['profile_error']:13.2e}  {r['export']}")
    print(f"[ldm] sample with: python sample.py ckpt={results[0]['export']}")
    print(json.dumps({"exports": [r["export"] for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
