// The MCP page's scenario, shared by www/tests/mcp.test.mjs (the page
// against the fixture server) and www/tests/mcp-proxy.test.mjs (the page
// through `tidemark proxy` in front of a server without an event store):
// the page www/mcp (built into www/dist/mcp) starts a `progress` call, the
// test cuts its streams and reloads the page mid-call, and then checks that
// every progress notification showed exactly once across the page loads,
// the result arrived, each load resumed from the cursor the previous one
// had at pagehide, and the tool was called once.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { cp, mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { dist, exactlyOnce, until } from './harness.mjs';

/**
 * A copy of the built page, to serve: a build of www/vite.config.js empties
 * www/dist, and must not pull the page away from a running test.
 */
export async function copyBuiltPage() {
  const built = join(dist, 'mcp');
  if (!existsSync(join(built, 'index.html'))) {
    throw new Error(`${built}/index.html is missing: run npx vite build --config www/mcp/vite.config.js`);
  }
  const staticDir = await mkdtemp(join(tmpdir(), 'tidemark-mcp-page-'));
  await cp(built, staticDir, { recursive: true });
  return staticDir;
}

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
 * One call of `progress` (count, intervalMs) by the page loaded from
 * `origin`, with `disruptions`: 'cut' (`cut()`, which says how many
 * streams it cut) or 'reload' (the page reloads), each once the page has
 * shown `step` more progress notifications. `server` is the fixture
 * (mcp/server.mjs) behind it. `checkResumes(state, { cuts, reloads })`
 * checks how the resumes reached the server (direct, or through a proxy).
 * Resolves with the page's final state.
 */
export async function pageCall(browser, { origin, cut, server, count = 60, intervalMs = 50, step = 8, disruptions, checkResumes }) {
  const page = await browser.context.newPage();
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  try {
    const progress = await watch(page);
    await page.goto(`${origin}/`);
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
        const streams = await cut();
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
    // The tool ran once: every reload and cut resumed, none posted again.
    assert.equal(server.log.calls, 1, context);

    const reloads = disruptions.filter((d) => d === 'reload').length;
    const cuts = disruptions.length - reloads;
    assert.equal(state.resumedFrom.length, reloads, context);
    checkResumes(state, { cuts, reloads, context });
    assert.deepEqual(server.log.errors, []);
    if (process.env.MCP_TEST_DEBUG) console.error(context);
    return state;
  } finally {
    await page.close();
  }
}
