"""GET /docs: one self-contained page that reads ./openapi.json and lists every operation,
its request fields (types, bounds, descriptions) and its answers. No script or style is
loaded from elsewhere: the page works offline. With API keys configured it asks for one.
"""

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loraxd API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
h2{margin-top:2rem;font-size:1.1rem}code,td.t{font-family:ui-monospace,monospace}
.m{display:inline-block;min-width:3.5rem;font-weight:bold}
table{border-collapse:collapse;margin:.4rem 0 1rem}td,th{border:1px solid #ccc;
padding:.15rem .5rem;text-align:left;vertical-align:top}
</style></head><body>
<h1>loraxd API</h1>
<p>The machine-readable document: <a href="openapi.json">openapi.json</a>.</p>
<div id="key" hidden><label>API key <input id="k" type="password" size="40"></label>
<button id="go">Load</button></div>
<div id="out">Loading openapi.json&hellip;</div>
<script>
"use strict";
let spec;
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",
  '"':"&quot;"})[c]);
const refName = r => r.split("/").pop();
const deref = s => (s && s.$ref) ? spec.components.schemas[refName(s.$ref)] : s;
function typeOf(s) {
  if (!s) return "";
  if (s.$ref) return refName(s.$ref);
  if (s.anyOf) return s.anyOf.map(typeOf).join(" | ");
  if (s.enum) return s.enum.map(v => JSON.stringify(v)).join(" | ");
  if (s.type === "array") return "[" + typeOf(s.items) + "]";
  let t = s.type || "any";
  const b = [];
  for (const [k, o] of [["minimum", ">="], ["exclusiveMinimum", ">"], ["maximum", "<="],
                        ["exclusiveMaximum", "<"], ["minLength", "length >="],
                        ["maxItems", "items <="]]) if (k in s) b.push(o + " " + s[k]);
  return b.length ? t + " (" + b.join(", ") + ")" : t;
}
function fields(name, seen) {
  const s = spec.components.schemas[name];
  if (!s || !s.properties || seen.has(name)) return "";
  seen.add(name);
  const req = new Set(s.required || []);
  let h = "<table><tr><th colspan=3>" + esc(name) + (s.description ? ": " +
    esc(s.description) : "") + "</th></tr>";
  const nested = [];
  for (const [f, p] of Object.entries(s.properties)) {
    h += "<tr><td class=t>" + esc(f) + (req.has(f) ? " *" : "") + "</td><td class=t>" +
      esc(typeOf(p)) + "</td><td>" + esc(deref(p).description || "") + "</td></tr>";
    JSON.stringify(p).replace(/"#\\/components\\/schemas\\/(\\w+)"/g, (_, n) => nested.push(n));
  }
  return h + "</table>" + nested.map(n => fields(n, seen)).join("");
}
function render() {
  let h = "<p>" + esc(spec.info.description) + " Version " + esc(spec.info.version) + ".</p>";
  for (const [path, ops] of Object.entries(spec.paths)) for (const [m, op] of
       Object.entries(ops)) {
    h += "<h2><span class=m>" + m.toUpperCase() + "</span> <code>" + esc(path) +
      "</code> " + esc(op.summary) + "</h2>";
    if (op.description) h += "<p>" + esc(op.description) + "</p>";
    if (op.security && op.security.length) h += "<p>Needs an API key (Bearer).</p>";
    const body = op.requestBody && op.requestBody.content["application/json"].schema;
    if (body) h += fields(refName(body.$ref), new Set());
    h += "<table><tr><th>status</th><th>when</th><th>body</th></tr>";
    for (const [st, r] of Object.entries(op.responses)) {
      const shapes = Object.entries(r.content || {}).map(([t, c]) => {
        const data = c.schema.properties && c.schema.properties.data;  // an SSE event
        const payload = data && (data.contentSchema || (data.else || {}).contentSchema);
        return esc(t) + ": " + esc(payload ? "events of " + typeOf(payload) : typeOf(c.schema));
      });
      h += "<tr><td>" + st + "</td><td>" + esc(r.description) + "</td><td>" +
        shapes.join("<br>") + "</td></tr>";
    }
    h += "</table>";
  }
  document.getElementById("out").innerHTML = h;
}
async function load(key) {
  const r = await fetch("openapi.json", key ? {headers: {Authorization: "Bearer " + key}} : {});
  if (r.status === 401) {
    document.getElementById("key").hidden = false;
    document.getElementById("out").textContent = "This server needs an API key.";
    return;
  }
  spec = await r.json();
  render();
}
document.getElementById("go").onclick = () => load(document.getElementById("k").value);
load(null);
</script></body></html>
"""
