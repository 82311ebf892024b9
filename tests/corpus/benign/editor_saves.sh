#!/usr/bin/env bash
# Editors saving files: vim's swap file, its 4913 probe, `file~` backup and rename-over-original;
# an atomic write through a temp file + rename (VS Code, most formatters); sed -i; real vim if installed.
set -euo pipefail
WS=${1:?usage: editor_saves.sh WORKSPACE}
cd "$WS"
export PATH="/usr/bin:/bin:$PATH"   # the distro python3, whatever version managers the host has
command -v python3 >/dev/null || { echo "corpus: python3 is not installed" >&2; exit 3; }

mkdir -p src
for i in $(seq 1 30); do printf 'line one\nline two %d\n' "$i" > "src/file$i.txt"; done

vim_like_save() {  # what vim does with 'backupcopy=no' (rename) and a swap file
  local f=$1 dir base
  dir=$(dirname "$f"); base=$(basename "$f")
  printf 'swap' > "$dir/.$base.swp"             # opened for editing
  : > "$dir/4913" && rm -f "$dir/4913"            # "can I create files here?" probe
  mv "$f" "$f~"                                   # keep the old version as a backup
  { cat "$f~"; echo "edited"; } > "$f"            # write the new version
  rm -f "$f~"                                      # 'nowritebackup' off: drop the backup
  rm -f "$dir/.$base.swp"                          # editor closed
}
for i in $(seq 1 30); do vim_like_save "src/file$i.txt"; done

python3 - <<'PY'
import os, tempfile
for i in range(1, 31):
    path = f"src/file{i}.txt"
    text = open(path).read() + "formatted\n"
    fd, tmp = tempfile.mkstemp(dir="src", prefix=f".file{i}.txt.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
PY

sed -i 's/line one/LINE ONE/' src/*.txt           # sed writes a temp file and renames it over each
sed -i.bak 's/line two/LINE TWO/' src/file1.txt && rm src/file1.txt.bak

if command -v vim >/dev/null; then               # the real editor, saving with swap and backup on
  for i in 1 2 3; do
    vim -u NONE -i NONE -N -es -c 'set swapfile backup writebackup' -c '%s/edited/EDITED/' -c 'wq' "src/file$i.txt"
  done
  rm -f src/*~
  how=vim
else
  how=no-vim
fi
grep -q formatted src/file30.txt && grep -q 'LINE ONE' src/file2.txt || { echo "edits lost" >&2; exit 1; }
left=$(find src -name '*.swp' -o -name '*~' -o -name '.*.tmp' -o -name 4913 | wc -l)
[ "$left" -eq 0 ] || { echo "$left editor leftovers" >&2; exit 1; }
echo "CORPUS-OK editor-saves 30 files ($how)"
