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
import { rm } from 'node:fs/promises';
import { startMcpServer } from '../../mcp/server.mjs';
import { launchBrowser } from './harness.mjs';
import { copyBuiltPage, pageCall } from './mcp-page.mjs';

let staticDir;
let browser;
before(async () => {
  staticDir = await copyBuiltPage();
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  if (staticDir) await rm(staticDir, { recursive: true, force: true });
});

/**
 * The page's call against the server itself, which resumes from its event
 * store: every reload resumed from the token stored in IndexedDB, and the
 * server got exactly that token as Last-Event-ID.
 */
async function resumableCall({ replay, disruptions }) {
  const server = await startMcpServer({ port: 0, staticDir, replay, retryInterval: 100 });
  try {
    return await pageCall(browser, {
      origin: server.url,
      server,
      cut: () => server.cut(),
      disruptions,
      checkResumes(state, { cuts, reloads, context }) {
        const sent = server.log.resumes.map((r) => r.lastEventId);
        for (const token of state.resumedFrom) {
          assert.match(token, /^\d+\.\d+$/, 'a token of the fixture store');
          assert.ok(sent.includes(token), `the server saw Last-Event-ID ${token}: ${sent}`);
        }
        assert.ok(server.log.resumes.every((r) => r.session === state.call.sessionId), 'one session throughout');
        // Each cut and each reload resumed the call's stream at least once.
        assert.ok(sent.length >= cuts + reloads, `resumes ${sent.length} >= ${cuts + reloads}: ${context}`);
      },
    });
  } finally {
    await server.close();
  }
}

const DISRUPTIONS = ['cut', 'reload', 'cut', 'reload', 'cut'];

test('an MCP tool call survives cut streams and reloads: each progress shown once', { timeout: 120_000 }, async () => {
  const state = await resumableCall({ replay: 'after', disruptions: DISRUPTIONS });
  assert.equal(state.dropped, 0, 'a server that replays strictly after the token sends no replays');
});

test('a server that re-sends the Last-Event-ID event: tidemark drops it', { timeout: 120_000 }, async () => {
  const state = await resumableCall({ replay: 'inclusive', disruptions: DISRUPTIONS });
  // One re-sent event per resume (cuts, reloads) that carried a progress.
  assert.ok(state.dropped >= DISRUPTIONS.length, `dropped ${state.dropped}`);
});
