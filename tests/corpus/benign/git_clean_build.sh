#!/usr/bin/env bash
# Build output in a git work tree, then `git clean -fdx` (ignored and untracked files, recursively).
set -euo pipefail
WS=${1:?usage: git_clean_build.sh WORKSPACE}
cd "$WS"
command -v git >/dev/null || { echo "corpus: git is not installed" >&2; exit 3; }
export GIT_AUTHOR_NAME=corpus GIT_AUTHOR_EMAIL=corpus@example.invalid
export GIT_COMMITTER_NAME=corpus GIT_COMMITTER_EMAIL=corpus@example.invalid

git init -q -b main repo
cd repo
printf 'build/\ndist/\n*.o\n' > .gitignore
echo 'int main(void) { return 0; }' > main.c
git add -A
git commit -qm base
mkdir -p build/obj build/lib dist
for i in $(seq 1 120); do echo "obj $i" > "build/obj/o$i.o"; done
for i in $(seq 1 30); do echo "lib $i" > "build/lib/l$i.a"; echo "pkg $i" > "dist/p$i.tar"; done
for i in $(seq 1 20); do echo "tmp" > "stray$i.o"; done
echo "untracked" > notes.txt
git clean -q -n -d >/dev/null
git clean -q -fdx
left=$(git status --porcelain --ignored | wc -l)
[ "$left" -eq 0 ] || { echo "git clean left $left entries" >&2; exit 1; }
[ ! -e build ] && [ ! -e dist ] || { echo "build output still there" >&2; exit 1; }
echo "CORPUS-OK git-clean removed build dist"
