// Runs builds of filter/examples/wasm_bench.rs (wasm32-wasip1) under node's V8 and prints their
// figures side by side; called by scripts/wasm-bench/run.sh, which documents the whole.
//
//   node run.mjs [--runs N] [--args "..."] LABEL[~VS]=module.wasm... [LABEL[~VS]=results.json...]
//
// Each .wasm runs RUNS times, the modules taking turns so that a busy machine slows all alike;
// a stage's figure is its best run (each run already reports medians). A .json argument holds
// figures measured elsewhere (the native builds) and is shown as a column as is. A column
// named LABEL~VS also gets a column of its change against the column VS.
import { closeSync, openSync, readFileSync, rmSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WASI } from 'node:wasi';

process.removeAllListeners('warning'); // "WASI is an experimental feature"

const argv = process.argv.slice(2);
let runs = 3;
let benchArgs = [];
const columns = [];
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--runs') runs = Number(argv[++i]);
  else if (argv[i] === '--args') benchArgs = argv[++i].split(/\s+/).filter(Boolean);
  else {
    const at = argv[i].indexOf('=');
    const [label, vs] = argv[i].slice(0, at).split('~');
    columns.push({ label, vs, path: argv[i].slice(at + 1) });
  }
}

// The bench links the filter library, whose proxy-wasm exports import `env.proxy_*`; the bench
// never calls them.
function stubImports(module) {
  const env = {};
  for (const imp of WebAssembly.Module.imports(module)) {
    if (imp.module === 'env' && imp.kind === 'function') {
      env[imp.name] = () => {
        throw new Error(`${imp.name} called`);
      };
    }
  }
  return env;
}

const dir = mkdtempSync(join(tmpdir(), 'wasm-bench-'));
async function runOnce(module) {
  const out = join(dir, 'out.json');
  const fd = openSync(out, 'w');
  const wasi = new WASI({
    version: 'preview1',
    args: ['wasm_bench', '--json', ...benchArgs],
    env: {},
    stdout: fd,
  });
  const instance = await WebAssembly.instantiate(module, {
    ...wasi.getImportObject(),
    env: stubImports(module),
  });
  // node refuses a module that exports `_initialize` (proxy-wasm's) as a command: hand it only
  // what a command needs.
  const { memory, _start } = instance.exports;
  const code = wasi.start({ exports: { memory, _start } });
  closeSync(fd);
  if (code) throw new Error(`exit code ${code}`);
  return Object.fromEntries(JSON.parse(readFileSync(out, 'utf8'))); // [[name, µs], …] in order
}

for (const column of columns) {
  if (column.path.endsWith('.json')) {
    column.best = Object.fromEntries(JSON.parse(readFileSync(column.path, 'utf8')));
  } else {
    const bytes = readFileSync(column.path);
    column.module = await WebAssembly.compile(bytes);
    column.results = [];
  }
}
for (let run = 0; run < runs; run++) {
  for (const column of columns.filter((c) => c.module)) {
    column.results.push(await runOnce(column.module));
  }
}
rmSync(dir, { recursive: true, force: true });
for (const column of columns.filter((c) => c.module)) {
  column.best = {};
  for (const name of Object.keys(column.results[0])) {
    column.best[name] = Math.min(...column.results.map((r) => r[name]));
  }
}

const pct = (x, base) => { const p = (x / base - 1) * 100; return `${p > 0 ? "+" : ""}${p.toFixed(0)}%`; };
const names = Object.keys(columns[0].best);
const width = Math.max(...names.map((n) => n.length)) + 2;
const cellWidth = Math.max(10, ...columns.map((c) => c.label.length + 2));
const cell = (s) => String(s).padStart(cellWidth);
let header = 'µs per call'.padEnd(width) + columns.map((c) => cell(c.label)).join('');
const compared = columns.filter((c) => c.vs);
const vs = (c) => columns.find((b) => b.label === c.vs);
const deltaCell = (s) => String(s).padStart(Math.max(...compared.map((c) => c.label.length + c.vs.length + 4)));
header += compared.map((c) => deltaCell(`${c.label}/${c.vs}`)).join('');
console.log(header);
for (const name of names) {
  let line = name.padEnd(width) + columns.map((c) => cell((c.best[name] ?? NaN).toFixed(1))).join('');
  line += compared.map((c) => deltaCell(pct(c.best[name], vs(c).best[name]))).join('');
  console.log(line);
}
