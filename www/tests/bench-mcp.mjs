// What `tidemark/mcp` costs an MCP client in Chromium, against the SDK's own
// StreamableHTTPClientTransport in the same page and run, both talking to
// the fixture server (mcp/server.mjs) on loopback: the time of one short
// `tools/call` (one progress notification, then the result; the
// resumable transport writes the request's record and opens its tracker
// before the POST, and removes both after the answer), and the rate of
// progress notifications through one long call. Rounds alternate between
// the two; medians are printed as JSON.
//
// Usage: node www/tests/bench-mcp.mjs [ROUNDS]   (after the MCP pages are built)
import { startMcpServer } from '../../mcp/server.mjs';
import { launchBrowser, until } from './harness.mjs';
import { copyBuiltPage } from './mcp-page.mjs';
import { rm } from 'node:fs/promises';

const rounds = Number(process.argv[2] ?? 7);
const staticDir = await copyBuiltPage();
const server = await startMcpServer({ port: 0, staticDir });
const browser = await launchBrowser();
try {
  const page = await browser.context.newPage();
  await page.goto(`${server.url}/test.html`);
  await until(page, () => globalThis.mcpTestReady === true);
  const results = await page.evaluate(async (rounds) => {
    const { resumableTransport } = globalThis.mcpTest;
    const { Client, StreamableHTTPClientTransport } = globalThis.mcpTest.sdk;
    const url = new URL('/mcp', location.href);
    const connect = async (resumable) => {
      const transport = resumable
        ? await globalThis.mcpTest.rawTransport(`bench-${crypto.randomUUID()}`)
        : new StreamableHTTPClientTransport(url);
      const client = new Client({ name: 'bench', version: '1' });
      await client.connect(transport);
      return client;
    };
    const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    const out = { sdk: { callMs: [], progressPerSec: [] }, tidemark: { callMs: [], progressPerSec: [] } };
    const clients = { sdk: await connect(false), tidemark: await connect(true) };
    for (let round = 0; round < rounds; round++) {
      for (const name of round % 2 ? ['tidemark', 'sdk'] : ['sdk', 'tidemark']) {
        const client = clients[name];
        const calls = 50;
        let start = performance.now();
        for (let i = 0; i < calls; i++) {
          await client.callTool({ name: 'progress', arguments: { count: 1, intervalMs: 0 } }, undefined, { onprogress: () => {} });
        }
        out[name].callMs.push((performance.now() - start) / calls);
        const count = 5_000;
        let seen = 0;
        start = performance.now();
        await client.callTool({ name: 'progress', arguments: { count, intervalMs: 0 } }, undefined, {
          onprogress: () => seen++,
          timeout: 120_000,
        });
        if (seen !== count) throw new Error(`${name}: ${seen} of ${count} progress notifications`);
        out[name].progressPerSec.push(count / ((performance.now() - start) / 1000));
      }
    }
    const summary = {};
    for (const name of ['sdk', 'tidemark']) {
      summary[name] = { callMs: median(out[name].callMs), progressPerSec: median(out[name].progressPerSec) };
    }
    summary.callRatio = summary.tidemark.callMs / summary.sdk.callMs;
    summary.progressRatio = summary.tidemark.progressPerSec / summary.sdk.progressPerSec;
    summary.runs = out;
    return summary;
  }, rounds);
  console.log(JSON.stringify(results, null, 2));
} finally {
  await browser.close();
  await server.close();
  await rm(staticDir, { recursive: true, force: true });
}
