// Drives the /dashboard page in Debian's headless Chromium with playwright-core, in step with
// tests/integration/test_dashboard_browser.py, which runs the proxy and sends the queries.
//
// Environment (nothing secret goes into a URL or argv):
//   SQLPROXY_SCENARIO     operator (default): an admin key, figures, audit tail and filters;
//                         scoped: a refused key, then a key without audit_all, then log out
//   SQLPROXY_URL          base URL of the proxy, e.g. http://127.0.0.1:PORT
//   SQLPROXY_KEY          API key of the user to log in as
//   SQLPROXY_MARK         a token the test's queries carry, to find their audit rows
//   SQLPROXY_SHOTS        directory for screenshots
//   CHROMIUM              browser binary (default /usr/bin/chromium)
//   SQLPROXY_TIMEOUT_MS   bound of every wait (default 30000); a wait that runs out is a failure
//
// Protocol with the test: this script prints one JSON object per line on stdout
// ({"event": ...}) and, where it needs the test to act, reads one line from stdin.
//   -> {"event":"ready",...}           page logged in, its channels are live
//   <- go                               the test has sent its queries (their responses came back)
//   -> {"event":"done", ...facts}       what the page showed; exit code 0
// Any failure: {"event":"failed","error":...} and exit code 1.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const BASE = need("SQLPROXY_URL");
const KEY = need("SQLPROXY_KEY");
const MARK = need("SQLPROXY_MARK");
const SHOTS = need("SQLPROXY_SHOTS");
const TIMEOUT = Number(process.env.SQLPROXY_TIMEOUT_MS || 30000);
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

function need(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
}

function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function expectLine(want) {
  const { value, done } = await lines.next();
  if (done || value.trim() !== want) throw new Error(`expected ${JSON.stringify(want)} from the test, got ${done ? "EOF" : JSON.stringify(value)}`);
}

// Audit rows of the tail as plain data.
function auditRows(page) {
  return page.$$eval("#audit-table tbody tr", (trs) =>
    trs.map((tr) => ({
      user: tr.dataset.user,
      decision: tr.dataset.decision,
      seq: Number(tr.dataset.seq),
      sql: tr.querySelector("td.sql")?.textContent ?? "",
    })),
  );
}

// Sets the filter form, applies it and waits until the new subscription is live and, when given,
// the rows satisfy `until` (a predicate source evaluated in the page on the rows).
async function applyFilters(page, filters) {
  await page.fill("#f-user", filters.user ?? "");
  await page.selectOption("#f-decision", filters.decision ?? "");
  await page.fill("#f-table", filters.table ?? "");
  await page.fill("#f-kind", filters.kind ?? "");
  const before = await page.$eval("#audit", (a) => a.dataset.live || "");
  await page.click("#apply-filters");
  await page.waitForFunction(
    (prev) => {
      const live = document.getElementById("audit").dataset.live;
      return live && live !== prev;
    },
    before,
    { timeout: TIMEOUT },
  );
}

async function waitForMarkedRows(page, mark, count) {
  await page.waitForFunction(
    ([m, n]) => [...document.querySelectorAll("#audit-table tbody td.sql")].filter((td) => td.textContent.includes(m)).length >= n,
    [mark, count],
    { timeout: TIMEOUT },
  );
}

async function main() {
  const scenario = SCENARIOS[process.env.SQLPROXY_SCENARIO || "operator"];
  if (!scenario) throw new Error(`unknown SQLPROXY_SCENARIO ${process.env.SQLPROXY_SCENARIO}`);
  const profile = mkdtempSync(join(tmpdir(), "sqlproxy-chromium-"));
  const errors = [];
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport: { width: 1400, height: 1000 },
    timeout: TIMEOUT,
  });
  try {
    ctx.setDefaultTimeout(TIMEOUT);
    const page = ctx.pages()[0] ?? (await ctx.newPage());
    page.on("console", (m) => {
      if (m.type() === "error") errors.push(`console: ${m.text()}`);
    });
    page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
    // Every request the page makes must stay on its own origin, and none may carry the key.
    const requested = [];
    page.on("request", (r) => requested.push(r.url()));
    page.on("response", (r) => {
      if (r.status() >= 400) errors.push(`HTTP ${r.status()} for ${r.url()}`);
    });

    const facts = await scenario(page);
    const origin = new URL(BASE).origin;
    facts.foreignRequests = requested.filter((u) => !u.startsWith(origin) && !u.startsWith("data:"));
    facts.keyInUrls = requested.filter((u) => u.includes(KEY)).length;
    facts.errors = errors;
    emit({ event: "done", ...facts });
  } finally {
    await ctx.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

// The operator: an admin key, live figures, the audit tail and its filters.
async function operator(page) {
  await page.goto(`${BASE}/dashboard`);
  // Log in as the page says: paste the key into the form and press Connect.
  const loginText = await page.textContent("#login");
  await page.fill("#key", KEY);
  await page.click("#connect");
  await page.waitForFunction(() => document.getElementById("status").dataset.state === "connected");
  await page.waitForFunction(() => Number(document.getElementById("metrics").dataset.updates || 0) >= 1);
  await page.waitForFunction(() => document.getElementById("audit").dataset.live === "audit-1");
  const keyInStorage = await page.evaluate(() => sessionStorage.getItem("sqlproxy.dashboard.key"));
  const keyFieldAfter = await page.inputValue("#key");
  const total0 = Number(await page.$eval("#total", (e) => e.dataset.value));
  const updates0 = Number(await page.$eval("#metrics", (e) => e.dataset.updates));
  emit({ event: "ready", total: total0 });

  await expectLine("go");

  // Live numbers: the total grows by the test's requests (3 allowed, 1 denied, and the
  // auditor's burst until one was rate limited), developer appears among the top users, the
  // denial in the denied panel, the auditor's bucket drained and its 429 counted.
  await page.waitForFunction((t0) => Number(document.getElementById("total").dataset.value) >= t0 + 5, total0);
  await page.waitForFunction(() => /user \d+/.test(document.getElementById("rl-rejected").textContent));
  await page.waitForFunction(() => !!document.querySelector('#top-users tbody tr[data-name="developer"]'));
  await page.waitForFunction(() => !!document.querySelector('#top-tables tbody tr[data-name="public.orders"]'));
  await page.waitForFunction(
    () => !!document.querySelector('#denied tbody tr[data-user="analyst"][data-rule="analyst-no-employees"]'),
  );
  await page.waitForFunction(() => !!document.querySelector('#rate-limits tbody tr[data-level="user"][data-subject="developer"]'));
  await waitForMarkedRows(page, MARK, 4);
  const total1 = Number(await page.$eval("#total", (e) => e.dataset.value));
  const updates1 = Number(await page.$eval("#metrics", (e) => e.dataset.updates));
  const facts = {
    loginDocumented: /API key/.test(loginText) && /never put in a URL/.test(loginText),
    keyInStorage: keyInStorage === KEY,
    keyFieldCleared: keyFieldAfter === "",
    total0,
    total1,
    metricsUpdates: updates1 - updates0,
    rps: await page.textContent("#rps"),
    p50: await page.textContent("#lat-p50"),
    p99: await page.textContent("#lat-p99"),
    topUsers: await page.$$eval("#top-users tbody tr", (trs) => trs.map((t) => t.dataset.name)),
    topTables: await page.$$eval("#top-tables tbody tr", (trs) => trs.map((t) => t.dataset.name)),
    denied: await page.$$eval("#denied tbody tr", (trs) => trs.map((t) => ({ user: t.dataset.user, rule: t.dataset.rule }))),
    rateLimits: await page.$$eval("#rate-limits tbody tr", (trs) => trs.map((t) => `${t.dataset.level}:${t.dataset.subject}`)),
    rateLimitRejected: await page.textContent("#rl-rejected"),
  };
  const unfiltered = await auditRows(page);
  facts.unfilteredDecisions = [...new Set(unfiltered.map((r) => r.decision))].sort();
  facts.unfilteredUsers = [...new Set(unfiltered.map((r) => r.user))].sort();
  await page.screenshot({ path: join(SHOTS, "dashboard.png"), fullPage: true });

  // The drained bucket refills on the page as the metrics stream in (rate 20/s, burst 50), so
  // the test leaves the auditor's budget as it found it.
  const bucket = '#rate-limits tbody tr[data-level="user"][data-subject="auditor"]';
  facts.auditorTokensLow = Number(await page.$eval(bucket, (t) => t.dataset.tokens));
  await page.waitForFunction(
    (sel) => {
      const t = document.querySelector(sel);
      return !!t && Number(t.dataset.tokens) >= Number(t.dataset.burst) - 0.5;
    },
    bucket,
  );
  facts.auditorRefilled = true;

  // Filter by decision: only denials remain, the analyst's marked one among them.
  await applyFilters(page, { decision: "deny" });
  await waitForMarkedRows(page, MARK, 1);
  const denied = await auditRows(page);
  facts.denyFilter = {
    rows: denied.length,
    decisions: [...new Set(denied.map((r) => r.decision))],
    marked: denied.filter((r) => r.sql.includes(MARK)).map((r) => r.user),
    filtersShown: await page.$eval("#audit", (a) => a.dataset.filters),
  };

  // Filter by user: only the developer's rows remain, the three marked ones among them.
  await applyFilters(page, { user: "developer" });
  await waitForMarkedRows(page, MARK, 3);
  const dev = await auditRows(page);
  facts.userFilter = {
    rows: dev.length,
    users: [...new Set(dev.map((r) => r.user))],
    marked: dev.filter((r) => r.sql.includes(MARK)).map((r) => r.decision),
  };
  await page.screenshot({ path: join(SHOTS, "dashboard-filtered.png"), fullPage: true });

  return facts;
}

// A user without audit_all: a wrong key first, then the right one; the page shows no metrics
// and only the user's own audit records; logging out forgets the key.
async function scoped(page) {
  await page.goto(`${BASE}/dashboard`);
  await page.fill("#key", "not-a-valid-key");
  await page.click("#connect");
  // The page forgets a refused key, then says so.
  await page.waitForFunction(() => /refused/.test(document.getElementById("login-error").textContent));
  const facts = {
    wrongKeyError: await page.textContent("#login-error"),
    wrongKeyLoginShown: await page.isVisible("#login"),
    wrongKeyForgotten: (await page.evaluate(() => sessionStorage.getItem("sqlproxy.dashboard.key"))) === null,
  };
  await page.fill("#key", KEY);
  await page.click("#connect");
  await page.waitForFunction(() => document.getElementById("status").dataset.state === "connected");
  await page.waitForFunction(() => document.getElementById("audit").dataset.live === "audit-1");
  facts.who = await page.textContent("#who");
  facts.metricsShown = await page.isVisible("#metrics");
  facts.metricsNotice = await page.isVisible("#metrics-off");
  facts.userFilter = { value: await page.inputValue("#f-user"), disabled: await page.isDisabled("#f-user") };
  emit({ event: "ready" });

  await expectLine("go");
  // The test sent another user's marked query first and this user's last: once this user's row
  // is on the page, the other's would have been too, had the page shown it.
  await waitForMarkedRows(page, MARK, 1);
  const rows = await auditRows(page);
  facts.users = [...new Set(rows.map((r) => r.user))];
  facts.marked = rows.filter((r) => r.sql.includes(MARK)).map((r) => r.user);
  await page.screenshot({ path: join(SHOTS, "dashboard-scoped.png"), fullPage: true });
  await page.click("#logout");
  await page.waitForFunction(() => !document.getElementById("login").hidden);
  facts.loggedOutForgotten = (await page.evaluate(() => sessionStorage.getItem("sqlproxy.dashboard.key"))) === null;
  facts.loggedOutStatus = await page.$eval("#status", (e) => e.dataset.state);
  return facts;
}

const SCENARIOS = { operator, scoped };

main().then(
  () => process.exit(0),
  (e) => {
    emit({ event: "failed", error: String(e && e.stack ? e.stack : e) });
    process.exit(1);
  },
);
