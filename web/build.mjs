// Builds the browser pages into dist/, each bundled with everything it uses, so that they need
// nothing but the Limbic server:
// - the join page: dist/index.html, join.js (livekit-client bundled in), join.css; the server
//   serves dist/index.html at /join and /join/*, and the other files at /join/assets/<file>;
// - the clinic console: dist/clinic/index.html, clinic.js (FullCalendar bundled in),
//   clinic.css; served at /clinic and /clinic/*, and /clinic/assets/<file>.
import { copyFile, mkdir, rm, stat } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

import * as esbuild from 'esbuild';

const here = (path) => fileURLToPath(new URL(path, import.meta.url));
const dist = here('dist/');

const common = {
  bundle: true,
  format: 'esm',
  minify: true,
  // Browsers with WebRTC and ES2020 modules: what livekit-client supports.
  target: ['chrome91', 'firefox90', 'safari15'],
  charset: 'utf8',
  legalComments: 'eof',
  logLevel: 'warning',
};

await rm(dist, { recursive: true, force: true });
await mkdir(here('dist/clinic/'), { recursive: true });
await esbuild.build({ ...common, entryPoints: [here('src/join.js'), here('src/join.css')], outdir: dist });
await copyFile(here('src/index.html'), here('dist/index.html'));
await esbuild.build({
  ...common,
  entryPoints: [{ in: here('src/clinic/main.js'), out: 'clinic' }, { in: here('src/clinic/clinic.css'), out: 'clinic' }],
  outdir: here('dist/clinic/'),
});
await copyFile(here('src/clinic/index.html'), here('dist/clinic/index.html'));

const size = async (path) => `${((await stat(here(path))).size / 1024).toFixed(0)} KiB`;
console.log(`web: built dist/ (join.js ${await size('dist/join.js')}) and dist/clinic/ (clinic.js ${await size('dist/clinic/clinic.js')}, clinic.css ${await size('dist/clinic/clinic.css')})`);
