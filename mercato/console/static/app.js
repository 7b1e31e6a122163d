// Mercato console: one page per hash route, each drawn from one /api/* JSON answer.
"use strict";

const main = document.getElementById("main");
const fmtInt = (v) => (v == null ? "–" : Math.round(v).toLocaleString("en-US"));
const fmtNum = (v, d = 2) => (v == null || Number.isNaN(v) ? "–" : Number(v).toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: d }));
const fmtPct = (v, d = 1) => (v == null || Number.isNaN(v) ? "–" : (100 * v).toFixed(d) + "%");
const esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

class Unauthorized extends Error {}

async function api(path) {
  const resp = await fetch(path, { credentials: "same-origin" });
  if (resp.status === 401) throw new Unauthorized();
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
}

function card(title, { wide = false, id = "" } = {}) {
  const div = document.createElement("section");
  div.className = "card" + (wide ? " wide" : "");
  if (id) div.id = id;
  div.innerHTML = `<h2>${esc(title)}</h2>`;
  main.appendChild(div);
  return div;
}

function note(parent, html, cls = "muted") {
  const p = document.createElement("p");
  p.className = cls;
  p.innerHTML = html;
  parent.appendChild(p);
  return p;
}

// columns: [[header, key or function, "num"?]]
function table(parent, rows, columns, { empty = "nothing to show" } = {}) {
  if (!rows || !rows.length) return note(parent, empty);
  const t = document.createElement("table");
  t.innerHTML =
    "<thead><tr>" + columns.map(([h, , c]) => `<th class="${c || ""}">${esc(h)}</th>`).join("") + "</tr></thead>";
  const body = document.createElement("tbody");
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.innerHTML = columns
      .map(([, k, c]) => {
        const v = typeof k === "function" ? k(r) : r[k];
        return `<td class="${c || ""}">${typeof k === "function" ? v : esc(v)}</td>`;
      })
      .join("");
    body.appendChild(tr);
  }
  t.appendChild(body);
  parent.appendChild(t);
  return t;
}

function kpis(parent, pairs) {
  const div = document.createElement("div");
  div.className = "kpis";
  div.innerHTML = pairs.map(([label, value]) => `<div class="kpi"><b>${esc(value)}</b><span>${esc(label)}</span></div>`).join("");
  parent.appendChild(div);
}

function showClock(clock) {
  const c = document.getElementById("clock");
  if (!clock) return;
  c.textContent = "Now = " + clock.text;
  c.className = "clock" + (clock.source === "data" ? "" : " wall");
}

const day = (iso) => iso.slice(0, 10);

// --- pages -------------------------------------------------------------------------------

async function overview() {
  const d = await api("/api/overview");
  showClock(d.clock);
  const m = d.metrics;
  const a = card("Requests (from the services' metrics)");
  note(a, `Window: ${fmtInt(m.window_seconds)} s of samples (up to the last hour since the console started).`);
  const rpm = m.requests_per_minute || [];
  if (rpm.length) {
    Charts.line(a, {
      title: "gateway requests per minute",
      labels: rpm.map((r) => new Date(r.t * 1000).toISOString().slice(11, 19)),
      series: [{ name: "gateway requests / min", values: rpm.map((r) => r.requests) }],
    });
  } else note(a, "The request chart fills in after two scrapes.");
  table(a, m.methods, [["service", "service"], ["method", "method"], ["requests", (r) => fmtInt(r.requests), "num"], ["errors", (r) => fmtInt(r.errors), "num"], ["error share", (r) => fmtPct(r.error_share), "num"]]);

  const s = card("Answers per surface and degraded share (last hour of exposures)");
  const surf = d.traffic.surfaces || [];
  if (surf.length) {
    Charts.bars(s, {
      title: "answers per surface",
      labels: surf.map((r) => r.surface),
      series: [
        { name: "answers", values: surf.map((r) => r.answers) },
        { name: "degraded", values: surf.map((r) => r.degraded) },
      ],
    });
  }
  table(s, surf, [["surface", "surface"], ["answers", (r) => fmtInt(r.answers), "num"], ["degraded", (r) => fmtInt(r.degraded), "num"], ["degraded share", (r) => fmtPct(r.degraded_share), "num"]], { empty: "No exposures in the export yet." });

  const st = card("Latency per gateway stage");
  if (m.stages && m.stages.length) {
    Charts.bars(st, {
      title: "latency per stage (ms)",
      labels: m.stages.map((r) => r.stage),
      series: [
        { name: "p50 ms", values: m.stages.map((r) => r.p50_ms || 0) },
        { name: "p95 ms", values: m.stages.map((r) => r.p95_ms || 0) },
      ],
    });
  }
  table(st, m.stages, [["stage", "stage"], ["calls", (r) => fmtInt(r.calls), "num"], ["p50 ms", (r) => fmtNum(r.p50_ms), "num"], ["p95 ms", (r) => fmtNum(r.p95_ms), "num"]]);

  const mv = card("Model version per alias and replica");
  table(mv, m.models, [["service", "service"], ["replica", "replica"], ["model", "model"], ["alias", "alias"], ["version", "version", "num"]], { empty: "No replica reports a loaded model." });
  table(mv, (m.replicas || []).filter((r) => !r.up), [["unreachable", "service"], ["replica", "replica"], ["error", "error"]], { empty: "" });

  const runs = card("Last training runs (MLflow)", { wide: true });
  if (!d.runs.length) note(runs, "No runs in the registry.");
  for (const r of d.runs) {
    const h = document.createElement("h3");
    h.textContent = `${r.started.slice(0, 16).replace("T", " ")} · ${r.family || "run"} on ${r.dataset || "?"} · ${r.name} · ${r.status}` + (r.versions.length ? " · " + r.versions.join(", ") : "");
    runs.appendChild(h);
    if (r.eval_table.length) {
      const cols = Object.keys(r.eval_table[0]);
      table(runs, r.eval_table, cols.map((c) => [c, (row) => esc(isNaN(Number(row[c])) ? row[c] : fmtNum(Number(row[c]), 4)), isNaN(Number(r.eval_table[0][c])) ? "" : "num"]));
    } else {
      const mt = Object.entries(r.metrics).map(([k, v]) => ({ k, v }));
      table(runs, mt, [["metric", "k"], ["value", (x) => fmtNum(x.v, 4), "num"]], { empty: "no evaluation table" });
    }
  }
  const ex = card("Event export");
  note(ex, `${fmtInt(d.export.events)} events in <code>${esc(d.export.path)}</code>, written ${esc(d.export.modified.slice(0, 19).replace("T", " "))} UTC.`);
}

async function customerPage() {
  const c = card("Customer lookup", { wide: true });
  const form = document.createElement("form");
  form.className = "inline";
  const current = new URLSearchParams(location.hash.split("?")[1] || "").get("id") || "";
  form.innerHTML = `<label>customer id<input name="id" value="${esc(current)}" placeholder="e.g. U00042"></label><button type="submit">Look up</button>`;
  c.appendChild(form);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    location.hash = "customer?id=" + encodeURIComponent(form.id.value.trim());
  });
  if (!current) {
    note(c, "What the store knows about a customer next to what each surface would recommend now, with reasons, the offer decision and per-stage timings. Each lookup is a real gateway call (it is logged as an exposure).");
    return;
  }
  const d = await api("/api/customer?id=" + encodeURIComponent(current));
  showClock(d.clock);
  const p = d.profile;
  const rfm = p.rfm || {};
  const pc = card("Profile of " + current);
  const dataTime = d.clock.source === "data";
  kpis(pc, [
    ...(dataTime ? [["segment at data time", d.at_clock.segment || "–"], ["days since last purchase, data time", d.at_clock.recency_days != null ? fmtNum(d.at_clock.recency_days, 1) : "–"]] : []),
    [dataTime ? "segment (profile service, wall clock)" : "segment", p.segment || "–"],
    [dataTime ? "recency days (wall clock)" : "recency (days)", rfm.recency_days != null ? fmtNum(rfm.recency_days, 1) : "–"],
    ["orders", fmtInt(rfm.frequency || 0)],
    ["spent", fmtNum(rfm.monetary || 0)],
    ["price band", p.price_band || "–"],
    ["known", p.known ? "yes" : "no"],
  ]);
  const aff = Object.entries(p.category_affinity || {}).sort((x, y) => y[1] - x[1]).slice(0, 8);
  if (aff.length) Charts.bars(pc, { title: "category affinity", labels: aff.map((x) => x[0].split("/").pop()), series: [{ name: "affinity", values: aff.map((x) => x[1]) }] });
  const cart = (p.cart && p.cart.lines) || [];
  const h = document.createElement("h3");
  h.textContent = `Cart (${cart.length} lines, value ${fmtNum((p.cart && p.cart.value) || 0)})`;
  pc.appendChild(h);
  table(pc, cart, [["item", "item_id"], ["qty", "quantity", "num"], ["price", (r) => fmtNum(r.price), "num"]], { empty: "empty cart" });
  const h2 = document.createElement("h3");
  h2.textContent = "Recent events";
  pc.appendChild(h2);
  table(pc, (p.recent_items || []).slice(0, 12), [["item", "item_id"], ["event", (r) => esc(String(r.type).replace("EVENT_TYPE_", "").toLowerCase())], ["when", (r) => esc((r.timestamp || "").slice(0, 16).replace("T", " "))]]);

  for (const s of d.surfaces) {
    const sc = card("Would see on " + s.surface);
    note(sc, `models: ${esc(s.models.join(", ") || "none")} · degraded: ${esc(s.degraded.join(", ") || "none")} · offer: ${s.offer ? esc(s.offer.description || s.offer.offer_id) + ` (decision ${esc(s.offer.decision_id)})` : "none"}`);
    table(sc, s.items, [["#", "rank", "num"], ["item", (r) => esc(r.title || r.item_id)], ["category", "category"], ["price", (r) => fmtNum(r.price), "num"], ["stock", "stock", "num"], ["score", (r) => fmtNum(r.score, 3), "num"], ["reasons", (r) => r.reasons.map((x) => `<span class="tag">${esc(x)}</span>`).join("")]]);
    if (s.stages.length) Charts.bars(sc, { title: "debug timings per stage (ms)", labels: s.stages.map((x) => x.stage), series: [{ name: "ms", values: s.stages.map((x) => x.ms) }] });
  }
}

const itemCols = (extra) => [["item", (r) => esc(r.title || r.item_id)], ["category", (r) => esc((r.category || "").split("/").pop())], ["stock", "stock", "num"], ["7-day forecast", (r) => fmtNum(r.forecast_7d, 1), "num"], ...extra];

async function demand() {
  const d = await api("/api/demand");
  showClock(d.clock);
  const t = d.totals, bt = d.backtest;
  const a = card("Expected demand, next 7 days", { wide: true });
  kpis(a, [["units expected", fmtInt(t.forecast_units_7d)], ["items at sell-out risk", fmtInt(t.sell_out_risk)], ["out of stock with demand", fmtInt(t.out_of_stock_with_demand)], ["slow movers nobody is shown", fmtInt(t.slow_movers)], ["back-test WAPE", fmtPct(bt.errors.forecast.wape)]]);
  note(a, esc(d.method) + (d.model ? ` Model in use: ${esc(d.model)}.` : ""));

  const b = card("Back-test on the last week (held out)");
  note(b, `Forecast made at ${esc(day(bt.cutoff))} from the events before it, against units sold ${esc(day(bt.held_out[0]))} – ${esc(day(bt.held_out[1]))}. WAPE = Σ|forecast − actual| / Σ actual over items.`);
  const errs = Object.entries(bt.errors).map(([k, v]) => Object.assign({ method: k }, v));
  table(b, errs, [["method", "method"], ["WAPE", (r) => fmtPct(r.wape), "num"], ["MAE / item", (r) => fmtNum(r.mae, 2), "num"], ["bias", (r) => fmtPct(r.bias), "num"], ["forecast units", (r) => fmtInt(r.forecast_units), "num"], ["actual units", (r) => fmtInt(r.actual_units), "num"]]);
  if (bt.top_items.length) Charts.bars(b, { title: "best sellers of the held-out week: actual vs forecast", labels: bt.top_items.map((r) => r.item_id), series: [{ name: "actual", values: bt.top_items.map((r) => r.actual) }, { name: "forecast", values: bt.top_items.map((r) => r.forecast) }] });

  const f = card("Highest expected demand");
  if (d.top_forecast.length) Charts.bars(f, { title: "forecast vs stock", labels: d.top_forecast.slice(0, 12).map((r) => r.item_id), series: [{ name: "7-day forecast", values: d.top_forecast.slice(0, 12).map((r) => r.forecast_7d) }, { name: "stock", values: d.top_forecast.slice(0, 12).map((r) => r.stock) }] });
  table(f, d.top_forecast, itemCols([["trend", (r) => fmtNum(r.trend_7d, 1), "num"], ["model", (r) => fmtNum(r.model_7d, 1), "num"], ["sold 28 d", "sold_28d", "num"]]));

  const s = card("Likely to sell out within 7 days");
  table(s, d.sell_out, itemCols([["days of cover", (r) => fmtNum(r.days_of_cover, 1), "num"], ["sold 28 d", "sold_28d", "num"]]), { empty: "No item is expected to sell out this week." });
  const o = card("Out of stock with demand (lost)");
  table(o, d.out_of_stock, itemCols([["lost revenue / 7 d", (r) => fmtNum(r.lost_revenue_7d), "num"], ["shown 7 d", "shown_7d", "num"]]), { empty: "No out-of-stock item has demand." });
  const r = card("Recommended while out of stock");
  table(r, d.out_of_stock_recommended, itemCols([["shown 7 d", "shown_7d", "num"]]), { empty: "No out-of-stock item was recommended in the last 7 days of exposures." });
  const sl = card("Slow movers nobody is shown");
  note(sl, "In stock, no sale in 4 weeks and in no recommendation of the last 7 days of exposures; by stock value.");
  table(sl, d.slow_movers, [["item", (x) => esc(x.title || x.item_id)], ["category", "category"], ["stock", "stock", "num"], ["price", (x) => fmtNum(x.price), "num"], ["stock value", (x) => fmtNum(x.stock * x.price), "num"]], { empty: "None." });
}

async function trends() {
  const d = await api("/api/trends");
  showClock(d.clock);
  const c = card("Units sold per week: the categories moving most", { wide: true });
  Charts.line(c, { title: "weekly units", labels: d.weeks.map((w) => day(w)), series: d.series });
  const cols = (key) => [[key, (r) => esc(r[key])], ["this week", "this_week", "num"], ["last week", "last_week", "num"], ["change", (r) => (r.change > 0 ? "+" : "") + fmtInt(r.change), "num"], ["change %", (r) => fmtPct(r.change_pct), "num"]];
  table(card("Rising categories"), d.rising_categories, cols("category"));
  table(card("Falling categories"), d.falling_categories, cols("category"));
  const trendItemCols = [["item", (r) => esc(r.title || r.item_id)], ...cols("item_id").slice(1)];
  table(card("Rising items"), d.rising_items, trendItemCols);
  table(card("Falling items"), d.falling_items, trendItemCols);
}

async function customers() {
  const d = await api("/api/customers");
  showClock(d.clock);
  const c = card("Segment sizes per week", { wide: true });
  const segs = Object.keys(d.current);
  Charts.bars(c, { title: "customers per segment", stacked: true, labels: d.weeks.map((w) => day(w)), series: segs.map((s) => ({ name: s, values: d.sizes.map((x) => x[s]) })) });
  note(c, esc(d.rule));
  kpis(c, segs.map((s) => [s, fmtInt(d.current[s])]));
  const m = card("Movement in the last week");
  table(m, d.movement, [["from", "from"], ["to", "to"], ["customers", (r) => fmtInt(r.customers), "num"]], { empty: "No customer changed segment." });

  const e = card("Export a campaign audience");
  note(e, "The same selection as <code>mercato campaign</code> (its segment query against the profile service), with the console's “now”.");
  const form = document.createElement("form");
  form.className = "inline";
  form.innerHTML = `
    <label>segment<select name="segment"><option>abandoned-carts</option><option>lapsed</option><option>category-fans</option></select></label>
    <label>idle hours ≥<input name="idle_hours" value="24" size="4"></label>
    <label>idle days ≤<input name="max_idle_days" value="30" size="4"></label>
    <label>lapsed days ≥<input name="lapsed_days" value="180" size="4"></label>
    <label>category<input name="category" size="14"></label>
    <label>min affinity<input name="min_affinity" value="0.2" size="4"></label>
    <button type="submit" id="export">Export CSV</button>`;
  e.appendChild(form);
  const out = note(e, "");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams(new FormData(form)).toString();
    out.textContent = "Selecting…";
    const resp = await fetch("/api/export/audience.csv?" + q, { credentials: "same-origin" });
    if (!resp.ok) {
      out.textContent = "Export failed: " + ((await resp.json()).error || resp.statusText);
      return;
    }
    const blob = await resp.blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = (resp.headers.get("content-disposition") || "").split('filename="')[1]?.replace('"', "") || "audience.csv";
    a.textContent = `Download ${a.download}`;
    out.innerHTML = `${fmtInt(Number(resp.headers.get("x-audience-size")))} customers (${esc(resp.headers.get("x-audience-clock"))}). `;
    out.appendChild(a);
    out.id = "export-result";
  });
}

async function offers() {
  const d = await api("/api/offers");
  showClock(d.clock);
  const o = card("Offers: spend, redemptions and incremental margin against budget", { wide: true });
  if (d.window) note(o, `Last ${d.days} days of exposures (${esc(day(d.window[0]))} – ${esc(day(d.window[1]))}); conversion within ${d.attribution_days} days; margin rate ${d.margin_rate}. Incremental margin = shown × (conversion − conversion without offer) × margin × order value − spend; observational (offers are targeted), the experiments below are causal.`);
  if (d.offers.length) {
    Charts.bars(o, { title: "spend and incremental margin per offer", labels: d.offers.map((r) => r.offer_id), series: [{ name: "spend", values: d.offers.map((r) => r.spend) }, { name: "incremental margin (when positive)", values: d.offers.map((r) => Math.max(0, r.incremental_margin)) }] });
    Charts.bars(o, { title: "share of the budget used", format: (v) => fmtPct(v, 2), labels: d.offers.map((r) => r.offer_id), series: [{ name: "budget used", values: d.offers.map((r) => r.budget_used || 0) }] });
  }
  table(o, d.offers, [["offer", "offer_id"], ["description", "description"], ["shown", "shown", "num"], ["redemptions", "redemptions", "num"], ["spend", (r) => fmtNum(r.spend), "num"], ["budget", (r) => fmtNum(r.budget), "num"], ["budget used", (r) => fmtPct(r.budget_used), "num"], ["conversion", (r) => fmtPct(r.conversion), "num"], ["without offer", (r) => fmtPct(r.conversion_no_offer), "num"], ["incremental margin", (r) => fmtNum(r.incremental_margin), "num"]]);

  const e = card("Experiments (same computation as mercato report ab)", { wide: true });
  note(e, `Attribution window ${fmtInt(d.ab_window_seconds)} s; 95% intervals (Wilson for rates, delta method per customer for revenue).`);
  const byExp = {};
  for (const r of d.experiments) (byExp[r.experiment] = byExp[r.experiment] || []).push(r);
  if (!d.experiments.length) note(e, "No exposure carries an experiment assignment.");
  for (const [name, arms] of Object.entries(byExp)) {
    const h = document.createElement("h3");
    h.textContent = name;
    e.appendChild(h);
    Charts.intervals(e, { title: name + " conversion", format: (v) => fmtPct(v), rows: arms.map((a) => ({ label: a.variant + " conversion", value: a.conversion_rate, low: a.conversion_low, high: a.conversion_high })) });
    Charts.intervals(e, { title: name + " CTR", format: (v) => fmtPct(v), rows: arms.map((a) => ({ label: a.variant + " CTR", value: a.ctr, low: a.ctr_low, high: a.ctr_high })) });
    table(e, arms, [["variant", "variant"], ["exposures", (r) => fmtInt(r.exposures), "num"], ["customers", (r) => fmtInt(r.customers), "num"], ["CTR", (r) => `${fmtPct(r.ctr)} [${fmtPct(r.ctr_low)}, ${fmtPct(r.ctr_high)}]`, "num"], ["add-to-cart", (r) => `${fmtPct(r.add_to_cart_rate)} [${fmtPct(r.add_to_cart_low)}, ${fmtPct(r.add_to_cart_high)}]`, "num"], ["conversion", (r) => `${fmtPct(r.conversion_rate)} [${fmtPct(r.conversion_low)}, ${fmtPct(r.conversion_high)}]`, "num"], ["revenue / exposure", (r) => `${fmtNum(r.revenue_per_exposure)} [${fmtNum(r.revenue_per_exposure_low)}, ${fmtNum(r.revenue_per_exposure_high)}]`, "num"]]);
  }
}

// --- routing and sign-in --------------------------------------------------------------

const PAGES = { overview, customer: customerPage, demand, trends, customers, offers };

function showLogin() {
  main.innerHTML = "";
  document.getElementById("clock").textContent = "";
  main.appendChild(document.getElementById("login-tpl").content.cloneNode(true));
  document.getElementById("login").addEventListener("submit", async (e) => {
    e.preventDefault();
    const resp = await fetch("/api/login", { method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" }, body: JSON.stringify({ key: document.getElementById("key").value }) });
    if (resp.ok) route();
    else document.getElementById("login-error").textContent = "That key is not valid.";
  });
}

async function route() {
  const name = (location.hash.slice(1) || "overview").split("?")[0];
  const page = PAGES[name] || overview;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.getAttribute("href") === "#" + name);
  main.innerHTML = "";
  main.dataset.page = name;
  main.dataset.state = "loading";
  try {
    const me = await api("/api/me");
    if (!me.operator) throw new Unauthorized();
    document.getElementById("who").textContent = "signed in as " + me.operator;
    await page();
    main.dataset.state = "ready";
  } catch (err) {
    if (err instanceof Unauthorized) {
      showLogin();
      main.dataset.state = "login";
      return;
    }
    main.innerHTML = "";
    note(card("Could not load this page"), esc(err.message), "error");
    main.dataset.state = "error";
  }
}

window.addEventListener("hashchange", route);
route();
