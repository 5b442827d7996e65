// The registry's plan for a job, drawn as resident bytes per model per stage.
import init, { plan } from "./pkg/ipaflux_web.js";

const $ = (id) => document.getElementById(id);
const MiB = 1 << 20;
const colors = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

function draw(report) {
  const c = $("chart");
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  const s = report.summary;
  const stages = report.stages;
  const models = [...new Set(stages.flatMap((st) => st.resident.map((r) => r.model)))];
  const top = Math.max(s.budget_bytes, ...stages.map((st) => st.peak_bytes)) * 1.1;
  const h = c.height - 40, w = (c.width - 60) / Math.max(1, stages.length);
  const y = (b) => h - (b / top) * h + 10;
  stages.forEach((st, i) => {
    let base = 0;
    for (const r of st.resident) {
      ctx.fillStyle = colors[models.indexOf(r.model) % colors.length];
      ctx.fillRect(50 + i * w + 4, y(base + r.loaded_bytes), w - 8, y(base) - y(base + r.loaded_bytes));
      base += r.loaded_bytes;
    }
    ctx.fillStyle = "#222";
    ctx.font = "12px sans-serif";
    ctx.fillText(st.stage, 50 + i * w + 4, c.height - 12);
  });
  ctx.strokeStyle = "#b00";
  ctx.beginPath(); ctx.moveTo(50, y(s.budget_bytes)); ctx.lineTo(c.width - 10, y(s.budget_bytes)); ctx.stroke();
  ctx.fillStyle = "#b00";
  ctx.fillText(`budget ${(s.budget_bytes / 2 ** 30).toFixed(1)} GiB`, 52, y(s.budget_bytes) - 4);
  $("legend").innerHTML = models.map((m, i) => `<span style="color:${colors[i % colors.length]}">■</span> ${m}`).join(" &nbsp; ");
}

function run() {
  $("error").textContent = "";
  try {
    const report = JSON.parse(plan($("scenario").value, Number($("vram").value)));
    const s = report.summary;
    $("summary").textContent = `peak ${(s.peak_device_bytes / 2 ** 30).toFixed(2)} GiB of ${(s.budget_bytes / 2 ** 30).toFixed(1)} GiB; ` +
      `host→device ${(s.h2d_bytes / 2 ** 30).toFixed(2)} GiB; state ${s.state}; policy ${s.policy}; leaked ${s.leaked_bytes} bytes`;
    draw(report);
    $("events").tBodies[0].innerHTML = report.events.map((e) =>
      `<tr><td>${e.stage}</td><td>${e.op}</td><td>${e.model}</td><td>${(e.bytes / MiB).toFixed(0)}</td><td>${e.device}</td><td>${e.reason}</td></tr>`).join("");
    document.body.dataset.planned = String(report.events.length);
  } catch (e) {
    $("error").textContent = String(e.message || e);
    document.body.dataset.planned = "error";
  }
}

await init();
$("run").onclick = run;
run();
