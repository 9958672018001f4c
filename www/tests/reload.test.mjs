// The demo page in real Chromium against `tidemark serve`: drops, reloads
// mid-stream, a plain module page, a browser without IndexedDB, a full quota.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { exactlyOnce, launchBrowser, startServer, until } from './harness.mjs';

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

/**
 * Every event id a page shows, across its reloads: each page appends the ids
 * it shows to sessionStorage (synchronous, and kept across reloads of the
 * tab), and reports them to the test for progress.
 */
async function watch(page) {
  const progress = { count: 0 };
  await page.exposeBinding('reportShown', () => progress.count++);
  await page.addInitScript(() => {
    document.addEventListener('demo:shown', (e) => {
      const shown = sessionStorage.getItem('shown');
      sessionStorage.setItem('shown', shown ? `${shown},${e.detail}` : e.detail);
      globalThis.reportShown();
    });
  });
  return {
    progress,
    async all() {
      const shown = await page.evaluate(() => sessionStorage.getItem('shown') ?? '');
      return shown.split(',').filter(Boolean).map(Number);
    },
  };
}


test('reloading mid-stream shows every event exactly once', { timeout: 180_000 }, async () => {
  const n = 400;
  const server = await startServer(['--count', String(n), '--interval-ms', '10', '--drop-every', '45']);
  try {
    const page = await browser.context.newPage();
    const watcher = await watch(page);
    // A slow device: the page-hide write then often finds the worker in the
    // middle of a write, which is the case that must not lose the cursor.
    const cdp = await browser.context.newCDPSession(page);
    await cdp.send('Emulation.setCPUThrottlingRate', { rate: 4 });
    await page.goto(`${server.url}/`);
    const reloads = 6;
    for (let i = 1; i <= reloads; i++) {
      const target = Math.floor((n * i) / (reloads + 1));
      while (watcher.progress.count < target) await page.waitForTimeout(20);
      await page.reload();
    }
    await until(page, (max) => globalThis.demo?.shown.at(-1) === String(max), n);
    // Anything repeated after the last event would show up here.
    await page.waitForTimeout(300);
    exactlyOnce(await watcher.all(), n);
    const stats = await page.evaluate(() => globalThis.demo.source.stats());
    assert.equal(stats.store, 'indexeddb');
    assert.equal(stats.lastEventId, String(n));
    await page.close();
  } finally {
    await server.stop();
  }
});

test('reloading against a server that rewinds 30 events shows every event once, in order', { timeout: 180_000 }, async () => {
  // Each reconnect, a reload's included, gets the 30 events before its
  // Last-Event-ID again: only the dedup window the reloaded page restores
  // from IndexedDB (written on pagehide with the cursor) keeps them out.
  const n = 1500;
  const server = await startServer([
    '--count', String(n), '--interval-ms', '5', '--drop-every', '200', '--rewind', '30', '--retry-ms', '50',
  ]);
  try {
    const page = await browser.context.newPage();
    const watcher = await watch(page);
    const cdp = await browser.context.newCDPSession(page);
    await cdp.send('Emulation.setCPUThrottlingRate', { rate: 4 });
    await page.goto(`${server.url}/`);
    const reloads = 6;
    let replaysDropped = 0;
    for (let i = 1; i <= reloads; i++) {
      const target = Math.floor((n * i) / (reloads + 1));
      while (watcher.progress.count < target) await page.waitForTimeout(20);
      await page.reload();
      // The reloaded page's first connection resumes with a replay of 30.
      await until(page, () => globalThis.demo?.source.stats().duplicates >= 29);
      replaysDropped += await page.evaluate(() => globalThis.demo.source.stats().duplicates);
    }
    await until(page, (max) => globalThis.demo?.shown.at(-1) === String(max), n, 60_000);
    await page.waitForTimeout(300);
    const all = await watcher.all();
    exactlyOnce(all, n);
    assert.deepEqual(all, Array.from({ length: n }, (_, i) => i + 1), 'in order');
    assert.ok(replaysDropped >= reloads * 29, `replays dropped after reloads: ${replaysDropped}`);
    const stats = await page.evaluate(() => globalThis.demo.source.stats());
    assert.equal(stats.store, 'indexeddb');
    assert.ok(stats.windowBytesWritten > 0, `window bytes written: ${stats.windowBytesWritten}`);
    await page.close();
  } finally {
    await server.stop();
  }
});

test('a crash against a server that rewinds 30 events repeats at most what arrived since the last write', { timeout: 120_000 }, async () => {
  const n = 1000;
  const server = await startServer([
    '--count', String(n), '--interval-ms', '5', '--drop-every', '200', '--rewind', '30', '--retry-ms', '50',
  ]);
  try {
    // What every page showed, in order, crashed or not.
    const shown = [];
    await browser.context.exposeBinding('reportCrashShown', (_, id) => shown.push(Number(id)));
    const track = async (page) => {
      await page.addInitScript(() => {
        document.addEventListener('demo:shown', (e) => globalThis.reportCrashShown(e.detail));
      });
      await page.goto(`${server.url}/`);
    };
    const first = await browser.context.newPage();
    await track(first);
    while (shown.length < 400) await first.waitForTimeout(20);
    const stored = await first.evaluate(() => globalThis.demo.source.stats().cursorsWritten);
    assert.ok(stored > 0);
    const crashed = new Promise((r) => first.once('crash', r));
    const cdp = await browser.context.newCDPSession(first);
    cdp.send('Page.crash').catch(() => {}); // never answers: the renderer is gone
    await crashed;
    const atCrash = shown.length;
    // The cursor the crash left in IndexedDB.
    const probe = await browser.context.newPage();
    await probe.goto(`${server.url}/plain.html`);
    const cursor = await probe.evaluate(async () => {
      const { openTracker } = await import('./tidemark/index.js');
      const tracker = await openTracker('demo /events');
      const id = tracker.lastEventId;
      await tracker.close();
      return Number(id);
    });
    await probe.close();
    assert.ok(cursor > 0 && cursor <= atCrash, `stored cursor ${cursor}`);
    const second = await browser.context.newPage();
    await track(second);
    await until(second, (max) => globalThis.demo?.shown.at(-1) === String(max), n, 60_000);
    await second.waitForTimeout(300);
    // Nothing lost; the repeats are the events after the last write before
    // the crash (up to 250 ms of them, and a write in progress), never the
    // 30 the server sends before that cursor again.
    const after = shown.slice(atCrash);
    const resumed = after[0];
    assert.deepEqual(after, Array.from({ length: n - resumed + 1 }, (_, i) => resumed + i), 'in order after the crash');
    assert.deepEqual(shown.slice(0, atCrash), Array.from({ length: atCrash }, (_, i) => i + 1), 'in order before it');
    assert.equal(resumed, cursor + 1, 'what came before the stored cursor is not shown again');
    const repeated = atCrash - resumed + 1;
    assert.ok(repeated >= 0 && repeated <= 150, `repeated ${repeated} events (stored cursor ${cursor}, crashed after ${atCrash})`);
    await second.close();
    await first.close().catch(() => {});
  } finally {
    await server.stop();
  }
});

test('a plain <script type="module"> page imports the package without a bundler', { timeout: 60_000 }, async () => {
  const server = await startServer(['--count', '20', '--interval-ms', '5']);
  try {
    const page = await browser.context.newPage();
    await page.goto(`${server.url}/plain.html`);
    await until(page, () => globalThis.demo?.shown.length === 20);
    const shown = await page.evaluate(() => globalThis.demo.shown);
    assert.deepEqual(shown, Array.from({ length: 20 }, (_, i) => String(i + 1)));
    await page.close();
  } finally {
    await server.stop();
  }
});

test('without IndexedDB the stream still flows, on memory, with a warning in stats', { timeout: 60_000 }, async () => {
  const server = await startServer(['--count', '10', '--interval-ms', '5']);
  try {
    const page = await browser.context.newPage();
    const warnings = [];
    page.on('console', (m) => m.type() === 'warning' && warnings.push(m.text()));
    await page.addInitScript(() => {
      Object.defineProperty(globalThis, 'indexedDB', { value: undefined, configurable: true });
    });
    await page.goto(`${server.url}/`);
    await until(page, () => globalThis.demo?.shown.length === 10);
    const stats = await page.evaluate(() => globalThis.demo.source.stats());
    assert.equal(stats.store, 'memory');
    assert.match(stats.storeWarning, /IndexedDB/);
    assert.ok(warnings.some((w) => w.includes('memory only')), `warned: ${warnings}`);
    await page.close();
  } finally {
    await server.stop();
  }
});

test('a store that fails mid-stream shows in stats, does not stop the stream, and recovers', { timeout: 90_000 }, async () => {
  // Chromium ignores CDP's quota override for IndexedDB writes, so the real
  // failure here is a newer version of the app in another tab upgrading the
  // database: the store closes its connection (never blocking the upgrade)
  // and cannot reopen a database at a version it does not know. Once that
  // tab deletes the database, the next retry reopens it and catches up.
  const server = await startServer(['--count', '40', '--interval-ms', '25']);
  try {
    const page = await browser.context.newPage();
    const warnings = [];
    page.on('console', (m) => m.type() === 'warning' && warnings.push(m.text()));
    await page.goto(`${server.url}/`);
    await until(page, () => globalThis.demo?.source.stats().batches > 0);
    await page.evaluate(
      () =>
        new Promise((resolve, reject) => {
          const request = indexedDB.open('tidemark', 4);
          request.onsuccess = () => resolve((globalThis.newerApp = request.result));
          request.onerror = () => reject(request.error);
        }),
    );
    await until(page, () => globalThis.demo.source.stats().failedBatches > 0, undefined, 10_000);
    const failed = await page.evaluate(() => globalThis.demo.source.stats());
    assert.match(failed.lastStoreError ?? '', /version/);
    assert.ok(failed.consecutiveFailures > 0);
    await until(page, () => globalThis.demo.shown.length === 40);
    const said = warnings.filter((w) => w.includes('cursors cannot be written'));
    assert.equal(said.length, 1, `warned once: ${warnings}`);

    await page.evaluate(
      () =>
        new Promise((resolve, reject) => {
          globalThis.newerApp.close();
          const request = indexedDB.deleteDatabase('tidemark');
          request.onsuccess = resolve;
          request.onerror = () => reject(request.error);
        }),
    );
    // The worker's retry (backing off, at most a few seconds here) reopens
    // the database and writes the newest cursor.
    await until(page, () => globalThis.demo.source.stats().consecutiveFailures === 0, undefined, 40_000);
    await page.evaluate(() => globalThis.demo.source.close());
    const other = await browser.context.newPage();
    await other.goto(`${server.url}/plain.html`);
    const stored = await other.evaluate(async () => {
      const { openTracker } = await import('./tidemark/index.js');
      return (await openTracker('demo /events')).lastEventId;
    });
    assert.equal(stored, '40');
    await other.close();
    await page.close();
  } finally {
    await server.stop();
  }
});
