// The package README's `tidemark/mcp` recipe, as a new developer uses it: the
// test copies its code block into a new Vite app, installs the packed
// package (host-wasm/pkg, built by host-wasm/build.sh), the MCP SDK and Vite
// there (from npm's cache where it can), builds it, serves it beside the fixture server's
// /mcp (mcp/server.mjs), and reloads the page mid-call in real Chromium:
// every progress is logged once across the loads, the result arrives, and
// the tool was called once.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile, readdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startMcpServer } from '../../mcp/server.mjs';
import { exactlyOnce, launchBrowser, root } from './harness.mjs';

let app;
let browser;

/** The first ```js block of the package README's `tidemark/mcp` section. */
async function recipe() {
  const readme = await readFile(join(root, 'host-wasm/js/README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('## MCP tool calls that survive a reload'));
  const block = /```js\n([\s\S]*?)```/.exec(section);
  assert.ok(block, 'the README has the recipe');
  return block[1];
}

before(async () => {
  app = await mkdtemp(join(tmpdir(), 'tidemark-recipe-'));
  const npm = (...args) => execFileSync('npm', args, { cwd: app, stdio: ['ignore', 'ignore', 'inherit'] });
  npm('pack', join(root, 'host-wasm/pkg'), '--pack-destination', app, '--silent');
  const tarball = (await readdir(app)).find((f) => f.startsWith('tidemark-') && f.endsWith('.tgz'));
  const versions = JSON.parse(await readFile(join(root, 'package.json'), 'utf8')).devDependencies;
  await writeFile(join(app, 'package.json'), JSON.stringify({ name: 'recipe', private: true, type: 'module' }));
  npm(
    'install', '--prefer-offline', '--no-audit', '--no-fund',
    `./${tarball}`, `@modelcontextprotocol/sdk@${versions['@modelcontextprotocol/sdk']}`, `vite@${versions.vite}`,
  );
  await writeFile(join(app, 'index.html'), '<!doctype html><title>recipe</title><script type="module" src="./main.js"></script>\n');
  await writeFile(join(app, 'main.js'), await recipe());
  execFileSync(join(app, 'node_modules/.bin/vite'), ['build'], { cwd: app, stdio: ['ignore', 'ignore', 'inherit'] });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  if (app) await rm(app, { recursive: true, force: true });
});

test('the README recipe in a new Vite app: a tool call survives a reload, each progress and the result once', { timeout: 60_000 }, async () => {
  const server = await startMcpServer({ port: 0, staticDir: join(app, 'dist'), retryInterval: 100 });
  const page = await browser.context.newPage();
  const logged = [];
  page.on('console', (m) => logged.push(m.text()));
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  const progress = () => logged.filter((l) => l.startsWith('progress ')).map((l) => Number(/^progress (\d+)\/60$/.exec(l)?.[1]));
  const waitFor = async (what, predicate) => {
    const deadline = Date.now() + 20_000;
    while (!predicate()) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify({ logged, errors })}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  };
  try {
    await page.goto(`${server.url}/`);
    await waitFor('10 progress lines', () => progress().length >= 10);
    await page.reload();
    await waitFor('the result', () => logged.some((l) => l.startsWith('result ')));
    await page.waitForTimeout(200);
    const context = JSON.stringify({ logged, errors, log: server.log });
    assert.ok(logged.includes('result done: 60 steps'), context);
    exactlyOnce(progress(), 60);
    assert.equal(server.log.calls, 1, `one tools/call: ${context}`);
    assert.ok(server.log.resumes.length >= 1, 'the reload resumed the call');
    assert.deepEqual(errors, []);
  } finally {
    await page.close();
    await server.close();
  }
});
