#!/usr/bin/env bash
# git init, a few commits, amend, log/status/diff: a new project's first minutes.
set -euo pipefail
WS=${1:?usage: git_init_commit.sh WORKSPACE}
cd "$WS"
command -v git >/dev/null || { echo "corpus: git is not installed" >&2; exit 3; }
export GIT_AUTHOR_NAME=corpus GIT_AUTHOR_EMAIL=corpus@example.invalid
export GIT_COMMITTER_NAME=corpus GIT_COMMITTER_EMAIL=corpus@example.invalid

git init -q -b main proj
cd proj
mkdir -p src docs
for i in $(seq 1 20); do printf 'def f%d():\n    return %d\n' "$i" "$i" > "src/m$i.py"; done
echo "# proj" > README.md
git add -A
git commit -q -m "initial"
for i in 1 2 3; do
  echo "# change $i" >> README.md
  sed -i "s/return $i/return $((i * 10))/" "src/m$i.py"
  git commit -qam "change $i"
done
echo "notes" > docs/notes.md
git add docs/notes.md
git commit -q --amend --no-edit
git tag v0.1
git status --short >/dev/null
git diff HEAD~2 --stat >/dev/null
git log --oneline >/dev/null
n=$(git rev-list --count HEAD)
[ "$n" -eq 4 ] || { echo "expected 4 commits, got $n" >&2; exit 1; }
echo "CORPUS-OK git-init $n commits"
