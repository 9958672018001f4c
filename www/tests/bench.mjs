// Runs the benchmark page (www/bench.html) in headless Chromium and prints
// its results as JSON, with the package size (wasm + glue, gzipped).
// Usage: node www/tests/bench.mjs   (after tests/run.sh built everything)
import { readFile } from 'node:fs/promises';
import { gzipSync } from 'node:zlib';
import { join, resolve } from 'node:path';
import { launchBrowser, startServer } from './harness.mjs';

const pkg = resolve(import.meta.dirname, '../../host-wasm/pkg');
const files = ['tidemark_wasm_bg.wasm', 'tidemark_wasm.js', 'index.js'];
const bytes = Buffer.concat(await Promise.all(files.map((f) => readFile(join(pkg, f)))));
const wasm = (await readFile(join(pkg, files[0]))).length;
const size = { files, wasmBytes: wasm, rawBytes: bytes.length, gzippedBytes: gzipSync(bytes, { level: 9 }).length };

const server = await startServer();
const browser = await launchBrowser();
try {
  const page = await browser.context.newPage();
  await page.goto(`${server.url}/bench.html`);
  const results = await page.evaluate(() => globalThis.runBench());
  console.log(JSON.stringify({ size, ...results }, null, 2));
} finally {
  await browser.close();
  await server.stop();
}
