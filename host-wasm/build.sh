#!/usr/bin/env bash
# Builds the npm package `tidemark` into host-wasm/pkg: the crate for
# wasm32-unknown-unknown (profile wasm-release), wasm-bindgen's glue
# (--target web, so it loads from bundlers and plain module pages alike),
# wasm-opt -O3, the JavaScript API (js/index.js, shipped without comments)
# and its TypeScript types, generated from its JSDoc by tsc. Needs wasm-bindgen on PATH at the version
# in Cargo.lock and `npm ci` done at the repository root (wasm-opt and tsc).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
bin="$root/node_modules/.bin"
target=${CARGO_TARGET_DIR:-$root/target}
out="$here/pkg"

cargo build --manifest-path "$root/Cargo.toml" -p tidemark-wasm \
  --target wasm32-unknown-unknown --profile wasm-release --locked
rm -rf "$out"
mkdir -p "$out"
wasm-bindgen --target web --out-dir "$out" --out-name tidemark_wasm \
  "$target/wasm32-unknown-unknown/wasm-release/tidemark_wasm.wasm"
"$bin/wasm-opt" -O3 "$out/tidemark_wasm_bg.wasm" -o "$out/tidemark_wasm_bg.wasm"
cp "$here/js/index.js" "$here/js/mcp.js" "$here/js/package.json" "$here/js/README.md" "$out/"
"$bin/tsc" --allowJs --checkJs --strict --declaration --emitDeclarationOnly --stripInternal \
  --target es2022 --module es2022 --moduleResolution bundler --lib es2022,dom \
  --skipLibCheck --outDir "$out" "$out/index.js" "$out/mcp.js"
# The shipped index.js without its comments: the documentation is in
# index.d.ts, where editors show it (a quarter of the bytes).
"$bin/tsc" --allowJs --removeComments --target es2022 --module es2022 \
  --moduleResolution bundler --lib es2022,dom --skipLibCheck --noCheck \
  --outDir "$out/.plain" "$here/js/index.js" "$here/js/mcp.js"
mv "$out/.plain/index.js" "$out/.plain/mcp.js" "$out/"
rmdir "$out/.plain"
wasm=$(wc -c <"$out/tidemark_wasm_bg.wasm")
gz=$(cat "$out/tidemark_wasm_bg.wasm" "$out/tidemark_wasm.js" "$out/index.js" | gzip -9 | wc -c)
echo "tidemark package: $out (wasm $wasm bytes; wasm + glue gzipped $gz bytes)"
