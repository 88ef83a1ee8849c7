#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv with the test extras, then run pytest.
# Real-data tests need HARNESS_TEST_DATA_DIR, the PostgreSQL ones HARNESS_TEST_POSTGRES_URL, the
# Slurm ones HARNESS_TEST_SLURM; without them they skip and say why (.ci/run sets all three).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"
