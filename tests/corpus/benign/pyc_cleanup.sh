#!/usr/bin/env bash
# Byte-compile a source tree, then the usual clean-ups: `find -name '*.pyc' -delete`,
# `find -name __pycache__ -exec rm -rf {} +`, and removal of egg-info and coverage output.
set -euo pipefail
WS=${1:?usage: pyc_cleanup.sh WORKSPACE}
cd "$WS"
export PATH="/usr/bin:/bin:$PATH"   # the distro python3, whatever version managers the host has
command -v python3 >/dev/null || { echo "corpus: python3 is not installed" >&2; exit 3; }

mkdir -p pkg/sub pkg/tests
for i in $(seq 1 40); do echo "X$i = $i" > "pkg/m$i.py"; echo "Y$i = $i" > "pkg/sub/s$i.py"; done
touch pkg/__init__.py pkg/sub/__init__.py
python3 -m compileall -q pkg
python3 -m compileall -q -o 0 -o 1 pkg                  # optimized levels too: .opt-1.pyc
n=$(find pkg -name '*.pyc' | wc -l)
find . -name '*.pyc' -delete
python3 -m compileall -q pkg
find . -name __pycache__ -type d -prune -exec rm -rf {} +
mkdir -p pkg.egg-info htmlcov
for i in $(seq 1 30); do echo "<html>$i</html>" > "htmlcov/m$i.html"; done
touch pkg.egg-info/PKG-INFO .coverage
rm -rf pkg.egg-info htmlcov .coverage
[ "$(find . -name '*.pyc' | wc -l)" -eq 0 ] || { echo "pyc files left" >&2; exit 1; }
echo "CORPUS-OK pyc-cleanup $n pyc removed"
