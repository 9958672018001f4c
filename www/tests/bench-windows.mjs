// IndexedDB with dedup windows (issue 18) against the package without them,
// in one Chromium page: 100 streams fed 100,000 events/s between them for a
// few seconds, alternating, each contender on a database of its own.
// Prints transactions/s, bytes of windows per flush and events/s as JSON.
//
// Usage: node www/tests/bench-windows.mjs BASE_PKG
//   BASE_PKG: a build of the package without windows (host-wasm/build.sh at
//   an earlier commit), compared with host-wasm/pkg.
import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { launchBrowser, listen, packageFile } from './harness.mjs';

const base = process.argv[2];
if (!base) {
  console.error('usage: node www/tests/bench-windows.mjs BASE_PKG');
  process.exit(2);
}
const TYPES = { js: 'text/javascript', wasm: 'application/wasm' };
const server = createServer(async (req, res) => {
  const [, dir, name] = req.url.split('/');
  let file = null;
  if (dir === 'new') file = await packageFile(name);
  else if (dir === 'base' && /^[\w.-]+$/.test(name)) {
    file = await readFile(join(resolve(base), name)).then(
      (body) => ({ body, type: TYPES[name.split('.').pop()] ?? 'application/octet-stream' }),
      () => null,
    );
  } else if (req.url === '/') file = { body: '<!doctype html><title>bench</title>', type: 'text/html' };
  if (!file) {
    res.writeHead(404).end();
    return;
  }
  res.writeHead(200, { 'content-type': file.type }).end(file.body);
});
const port = await listen(server);
const browser = await launchBrowser();
try {
  const page = await browser.context.newPage();
  await page.goto(`http://127.0.0.1:${port}/`);
  const results = await page.evaluate(async () => {
    const STREAMS = 100;
    const RATE = 100_000;
    const SECONDS = 3;
    const ROUNDS = 3;
    const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
    const uuid = (s, i) => `${(s * 2654435761) >>> 0}-4b1e-4c7a-9d2e-${String(i).padStart(12, '0')}`;
    const packages = { base: await import('/base/index.js'), windows: await import('/new/index.js') };
    async function run(name, shape, round) {
      const { openTracker } = packages[name];
      const database = `bench-windows-${name}-${shape}-${round}-${Date.now()}`;
      const trackers = [];
      for (let s = 0; s < STREAMS; s++) trackers.push(await openTracker(`stream-${s}`, { database }));
      const before = trackers[0].stats();
      const t0 = performance.now();
      let fed = 0;
      while (performance.now() - t0 < SECONDS * 1000) {
        const due = Math.floor(((performance.now() - t0) / 1000) * RATE);
        for (; fed < due; fed++) {
          const s = fed % STREAMS;
          const n = Math.floor(fed / STREAMS) + 1;
          const id = shape === 'numeric' ? String(n) : uuid(s, n);
          if (trackers[s].observe(id)) trackers[s].commit();
        }
        await new Promise((r) => setTimeout(r, 0));
      }
      const seconds = (performance.now() - t0) / 1000;
      const after = trackers[0].stats();
      for (const t of trackers) await t.close();
      const transactions = after.storeTransactions - before.storeTransactions;
      const batches = after.batches - before.batches;
      const windowBytes = (after.windowBytesWritten ?? 0) - (before.windowBytesWritten ?? 0);
      return {
        eventsPerSecond: fed / seconds,
        transactionsPerSecond: transactions / seconds,
        batches,
        windowBytesPerFlush: batches ? windowBytes / batches : 0,
        cursorsPerFlush: batches ? (after.cursorsWritten - before.cursorsWritten) / batches : 0,
      };
    }
    const out = {};
    for (const shape of ['numeric', 'uuid']) {
      const runs = { base: [], windows: [] };
      for (let r = 0; r < ROUNDS; r++) for (const name of ['base', 'windows']) runs[name].push(await run(name, shape, r));
      const med = (name, k) => median(runs[name].map((x) => x[k]));
      out[shape] = {
        runs,
        medians: Object.fromEntries(
          ['base', 'windows'].map((name) => [
            name,
            Object.fromEntries(Object.keys(runs[name][0]).map((k) => [k, med(name, k)])),
          ]),
        ),
        transactionsPerSecondRatio: med('windows', 'transactionsPerSecond') / med('base', 'transactionsPerSecond'),
      };
    }
    return { userAgent: navigator.userAgent, streams: STREAMS, rate: RATE, seconds: SECONDS, rounds: ROUNDS, ...out };
  });
  console.log(JSON.stringify(results, null, 2));
} finally {
  await browser.close();
  server.close();
}
