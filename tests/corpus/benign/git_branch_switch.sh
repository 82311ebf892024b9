#!/usr/bin/env bash
# Switch between branches that differ by 300 files: git deletes and recreates them each time.
set -euo pipefail
WS=${1:?usage: git_branch_switch.sh WORKSPACE}
cd "$WS"
command -v git >/dev/null || { echo "corpus: git is not installed" >&2; exit 3; }
export GIT_AUTHOR_NAME=corpus GIT_AUTHOR_EMAIL=corpus@example.invalid
export GIT_COMMITTER_NAME=corpus GIT_COMMITTER_EMAIL=corpus@example.invalid

git init -q -b main repo
cd repo
echo base > README.md
git add README.md
git commit -qm base
git switch -q -c feature
mkdir -p gen/a gen/b
for i in $(seq 1 150); do echo "a $i" > "gen/a/f$i.txt"; echo "b $i" > "gen/b/f$i.txt"; done
git add -A
git commit -qm "300 generated files"
for round in 1 2 3; do
  git switch -q main
  [ ! -e gen ] || { echo "gen/ still there on main" >&2; exit 1; }
  git checkout -q feature
  [ -f gen/b/f150.txt ] || { echo "gen/ missing on feature" >&2; exit 1; }
done
git checkout -q main
git checkout -q feature -- gen/a       # restore paths from another branch
git reset -q --hard                     # and throw them away again
count=$(git ls-tree -r --name-only feature | wc -l)
echo "CORPUS-OK git-switch $count files on feature"
