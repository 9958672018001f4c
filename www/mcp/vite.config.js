// Builds the MCP page (www/mcp) and the page www/tests/mcp-transport.test.mjs
// drives (test.html) into www/dist/mcp, which the fixture server
// (mcp/server.mjs) serves next to its /mcp endpoint:
//   npx vite build --config www/mcp/vite.config.js
// Its own config, since www/vite.config.js builds the other pages. Build it
// after that one: www/vite.config.js empties www/dist.
import { defineConfig } from 'vite';
import { resolve } from 'node:path';

const here = import.meta.dirname;

export default defineConfig({
  root: here,
  base: './',
  build: {
    outDir: resolve(here, '../dist/mcp'),
    emptyOutDir: true,
    target: 'es2022',
    rollupOptions: {
      input: {
        page: resolve(here, 'index.html'),
        test: resolve(here, 'test.html'),
      },
    },
  },
});
