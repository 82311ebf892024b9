#!/usr/bin/env bash
# Formatters and generators rewriting files in place (open with O_TRUNC, as black, prettier --write,
# gofmt -w do), logs emptied with `: > file` and `truncate -s 0`, generated code regenerated.
set -euo pipefail
WS=${1:?usage: format_in_place.sh WORKSPACE}
cd "$WS"
export PATH="/usr/bin:/bin:$PATH"   # the distro python3, whatever version managers the host has
for t in python3 truncate; do command -v "$t" >/dev/null || { echo "corpus: $t is not installed" >&2; exit 3; }; done

mkdir -p code logs gen
for i in $(seq 1 250); do printf 'x=%d\ny  =  [1,2,3]\n' "$i" > "code/m$i.py"; done
python3 - <<'PY'
import pathlib
for path in sorted(pathlib.Path("code").glob("*.py")):   # a formatter's pass: read, reformat, rewrite in place
    text = path.read_text()
    path.write_text(text.replace("x=", "x = ").replace("y  =  [1,2,3]", "y = [1, 2, 3]"))
PY
for i in $(seq 1 20); do head -c 4096 /dev/zero | tr '\0' 'l' > "logs/run$i.log"; done
for i in $(seq 1 10); do : > "logs/run$i.log"; done
truncate -s 0 logs/run1[1-9].log logs/run20.log
for round in 1 2 3; do
  for i in $(seq 1 60); do echo "// generated round $round" > "gen/api$i.ts"; done
done
grep -q 'y = \[1, 2, 3\]' code/m250.py || { echo "formatting lost" >&2; exit 1; }
[ ! -s logs/run20.log ] || { echo "log not emptied" >&2; exit 1; }
echo "CORPUS-OK format-in-place 250 files"
