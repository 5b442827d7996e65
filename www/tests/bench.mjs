// Runs www/bench.html in headless Chromium with WebGPU (SwiftShader on a
// machine without a GPU) and prints its table: `node www/tests/bench.mjs [L] [formats]`.
// Not a test: timings are printed, never asserted.
import { chromium } from "playwright-core";
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const types = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".wasm": "application/wasm" };
const server = http.createServer((req, res) => {
  const file = path.join(root, new URL(req.url, "http://x").pathname);
  if (!file.startsWith(root) || !fs.existsSync(file)) { res.writeHead(404); return res.end(); }
  res.writeHead(200, { "content-type": types[path.extname(file)] || "application/octet-stream" });
  fs.createReadStream(file).pipe(res);
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const [L = "1", formats = "f16,q8"] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", chromiumSandbox: false, headless: true,
  args: ["--enable-unsafe-webgpu", "--no-first-run"] });
const page = await browser.newPage();
await page.goto(`http://127.0.0.1:${server.address().port}/bench.html`);
await page.fill("#layers", L);
await page.fill("#formats", formats);
await page.click("#run");
console.log(`headless Chromium ${browser.version()}, WebGPU adapter as the browser gives it (SwiftShader without a GPU)`);
const show = (row) => console.log(`${row.path.padEnd(14)} L=${L}: ${row.msL.toFixed(0)} ms, L+1: ${row.msL1.toFixed(0)} ms, ` +
  `per layer ${row.perLayer.toFixed(0)} ms, 27 layers ≈ ${row.full.toFixed(0)} ms, × vs wasm CPU ${row.speedup.toFixed(2)}`);
// Rows are printed as each path finishes, so a run cut short still reports what it measured.
let shown = 0, r = null;
for (;;) {
  const state = await page.evaluate(() => ({ rows: window.benchRows || [], result: window.benchResult || null,
    status: document.getElementById("status").textContent }));
  for (; shown < state.rows.length; shown++) show(state.rows[shown]);
  if (state.result) { r = state.result; break; }
  await new Promise((res) => setTimeout(res, 5000));
}
if (r.error) console.log("error:", r.error);
if (r.matmul) console.log(`matmul ${r.matmul.n}³ f32: WGSL ${r.matmul.webgpuGflops.toFixed(2)} GFLOP/s, wasm CPU ${r.matmul.cpuGflops.toFixed(2)} GFLOP/s`);
await browser.close();
server.close();
