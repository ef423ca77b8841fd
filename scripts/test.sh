#!/usr/bin/env bash
# Runs the whole test suite (creating or reusing ./.venv first). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/env.sh
exec python -m pytest -q "$@"
