// Builds the demo page and the benchmark page into www/dist, which
// `tidemark serve --www www/dist` serves next to its /events stream.
import { defineConfig } from 'vite';
import { resolve } from 'node:path';

const here = import.meta.dirname;

export default defineConfig({
  root: here,
  build: {
    outDir: resolve(here, 'dist'),
    emptyOutDir: true,
    target: 'es2022',
    rollupOptions: {
      input: {
        demo: resolve(here, 'index.html'),
        bench: resolve(here, 'bench.html'),
      },
    },
  },
});
