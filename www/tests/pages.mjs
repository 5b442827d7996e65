// Page tests for www/ (run by `cargo xtask web-test` after `cargo xtask web`):
// serves www/ on a local port, drives /usr/bin/chromium with playwright-core,
// and checks the pages the way a person would use them.
//  1. WebGPU on (SwiftShader): encode the bundled sample; the result's device
//     is WebGPU and its pooled values match the golden reference (rel 3e-2, f16 weights).
//  2. WebGPU off (no --enable-unsafe-webgpu: no adapter): the same page falls
//     back to the CPU path, same embedding (rel 1e-4 vs golden).
//  3. Bad input: a non-image file, a truncated weights URL and weights past
//     the GPU budget (refused by the memory registry before any upload) → a
//     message on the page, the tab still responds and loads again.
//  4. The memory-plan page draws the registry's timeline.
// Screenshots go to www/tests/out/.
import { chromium } from "playwright-core";
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..");
const out = path.join(here, "out");
fs.mkdirSync(out, { recursive: true });
const golden = JSON.parse(fs.readFileSync(path.join(root, "assets", "golden-pooled.json"), "utf8"));

const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
  ".wasm": "application/wasm", ".json": "application/json", ".jpg": "image/jpeg", ".png": "image/png" };
const server = http.createServer((req, res) => {
  const url = decodeURIComponent(new URL(req.url, "http://x").pathname);
  if (url === "/truncated.safetensors") {
    const full = fs.readFileSync(path.join(root, "assets/siglip/model.safetensors"));
    res.writeHead(200, { "content-type": "application/octet-stream" });
    return res.end(full.subarray(0, full.length >> 1));
  }
  const file = path.join(root, url === "/" ? "index.html" : url);
  if (!file.startsWith(root) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) { res.writeHead(404); return res.end(); }
  res.writeHead(200, { "content-type": types[path.extname(file)] || "application/octet-stream" });
  fs.createReadStream(file).pipe(res);
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const base = `http://127.0.0.1:${server.address().port}`;

const relErr = (a, b) => {
  let d = 0, p = 0;
  for (let i = 0; i < b.length; i++) { d = Math.max(d, Math.abs(a[i] - b[i])); p = Math.max(p, Math.abs(b[i])); }
  return a.length === b.length ? d / p : Infinity;
};

let failures = 0;
function check(ok, what) {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
  if (!ok) failures++;
}

async function browser(webgpu) {
  const args = ["--disable-background-networking", "--disable-component-update", "--no-first-run"];
  if (webgpu) args.push("--enable-unsafe-webgpu");
  return chromium.launch({ executablePath: process.env.CHROME || "/usr/bin/chromium", chromiumSandbox: false, headless: true, args });
}

async function encodeSample(page, format) {
  await page.goto(`${base}/index.html`);
  await page.waitForSelector("body[data-started='1']", { timeout: 60000 });
  await page.selectOption("#format", format);
  await page.click("#sample");
  await page.waitForSelector("body[data-encoded='1'], body[data-encoded='error']", { timeout: 180000 });
  return page.evaluate(() => window.lastResult || { error: document.getElementById("error").textContent });
}

try {
  for (const [webgpu, format, tol] of [[true, "f16", 3e-2], [false, "f16", 1e-4]]) {
    const b = await browser(webgpu);
    const page = await b.newPage();
    page.on("pageerror", (e) => console.log("page error:", e.message));
    const r = await encodeSample(page, format);
    const label = webgpu ? "WebGPU on" : "WebGPU off";
    check(!r.error, `${label}: sample encoded ${r.error || ""}`);
    check(webgpu ? /^webgpu/.test(r.device) : r.device === "cpu (wasm)", `${label}: device is ${r.device}`);
    const err = relErr(r.pooled || [], golden);
    check(err <= tol, `${label}: pooled vs golden rel err ${err.toExponential(2)} (tol ${tol})`);
    const shape = JSON.stringify(r.embedsShape);
    check(shape === "[1,8,64]", `${label}: the adapter's projection ran: image_prompt_embeds ${shape}`);
    const shown = await page.textContent("#out-values");
    check(shown.split(",").length === 6, `${label}: values shown on the page: ${shown}`);
    await page.screenshot({ path: path.join(out, webgpu ? "encoder-webgpu.png" : "encoder-cpu.png"), fullPage: true });

    if (webgpu) {
      // A file that is not an image: a message, and the page keeps working.
      await page.setInputFiles("#file", { name: "notes.png", mimeType: "image/png", buffer: Buffer.from("definitely not a PNG") });
      await page.waitForSelector("body[data-encoded='error']", { timeout: 60000 });
      const msg = await page.textContent("#error");
      check(/image/i.test(msg), `non-image file → message: ${msg}`);
      // Truncated weights from a URL: a message, no hang.
      await page.selectOption("#weights", "url");
      await page.fill("#config-url", `${base}/assets/siglip/config.json`);
      await page.fill("#weights-url", `${base}/truncated.safetensors`);
      await page.click("#load");
      await page.waitForFunction(() => document.getElementById("load-status").textContent === "not loaded", null, { timeout: 60000 });
      const msg2 = await page.textContent("#error");
      check(/model\.safetensors/.test(msg2), `truncated weights → message: ${msg2}`);
      check(await page.evaluate(() => 1 + 1) === 2, "tab still responds");
      await page.screenshot({ path: path.join(out, "encoder-error.png"), fullPage: true });
      // Weights past the GPU budget: the registry's message on the page; then a sane budget loads.
      await page.selectOption("#weights", "sample");
      await page.selectOption("#format", "f32");
      await page.fill("#budget", "0.01");
      await page.click("#load");
      await page.waitForFunction(() => document.getElementById("load-status").textContent === "not loaded", null, { timeout: 60000 });
      const msg3 = await page.textContent("#error");
      check(/more than the .* budget/.test(msg3), `over the GPU budget → message: ${msg3}`);
      await page.fill("#budget", "64");
      await page.click("#load");
      await page.waitForFunction(() => /^ready/.test(document.getElementById("load-status").textContent), null, { timeout: 120000 });
      const mem = await page.textContent("#out-memory");
      check(/placed of a 64 MiB budget/.test(mem), `loads again within the budget: ${mem}`);

      await page.goto(`${base}/plan.html`);
      await page.waitForSelector("body[data-planned]", { timeout: 60000 });
      const events = await page.getAttribute("body", "data-planned");
      check(Number(events) > 10, `plan page: ${events} registry events`);
      check((await page.textContent("#summary")).includes("leaked 0 bytes"), "plan page: nothing leaked");
      await page.screenshot({ path: path.join(out, "plan.png"), fullPage: true });
    }
    await b.close();
  }
} catch (e) {
  console.log("FAIL", e);
  failures++;
} finally {
  server.close();
}
console.log(failures ? `page tests: ${failures} failed` : "page tests: all passed");
process.exit(failures ? 1 : 0);
