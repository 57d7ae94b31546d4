"""Run every benchmark of the project and print one markdown table of their results.

    python bench/run_all.py                 # CPU, sizes tiny,small
    python bench/run_all.py --quick         # a short run: size tiny, 2 repeats
    python bench/run_all.py --device cuda --dtype bfloat16 --json all.json --md table.md

Each benchmark is a script run in its own process (a crash or hang in one loses only its row) that writes its
rows as JSON; a missing script is skipped with a note. To add one, append a line to BENCHMARKS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STEP_ARGS = "--sizes {sizes} --repeats {repeats} --threads {threads} --device {device} --dtype {dtype}"


@dataclass(frozen=True)
class Bench:
    """One benchmark script: `args` is formatted with the run's settings; `--json PATH` is appended."""

    name: str
    script: str  # relative to the repo root
    args: str
    devices: tuple[str, ...] = ("cpu", "cuda")


BENCHMARKS: list[Bench] = [
    Bench("unet_step", "bench/unet_step.py", STEP_ARGS),
    Bench("autoencoder_step", "bench/autoencoder_step.py", STEP_ARGS),
    # The SD2-sized GPU benchmark at smoke-test size; on a GPU bench/gpu.sh runs it at full size.
    Bench("gpu_unet_tiny", "bench/gpu_unet.py",
          "--device {device} --preset tiny --res 32 --batch 2 --steps {repeats} --warmup 1 --dtype {dtype} "
          "--no-compile", devices=("cpu",)),
    Bench("sampler_speed", "bench/sampler_speed.py",
          "--sizes tiny --repeats {repeats} --threads {threads} --device {device} --dtype {dtype}"),
    Bench("compile_check", "bench/compile_check.py", "--preset sd21 --backend aot_eager --threads {threads}",
          devices=("cpu",)),
    Bench("loader_speed", "bench/loader_speed.py", "--num 256 --repeats {repeats}", devices=("cpu",)),
    Bench("latent_speedup", "bench/latent_speedup.py",
          "--autoencoders tiny,kl_f8 --batch 4 --repeats {repeats} --threads {threads}", devices=("cpu",)),
    Bench("posthoc_ema_cost", "bench/posthoc_ema_cost.py",
          "--presets {sizes} --repeats {repeats} --threads {threads} --device {device} --dtype {dtype}"),
]


def rows_from_json(data: Any) -> list[dict[str, Any]]:
    """Accept a list of row dicts, a dict holding such a list (its scalar keys go into every row), or one dict."""
    if isinstance(data, list):
        return [r if isinstance(r, dict) else {"value": r} for r in data]
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
        if lists:
            meta = {k: v for k, v in data.items() if k not in lists and not isinstance(v, (list, dict))}
            return [{**meta, **r} for v in lists.values() for r in v]
        return [data]
    return [{"value": data}]


def run_bench(bench: Bench, settings: dict[str, Any], json_dir: Path, timeout: float) -> tuple[list[dict], str]:
    """Run one script; its rows plus its run status (the rows may carry a 'status' of their own)."""
    script = ROOT / bench.script
    if not script.exists():
        return [], f"skipped: {bench.script} not found"
    out = json_dir / f"{bench.name}.json"
    cmd = [sys.executable, str(script), *bench.args.format(**settings).split(), "--json", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    print(f"\n[run_all] {bench.name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.perf_counter() - start
    rows: list[dict] = []
    if out.exists():
        try:
            rows = rows_from_json(json.loads(out.read_text()))
        except (json.JSONDecodeError, OSError) as err:
            return [], f"bad JSON: {err}"
    status = "ok" if rc == 0 else (f"timeout after {timeout:.0f} s" if rc is None else f"failed (rc {rc})")
    if rc == 0 and not rows:
        status = "ok, no rows"
    return [{"wall_s": round(wall, 1), **r} for r in rows], status


def cell(value: Any) -> str:
    """Short, pipe-safe text: long lists (per-repeat timings) are summarised, floats kept to 4 digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        items = [cell(v) for v in value]
        text = "[" + ", ".join(items if len(items) <= 4 else [*items[:3], f"... {len(items)} items"]) + "]"
    elif isinstance(value, dict):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= 48 else text[:45] + "..."


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table over all rows; columns are the union of keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="size tiny, 2 repeats (unless given)")
    parser.add_argument("--sizes", default=None, help="default tiny,small (tiny with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (2 with --quick)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--only", default="", help="comma list of benchmark names")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="seconds for all benchmarks (0: no limit); later ones get what is left, or are skipped")
    parser.add_argument("--json", help="write all rows (a list of dicts with a 'bench' key) here")
    parser.add_argument("--md", help="append the table to this file")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for b in BENCHMARKS:
            found = "" if (ROOT / b.script).exists() else "  (missing)"
            print(f"{b.name:<18} {b.script}  devices={','.join(b.devices)}{found}")
        return 0
    settings = {"sizes": args.sizes or ("tiny" if args.quick else "tiny,small"),
                "repeats": args.repeats or (2 if args.quick else 5), "threads": args.threads,
                "device": args.device, "dtype": args.dtype}
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = only - {b.name for b in BENCHMARKS}
    if unknown:
        print(f"--only: unknown {sorted(unknown)}; see --list", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="run_all_") as tmp:
        for bench in BENCHMARKS:
            if (only and bench.name not in only) or args.device not in bench.devices:
                continue
            left = args.budget_s - (time.perf_counter() - start) if args.budget_s else args.timeout
            if left < 5:
                got, status = [], "skipped: --budget-s spent"
            else:
                got, status = run_bench(bench, settings, Path(tmp), min(args.timeout, left))
            rows += [{"bench": bench.name, "run": status, **r} for r in got] or [{"bench": bench.name, "run": status}]
            notes.append(f"- {bench.name}: {status}")
    header = (f"### Benchmarks: device {args.device}, dtype {args.dtype}, sizes {settings['sizes']}, "
              f"repeats {settings['repeats']}, threads {args.threads}\n\n")
    table = header + markdown(rows) + "\n" + "\n".join(notes) + "\n"
    print("\n" + table, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    if args.md:
        with open(args.md, "a") as f:
            f.write(table + "\n")
    return 0 if all(r["run"].startswith(("ok", "skipped")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
