#!/usr/bin/env bash
# A refactor: `git mv` of a package, files renamed in bulk, a search-and-replace across the tree,
# symlinks and permissions inside the workspace, then the commit.
set -euo pipefail
WS=${1:?usage: refactor_renames.sh WORKSPACE}
cd "$WS"
command -v git >/dev/null || { echo "corpus: git is not installed" >&2; exit 3; }
export GIT_AUTHOR_NAME=corpus GIT_AUTHOR_EMAIL=corpus@example.invalid
export GIT_COMMITTER_NAME=corpus GIT_COMMITTER_EMAIL=corpus@example.invalid

git init -q -b main repo
cd repo
mkdir -p oldpkg/core oldpkg/util scripts
for i in $(seq 1 60); do echo "import oldpkg.core.m$i" > "oldpkg/core/m$i.py"; echo "u$i" > "oldpkg/util/u$i.py"; done
printf '#!/bin/sh\necho run\n' > scripts/run.sh
git add -A
git commit -qm base
git mv oldpkg newpkg
for f in newpkg/util/u*.py; do git mv "$f" "${f%.py}_helpers.py"; done
grep -rl oldpkg newpkg | xargs sed -i 's/oldpkg/newpkg/g'
mkdir -p bin
chmod +x scripts/run.sh
ln -s ../scripts/run.sh bin/run
ln -sfn newpkg current
for i in $(seq 1 40); do mv "newpkg/core/m$i.py" "newpkg/core/mod_$i.py"; done   # plain mv, then staged
git add -A
git commit -qm "rename oldpkg to newpkg"
[ "$(./bin/run)" = run ] || { echo "symlinked script did not run" >&2; exit 1; }
[ -z "$(grep -rl oldpkg newpkg || true)" ] || { echo "oldpkg references left" >&2; exit 1; }
echo "CORPUS-OK refactor $(git show --stat --format= HEAD | tail -1 | tr -s ' ')"
