// The encoder page: loads the wasm module, the weights (with progress), and
// encodes the chosen image; everything stays in the page.
import init, { Encoder, webgpuAvailable } from "./pkg/ipaflux_web.js";

const $ = (id) => document.getElementById(id);
let encoder = null;

function setError(e) {
  $("error").textContent = e ? String(e.message || e) : "";
}

// Lets the page repaint between long steps.
const frame = () => new Promise((r) => setTimeout(r, 0));

// Fetches a URL with a progress callback; caches it with the Cache API.
async function fetchBytes(url, onProgress) {
  const cache = "caches" in self ? await caches.open("ipaflux-weights") : null;
  let res = cache ? await cache.match(url) : null;
  if (!res) {
    res = await fetch(url);
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    if (cache && url.startsWith("http")) await cache.put(url, res.clone()).catch(() => {});
  }
  const total = Number(res.headers.get("content-length")) || 0;
  const reader = res.body.getReader();
  const parts = [];
  let got = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    got += value.length;
    onProgress(total ? got / total : 0, got);
  }
  const out = new Uint8Array(got);
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

async function loadModel() {
  setError(null);
  $("load").disabled = true;
  try {
    if (encoder) { encoder.release(); encoder.free(); encoder = null; }
    const sample = $("weights").value === "sample";
    const configUrl = sample ? "assets/siglip/config.json" : $("config-url").value;
    const weightsUrl = sample ? "assets/siglip/model.safetensors" : $("weights-url").value;
    $("load-status").textContent = "downloading config…";
    const config = await (await fetch(configUrl)).text();
    const weights = await fetchBytes(weightsUrl, (f, n) => {
      $("load-progress").value = f;
      $("load-status").textContent = `downloading weights: ${(n / 1e6).toFixed(1)} MB`;
    });
    const adapter = sample ? await fetchBytes("assets/ip-adapter.safetensors", () => {}) : undefined;
    $("load-progress").value = 1;
    $("load-status").textContent = `uploading weights (${$("format").value || "as stored"})…`;
    await frame();
    const t0 = performance.now();
    const options = { device: $("device").value, adapter };
    if ($("format").value) options.format = $("format").value;
    if ($("budget").value !== "") options.gpuBudget = Number($("budget").value) * 1048576;
    encoder = await Encoder.create(config, weights, options);
    $("load-status").textContent = `ready on ${encoder.device} in ${(performance.now() - t0).toFixed(0)} ms`;
    $("out-bytes").textContent = `${(encoder.gpuBytes / 1e6).toFixed(2)} MB`;
    const mem = encoder.memory();
    $("out-memory").textContent = mem
      ? `${(mem.placed / 1e6).toFixed(2)} MB placed of a ${(mem.budget / 1048576).toFixed(0)} MiB budget (${mem.events.length} events)`
      : "not used (CPU path)";
    document.body.dataset.ready = "1";
  } catch (e) {
    setError(e);
    $("load-status").textContent = "not loaded";
  } finally {
    $("load").disabled = false;
  }
}

function drawHeatmap(values, rows, cols) {
  const c = $("heatmap");
  c.width = cols; c.height = rows;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(cols, rows);
  let peak = 0;
  for (const v of values) peak = Math.max(peak, Math.abs(v));
  for (let i = 0; i < rows * cols; i++) {
    const t = (values[i] || 0) / (peak || 1); // −1…1: blue…white…red
    img.data[4 * i] = 255 * Math.min(1, 1 + t);
    img.data[4 * i + 1] = 255 * (1 - Math.abs(t));
    img.data[4 * i + 2] = 255 * Math.min(1, 1 - t);
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

async function encodeBytes(bytes, name) {
  setError(null);
  if (!encoder) await loadModel();
  if (!encoder) return;
  $("encode-status").textContent = `encoding ${name}…`;
  document.body.dataset.encoded = "";
  await frame();
  try {
    const out = await encoder.encode(bytes);
    const t = out.timings;
    $("out-device").textContent = out.device;
    $("out-format").textContent = out.format;
    $("out-decode").textContent = `${t.decodeMs.toFixed(1)} ms`;
    $("out-encode").textContent = `${t.encodeMs.toFixed(1)} ms` + (out.embeds ? ` (+ projection ${t.projectMs.toFixed(1)} ms)` : "");
    const dims = out.embeds ? `pooled ${out.pooled.length}; image_prompt_embeds ${out.embedsShape.join("×")}` : `pooled ${out.pooled.length}`;
    $("out-dims").textContent = dims;
    $("out-values").textContent = Array.from(out.pooled.slice(0, 6), (v) => v.toFixed(5)).join(", ");
    if (out.embeds) drawHeatmap(out.embeds, out.embedsShape[1], out.embedsShape[2]);
    else drawHeatmap(out.pooled, Math.max(1, Math.floor(Math.sqrt(out.pooled.length))), Math.ceil(out.pooled.length / Math.floor(Math.sqrt(out.pooled.length))));
    $("encode-status").textContent = `done: ${name}`;
    document.body.dataset.encoded = "1";
    window.lastResult = { device: out.device, format: out.format, pooled: Array.from(out.pooled), embedsShape: out.embedsShape || null };
  } catch (e) {
    setError(e);
    $("encode-status").textContent = "failed";
    document.body.dataset.encoded = "error";
  }
}

async function encodeFile(file) {
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  await encodeBytes(new Uint8Array(await file.arrayBuffer()), file.name);
}

async function main() {
  await init();
  const gpu = await webgpuAvailable();
  if (!gpu) $("device").value = "cpu";
  $("load-status").textContent = gpu ? "WebGPU available" : "no WebGPU adapter: the CPU path will be used";
  $("weights").onchange = () => { $("urls").hidden = $("weights").value !== "url"; };
  $("load").onclick = loadModel;
  $("file").onchange = (e) => e.target.files[0] && encodeFile(e.target.files[0]);
  $("sample").onclick = async () => {
    const bytes = new Uint8Array(await (await fetch("assets/photo.jpg")).arrayBuffer());
    $("preview").src = "assets/photo.jpg"; $("preview").hidden = false;
    await encodeBytes(bytes, "photo.jpg");
  };
  const drop = $("drop");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) encodeFile(e.dataTransfer.files[0]); };
  document.body.dataset.started = "1";
}

main().catch((e) => { setError(e); document.body.dataset.started = "error"; });
