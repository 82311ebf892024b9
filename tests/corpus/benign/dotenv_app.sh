#!/usr/bin/env bash
# A twelve-factor app in the workspace: its .env is loaded by every run of the app and its tests
# (dotenv, docker compose and Makefiles do the same), and .env.example is copied to .env.test.
set -euo pipefail
WS=${1:?usage: dotenv_app.sh WORKSPACE}
cd "$WS"
export PATH="/usr/bin:/bin:$PATH"   # the distro python3, whatever version managers the host has
for t in python3 make; do command -v "$t" >/dev/null || { echo "corpus: $t is not installed" >&2; exit 3; }; done

mkdir -p app
cd app
printf 'DATABASE_URL=sqlite:///dev.db\nDEBUG=1\n' > .env.example
cp .env.example .env
cat > settings.py <<'PY'
import os


def load(path=".env"):
    for line in open(path):
        key, _, value = line.strip().partition("=")
        os.environ.setdefault(key, value)
    return os.environ["DATABASE_URL"]
PY
cat > Makefile <<'MK'
include .env
run:
	@python3 -c 'import settings; print(settings.load())'
MK
for run in $(seq 1 6); do make -s run >/dev/null; done
cp .env.example .env.test
python3 -c 'import settings; assert settings.load(".env.test").startswith("sqlite")'
echo "CORPUS-OK dotenv 6 runs"
