// Builds the join page into dist/: join.js (the page's code with livekit-client bundled in, so
// the page needs nothing but the Limbic server), join.css and index.html. The server serves
// dist/index.html at /join and /join/*, and the other files at /join/assets/<file>.
import { copyFile, mkdir, rm } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

import * as esbuild from 'esbuild';

const here = (path) => fileURLToPath(new URL(path, import.meta.url));
const dist = here('dist/');

await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
await esbuild.build({
  entryPoints: [here('src/join.js'), here('src/join.css')],
  outdir: dist,
  bundle: true,
  format: 'esm',
  minify: true,
  // Browsers with WebRTC and ES2020 modules: what livekit-client supports.
  target: ['chrome91', 'firefox90', 'safari15'],
  charset: 'utf8',
  legalComments: 'eof',
  logLevel: 'warning',
});
await copyFile(here('src/index.html'), here('dist/index.html'));
console.log('web: built dist/index.html, dist/join.js, dist/join.css');
