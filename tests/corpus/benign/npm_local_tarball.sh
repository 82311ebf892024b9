#!/usr/bin/env bash
# npm: a local package packed with `npm pack`, installed offline from the tarball into an app
# (default cache: $HOME/.npm), required from node, reinstalled after `rm -rf node_modules`, removed.
set -euo pipefail
WS=${1:?usage: npm_local_tarball.sh WORKSPACE}
cd "$WS"
for t in node npm; do command -v "$t" >/dev/null || { echo "corpus: $t is not installed" >&2; exit 3; }; done
export npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false

mkdir -p leftpad/lib app
cat > leftpad/package.json <<'JSON'
{"name": "corpus-leftpad", "version": "1.0.0", "main": "lib/index.js", "bin": {"leftpad": "bin.js"}}
JSON
echo 'module.exports = (s, n, c = " ") => String(s).padStart(n, c);' > leftpad/lib/index.js
printf '#!/usr/bin/env node\nconsole.log(require("./lib/index.js")(process.argv[2], 8, "0"));\n' > leftpad/bin.js
(cd leftpad && npm pack --silent >/dev/null)
cat > app/package.json <<'JSON'
{"name": "corpus-app", "version": "0.0.1", "private": true, "scripts": {"test": "node test.js"}}
JSON
echo 'const lp = require("corpus-leftpad"); if (lp("7", 3, "0") !== "007") process.exit(1);' > app/test.js
cd app
npm install --offline --silent ../leftpad/corpus-leftpad-1.0.0.tgz
npm test --silent
out=$(npx --offline leftpad 42)
rm -rf node_modules
npm ci --offline --silent
npm uninstall --offline --silent corpus-leftpad
[ ! -e node_modules/corpus-leftpad ] || { echo "uninstall left the package" >&2; exit 1; }
echo "CORPUS-OK npm-install $out"
