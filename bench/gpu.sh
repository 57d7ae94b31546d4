#!/usr/bin/env bash
# The one prepared GPU check (issue 27): one GPU, no internet, < 10 min with starts.
#   device tool run: command "bash bench/gpu.sh", carry [".whl"], timeout_s 600
#   rehearsal here, on the CPU with tiny sizes: GPU_SH_CPU=1 OUT=/tmp/gpu_sh_out bash bench/gpu.sh
# Sections, each in its own process with a timeout (a failure loses only that section), all logs under $OUT:
#   env       wheels from .whl/ into /tmp/site, nvidia-smi, versions, imports                -> env.log
#   unet      bench/gpu_unet.py: SD2 UNet, ours vs diffusers, eager + compile (throughput)   -> unet.log, gpu_unet.json
#   pipeline  what a cluster user types, with trainer=ddp trainer.devices=1 (NCCL at world size 1 refuses CPU
#             tensors as 8 GPUs would), bf16-mixed, perf.compile=true, a few dozen steps: stage=vae, its ckpt=last
#             resume, stage=ldm on its export (perf.sdpa_backends=[flash], validation sampling, FID, CLIP score),
#             its ckpt=last resume, sample.py on that export; each stage writes export/ and summary.json -> pipeline.log
#   fsdp      trainer=fsdp trainer.devices=1 on the pipeline's autoencoder: stage 2, save, ckpt=last resume, export
#   table     $OUT/gpu_table.md: one row per check and section (PASS/FAIL, seconds, why), printed at the end
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
BUDGET=${GPU_SH_BUDGET_S:-520}  # seconds for all sections; a section gets min(its cap, what is left)
if [[ ${GPU_SH_CPU:-0} == 1 ]]; then
  PY=${PY:-$ROOT/.venv/bin/python}; SITE=$WORK/site; ACCEL=cpu; STEPS=3; DATA_ARGS="--num 600 --num-val 128"
  CAPS=(60 200 1500 500); BUDGET=${GPU_SH_BUDGET_S:-2400}  # env unet pipeline fsdp: a shared 2-core CPU is slow
  COMPILE_BACKEND=aot_eager  # inductor's C++ build takes minutes here
  SAMPLE_STEPS=3; SAMPLE_DEVICE=cpu
  VAE_EXTRA="trainer.limit_val_batches=1 data.batch_size=8"; LDM_EXTRA="data.batch_size=8"; FSDP_EXTRA="data.batch_size=8"
  UNET_ARGS="--device cpu --preset tiny --res 32 --batch 2 --steps 2 --warmup 1 --dtype float32 --no-compile"
else
  PY=${PY:-python3}; SITE=/tmp/site; ACCEL=gpu; STEPS=20; DATA_ARGS=""
  read -r -a CAPS <<<"${GPU_SH_CAPS:-45 150 235 90}"  # seconds for the sections env unet pipeline fsdp
  COMPILE_BACKEND=inductor
  SAMPLE_STEPS=10; SAMPLE_DEVICE=cuda
  VAE_EXTRA=""; LDM_EXTRA=""; FSDP_EXTRA=""
  # --budget-s: start no model variant after 90 s, so the last compile still ends inside the section's cap
  UNET_ARGS="--device cuda --batch 32 --steps 20 --warmup 5 --compile --which ours,diffusers --peak-tflops 989 \
--budget-s 90 ${GPU_UNET_EXTRA:-}"
fi
# Extra overrides for the stage-2 runs, e.g. GPU_SH_LDM_EXTRA=trainer.gradient_clip_val=null
LDM_EXTRA="$LDM_EXTRA ${GPU_SH_LDM_EXTRA:-}"; FSDP_EXTRA="$FSDP_EXTRA ${GPU_SH_LDM_EXTRA:-}"
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

# One check: a command with a timeout, its log, and "rc seconds" in $WORK/logs/NAME.rc.
check() {  # name cap_seconds command...
  local name=$1 cap=$2 start=$SECONDS
  shift 2
  echo "--- $name (cap ${cap}s): $*"
  timeout -k 10 "$cap" "$@" >"$WORK/logs/$name.log" 2>&1
  echo "$? $((SECONDS - start))" >"$WORK/logs/$name.rc"
  tail -n 5 "$WORK/logs/$name.log"
}

# train.py with the settings every check shares; runs_dir per chain, so that ckpt=last finds that chain's run.
train() {  # name cap runs_dir overrides...
  local name=$1 cap=$2 runs=$3
  shift 3
  check "$name" "$cap" "$PY" train.py logger=csv trainer.accelerator="$ACCEL" trainer.devices=1 \
    trainer.enable_progress_bar=false trainer.log_every_n_steps=$((STEPS < 5 ? STEPS : 5)) \
    checkpoint.every_n_train_steps="$STEPS" \
    data.train_shards="$WORK/data/train" data.val_shards="$WORK/data/val" paths.runs="$runs" \
    paths.exports="$WORK/exp" "hydra.run.dir=$runs/\${stage.name}/$name" "$@"
}

left() { echo $(((SECTION_CAP - SECONDS - 15) / $1)); }  # a share of what is left of the section

sec_pipeline() {
  mkdir -p "$WORK/logs"
  # shellcheck disable=SC2086
  timeout 120 "$PY" -m ldm.data.shapes --out "$WORK/data" $DATA_ARGS || echo "FAIL: shapes data"
  local runs=$WORK/runs_ddp
  local ddp=(trainer=ddp trainer.precision=bf16-mixed perf.compile=true "perf.compile_backend=$COMPILE_BACKEND")
  # shellcheck disable=SC2086
  train vae "$(left 5)" "$runs" stage=vae "${ddp[@]}" trainer.max_steps="$STEPS" trainer.val_check_interval="$STEPS" \
    $VAE_EXTRA
  # shellcheck disable=SC2086
  train vae_resume "$(left 4)" "$runs" stage=vae "${ddp[@]}" ckpt=last trainer.max_steps=$((2 * STEPS)) \
    trainer.val_check_interval="$STEPS" $VAE_EXTRA
  # Validation samples and scores (the shapes recipe turns both off for make train's speed); flash only: the
  # autoencoder's head dim 512 and any float32 call must fall back with a warning, not fail.
  local ldm=(stage=ldm "${ddp[@]}" "perf.sdpa_backends=[flash]" trainer.val_check_interval="$STEPS"
             trainer.limit_val_batches=1 stage.num_val_prompts=4 stage.module.metrics.num_samples=8
             "stage.module.num_inference_steps=$SAMPLE_STEPS")
  # shellcheck disable=SC2086
  train ldm "$(left 3)" "$runs" "${ldm[@]}" trainer.max_steps="$STEPS" $LDM_EXTRA
  # shellcheck disable=SC2086
  train ldm_resume "$(left 2)" "$runs" "${ldm[@]}" ckpt=last trainer.max_steps=$((2 * STEPS)) $LDM_EXTRA
  check sample "$(left 1)" "$PY" sample.py ckpt="$runs/ldm/ldm_resume/export" \
    "prompt=a red circle on a blue background" num_images=2 steps="$SAMPLE_STEPS" device="$SAMPLE_DEVICE" \
    precision=bf16 progress=false out="$WORK/samples"
}

sec_fsdp() {
  mkdir -p "$WORK/logs"
  local runs=$WORK/runs_fsdp fsdp=(stage=ldm trainer=fsdp trainer.limit_val_batches=0)
  [[ -f $WORK/exp/autoencoder/autoencoder.safetensors ]] || echo "FAIL: no stage-1 export from the pipeline section"
  # shellcheck disable=SC2086
  train fsdp "$(left 2)" "$runs" "${fsdp[@]}" trainer.max_steps="$STEPS" $FSDP_EXTRA
  # shellcheck disable=SC2086
  train fsdp_resume "$(left 1)" "$runs" "${fsdp[@]}" ckpt=last trainer.max_steps=$((2 * STEPS)) $FSDP_EXTRA
}

# One row per check, from its rc file, log, summary.json and export: PASS or FAIL and why. Args: section rows.
write_table() {
  "$PY" - "$WORK" "$STEPS" "$TABLE" "$@" <<'EOF'
import csv, json, math, sys
from pathlib import Path
work, steps, table, sections = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
expect = {  # check: (runs dir, stage, start step, final step, what the export must hold); None: sample.py
    "vae": ("runs_ddp", "vae", 0, steps, "export/autoencoder.safetensors"),
    "vae_resume": ("runs_ddp", "vae", steps, 2 * steps, "export/autoencoder.safetensors"),
    "ldm": ("runs_ddp", "ldm", 0, steps, "export"),
    "ldm_resume": ("runs_ddp", "ldm", steps, 2 * steps, "export"),
    "sample": None,
    "fsdp": ("runs_fsdp", "ldm", 0, steps, "export"),
    "fsdp_resume": ("runs_fsdp", "ldm", steps, 2 * steps, "export"),
}
rows = ["| check | result | seconds | why / what |", "|---|---|---|---|"]
for line in sections:  # "name rc seconds" per section, from main
    name, rc, secs = line.split()
    rows.append(f"| section {name} | {'PASS' if rc == '0' else 'FAIL'} | {secs} | {'' if rc == '0' else 'rc ' + rc} |")
for name, spec in expect.items():
    rc_file, log_file = work / "logs" / f"{name}.rc", work / "logs" / f"{name}.log"
    if not rc_file.exists():
        rows.append(f"| {name} | FAIL | - | not run |")
        print(f"FAIL {name}: not run")
        continue
    rc, secs = rc_file.read_text().split()
    log = log_file.read_text(errors="replace") if log_file.exists() else ""
    why, what = [], []
    if rc != "0":
        why.append("timeout" if rc in ("124", "137") else f"rc {rc}")
    if "Traceback" in log:
        last = [ln for ln in log.splitlines() if ln.strip() and not ln.startswith(" ")]
        why.append("Traceback: " + (last[-1] if last else "")[:160].replace("|", "/"))
    if spec is None:
        manifest, pngs = work / "samples" / "manifest.jsonl", list((work / "samples").glob("*.png"))
        if not manifest.exists() or len(pngs) < 2:
            why.append(f"{len(pngs)} PNGs, manifest {'present' if manifest.exists() else 'missing'}")
        what.append(f"{len(pngs)} PNGs + manifest.jsonl")
    else:
        runs, stage, start, final, export = spec
        run = work / runs / stage / name
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
        if not summary:
            why.append("no summary.json")
        elif summary.get("global_step") != final or (summary.get("start_step") or 0) != start:
            why.append(f"steps {summary.get('start_step')}->{summary.get('global_step')}, expected {start}->{final}")
        if not (run / export).exists():
            why.append(f"no {export}")
        losses = []
        metrics = run / "logs" / "metrics.csv"
        for row in (csv.DictReader(metrics.open()) if metrics.exists() else []):
            losses += [float(v) for k, v in row.items() if k.startswith("train/") and "loss" in k and v]
        if not losses or any(not math.isfinite(v) for v in losses):
            why.append("no finite train loss" if not losses else "non-finite train loss")
        shown = {k.removeprefix("val/"): round(v, 3) for k, v in summary.get("metrics", {}).items()
                 if k in ("val/psnr", "val/fid", "val/clip_score", "val/loss")}
        what.append(f"steps {summary.get('start_step')}->{summary.get('global_step')} {shown}".replace("|", "/"))
    result = "FAIL" if why else "PASS"
    print(f"{result} {name}: {'; '.join(why) or 'ok'}")
    rows.append(f"| {name} | {result} | {secs} | {'; '.join(why + what)} |")
with open(table, "a") as f:
    f.write("### Checks\n\n" + "\n".join(rows) + "\n\n")
EOF
}

# A section runs in a fresh process of this script (the caller puts `timeout` around it).
if [[ ${1:-} == --section ]]; then
  if [[ $2 == table ]]; then write_table "${@:3}"; else "sec_$2"; fi
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
      TIMES+=("$name skipped -")
      return
    fi
    echo "=== $name: start at ${SECONDS}s, cap ${cap}s, log $log"
    t0=$SECONDS
    SECTION_CAP=$cap timeout -k 15 "$cap" bash "${BASH_SOURCE[0]}" --section "$name" >"$log" 2>&1
    rc=$?
    echo "=== $name: rc $rc after $((SECONDS - t0))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
    if ((rc != 0)); then tail -n 25 "$log" | sed 's/^/    /'; fi
    TIMES+=("$name $rc $((SECONDS - t0))")
  }

  mkdir -p "$OUT"
  rm -rf "$WORK" "$TABLE"
  mkdir -p "$WORK"
  echo "gpu.sh: OUT=$OUT WORK=$WORK PY=$PY budget ${BUDGET}s $( [[ ${GPU_SH_CPU:-0} == 1 ]] && echo '(CPU rehearsal)')"

  section env "${CAPS[0]}" env.log
  grep -E "^(python|imports|FAIL)" "$OUT/env.log" | sed 's/^/    /'
  section unet "${CAPS[1]}" unet.log
  section pipeline "${CAPS[2]}" pipeline.log
  section fsdp "${CAPS[3]}" fsdp.log
  cp "$WORK"/logs/*.log "$OUT/" 2>/dev/null  # every check's own log comes back too
  SECTION_CAP=60 timeout 60 bash "${BASH_SOURCE[0]}" --section table "${TIMES[@]}" | sed 's/^/    /'
  {
    echo "UNet-only throughput (bench/gpu_unet.py):"
    echo
    if [[ -f $WORK/unet.md ]]; then cat "$WORK/unet.md"; else echo "(gpu_unet wrote no table)"; fi
    echo
    echo "total: $((SECONDS - START)) s"
  } >>"$TABLE"
  echo
  echo "=================== $TABLE"
  cat "$TABLE"
  ls -la "$OUT"
}

main "$@"; exit $?  # one line: parsed before main runs
