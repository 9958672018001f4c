// Glue for @modelcontextprotocol/sdk 1.32.2 (client/streamableHttp.js and
// shared/protocol.js of its dist/esm): what a page needs to resume one
// request's stream after a reload, with a new Client and transport.
//
// 1. `transport.send(request, { resumptionToken, onresumptiontoken })`
//    resumes with a GET and Last-Event-ID, but does not pass
//    `onresumptiontoken` on (streamableHttp.js, `send`: it calls
//    `_startOrAuthSse({ resumptionToken, replayMessageId })`), so the tokens
//    of the resumed stream never reach the caller. `transport.resumeStream`
//    passes it on: requests that carry a resumption token go there.
// 2. A new page's Client numbers its requests from 0, so the resumed request
//    gets a new JSON-RPC id, while the replayed response carries the
//    original id and the replayed progress notifications carry the original
//    id as `progressToken` (Protocol.request makes the token the id).
//    The SDK's `replayMessageId` rewrites only the response, and only on
//    the `send` path. Here both are rewritten to the new id, so the
//    Client's response handler and `onprogress` receive them.
//
// Use: `const glue = resumeGlue(transport)` right after `client.connect`;
// `glue.lastRequestId` is the id of the last request the Client sent (read it
// right after calling `client.request`); `glue.resumeAs(originalId)` before
// the `client.request` that resumes the request first sent as `originalId`.

/**
 * @param {import('@modelcontextprotocol/sdk/client/streamableHttp.js').StreamableHTTPClientTransport} transport
 *   connected (`client.connect(transport)` done).
 */
export function resumeGlue(transport) {
  /** @type {string | number | undefined} */
  let from;
  /** @type {string | number | undefined} */
  let to;
  const glue = {
    /** @type {string | number | undefined} */
    lastRequestId: undefined,
    /** @param {string | number} originalId */
    resumeAs(originalId) {
      from = originalId;
      to = undefined;
    },
  };

  const send = transport.send.bind(transport);
  transport.send = (message, options) => {
    const isRequest = 'method' in message && 'id' in message;
    if (!isRequest) return send(message, options);
    glue.lastRequestId = message.id;
    if (!options?.resumptionToken) return send(message, options);
    if (from !== undefined) to = message.id;
    // (1): resumeStream keeps onresumptiontoken for this stream and for its
    // reconnects. It rejects when the resume fails (a 404 for a session the
    // server forgot), so the Client's request rejects instead of hanging.
    return transport.resumeStream(options.resumptionToken, { onresumptiontoken: options.onresumptiontoken });
  };

  // (2): Protocol.connect installed its handler as transport.onmessage.
  const deliver = transport.onmessage;
  transport.onmessage = (message, extra) => {
    if (from !== undefined && to !== undefined && from !== to) {
      if (('result' in message || 'error' in message) && message.id === from) {
        message = { ...message, id: to };
      } else if (message.method === 'notifications/progress' && message.params?.progressToken === from) {
        message = { ...message, params: { ...message.params, progressToken: to } };
      }
    }
    deliver?.(message, extra);
  };
  return glue;
}
