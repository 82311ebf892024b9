#!/usr/bin/env bash
# Rebase a topic branch (with files added and deleted) onto main, stash and pop, cherry-pick.
set -euo pipefail
WS=${1:?usage: git_rebase_stash.sh WORKSPACE}
cd "$WS"
command -v git >/dev/null || { echo "corpus: git is not installed" >&2; exit 3; }
export GIT_AUTHOR_NAME=corpus GIT_AUTHOR_EMAIL=corpus@example.invalid
export GIT_COMMITTER_NAME=corpus GIT_COMMITTER_EMAIL=corpus@example.invalid

git init -q -b main repo
cd repo
for i in $(seq 1 40); do echo "v1 $i" > "m$i.txt"; done
git add -A
git commit -qm base
git switch -q -c topic
for i in $(seq 1 10); do echo "topic $i" >> "m$i.txt"; git commit -qam "topic $i"; done
git rm -q m3[0-9].txt
git commit -qm "drop ten files"
git switch -q main
for i in $(seq 11 20); do echo "main $i" >> "m$i.txt"; done
git commit -qam "main edits"
git switch -q topic
git rebase -q main
[ "$(git rev-list --count main..topic)" -eq 11 ] || { echo "rebase lost commits" >&2; exit 1; }
# stash: tracked edits and an untracked file, then pop
for i in $(seq 1 15); do echo "wip" >> "m$i.txt"; done
echo scratch > untracked.txt
git stash push -q -u -m wip
[ ! -e untracked.txt ] || { echo "stash kept untracked.txt" >&2; exit 1; }
git stash pop -q
[ -f untracked.txt ] || { echo "stash pop lost untracked.txt" >&2; exit 1; }
git stash push -q -u
git stash drop -q
git switch -q main
git cherry-pick topic~3 >/dev/null
git rebase -q --onto main topic~2 topic
echo "CORPUS-OK git-rebase-stash $(git rev-list --count HEAD) commits"
