// TT CI admin page: polls api/state, redraws only the sections that changed, and sends actions
// with the CSRF token. No framework, no CDN: the page works offline.
"use strict";
(function () {
  const POLL_MS = 2500;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const last = {};          // section -> JSON text last drawn
  let clockSkew = 0;        // server time - browser time, ms
  let query = "";
  let timer = null;

  const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => (
    { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const num = (v) => (typeof v === "number" ? (Number.isInteger(v) ? v : v.toFixed(1)) : "0");

  function dur(s) {
    if (s === null || s === undefined || isNaN(s)) return "";
    const neg = s < 0; s = Math.abs(Math.round(s));
    const out = s < 90 ? `${s} s` : s < 5400 ? `${Math.round(s / 60)} min`
      : s < 172800 ? `${(s / 3600).toFixed(1)} h` : `${(s / 86400).toFixed(1)} d`;
    return neg ? `-${out}` : out;
  }
  const ts = (iso) => (iso ? Date.parse(iso) : NaN);
  const nowMs = () => Date.now() + clockSkew;

  function link(url, text) {
    if (!url || !/^https?:\/\//.test(url)) return esc(text);
    return `<a href="${esc(url)}" target="_blank" rel="noopener noreferrer">${esc(text)}</a>`;
  }

  function origin(o) {
    o = o || { kind: "cli" };
    const what = [o.project, o.job ? `job ${o.job}` : ""].filter(Boolean).join(" ");
    const text = what ? `${o.kind}: ${what}` : o.kind;
    const runner = o.runner ? ` <span class="muted">(${esc(o.runner)})</span>` : "";
    return `<span class="kind kind-${esc(o.kind)}">${link(o.url, text)}</span>${runner}`;
  }

  function meter(used, total) {
    used = used || 0; total = total || 0;
    return `${num(used)}/${num(total)} <meter min="0" max="${esc(total || 1)}" value="${esc(used)}"` +
      ` high="${esc(total * 0.85)}"></meter>`;
  }

  // Relative times are drawn as spans with data attributes and refreshed without a redraw.
  const since = (iso) => `<span data-since="${esc(iso)}">${dur((nowMs() - ts(iso)) / 1000)}</span>`;
  const until = (iso) => `<span data-until="${esc(iso)}">${dur((ts(iso) - nowMs()) / 1000)}</span>`;

  function hostRows(hosts) {
    return hosts.map((h) => {
      const t = h.total || {}, u = h.used || {};
      const health = h.state === "up" ? (h.drained ? "drained" : "up") : h.state;
      const btn = h.drained
        ? `<button data-action="undrain" data-host="${esc(h.id)}">Undrain</button>`
        : `<button data-action="drain" data-host="${esc(h.id)}">Drain</button>`;
      return `<tr data-host="${esc(h.id)}"><td>${esc(h.id)} <span class="muted">${esc(h.kind || "")}</span></td>` +
        `<td><span class="state state-${esc(health)}">${esc(health)}</span>` +
        `${h.error ? ` <span class="error">${esc(h.error)}</span>` : ""}</td>` +
        `<td>${h.last_seen ? since(h.last_seen) : "never"}</td>` +
        `<td title="${esc(h.accel_why || "")}">${esc(h.accel || "?")}</td><td>${esc(h.machine || "?")}</td>` +
        `<td>${meter(u.cpus, t.cpus)}</td><td>${meter(u.memory_mib, t.memory_mib)}</td>` +
        `<td>${meter(u.disk_gib, t.disk_gib)}</td><td>${esc(h.vms ?? 0)}</td>` +
        `<td>${esc(h.image_count ?? 0)}</td><td title="ready snapshot templates: VMs start warm">${esc(h.templates ?? 0)}</td>` +
        `<td>${btn}</td></tr>`;
    }).join("");
  }

  // The ENV list is a grid of divs, one block per ENV (its row and its VMs' rows), each with
  // `content-visibility: auto` so the browser lays out only what is on screen: 1,000s of VMs
  // cost what is visible. A live update replaces only the ENVs whose rows changed. Past CHUNK
  // rows, more are drawn as the operator scrolls near the end (or presses "Show more").
  const CHUNK = 2500;
  let envLimit = CHUNK;
  let lastEnvs = [];
  const cell = (html, cls) => `<span${cls ? ` class="${cls}"` : ""}>${html}</span>`;
  const errText = (e) => (e ? ` <span class="error" title="${esc(e)}">${esc(e)}</span>` : "");

  function envGroup(e) {
    const n = e.vm_count, shown = e.vms.length;
    const out = [`<div class="r env" role="row" data-env="${esc(e.name)}">` +
      cell(`<b>${esc(e.name)}</b>`) + cell(esc(e.owner)) + cell(origin(e.origin)) +
      cell(`<span class="state state-${esc(e.state)}">${esc(e.state)}</span>${errText(e.error)}`) +
      cell(esc(e.os_prefix), "muted") + cell(`${n} VM${n === 1 ? "" : "s"}`) +
      cell(since(e.created_at)) + cell(until(e.expires_at)) +
      cell((e.state === "queued" ? "" : `<button data-action="extend" data-env="${esc(e.name)}">+1 h</button> `) +
        `<button data-action="delete" data-env="${esc(e.name)}" class="danger">Delete</button>`) +
      "</div>"];
    for (const v of e.vms) {
      out.push(`<div class="r vm" role="row" data-vm="${esc(e.name)}/${esc(v.name)}">` +
        cell(esc(v.name), "indent") + cell("") + cell("") +
        cell(`<span class="state state-${esc(v.state)}">${esc(v.state)}</span>${errText(v.error)}`) +
        cell(`${esc(v.image)} <span class="muted">on ${esc(v.host)} (${esc(v.accel || "?")})</span>`) +
        cell(`${num(v.cpus)} CPU, ${esc(v.memory_mib)} MiB`) +
        cell(v.boot_s ? `boot ${num(v.boot_s)} s` : "") + cell("") + cell("") + "</div>");
    }
    if (shown < n) out.push(`<div class="r vm"><span class="indent muted wide">… ${n - shown} more VMs not listed (use the filter)</span></div>`);
    return { key: e.name, rows: out.length, html: out.join("") };
  }

  function drawEnvs(envs) {
    lastEnvs = envs;
    const list = document.getElementById("envs");
    const groups = [];
    let rows = 0;
    for (const e of envs) {
      if (rows >= envLimit) break;
      const g = envGroup(e);
      rows += g.rows;
      groups.push(g);
    }
    const old = new Map([...list.querySelectorAll(":scope > .blk")].map((b) => [b.dataset.key, b]));
    let prev = list.querySelector(":scope > .head");
    for (const g of groups) {
      let blk = old.get(g.key);
      old.delete(g.key);
      if (!blk || blk.ttHtml !== g.html) {
        const fresh = document.createElement("div");
        fresh.className = "blk";
        fresh.setAttribute("role", "rowgroup");
        fresh.dataset.key = g.key;
        fresh.innerHTML = g.html;
        fresh.ttHtml = g.html;
        if (blk) blk.replaceWith(fresh);
        blk = fresh;
      }
      if (prev.nextElementSibling !== blk) prev.after(blk);
      prev = blk;
    }
    for (const blk of old.values()) blk.remove();
    const more = envs.length - groups.length;
    const el = document.getElementById("env-more");
    el.hidden = more <= 0;
    el.querySelector("span").textContent = `${more} more ENVs below`;
  }

  function showMore() {
    envLimit += CHUNK;
    drawEnvs(lastEnvs);
  }

  function jobRows(jobs) {
    return jobs.map((j) => {
      const end = j.deleted_at ? ts(j.deleted_at) : nowMs();
      const result = j.result || (j.deleted_at ? "unreported" : "running");
      return `<tr data-job="${esc(j.env)}"><td>${esc(j.env)}</td><td>${origin(j.origin)}</td>` +
        `<td>${esc(j.owner)}</td><td>${esc(j.vm_count)}</td><td>${since(j.created_at)} ago</td>` +
        `<td>${dur(j.ready_s)}</td><td>${dur((end - ts(j.created_at)) / 1000)}</td>` +
        `<td><span class="result result-${esc(result)}">${esc(result)}</span></td></tr>`;
    }).join("");
  }

  // The admission queue in line order; each request's wait counts up from `since`.
  function needs(w) {
    const n = w.needs || {};
    return `${esc(w.vms)} VM${w.vms === 1 ? "" : "s"}, ${num(n.cpus)} CPU, ${esc(n.memory_mib)} MiB`;
  }

  function queueRows(queue) {
    if (!queue.length) return `<tr><td colspan="9" class="muted">nothing waits</td></tr>`;
    return queue.map((w) => `<tr data-queued="${esc(w.env)}"><td>${esc(w.position)}</td>` +
      `<td><b>${esc(w.env)}</b></td><td>${esc(w.owner)}</td><td>${esc(w.project)}</td>` +
      `<td><span class="kind kind-${esc(w.kind)}">${esc(w.kind)}</span></td><td>${needs(w)}</td>` +
      `<td class="blocked"><span class="state blocked-${esc(w.blocked_by)}">${esc(String(w.blocked_by).replace("_", " "))}</span>` +
      `${w.reserved ? ' <span class="muted">(room held)</span>' : ""} <span class="detail">${esc(w.detail)}</span></td>` +
      `<td>${since(w.since)}</td>` +
      `<td><button data-action="cancel" data-env="${esc(w.env)}" class="danger">Cancel</button></td></tr>`).join("");
  }

  const cap = (used, limit) => `${num(used)} / ${limit === null || limit === undefined ? "no cap" : num(limit)}`;

  function quotaRows(quotas) {
    if (!quotas.length) return `<tr><td colspan="6" class="muted">no quotas set: no caps, priority by origin kind 0</td></tr>`;
    return quotas.map((q) => {
      const caps = q.scope === "kind" ? ["", ""] : [cap(q.used_vms, q.vms), cap(q.used_cpus, q.cpus)];
      return `<tr data-quota="${esc(q.scope)}/${esc(q.name)}"><td>${esc(q.scope)}</td><td>${esc(q.name)}</td>` +
        `<td>${caps[0]}</td><td>${caps[1]}</td><td>${esc(q.priority ?? "")}</td>` +
        `<td><button data-action="unquota" data-scope="${esc(q.scope)}" data-name="${esc(q.name)}">Remove</button></td></tr>`;
    }).join("");
  }

  function startCell(w) {
    if (!w) return `<td class="muted">?</td>`;
    if (w.start === "warm") {
      const cold = Object.keys(w.cold || {});
      return `<td>warm${cold.length ? ` <span class="muted">(cold on ${esc(cold.join(", "))})</span>` : ""}</td>`;
    }
    return `<td>cold <span class="muted">${esc(w.why || "")}</span></td>`;
  }

  function cacheRows(caches) {
    if (!caches.length) return `<tr><td colspan="7" class="muted">no host reports cache volumes</td></tr>`;
    return caches.map((c) => `<tr><td>${esc(c.host)}</td><td>${num(c.caches)}</td>` +
      `<td>${meter(c.bytes / 2 ** 20, c.limit_bytes / 2 ** 20)} MiB</td><td>${num(c.hits)}</td>` +
      `<td>${num(c.misses)}</td><td>${num(c.commits)}</td><td>${num(c.evictions)}</td></tr>`).join("");
  }

  function imageRows(images) {
    return images.map((i) => `<tr><td>${esc(i.name)}</td><td>${esc(i.arch)}</td>` +
      `<td>${esc(i.kernel)}</td><td>${esc((i.hosts || []).join(", "))}</td>${startCell(i.warm)}</tr>`).join("");
  }

  function draw(id, data, render) {
    const text = JSON.stringify(data);
    if (last[id] === text) return;
    last[id] = text;
    const el = document.getElementById(id);
    const html = render(data);
    if (html !== undefined) (el.tBodies ? el.tBodies[0] : el).innerHTML = html;
  }

  function refreshTimes() {
    const now = nowMs();
    for (const el of document.querySelectorAll("[data-since]")) el.textContent = dur((now - ts(el.dataset.since)) / 1000);
    for (const el of document.querySelectorAll("[data-until]")) el.textContent = dur((ts(el.dataset.until) - now) / 1000);
  }

  function render(s) {
    clockSkew = ts(s.now) - Date.now();
    const byState = Object.entries(s.vms_by_state).map(([k, v]) => `${v} ${k}`).join(", ") || "0";
    document.getElementById("summary").textContent =
      `${s.counts.hosts_up}/${s.counts.hosts} hosts up · ${s.env_total} ENVs · ${s.vm_total} VMs (${byState})` +
      ` · ${s.counts.queued} queued`;
    document.getElementById("queue-note").textContent = s.queue.length ? `(${s.queue.length} waiting)` : "";
    document.getElementById("env-note").textContent = s.vm_shown < s.vm_total && !query
      ? `(${s.vm_shown} of ${s.vm_total} VMs listed)` : query ? `(filter: ${query})` : "";
    draw("hosts", s.hosts, hostRows);
    draw("queue", s.queue, queueRows);
    draw("quotas", s.quotas, quotaRows);
    draw("envs", s.envs, drawEnvs);
    draw("jobs", s.jobs, jobRows);
    draw("images", s.images, imageRows);
    draw("caches", s.caches || [], cacheRows);
    draw("plot-pool", s.plots.pool, (svg) => svg);        // SVG built by the server, text escaped
    draw("plot-latency", s.plots.latency, (svg) => svg);
    refreshTimes();
    if (!performance.getEntriesByName("tt-first-draw").length) performance.mark("tt-first-draw");
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  function say(text, kind) {
    const m = document.getElementById("message");
    m.textContent = text; m.className = `message ${kind}`; m.hidden = !text;
  }

  async function poll() {
    clearTimeout(timer);
    try {
      const r = await fetch(`api/state?q=${encodeURIComponent(query)}`, { credentials: "same-origin" });
      if (r.status === 401) { window.location.href = "login"; return; }
      if (!r.ok) throw new Error(`${r.status} ${r.statusText}`);
      const state = await r.json();
      if (!performance.getEntriesByName("tt-first-data").length) performance.mark("tt-first-data");
      render(state);
      if (document.getElementById("message").classList.contains("stale")) say("", "");
    } catch (err) {
      say(`cannot reach the scheduler (${err.message}); retrying`, "error stale");
    }
    timer = setTimeout(poll, document.hidden ? POLL_MS * 4 : POLL_MS);
  }

  async function act(url, body, what) {
    say(`${what} …`, "info");
    try {
      const r = await fetch(url, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
        body: JSON.stringify(body || {}),
      });
      const data = await r.json().catch(() => ({ error: r.statusText }));
      if (!r.ok) say(`${what} failed: ${data.error}${data.hint ? ` (${data.hint})` : ""}`, "error");
      else say(`${what}: done`, "ok");
    } catch (err) {
      say(`${what} failed: ${err.message}`, "error");
    }
    poll();
  }

  document.addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-action]");
    if (!b) return;
    const env = b.dataset.env, host = b.dataset.host;
    const e = encodeURIComponent;
    switch (b.dataset.action) {
      case "delete":
        if (window.confirm(`Delete ENV ${env} and all its VMs?`)) act(`api/envs/${e(env)}/delete`, {}, `deleting ENV ${env}`);
        break;
      case "extend":
        act(`api/envs/${e(env)}/extend`, { add: "1h" }, `extending ENV ${env} by 1 h`);
        break;
      case "cancel":
        if (window.confirm(`Take ENV ${env} out of the queue?`)) act(`api/queue/${e(env)}/cancel`, {}, `cancelling queued ENV ${env}`);
        break;
      case "unquota":
        act("api/quotas/delete", { scope: b.dataset.scope, name: b.dataset.name }, `removing the quota of ${b.dataset.scope} ${b.dataset.name}`);
        break;
      case "drain":
        act(`api/hosts/${e(host)}/drain`, { drained: true }, `draining host ${host}`);
        break;
      case "undrain":
        act(`api/hosts/${e(host)}/drain`, { drained: false }, `undraining host ${host}`);
        break;
    }
  });

  document.getElementById("quota-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    const opt = (k, parse) => (f.get(k) === "" ? null : parse(f.get(k)));
    const body = {
      scope: f.get("scope"), name: String(f.get("name")).trim(),
      vms: opt("vms", (v) => parseInt(v, 10)), cpus: opt("cpus", Number), priority: opt("priority", (v) => parseInt(v, 10)),
    };
    act("api/quotas", body, `setting the quota of ${body.scope} ${body.name}`);
  });

  document.querySelector("#env-more button").addEventListener("click", showMore);
  new IntersectionObserver((entries) => {
    if (entries.some((en) => en.isIntersecting)) showMore();
  }, { rootMargin: "400px" }).observe(document.getElementById("env-more"));

  let filterTimer = null;
  document.getElementById("filter").addEventListener("input", (ev) => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => { query = ev.target.value.trim(); poll(); }, 250);
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
  setInterval(refreshTimes, 1000);
  poll();
})();
