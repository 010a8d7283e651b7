# Set-up shared by every launch/ command: system packages, .venv, the package itself.
# Sourced, not executed. Idempotent: a second run that finds everything in place takes seconds.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DIHN_VENV:-$REPO_ROOT/.venv}"
CONSTRAINTS="${DIHN_CONSTRAINTS:-$REPO_ROOT/launch/constraints.txt}"
PYTHON="${DIHN_PYTHON:-python3}"

# FFCV 1.0.2 compiles against OpenCV and libjpeg-turbo; the dataset package is the embedded default data.
APT_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev gcc g++ make dataset-fashion-mnist)

log() { printf '[dihn_dist setup] %s\n' "$*" >&2; }
die() { printf '[dihn_dist setup] ERROR: %s\n' "$*" >&2; exit 1; }
# Print the exact command (shell-quoted), then run it: every launch helper shows what it runs.
run() { printf '+'; printf ' %q' "$@"; printf '\n'; "$@"; }

missing_apt_packages() {
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
  done
}

ensure_apt_packages() {
  command -v dpkg-query >/dev/null || { log "not a Debian system: make sure these are installed: ${*}"; return 0; }
  local missing
  missing=$(missing_apt_packages "$@" | tr '\n' ' ')
  [ -z "${missing// }" ] && return 0
  if [ "$(id -u)" != 0 ]; then
    die "missing system packages: $missing
  install them as root:   sudo apt-get install -y $missing
  or, without root, use conda:  conda install -c conda-forge pkg-config opencv libjpeg-turbo compilers
  and set DIHN_SKIP_APT=1 to skip this check."
  fi
  log "installing system packages: $missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# A Python that can make a venv and has its C headers (FFCV compiles an extension against them).
python_ready() {
  "$PYTHON" -c 'import venv, ensurepip, os, sysconfig
assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' >/dev/null 2>&1
}

ensure_python() {
  if ! python_ready; then
    [ "${DIHN_SKIP_APT:-0}" = 1 ] && die "$PYTHON cannot build dihn_dist's dependencies: install python3-venv and python3-dev"
    PYTHON=python3
    ensure_apt_packages python3 python3-venv python3-dev
    python_ready || die "python3 still lacks venv or its headers after installing python3-venv python3-dev"
  fi
}

# Reinstall only when the inputs of the install change.
install_stamp() {
  cat "$REPO_ROOT/setup.cfg" "$REPO_ROOT/pyproject.toml" "$CONSTRAINTS" 2>/dev/null | sha256sum | cut -c1-16
}

ensure_venv() {
  local stamp_file="$VENV/.dihn_dist_install" want
  want="$(install_stamp)"
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    return 0
  fi
  [ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  local install_log="$VENV/install.log"
  log "installing dihn_dist[test] into $VENV (constraints: $CONSTRAINTS; log: $install_log)"
  {
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel &&
    # numpy/cython must be present before FFCV's source build looks for them.
    PIP_CONSTRAINT="$CONSTRAINTS" "$VENV/bin/python" -m pip install -q numpy cython &&
    PIP_CONSTRAINT="$CONSTRAINTS" "$VENV/bin/python" -m pip install -q --no-build-isolation -e "$REPO_ROOT[test]"
  } > "$install_log" 2>&1 || { tail -n 40 "$install_log" >&2; die "pip install failed (full log: $install_log)"; }
  echo "$want" > "$stamp_file"
}

setup_all() {
  if [ "${DIHN_SKIP_APT:-0}" != 1 ]; then
    ensure_python
    ensure_apt_packages "${APT_PACKAGES[@]}"
  fi
  ensure_venv
  export PATH="$VENV/bin:$PATH"
}
