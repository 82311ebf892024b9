#!/usr/bin/env bash
# git gc (repacks, prunes loose objects), a second worktree added and removed, branch deletion.
set -euo pipefail
WS=${1:?usage: git_gc_worktree.sh WORKSPACE}
cd "$WS"
command -v git >/dev/null || { echo "corpus: git is not installed" >&2; exit 3; }
export GIT_AUTHOR_NAME=corpus GIT_AUTHOR_EMAIL=corpus@example.invalid
export GIT_COMMITTER_NAME=corpus GIT_COMMITTER_EMAIL=corpus@example.invalid

git init -q -b main repo
cd repo
for c in $(seq 1 15); do
  for i in $(seq 1 10); do echo "c$c f$i" > "f$i.txt"; done
  git add -A
  git commit -qm "commit $c"
done
git gc -q --prune=now
git gc -q --aggressive --prune=now
git worktree add -q ../repo-hotfix -b hotfix
echo fix > ../repo-hotfix/fix.txt
git -C ../repo-hotfix add fix.txt
git -C ../repo-hotfix commit -qm fix
git worktree remove ../repo-hotfix
git worktree prune
git merge -q --no-edit hotfix
git branch -q -d hotfix
git reflog expire --expire=now --all
git gc -q --prune=now
git fsck --no-progress >/dev/null
echo "CORPUS-OK git-gc-worktree $(git count-objects -v | sed -n 's/^in-pack: //p') objects packed"
