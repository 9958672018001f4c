// A real MCP tool call in real Chromium: the page www/mcp (built into
// www/dist/mcp by `npx vite build --config www/mcp/vite.config.js`) runs the
// MCP TypeScript SDK's Client against the fixture server mcp/server.mjs (the
// SDK's McpServer and StreamableHTTPServerTransport, on 127.0.0.1 port 0,
// serving the page on the same origin). Mid-call the test cuts the server's
// streams and reloads the page; every progress notification must show
// exactly once across the page loads, and the tool's result must arrive.
// MCP_TEST_DEBUG=1 prints each run's page state and server log.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { cp, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startMcpServer } from '../../mcp/server.mjs';
import { dist, exactlyOnce, launchBrowser, until } from './harness.mjs';

const built = join(dist, 'mcp');
/**
 * A copy of the built page: a build of www/vite.config.js empties www/dist,
 * and must not pull the page away from a running test.
 */
let staticDir;

let browser;
before(async () => {
  if (!existsSync(join(built, 'index.html'))) {
    throw new Error(`${built}/index.html is missing: run npx vite build --config www/mcp/vite.config.js`);
  }
  staticDir = await mkdtemp(join(tmpdir(), 'tidemark-mcp-page-'));
  await cp(built, staticDir, { recursive: true });
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  if (staticDir) await rm(staticDir, { recursive: true, force: true });
});

/** Counts, in Node, the progress notifications the page shows across reloads. */
async function watch(page) {
  const progress = { count: 0 };
  await page.exposeBinding('reportShown', () => progress.count++);
  await page.addInitScript(() => {
    document.addEventListener('mcp:shown', () => globalThis.reportShown());
  });
  return progress;
}

async function waitFor(predicate, what, ms = 20_000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}


/**
 * One call of `progress` (count, intervalMs) with `disruptions`: 'cut'
 * (the server closes every stream) or 'reload' (the page reloads), each
 * once the page has shown `step` more progress notifications.
 */
async function resumableCall({ replay, count = 60, intervalMs = 50, step = 8, disruptions }) {
  const server = await startMcpServer({ port: 0, staticDir, replay, retryInterval: 100 });
  const page = await browser.context.newPage();
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  try {
    const progress = await watch(page);
    await page.goto(`${server.url}/`);
    await until(page, () => globalThis.mcpDemo?.ready === true, undefined, 10_000);
    await page.evaluate(([n, ms]) => void globalThis.mcpDemo.start(n, ms), [count, intervalMs]);

    const done = [];
    let last = 0;
    for (const [i, what] of disruptions.entries()) {
      // Also a few fresh notifications since the last disruption: the SDK
      // forgets the token of a resumed stream that is cut before it
      // delivered an event (see mcp/README.md), so no test of that here.
      const target = Math.max(step * (i + 1), last + 3);
      await waitFor(() => progress.count >= target, `${target} progress notifications shown (before ${what} ${i + 1})`);
      if (what === 'cut') {
        const streams = server.cut();
        assert.ok(streams >= 1, 'the cut found the running call');
      } else {
        await page.reload();
        await until(page, () => globalThis.mcpDemo?.ready === true, undefined, 10_000);
      }
      last = progress.count;
      done.push([what, last]);
    }
    assert.ok(progress.count < count, `the disruptions happened mid-call: ${JSON.stringify(done)}`);

    await until(page, () => globalThis.mcpDemo?.result != null || globalThis.mcpDemo?.phase === 'error', undefined, 30_000);
    await page.waitForTimeout(300); // anything repeated late would show up now
    const state = await page.evaluate(() => ({
      result: globalThis.mcpDemo.result,
      phase: globalThis.mcpDemo.phase,
      errors: globalThis.mcpDemo.errors,
      shown: (sessionStorage.getItem('shown') ?? '').split(',').filter(Boolean).map(Number),
      resumedFrom: (sessionStorage.getItem('resumedFrom') ?? '').split(',').filter(Boolean),
      cursorAtPagehide: (sessionStorage.getItem('cursorAtPagehide') ?? '').split(',').filter(Boolean),
      dropped: Number(sessionStorage.getItem('dropped') ?? 0),
      call: JSON.parse(sessionStorage.getItem('mcp-call')),
    }));
    const context = JSON.stringify({ disruptions: done, state, log: server.log, pageErrors });
    assert.equal(state.phase, 'done', context);
    assert.equal(state.result, `done: ${count} steps`, context);
    // Each load resumed from the cursor the previous load had when it went
    // away: tidemark persisted it on pagehide.
    assert.deepEqual(state.resumedFrom, state.cursorAtPagehide, `the cursor written on pagehide: ${context}`);
    exactlyOnce(state.shown, count);
    assert.deepEqual(pageErrors, []);
    // No progress or response the SDK could not route (ids, tokens).
    assert.deepEqual(state.errors.filter((e) => /unknown/i.test(e)), [], context);

    // Every reload resumed from the token stored in IndexedDB, and the
    // server got exactly that token as Last-Event-ID.
    const reloads = disruptions.filter((d) => d === 'reload').length;
    const cuts = disruptions.length - reloads;
    assert.equal(state.resumedFrom.length, reloads, context);
    const sent = server.log.resumes.map((r) => r.lastEventId);
    for (const token of state.resumedFrom) {
      assert.match(token, /^\d+\.\d+$/, 'a token of the fixture store');
      assert.ok(sent.includes(token), `the server saw Last-Event-ID ${token}: ${sent}`);
    }
    assert.ok(server.log.resumes.every((r) => r.session === state.call.sessionId), 'one session throughout');
    // Each cut and each reload resumed the call's stream at least once.
    assert.ok(sent.length >= cuts + reloads, `resumes ${sent.length} >= ${cuts + reloads}`);
    assert.deepEqual(server.log.errors, []);
    if (process.env.MCP_TEST_DEBUG) console.error(context);
    return { state, server };
  } finally {
    await page.close();
    await server.close();
  }
}

const DISRUPTIONS = ['cut', 'reload', 'cut', 'reload', 'cut'];

test('an MCP tool call survives cut streams and reloads: each progress shown once', { timeout: 120_000 }, async () => {
  const { state } = await resumableCall({ replay: 'after', disruptions: DISRUPTIONS });
  assert.equal(state.dropped, 0, 'a server that replays strictly after the token sends no replays');
});

test('a server that re-sends the Last-Event-ID event: tidemark drops it', { timeout: 120_000 }, async () => {
  const { state } = await resumableCall({ replay: 'inclusive', disruptions: DISRUPTIONS });
  // One re-sent event per resume (cuts, reloads) that carried a progress.
  assert.ok(state.dropped >= DISRUPTIONS.length, `dropped ${state.dropped}`);
});
