#!/usr/bin/env bash
# Re-fetch the browser libraries vendored in gateway/web/static/vendor/ from the npm
# registry (npm pack: the registry's tarball, checked against its published integrity).
#
#   scripts/vendor_assets.sh                 # the versions pinned below
#   THREE_VERSION=0.188.0 scripts/vendor_assets.sh
#
# Then: update the versions in gateway/web/static/vendor/README.md, run
# tests/test_mesh_viewer_js.py (renders a mesh in headless Chromium under the strict CSP),
# and commit the vendor folder together with SHA256SUMS.
set -euo pipefail

THREE_VERSION="${THREE_VERSION:-0.187.0}"
HTMX_VERSION="${HTMX_VERSION:-2.0.11}"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/gateway/web/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest"

cd "$work"
npm pack --silent "three@${THREE_VERSION}" "htmx.org@${HTMX_VERSION}" >/dev/null
mkdir three htmx
tar -xzf "three-${THREE_VERSION}.tgz" -C three --strip-components=1
tar -xzf "htmx.org-${HTMX_VERSION}.tgz" -C htmx --strip-components=1

# three.js: the ES module build and what it imports (three 0.18x ships no .min.js builds;
# three.module.js imports ./three.core.js, which imports nothing).
cp three/build/three.module.js three/build/three.core.js "$dest/"
# OrbitControls imports the bare specifier 'three', which a browser resolves only through an
# import map, and an import map must be an inline <script> (blocked by script-src 'self').
sed "s#from 'three';#from './three.module.js';#" \
    three/examples/jsm/controls/OrbitControls.js >"$dest/OrbitControls.js"
cp three/LICENSE "$dest/three.LICENSE"

cp htmx/dist/htmx.min.js "$dest/htmx.min.js"
cp htmx/LICENSE "$dest/htmx.LICENSE"

# Every import of the vendored ES modules must be relative and present (htmx.min.js is a
# classic script, not a module).
modules=("$dest/three.module.js" "$dest/three.core.js" "$dest/OrbitControls.js")
specs=$(grep -hE "^(import|export|\}).* from ['\"]" "${modules[@]}" | sed -E "s/.* from ['\"]([^'\"]+)['\"].*/\1/" | sort -u)
for spec in $specs; do
    case "$spec" in
        ./*.js) [ -f "$dest/${spec#./}" ] || { echo "missing imported module $spec" >&2; exit 1; } ;;
        *) echo "bare or non-local import '$spec' in a vendored module" >&2; exit 1 ;;
    esac
done

cd "$dest"
sha256sum three.module.js three.core.js OrbitControls.js htmx.min.js three.LICENSE htmx.LICENSE >SHA256SUMS
echo "vendored three ${THREE_VERSION}, htmx.org ${HTMX_VERSION} into ${dest}"
