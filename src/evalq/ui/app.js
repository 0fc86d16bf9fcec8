// evalq's dashboard: four pages drawn from the web process's JSON and kept live by its
// server-sent events. Every string from a job (labels, task names, sample text, log lines)
// is put into the page as a text node, never parsed as markup: `el()` below is the only way
// this script builds elements, and it has no path to innerHTML.
"use strict";

const main = document.getElementById("main");
const SVG = "http://www.w3.org/2000/svg";
const QUEUED_PAGE = 300;

function el(tag, attrs, ...kids) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  append(node, kids);
  return node;
}

function svg(tag, attrs, ...kids) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  append(node, kids);
  return node;
}

function append(node, kids) {
  for (const kid of kids.flat(Infinity)) {
    if (kid === undefined || kid === null || kid === false) continue;
    node.appendChild(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
}

function replace(node, ...kids) {
  node.replaceChildren();
  append(node, kids);
  return node;
}

const short = (id) => String(id).slice(0, 8);
const jobHref = (id) => "/jobs/" + encodeURIComponent(id);
const jobLink = (id) => el("a", { class: "jobid", href: jobHref(id), title: id, "data-job": id }, short(id));

function fmt(value) {
  if (typeof value !== "number") return value === undefined || value === null ? "" : String(value);
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 1000 ? value.toFixed(1) : value.toFixed(4);
}

// Where an evaluation's answers came from: computed, taken from its own journal (an earlier
// attempt's), or reused from the cache.
function workText(w) {
  const n = (key) => String(w[key] || 0);
  return `responses ${n("responses_computed")} computed, ${n("responses_resumed")} resumed, ${n("responses_reused")} reused; ` +
    `scores ${n("scores_computed")} computed, ${n("scores_reused")} reused`;
}

// A checkpoint's turnaround as `evalq status` writes it: "52.4 s: detection 42.3, queue 0.1, ...".
function turnaroundText(t) {
  const parts = [["detection", t.detection], ["queue", t.queue], ["load", t.load], ["evaluation", t.evaluation], ["logging", t.logging]]
    .filter(([, seconds]) => seconds !== null && seconds !== undefined)
    .map(([name, seconds]) => `${name} ${seconds.toFixed(1)}`).join(", ");
  const head = t.total === null || t.total === undefined ? "not completed yet"
    : t.logging === null || t.logging === undefined ? `${t.total.toFixed(1)} s to completion, not logged yet`
    : `${t.total.toFixed(1)} s`;
  return parts ? `${head}: ${parts}` : head;
}

function labelChips(labels) {
  return Object.entries(labels || {}).map(([k, v]) => el("span", { class: "label" }, k + "=" + v));
}

// A gate's verdict: GO green, NO-GO red, INCONCLUSIVE amber.
function verdictBadge(name, attrs) {
  if (!name) return null;
  const kind = name === "GO" ? "go" : name === "NO-GO" ? "nogo" : "inconclusive";
  return el("span", Object.assign({ class: "verdict verdict-" + kind, "data-verdict": name }, attrs || {}), name);
}

const FINISHED = ["completed", "failed", "cancelled"];

// One job of the history (a summary of `/api/history`, `/api/compare`) as a table row.
function summaryRow(job) {
  return el("tr", { "data-job": job.job_id },
    el("td", {}, jobLink(job.job_id)),
    el("td", { class: "status-" + job.status }, job.status),
    el("td", { class: "verdict-cell" }, verdictBadge(job.verdict) || (job.gate && job.status === "completed" ? el("span", { class: "muted" }, "judging") : "")),
    el("td", {}, job.pool || ""),
    el("td", {}, job.team || ""),
    el("td", {}, job.model || ""),
    el("td", {}, (job.tasks || []).join(", ")),
    el("td", {}, labelChips(job.labels)),
    el("td", { class: "muted", title: job.created_at || "" }, job.created_at ? new Date(job.created_at).toLocaleString() : ""),
    el("td", { class: "muted", title: job.completed_at || "" }, job.completed_at ? new Date(job.completed_at).toLocaleString() : ""));
}
const SUMMARY_HEADERS = ["job", "status", "verdict", "pool", "team", "model", "tasks", "labels", "created", "ended"];

function ago(time) {
  if (!time) return "";
  const seconds = Math.max(0, (Date.now() - Date.parse(time)) / 1000);
  if (seconds < 60) return seconds.toFixed(0) + " s ago";
  if (seconds < 3600) return (seconds / 60).toFixed(0) + " min ago";
  return (seconds / 3600).toFixed(1) + " h ago";
}

function clock(time) {
  return time ? new Date(time).toLocaleTimeString() : "";
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ headers: { Accept: "application/json" } }, options || {}));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(typeof body.detail === "string" ? body.detail : response.status + " " + response.statusText);
  return body;
}

function bar(done, total, percent) {
  const pct = Math.max(0, Math.min(100, percent !== undefined ? percent : total ? (100 * done) / total : 0));
  const fill = el("span");
  fill.style.width = pct.toFixed(1) + "%";
  return el("div", { class: "bar", role: "progressbar", "aria-valuenow": pct.toFixed(0) }, fill);
}

function table(headers, rows, attrs) {
  return el(
    "table",
    attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { class: h.startsWith("#") || h === "value" ? "num" : null }, h.replace(/^#/, ""))))),
    el("tbody", {}, rows),
  );
}

function failure(error) {
  replace(main, el("p", { class: "error" }, String(error && error.message ? error.message : error)));
}

// One EventSource per page; the browser reconnects it on its own, and the page reloads its
// snapshot when told it fell behind.
function live(url, handlers) {
  const badge = document.getElementById("live");
  badge.hidden = false;
  badge.textContent = "connecting";
  const source = new EventSource(url);
  source.addEventListener("open", () => {
    badge.textContent = "live";
    badge.className = "live on";
  });
  source.addEventListener("error", () => {
    badge.textContent = "reconnecting";
    badge.className = "live off";
  });
  for (const [kind, handler] of Object.entries(handlers)) {
    source.addEventListener(kind, (message) => handler(JSON.parse(message.data)));
  }
  return source;
}

// --- queue -------------------------------------------------------------------------------

async function queuePage() {
  document.title = "evalq · queue";
  const params = new URLSearchParams(location.search);
  const state = { queued: new Map(), running: new Map(), workers: new Map(), counts: {}, shown: QUEUED_PAGE, teams: null, team: params.get("team") || "" };
  const parts = {
    stats: el("div", { class: "stats", id: "stats" }),
    filter: el("div", { class: "controls", id: "queue-controls" }),
    pools: el("div", { id: "pools" }),
    running: el("div", { id: "running" }),
    queued: el("div", { id: "queued" }),
    teams: el("div", { id: "teams" }),
    workers: el("div", { id: "workers" }),
    recent: el("div", { id: "recent" }),
  };
  // The last jobs that ended, newest first: a job that ended while nobody watched is one click away.
  const RECENT = 20;
  const recent = new Map();
  replace(
    main,
    el("h1", {}, "Queue"),
    parts.stats,
    parts.filter,
    el("section", { class: "card" }, el("h2", {}, "Running"), parts.running),
    el("section", { class: "card" }, el("h2", {}, "Queued"), parts.queued),
    el("section", { class: "card" }, el("h2", {}, "Recently finished ", el("a", { href: "/jobs?status=completed,failed,cancelled", class: "muted" }, "(all)")), parts.recent),
    el("section", { class: "card" }, el("h2", {}, "Teams"), parts.teams),
    el("div", { class: "grid2" },
      el("section", { class: "card" }, el("h2", {}, "Workers"), parts.workers),
      el("section", { class: "card" }, el("h2", {}, "Pools"), parts.pools)),
  );

  async function load() {
    const [reply, teams] = await Promise.all([api("/api/queue"), api("/api/teams").catch(() => null)]);
    const q = reply.queue;
    const before = state.queued;
    state.queued = new Map();
    // The scheduler's order (`queue`: each pool's rows as they will start; another team's job
    // is a row with no id); a gateway from before it gives only the ids, in arrival order.
    const rows = q.queue && Object.keys(q.queue).length ? q.queue
      : Object.fromEntries(Object.entries(q.queued_jobs).map(([pool, ids]) => [pool, ids.map((id, i) => ({ position: i, job_id: id }))]));
    for (const [pool, list] of Object.entries(rows)) {
      for (const row of list) {
        // The labels and time a job's `queued` event brought stay: the snapshot has neither.
        const seen = row.job_id ? before.get(row.job_id) : null;
        state.queued.set(row.job_id || `${pool}#${row.position}`, Object.assign({ pool, labels: seen ? seen.labels : null, time: seen ? seen.time : null }, row));
      }
    }
    state.queueSize = q.queue_size;
    state.running = new Map(reply.running.map((info) => [info.job_id, info]));
    state.workers = new Map(q.workers.map((w) => [w.worker_id, w]));
    state.counts = { completed: q.completed_jobs, failed: q.failed_jobs, cancelled: q.cancelled_jobs };
    state.teams = teams ? teams.teams : null;
    render();
  }

  function keepRecent(job) {
    if (!FINISHED.includes(job.status)) return;
    // Two answers for one job may come back in either order: a verdict is never taken back.
    const known = recent.get(job.job_id);
    recent.set(job.job_id, known && known.verdict && !job.verdict ? Object.assign({}, job, { verdict: known.verdict }) : job);
    const newest = [...recent.values()].sort((a, b) => String(b.completed_at || b.created_at).localeCompare(String(a.completed_at || a.created_at)));
    recent.clear();
    for (const kept of newest.slice(0, RECENT)) recent.set(kept.job_id, kept);
  }

  async function loadRecent() {
    try {
      const page = await api("/api/history?" + new URLSearchParams({ status: FINISHED.join(","), limit: RECENT }));
      for (const job of page.jobs) keepRecent(job);
      render();
    } catch (error) { /* the next ended job fills it */ }
  }

  async function ended(id) {
    try {
      const [job] = (await api("/api/compare?jobs=" + encodeURIComponent(id))).jobs;
      keepRecent(job);
      render();
    } catch (error) { /* gone meanwhile */ }
  }

  let pending = false;
  function render() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      draw();
    });
  }

  // The team filter: every team the page knows of; the choice is kept in the URL.
  function drawFilter() {
    const known = new Set([...(state.teams || []).map((t) => t.team), ...[...state.queued.values()].map((r) => r.team), ...[...state.running.values()].map((j) => j.team)]);
    if (state.team) known.add(state.team);
    known.delete(undefined); known.delete(null);
    const values = [["", "(all teams)"], ...[...known].sort().map((t) => [t, t])];
    const current = parts.filter.querySelector("select");
    if (current && current.options.length === values.length && values.every(([v], i) => current.options[i].value === v)) return;
    replace(parts.filter, el("label", {}, "team", el("select", { id: "team-filter", onchange: (e) => {
      state.team = e.target.value;
      const next = new URLSearchParams(location.search);
      if (state.team) next.set("team", state.team); else next.delete("team");
      history.replaceState(null, "", "/" + (next.toString() ? "?" + next : ""));
      render();
    } }, values.map(([value, text]) => el("option", { value, selected: value === state.team ? "selected" : null }, text)))));
  }

  function draw() {
    drawFilter();
    const mine = (team) => !state.team || team === state.team;
    const listed = state.queued.size;
    const size = Math.max(state.queueSize || 0, listed);
    replace(parts.stats,
      [["queued", size], ["running", state.running.size], ["workers", state.workers.size],
       ["completed", state.counts.completed || 0], ["failed", state.counts.failed || 0], ["cancelled", state.counts.cancelled || 0]]
        .map(([name, n]) => el("div", { class: "stat", "data-stat": name }, el("b", {}, String(n)), name)));

    const runningRows = [...state.running.values()].filter((info) => mine(info.team)).map((info) => {
      const p = info.progress;
      const pieces = info.shards > 1 ? `${info.shards_done || 0}/${info.shards} pieces` : "";
      return el("tr", { "data-job": info.job_id },
        el("td", {}, jobLink(info.job_id)),
        el("td", {}, info.pool || ""),
        el("td", {}, info.team || ""),
        el("td", {}, info.request ? info.request.priority : ""),
        el("td", {}, info.request ? info.request.model : ""),
        el("td", {}, info.request ? info.request.tasks.join(", ") : ""),
        el("td", {}, labelChips(info.labels)),
        el("td", {}, bar(p ? p.done : 0, p ? p.total : 0, p ? p.percent : 0),
          el("div", { class: "bar-label" }, p ? `${p.phase} ${p.done}/${p.total}` : "starting", pieces ? " · " + pieces : ""),
          info.stalled_since ? el("div", { class: "stalled", "data-stalled": info.stalled_since }, `stalled: no progress since ${info.stalled_since}`) : null),
        el("td", { class: "mono" }, info.worker || ""));
    });
    replace(parts.running, runningRows.length
      ? table(["job", "pool", "team", "priority", "model", "tasks", "labels", "progress", "worker"], runningRows, { id: "running-table" })
      : el("p", { class: "muted" }, state.running.size ? "Nothing of this team is running." : "Nothing is running."));

    // Rows in the scheduler's order, each pool's own; a job that arrived since the last
    // snapshot is drawn last in its pool, with no position until the snapshot is taken again.
    // Only a page of rows is drawn, however long the queue is.
    const perPool = new Map();
    const byPool = new Map();
    for (const item of state.queued.values()) {
      perPool.set(item.pool, (perPool.get(item.pool) || 0) + 1);
      if (!mine(item.team)) continue;
      if (!byPool.has(item.pool)) byPool.set(item.pool, []);
      byPool.get(item.pool).push(item);
    }
    const shown = [...byPool.keys()].sort().flatMap((pool) => byPool.get(pool));
    const rows = shown.slice(0, state.shown).map((item) => el("tr", item.job_id ? { "data-job": item.job_id } : { class: "anonymous" },
      el("td", { class: "num" }, item.position === undefined ? "" : String(item.position)),
      el("td", {}, item.job_id ? jobLink(item.job_id) : el("span", { class: "muted" }, "another team")),
      el("td", {}, item.pool),
      el("td", {}, item.team || ""),
      el("td", { class: "priority-" + (item.priority || "normal") }, item.priority || ""),
      el("td", { class: "waiting" }, item.position === undefined ? "" : item.waiting || "for a free worker"),
      el("td", {}, item.labels ? labelChips(item.labels) : ""),
      el("td", { class: "muted" }, item.time ? clock(item.time) : "")));
    const more = shown.length > state.shown
      ? el("div", { class: "more" }, el("button", { onclick: () => { state.shown += QUEUED_PAGE; render(); } }, `Show ${Math.min(QUEUED_PAGE, shown.length - state.shown)} more`),
        el("span", { class: "muted" }, ` ${state.shown} of ${shown.length} listed`))
      : null;
    const unlisted = size > listed ? el("p", { class: "muted" }, `The gateway lists the first ${listed} of ${size} queued jobs.`) : null;
    replace(parts.queued, shown.length
      ? [table(["#position", "job", "pool", "team", "priority", "waiting", "labels", "queued at"], rows, { id: "queued-table" }), more, unlisted]
      : el("p", { class: "muted" }, listed ? "No job of this team is queued." : "The queue is empty."));

    const recentRows = [...recent.values()].filter((job) => mine(job.team)).map(summaryRow);
    replace(parts.recent, recentRows.length
      ? table(SUMMARY_HEADERS, recentRows, { id: "recent-table" })
      : el("p", { class: "muted" }, "No job has ended yet."));

    const limit = (n, max) => max === null || max === undefined ? String(n) : `${n} / ${max}`;
    const teamRows = (state.teams || []).filter((t) => mine(t.team)).map((t) =>
      el("tr", { "data-team": t.team, "data-pool": t.pool },
        el("td", {}, t.pool),
        el("td", {}, t.team),
        el("td", { class: "num" }, fmt(t.share)),
        el("td", { class: "num" }, t.use_gpu_s.toFixed(1)),
        el("td", { class: "num" }, limit(t.running_gpus, t.max_running_gpus)),
        el("td", { class: "num" }, limit(t.queued, t.max_queued)),
        el("td", {}, t.max_priority)));
    replace(parts.teams, state.teams === null ? el("p", { class: "muted" }, "The gateway does not tell teams' use.")
      : teamRows.length ? table(["pool", "team", "#share", "#use GPU-s", "#running GPUs", "#queued", "max priority"], teamRows, { id: "teams-table" })
      : el("p", { class: "muted" }, "No team has used a pool yet."));

    const workerRows = [...state.workers.values()].sort((a, b) => a.worker_id.localeCompare(b.worker_id)).map((w) =>
      el("tr", { "data-worker": w.worker_id },
        el("td", { class: "mono" }, w.worker_id),
        el("td", {}, w.host),
        el("td", {}, w.pool),
        el("td", {}, w.gpu_count ? `${w.gpu_count} × ${(w.gpus || []).map((g) => g.name).filter((v, i, a) => a.indexOf(v) === i).join(", ")}` : "none"),
        el("td", {}, w.current_job ? jobLink(w.current_job) : el("span", { class: "muted" }, "idle")),
        el("td", { class: "heartbeat", "data-time": w.heartbeat_at }, ago(w.heartbeat_at))));
    replace(parts.workers, workerRows.length
      ? table(["worker", "host", "pool", "GPUs", "current job", "last heartbeat"], workerRows)
      : el("p", { class: "muted" }, "No worker is registered."));

    const pools = new Set([...perPool.keys(), ...[...state.workers.values()].map((w) => w.pool)]);
    replace(parts.pools, table(["pool", "#queued", "#running", "#workers"], [...pools].sort().map((pool) =>
      el("tr", {},
        el("td", {}, pool),
        el("td", { class: "num" }, String(perPool.get(pool) || 0)),
        el("td", { class: "num" }, String([...state.running.values()].filter((j) => j.pool === pool).length)),
        el("td", { class: "num" }, String([...state.workers.values()].filter((w) => w.pool === pool).length))))));
  }

  async function refreshJob(id) {
    try {
      const reply = await api("/api/jobs/" + encodeURIComponent(id));
      if (reply.job.status === "running" || reply.job.status === "cancelling") {
        state.running.set(id, reply.job);
        render();
      }
    } catch (error) { /* gone meanwhile: the terminal event removes it */ }
  }

  // Events move jobs between the tables at once; the scheduler's order, positions and reasons
  // (and the teams' use) come with the snapshot, taken again after a job is queued, starts or
  // ends: at most once a second, however many events come meanwhile.
  let reload = null;
  function reorder() {
    if (reload) return;
    reload = setTimeout(() => { reload = null; load().catch(() => { /* the next event tries again */ }); }, 1000);
  }
  await Promise.all([load(), loadRecent()]);
  // Heartbeat ages move with the clock; only the text changes, nothing is fetched.
  setInterval(() => document.querySelectorAll("td.heartbeat").forEach((td) => { td.textContent = ago(td.getAttribute("data-time")); }), 1000);
  live("/api/stream", {
    behind: () => { load(); loadRecent(); },
    worker: (w) => { state.workers.set(w.worker_id, w); render(); },
    worker_gone: (w) => { state.workers.delete(w.worker_id); render(); },
    job: (event) => {
      const id = event.job_id;
      switch (event.type) {
        case "queued":
        case "requeued": {
          const was = state.running.get(id) || {};
          state.running.delete(id);
          if (!state.queued.has(id)) state.queued.set(id, { job_id: id, pool: event.pool || was.pool || "default", team: was.team, labels: event.labels, time: event.time });
          reorder();
          break;
        }
        case "started": {
          const known = state.queued.get(id) || {};
          state.queued.delete(id);
          state.running.set(id, { job_id: id, pool: known.pool, team: known.team, labels: event.labels, worker: event.worker, shards: 1, status: "running" });
          refreshJob(id);
          reorder();
          break;
        }
        case "progress": {
          const info = state.running.get(id);
          if (info) state.running.set(id, Object.assign({}, info, { progress: event.progress, stalled_since: null }));
          else refreshJob(id);
          break;
        }
        case "stalled": {
          const info = state.running.get(id);
          if (info) state.running.set(id, Object.assign({}, info, { stalled_since: event.since }));
          else refreshJob(id);
          break;
        }
        case "shard_started":
        case "shard_completed":
        case "shard_failed":
          refreshJob(id);
          break;
        case "completed":
        case "failed":
        case "cancelled":
          reorder();
          state.queued.delete(id);
          state.running.delete(id);
          state.counts[event.type] = (state.counts[event.type] || 0) + 1;
          ended(id);
          break;
        case "gated": {
          const job = recent.get(id);
          if (job) recent.set(id, Object.assign({}, job, { verdict: event.verdict.verdict }));
          else ended(id);
          break;
        }
      }
      render();
    },
  });
}

// --- job ---------------------------------------------------------------------------------

async function jobPage(given) {
  document.title = "evalq · job " + short(given);
  let reply;
  try {
    reply = await api("/api/jobs/" + encodeURIComponent(given));
  } catch (error) {
    return failure(error);
  }
  const id = reply.job.job_id;
  const parts = {
    head: el("section", { class: "card", id: "job-head" }),
    phases: el("div", { id: "phases" }),
    pieces: el("div", { id: "pieces" }),
    timeline: el("ol", { class: "timeline", id: "timeline" }),
    metrics: el("div", { id: "metrics" }),
    gate: el("section", { class: "card", id: "gate" }),
    artifacts: el("div", { id: "artifacts" }),
    log: el("pre", { class: "log", id: "log" }),
    samples: el("div", { id: "samples" }),
  };
  replace(
    main,
    el("h1", {}, "Job ", el("span", { class: "mono", title: id }, short(id))),
    parts.head,
    el("div", { class: "grid2" },
      el("section", { class: "card" }, el("h2", {}, "Progress"), parts.phases, parts.pieces),
      el("section", { class: "card" }, el("h2", {}, "Events"), parts.timeline)),
    parts.gate,
    el("section", { class: "card" }, el("h2", {}, "Metrics"), parts.metrics),
    el("section", { class: "card" }, el("h2", {}, "Artifacts"), parts.artifacts),
    el("section", { class: "card" }, el("h2", {}, "eval.log (tail)"), parts.log),
    el("section", { class: "card" }, el("h2", {}, "Samples"), parts.samples),
  );
  const phases = new Map();
  let info = reply.job;
  let allowCancel = reply.allow_cancel;
  let turnaround = reply.turnaround;

  function drawHead() {
    const r = info.request || {};
    const fields = [
      ["id", el("span", { class: "mono" }, id)],
      ["status", el("b", { class: "status-" + info.status, id: "job-status" }, info.status)],
      ["model", r.model || ""],
      ["tasks", (r.tasks || []).join(", ")],
      r.rescore_of ? ["re-score of", el("span", { id: "job-rescore-of" }, jobLink(r.rescore_of))] : null,
      ["pool", info.pool],
      ["team", el("span", { id: "job-team" }, info.user ? `${info.team || "default"} (${info.user})` : (info.team || "default"))],
      ["priority", el("span", { id: "job-priority", class: "priority-" + (r.priority || "normal") }, r.priority || "normal")],
      info.status === "queued" ? ["waiting", el("span", { id: "job-waiting" }, info.waiting || "for a free worker")] : null,
      info.preemptions > 0 ? ["preempted", el("span", { id: "job-preemptions" }, `${info.preemptions} time${info.preemptions > 1 ? "s" : ""}: a higher priority took its worker`)] : null,
      info.verdict ? ["verdict", verdictBadge(info.verdict.verdict, { id: "job-verdict" })] : null,
      ["labels", labelChips(info.labels)],
      ["created", info.created_at || ""],
      ["started", info.started_at || ""],
      ["ended", info.completed_at || ""],
      ["worker", info.worker || ""],
      ["attempts", String(info.attempts)],
    ].filter(Boolean);
    const work = info.result && info.result.work;
    if (work) fields.push(["work", el("span", { id: "job-work" }, workText(work))]);
    if (turnaround) fields.push(["turnaround", el("span", { id: "job-turnaround", title: "from the checkpoint's save (" + turnaround.saved_at + ") to its metrics in the trackers" }, turnaroundText(turnaround))]);
    if (info.stalled_since) fields.push(["stalled", el("span", { class: "stalled" }, `no progress since ${info.stalled_since}`)]);
    if (info.error) fields.push(["error", el("span", { class: "error" }, info.error)]);
    const rows = fields.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)));
    const cancel = allowCancel && !["completed", "failed", "cancelled"].includes(info.status)
      ? el("button", { class: "danger", id: "cancel", onclick: async (e) => {
          e.target.disabled = true;
          try { await api("/api/jobs/" + encodeURIComponent(id) + "/cancel", { method: "POST", headers: { Accept: "application/json", "X-Evalq-Ui": "1" } }); }
          catch (error) { alert(String(error.message)); e.target.disabled = false; }
        } }, "Cancel job")
      : null;
    replace(parts.head, el("table", {}, rows), cancel);
  }

  // The gate's verdict and each rule's outcome; the card exists only for a job that names a gate.
  function drawGate() {
    const gate = (info.request || {}).gate;
    const verdict = info.verdict;
    parts.gate.hidden = !gate && !verdict;
    if (parts.gate.hidden) return replace(parts.gate);
    if (!verdict) {
      return replace(parts.gate, el("h2", {}, "Gate"), el("p", { class: "muted", id: "gate-pending" },
        info.status === "completed" ? `Judging under ${gate}…` : `Judged under ${gate} when the job completes.`));
    }
    const num = (v) => v === null || v === undefined ? "" : fmt(v);
    const rows = verdict.rules.map((r) => el("tr", { "data-metric": r.metric, "data-status": r.status },
      el("td", {}, r.metric), el("td", {}, r.tier), el("td", { class: "gate-status-" + r.status }, r.status),
      el("td", { class: "num" }, num(r.value)), el("td", { class: "num" }, num(r.baseline_value)),
      el("td", { class: "num" }, r.delta === null || r.delta === undefined ? "" : (r.delta > 0 ? "+" : "") + fmt(r.delta)),
      el("td", { class: "num" }, String(r.pairs)), el("td", {}, r.test || ""),
      el("td", { class: "num" }, r.p_value === null || r.p_value === undefined ? "" : r.p_value.toPrecision(3)),
      el("td", {}, r.reason)));
    replace(parts.gate,
      el("h2", {}, "Gate ", verdictBadge(verdict.verdict, { id: "gate-verdict" })),
      el("p", {}, "policy ", el("b", {}, verdict.policy), verdict.baseline ? [", baseline ", jobLink(verdict.baseline)] : ", no baseline",
        verdict.at ? el("span", { class: "muted" }, " · judged " + verdict.at) : null),
      table(["metric", "tier", "status", "#value", "#baseline", "#delta", "#pairs", "test", "#p-value", "reason"], rows, { id: "verdict-rules" }));
  }

  function drawPhases() {
    if (info.progress && !phases.has(info.progress.phase)) phases.set(info.progress.phase, info.progress);
    replace(parts.phases, phases.size
      ? [...phases.entries()].map(([phase, p]) => el("div", { class: "phase", "data-phase": phase },
          el("div", { class: "bar-label" }, `${phase}: ${p.done}/${p.total} (${p.percent.toFixed(0)}%)`), bar(p.done, p.total, p.percent)))
      : el("p", { class: "muted" }, info.status === "queued" ? `Queued${info.position_in_queue ? " at position " + info.position_in_queue : ""}.` : "No progress reported."));
    replace(parts.pieces, info.shards > 1
      ? [el("p", {}, `${info.shards_done}/${info.shards} pieces done`),
         table(["piece", "tasks", "status", "worker", "#done", "#seconds"], (info.pieces || []).map((p) => el("tr", {},
           el("td", {}, String(p.index)), el("td", {}, p.tasks.join(", ")), el("td", {}, p.status), el("td", { class: "mono" }, p.worker || ""),
           el("td", { class: "num" }, `${p.done}/${p.docs}`), el("td", { class: "num" }, p.seconds ? p.seconds.toFixed(1) : ""))))]
      : null);
  }

  function drawResult() {
    const result = info.result;
    if (!result) {
      replace(parts.metrics, el("p", { class: "muted" }, "No metrics yet."));
      replace(parts.artifacts, el("p", { class: "muted" }, "No artifacts yet."));
      return;
    }
    const rows = [];
    for (const [task, values] of Object.entries(result.metrics)) {
      for (const [metric, value] of Object.entries(values)) {
        if (metric.endsWith("_stderr") || metric.includes("_stderr,")) continue;
        const stderr = values[metric + "_stderr"];
        rows.push(el("tr", { "data-metric": task + "/" + metric },
          el("td", {}, task), el("td", {}, metric), el("td", { class: "num" }, fmt(value)),
          el("td", { class: "num muted" }, stderr === undefined || stderr === "N/A" ? "" : "± " + fmt(stderr))));
      }
    }
    replace(parts.metrics, [
      table(["task", "metric", "value", "#stderr"], rows, { id: "metrics-table" }),
      result.duration_s ? el("p", { class: "muted" }, `took ${result.duration_s.toFixed(1)} s`) : null,
    ]);
    replace(parts.artifacts, el("ul", {}, result.artifacts.map((name) => {
      const relative = name.startsWith(id + "/") ? name.slice(id.length + 1) : name;
      const href = "/api/jobs/" + encodeURIComponent(id) + "/files/" + relative.split("/").map(encodeURIComponent).join("/");
      return el("li", {}, el("a", { href, download: relative.split("/").pop() }, relative));
    })));
  }

  async function loadLog() {
    try {
      const log = await api("/api/jobs/" + encodeURIComponent(id) + "/log?lines=200");
      parts.log.textContent = log.lines.length ? log.lines.join("\n") : "(no log yet)";
      parts.log.scrollTop = parts.log.scrollHeight;
    } catch (error) {
      parts.log.textContent = String(error.message);
    }
  }

  const samplesState = { file: null, offset: 0, limit: 10 };
  async function loadSamples() {
    let page;
    try {
      const query = new URLSearchParams({ offset: samplesState.offset, limit: samplesState.limit });
      if (samplesState.file) query.set("file", samplesState.file);
      page = await api("/api/jobs/" + encodeURIComponent(id) + "/samples?" + query);
    } catch (error) {
      return replace(parts.samples, el("p", { class: "error" }, String(error.message)));
    }
    if (!page.files.length) return replace(parts.samples, el("p", { class: "muted" }, "No samples were logged."));
    samplesState.file = page.file;
    const picker = el("select", { id: "samples-file", onchange: (e) => { samplesState.file = e.target.value; samplesState.offset = 0; loadSamples(); } },
      page.files.map((name) => el("option", { value: name, selected: name === page.file ? "selected" : null }, name)));
    const last = Math.min(page.offset + page.samples.length, page.total);
    const pager = el("div", { class: "controls" }, picker,
      el("button", { id: "samples-previous", disabled: page.offset === 0 ? "disabled" : null, onclick: () => { samplesState.offset = Math.max(0, page.offset - samplesState.limit); loadSamples(); } }, "‹ previous"),
      el("span", { id: "samples-range" }, `${page.total ? page.offset + 1 : 0}-${last} of ${page.total}`),
      el("button", { id: "samples-next", disabled: last >= page.total ? "disabled" : null, onclick: () => { samplesState.offset = page.offset + samplesState.limit; loadSamples(); } }, "next ›"));
    const cards = page.samples.map((s) => el("div", { class: "sample", "data-doc": s.doc_id },
      el("div", { class: "field" }, el("b", {}, "doc"), String(s.doc_id)),
      el("div", { class: "field" }, el("b", {}, "input"), s.input),
      s.images.length ? el("div", {}, s.images.map((src) => el("img", { src, alt: "input image" }))) : null,
      el("div", { class: "field" }, el("b", {}, "output"), s.output),
      el("div", { class: "field" }, el("b", {}, "target"), s.target),
      el("div", { class: "field" }, el("b", {}, "metrics"), Object.entries(s.metrics).map(([k, v]) => `${k}=${fmt(v)}`).join("  "))));
    replace(parts.samples, pager, cards);
  }

  function startedText(event) {
    const model = event.loads_model === false ? " (no model loaded)"
      : event.weights_swapped ? ` (weights swapped in ${(event.model_load_seconds || 0).toFixed(2)} s)`
      : event.model_reused ? " (model reused)"
      : event.model_load_seconds ? ` (model loaded in ${event.model_load_seconds.toFixed(1)} s`
        + (event.model_note ? `: ${event.model_note}` : "") + ")" : "";
    const resumed = event.resumed_responses || event.resumed_scores
      ? `, resuming ${event.resumed_responses || 0} responses and ${event.resumed_scores || 0} scores` : "";
    return `started on ${event.worker || "?"}` + model + resumed;
  }

  function describe(event) {
    switch (event.type) {
      case "queued": return `queued in ${event.pool}` + (event.position_in_queue ? ` at position ${event.position_in_queue}` : "");
      case "started": return startedText(event);
      case "progress": return `${event.progress.phase}: ${event.progress.done}/${event.progress.total}`;
      case "stalled": return `stalled: no progress for ${event.seconds.toFixed(0)} s (since ${event.since})` + (event.action === "fail" ? "; its pool fails it" : "");
      case "requeued": return "requeued: " + event.reason;
      case "shard_started": return `piece ${event.shard} of ${event.shards} started on ${event.worker || "?"}`;
      case "shard_completed": return `piece ${event.shard} completed` + (event.seconds ? ` in ${event.seconds.toFixed(1)} s` : "");
      case "shard_failed": return `piece ${event.shard} failed: ${event.error}`;
      case "completed": return "completed" + (event.duration_s ? ` in ${event.duration_s.toFixed(1)} s` : "");
      case "failed": return "failed: " + event.error;
      case "cancelled": return "cancelled: " + event.reason;
      case "tracked": return "logged to " + (event.trackers || []).join(", ");
      case "gated": return `${event.verdict.verdict} under ${event.verdict.policy}`;
      default: return event.type;
    }
  }

  let lastPhase = null;
  async function refresh() {
    try {
      const again = await api("/api/jobs/" + encodeURIComponent(id));
      // An answer asked for before the `gated` event may come after it: a verdict stays.
      info = info.verdict && !again.job.verdict ? Object.assign({}, again.job, { verdict: info.verdict }) : again.job;
      turnaround = again.turnaround;
      allowCancel = again.allow_cancel;
    } catch (error) { return; }
    drawHead(); drawPhases(); drawResult(); drawGate();
  }

  drawHead(); drawPhases(); drawResult(); drawGate();
  if (info.result || ["failed", "cancelled"].includes(info.status)) { loadLog(); loadSamples(); }
  else { parts.log.textContent = "(the log is stored when the job ends)"; replace(parts.samples, el("p", { class: "muted" }, "Samples appear when the job completes.")); }

  live("/api/stream?job=" + encodeURIComponent(id), {
    job: (event) => {
      if (event.type === "progress") {
        phases.set(event.progress.phase, event.progress);
        drawPhases();
        // One line per phase in the timeline: the bars show the rest.
        if (event.progress.phase === lastPhase) return;
        lastPhase = event.progress.phase;
      }
      parts.timeline.appendChild(el("li", { "data-type": event.type }, el("span", { class: "t" }, clock(event.time)), el("b", {}, event.type), " ", describe(event)));
      parts.timeline.scrollTop = parts.timeline.scrollHeight;
      if (event.type === "gated") {
        // The event carries the verdict: it is drawn at once, the record follows.
        info = Object.assign({}, info, { verdict: event.verdict });
        drawHead(); drawGate();
      }
      if (event.type === "completed") {
        for (const [phase, p] of phases) phases.set(phase, Object.assign({}, p, { done: p.total, percent: 100 }));
      }
      if (event.type !== "progress") {
        refresh().then(() => {
          if (["completed", "failed", "cancelled"].includes(event.type)) { loadLog(); loadSamples(); }
        });
      }
    },
  });
}

// --- jobs (the history) ------------------------------------------------------------------

// Filters live in the URL; the pages already seen are a stack of cursors, so "previous" asks
// again for the page it came from.
async function jobsPage() {
  document.title = "evalq · jobs";
  const params = new URLSearchParams(location.search);
  const given = {
    status: params.get("status") || "",
    pool: params.get("pool") || "",
    team: params.get("team") || "",
    label: params.getAll("label").join(" "),
    created_after: params.get("created_after") || "",
    created_before: params.get("created_before") || "",
    limit: params.get("limit") || "50",
  };
  // datetime-local inputs hold the browser's local time without a zone; the query holds UTC.
  const local = (iso) => {
    if (!iso || Number.isNaN(Date.parse(iso))) return "";
    const d = new Date(iso);
    return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
  };
  const inputs = {
    status: el("select", { id: "jobs-status" }, [["", "(any)"], ["completed,failed,cancelled", "finished"], ...["queued", "running", "cancelling", "completed", "failed", "cancelled"].map((s) => [s, s])]
      .map(([value, text]) => el("option", { value, selected: value === given.status ? "selected" : null }, text))),
    pool: el("input", { id: "jobs-pool", size: 10, value: given.pool, placeholder: "(any)" }),
    team: el("input", { id: "jobs-team", size: 10, value: given.team, placeholder: "(any)" }),
    label: el("input", { id: "jobs-labels", size: 24, value: given.label, placeholder: "k=v k2=v2" }),
    created_after: el("input", { id: "jobs-after", type: "datetime-local", value: local(given.created_after) }),
    created_before: el("input", { id: "jobs-before", type: "datetime-local", value: local(given.created_before) }),
  };
  function apply() {
    const next = new URLSearchParams();
    for (const field of ["status", "pool", "team"]) if (inputs[field].value.trim()) next.set(field, inputs[field].value.trim());
    for (const label of inputs.label.value.split(/\s+/).filter(Boolean)) next.append("label", label);
    for (const field of ["created_after", "created_before"]) if (inputs[field].value) next.set(field, new Date(inputs[field].value).toISOString());
    if (given.limit !== "50") next.set("limit", given.limit);
    location.href = "/jobs" + (next.toString() ? "?" + next : "");
  }
  for (const input of Object.values(inputs)) input.addEventListener("keydown", (e) => { if (e.key === "Enter") apply(); });
  const controls = el("div", { class: "controls" },
    el("label", {}, "status", inputs.status), el("label", {}, "pool", inputs.pool), el("label", {}, "team", inputs.team),
    el("label", {}, "labels", inputs.label), el("label", {}, "created after", inputs.created_after),
    el("label", {}, "created before", inputs.created_before), el("button", { id: "jobs-apply", onclick: apply }, "Apply"));
  const list = el("div", { id: "jobs-list" });
  const pager = el("div", { class: "pager" });
  replace(main, el("h1", {}, "Jobs"), el("section", { class: "card" }, controls, list, pager));

  const query = new URLSearchParams();
  for (const field of ["status", "pool", "team", "created_after", "created_before", "limit"]) if (params.get(field)) query.set(field, params.get(field));
  for (const label of params.getAll("label")) query.append("label", label);
  const cursors = [null];
  async function show() {
    const cursor = cursors[cursors.length - 1];
    const asked = new URLSearchParams(query);
    if (cursor) asked.set("cursor", cursor);
    let page;
    try {
      page = await api("/api/history?" + asked);
    } catch (error) {
      replace(pager);
      return replace(list, el("p", { class: "error", id: "jobs-error" }, String(error.message)));
    }
    replace(list, page.jobs.length ? table(SUMMARY_HEADERS, page.jobs.map(summaryRow), { id: "jobs-table" })
      : el("p", { class: "muted" }, "No job matches."));
    replace(pager,
      el("button", { id: "jobs-previous", disabled: cursors.length > 1 ? null : "disabled", onclick: () => { cursors.pop(); show(); } }, "‹ previous"),
      el("span", { id: "jobs-page" }, `page ${cursors.length}`),
      el("button", { id: "jobs-next", disabled: page.next_cursor ? null : "disabled", onclick: () => { cursors.push(page.next_cursor); show(); } }, "next ›"));
  }
  await show();
}

// --- trends ------------------------------------------------------------------------------

const PALETTE = ["#2f6fdb", "#d9480f", "#2b8a3e", "#ae3ec9", "#e8590c", "#0b7285", "#c2255c", "#5c940d", "#364fc7", "#868e96"];

function isNumber(text) {
  return text !== "" && text !== null && text !== undefined && Number.isFinite(Number(text));
}

async function trendsPage() {
  document.title = "evalq · trends";
  const params = new URLSearchParams(location.search);
  const filter = params.getAll("label");
  const team = params.get("team") || "";
  const query = new URLSearchParams({ status: "completed" });
  for (const f of filter) query.append("label", f);
  if (team) query.set("team", team);
  replace(main, el("h1", {}, "Trends"), el("p", { class: "muted" }, "Loading completed jobs…"));
  let jobs;
  try {
    jobs = (await api("/api/jobs?" + query)).jobs;
  } catch (error) {
    return failure(error);
  }
  const numericKeys = new Set();
  const allKeys = new Set();
  const metrics = new Set();
  for (const job of jobs) {
    for (const [k, v] of Object.entries(job.labels)) {
      allKeys.add(k);
      if (isNumber(v)) numericKeys.add(k);
    }
    for (const [task, values] of Object.entries(job.metrics)) {
      for (const [metric, value] of Object.entries(values)) {
        if (typeof value === "number" && !metric.endsWith("_stderr")) metrics.add(task + "/" + metric);
      }
    }
  }
  const choice = {
    x: params.get("x") || (numericKeys.has("step") ? "step" : [...numericKeys][0] || ""),
    group: params.has("group") ? params.get("group") : allKeys.has("run") ? "run" : "",
    metrics: params.getAll("metric").length ? params.getAll("metric") : [...metrics].sort().slice(0, 1),
  };
  const chart = el("div", { id: "chart" });
  const note = el("p", { class: "muted", id: "chart-note" });
  const verdicts = el("div", { id: "verdicts" });

  function syncUrl() {
    const next = new URLSearchParams();
    if (choice.x) next.set("x", choice.x);
    next.set("group", choice.group);
    for (const m of choice.metrics) next.append("metric", m);
    for (const f of filter) next.append("label", f);
    if (team) next.set("team", team);
    history.replaceState(null, "", "/trends?" + next);
  }

  const select = (id, values, current, onchange, multiple) => el("select", { id, multiple: multiple ? "multiple" : null, size: multiple ? Math.min(6, Math.max(2, values.length)) : null, onchange },
    values.map(([value, text]) => el("option", { value, selected: (multiple ? current.includes(value) : current === value) ? "selected" : null }, text)));
  const controls = el("div", { class: "controls" },
    el("label", {}, "x axis (numeric label)", select("trend-x", [...numericKeys].sort().map((k) => [k, k]), choice.x, (e) => { choice.x = e.target.value; draw(); })),
    el("label", {}, "group by", select("trend-group", [["", "(none)"], ...[...allKeys].sort().map((k) => [k, k])], choice.group, (e) => { choice.group = e.target.value; draw(); })),
    el("label", {}, "task/metric", select("trend-metric", [...metrics].sort().map((m) => [m, m]), choice.metrics, (e) => { choice.metrics = [...e.target.selectedOptions].map((o) => o.value); draw(); }, true)),
    // The history is asked again for another team's jobs: the page is opened anew with it.
    el("label", {}, "team", el("input", { id: "trend-team", size: 14, value: team, placeholder: "(all teams)", onchange: (e) => {
      syncUrl();
      const next = new URLSearchParams(location.search);
      if (e.target.value.trim()) next.set("team", e.target.value.trim()); else next.delete("team");
      location.href = "/trends?" + next;
    } })),
    filter.length ? el("span", { class: "muted" }, "filtered by ", filter.map((f) => el("span", { class: "label" }, f))) : null);
  replace(main, el("h1", {}, "Trends"), el("section", { class: "card" }, controls, chart, note, verdicts));

  function draw() {
    syncUrl();
    const series = new Map();
    let points = 0;
    for (const job of jobs) {
      if (!choice.x || !isNumber(job.labels[choice.x])) continue;
      for (const key of choice.metrics) {
        const cut = key.indexOf("/");
        const task = key.slice(0, cut);
        const metric = key.slice(cut + 1);
        const values = job.metrics[task];
        if (!values || typeof values[metric] !== "number") continue;
        const group = choice.group ? job.labels[choice.group] ?? "(none)" : "";
        const name = [group, choice.metrics.length > 1 ? key : ""].filter(Boolean).join(" · ") || key;
        const stderr = values[metric + "_stderr"];
        if (!series.has(name)) series.set(name, []);
        series.get(name).push({ x: Number(job.labels[choice.x]), y: values[metric], se: typeof stderr === "number" ? stderr : 0, job });
        points++;
      }
    }
    note.textContent = `${points} points from ${jobs.length} completed jobs`;
    replace(chart, lineChart(series, choice.x, choice.metrics.join(", ")));
    const judged = jobs.filter((job) => job.verdict).sort((a, b) => String(b.completed_at).localeCompare(String(a.completed_at)));
    replace(verdicts, judged.length
      ? [el("h2", {}, "Verdicts"), table(["job", "verdict", "gate", "labels", "ended"], judged.map((job) => el("tr", { "data-job": job.job_id },
          el("td", {}, jobLink(job.job_id)), el("td", {}, verdictBadge(job.verdict)), el("td", {}, job.gate || ""),
          el("td", {}, labelChips(job.labels)), el("td", { class: "muted" }, job.completed_at ? new Date(job.completed_at).toLocaleString() : ""))), { id: "trend-verdicts" })]
      : null);
  }
  draw();
  // A job that completes while the page is open joins the chart.
  live("/api/stream", {
    job: async (event) => {
      if (event.type === "gated") {
        const known = jobs.find((j) => j.job_id === event.job_id);
        if (known) { known.verdict = event.verdict.verdict; known.gate = event.verdict.policy; draw(); }
        return;
      }
      if (event.type !== "completed" || filter.some((f) => { const [k, ...v] = f.split("="); return event.labels[k] !== v.join("="); })) return;
      try {
        const [job] = (await api("/api/compare?jobs=" + encodeURIComponent(event.job_id))).jobs;
        if (team && job.team !== team) return;
        if (!jobs.some((j) => j.job_id === job.job_id)) { jobs.push(job); draw(); }
      } catch (error) { /* the chart stays as it was */ }
    },
  });
}

function ticks(low, high, count) {
  if (low === high) return [low];
  const step = Math.pow(10, Math.floor(Math.log10((high - low) / count)));
  const err = ((high - low) / count) / step;
  const nice = step * (err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1);
  const out = [];
  for (let v = Math.ceil(low / nice) * nice; v <= high + nice * 1e-9; v += nice) out.push(Number(v.toPrecision(12)));
  return out;
}

function lineChart(series, xName, yName) {
  const width = 960, height = 420, m = { left: 64, right: 20, top: 16, bottom: 44 };
  const all = [...series.values()].flat();
  const root = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "metric against " + xName });
  if (!all.length) {
    root.appendChild(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "No completed job has this label and metric."));
    return root;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p.x)), Math.max(...all.map((p) => p.x))];
  let [y0, y1] = [Math.min(...all.map((p) => p.y - p.se)), Math.max(...all.map((p) => p.y + p.se))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const sx = (x) => m.left + ((x - x0) / (x1 - x0)) * (width - m.left - m.right);
  const sy = (y) => height - m.bottom - ((y - y0) / (y1 - y0)) * (height - m.top - m.bottom);
  for (const t of ticks(y0, y1, 6)) {
    root.appendChild(svg("line", { class: "grid", x1: m.left, x2: width - m.right, y1: sy(t), y2: sy(t) }));
    root.appendChild(svg("text", { x: m.left - 6, y: sy(t) + 4, "text-anchor": "end" }, fmt(t)));
  }
  for (const t of ticks(x0, x1, 8)) {
    root.appendChild(svg("text", { x: sx(t), y: height - m.bottom + 16, "text-anchor": "middle" }, fmt(t)));
  }
  root.appendChild(svg("line", { class: "axis", x1: m.left, x2: width - m.right, y1: height - m.bottom, y2: height - m.bottom }));
  root.appendChild(svg("line", { class: "axis", x1: m.left, x2: m.left, y1: m.top, y2: height - m.bottom }));
  root.appendChild(svg("text", { x: (width + m.left) / 2, y: height - 8, "text-anchor": "middle" }, xName));
  root.appendChild(svg("text", { x: 14, y: (height - m.bottom) / 2, transform: `rotate(-90 14 ${(height - m.bottom) / 2})`, "text-anchor": "middle" }, yName));
  const legend = el("div", { class: "legend" });
  let index = 0;
  for (const [name, points] of series) {
    const color = PALETTE[index++ % PALETTE.length];
    points.sort((a, b) => a.x - b.x);
    const group = svg("g", { class: "series", "data-series": name });
    if (points.some((p) => p.se > 0)) {
      const upper = points.map((p) => `${sx(p.x)},${sy(p.y + p.se)}`);
      const lower = points.slice().reverse().map((p) => `${sx(p.x)},${sy(p.y - p.se)}`);
      group.appendChild(svg("polygon", { class: "band", points: [...upper, ...lower].join(" "), fill: color, "fill-opacity": 0.15, stroke: "none" }));
    }
    group.appendChild(svg("polyline", { points: points.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" "), fill: "none", stroke: color, "stroke-width": 2 }));
    for (const p of points) {
      const verdict = p.job.verdict ? `, ${p.job.verdict}` : "";
      group.appendChild(svg("circle", { class: "point" + (p.job.verdict === "NO-GO" ? " no-go" : ""), cx: sx(p.x), cy: sy(p.y), r: 4.5, fill: color,
        "data-job": p.job.job_id, "data-verdict": p.job.verdict || null, onclick: () => { location.href = jobHref(p.job.job_id); } },
        svg("title", {}, `${name}: ${xName}=${p.x} → ${fmt(p.y)}${p.se ? " ± " + fmt(p.se) : ""} (job ${short(p.job.job_id)}${verdict})`)));
      if (p.job.verdict === "NO-GO") {
        // A cross over the point: a NO-GO step stands out whatever its series' colour.
        const [cx, cy, d] = [sx(p.x), sy(p.y), 8];
        group.appendChild(svg("path", { class: "no-go-mark", "data-job": p.job.job_id, d: `M${cx - d},${cy - d}L${cx + d},${cy + d}M${cx - d},${cy + d}L${cx + d},${cy - d}` }));
      }
    }
    root.appendChild(group);
    const swatch = el("i");
    swatch.style.background = color;
    legend.appendChild(el("span", {}, swatch, name));
  }
  const box = el("div", {}, legend);
  box.appendChild(root);
  return box;
}

// --- compare -----------------------------------------------------------------------------

async function comparePage() {
  document.title = "evalq · compare";
  const given = (new URLSearchParams(location.search).get("jobs") || "").split(",").map((s) => s.trim()).filter(Boolean);
  const input = el("input", { id: "compare-jobs", size: 80, placeholder: "job ids (or prefixes), separated by commas", value: given.join(",") });
  const form = el("div", { class: "controls" }, input, el("button", { onclick: () => { location.href = "/compare?jobs=" + encodeURIComponent(input.value.replace(/\s+/g, "")); } }, "Compare"));
  replace(main, el("h1", {}, "Compare"), el("section", { class: "card" }, form));
  if (given.length < 1) return main.appendChild(el("p", { class: "muted" }, "Name two or more jobs to compare them."));
  let jobs;
  try {
    jobs = (await api("/api/compare?jobs=" + encodeURIComponent(given.join(",")))).jobs;
  } catch (error) {
    return main.appendChild(el("p", { class: "error" }, String(error.message)));
  }
  const keys = [];
  for (const job of jobs) {
    for (const [task, values] of Object.entries(job.metrics)) {
      for (const [metric, value] of Object.entries(values)) {
        const key = task + "/" + metric;
        if (typeof value === "number" && !metric.endsWith("_stderr") && !keys.includes(key)) keys.push(key);
      }
    }
  }
  const base = jobs[0];
  const value = (job, key) => {
    const cut = key.indexOf("/");
    const values = job.metrics[key.slice(0, cut)];
    return values ? values[key.slice(cut + 1)] : undefined;
  };
  const head = el("tr", {}, el("th", {}, ""), jobs.map((job, i) => [
    el("th", { class: "num" }, jobLink(job.job_id), el("div", {}, job.model || ""), el("div", {}, labelChips(job.labels)), el("div", { class: "status-" + job.status }, job.status)),
    i > 0 ? el("th", { class: "num" }, "Δ") : null,
  ]));
  const rows = keys.map((key) => el("tr", { "data-metric": key }, el("td", {}, key), jobs.map((job, i) => {
    const v = value(job, key);
    const b = value(base, key);
    const cells = [el("td", { class: "num" }, v === undefined ? "—" : fmt(v))];
    if (i > 0) {
      const delta = typeof v === "number" && typeof b === "number" ? v - b : null;
      cells.push(el("td", { class: "num delta " + (delta > 0 ? "delta-pos" : delta < 0 ? "delta-neg" : ""), "data-delta": delta === null ? "" : delta },
        delta === null ? "—" : (delta > 0 ? "+" : delta < 0 ? "-" : "±") + fmt(Math.abs(delta))));
    }
    return cells;
  })));
  main.appendChild(el("section", { class: "card" }, el("table", { id: "compare-table" }, el("thead", {}, head), el("tbody", {}, rows))));
  if (jobs.length >= 2) main.appendChild(flipsCard(jobs, keys));
}

// Per-sample flips between two of the compared jobs: for a 0/1 metric of one task, the
// documents right in A and wrong in B and the reverse, each with its input, both outputs and
// the target, with McNemar's exact p-value of the discordant pairs (computed by the server).
function flipsCard(jobs, keys) {
  const params = new URLSearchParams(location.search);
  const pick = (id, current) => el("select", { id }, jobs.map((job) => el("option", { value: job.job_id, selected: job.job_id === current ? "selected" : null },
    short(job.job_id) + (job.labels && Object.keys(job.labels).length ? " " + Object.entries(job.labels).map(([k, v]) => k + "=" + v).join(" ") : ""))));
  const wanted = params.get("flips");
  const metric = wanted && keys.includes(wanted) ? wanted : keys.find((k) => /\/exact_match(,|$)/.test(k)) || keys[0] || "";
  const a = pick("flips-a", jobs[0].job_id);
  const b = pick("flips-b", jobs[1].job_id);
  const which = el("select", { id: "flips-metric" }, keys.map((k) => el("option", { value: k, selected: k === metric ? "selected" : null }, k)));
  const out = el("div", { id: "flips" });
  const side = (title, text) => el("div", {}, el("b", {}, title), text);
  const cards = (list, kind) => list.map((f) => el("div", { class: "flip", "data-doc": f.doc_id, "data-kind": kind },
    el("div", {}, el("b", {}, "doc " + f.doc_id + " · input"), f.input, f.images.map((src) => el("img", { src, alt: "input image" }))),
    side("target", f.target), side("output A", f.output_a), side("output B", f.output_b)));
  async function show() {
    if (!which.value) return replace(out, el("p", { class: "muted" }, "The jobs have no metric in common."));
    const cut = which.value.indexOf("/");
    const query = new URLSearchParams({ a: a.value, b: b.value, task: which.value.slice(0, cut), metric: which.value.slice(cut + 1) });
    const next = new URLSearchParams(location.search);
    next.set("flips", which.value);
    history.replaceState(null, "", "/compare?" + next);
    replace(out, el("p", { class: "muted" }, "Reading both jobs' samples…"));
    let f;
    try {
      f = await api("/api/compare/flips?" + query);
    } catch (error) {
      return replace(out, el("p", { class: "error", id: "flips-error" }, String(error.message)));
    }
    const more = (n, list) => n > list.length ? el("p", { class: "muted" }, `the first ${list.length} of ${n} shown`) : null;
    replace(out,
      el("p", { id: "flips-summary" }, `${f.pairs} documents scored by both: ${f.right_to_wrong} right → wrong, ${f.wrong_to_right} wrong → right, ` +
        `${f.both_right} right in both, ${f.both_wrong} wrong in both; McNemar's exact p = ${f.p_value.toPrecision(3)}`),
      el("h2", {}, `Right in A, wrong in B (${f.right_to_wrong})`), el("div", { id: "flips-lost" }, cards(f.lost, "lost")), more(f.right_to_wrong, f.lost),
      el("h2", {}, `Wrong in A, right in B (${f.wrong_to_right})`), el("div", { id: "flips-gained" }, cards(f.gained, "gained")), more(f.wrong_to_right, f.gained));
  }
  const card = el("section", { class: "card" }, el("h2", {}, "Per-sample flips"),
    el("div", { class: "controls" }, el("label", {}, "A", a), el("label", {}, "B", b), el("label", {}, "task/metric (0/1 scores)", which),
      el("button", { id: "flips-show", onclick: show }, "Show flips")),
    out);
  show();
  return card;
}

// --- routing -----------------------------------------------------------------------------

function route() {
  const path = location.pathname;
  let page;
  if (path === "/") page = queuePage();
  else if (path === "/jobs") page = jobsPage();
  else if (path.startsWith("/jobs/")) page = jobPage(decodeURIComponent(path.slice("/jobs/".length)));
  else if (path === "/trends") page = trendsPage();
  else if (path === "/compare") page = comparePage();
  else page = Promise.resolve(failure("No such page."));
  page.then(() => document.body.setAttribute("data-ready", "1"), (error) => { failure(error); document.body.setAttribute("data-ready", "1"); });
}

route();
