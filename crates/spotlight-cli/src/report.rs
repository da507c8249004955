//! `spotlight lens --html`: one self-contained HTML page (no network, no external scripts or
//! fonts; works from `file://`) with every head of every layer: an overview grid, a head view
//! with the tokens on both axes, the row of a query, the mass each key receives, the positional
//! profile and a dilution panel whose readings are generated from the numbers they state.
//!
//! Size budget: each head map is block-averaged (as the PNGs are) to at most `cells` cells a
//! side (`--html-cells`, default 160) and stored at one byte per cell on a square-root scale,
//! base64-encoded: at most 4/3·cells² bytes a head, plus about 16 bytes per displayed row or
//! column for the numbers; the tokens are stored once; the page itself is about 20 KB. A map
//! value `w` is stored as `q = round(254·sqrt(w))` (255 = no value) and read back as
//! `(q/254)²`: absolute error at most `sqrt(w)/254 + 4e-6` (≤ 0.004, finer for small weights).
//!
//! Safety: the data is embedded as JSON inside `<script type="application/json">` with `<`, `>`,
//! `&`, U+2028 and U+2029 escaped, and the page builds its DOM with `textContent` only.

use std::ops::Range;
use std::path::Path;

use anyhow::Context;

use crate::draw;

/// One head's numbers (batch entry 0 unless said).
pub struct HeadReport {
    pub head: usize,
    /// Mean over valid rows (all batch entries) of entropy / ln Lk.
    pub normalized_entropy: f64,
    /// Mean entropy (nats) over valid rows.
    pub entropy: f64,
    pub max_weight: f64,
    /// Mean over rows of the weight on key 0.
    pub first: f64,
    /// Mean over the map's rows of the weight on the previous / same / next key of the diagonal.
    pub prev: f64,
    pub same: f64,
    pub next: f64,
    /// Received mass (Lk values).
    pub received: Vec<f64>,
    pub profile: Vec<f64>,
    /// The map of `rows × Lk` (the layer's `rows`).
    pub map: Vec<f32>,
}

/// One `--prefix` (a layer).
pub struct LayerReport {
    pub name: String,
    pub lq: usize,
    pub lk: usize,
    pub rows: Range<usize>,
    pub heads: Vec<HeadReport>,
}

/// Mean over the map's rows of `P[i, diag(i) + d]` (`diag(i) = i + Lk - Lq`, the bottom-right
/// aligned diagonal) for d = -1, 0, 1; rows whose entry does not exist or is NaN are skipped.
pub fn diagonal_means(map: &[f32], rows: &Range<usize>, lq: usize, lk: usize) -> [f64; 3] {
    let mut out = [f64::NAN; 3];
    for (n, d) in [-1i64, 0, 1].into_iter().enumerate() {
        let (mut s, mut c) = (0.0f64, 0usize);
        for (r, i) in rows.clone().enumerate() {
            let j = i as i64 + lk as i64 - lq as i64 + d;
            if j < 0 || j >= lk as i64 {
                continue;
            }
            let v = map[r * lk + j as usize];
            if v.is_finite() {
                s += v as f64;
                c += 1;
            }
        }
        if c > 0 {
            out[n] = s / c as f64;
        }
    }
    out
}

/// Shares of the received mass in the first 10% of the keys, the middle and the last 10%.
pub fn shares(received: &[f64]) -> [f64; 3] {
    let n = received.len();
    let k = (n / 10).max(1).min(n / 2);
    let total: f64 = received.iter().sum();
    if total <= 0.0 || n == 0 {
        return [f64::NAN; 3];
    }
    let first: f64 = received[..k].iter().sum();
    let last: f64 = received[n - k..].iter().sum();
    [first / total, (total - first - last) / total, last / total]
}

fn round4(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!((x * 1e4).round() / 1e4)
    } else {
        serde_json::Value::Null
    }
}

/// One byte per value on a square-root scale (see the module docs), base64.
pub fn quantize(v: &[f32]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .map(|&w| {
            if w.is_finite() {
                (254.0 * (w.clamp(0.0, 1.0) as f64).sqrt()).round() as u8
            } else {
                255
            }
        })
        .collect();
    base64(&bytes)
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                s.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// JSON safe inside a `<script>` element: no `<`, `>`, `&` or line separators left raw.
pub fn script_json(v: &serde_json::Value) -> String {
    serde_json::to_string(v)
        .expect("JSON values serialise")
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

/// The report's data as JSON (what the page reads).
pub fn data(
    title: &str,
    tokens: Option<&[String]>,
    layers: &[LayerReport],
    cells: usize,
) -> serde_json::Value {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let heads: Vec<serde_json::Value> = l
                .heads
                .iter()
                .map(|h| {
                    let (v, r, c, f) = draw::downsample(&h.map, l.rows.len(), l.lk, cells);
                    let recv: Vec<serde_json::Value> = h
                        .received
                        .chunks(f)
                        .map(|b| round4(b.iter().sum()))
                        .collect();
                    let [f10, mid, l10] = shares(&h.received);
                    let _ = (r, c);
                    serde_json::json!({
                        "head": h.head, "ne": round4(h.normalized_entropy),
                        "eff": round4(h.entropy.exp()), "mw": round4(h.max_weight),
                        "first": round4(h.first), "prev": round4(h.prev), "same": round4(h.same),
                        "next": round4(h.next), "f10": round4(f10), "mid": round4(mid),
                        "l10": round4(l10), "recv": recv,
                        "prof": h.profile.iter().map(|&x| round4(x)).collect::<Vec<_>>(),
                        "map": quantize(&v),
                    })
                })
                .collect();
            let f = l.rows.len().max(l.lk).div_ceil(cells.max(1)).max(1);
            serde_json::json!({
                "name": l.name, "lq": l.lq, "lk": l.lk, "row0": l.rows.start, "row1": l.rows.end,
                "block": f, "r": l.rows.len().div_ceil(f), "c": l.lk.div_ceil(f), "heads": heads,
            })
        })
        .collect();
    serde_json::json!({"title": title, "tokens": tokens, "layers": layers})
}

/// The whole page.
pub fn html(
    title: &str,
    tokens: Option<&[String]>,
    layers: &[LayerReport],
    cells: usize,
) -> String {
    let json = script_json(&data(title, tokens, layers, cells));
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>Spotlight attention report</title><style>{CSS}</style></head><body>\n{BODY}\n\
         <script type=\"application/json\" id=\"data\">{json}</script>\n<script>{JS}</script>\n</body></html>\n"
    )
}

/// Writes the page atomically (a temporary file next to `path`, renamed; removed on failure).
pub fn write(path: &Path, page: &str) -> anyhow::Result<()> {
    let name = path.file_name().context("--html needs a file name")?;
    let tmp = path.with_file_name(format!(
        ".{}.spotlight-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let r = std::fs::write(&tmp, page).and_then(|_| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.with_context(|| format!("cannot write {}", path.display()))
}

const BODY: &str = r###"<header><h1 id="title"></h1><p id="summary"></p>
<nav id="layers" aria-label="layer"></nav></header>
<section id="notable"><h2>Notable heads and layers</h2><ul id="notable-list"></ul></section>
<section id="dilution"><h2>Dilution: how spread out is the attention?</h2>
<table id="layer-table"><thead><tr><th>layer</th><th>normalized entropy</th><th>effective keys</th><th>first 10%</th><th>middle</th><th>last 10%</th><th>reading</th></tr></thead><tbody></tbody></table>
<h3 id="heads-title"></h3>
<table id="head-table"><thead><tr><th>head</th><th>norm. entropy</th><th>eff. keys</th><th>max weight</th><th>on first token</th><th>on previous</th><th>first 10%</th><th>middle</th><th>last 10%</th><th>reading</th></tr></thead><tbody></tbody></table></section>
<section id="overview"><h2>Every head</h2><label>sort by <select id="sort">
<option value="head">head</option><option value="ne">normalized entropy (most spread first)</option>
<option value="mw">max weight (most focused first)</option><option value="first">mass on the first token</option>
<option value="prev">mass on the previous token</option></select></label><div id="grid"></div></section>
<section id="headview"><h2 id="head-title"></h2><p class="note" id="head-note"></p>
<div id="mapbox"><div id="corner"></div><div id="xlabels"></div><div id="ylabels"></div><canvas id="map"></canvas></div>
<div id="tip" hidden></div>
<div id="rowview"><h3 id="row-title">Click a query token (left of the map) to see its row.</h3><div id="rowbars"></div><p id="rowtext" class="text"></p></div>
<h3>Mass each key receives (sum over queries)</h3><p id="received" class="text"></p>
<h3>Positional profile (mass by key position, mean per row)</h3><svg id="profile" width="640" height="220"></svg></section>"###;

const CSS: &str = r###"body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:20px 0 6px}h3{font-size:14px;margin:12px 0 4px}
nav button,#grid .card{cursor:pointer}nav button{margin:2px;padding:3px 10px;border:1px solid #888;background:#f4f4f4;border-radius:3px}
nav button[aria-pressed=true]{background:#2a6;color:#fff;border-color:#2a6}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}td:last-child{text-align:left}
tr.current{background:#eef8ee}#notable-list button{all:unset;cursor:pointer;color:#14a}#notable-list button:hover{text-decoration:underline}#grid{display:flex;flex-wrap:wrap;gap:8px}
.card{border:1px solid #ccc;padding:4px;border-radius:4px;font-size:11px;width:132px}.card.current{border-color:#2a6;box-shadow:0 0 0 2px #2a6}
.card canvas{width:128px;height:128px;image-rendering:pixelated;display:block}.badge{display:inline-block;background:#eee;border-radius:3px;padding:0 3px;margin:1px}
#mapbox{display:grid;grid-template-columns:auto auto;justify-content:start;overflow:auto;max-width:100%}
#xlabels{display:flex;align-items:flex-end;height:90px;overflow:hidden}#xlabels div{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap;overflow:hidden;text-align:left}
#ylabels{display:flex;flex-direction:column;width:120px}#ylabels button{all:unset;cursor:pointer;white-space:nowrap;overflow:hidden;text-align:right;padding-right:3px}
#ylabels button:hover,#ylabels button.current{background:#ffd}#map{image-rendering:pixelated;cursor:crosshair}
#tip{position:fixed;background:#222;color:#fff;padding:3px 6px;border-radius:3px;font-size:12px;pointer-events:none;z-index:9;white-space:pre}
.text span{padding:1px 1px;margin:0 1px;border-radius:2px;line-height:1.9}.note{color:#666;font-size:12px}
.bar{display:flex;align-items:center;font-size:11px;height:14px}.bar .lab{width:120px;text-align:right;padding-right:4px;overflow:hidden;white-space:nowrap}.bar .fill{background:#e80;height:10px}.bar .val{padding-left:4px;color:#555}"###;

const JS: &str = r###""use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; };
const pct = (x) => (x == null ? "n/a" : (100 * x).toFixed(0) + "%");
const fx = (x, n) => (x == null ? "n/a" : x.toFixed(n));
const VIR = [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],[53,183,121],[109,205,89],[180,222,44],[253,231,37]];
function viridis(t) { t = Math.min(1, Math.max(0, t)); const x = t * (VIR.length - 1), i = Math.min(VIR.length - 2, Math.floor(x)), f = x - i;
  return VIR[i].map((c, k) => Math.round(c + (VIR[i + 1][k] - c) * f)); }
function decode(b64) { const s = atob(b64), out = new Float32Array(s.length);
  for (let i = 0; i < s.length; i++) { const q = s.charCodeAt(i); out[i] = q === 255 ? NaN : (q / 254) * (q / 254); } return out; }
let L = 0, H = 0, ROW = -1;
const cache = new Map();
function mapOf(l, h) { const k = l + ":" + h; if (!cache.has(k)) cache.set(k, decode(D.layers[l].heads[h].map)); return cache.get(k); }
function tok(n, i) { if (!D.tokens) return null; if (D.tokens.length === D.layers[L].lk) return D.tokens[i]; return null; }
function keyLabel(j) { const ly = D.layers[L], f = ly.block; if (f === 1) { const t = tok(ly.lk, j); return t === null ? String(j) : t; }
  return j * f + "\u2013" + (Math.min((j + 1) * f, ly.lk) - 1); }
function queryLabel(i) { const ly = D.layers[L], f = ly.block, q0 = ly.row0 + i * f;
  if (f === 1) { const j = q0 + ly.lk - ly.lq; const t = j >= 0 ? tok(ly.lk, j) : null; return t === null ? String(q0) : t; }
  return q0 + "\u2013" + (Math.min(q0 + f, ly.row1) - 1); }
function draw(canvas, v, r, c, px) { canvas.width = c * px; canvas.height = r * px; const ctx = canvas.getContext("2d");
  let hi = 1e-12; for (const x of v) if (x > hi) hi = x;
  const img = ctx.createImageData(c, r);
  for (let k = 0; k < r * c; k++) { const col = isNaN(v[k]) ? [220, 220, 220] : viridis(v[k] / hi); img.data.set([col[0], col[1], col[2], 255], 4 * k); }
  const tmp = document.createElement("canvas"); tmp.width = c; tmp.height = r; tmp.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false; ctx.drawImage(tmp, 0, 0, c * px, r * px); }
function headReading(h, lk) {
  if (h.prev != null && h.prev >= 0.3) return "Attends to the previous token: " + pct(h.prev) + " of each row's weight on average.";
  if (h.next != null && h.next >= 0.3) return "Attends to the next token: " + pct(h.next) + " of each row's weight on average.";
  if (h.first != null && h.first >= 0.3) return "Leans on the first token (" + (keyLabelRaw(0)) + "): " + pct(h.first) + " of each row's weight.";
  if (h.ne != null && h.ne >= 0.8) return "Spread thin: normalized entropy " + fx(h.ne, 2) + ", about " + fx(h.eff, 1) + " of " + lk + " keys per row.";
  return "Focused: normalized entropy " + fx(h.ne, 2) + ", mean max weight " + fx(h.mw, 2) + ".";
}
function keyLabelRaw(j) { const t = tok(D.layers[L].lk, j); return t === null ? "key " + j : "\u201c" + t + "\u201d"; }
function mean(a) { const v = a.filter((x) => x != null); return v.length ? v.reduce((s, x) => s + x, 0) / v.length : null; }
function layerStats(ly) { const m = (k) => mean(ly.heads.map((h) => h[k])); return { ne: m("ne"), eff: m("eff"), f10: m("f10"), mid: m("mid"), l10: m("l10") }; }
function layerName(l) { return D.layers[l].name || "layer " + l; }
function renderLayers() {
  const nav = $("layers"); nav.replaceChildren();
  D.layers.forEach((ly, l) => { const b = el("button", layerName(l)); b.setAttribute("aria-pressed", String(l === L)); b.onclick = () => { L = l; H = 0; ROW = -1; render(); }; nav.appendChild(b); });
  const tb = $("layer-table").tBodies[0]; tb.replaceChildren();
  D.layers.forEach((ly, l) => { const s = layerStats(ly), tr = el("tr"); if (l === L) tr.className = "current";
    const reading = "Heads spread their weight over " + fx(s.eff, 1) + " of " + ly.lk + " keys on average (normalized entropy " + fx(s.ne, 2) + "; 1 = uniform); " + pct(s.f10) + " of the mass is on the first 10% of the context, " + pct(s.l10) + " on the last 10%, " + pct(s.mid) + " in the middle.";
    for (const t of [layerName(l), fx(s.ne, 3), fx(s.eff, 1), pct(s.f10), pct(s.mid), pct(s.l10), reading]) tr.appendChild(el("td", t));
    tr.onclick = () => { L = l; H = 0; ROW = -1; render(); }; tb.appendChild(tr); });
}
function renderHeads() {
  const ly = D.layers[L]; $("heads-title").textContent = "Heads of " + layerName(L);
  const tb = $("head-table").tBodies[0]; tb.replaceChildren();
  ly.heads.forEach((h, n) => { const tr = el("tr"); if (n === H) tr.className = "current";
    for (const t of [String(h.head), fx(h.ne, 3), fx(h.eff, 1), fx(h.mw, 3), pct(h.first), pct(h.prev), pct(h.f10), pct(h.mid), pct(h.l10), headReading(h, ly.lk)]) tr.appendChild(el("td", t));
    tr.onclick = () => { H = n; ROW = -1; render(); }; tb.appendChild(tr); });
}
function renderGrid() {
  const ly = D.layers[L], key = $("sort").value, grid = $("grid"); grid.replaceChildren();
  const order = ly.heads.map((h, n) => n);
  if (key !== "head") order.sort((a, b) => (ly.heads[b][key] ?? -1) - (ly.heads[a][key] ?? -1));
  for (const n of order) { const h = ly.heads[n], card = el("div", undefined, "card" + (n === H ? " current" : "")); card.dataset.head = String(h.head);
    const cv = el("canvas"); draw(cv, mapOf(L, n), ly.r, ly.c, 1); card.appendChild(cv);
    card.appendChild(el("b", "head " + h.head + " "));
    for (const t of ["entropy " + fx(h.ne, 2), "max " + fx(h.mw, 2), "first " + pct(h.first), "prev " + pct(h.prev)]) card.appendChild(el("span", t, "badge"));
    card.onclick = () => { H = n; ROW = -1; render(); $("headview").scrollIntoView(); }; grid.appendChild(card); }
}
let PX = 12;
function renderHead() {
  const ly = D.layers[L], h = ly.heads[H], v = mapOf(L, H);
  $("head-title").textContent = layerName(L) + ", head " + h.head + ": " + headReading(h, ly.lk);
  $("head-note").textContent = "Rows are queries " + ly.row0 + "\u2013" + (ly.row1 - 1) + ", columns are keys; colour is the weight (yellow = the map's largest)." + (ly.block > 1 ? " Each cell is the mean of a " + ly.block + "\u00d7" + ly.block + " block." : "") + " Hover a cell for its weight.";
  PX = Math.max(12, Math.min(28, Math.floor(900 / Math.max(ly.r, ly.c))));
  const fs = Math.min(PX - 1, 12) + "px";
  draw($("map"), v, ly.r, ly.c, PX);
  const xl = $("xlabels"); xl.replaceChildren();
  for (let j = 0; j < ly.c; j++) { const d = el("div", keyLabel(j), "klabel"); d.style.width = PX + "px"; d.style.fontSize = fs; d.style.lineHeight = PX + "px"; xl.appendChild(d); }
  const yl = $("ylabels"); yl.replaceChildren();
  for (let i = 0; i < ly.r; i++) { const b = el("button", queryLabel(i), "qlabel" + (i === ROW ? " current" : "")); b.style.height = PX + "px"; b.style.fontSize = fs; b.style.lineHeight = PX + "px";
    b.onclick = () => { ROW = i; renderHead(); }; yl.appendChild(b); }
  const rec = $("received"); rec.replaceChildren(); let hi = 1e-12; for (const x of h.recv) if (x > hi) hi = x;
  h.recv.forEach((x, j) => { const s = el("span", keyLabel(j)); s.style.background = "rgba(230,120,0," + (x / hi).toFixed(3) + ")"; s.title = "received " + fx(x, 4); rec.appendChild(s); rec.appendChild(document.createTextNode(" ")); });
  renderRow(); renderProfile();
}
function renderRow() {
  const ly = D.layers[L], v = mapOf(L, H), bars = $("rowbars"), text = $("rowtext"); bars.replaceChildren(); text.replaceChildren();
  if (ROW < 0) { $("row-title").textContent = "Click a query token (left of the map) to see its row."; return; }
  $("row-title").textContent = "Row of query \u201c" + queryLabel(ROW) + "\u201d: weight on each key";
  const row = v.slice(ROW * ly.c, (ROW + 1) * ly.c); let hi = 1e-12; for (const x of row) if (x > hi) hi = x;
  row.forEach((x, j) => { const b = el("div", undefined, "bar"); b.appendChild(el("span", keyLabel(j), "lab")); const f = el("span", undefined, "fill"); f.style.width = (isNaN(x) ? 0 : 300 * x / hi) + "px"; b.appendChild(f); b.appendChild(el("span", isNaN(x) ? "n/a" : x.toFixed(4), "val")); bars.appendChild(b);
    const s = el("span", keyLabel(j)); s.style.background = "rgba(230,120,0," + (isNaN(x) ? 0 : x / hi).toFixed(3) + ")"; s.title = isNaN(x) ? "n/a" : x.toFixed(4); text.appendChild(s); text.appendChild(document.createTextNode(" ")); });
}
function renderProfile() {
  const ly = D.layers[L], svg = $("profile"), NS = "http://www.w3.org/2000/svg"; svg.replaceChildren();
  const W = 640, Ht = 220, m = 30; let hi = 1e-12; for (const h of ly.heads) for (const x of h.prof) if (x != null && x > hi) hi = x;
  const line = (x1, y1, x2, y2) => { const e = document.createElementNS(NS, "line"); e.setAttribute("x1", x1); e.setAttribute("y1", y1); e.setAttribute("x2", x2); e.setAttribute("y2", y2); e.setAttribute("stroke", "#999"); svg.appendChild(e); };
  line(m, Ht - m, W - 10, Ht - m); line(m, 10, m, Ht - m);
  const label = (x, y, t) => { const e = document.createElementNS(NS, "text"); e.setAttribute("x", x); e.setAttribute("y", y); e.setAttribute("font-size", "11"); e.textContent = t; svg.appendChild(e); };
  label(m, Ht - 10, "start of context"); label(W - 90, Ht - 10, "end"); label(2, 18, fx(hi, 2));
  ly.heads.forEach((h, n) => { const p = document.createElementNS(NS, "polyline");
    const pts = h.prof.map((y, k) => (m + (k + 0.5) / h.prof.length * (W - m - 10)).toFixed(1) + "," + (Ht - m - (y ?? 0) / hi * (Ht - m - 10)).toFixed(1));
    p.setAttribute("points", pts.join(" ")); p.setAttribute("fill", "none"); p.setAttribute("stroke", n === H ? "#e60" : "#ccc"); p.setAttribute("stroke-width", n === H ? "2.5" : "1");
    if (n === H) p.id = "profile-current"; svg.appendChild(p); });
  svg.appendChild(svg.querySelector("#profile-current"));
}
function renderNotable() {
  const ul = $("notable-list"); ul.replaceChildren();
  const best = (key) => { let at = null; D.layers.forEach((ly, l) => ly.heads.forEach((h, n) => { if (h[key] != null && (at === null || h[key] > D.layers[at[0]].heads[at[1]][key])) at = [l, n]; })); return at; };
  const item = (text, l, n) => { const li = el("li"), b = el("button", text); b.onclick = () => { L = l; H = n; ROW = -1; render(); $("headview").scrollIntoView(); }; li.appendChild(b); ul.appendChild(li); };
  const name = (l, n) => layerName(l) + " head " + D.layers[l].heads[n].head;
  const saved = L;
  for (const [key, what] of [["prev", "the previous token"], ["next", "the next token"], ["first", "the first token"]]) {
    const at = best(key); if (at === null) continue; L = at[0];
    const extra = key === "first" ? " (" + keyLabelRaw(0) + ")" : "";
    item("Most weight on " + what + extra + ": " + name(at[0], at[1]) + ", " + pct(D.layers[at[0]].heads[at[1]][key]) + " of each row's weight on average.", at[0], at[1]);
  }
  L = saved;
  if (D.layers.length > 1) {
    const st = D.layers.map(layerStats); let lo = 0, hi = 0;
    st.forEach((s, l) => { if (s.ne != null && s.ne < st[lo].ne) lo = l; if (s.ne != null && s.ne > st[hi].ne) hi = l; });
    item("Most spread-out layer: " + layerName(hi) + " (normalized entropy " + fx(st[hi].ne, 2) + ", about " + fx(st[hi].eff, 1) + " of " + D.layers[hi].lk + " keys per row); most concentrated: " + layerName(lo) + " (" + fx(st[lo].ne, 2) + ", about " + fx(st[lo].eff, 1) + " keys).", hi, 0);
  }
}
function render() { renderLayers(); renderNotable(); renderHeads(); renderGrid(); renderHead(); }
const map = $("map"), tip = $("tip");
map.addEventListener("mousemove", (e) => { const ly = D.layers[L], r = map.getBoundingClientRect();
  const j = Math.floor((e.clientX - r.left) / PX), i = Math.floor((e.clientY - r.top) / PX);
  if (i < 0 || j < 0 || i >= ly.r || j >= ly.c) { tip.hidden = true; return; }
  const w = mapOf(L, H)[i * ly.c + j];
  tip.textContent = "query \u201c" + queryLabel(i) + "\u201d \u2192 key \u201c" + keyLabel(j) + "\u201d\n" + (ly.block > 1 ? "mean weight " : "weight ") + (isNaN(w) ? "n/a" : w.toFixed(4));
  tip.dataset.query = String(i); tip.dataset.key = String(j);
  tip.hidden = false; tip.style.left = e.clientX + 14 + "px"; tip.style.top = e.clientY + 14 + "px"; });
map.addEventListener("mouseleave", () => { tip.hidden = true; });
$("sort").addEventListener("change", renderGrid);
const P = new URLSearchParams(location.hash.slice(1));
if (P.has("layer")) L = Math.min(D.layers.length - 1, Math.max(0, parseInt(P.get("layer"), 10) || 0));
if (P.has("head")) H = Math.min(D.layers[L].heads.length - 1, Math.max(0, parseInt(P.get("head"), 10) || 0));
if (P.has("sort")) $("sort").value = P.get("sort");
if (P.has("row")) ROW = parseInt(P.get("row"), 10);
document.title = D.title + " \u2014 Spotlight attention report";
$("title").textContent = D.title;
const ly0 = D.layers[0];
$("summary").textContent = D.layers.length + " layer(s) \u00d7 " + ly0.heads.length + " heads, " + ly0.lq + " queries \u00d7 " + ly0.lk + " keys" + (D.tokens ? ", tokens from the file" : ", no tokens in the file (indices shown)") + ". Weights are stored at one byte on a square-root scale (error \u2264 \u221aw/254).";
render();
"###;

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(lq: usize, lk: usize, heads: usize) -> LayerReport {
        let map: Vec<f32> = (0..lq * lk)
            .map(|x| ((x % lk) == (x / lk) % lk) as u8 as f32)
            .collect();
        LayerReport {
            name: "x".into(),
            lq,
            lk,
            rows: 0..lq,
            heads: (0..heads)
                .map(|h| HeadReport {
                    head: h,
                    normalized_entropy: 0.5,
                    entropy: 1.0,
                    max_weight: 1.0,
                    first: 0.1,
                    prev: 0.0,
                    same: 1.0,
                    next: 0.0,
                    received: vec![1.0; lk],
                    profile: vec![0.25; 4],
                    map: map.clone(),
                })
                .collect(),
        }
    }

    /// A 4096 x 4096 map stays within the documented budget: 20 KB of page plus, per head,
    /// 4/3 * cells^2 bytes of map and 16 bytes per displayed column of numbers, plus tokens.
    #[test]
    fn a_4096_square_map_stays_within_the_size_budget() {
        let cells = 160;
        let tokens: Vec<String> = (0..4096).map(|i| format!("tok{i}")).collect();
        let page = html("big", Some(&tokens), &[layer(4096, 4096, 2)], cells);
        let token_bytes: usize = tokens.iter().map(|t| t.len() + 3).sum();
        let budget = 20_000 + 2 * (cells * cells * 4 / 3 + 16 * cells) + token_bytes;
        assert!(
            page.len() <= budget,
            "{} bytes > budget {budget}",
            page.len()
        );
        // The map really is in there at the reduced size: blocks of 26, 158 x 158 cells.
        let d = data("big", None, &[layer(4096, 4096, 1)], cells);
        assert_eq!(d["layers"][0]["block"], 26);
        let r = d["layers"][0]["r"].as_u64().unwrap() as usize;
        let b64 = d["layers"][0]["heads"][0]["map"].as_str().unwrap().len();
        assert_eq!(b64, (r * r).div_ceil(3) * 4);
        assert!(r <= cells);
    }

    #[test]
    fn script_json_leaves_no_markup_or_line_separators() {
        let t = vec![
            "</script><script>alert(1)</script>".to_string(),
            "a\u{2028}b\u{2029}&\"'".into(),
        ];
        let s = script_json(&serde_json::json!({ "tokens": t }));
        for bad in ["<", ">", "&", "\u{2028}", "\u{2029}"] {
            assert!(!s.contains(bad), "{bad:?} left in {s}");
        }
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back["tokens"][0], t[0]);
        assert_eq!(back["tokens"][1], t[1]);
    }

    #[test]
    fn quantized_weights_come_back_within_the_stated_bound() {
        let v: Vec<f32> = (0..=1000)
            .map(|i| i as f32 / 1000.0)
            .chain([f32::NAN])
            .collect();
        let s = quantize(&v);
        // Decode as the page does.
        let bytes: Vec<u8> = {
            let a = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let idx: Vec<u32> = s
                .bytes()
                .filter(|&c| c != b'=')
                .map(|c| a.iter().position(|&x| x == c).unwrap() as u32)
                .collect();
            let mut out = Vec::new();
            for c in idx.chunks(4) {
                let n = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |n, (k, &x)| n | x << (18 - 6 * k));
                for k in 0..c.len() - 1 {
                    out.push((n >> (16 - 8 * k)) as u8);
                }
            }
            out
        };
        assert_eq!(bytes.len(), v.len());
        for (w, q) in v.iter().zip(&bytes) {
            if w.is_nan() {
                assert_eq!(*q, 255);
                continue;
            }
            let back = (*q as f64 / 254.0).powi(2);
            let bound = (*w as f64).sqrt() / 254.0 + 4e-6;
            assert!((back - *w as f64).abs() <= bound, "{w} -> {back}");
        }
    }
}
