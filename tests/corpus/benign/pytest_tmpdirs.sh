#!/usr/bin/env bash
# A pytest suite whose tests write into tmp_path, twice with the default base temp (/tmp/pytest-of-*)
# and twice with --basetemp in the workspace, which pytest empties (rm -r) at the start of each run.
set -euo pipefail
WS=${1:?usage: pytest_tmpdirs.sh WORKSPACE}
cd "$WS"
export PATH="/usr/bin:/bin:$PATH"   # the distro python3, whatever version managers the host has
# Debian's python3-pytest; else the interpreter named by CORPUS_PYTHON (the test passes its own).
# That one lives outside the workspace: its bytecode (pytest's rewrite of its plugins too) goes to a
# cache inside the workspace, as if pytest were installed in the project's own venv.
PY=/usr/bin/python3
if ! "$PY" -c 'import pytest' 2>/dev/null; then
  PY=${CORPUS_PYTHON:-}
  export PYTHONPYCACHEPREFIX="$WS/.pycache"
fi
[ -n "$PY" ] && "$PY" -c 'import pytest' 2>/dev/null \
  || { echo "corpus: pytest is not installed (python3-pytest)" >&2; exit 3; }

mkdir -p suite/tests
cat > suite/tests/test_files.py <<'PY'
import json
import os

import pytest


@pytest.mark.parametrize("n", range(20))
def test_writes_and_reads(tmp_path, n):
    data = {"n": n, "items": list(range(n))}
    target = tmp_path / "sub" / f"data{n}.json"
    target.parent.mkdir()
    target.write_text(json.dumps(data))
    assert json.loads(target.read_text()) == data
    for i in range(10):
        (tmp_path / f"junk{i}").write_bytes(os.urandom(64))
    (tmp_path / "junk0").unlink()


def test_chdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open("here.txt", "w").write("x")
    assert (tmp_path / "here.txt").exists()


def test_tmpdir_factory(tmp_path_factory):
    d = tmp_path_factory.mktemp("shared")
    for i in range(30):
        (d / f"f{i}").write_text(str(i))
    assert len(list(d.iterdir())) == 30
PY
cd suite
for run in 1 2; do
  "$PY" -m pytest -q -p no:cacheprovider tests >/dev/null
  "$PY" -m pytest -q -p no:cacheprovider --basetemp=.pytest-tmp tests > last-run.txt
done
passed=$(grep -o '[0-9]* passed' last-run.txt)
rm -rf .pytest-tmp last-run.txt
echo "CORPUS-OK pytest $passed"
