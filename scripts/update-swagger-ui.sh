#!/usr/bin/env bash
# Vendor Swagger UI (npm swagger-ui-dist) into api/static/swagger-ui so /api/docs works offline.
# Usage: scripts/update-swagger-ui.sh [VERSION]   (needs npm and the npm registry; run by hand,
# commit the result; `pip install` then needs no Node toolchain).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-5.35.0}
TARGET=api/static/swagger-ui
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "swagger-ui-dist@${VERSION}" >/dev/null && tar xzf swagger-ui-dist-*.tgz)
rm -rf "$TARGET"
mkdir -p "$TARGET"
for file in swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css \
            favicon-32x32.png LICENSE NOTICE; do
  cp "$WORK/package/$file" "$TARGET/"
done
# No source maps are shipped: drop the comments that point browsers' developer tools at them.
sed -i '/^\/\/# sourceMappingURL=/d' "$TARGET/swagger-ui-bundle.js"
sed -i 's|/\*# sourceMappingURL=[^*]*\*/||' "$TARGET/swagger-ui.css"
echo "swagger-ui-dist ${VERSION}" > "$TARGET/VERSION"
echo "Swagger UI ${VERSION} vendored into ${TARGET}"
