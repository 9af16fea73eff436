#!/usr/bin/env bash
# Set up everything fashion_exp needs, then run something with it.
#
#   ./dev.sh run [overrides]   set up, then train (default: the original experiment's set-up)
#   ./dev.sh test [pytest args] set up, then ruff check and the whole test suite (what CI runs)
#   ./dev.sh test-fast [args]   set up, then ruff check and the fast tier (tests not marked
#                               slow or browser, on two workers: ~2 minutes, for the inner loop)
#   ./dev.sh serve [overrides] set up, then serve the best model (http://127.0.0.1:8000/)
#   ./dev.sh ui                 set up, then open the MLflow UI on the local store
#   ./dev.sh setup              only set up
#
# Set-up (skipped when already done): the real Fashion-MNIST files (Debian package
# dataset-fashion-mnist), Debian's chromium (the web page's browser test), wrk (the serving
# benchmark), postgresql (the team stack), slurm-wlm and munge (the SLURM launcher's tests),
# podman, runc and debootstrap (the serving image; scripts/devtools/podman_setup.sh configures
# podman so that a plain `podman run` works),
# a virtual environment in .venv with the package installed editable and its pinned
# dependencies. Re-running is fast: the venv is rebuilt
# only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
STAMP="$VENV/.fashion-exp-setup"
DATA_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
            t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_data() {
  local dir
  for dir in "${FASHION_MNIST_DIR:-}" "$HOME/.keras/datasets/fashion-mnist" \
             /usr/share/datasets/fashion-mnist; do
    [ -n "$dir" ] || continue
    local ok=1 f
    for f in "${DATA_FILES[@]}"; do [ -f "$dir/$f" ] || ok=0; done
    [ "$ok" = 1 ] && return 0
  done
  return 1
}

apt_install() {
  echo "dev.sh: apt-get install $*" >&2
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  command -v apt-get >/dev/null || { echo "dev.sh: no apt-get here to install $*" >&2; return 1; }
  $sudo apt-get install -y -q "$@" >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "$@" >/dev/null; }
}

setup_data() {
  have_data && return 0
  apt_install dataset-fashion-mnist || {
    echo "dev.sh: put the four Fashion-MNIST .gz files in ~/.keras/datasets/fashion-mnist/" \
         "(or set FASHION_MNIST_DIR and pass data.dir=...)" >&2
    return 1
  }
  have_data
}

setup_tools() {
  local missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v wrk >/dev/null || missing+=(wrk)
  # PostgreSQL server programs: the team stack (scripts/team_stack.py) and its tests.
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
  # SLURM and munge: hydra/launcher=slurm's tests start a one-node cluster (docs/slurm.md).
  [ -x /usr/sbin/slurmctld ] || command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  [ -x /usr/sbin/munged ] || command -v munged >/dev/null || missing+=(munge)
  # podman (with runc) and debootstrap: the serving image (fashion-exp-image, docs/deploy.md).
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || missing+=(runc)
  [ -x /usr/sbin/debootstrap ] || command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ ${#missing[@]} = 0 ] || apt_install "${missing[@]}"
  scripts/devtools/podman_setup.sh
}

pick_python() {
  local py
  for py in python3.11 python3.12 python3; do
    if command -v "$py" >/dev/null \
       && "$py" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 12)))'; then
      echo "$py"; return 0
    fi
  done
  echo "dev.sh: Python 3.11 or 3.12 is required (apt-get install python3 python3-venv)" >&2
  return 1
}

setup_venv() {
  local want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  echo "dev.sh: creating $VENV and installing fashion_exp with its pinned dependencies" >&2
  [ -x "$VENV/bin/python" ] || "$(pick_python)" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  # Packages whose declared requirements conflict with ours (see pyproject.toml).
  local nodeps
  nodeps="$("$VENV/bin/python" -c 'import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["fashion-exp"]["install-without-deps"]))')"
  [ -z "$nodeps" ] || "$VENV/bin/python" -m pip install -q --no-deps $nodeps
  echo "$want" > "$STAMP"
}

setup() { setup_data; setup_tools; setup_venv; }

cmd="${1:-run}"
[ $# -gt 0 ] && shift
export PATH="$PWD/$VENV/bin:$PATH"
case "$cmd" in
  setup) setup ;;
  run)   setup; exec fashion-exp-train "$@" ;;
  test)  setup; ruff check . && exec pytest "$@" ;;
  # Two pytest-xdist workers: the fast tier's tests share nothing but their session fixtures,
  # which each worker makes for itself. The whole suite stays in one process: its servers
  # (team stack, SLURM, the image) are started once per test run, and its timing tests want
  # the machine to themselves.
  test-fast) setup; ruff check . && exec pytest -n 2 -m "not slow and not browser" "$@" ;;
  serve) setup; exec fashion-exp-serve "$@" ;;
  # One worker (a local UI has one user; MLflow's default 4 each import MLflow, ~30 s on 2
  # cores), and without the Starlette deprecation warning MLflow's server code triggers.
  ui)    setup; PYTHONWARNINGS="ignore:starlette.middleware.wsgi is deprecated${PYTHONWARNINGS:+,$PYTHONWARNINGS}" \
           exec mlflow ui --workers 1 --backend-store-uri "sqlite:///$PWD/mlruns/mlflow.db" "$@" ;;
  *)     echo "dev.sh: unknown command '$cmd'; use run, test, test-fast, serve, ui or setup" >&2; exit 2 ;;
esac
