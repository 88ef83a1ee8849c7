#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run the CIFAR-10 study around the fast recipe
# (studies/spaces/fast.yaml: architecture and training); its top trials are confirmed with new seeds
# and the confirmed champion feeds the CIFAR-100 transfer study. Extra arguments
# go to `harness tune`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e .
DATA_DIR=${HARNESS_DATA_DIR:-data}
# No internet (this team's machines): write the local CIFAR-10 copy instead of downloading it.
if [ ! -f "$DATA_DIR/cifar-10-batches-py/batches.meta" ] && [ -f ../shared/datasets/materialize.py ]; then
  .venv/bin/python ../shared/datasets/materialize.py --out "$DATA_DIR"
fi
# Tuning, then the top trials confirmed with new seeds (the champion is the best mean), then
# transfer. On a CPU the trials train 3 epochs (the space's quick profile) and their confirmation
# runs 5, the budget the champion is then used at; on a GPU both train the full profile's 10.
CONFIRM_EPOCHS=${CONFIRM_EPOCHS:-$(.venv/bin/python -c 'import torch; print(0 if torch.cuda.is_available() else 5)')}
exec .venv/bin/harness tune --study "${STUDY:-cifar10-cnn}" --space fast --trials "${TRIALS:-12}" \
  --confirm-top "${CONFIRM_TOP:-2}" --confirm-seeds "${CONFIRM_SEEDS:-3}" --confirm-epochs "$CONFIRM_EPOCHS" \
  --data-dir "$DATA_DIR" --transfer "$@"
