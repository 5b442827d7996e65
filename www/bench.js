// Times the encoder on WebGPU and on the wasm CPU path; prints a table (also
// into window.benchResult for www/tests/bench.mjs).
import init, { benchEncoder, benchMatmul, benchCpuMatmul, webgpuAvailable } from "./pkg/ipaflux_web.js";

const $ = (id) => document.getElementById(id);
const frame = () => new Promise((r) => setTimeout(r, 0));

async function run() {
  $("error").textContent = "";
  const L = Number($("layers").value), runs = Number($("runs").value);
  const rows = [];
  window.benchRows = rows; // filled as each path finishes (www/tests/bench.mjs prints them as they come)
  const tbody = $("table").tBodies[0];
  tbody.innerHTML = "";
  try {
    const paths = [["cpu", "f32"]];
    if (await webgpuAvailable()) for (const f of $("formats").value.split(",")) paths.push(["webgpu", f.trim()]);
    let cpuFull = null;
    for (const [device, format] of paths) {
      $("status").textContent = `timing ${device} ${format} at ${L} and ${L + 1} layers…`;
      await frame();
      const a = await benchEncoder(L, format, device, runs);
      const b = await benchEncoder(L + 1, format, device, runs);
      const perLayer = Math.max(0, b - a), full = a + perLayer * (27 - L);
      if (device === "cpu") cpuFull = full;
      const row = { path: `${device} ${format}`, msL: a, msL1: b, perLayer, full, speedup: cpuFull / full };
      rows.push(row);
      tbody.insertAdjacentHTML("beforeend", `<tr><td>${row.path}</td><td>${a.toFixed(0)}</td><td>${b.toFixed(0)}</td>` +
        `<td>${perLayer.toFixed(0)}</td><td>${full.toFixed(0)}</td><td>${row.speedup.toFixed(2)}</td></tr>`);
    }
    const n = Number($("n").value);
    $("status").textContent = `matmul ${n}³…`;
    await frame();
    const gpu = (await webgpuAvailable()) ? await benchMatmul(n, "f32", 3) : NaN;
    const cpu = benchCpuMatmul(n, 2);
    $("matmul").textContent = `matmul ${n}³ f32: WGSL ${gpu.toFixed(2)} GFLOP/s, wasm CPU ${cpu.toFixed(2)} GFLOP/s`;
    window.benchResult = { rows, matmul: { n, webgpuGflops: gpu, cpuGflops: cpu } };
    $("status").textContent = "done";
  } catch (e) {
    $("error").textContent = String(e.message || e);
    window.benchResult = { error: String(e.message || e) };
  }
}

await init();
$("run").onclick = run;
if (new URLSearchParams(location.search).has("run")) run();
