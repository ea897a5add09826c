// The sqlproxy dashboard: one WebSocket to /api/v1/stream (protocol sqlproxy.stream.v1).
// The API key is sent as the first frame ({"type": "auth"}) and kept in sessionStorage only;
// it never goes into a URL. Everything shown is written with textContent, never as HTML, since
// audit records carry user-supplied SQL.
"use strict";

(() => {
  const KEY_STORE = "sqlproxy.dashboard.key";
  const TAIL = 50; // audit records fetched from the store when a (re)subscription starts
  const MAX_ROWS = 500; // audit rows kept on the page
  const HISTORY = 90; // metrics samples in the requests/s chart
  const $ = (id) => document.getElementById(id);

  let ws = null;
  let auditSeq = 0; // the id suffix of the current audit subscription
  let auditId = null;
  let retryMs = 500;
  let retryTimer = null;
  let loggedOut = true;
  const rpsHistory = [];

  // -- small DOM helpers ---------------------------------------------------------------------
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function row(cells) {
    const tr = document.createElement("tr");
    for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
    return tr;
  }
  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }
  function num(v, digits) {
    if (v === null || v === undefined) return "–";
    return typeof v === "number" ? v.toLocaleString("en-US", { maximumFractionDigits: digits ?? 2 }) : String(v);
  }
  function time(ts) {
    // ISO timestamps: show the wall-clock part, full value in the tooltip.
    const m = /T(\d\d:\d\d:\d\d(?:\.\d{1,3})?)/.exec(ts || "");
    return m ? m[1] : ts || "";
  }
  function decisionCell(decision) {
    const td = el("td", decision, "decision");
    td.dataset.decision = decision;
    return td;
  }
  function setStatus(state, text) {
    const s = $("status");
    s.dataset.state = state;
    s.textContent = text;
  }

  // -- connection ----------------------------------------------------------------------------
  function wsUrl() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    return `${proto}//${location.host}/api/v1/stream`;
  }

  function send(frame) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(frame));
  }

  function connect() {
    const key = sessionStorage.getItem(KEY_STORE);
    if (!key) {
      showLogin("");
      return;
    }
    loggedOut = false;
    clearTimeout(retryTimer);
    setStatus("connecting", "connecting…");
    const sock = new WebSocket(wsUrl(), "sqlproxy.stream.v1");
    ws = sock;
    let authFailed = false;
    sock.onopen = () => sock.send(JSON.stringify({ type: "auth", token: key }));
    sock.onmessage = (ev) => {
      if (sock !== ws) return;
      let f;
      try {
        f = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (f.type === "error" && !f.id && (f.code === "unauthenticated" || sock.readyState !== WebSocket.OPEN)) {
        authFailed = true;
      }
      onFrame(f);
    };
    sock.onclose = (ev) => {
      if (sock !== ws) return;
      ws = null;
      if (loggedOut) return;
      if (authFailed || ev.code === 1008) {
        sessionStorage.removeItem(KEY_STORE);
        showLogin(ev.reason ? `The proxy refused the key: ${ev.reason}.` : "The proxy refused the key.");
        return;
      }
      setStatus("disconnected", `disconnected (${ev.code}); retrying…`);
      retryTimer = setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 10000);
    };
  }

  function showLogin(message) {
    $("login").hidden = false;
    $("main").hidden = true;
    $("logout").hidden = true;
    $("who").textContent = "";
    $("login-error").textContent = message;
    setStatus("disconnected", "not connected");
    $("key").focus();
  }

  function logout() {
    loggedOut = true;
    sessionStorage.removeItem(KEY_STORE);
    clearTimeout(retryTimer);
    if (ws) {
      const s = ws;
      ws = null;
      s.close(1000, "logged out");
    }
    showLogin("");
  }

  // -- frames --------------------------------------------------------------------------------
  function onFrame(f) {
    switch (f.type) {
      case "ready":
        return onReady(f);
      case "subscribed":
        if (f.id === auditId) $("audit-state").textContent = "catching up";
        return;
      case "live":
        if (f.id === auditId) {
          $("audit-state").textContent = "live";
          $("audit").dataset.live = auditId;
        }
        return;
      case "data":
        if (f.channel === "metrics") return renderMetrics(f.snapshot);
        if (f.channel === "audit" && f.id === auditId) return addAudit(f.records);
        return;
      case "error":
        if (f.id === auditId) {
          $("audit-state").textContent = `error: ${f.message}`;
        } else if (f.id === "metrics") {
          $("metrics").hidden = true;
          $("metrics-off").hidden = false;
        } else if (!f.id) {
          $("login-error").textContent = f.message;
        }
        return;
      default:
        return; // heartbeat, pong, unsubscribed
    }
  }

  function onReady(f) {
    retryMs = 500;
    setStatus("connected", "live");
    $("who").textContent = `${f.user} @ ${f.node} · audit: ${f.audit_scope}`;
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = false;
    $("login-error").textContent = "";
    const metrics = f.channels.includes("metrics");
    $("metrics").hidden = !metrics;
    $("metrics-off").hidden = metrics;
    if (metrics) send({ type: "subscribe", channel: "metrics", id: "metrics", interval_ms: 1000 });
    // Without audit_all the server only ever sends this user's records: say so in the filter.
    const own = f.audit_scope !== "all";
    const userField = $("f-user");
    userField.disabled = own;
    if (own) userField.value = f.user;
    else if (userField.dataset.own) userField.value = "";
    userField.dataset.own = own ? "1" : "";
    subscribeAudit();
  }

  // -- audit tail ----------------------------------------------------------------------------
  function currentFilters() {
    const out = {};
    for (const [name, id] of [
      ["user", "f-user"],
      ["decision", "f-decision"],
      ["table", "f-table"],
      ["kind", "f-kind"],
    ]) {
      const v = $(id).value.trim();
      if (v) out[name] = v;
    }
    return out;
  }

  function subscribeAudit() {
    if (auditId) send({ type: "unsubscribe", id: auditId });
    auditSeq += 1;
    auditId = `audit-${auditSeq}`;
    const filters = currentFilters();
    const audit = $("audit");
    audit.dataset.live = "";
    audit.dataset.filters = JSON.stringify(filters);
    fill($("audit-table").tBodies[0], []);
    $("audit-empty").hidden = false;
    $("audit-state").textContent = "subscribing";
    send({ type: "subscribe", channel: "audit", id: auditId, filters, tail: TAIL });
  }

  function addAudit(records) {
    const tbody = $("audit-table").tBodies[0];
    const rows = [];
    for (const r of records) {
      const tables = (r.relations || []).map((x) => x.table).filter(Boolean);
      const tr = row([
        el("td", r.seq, "num"),
        el("td", time(r.ts)),
        el("td", r.user ?? "(anonymous)"),
        el("td", r.door),
        decisionCell(r.decision),
        el("td", (r.statement_kinds || []).join(", ")),
        el("td", [...new Set(tables)].join(", ")),
        el("td", r.rule ?? ""),
        el("td", r.rows ?? "", "num"),
        el("td", num(r.duration_ms, 1), "num"),
        el("td", r.sql ?? (r.extra && r.extra.action) ?? "", "sql"),
      ]);
      tr.title = r.reason || r.error || "";
      tr.dataset.user = r.user ?? "";
      tr.dataset.decision = r.decision;
      tr.dataset.seq = r.seq;
      rows.push(tr);
    }
    // Newest first; records arrive oldest first.
    rows.reverse();
    tbody.prepend(...rows);
    while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
    $("audit-empty").hidden = tbody.rows.length > 0;
  }

  // -- metrics -------------------------------------------------------------------------------
  function kvList(ul, obj) {
    const items = Object.entries(obj || {}).map(([k, v]) => {
      const li = el("li");
      li.dataset.decision = k;
      li.append(el("span", k, "k"), el("span", num(v), "v"));
      return li;
    });
    ul.replaceChildren(...items);
  }

  function rankRows(pairs) {
    const max = Math.max(1, ...pairs.map((p) => p[1]));
    return pairs.map(([name, n]) => {
      const m = el("meter");
      m.min = 0;
      m.max = max;
      m.value = n;
      const td = el("td");
      td.appendChild(m);
      const tr = row([el("td", name), el("td", num(n), "num"), td]);
      tr.dataset.name = name;
      return tr;
    });
  }

  function renderMetrics(s) {
    $("rps").textContent = num(s.requests_per_s_total, 1);
    $("rate-window").textContent = num(s.rate_window_s, 0);
    kvList($("rps-by-decision"), s.requests_per_s);
    const total = Object.values(s.totals || {}).reduce((a, b) => a + b, 0);
    const totalEl = $("total");
    totalEl.textContent = num(total);
    totalEl.dataset.value = String(total);
    kvList($("totals"), s.totals);
    const lat = s.latency_ms || {};
    for (const k of ["p50", "p95", "p99", "max"]) $(`lat-${k}`).textContent = num(lat[k], 2);
    $("lat-window").textContent = num(s.window_s, 0);
    $("lat-count").textContent = num(lat.count || 0);

    $("node").textContent = s.node;
    $("pools").textContent = Object.entries(s.pools || {})
      .map(([db, p]) => `${db}: ${p.size - p.idle} busy, ${p.idle} idle of ${p.max}`)
      .join("; ");
    const a = s.audit || {};
    $("audit-seq").textContent = num(a.last_seq);
    $("audit-queue").textContent = `${num(a.queue_depth)}${a.sink_failures ? ` (${a.sink_failures} sink failures)` : ""}`;
    const st = s.stream || {};
    $("stream-conns").textContent = `${num(st.connections)} (${num(st.audit_subscribers)} audit subscriptions)`;
    const c = s.cache || {};
    const lookups = (c.hits || 0) + (c.misses || 0);
    $("cache").textContent = lookups ? `${Math.round((100 * c.hits) / lookups)}% hits of ${num(lookups)}` : "–";

    fill($("top-users").tBodies[0], rankRows(s.top_users || []));
    fill($("top-tables").tBodies[0], rankRows(s.top_tables || []));
    renderDenied(s.recent_denied || []);
    renderRateLimits(s.rate_limit);

    rpsHistory.push(s.requests_per_s_total || 0);
    while (rpsHistory.length > HISTORY) rpsHistory.shift();
    drawChart();
    $("metrics").dataset.updates = String(Number($("metrics").dataset.updates || 0) + 1);
  }

  function renderDenied(list) {
    const rows = list.map((d) => {
      const tr = row([
        el("td", time(d.ts)),
        el("td", d.user ?? "(anonymous)"),
        decisionCell(d.decision),
        el("td", d.rule ?? ""),
        el("td", d.reason ?? ""),
        el("td", d.sql ?? "", "sql"),
      ]);
      tr.dataset.user = d.user ?? "";
      tr.dataset.rule = d.rule ?? "";
      return tr;
    });
    fill($("denied").tBodies[0], rows);
    $("denied-empty").hidden = rows.length > 0;
  }

  function renderRateLimits(rl) {
    const tbody = $("rate-limits").tBodies[0];
    if (!rl) {
      $("rl-state").textContent = "unavailable";
      fill(tbody, []);
      return;
    }
    const dist = rl.distributed || {};
    $("rl-state").textContent = !rl.enabled
      ? "off"
      : dist.enabled
        ? `distributed, redis ${dist.redis}, ${dist.mode}`
        : "on, this node";
    $("rl-admitted").textContent = num(rl.admitted);
    const rej = Object.entries(rl.rejected || {});
    $("rl-rejected").textContent = rej.length ? rej.map(([k, v]) => `${k} ${num(v)}`).join(", ") : "none";
    fill(
      tbody,
      (rl.buckets || []).map((b) => {
        const m = el("meter");
        m.min = 0;
        m.max = b.local.burst || 1;
        m.low = m.max * 0.2;
        m.optimum = m.max;
        m.value = Math.max(0, b.local.tokens);
        const td = el("td");
        td.appendChild(m);
        const tr = row([
          el("td", b.level),
          el("td", b.subject ?? "(all)"),
          el("td", num(b.local.tokens, 1), "num"),
          el("td", num(b.local.burst, 0), "num"),
          el("td", num(b.local.rate, 1), "num"),
          td,
        ]);
        tr.dataset.level = b.level;
        tr.dataset.subject = b.subject ?? "";
        tr.dataset.tokens = String(b.local.tokens);
        tr.dataset.burst = String(b.local.burst);
        return tr;
      }),
    );
  }

  function drawChart() {
    const cv = $("rps-chart");
    const ctx = cv.getContext("2d");
    if (!ctx) return;
    const w = cv.width;
    const h = cv.height;
    ctx.clearRect(0, 0, w, h);
    const max = Math.max(1, ...rpsHistory);
    $("chart-span").textContent = `last ${rpsHistory.length} s`;
    $("chart-peak").textContent = `peak ${num(Math.max(0, ...rpsHistory), 1)}/s`;
    // A faint grid: the baseline and the peak line.
    ctx.strokeStyle = "#e2e8f0";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(0, h - 1.5);
    ctx.lineTo(w, h - 1.5);
    ctx.moveTo(0, 4);
    ctx.lineTo(w, 4);
    ctx.stroke();
    if (rpsHistory.length < 2) return;
    ctx.strokeStyle = "#2b6cb0";
    ctx.fillStyle = "rgba(43, 108, 176, 0.15)";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    const step = w / (HISTORY - 1);
    const x0 = w - step * (rpsHistory.length - 1);
    rpsHistory.forEach((v, i) => {
      const x = x0 + i * step;
      const y = h - 2 - (v / max) * (h - 6);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
    ctx.lineTo(w, h);
    ctx.lineTo(x0, h);
    ctx.closePath();
    ctx.fill();
  }

  // -- wiring --------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORE, key);
      $("key").value = "";
      connect();
    });
    $("logout").addEventListener("click", logout);
    $("filters").addEventListener("submit", (ev) => {
      ev.preventDefault();
      subscribeAudit();
    });
    $("clear-filters").addEventListener("click", () => {
      for (const id of ["f-user", "f-decision", "f-table", "f-kind"]) if (!$(id).disabled) $(id).value = "";
      subscribeAudit();
    });
    connect();
  });
})();
