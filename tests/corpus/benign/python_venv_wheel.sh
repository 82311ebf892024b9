#!/usr/bin/env bash
# A Python venv in the workspace, a tiny package built into a wheel offline, installed with --no-index,
# imported, its console script run, uninstalled; then the venv removed.
set -euo pipefail
WS=${1:?usage: python_venv_wheel.sh WORKSPACE}
cd "$WS"
export PATH="/usr/bin:/bin:$PATH"   # the distro python3, whatever version managers the host has
PY=/usr/bin/python3
"$PY" -c 'import venv, ensurepip' 2>/dev/null || { echo "corpus: python3-venv is not installed" >&2; exit 3; }
# setuptools and wheel come from the system (python3-setuptools, python3-wheel): building offline
# without build isolation needs them, and --system-site-packages is how the venv sees them.
"$PY" -c 'import setuptools, wheel' 2>/dev/null \
  || { echo "corpus: python3-setuptools and python3-wheel are needed" >&2; exit 3; }

mkdir -p tinypkg/src/tinypkg
cat > tinypkg/pyproject.toml <<'TOML'
[build-system]
requires = ["setuptools", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "tinypkg"
version = "0.1.0"

[project.scripts]
tinypkg-hello = "tinypkg:hello"
TOML
cat > tinypkg/src/tinypkg/__init__.py <<'PY'
def hello() -> None:
    print("hello from tinypkg")
PY
"$PY" -m venv --system-site-packages .venv
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation --no-index -w wheels ./tinypkg
.venv/bin/python -m pip install -q --no-index wheels/tinypkg-0.1.0-py3-none-any.whl
.venv/bin/python -c 'import tinypkg, sys; assert tinypkg.__file__.startswith(sys.prefix), tinypkg.__file__'
out=$(.venv/bin/tinypkg-hello)
.venv/bin/python -m pip install -q --no-index --force-reinstall --no-deps wheels/tinypkg-0.1.0-py3-none-any.whl
.venv/bin/python -m pip uninstall -q -y tinypkg
rm -rf tinypkg/build tinypkg/src/*.egg-info .venv
echo "CORPUS-OK venv-wheel $out"
