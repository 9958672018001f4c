// Shared by the page tests and the benchmark driver: start `tidemark serve`
// on a free loopback port, and launch Debian's Chromium through
// playwright-core.
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const root = resolve(import.meta.dirname, '../..');
/** The demo and benchmark pages, built by `npm run build` in www/. */
export const dist = join(root, 'www/dist');

/** The `tidemark` binary: TIDEMARK_BIN, else the debug build in the target dir. */
export function tidemarkBin() {
  if (process.env.TIDEMARK_BIN) return process.env.TIDEMARK_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? join(root, 'target');
  return join(target, 'debug/tidemark');
}

/**
 * Starts `tidemark serve --listen 127.0.0.1:0 --www www/dist ...args` and
 * resolves with its base URL, read from the address it prints: the port is
 * proven to be this server's.
 */
export async function startServer(args = []) {
  const child = spawn(tidemarkBin(), ['serve', '--listen', '127.0.0.1:0', '--www', dist, ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const address = await new Promise((resolvePort, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error('tidemark serve printed no address in 10 s')), 10_000);
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`tidemark serve exited with ${code}`)));
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const line = out.split('\n')[0];
      if (out.includes('\n')) {
        clearTimeout(timer);
        resolvePort(line.trim());
      }
    });
  });
  child.removeAllListeners('exit');
  return {
    url: `http://${address}`,
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-dev-shm-usage',
];

/** Debian's Chromium with a fresh profile; `close()` removes the profile. */
export async function launchBrowser() {
  const profile = await mkdtemp(join(tmpdir(), 'tidemark-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: ARGS,
  });
  return {
    context,
    async close() {
      await context.close();
      await rm(profile, { recursive: true, force: true });
    },
  };
}

/** Resolves when `predicate()` is truthy in the page; fails after `ms`. */
export async function until(page, predicate, arg, ms = 30_000) {
  await page.waitForFunction(predicate, arg, { timeout: ms, polling: 50 });
}

/** Asserts that `shown` holds every id 1..n exactly once, naming any repeated, missing or extra. */
export function exactlyOnce(shown, n) {
  const counts = new Map();
  for (const id of shown) counts.set(id, (counts.get(id) ?? 0) + 1);
  const twice = [...counts].filter(([, c]) => c > 1).map(([id]) => id);
  const missing = [];
  for (let id = 1; id <= n; id++) if (!counts.has(id)) missing.push(id);
  const extra = [...counts.keys()].filter((id) => !(id >= 1 && id <= n));
  assert.deepEqual({ twice, missing, extra }, { twice: [], missing: [], extra: [] }, `shown: ${shown}`);
}
