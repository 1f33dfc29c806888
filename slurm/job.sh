# ---- shared body of every template (fusion_lightning.submit appends it to the chosen header) ----
# Arguments: recipe=NAME and Hydra overrides, as for `python -m fusion_lightning.fit`.
set -euo pipefail
RECIPE=""
RUNS_ROOT="checkpoints/runs"
for arg in "$@"; do
  case "$arg" in
    recipe=*) RECIPE="${arg#recipe=}" ;;
    runs_root=*) RUNS_ROOT="${arg#runs_root=}" ;;
  esac
done
if [ -z "$RECIPE" ]; then echo "error: give recipe=NAME as a script argument" >&2; exit 2; fi

# Stable across requeues: the same job (array task) id, so a requeued job finds its hpc checkpoint.
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
  JOB_TAG="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
  JOB_TAG="$SLURM_JOB_ID"
fi
RUN_DIR="$RUNS_ROOT/$RECIPE/slurm-$JOB_TAG"
mkdir -p "$RUN_DIR"

# W&B reads these when the logger does not set them: one group per (array) job, one run per task,
# and the same run id after a requeue so the resumed run continues the same W&B run.
export WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-$RECIPE-slurm-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}"
export WANDB_NAME="${WANDB_NAME:-$RECIPE-slurm-$JOB_TAG}"
export WANDB_RUN_ID="${WANDB_RUN_ID:-$RECIPE-slurm-$JOB_TAG}"
export WANDB_RESUME="${WANDB_RESUME:-allow}"

# Sweep (submit -m): array task i runs the i-th combination of the sweep overrides.
if [ "${#SWEEP[@]}" -gt 0 ]; then
  eval "set -- \"\$@\" ${SWEEP[${SLURM_ARRAY_TASK_ID:?a sweep needs an array job}]}"
fi
STRATEGY=()
case " $* " in *" strategy="*) ;; *) STRATEGY=("strategy=$DEFAULT_STRATEGY") ;; esac

NODES="${SLURM_JOB_NUM_NODES:-1}"
TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-1}"
echo "[$(date -Is)] job $JOB_TAG restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}:" \
     "$NODES node(s) x $TASKS_PER_NODE task(s), run dir $RUN_DIR"
srun --kill-on-bad-exit=1 "${FL_PYTHON:-python}" -m fusion_lightning.fit "$@" "${STRATEGY[@]}" \
  run_dir="$RUN_DIR" +cluster=slurm trainer.accelerator="$ACCELERATOR" \
  trainer.num_nodes="$NODES" trainer.devices="$TASKS_PER_NODE"
