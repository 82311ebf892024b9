#!/usr/bin/env bash
# make builds into build/ and dist/, `make clean`, then the usual `rm -rf build dist node_modules .venv`.
set -euo pipefail
WS=${1:?usage: make_clean.sh WORKSPACE}
cd "$WS"
command -v make >/dev/null || { echo "corpus: make is not installed" >&2; exit 3; }

mkdir -p proj/src
cd proj
for i in $(seq 1 60); do echo "source $i" > "src/s$i.txt"; done
cat > Makefile <<'MK'
SRC := $(wildcard src/*.txt)
OUT := $(patsubst src/%.txt,build/%.out,$(SRC))
all: dist/bundle.tar
build/%.out: src/%.txt
	@mkdir -p build
	@tr a-z A-Z < $< > $@
dist/bundle.tar: $(OUT)
	@mkdir -p dist
	@tar cf $@ build
clean:
	rm -rf build dist
	rm -f *.log
.PHONY: all clean
MK
make -s -j2
[ -f dist/bundle.tar ] || { echo "make built nothing" >&2; exit 1; }
echo log > build.log
make -s clean
[ ! -e build ] || { echo "make clean left build/" >&2; exit 1; }
# Rebuild, then the hand-made clean of a JS/Python project's usual outputs.
make -s -j2
mkdir -p node_modules/left-pad/lib node_modules/.bin .venv/lib/python3/site-packages/pkg .venv/bin
for i in $(seq 1 80); do echo "m $i" > "node_modules/left-pad/lib/f$i.js"; done
for i in $(seq 1 40); do echo "p $i" > ".venv/lib/python3/site-packages/pkg/m$i.py"; done
touch .venv/bin/python node_modules/.bin/left-pad
rm -rf build dist node_modules .venv
[ ! -e build ] && [ ! -e node_modules ] && [ ! -e .venv ] || { echo "rm -rf left something" >&2; exit 1; }
rm -rf ./build "$PWD/dist"       # already gone: -f makes these no-ops, relative and absolute
echo "CORPUS-OK make-clean"
