// The `tidemark` npm package: resumable Server-Sent-Events streams for
// browsers and workers. The logic is tidemark-core compiled to WebAssembly;
// this file gives it an EventSource-shaped face. Types (index.d.ts) are
// generated from the JSDoc here by the package build.

import init, {
  EventSourceDriver,
  flushAll,
  forgetStream as forgetWasmStream,
  openTracker as openWasmTracker,
} from './tidemark_wasm.js';

/** @type {Promise<void> | undefined} */
let loading;

/**
 * Loads the WebAssembly module. Everything else calls this by itself; call it
 * yourself to start loading early, or to load the `.wasm` from another place.
 *
 * @param {string | URL | Request | Response | BufferSource | WebAssembly.Module} [wasm]
 *   Where the module is; by default `tidemark_wasm_bg.wasm` next to this file.
 * @returns {Promise<void>}
 */
export function initialize(wasm) {
  loading ??= init(wasm === undefined ? undefined : { module_or_path: wasm }).then(
    () => {},
    (error) => {
      loading = undefined; // a later call may try again
      throw error;
    },
  );
  return loading;
}

/**
 * Where cursors are kept.
 *
 * @typedef {object} StoreOptions
 * @property {'indexeddb' | 'memory'} [store] `'indexeddb'` (the default) keeps
 *   cursors across reloads; `'memory'` drops replays without persisting. When
 *   IndexedDB cannot be opened (private mode, a blocked upgrade) tidemark
 *   warns once, keeps cursors in memory, and says so in `stats().storeWarning`.
 * @property {string} [database] The IndexedDB database name (default `'tidemark'`).
 */

/**
 * When to reconnect. Delays in milliseconds.
 *
 * @typedef {object} ReconnectOptions
 * @property {number} [initialDelay] First delay after a failure (default 250).
 *   Once the server sends `retry:`, its value takes this place, even when
 *   shorter (but never below 50 ms); failures in a row double it.
 * @property {number} [maxDelay] Largest delay (default 30000).
 * @property {number | null} [maxAttempts] Attempts in a row without a single
 *   byte before giving up (default 10); `null` never gives up.
 * @property {number} [idleTimeout] A connection silent this long is dead
 *   (default 45000; servers' keep-alive comments count as traffic).
 */

/**
 * A POST stream: the first connection POSTs `body`; behind `tidemark proxy`
 * the answer's `Content-Location` is stored under `streamKey` before its
 * first event is delivered, and every reconnect, and every later page with
 * the same `streamKey`, resumes with a GET there instead of posting again.
 * See "POST streams that survive a reload" in the README.
 *
 * @typedef {object} PostOptions
 * @property {'GET' | 'POST'} [method] `'GET'` (the default) or `'POST'`.
 *   `'POST'` needs a `streamKey` of its own for each request (a message id).
 * @property {string | ArrayBuffer | ArrayBufferView} [body] What to POST
 *   (strings as UTF-8; no `content-type` is added: set it in `headers`).
 */

/**
 * A function called instead of the global `fetch`, as `fetch(url, init)`:
 * `url` a string, `init` a plain object (`method`, `headers` as a plain
 * object, `body` for a POST, `cache`, `credentials`, `mode`, `redirect`,
 * `signal`). It must resolve to a `Response` with a streaming body.
 *
 * @typedef {(url: string, init: RequestInit & { headers: Record<string, string> }) => Promise<Response>} FetchFunction
 */

/**
 * @typedef {StoreOptions & PostOptions & {
 *   headers?: Record<string, string> | [string, string][] | Headers,
 *   streamKey?: string,
 *   withCredentials?: boolean,
 *   credentials?: RequestCredentials,
 *   reconnect?: ReconnectOptions,
 *   shared?: boolean,
 *   fetch?: FetchFunction,
 *   lastEventIdParam?: string | boolean,
 * }} ResumableEventSourceOptions
 *   `fetch` is called for every request instead of the global `fetch` (auth
 *   refresh, instrumentation, tests; see {@link FetchFunction}).
 *   `lastEventIdParam` sends a resume's cursor as this query parameter
 *   instead of the `Last-Event-ID` header, which needs a CORS preflight
 *   cross-origin; `true` means `'lastEventID'`, the name Mercure hubs read.
 *   `headers` go with every request (authorization, `Mcp-Session-Id`).
 *   `streamKey` names the stream's cursor (default: the URL).
 *   `credentials` is fetch's mode (default `'same-origin'`);
 *   `withCredentials: true` means `'include'`, as for `EventSource`.
 *   `shared: true` gives every tab and worker of the origin that opens the
 *   same `streamKey` (in the same `database`) one connection: one context
 *   leads (it holds a Web Lock named after the key) and posts each event to
 *   the others over a `BroadcastChannel`; when it closes, reloads or
 *   crashes, another takes over from the last event it delivered. Each
 *   context delivers each event once, in order. A context that joins later
 *   gets what the leader still holds after its own cursor (the leader keeps
 *   its last 1024 events): a reloaded tab goes on from where it was. Give
 *   every source of one key the same `shared`, `headers` and URL; not with
 *   `method: 'POST'` (a POST stream belongs to the context that sent it). Default
 *   `false` (see the package README for why).
 */

/**
 * Counters of a stream, its store and the page's persistence worker.
 *
 * @typedef {object} Stats
 * @property {string | null} lastEventId The id a reconnect sends as `Last-Event-ID`.
 * @property {'indexeddb' | 'memory'} store Where cursors go.
 * @property {string} database The IndexedDB database name.
 * @property {string | null} storeWarning Why cursors are in memory although
 *   IndexedDB was asked for.
 * @property {number} storeTransactions Write transactions made (of the current
 *   IndexedDB connection; batches for the memory store).
 * @property {number | null} windowBytesWritten Bytes of dedup windows written
 *   (of the current IndexedDB connection; `null` for the memory store).
 * @property {number} openStreams Streams open in this page on this store.
 * @property {number} eventsObserved Events seen on every stream of the store.
 * @property {number} duplicatesDropped Replays dropped on every stream of the store.
 * @property {number} rejectedCommits Commits after the worker stopped.
 * @property {number} cursorsWritten Cursors written to the store.
 * @property {number} batches Successful writes (each one transaction).
 * @property {number} failedBatches Failed writes.
 * @property {number} retriesPending Streams whose cursor waits for a retry.
 * @property {number} consecutiveFailures Failed writes since the last success.
 * @property {string | null} lastStoreError The last store error (kept after recovery).
 */

/**
 * What `stats()` says of a POST stream.
 *
 * @typedef {object} PostStats
 * @property {'GET' | 'POST'} method The stream's method.
 * @property {boolean | null} resumable Whether the stream can be resumed:
 *   `true` for a GET stream and a POST answered with a `Content-Location`,
 *   `false` for a POST answered without one, `null` until the POST is answered.
 * @property {string | null} resumeUrl Where a POST stream resumes from.
 */

/**
 * @typedef {Stats & PostStats & {
 *   connects: number, reconnects: number, delivered: number,
 *   duplicates: number, comments: number, bytes: number,
 *   lastFailure: string | null,
 *   shared: boolean, leader: boolean, followers: number | null,
 *   sharingWarning: string | null,
 * }} EventSourceStats
 *   Stream counters: connections opened, reconnects scheduled, fresh events
 *   delivered, replays dropped, comments (keep-alives), body bytes, and the
 *   last connection failure. They are the stream's own, as of the latest
 *   `open`, `error` or message event (replays dropped after the last fresh
 *   event show with the next one, or after `close()`); a context that leads
 *   a shared stream counts from the moment it took the lead.
 *   Sharing: `shared` (sharing is in effect), `leader` (this context holds
 *   the connection), `followers` (the other contexts the leader knows of;
 *   `null` when not leading) and `sharingWarning` (why a source asked to be
 *   shared is not: no Web Locks or BroadcastChannel here).
 */

/**
 * The `error` event of a {@link ResumableEventSource}. When a connection
 * failed or could not be made (`readyState` is `CONNECTING`,
 * `willReconnect` is `true`) it says why, when the next attempt is and
 * which attempt in a row it will be; when the stream stopped for good
 * (`readyState` is `CLOSED`, `willReconnect` is `false`) it says why, if
 * there is a reason (none after `close()`).
 *
 * @typedef {Event & {
 *   readonly message?: string,
 *   readonly code?: number,
 *   readonly willReconnect?: boolean,
 *   readonly retryDelay?: number,
 *   readonly attempt?: number,
 * }} ResumableErrorEvent
 *   `message`: why the connection failed or the stream stopped.
 *   `code`: the HTTP status of the failed response, when there was one.
 *   `willReconnect`: whether the source tries again (else it is `CLOSED`).
 *   `retryDelay`: milliseconds until the next attempt.
 *   `attempt`: which attempt in a row the next one is: 1 after a connection
 *   that received data, counting up while attempts receive nothing.
 */

/**
 * The events of a {@link ResumableEventSource} by type, for
 * `addEventListener`; any other type (an `event:` field) is a
 * `MessageEvent<string>` too.
 *
 * @typedef {object} ResumableEventSourceEventMap
 * @property {MessageEvent<string>} message
 * @property {Event} open
 * @property {ResumableErrorEvent} error
 * @property {Event} close
 */

/** @typedef {(this: ResumableEventSource, event: MessageEvent<string>) => any} MessageHandler */
/** @typedef {(this: ResumableEventSource, event: Event) => any} EventHandler */
/** @typedef {(this: ResumableEventSource, event: ResumableErrorEvent) => any} ErrorHandler */

/**
 * An `EventSource` that resumes: after a dropped connection, a reload or a
 * crash it reconnects with the right `Last-Event-ID` from the cursor kept in
 * IndexedDB, and never delivers a replayed event twice. It reads SSE over
 * `fetch`, so it sends any headers, works in Web Workers, and keeps its
 * stream while the tab is hidden.
 *
 * Events are `MessageEvent`s with `data`, `lastEventId` and `type` (the
 * `event:` field, `'message'` by default). An event counts as delivered once
 * its listeners return; then its id becomes the cursor. `open` fires when a
 * connection is up (`readyState` is `OPEN`). `error` fires when a connection
 * fails or cannot be made (`readyState` goes back to `CONNECTING`; the event
 * has `message`, `retryDelay` and `attempt`, see {@link ResumableErrorEvent})
 * and when the stream stops for good, as after a 404 (`readyState` is
 * `CLOSED`; the reason is in `event.message`, if any).
 *
 * With `method: 'POST'` (see {@link PostOptions}) `close` fires when the
 * server ends the stream (`readyState` is `CLOSED`, no `error` follows).
 */
export class ResumableEventSource extends EventTarget {
  static CONNECTING = /** @type {const} */ (0);
  static OPEN = /** @type {const} */ (1);
  static CLOSED = /** @type {const} */ (2);
  CONNECTING = /** @type {const} */ (0);
  OPEN = /** @type {const} */ (1);
  CLOSED = /** @type {const} */ (2);

  /** @type {EventSourceDriver | undefined} */
  #driver;
  /** @type {0 | 1 | 2} */
  #readyState = 0;
  /** @type {Promise<void>} */
  #closed;
  /** @type {Map<string, EventListener>} */
  #handlers = new Map();

  /**
   * @param {string | URL} url The stream's URL, relative to the page.
   * @param {ResumableEventSourceOptions} [options]
   */
  constructor(url, options = {}) {
    super();
    /** The absolute URL of the stream. */
    this.url = new URL(url, globalThis.location?.href).href;
    /** Whether requests carry cookies cross-origin (`credentials` wins over `withCredentials`). */
    this.withCredentials =
      options.credentials === undefined ? options.withCredentials === true : options.credentials === 'include';
    // Until a response says otherwise (its URL after redirects).
    let origin = new URL(this.url).origin;
    /** @type {(value: void) => void} */
    let closed = () => {};
    this.#closed = new Promise((resolve) => (closed = resolve));
    initialize().then(
      () => {
        if (this.#readyState === 2) return closed();
        try {
          this.#driver = EventSourceDriver.start(
            this.url,
            options,
            (/** @type {string} */ type, /** @type {string} */ data, /** @type {string} */ lastEventId) => {
              if (this.#readyState === 2) return;
              this.dispatchEvent(new MessageEvent(type, { data, lastEventId, origin }));
            },
            // The stream's lifecycle: 'open' and 'error' (reconnecting,
            // `detail` is `{ message, retryDelay, attempt }`) as they
            // happen, 'closed' (`detail` the reason or null) once.
            (/** @type {string} */ kind, /** @type {any} */ detail) => {
              if (kind === 'open' && this.#readyState !== 2) {
                if (detail?.origin) origin = detail.origin;
                this.#readyState = 1;
                this.dispatchEvent(new Event('open'));
              } else if (kind === 'error' && this.#readyState !== 2) {
                this.#readyState = 0;
                this.#fail(detail, true);
              } else if (kind === 'done' && this.#readyState !== 2) {
                this.#readyState = 2;
                this.dispatchEvent(new Event('close'));
              } else if (kind === 'closed') {
                const stopped = this.#readyState !== 2;
                this.#readyState = 2;
                if (stopped) this.#fail(detail, false);
                closed();
              }
            },
          );
        } catch (error) {
          // Invalid options: `start` throws. Fail like a stream that stopped.
          this.#readyState = 2;
          this.#fail({ message: error instanceof Error ? error.message : String(error) }, false);
          closed();
        }
      },
      (error) => {
        this.#readyState = 2;
        this.#fail({ message: String(error) }, false);
        closed();
      },
    );
  }

  /**
   * @param {{ message?: string, code?: number | null, retryDelay?: number, attempt?: number } | null} detail
   *   Why (none after `close()`), and, while reconnecting, when and which
   *   attempt is next.
   * @param {boolean} willReconnect
   */
  #fail(detail, willReconnect) {
    const event = new Event('error');
    /** @param {string} name @param {unknown} value */
    const define = (name, value) => Object.defineProperty(event, name, { value, enumerable: true });
    define('message', detail?.message ?? undefined);
    define('code', detail?.code ?? undefined);
    define('willReconnect', willReconnect);
    if (willReconnect) {
      define('retryDelay', detail?.retryDelay);
      define('attempt', detail?.attempt);
    }
    this.dispatchEvent(event);
  }

  /**
   * Listens for `type`: with a listener function, the event is typed by
   * {@link ResumableEventSourceEventMap} (any other type is a
   * `MessageEvent<string>`).
   *
   * @template {keyof ResumableEventSourceEventMap} K
   * @overload
   * @param {K} type
   * @param {(this: ResumableEventSource, event: ResumableEventSourceEventMap[K]) => any} listener
   * @param {boolean | AddEventListenerOptions} [options]
   * @returns {void}
   */
  /**
   * @overload
   * @param {string} type
   * @param {(this: ResumableEventSource, event: MessageEvent<string>) => any} listener
   * @param {boolean | AddEventListenerOptions} [options]
   * @returns {void}
   */
  /**
   * @overload
   * @param {string} type
   * @param {EventListenerOrEventListenerObject | null} listener
   * @param {boolean | AddEventListenerOptions} [options]
   * @returns {void}
   */
  /**
   * @param {string} type
   * @param {any} listener
   * @param {boolean | AddEventListenerOptions} [options]
   */
  addEventListener(type, listener, options) {
    super.addEventListener(type, listener, options);
  }

  /**
   * @template {keyof ResumableEventSourceEventMap} K
   * @overload
   * @param {K} type
   * @param {(this: ResumableEventSource, event: ResumableEventSourceEventMap[K]) => any} listener
   * @param {boolean | EventListenerOptions} [options]
   * @returns {void}
   */
  /**
   * @overload
   * @param {string} type
   * @param {(this: ResumableEventSource, event: MessageEvent<string>) => any} listener
   * @param {boolean | EventListenerOptions} [options]
   * @returns {void}
   */
  /**
   * @overload
   * @param {string} type
   * @param {EventListenerOrEventListenerObject | null} listener
   * @param {boolean | EventListenerOptions} [options]
   * @returns {void}
   */
  /**
   * @param {string} type
   * @param {any} listener
   * @param {boolean | EventListenerOptions} [options]
   */
  removeEventListener(type, listener, options) {
    super.removeEventListener(type, listener, options);
  }

  /** `CONNECTING` (0), `OPEN` (1) or `CLOSED` (2). */
  get readyState() {
    return this.#readyState;
  }

  /**
   * The id a reconnect would send as `Last-Event-ID`, once the cursor is loaded.
   * @returns {string | undefined}
   */
  get lastEventId() {
    return this.#driver?.lastEventId;
  }

  /**
   * Stops the stream. The returned promise resolves once its cursor is
   * written, or once the write failed (the page's worker then retries it;
   * see `stats()`), so a page can await it before navigating away.
   * @returns {Promise<void>}
   */
  close() {
    const wasClosed = this.#readyState === 2;
    this.#readyState = 2;
    if (!wasClosed) this.#driver?.close();
    return this.#closed;
  }

  /**
   * Counters of this stream, its store and the page's persistence worker.
   * @returns {Partial<EventSourceStats>}
   */
  stats() {
    return /** @type {any} */ (this.#driver?.stats()) ?? { lastEventId: null };
  }

  /** @returns {MessageHandler | null} */
  get onmessage() {
    return this.#handler('message');
  }
  set onmessage(fn) {
    this.#setHandler('message', fn);
  }

  /** @returns {EventHandler | null} */
  get onopen() {
    return this.#handler('open');
  }
  set onopen(fn) {
    this.#setHandler('open', fn);
  }

  /** @returns {ErrorHandler | null} */
  get onerror() {
    return this.#handler('error');
  }
  set onerror(fn) {
    this.#setHandler('error', fn);
  }

  /**
   * Hears the `close` event: the server ended the stream (a POST stream's
   * end; `readyState` is `CLOSED`, no `error` follows).
   * @returns {EventHandler | null}
   */
  get onclose() {
    return this.#handler('close');
  }
  set onclose(fn) {
    this.#setHandler('close', fn);
  }

  /**
   * @param {string} type
   * @returns {any}
   */
  #handler(type) {
    return /** @type {any} */ (this.#handlers.get(type))?.fn ?? null;
  }

  /**
   * @param {string} type
   * @param {Function | null} fn
   */
  #setHandler(type, fn) {
    const previous = this.#handlers.get(type);
    if (previous) this.removeEventListener(type, previous);
    this.#handlers.delete(type);
    if (typeof fn === 'function') {
      /** @type {EventListener & { fn?: Function }} */
      const listener = (event) => fn.call(this, event);
      listener.fn = fn;
      this.#handlers.set(type, listener);
      this.addEventListener(type, listener);
    }
  }
}

/**
 * Dedup window and cursor of one stream, for apps that bring their own
 * transport (an MCP client's resumption tokens, a WebSocket, a custom fetch
 * loop). Open it with {@link openTracker}.
 *
 * For each event: `observe(id)` says whether it is fresh; hand a fresh one
 * to the application (drop a replay); once the application has handled it,
 * `commit()`. Only `commit()` moves the stored cursor, so a page that dies
 * between the two repeats the event after a reload, and never skips it.
 */
export class Tracker {
  /** @type {import('./tidemark_wasm.js').Tracker} */
  #inner;

  /**
   * Use {@link openTracker}.
   * @internal
   * @param {import('./tidemark_wasm.js').Tracker} inner
   */
  constructor(inner) {
    this.#inner = inner;
  }

  /**
   * Whether the event with this id is fresh rather than a replay; an event
   * without an id is always fresh. A fresh id counts as seen at once (seen
   * again before or after `commit()`, it is a replay) and becomes
   * `lastEventId`, but the stored cursor stays where it was until
   * {@link Tracker.commit}.
   * @param {string | null | undefined} id
   * @returns {boolean}
   */
  observe(id) {
    return this.#inner.observe(id ?? undefined);
  }

  /**
   * Declares every event observed so far handled: the cursor moves to the
   * last fresh id and is persisted in the background (within 250 ms, on
   * `flush()`, `close()` and `pagehide`). Call it once the application has
   * handled the event (or a batch). Does nothing when nothing new was
   * observed.
   * @returns {void}
   */
  commit() {
    this.#inner.commit();
  }

  /**
   * `observe` for a batch of ids in one call into WebAssembly; a `commit()`
   * after the batch is handled moves the cursor to its last fresh id.
   * @param {readonly string[]} ids
   * @returns {boolean[]}
   */
  observeMany(ids) {
    if (ids.length === 0) return [];
    const fresh = this.#inner.observeJoined(ids.join('\n'), ids.length);
    const out = new Array(fresh.length);
    for (let i = 0; i < fresh.length; i++) out[i] = fresh[i] === 1;
    return out;
  }

  /**
   * The id to resume from (`Last-Event-ID`, an MCP resumption token), or
   * `undefined` for a stream that starts from the beginning. While open,
   * the last fresh id observed (what this page reconnects from); after
   * `close()`, and in the next page, the last one committed.
   * @returns {string | undefined}
   */
  get lastEventId() {
    return this.#inner.lastEventId;
  }

  /**
   * Counters of this stream, its store and the page's persistence worker.
   * @returns {Stats & { observed: number, duplicates: number }}
   */
  stats() {
    return /** @type {any} */ (this.#inner.stats());
  }

  /**
   * Writes the cursor now instead of at the next flush interval (250 ms).
   * @returns {Promise<void>}
   */
  flush() {
    return this.#inner.flush();
  }

  /**
   * Closes the stream and writes its committed cursor. Events observed since
   * the last `commit()` count as not handled: a reopen resumes before them.
   * @returns {Promise<void>}
   */
  close() {
    return this.#inner.close();
  }
}

/**
 * Opens the tracker of a stream, seeded from its stored cursor. A stream key
 * can have one open tracker per page at a time.
 * @param {string} streamKey Names the stream, e.g. `${sessionId}/${streamId}`.
 * @param {StoreOptions} [options]
 * @returns {Promise<Tracker>}
 */
export async function openTracker(streamKey, options = {}) {
  await initialize();
  return new Tracker(await openWasmTracker(streamKey, options));
}

/**
 * Forgets a stream: its cursor and, for a POST stream, its resume URL, so
 * that the key starts afresh (a `ResumableEventSource` with it POSTs
 * again). Rejects while the key is open in this page.
 * @param {string} streamKey
 * @param {StoreOptions} [options]
 * @returns {Promise<void>}
 */
export async function forgetStream(streamKey, options = {}) {
  await initialize();
  await forgetWasmStream(streamKey, options);
}

/**
 * Writes the cursors of every stream of this page now, instead of at the
 * next flush interval. tidemark does this by itself on `pagehide` and when
 * the page is hidden. Rejects when a write failed (it is retried).
 * @returns {Promise<void>}
 */
export async function flush() {
  await initialize();
  await flushAll();
}

/**
 * Options for an MCP client's request (`client.request(request, schema,
 * options)` of `@modelcontextprotocol/sdk`) that resume the request's stream
 * from `tracker` and pass on fresh progress only: spread them into the
 * request's options. `resumptionToken` is the tracker's cursor (undefined for
 * a new call: the SDK POSTs it; else it resumes with a GET and
 * `Last-Event-ID`), `onresumptiontoken` observes each event id, and
 * `onprogress` calls yours only for an event that was not a replay, then
 * commits it. This works because the SDK's transport reports an event's id
 * right before it dispatches that event's message, and runs the progress
 * handler (in a microtask) before it reads the next event. An event that
 * brings no progress (the stream's priming event, the response, another
 * notification) is committed in the next task, after the SDK's handlers of
 * its message ran.
 *
 * @template P
 * @param {Tracker} tracker
 * @param {{ onprogress?: (progress: P) => void, onreplay?: (token: string) => void }} [handlers]
 *   `onreplay` hears the id of each replayed event dropped.
 * @returns {{ resumptionToken: string | undefined, onresumptiontoken: (token: string) => void,
 *   onprogress: (progress: P) => void }}
 */
export function mcpResumption(tracker, { onprogress, onreplay } = {}) {
  let fresh = true;
  let scheduled = false;
  const commitLater = () => {
    scheduled = false;
    try {
      tracker.commit();
    } catch {
      // Closed meanwhile (the call ended): what it observed last stays
      // uncommitted, as close() means.
    }
  };
  return {
    resumptionToken: tracker.lastEventId,
    onresumptiontoken(token) {
      fresh = tracker.observe(token);
      if (!fresh) {
        onreplay?.(token);
      } else if (!scheduled) {
        scheduled = true;
        setTimeout(commitLater, 0);
      }
    },
    onprogress(progress) {
      if (!fresh) return;
      onprogress?.(progress);
      // Handled: a reload from now on does not show it again.
      tracker.commit();
    },
  };
}
