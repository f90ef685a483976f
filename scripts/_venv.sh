# Sourced by scripts/test and scripts/demo: create or reuse .venv and install the project.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PY" -m venv "$VENV"
fi
# Reinstall only when pyproject.toml changed since the last install.
STAMP="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "installing the project and its test extras into $VENV"
  if ! { "$VENV/bin/python" -m pip install --quiet --upgrade pip &&
          "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"; } >"$VENV/install.log" 2>&1; then
    cat "$VENV/install.log"
    echo "installing the project failed (log above, also in $VENV/install.log)" >&2
    exit 1
  fi
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
