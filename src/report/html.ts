// A self-contained report page: sections of text, Vega-Lite charts and tables, written as one
// report.html with vega, vega-lite and vega-embed inlined, so it opens offline (no CDN, no server).
// Any kind of run (a bench sweep, a convergence comparison) describes itself as a ReportDoc and
// calls writeReport; nothing here knows what the numbers are.
//
// The page marks its own outcome on <body>: data-status="ok" once every chart has rendered,
// "error" (with data-errors) if a chart or a script failed; tests read it from a headless browser.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { writeFileAtomic } from "../plan/io.ts";

/** A Vega-Lite chart (any valid Vega-Lite spec; `$schema` is filled in). */
export interface ChartSpec {
  title: string;
  /** A sentence under the chart: what is drawn and how it was measured. */
  caption?: string;
  spec: Record<string, unknown>;
}

export interface TableColumn {
  key: string;
  label: string;
  /** Formats a cell; default: numbers to 4 significant digits, null as "–". */
  format?: (value: unknown, row: Record<string, unknown>) => string;
  align?: "left" | "right";
}

export interface TableSpec {
  title?: string;
  columns: TableColumn[];
  rows: Array<Record<string, unknown>>;
}

export interface ReportSection {
  title: string;
  /** Paragraphs (plain text, escaped). */
  text?: string[];
  /** Shown as a highlighted notice (e.g. what is missing from a partial run). */
  notice?: string[];
  charts?: ChartSpec[];
  tables?: TableSpec[];
}

export interface ReportDoc {
  title: string;
  /** Lines under the title: where, when, on what, emulated or real. */
  subtitle?: string[];
  sections: ReportSection[];
}

const VEGA_LITE_SCHEMA = "https://vega.github.io/schema/vega-lite/v6.json";

/** The minified UMD builds of vega, vega-lite and vega-embed, in load order, with their versions. */
export function chartingLibraries(): Array<{ name: string; version: string; source: string }> {
  const require = createRequire(import.meta.url);
  const libs = [
    ["vega", "vega.min.js"],
    ["vega-lite", "vega-lite.min.js"],
    ["vega-embed", "vega-embed.min.js"],
  ] as const;
  return libs.map(([name, file]) => {
    const dir = dirname(require.resolve(name)); // each package's entry point sits in its build/ folder
    const pkg = JSON.parse(readFileSync(join(dir, "..", "package.json"), "utf8")) as { version: string };
    return { name, version: pkg.version, source: readFileSync(join(dir, file), "utf8") };
  });
}

export function escapeHtml(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

/** Text safe inside <script>: no "</script" and no "<!--" can end or confuse the element. */
const scriptSafe = (s: string) => s.replace(/<\/(script)/gi, "<\\/$1").replace(/<!--/g, "<\\!--");
/** JSON safe inside <script type="application/json">. */
const jsonSafe = (v: unknown) => JSON.stringify(v).replace(/</g, "\\u003c");

export function formatCell(v: unknown): string {
  if (v === null || v === undefined || (typeof v === "number" && !Number.isFinite(v))) return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : Number(v.toPrecision(4)).toString();
  if (Array.isArray(v)) return v.map(formatCell).join(", ");
  return String(v);
}

function table(t: TableSpec): string {
  const head = t.columns.map((c) => `<th${c.align === "left" ? ' class="l"' : ""}>${escapeHtml(c.label)}</th>`).join("");
  const body = t.rows.map((r) => "<tr>" + t.columns.map((c) => {
    const text = c.format ? c.format(r[c.key], r) : formatCell(r[c.key]);
    return `<td${c.align === "left" ? ' class="l"' : ""}>${escapeHtml(text)}</td>`;
  }).join("") + "</tr>").join("\n");
  return `${t.title ? `<h3>${escapeHtml(t.title)}</h3>` : ""}<div class="scroll"><table><thead><tr>${head}</tr></thead><tbody>\n${body}\n</tbody></table></div>`;
}

/** The whole page as a string. */
export function renderReport(doc: ReportDoc): string {
  const specs: Array<Record<string, unknown>> = [];
  const sections = doc.sections.map((s) => {
    const parts: string[] = [`<section><h2>${escapeHtml(s.title)}</h2>`];
    if (s.notice?.length) parts.push(`<div class="notice">${s.notice.map((p) => `<p>${escapeHtml(p)}</p>`).join("")}</div>`);
    for (const p of s.text ?? []) parts.push(`<p>${escapeHtml(p)}</p>`);
    for (const c of s.charts ?? []) {
      const i = specs.length;
      specs.push({ $schema: VEGA_LITE_SCHEMA, ...c.spec });
      parts.push(`<figure><h3>${escapeHtml(c.title)}</h3><div class="chart" id="chart-${i}"></div>` +
        `${c.caption ? `<figcaption>${escapeHtml(c.caption)}</figcaption>` : ""}</figure>`);
    }
    for (const t of s.tables ?? []) parts.push(table(t));
    parts.push("</section>");
    return parts.join("\n");
  });
  const libs = chartingLibraries();
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>${escapeHtml(doc.title)}</title>
<meta name="generator" content="ampipe report (${libs.map((l) => `${l.name} ${l.version}`).join(", ")}, inlined)">
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #555; margin: 0.1em 0; }
section { margin-top: 2.2em; } figure { margin: 1.2em 0; } figcaption { color: #555; font-size: 12px; max-width: 900px; }
.notice { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.3em 1em; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; font-size: 12px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; } .l { text-align: left; }
th { background: #f4f4f4; position: sticky; top: 0; }
</style>
<script>
// Before the libraries: any script error, and anything logged through console.error, marks the page.
window.__ampipeErrors = [];
window.addEventListener("error", function (e) { window.__ampipeErrors.push(String(e.message)); });
(function (orig) {
  console.error = function () { window.__ampipeErrors.push(Array.prototype.join.call(arguments, " ")); return orig.apply(console, arguments); };
})(console.error);
</script>
${libs.map((l) => `<script>/* ${l.name} ${l.version} */\n${scriptSafe(l.source)}\n</script>`).join("\n")}
</head>
<body data-status="pending">
<h1>${escapeHtml(doc.title)}</h1>
${(doc.subtitle ?? []).map((l) => `<p class="sub">${escapeHtml(l)}</p>`).join("\n")}
${sections.join("\n")}
<script type="application/json" id="ampipe-specs">${jsonSafe(specs)}</script>
<script>
(function () {
  var errors = window.__ampipeErrors;
  function mark(status) {
    document.body.setAttribute("data-status", status);
    document.body.setAttribute("data-errors", String(errors.length));
    if (errors.length) document.body.setAttribute("data-error-messages", errors.join(" | "));
  }
  window.addEventListener("error", function () { mark("error"); });
  var specs = JSON.parse(document.getElementById("ampipe-specs").textContent);
  Promise.all(specs.map(function (spec, i) {
    return vegaEmbed("#chart-" + i, spec, { renderer: "svg", actions: false });
  })).then(function (views) {
    document.body.setAttribute("data-charts", String(views.length));
    mark(errors.length ? "error" : "ok");
  }, function (e) { errors.push(String(e && e.message || e)); mark("error"); });
})();
</script>
</body>
</html>
`;
}

export function writeReport(path: string, doc: ReportDoc): void {
  writeFileAtomic(path, renderReport(doc));
}
