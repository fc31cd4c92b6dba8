// The dashboard page: polls /api/status every POLL_MS and redraws; never reloads. Everything from the status is
// written with textContent (it comes from strangers' DHT records), never as HTML.
"use strict";

const POLL_MS = 2000;
const MAX_STRIP_ROUNDS = 200;
let lossChart = null;

function $(id) { return document.getElementById(id); }

function setText(id, text) { $(id).textContent = text; }

function fmtNumber(value, digits = 0) {
  if (value === null || value === undefined) return "–";
  return value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function fmtCount(value) {
  const units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [size, unit] of units) if (value >= size) return (value / size).toFixed(2) + " " + unit;
  return String(value);
}

function fmtBytes(value) { return fmtCount(value) + "B"; }

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return seconds.toFixed(0) + " s";
  if (seconds < 3600) return (seconds / 60).toFixed(1) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function renderPeers(peers) {
  const body = document.querySelector("#peers tbody");
  const rows = peers.map((p) => {
    const tr = document.createElement("tr");
    tr.dataset.peerId = p.peer_id;
    const id = cell(p.peer_id.length > 16 ? "…" + p.peer_id.slice(-12) : p.peer_id);
    id.title = p.peer_id;
    tr.append(
      id,
      cell(p.round === null ? "–" : String(p.round)),
      cell(p.training_round === null ? "joining" : `${p.training_round} (step ${p.inner_step})`),
      cell(fmtNumber(p.tokens_per_s)),
      cell(p.last_seen_s.toFixed(0) + " s ago"),
      cell(p.reachability, "reach-" + p.reachability),
      cell(String(p.failed_rounds), p.failed_rounds > 0 ? "warn" : ""),
      cell(String(p.resyncs), p.resyncs > 0 ? "warn" : ""),
      cell(fmtNumber(p.loss, 4)),
      cell(fmtNumber(p.eval_loss, 4)),
      cell(p.device || "–"),
    );
    return tr;
  });
  body.replaceChildren(...rows);
  $("no-peers").hidden = peers.length > 0;
}

function renderCards(status) {
  const totals = status.totals;
  setText("live-peers", String(totals.live_peers));
  setText("peers-seen", `${totals.peers_seen} seen since the monitor started`);
  setText("tokens", fmtCount(totals.tokens));
  const rate = status.peers.reduce((sum, p) => sum + (p.tokens_per_s || 0), 0);
  setText("tokens-per-s", `${fmtNumber(rate)} tokens/s now`);
  setText("bytes", fmtBytes(totals.bytes_sent + totals.bytes_received));
  setText("bytes-split", `${fmtBytes(totals.bytes_sent)} sent, ${fmtBytes(totals.bytes_received)} received`);
  const withLoss = status.rounds.filter((r) => r.loss !== null);
  const latest = withLoss[withLoss.length - 1];
  setText("latest-loss", latest ? fmtNumber(latest.loss, 4) : "–");
  const withEval = status.rounds.filter((r) => r.eval_loss !== null);
  const latestEval = withEval[withEval.length - 1];
  setText("latest-eval", latestEval ? `held-out ${fmtNumber(latestEval.eval_loss, 4)} (round ${latestEval.round})` : "");
  const withHashes = status.rounds.filter((r) => r.hash_peers > 0);
  const last = withHashes[withHashes.length - 1];
  setText("agreement", last ? `${last.hash_agreeing} of ${last.hash_peers}` : "–");
  const agreed = withHashes.filter((r) => r.distinct_hashes === 1).length;
  setText(
    "agreement-sub",
    last ? `peers agree on round ${last.round}; all agreed in ${agreed} of ${withHashes.length} rounds` : "",
  );
}

function renderProgress(status) {
  const p = status.progress;
  let text = status.fingerprint ? `round ${p.round}` : "waiting for peers of this run";
  if (p.max_rounds) text += ` of ${p.max_rounds}`;
  setText("progress-text", text);
  const pace = [];
  if (p.rounds_per_hour) pace.push(`${fmtNumber(p.rounds_per_hour, 1)} rounds/h`);
  if (p.eta_s) pace.push(`about ${fmtDuration(p.eta_s)} left`);
  setText("pace", pace.join(" · "));
  $("progress-bar").style.width = p.fraction === null ? "0" : (100 * p.fraction).toFixed(1) + "%";
}

function renderStrip(rounds) {
  const cells = rounds.filter((r) => r.hash_peers > 0).slice(-MAX_STRIP_ROUNDS).map((r) => {
    const div = document.createElement("div");
    div.className = "cell " + (r.distinct_hashes === 1 ? "ok" : "bad");
    div.title = `round ${r.round}: ${r.hash_agreeing} of ${r.hash_peers} peers hold ${r.majority_hash.slice(0, 10)}`;
    return div;
  });
  $("agreement-strip").replaceChildren(...cells);
}

function renderLoss(rounds) {
  const points = rounds.filter((r) => r.loss !== null || r.eval_loss !== null);
  const data = [points.map((r) => r.round), points.map((r) => r.loss), points.map((r) => r.eval_loss)];
  const el = $("loss-chart");
  el.dataset.points = String(points.length);
  if (lossChart === null) {
    lossChart = new uPlot({
      width: el.clientWidth,
      height: 300,
      scales: { x: { time: false } },
      axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000] }, { label: "loss" }],
      series: [
        { label: "round" },
        { label: "training loss", stroke: "#3867d6", width: 2, spanGaps: true },
        { label: "held-out loss", stroke: "#e17b20", width: 2, spanGaps: true, points: { show: true, size: 6 } },
      ],
    }, data, el);
    window.addEventListener("resize", () => lossChart.setSize({ width: el.clientWidth, height: 300 }));
  } else {
    lossChart.setData(data);
  }
}

function render(status) {
  setText("run-id", status.run_id);
  setText("fingerprint", status.fingerprint || "–");
  renderProgress(status);
  renderCards(status);
  renderLoss(status.rounds);
  renderStrip(status.rounds);
  renderPeers(status.peers);
  document.body.dataset.updatedAt = String(status.updated_at);
}

async function refresh() {
  const badge = $("connection");
  try {
    const response = await fetch("/api/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    badge.textContent = "live";
    badge.className = "badge live";
  } catch (error) {
    badge.textContent = "monitor unreachable";
    badge.className = "badge down";
  }
}

refresh();
setInterval(refresh, POLL_MS);
