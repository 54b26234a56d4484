#!/usr/bin/env bash
# Trains the base LVLM stage by stage, resumably. Each later config is a delta on the ones before it,
# so stage k fits the first k configs stacked (`--config 1 ... --config k`). A stage named for its
# last config configs/NAME.yaml writes its checkpoints to outputs/NAME/checkpoints and its export to
# outputs/NAME/export (relative to the current directory, as every config here writes them); a stage
# whose export exists is skipped and an interrupted one resumes from its last.ckpt; arguments after
# `--` go to every stage's fit.
# Run it again after an interruption, and in the background for the hours a CPU needs:
#   setsid nohup bash tools/train_base.sh configs/base.yaml configs/base_stage2.yaml configs/base_stage3.yaml \
#     >> outputs/train_base.log 2>&1 &
set -euo pipefail
configs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do configs+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the `--`
[ ${#configs[@]} -gt 0 ] || { echo "usage: $0 configs/STAGE1.yaml [configs/STAGE2.yaml ...] [-- fit args]" >&2; exit 2; }
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
for config in "${configs[@]}"; do
  [ -f "$config" ] || { echo "[train_base] no such config: $config" >&2; exit 2; }
done
stack=()
for config in "${configs[@]}"; do
  stack+=(--config "$config")
  name="$(basename "$config" .yaml)"
  if [ -f "outputs/$name/export/model.safetensors" ]; then
    echo "[train_base] $config: outputs/$name/export exists, skipped"; continue
  fi
  resume=()
  if [ -f "outputs/$name/checkpoints/last.ckpt" ]; then resume=(--ckpt_path "outputs/$name/checkpoints/last.ckpt"); fi
  echo "[train_base] $(date -u +%FT%TZ) $config: ${resume[*]:-from the start}"
  python -m src.cli fit "${stack[@]}" "${resume[@]}" "$@"
  [ -f "outputs/$name/export/model.safetensors" ] || { echo "[train_base] $config ended without outputs/$name/export" >&2; exit 1; }
done
echo "[train_base] $(date -u +%FT%TZ) done"
