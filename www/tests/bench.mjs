// Runs the benchmark page (www/bench.html) in headless Chromium and prints
// its results as JSON, with the package size (wasm + glue, gzipped).
// Usage: node www/tests/bench.mjs   (after tests/run.sh built everything and
// `cargo build --release -p tidemark`)
//
// The page and its live stream come from one `tidemark serve --interval-ms 0
// --count N` (same origin, so neither contender needs CORS): the release
// build, or TIDEMARK_BIN, since the server's speed bounds the live figures.
import { access, readFile } from 'node:fs/promises';
import { gzipSync } from 'node:zlib';
import { join, resolve } from 'node:path';
import { launchBrowser, startServer } from './harness.mjs';

const root = resolve(import.meta.dirname, '../..');
if (!process.env.TIDEMARK_BIN) {
  const release = join(process.env.CARGO_TARGET_DIR ?? join(root, 'target'), 'release/tidemark');
  await access(release).catch(() => {
    console.error(`no ${release}: run \`cargo build --release -p tidemark\` or set TIDEMARK_BIN`);
    process.exit(1);
  });
  process.env.TIDEMARK_BIN = release;
}
/** Events per live-stream run; the server serves exactly these. */
const LIVE_EVENTS = 200_000;

const pkg = resolve(import.meta.dirname, '../../host-wasm/pkg');
const files = ['tidemark_wasm_bg.wasm', 'tidemark_wasm.js', 'index.js'];
const bytes = Buffer.concat(await Promise.all(files.map((f) => readFile(join(pkg, f)))));
const wasm = (await readFile(join(pkg, files[0]))).length;
const size = { files, wasmBytes: wasm, rawBytes: bytes.length, gzippedBytes: gzipSync(bytes, { level: 9 }).length };

const server = await startServer(['--interval-ms', '0', '--count', String(LIVE_EVENTS)]);
const browser = await launchBrowser();
try {
  const page = await browser.context.newPage();
  await page.goto(`${server.url}/bench.html`);
  const results = await page.evaluate(
    (n) => globalThis.runBench({ liveStream: { url: '/events', n } }),
    LIVE_EVENTS,
  );
  console.log(JSON.stringify({ size, ...results }, null, 2));
} finally {
  await browser.close();
  await server.stop();
}
