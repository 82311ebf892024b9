#!/usr/bin/env bash
# Unpack a source tarball into the workspace, build-ish work in it, then `rm -rf` the extracted tree;
# a temp dir from mktemp in /tmp for the tarball itself.
set -euo pipefail
WS=${1:?usage: tar_extract.sh WORKSPACE}
cd "$WS"
for t in tar gzip; do command -v "$t" >/dev/null || { echo "corpus: $t is not installed" >&2; exit 3; }; done

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/lib-1.2/src" "$stage/lib-1.2/docs"
for i in $(seq 1 100); do echo "code $i" > "$stage/lib-1.2/src/c$i.c"; echo "doc $i" > "$stage/lib-1.2/docs/d$i.md"; done
tar czf "$stage/lib-1.2.tar.gz" -C "$stage" lib-1.2
mkdir -p vendor
tar xzf "$stage/lib-1.2.tar.gz" -C vendor
n=$(find vendor/lib-1.2 -type f | wc -l)
tar czf lib-repacked.tar.gz -C vendor lib-1.2
rm -rf vendor/lib-1.2
tar xzf lib-repacked.tar.gz                         # again, into the workspace itself
rm -rf lib-1.2 lib-repacked.tar.gz
[ ! -e vendor/lib-1.2 ] && [ ! -e lib-1.2 ] || { echo "extracted tree left" >&2; exit 1; }
echo "CORPUS-OK tar-extract $n files"
