#!/usr/bin/env bash
# The GPU benchmark and CUDA checks, prepared to run once on a device machine (one H100, no internet), < 8 min.
#   device tool run: command "bash bench/gpu.sh", carry [".whl"], timeout_s 600
#   rehearsal here, on the CPU with tiny sizes: GPU_SH_CPU=1 OUT=/tmp/gpu_sh_out bash bench/gpu.sh
# Sections, each in its own process with a timeout (a failure loses only that section), all logs under $OUT:
#   env    wheels from .whl/ into /tmp/site, nvidia-smi, versions, imports        -> env.log
#   unet   bench/gpu_unet.py: SD2 UNet, ours vs diffusers, eager + compile       -> unet.log, gpu_unet.json
#   train  train.py on CUDA: vae bf16+compile / fp16, ldm bf16 / ddp / compile   -> train.log
#   micro  bench/run_all.py: unet_step + autoencoder_step (when present), cuda   -> micro.log, micro.json
#   table  $OUT/gpu_table.md, printed at the end
# .whl/ holds what the machine's image lacks, at .venv's versions (machine has huggingface_hub, safetensors,
# regex, filelock, zipp, timm, pytorch-lightning; not carried: torch, wandb):
#   antlr4-python3-runtime==4.9.3 braceexpand==0.1.7 diffusers==0.42.1 ftfy==6.3.1 hydra-core==1.3.8
#   importlib_metadata==10.2.0 lazy-importer==0.1.0 omegaconf==2.3.1 open_clip_torch==3.3.0 wcwidth==0.9.4
#   webdataset==1.0.2            (11 wheels, 9,254,552 bytes = 8.8 MiB)
# Recreate them (antlr4 4.9.3 is an sdist on PyPI, so it is built into a wheel):
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl diffusers==0.42.1 \
#     importlib_metadata==10.2.0 lazy-importer==0.1.0 hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 \
#     braceexpand==0.1.7 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
#   .venv/bin/python -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
set -uo pipefail  # no -e: a failing section is reported and the next one runs

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/gpu_sh_out}
WORK=${GPU_SH_WORK:-/tmp/gpu_sh_work}
TABLE=$OUT/gpu_table.md
BUDGET=${GPU_SH_BUDGET_S:-480}  # seconds for all sections; a section gets min(its cap, what is left)
if [[ ${GPU_SH_CPU:-0} == 1 ]]; then
  PY=${PY:-$ROOT/.venv/bin/python}; SITE=$WORK/site; ACCEL=cpu; STEPS=3; DATA_ARGS="--num 600 --num-val 128"
  CAPS=(120 300 900 400); BUDGET=${GPU_SH_BUDGET_S:-1800}  # env unet train micro: a shared 2-core CPU is slow
  VAE_EXTRA="trainer.limit_val_batches=1"; COMPILE_BACKEND=aot_eager  # inductor's C++ build takes minutes here
  LDM_EXTRA="trainer.limit_val_batches=1 stage.num_val_prompts=4 stage.module.num_inference_steps=5"
  UNET_ARGS="--device cpu --preset tiny --res 32 --batch 2 --steps 2 --warmup 1 --dtype float32 --no-compile"
  MICRO_ARGS="--device cpu --dtype float32 --quick --repeats 1 --threads 2 --only unet_step,autoencoder_step"
else
  PY=${PY:-python3}; SITE=/tmp/site; ACCEL=gpu; STEPS=30; DATA_ARGS=""
  read -r -a CAPS <<<"${GPU_SH_CAPS:-60 300 200 110}"  # seconds for the sections env unet train micro
  VAE_EXTRA=""; LDM_EXTRA=""  # the stages' own validation (16 prompts, DDIM 50) is part of what is checked
  COMPILE_BACKEND=inductor
  # --budget-s: start no model variant after 170 s, so the last compile still ends inside the section's cap
  UNET_ARGS="--device cuda --batch 32 --steps 20 --warmup 5 --compile --which ours,diffusers --peak-tflops 989 \
--budget-s 170 ${GPU_UNET_EXTRA:-}"
  MICRO_ARGS="--device cuda --dtype bfloat16 --sizes tiny,small --repeats 10 --threads 8"
fi
export PYTHONPATH=$SITE:$ROOT PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
export HYDRA_FULL_ERROR=1 TORCHINDUCTOR_CACHE_DIR=$WORK/inductor

sec_env() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || echo "FAIL: wheel install"
  else
    echo "FAIL: no wheels under .whl/ (run with carry [\".whl\"])"
  fi
  nvidia-smi || echo "(no nvidia-smi)"
  "$PY" - "$TABLE" <<'EOF'
import importlib, platform, sys
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
line = (f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cudnn {torch.backends.cudnn.version()}, {gpu}")
print(line)
found = []
for name in ["diffusers", "hydra", "omegaconf", "webdataset", "open_clip", "pytorch_lightning", "timm", "ldm"]:
    try:
        found.append(f"{name} {getattr(importlib.import_module(name), '__version__', 'ok')}")
    except Exception as err:
        found.append(f"{name} FAIL ({type(err).__name__}: {err})")
print("imports: " + ", ".join(found))
with open(sys.argv[1], "a") as f:
    f.write(f"## GPU run\n\n{line}\n\n{', '.join(found)}\n\n")
EOF
}

sec_unet() {
  # shellcheck disable=SC2086  # word splitting of the argument strings is intended
  "$PY" bench/gpu_unet.py $UNET_ARGS --json "$OUT/gpu_unet.json" --md "$WORK/unet.md"
}

# One training run in the background: train.py with the common overrides plus the check's own; rc to a file.
# Its cap is a share of what is left of the section (SHARE: pairs still to run), so the PASS/FAIL table is
# always written before the section's own timeout.
train_run() {
  local name=$1 cap=$(((SECTION_CAP - SECONDS - 20) / SHARE))
  shift
  local common=(logger=csv trainer.accelerator="$ACCEL" trainer.devices=1 trainer.max_steps="$STEPS"
                trainer.val_check_interval="$STEPS" trainer.enable_progress_bar=false trainer.log_every_n_steps=1
                data.train_shards="$WORK/data/train" data.val_shards="$WORK/data/val"
                paths.runs="$WORK/runs" hydra.run.dir="$WORK/runs/$name")
  (
    start=$SECONDS
    timeout -k 10 "$cap" "$PY" train.py "${common[@]}" "$@" >"$WORK/logs/$name.log" 2>&1
    echo "$? $((SECONDS - start))" >"$WORK/logs/$name.rc"
  ) &
}

sec_train() {
  mkdir -p "$WORK/logs"
  # The data first and alone: two runs writing it on first use at once would race.
  # shellcheck disable=SC2086
  timeout $((SECTION_CAP / 4)) "$PY" -m ldm.data.shapes --out "$WORK/data" $DATA_ARGS || echo "FAIL: shapes data"
  SHARE=2
  # shellcheck disable=SC2086
  train_run vae_bf16_compile stage=vae trainer.precision=bf16-mixed paths.exports="$WORK/exp_bf16" \
    perf.compile=true perf.compile_backend=$COMPILE_BACKEND $VAE_EXTRA
  # shellcheck disable=SC2086
  train_run vae_fp16 stage=vae trainer.precision=16-mixed paths.exports="$WORK/exp_fp16" $VAE_EXTRA
  wait
  local exp=$WORK/exp_bf16
  [[ -f $exp/autoencoder/autoencoder.safetensors ]] || exp=$WORK/exp_fp16  # an ldm check even if the first failed
  SHARE=1
  # shellcheck disable=SC2086
  train_run ldm_bf16 stage=ldm trainer.precision=bf16-mixed paths.exports="$exp" $LDM_EXTRA
  # shellcheck disable=SC2086
  train_run ldm_ddp stage=ldm trainer.precision=bf16-mixed trainer.strategy=ddp paths.exports="$exp" $LDM_EXTRA
  # shellcheck disable=SC2086
  train_run ldm_compile stage=ldm trainer.precision=bf16-mixed paths.exports="$exp" perf.compile=true \
    perf.compile_backend=$COMPILE_BACKEND $LDM_EXTRA
  wait
  for name in vae_bf16_compile vae_fp16 ldm_bf16 ldm_ddp ldm_compile; do
    echo "################ $name"
    cat "$WORK/logs/$name.log" 2>/dev/null
  done
  "$PY" - "$WORK" "$STEPS" "$TABLE" <<'EOF'
import csv, json, math, sys
from pathlib import Path
work, steps, table = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lines = [f"### CUDA path checks of train.py ({steps} steps each)", "",
         "| check | result | steps | last train loss | wall s | why |", "|---|---|---|---|---|---|"]
for name in ["vae_bf16_compile", "vae_fp16", "ldm_bf16", "ldm_ddp", "ldm_compile"]:
    rc_file, log_file = work / "logs" / f"{name}.rc", work / "logs" / f"{name}.log"
    rc, wall = rc_file.read_text().split() if rc_file.exists() else ("?", "?")
    log = log_file.read_text(errors="replace") if log_file.exists() else ""
    run = work / "runs" / name
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    losses, bad = [], []
    metrics = run / "logs" / "metrics.csv"
    for row in (csv.DictReader(metrics.open()) if metrics.exists() else []):
        for key, value in row.items():
            if "loss" in key and value not in ("", None):
                (losses if math.isfinite(float(value)) else bad).append((key, float(value)))
    why = []
    if rc != "0":
        why.append("timeout" if rc in ("124", "137") else f"rc {rc}")
    if summary.get("global_step") != steps:
        why.append(f"global_step {summary.get('global_step')}")
    if not losses:
        why.append("no finite loss in metrics.csv")
    if bad:
        why.append(f"{len(bad)} non-finite: {bad[0][0]}")
    if "Traceback" in log:
        why.append("Traceback in log")
    last = [v for k, v in losses if k == "train/loss"] or [v for k, v in losses if k.startswith("train/")]
    shown = f"{last[-1]:.4g}" if last else "-"
    result = "FAIL" if why else "PASS"
    print(f"{result} {name}: {'; '.join(why) or 'ok'}")
    lines.append(f"| {name} | {result} | {summary.get('global_step', '-')} | {shown} | {wall} | {'; '.join(why)} |")
with open(table, "a") as f:
    f.write("\n".join(lines) + "\n\n")
EOF
}

sec_micro() {
  # shellcheck disable=SC2086
  "$PY" bench/run_all.py $MICRO_ARGS --budget-s $((SECTION_CAP - 15)) --json "$OUT/micro.json" --md "$WORK/micro.md"
}

# A section runs in a fresh process of this script (the caller puts `timeout` around it).
if [[ ${1:-} == --section ]]; then
  "sec_$2"
  exit $?
fi

main() {  # one function, parsed whole before it runs: editing this file mid-run cannot break the run
  START=$SECONDS
  TIMES=()
  section() {  # name cap_seconds log_file
    local name=$1 cap=$2 log=$OUT/$3 left t0 rc
    left=$((BUDGET - (SECONDS - START)))
    ((cap > left)) && cap=$left
    if ((cap < 20)); then
      echo "=== $name: SKIPPED, budget of ${BUDGET}s spent"
      TIMES+=("| $name | skipped (budget) | - |")
      return
    fi
    echo "=== $name: start at ${SECONDS}s, cap ${cap}s, log $log"
    t0=$SECONDS
    SECTION_CAP=$cap timeout -k 15 "$cap" bash "${BASH_SOURCE[0]}" --section "$name" >"$log" 2>&1
    rc=$?
    echo "=== $name: rc $rc after $((SECONDS - t0))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
    if ((rc != 0)); then tail -n 25 "$log" | sed 's/^/    /'; fi
    TIMES+=("| $name | $( ((rc == 0)) && echo ok || echo "rc $rc") | $((SECONDS - t0)) |")
  }

  mkdir -p "$OUT"
  rm -rf "$WORK" "$TABLE"
  mkdir -p "$WORK"
  echo "gpu.sh: OUT=$OUT WORK=$WORK PY=$PY budget ${BUDGET}s $( [[ ${GPU_SH_CPU:-0} == 1 ]] && echo '(CPU rehearsal)')"

  section env "${CAPS[0]}" env.log
  grep -E "^(python|imports|FAIL)" "$OUT/env.log" | sed 's/^/    /'
  section unet "${CAPS[1]}" unet.log
  if [[ -f $WORK/unet.md ]]; then cat "$WORK/unet.md" >>"$TABLE"; else echo "(gpu_unet wrote no table)" >>"$TABLE"; fi
  echo >>"$TABLE"
  section train "${CAPS[2]}" train.log
  grep -E "^(PASS|FAIL)" "$OUT/train.log" | sed 's/^/    /'
  section micro "${CAPS[3]}" micro.log
  if [[ -f $WORK/micro.md ]]; then cat "$WORK/micro.md" >>"$TABLE"; else echo "(run_all wrote no table)" >>"$TABLE"; fi

  {
    echo "### Sections"
    echo
    echo "| section | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${TIMES[@]}"
    echo
    echo "total: $((SECONDS - START)) s"
  } >>"$TABLE"
  echo
  echo "=================== $TABLE"
  cat "$TABLE"
  ls -la "$OUT"
}

main "$@"; exit $?  # one line: parsed before main runs
