// The demo page: follows the `tidemark serve` stream on this origin and shows
// each event, the cursor and the counters. Tests read `globalThis.demo`.
import { ResumableEventSource } from 'tidemark';

const params = new URLSearchParams(location.search);
const url = params.get('url') ?? '/events';
const $ = (id) => document.getElementById(id);

const shown = [];
globalThis.demo = { shown, source: null };

const source = new ResumableEventSource(url, { streamKey: `demo ${url}` });
globalThis.demo.source = source;

source.onopen = () => render();
source.onerror = (event) => {
  if (event.message) $('failure').textContent = event.message;
  render();
};
source.onmessage = (event) => {
  shown.push(event.lastEventId);
  document.dispatchEvent(new CustomEvent('demo:shown', { detail: event.lastEventId }));
  const item = document.createElement('li');
  item.className = 'new';
  item.textContent = `#${event.lastEventId}  ${event.data}`;
  const list = $('events');
  list.prepend(item);
  while (list.childElementCount > 200) list.lastElementChild.remove();
  render();
};

function render() {
  const stats = source.stats();
  $('state').textContent = ['connecting', 'open', 'closed'][source.readyState];
  $('cursor').textContent = stats.lastEventId ?? 'none';
  $('count').textContent = String(shown.length);
  $('duplicates').textContent = String(stats.duplicates ?? 0);
  $('connects').textContent = String(stats.connects ?? 0);
  $('written').textContent = String(stats.cursorsWritten ?? 0);
  $('store').textContent = stats.store
    ? `${stats.store}${stats.storeWarning ? ` (${stats.storeWarning})` : ''}`
    : '-';
  if (stats.lastStoreError) $('failure').textContent = stats.lastStoreError;
}
setInterval(render, 500);

$('forget').onclick = async () => {
  await source.close();
  const request = indexedDB.deleteDatabase('tidemark');
  request.onsuccess = request.onerror = () => location.reload();
};
