# Source me: creates (once) or reuses ./.venv with the pinned requirements, then activates it.
# Reinstalls only when requirements.txt or setup.py changed since the last successful install.
set -e
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${PARALLEL_ADAPTERS_VENV:-$_root/.venv}"
_stamp="$_venv/.installed"
_want="$(cat "$_root/requirements.txt" "$_root/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$_venv/bin/python" ]; then
  echo "[env] creating $_venv" >&2
  python3.11 -m venv "$_venv" 2>/dev/null || python3 -m venv "$_venv"
fi
# shellcheck disable=SC1091
. "$_venv/bin/activate"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "[env] installing pinned requirements (about a minute, once)" >&2
  # torch first and alone: it must be the pinned CPU build, never a CUDA build pulled by a dependency.
  pip install -q torch==2.13.0
  DS_BUILD_OPS=0 pip install -q -r "$_root/requirements.txt"
  pip install -q --no-deps -e "$_root"
  echo "$_want" > "$_stamp"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$_venv/torch_extensions}"
export TMPDIR="${TMPDIR:-/tmp}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"
set +e
