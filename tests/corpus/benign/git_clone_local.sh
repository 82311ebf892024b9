#!/usr/bin/env bash
# Clone from a local bare repo, fetch, pull, push back (file transport: no network, no ssh).
set -euo pipefail
WS=${1:?usage: git_clone_local.sh WORKSPACE}
cd "$WS"
command -v git >/dev/null || { echo "corpus: git is not installed" >&2; exit 3; }
export GIT_AUTHOR_NAME=corpus GIT_AUTHOR_EMAIL=corpus@example.invalid
export GIT_COMMITTER_NAME=corpus GIT_COMMITTER_EMAIL=corpus@example.invalid

git init -q -b main seed
for i in $(seq 1 50); do echo "line $i" > "seed/f$i.txt"; done
git -C seed add -A
git -C seed commit -qm seed
git clone -q --bare seed upstream.git
git clone -q upstream.git work
git clone -q --no-local upstream.git work2      # the pack protocol, as a remote clone uses
echo "from work" > work/new.txt
git -C work add new.txt
git -C work commit -qm "add new"
git -C work push -q origin main
git -C work2 fetch -q origin
git -C work2 pull -q --ff-only origin main
[ -f work2/new.txt ] || { echo "pull did not bring new.txt" >&2; exit 1; }
git -C work2 checkout -q -b topic
echo topic > work2/topic.txt
git -C work2 add topic.txt
git -C work2 commit -qm topic
git -C work2 push -q -u origin topic
git -C work2 push -q origin --delete topic
echo "CORPUS-OK git-clone $(git -C work2 rev-parse --short HEAD)"
