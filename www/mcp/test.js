// The page www/tests/mcp-transport.test.mjs drives: `tidemark/mcp` and the
// SDK's Client, as an app imports them, behind a few functions the test
// calls with page.evaluate. What the calls deliver is kept in
// sessionStorage, across reloads, by the tag each call carries in its
// arguments: `progress:<tag>` (the progress numbers, in order),
// `result:<tag>`, `error:<tag>`.
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { ElicitRequestSchema } from '@modelcontextprotocol/sdk/types.js';
import { resumableTransport } from 'tidemark/mcp';

const reconnectionOptions = {
  initialReconnectionDelay: 100,
  maxReconnectionDelay: 1000,
  reconnectionDelayGrowFactor: 1.5,
  maxRetries: 10,
};

function append(key, value) {
  const old = sessionStorage.getItem(key);
  sessionStorage.setItem(key, old ? `${old},${value}` : String(value));
}

const page = {
  /** The transport and Client of this load, once `open` resolved. */
  transport: null,
  client: null,
  /** Errors the Client reported. */
  errors: [],
  /** The `pending()` of this load, as `{ id, method, tag, resumedFrom }`. */
  pending: [],

  /** The server's questions (elicitation/create) this load received. */
  asked: 0,

  /**
   * Opens the transport with `key` (and `options`), connects a Client, and
   * takes over the pending calls. The Client answers the server's questions
   * (`elicitation/create`) at once, or with `answer: 'never'` not at all.
   */
  async open(key = 'test', options = {}, answer = 'now') {
    const transport = await resumableTransport('/mcp', { key, reconnectionOptions, ...options });
    const client = new Client({ name: 'tidemark-mcp-test', version: '0.1.0' }, { capabilities: { elicitation: {} } });
    client.setRequestHandler(ElicitRequestSchema, () => {
      page.asked++;
      return answer === 'never' ? new Promise(() => {}) : { action: 'accept', content: {} };
    });
    client.onerror = (error) => page.errors.push(String(error?.message ?? error));
    await client.connect(transport);
    page.transport = transport;
    page.client = client;
    page.pending = transport.pending().map((call) => {
      const tag = call.params?.arguments?.tag ?? String(call.id);
      call.onprogress = (p) => append(`progress:${tag}`, p.progress);
      call.result.then(
        (result) => sessionStorage.setItem(`result:${tag}`, result.content?.[0]?.text ?? JSON.stringify(result)),
        (error) => sessionStorage.setItem(`error:${tag}`, String(error?.message ?? error)),
      );
      return { id: call.id, method: call.method, tag, resumedFrom: call.resumedFrom };
    });
    return { sessionId: transport.sessionId, pending: page.pending };
  },

  /** A transport with `key`, for a test that drives it without a Client. */
  rawTransport: (key) => resumableTransport('/mcp', { key }),

  /** The SDK's own transport and Client, the baseline of www/tests/bench-mcp.mjs. */
  sdk: { Client, StreamableHTTPClientTransport },

  /** Calls the `progress` tool with `tag` (not awaited: what it delivers lands in sessionStorage). */
  call(tag, count, intervalMs, ask = false) {
    page.client
      .callTool({ name: 'progress', arguments: { count, intervalMs, tag, ...(ask ? { ask } : {}) } }, undefined, {
        onprogress: (p) => append(`progress:${tag}`, p.progress),
        timeout: 120_000,
      })
      .then(
        (result) => sessionStorage.setItem(`result:${tag}`, result.content?.[0]?.text ?? JSON.stringify(result)),
        (error) => sessionStorage.setItem(`error:${tag}`, String(error?.message ?? error)),
      );
  },

  /** What the calls of `tags` delivered so far, across loads. */
  state(tags) {
    const out = {};
    for (const tag of tags) {
      out[tag] = {
        progress: (sessionStorage.getItem(`progress:${tag}`) ?? '').split(',').filter(Boolean).map(Number),
        result: sessionStorage.getItem(`result:${tag}`),
        error: sessionStorage.getItem(`error:${tag}`),
      };
    }
    return out;
  },

  /** What IndexedDB holds under `key`, read without the transport. */
  stored(key = 'test', database = 'tidemark-mcp') {
    return new Promise((resolve, reject) => {
      const open = indexedDB.open(database);
      open.onerror = () => reject(open.error);
      open.onsuccess = () => {
        const db = open.result;
        if (!db.objectStoreNames.contains('sessions')) {
          db.close();
          return resolve(null);
        }
        const get = db.transaction('sessions').objectStore('sessions').get(key);
        get.onsuccess = () => {
          resolve(get.result ?? null);
          db.close();
        };
        get.onerror = () => {
          reject(get.error);
          db.close();
        };
      };
    });
  },
};

globalThis.mcpTest = page;
globalThis.mcpTestReady = true;
