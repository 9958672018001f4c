// An MCP tool call whose progress survives dropped streams and page reloads,
// with the SDK's own Client and tidemark's resumable transport (the package's
// `tidemark/mcp`) against /mcp (the fixture server mcp/server.mjs). There is
// no glue here: the transport keeps the session, each request in flight and
// its stream's cursor in IndexedDB under one key.
//
// - Load: `resumableTransport` + `client.connect`. The first load
//   initializes a session; a later one reconnects to the stored session
//   (no initialize) and the call a previous load left in flight is in
//   `transport.pending()`, resumed from its cursor (GET + Last-Event-ID).
// - Start: `client.callTool` with `onprogress`. A dropped stream: the SDK
//   resumes it by itself; a replayed event never reaches the Client.
//
// Tests read `globalThis.mcpDemo`, and across reloads sessionStorage:
// `shown` (progress numbers shown), `resumedFrom`, `cursorAtPagehide`,
// `dropped`, `mcp-call`.
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { resumableTransport } from 'tidemark/mcp';

const CALL = 'mcp-call'; // sessionStorage: the call this tab started, for the tests
const droppedBefore = Number(sessionStorage.getItem('dropped') ?? 0);
// The server's `retry:` (on each stream's priming event) wins over these
// while it is known.
const reconnectionOptions = {
  initialReconnectionDelay: 100,
  maxReconnectionDelay: 2000,
  reconnectionDelayGrowFactor: 1.5,
  maxRetries: 10,
};

const $ = (id) => document.getElementById(id);

const demo = {
  phase: 'loading',
  /** Progress numbers shown by this page load. */
  shown: [],
  /** The tool's result text, once it arrived (this load or an earlier one). */
  result: null,
  /** The cursor this page load resumed the call from, if it resumed one. */
  resumedFrom: null,
  errors: [],
  call: null,
  transport: null,
  client: null,
  /** Starts a call; failures show in `phase` and `errors`. */
  start: (count, intervalMs) => start(count, intervalMs).catch(fail),
};
globalThis.mcpDemo = demo;

function appendList(key, value) {
  const old = sessionStorage.getItem(key);
  sessionStorage.setItem(key, old ? `${old},${value}` : String(value));
}

function cursor() {
  return demo.transport?.inFlight()[0]?.lastEventId;
}

function render() {
  const dropped = droppedBefore + (demo.transport?.stats().replaysDropped ?? 0);
  sessionStorage.setItem('dropped', String(dropped));
  $('phase').textContent = demo.phase;
  $('session').textContent = demo.transport?.sessionId ?? '-';
  $('cursor').textContent = cursor() ?? 'none';
  $('count').textContent = String(demo.shown.length);
  $('dropped').textContent = String(dropped);
  $('result').textContent = demo.result ?? '-';
}

function show({ progress, total, message }) {
  demo.shown.push(progress);
  appendList('shown', progress);
  const item = document.createElement('li');
  item.textContent = `${progress}/${total}  ${message ?? ''}`;
  const list = $('progress');
  list.prepend(item);
  while (list.childElementCount > 200) list.lastElementChild.remove();
  document.dispatchEvent(new CustomEvent('mcp:shown', { detail: progress }));
  render();
}

function fail(error) {
  demo.phase = 'error';
  demo.errors.push(String(error?.message ?? error));
  render();
}

function finish(result) {
  const text = result.content?.find((c) => c.type === 'text')?.text ?? JSON.stringify(result);
  demo.result = text;
  demo.phase = 'done';
  sessionStorage.setItem('result', text);
  render();
}

/** Starts a new call of the `progress` tool. */
async function start(count = 60, intervalMs = 50) {
  demo.phase = 'streaming';
  demo.call = { sessionId: demo.transport.sessionId, count, intervalMs };
  sessionStorage.setItem(CALL, JSON.stringify(demo.call));
  render();
  const call = demo.client.callTool({ name: 'progress', arguments: { count, intervalMs } }, undefined, {
    onprogress: show,
    timeout: 300_000,
  });
  finish(await call);
}

async function load() {
  const transport = await resumableTransport('/mcp', { key: 'mcp-demo', reconnectionOptions });
  const client = new Client({ name: 'tidemark-mcp-page', version: '0.1.0' });
  client.onerror = (error) => demo.errors.push(String(error?.message ?? error));
  demo.transport = transport;
  demo.client = client;
  await client.connect(transport);
  demo.call = JSON.parse(sessionStorage.getItem(CALL) ?? 'null');
  demo.result = sessionStorage.getItem('result');
  demo.phase = demo.result === null ? 'idle' : 'done';
  // The call an earlier load of this page left in flight.
  for (const call of transport.pending()) {
    demo.phase = 'streaming';
    demo.resumedFrom = call.resumedFrom;
    appendList('resumedFrom', call.resumedFrom ?? '');
    call.onprogress = show;
    call.result.then(finish, fail);
  }
  render();
}

// What the cursor was when this page went away: the next load must resume
// from exactly this one (tidemark writes it on pagehide).
addEventListener('pagehide', () => {
  if (demo.phase === 'streaming') appendList('cursorAtPagehide', cursor() ?? '');
  render();
});

$('start').addEventListener('click', () => {
  sessionStorage.clear();
  start(Number($('n').value), Number($('interval').value)).catch(fail);
});

load()
  .catch(fail)
  .finally(() => {
    demo.ready = true;
  });
