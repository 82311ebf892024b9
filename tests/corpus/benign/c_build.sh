#!/usr/bin/env bash
# A small C project: gcc through a Makefile (objects, a static library, a binary), run, rebuild, clean.
set -euo pipefail
WS=${1:?usage: c_build.sh WORKSPACE}
cd "$WS"
for t in gcc make ar; do command -v "$t" >/dev/null || { echo "corpus: $t is not installed" >&2; exit 3; }; done

mkdir -p cproj/src cproj/include
cd cproj
cat > include/util.h <<'C'
int add(int a, int b);
int mul(int a, int b);
C
printf '#include "util.h"\nint add(int a, int b) { return a + b; }\n' > src/add.c
printf '#include "util.h"\nint mul(int a, int b) { return a * b; }\n' > src/mul.c
cat > src/main.c <<'C'
#include <stdio.h>
#include "util.h"
int main(void) { printf("%d\n", add(2, mul(3, 4))); return 0; }
C
cat > Makefile <<'MK'
CFLAGS := -O2 -Wall -Iinclude -MMD
OBJ := build/add.o build/mul.o
all: build/app
build/%.o: src/%.c
	@mkdir -p build
	$(CC) $(CFLAGS) -c $< -o $@
build/libutil.a: $(OBJ)
	$(AR) rcs $@ $^
build/app: build/main.o build/libutil.a
	$(CC) -o $@ $^
clean:
	rm -rf build
-include build/*.d
.PHONY: all clean
MK
make -s -j2 >/dev/null
out=$(./build/app)
[ "$out" = 14 ] || { echo "app printed $out" >&2; exit 1; }
touch include/util.h
make -s -j2 >/dev/null                 # header change: everything recompiles over the old objects
make -s clean >/dev/null
gcc -O0 -g -Iinclude src/*.c -o app-debug   # a one-shot compile straight into the workspace
./app-debug >/dev/null
rm -f app-debug
echo "CORPUS-OK c-build app=$out"
