// Mercato console charts: plain SVG drawn from the JSON the server returns.
// No library, no network: every chart is an <svg class="chart"> with a legend.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, str, attrs) {
    const t = el("text", Object.assign({ x, y, "font-size": 11, fill: "#374151" }, attrs || {}), parent);
    t.textContent = str;
    return t;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // The width the chart's card will have once the page is laid out (cards are added one
  // by one, so the current width of a half-width card can still be the full row).
  function cardWidth(container) {
    const main = container.closest("main");
    const card = container.closest(".card");
    const total = main ? main.clientWidth - 40 : 640;
    const half = total >= 2 * 520 + 16 && !(card && card.classList.contains("wide"));
    const w = (half ? (total - 16) / 2 : total) - 32;
    return Math.max(320, Math.min(1400, Math.round(w)));
  }

  function frame(container, opts) {
    // the viewBox is as wide as the card, so that text keeps its size
    const w = opts.width || cardWidth(container);
    const h = opts.height || 240;
    const m = { l: 48, r: opts.right || 36, t: 12, b: 44 };
    const svg = el("svg", { class: "chart", viewBox: `0 0 ${w} ${h}`, width: "100%", role: "img" });
    if (opts.title) el("title", {}, svg).textContent = opts.title;
    container.appendChild(svg);
    return { svg, w, h, m, iw: w - m.l - m.r, ih: h - m.t - m.b };
  }

  function yAxis(f, lo, hi, fmt) {
    const g = el("g", {}, f.svg);
    for (let i = 0; i <= 4; i++) {
      const v = lo + ((hi - lo) * i) / 4;
      const y = f.m.t + f.ih - (f.ih * i) / 4;
      el("line", { x1: f.m.l, x2: f.m.l + f.iw, y1: y, y2: y, stroke: "#e5e7eb" }, g);
      text(g, f.m.l - 6, y + 4, fmt ? fmt(v) : short(v), { "text-anchor": "end" });
    }
  }

  function short(v) {
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    if (a >= 10 || v === 0) return Math.round(v).toString();
    return v.toFixed(a >= 1 ? 1 : 2);
  }

  function xLabels(f, labels, xOf) {
    const every = Math.max(1, Math.ceil(labels.length / 8));
    labels.forEach((lab, i) => {
      if (i % every) return;
      text(f.svg, xOf(i), f.m.t + f.ih + 16, lab, { "text-anchor": "middle" });
    });
  }

  function legend(container, names) {
    const div = document.createElement("div");
    div.className = "legend";
    names.forEach((n, i) => {
      const s = document.createElement("span");
      s.innerHTML = `<i style="background:${COLORS[i % COLORS.length]}"></i>`;
      s.appendChild(document.createTextNode(n));
      div.appendChild(s);
    });
    container.appendChild(div);
  }

  // series: [{name, values: [number]}], labels: [string]
  function line(container, { labels, series, title, format }) {
    const f = frame(container, { title });
    const hi = niceMax(Math.max(0, ...series.flatMap((s) => s.values)));
    yAxis(f, 0, hi, format);
    const n = Math.max(1, labels.length - 1);
    const xOf = (i) => f.m.l + (f.iw * i) / n;
    const yOf = (v) => f.m.t + f.ih - (f.ih * v) / hi;
    series.forEach((s, k) => {
      const d = s.values.map((v, i) => `${i ? "L" : "M"}${xOf(i).toFixed(1)},${yOf(v).toFixed(1)}`).join("");
      el("path", { d, fill: "none", stroke: COLORS[k % COLORS.length], "stroke-width": 2, class: "series" }, f.svg);
      s.values.forEach((v, i) => {
        const c = el("circle", { cx: xOf(i), cy: yOf(v), r: 3, fill: COLORS[k % COLORS.length] }, f.svg);
        el("title", {}, c).textContent = `${s.name} ${labels[i]}: ${short(v)}`;
      });
    });
    xLabels(f, labels, xOf);
    legend(container, series.map((s) => s.name));
    return f.svg;
  }

  // grouped (or stacked) bars: labels on x, one bar per series
  function bars(container, { labels, series, title, stacked, format }) {
    const f = frame(container, { title, height: 260 });
    const totals = labels.map((_, i) => series.reduce((a, s) => a + (stacked ? s.values[i] || 0 : 0), 0));
    const hi = niceMax(Math.max(0, ...(stacked ? totals : series.flatMap((s) => s.values))));
    yAxis(f, 0, hi, format);
    const slot = f.iw / Math.max(1, labels.length);
    const bw = stacked ? slot * 0.7 : (slot * 0.8) / Math.max(1, series.length);
    const base = labels.map(() => 0);
    series.forEach((s, k) => {
      s.values.forEach((v, i) => {
        const hpx = (f.ih * (v || 0)) / hi;
        const x = f.m.l + slot * i + (stacked ? slot * 0.15 : slot * 0.1 + bw * k);
        const y = f.m.t + f.ih - hpx - (stacked ? (f.ih * base[i]) / hi : 0);
        const r = el("rect", { x, y, width: Math.max(1, bw), height: Math.max(0, hpx), fill: COLORS[k % COLORS.length], class: "bar" }, f.svg);
        el("title", {}, r).textContent = `${s.name} ${labels[i]}: ${short(v || 0)}`;
        if (stacked) base[i] += v || 0;
      });
    });
    xLabels(f, labels, (i) => f.m.l + slot * i + slot / 2);
    legend(container, series.map((s) => s.name));
    return f.svg;
  }

  // rows: [{label, value, low, high}] drawn as points with interval whiskers
  function intervals(container, { rows, title, format }) {
    const f = frame(container, { title, height: 60 + rows.length * 28 });
    const lo = Math.min(0, ...rows.map((r) => r.low));
    const hi = niceMax(Math.max(...rows.map((r) => r.high), 1e-9));
    const xOf = (v) => f.m.l + 110 + ((f.iw - 110) * (v - lo)) / (hi - lo);
    for (let i = 0; i <= 4; i++) {
      const v = lo + ((hi - lo) * i) / 4;
      el("line", { x1: xOf(v), x2: xOf(v), y1: f.m.t, y2: f.m.t + f.ih, stroke: "#e5e7eb" }, f.svg);
      text(f.svg, xOf(v), f.m.t + f.ih + 16, format ? format(v) : short(v), { "text-anchor": "middle" });
    }
    const step = f.ih / Math.max(1, rows.length);
    rows.forEach((r, i) => {
      const y = f.m.t + step * (i + 0.5);
      const color = COLORS[i % COLORS.length];
      text(f.svg, f.m.l, y + 4, r.label);
      el("line", { x1: xOf(r.low), x2: xOf(r.high), y1: y, y2: y, stroke: color, "stroke-width": 2, class: "interval" }, f.svg);
      for (const v of [r.low, r.high]) el("line", { x1: xOf(v), x2: xOf(v), y1: y - 5, y2: y + 5, stroke: color, "stroke-width": 2 }, f.svg);
      const c = el("circle", { cx: xOf(r.value), cy: y, r: 4, fill: color }, f.svg);
      const fmt = format || short;
      el("title", {}, c).textContent = `${r.label}: ${fmt(r.value)} [${fmt(r.low)}, ${fmt(r.high)}]`;
    });
    return f.svg;
  }

  return { line, bars, intervals, short };
})();
