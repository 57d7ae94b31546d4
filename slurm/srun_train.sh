#!/usr/bin/env bash
# The body of train.sbatch and train_multinode.sbatch (run inside the allocation, not by hand).
#
# srun starts one task per device on every node; Lightning's SLURM environment reads each task's rank
# from SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID, so no torchrun and no Lightning re-launching.
# The run directory is keyed by the job id: a job requeued after preemption or a time limit (SIGUSR1,
# see --signal in the sbatch scripts) gets the same id, finds its own checkpoints there and resumes (ckpt=auto).
# The exit code is srun's.
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

nodes=${SLURM_JOB_NUM_NODES:-1}
per_node=${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / nodes ))}
job=${SLURM_JOB_ID:?run this through sbatch}
[ -n "${SLURM_ARRAY_JOB_ID:-}" ] && job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
restarts=${SLURM_RESTART_COUNT:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Since Slurm 22.05 srun no longer takes --cpus-per-task from the allocation: without it, each task (a rank with
# all its loader workers) gets one CPU. Pass the batch script's value on (SRUN_CPUS_PER_TASK, if set, wins).
cpus=${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-}}
per_task=()
[ -n "$cpus" ] && per_task=("--cpus-per-task=$cpus")
python=${LDM_PYTHON:-python}

# Before "$@": defaults the command line may override. After "$@": what a restarted job must use.
first=("trainer.devices=$per_node" "trainer.num_nodes=$nodes" "ckpt=auto"
       "hydra.run.dir=\${paths.runs}/\${stage.name}/slurm-$job")
last=()
if [ "$restarts" -gt 0 ]; then
    last=("ckpt=auto")  # continue from this run's own checkpoints, even if the first start had ckpt=PATH
fi
echo "[slurm] job $job restart $restarts: $nodes node(s) x $per_node task(s) x ${cpus:-default} CPU(s);" \
     "overrides: $*"

# --kill-on-bad-exit: a rank that dies takes the others down at once instead of leaving them in a collective.
srun --kill-on-bad-exit=1 "${per_task[@]}" "$python" train.py "${first[@]}" "$@" "${last[@]}"
rc=$?
echo "[slurm] job $job: srun exited with $rc"
exit $rc
