// covd's dashboard: a page that reads the daemon's JSON API (/api/…) and follows its
// server-sent events, so that what it shows changes while shards stream. Every text from the
// daemon (run ids, paths, test names) goes into the page as text, never as markup.
"use strict";

const main = document.getElementById("main");
const live = document.getElementById("live");

// el("a", {href: "#/"}, "text", child…): an element with attributes and children.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children.flat()) {
    if (c !== undefined && c !== null) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// Thrown when the daemon wants a token (401): the page then asks for one.
class SignInNeeded extends Error {}

async function api(path) {
  const r = await fetch(path, { headers: { accept: "application/json" } });
  const body = await r.json().catch(() => ({ error: r.statusText }));
  if (r.status === 401) throw new SignInNeeded(body.error || r.statusText);
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

// The daemon requires tokens: a token of every project (read scope at least) signs this
// browser in; the daemon keeps it in a cookie no script can read.
function signInView(reason) {
  const input = el("input", { id: "token", name: "token", type: "password", autocomplete: "off",
    required: true, "aria-describedby": "why", size: 60 });
  // Why the session ended, when it did (an expired or revoked token); not the daemon's
  // general words for a call without one.
  const said = el("p", { id: "said", class: "muted", role: "alert" },
    /requires a token/.test(reason) ? "" : reason);
  const form = el("form", { class: "filter", onsubmit: async (ev) => {
    ev.preventDefault();
    const r = await fetch("/api/session", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ token: input.value }) });
    if (r.ok) { input.value = ""; render(true); followEvents(); return; }
    const body = await r.json().catch(() => ({ error: r.statusText }));
    said.textContent = body.error || r.statusText;
  } },
    el("label", {}, "Token", input),
    el("button", { type: "submit" }, "Sign in"));
  return [
    el("h1", {}, "Sign in"),
    el("p", { id: "why", class: "muted" },
      "This daemon requires a token. Give one that reads every project, as ",
      el("code", {}, "covd token create --project '*' --scope read"), " makes."),
    form, said,
  ];
}

function pct(part, whole) {
  return whole > 0 ? (100 * part) / whole : null;
}
function fmtPct(p) {
  return p === null ? "–" : p.toFixed(1) + "%";
}
function bar(p) {
  const width = p === null ? 0 : Math.max(0, Math.min(100, p));
  return el("span", { class: "bar", "aria-hidden": "true" }, el("span", { style: `width:${width}%` }));
}
function ago(iso) {
  if (!iso) return "";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 60) return `${Math.max(0, Math.round(s))} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(iso).toISOString().slice(0, 10);
}
function bytes(n) {
  if (n === null || n === undefined) return "–";
  return (n / 1048576).toFixed(n < 10485760 ? 1 : 0) + " MiB";
}
function seconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 60 ? s.toFixed(1) + " s" : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}
function runState(r) {
  if (r.complete) return "complete";
  if (r.shards.streaming > 0) return "streaming";
  if (r.shards.interrupted > 0) return "interrupted";
  return "waiting";
}
function enc(s) {
  return encodeURIComponent(s);
}

// ---- views -------------------------------------------------------------------------------

async function runsView() {
  const { runs } = await api("/api/runs");
  const rows = runs.map((r) => {
    const t = r.totals;
    const p = pct(t.lines_covered, t.lines);
    const state = runState(r);
    const s = r.shards;
    const shards = r.expectations_declared
      ? `${s.finished} of ${s.expected} finished` + (s.streaming ? `, ${s.streaming} streaming` : "") +
        (s.missing ? `, ${s.missing} missing` : "")
      : `${s.finished} finished` + (s.streaming ? `, ${s.streaming} streaming` : "") + " (none declared)";
    return el("tr", { "data-run": r.run_id },
      el("td", {}, el("a", { href: `#/run/${enc(r.run_id)}` }, r.run_id)),
      el("td", {}, r.project || el("span", { class: "muted" }, "–")),
      el("td", {}, r.branch || ""),
      el("td", { class: "mono" }, (r.commit || "").slice(0, 10)),
      el("td", {}, el("span", { class: `badge ${state}` }, state)),
      el("td", { class: "shards" }, shards),
      el("td", { class: "num" }, fmtPct(p), bar(p)),
      el("td", { class: "muted" }, ago(r.created_at)));
  });
  return [
    el("h1", {}, "Runs"),
    el("p", { class: "muted" }, "Newest first. The page follows the daemon: shards appear, stream and finish as they do."),
    runs.length === 0
      ? el("div", { class: "empty" }, "No runs yet. Push a shard: covd push --run R --shard 0 coverage.info")
      : el("table", { id: "runs" },
          el("thead", {}, el("tr", {},
            ["Run", "Project", "Branch", "Commit", "State", "Shards"].map((h) => el("th", { scope: "col" }, h)),
            el("th", { scope: "col", class: "num" }, "Lines"),
            el("th", { scope: "col" }, "Opened"))),
          el("tbody", {}, rows)),
  ];
}

// A path's directories with the path up to each: `/a/b` is `/`, `/a`, `/a/b`.
function segments(path) {
  const out = [];
  let acc = "";
  if (path.startsWith("/")) {
    out.push(["/", "/"]);
    acc = "/";
  }
  for (const p of path.split("/").filter(Boolean)) {
    acc = acc === "" ? p : acc.endsWith("/") ? acc + p : `${acc}/${p}`;
    out.push([p, acc]);
  }
  return out;
}

function crumbs(runId, path) {
  const parts = segments(path);
  const out = [el("a", { href: `#/run/${enc(runId)}` }, runId), " / "];
  parts.forEach(([name, full], i) => {
    if (i === parts.length - 1) out.push(el("span", { "aria-current": "page" }, name));
    else out.push(el("a", { href: `#/run/${enc(runId)}/dir/${enc(full)}` }, name), " / ");
  });
  return el("nav", { class: "crumbs", "aria-label": "Path" }, out);
}

function shardsTable(run) {
  const rows = run.shard_list.map((s) => {
    const t = s.telemetry;
    const tests = t && t.tests + t.passed + t.failed + t.skipped + t.errored > 0
      ? `${t.passed} passed, ${t.failed} failed, ${t.skipped} skipped, ${t.errored} errored` +
        (t.incomplete ? `, ${t.incomplete} incomplete` : "")
      : "–";
    const tags = t && t.tags ? Object.entries(t.tags).map(([k, v]) => `${k}=${v}`).join(" ") : "";
    return el("tr", { "data-shard": s.shard_id },
      el("td", { class: "mono" }, s.shard_id),
      el("td", {}, el("span", { class: `badge ${s.state}` }, s.state)),
      el("td", { class: "num" }, s.attempt || "–"),
      el("td", { class: "num" }, s.deltas),
      el("td", {}, tests),
      el("td", { class: "num" }, t ? seconds(t.duration_seconds) : "–"),
      el("td", { class: "num" }, t ? bytes(t.peak_memory_bytes) : "–"),
      el("td", { class: "tags" }, tags));
  });
  return el("table", { id: "shards" },
    el("thead", {}, el("tr", {},
      el("th", { scope: "col" }, "Shard"), el("th", { scope: "col" }, "State"),
      el("th", { scope: "col", class: "num" }, "Attempt"), el("th", { scope: "col", class: "num" }, "Deltas"),
      el("th", { scope: "col" }, "Tests"), el("th", { scope: "col", class: "num" }, "Duration"),
      el("th", { scope: "col", class: "num" }, "Peak memory"), el("th", { scope: "col" }, "Environment"))),
    el("tbody", {}, rows));
}

async function runView(runId, dir) {
  const [run, listing] = await Promise.all([
    api(`/api/runs/${enc(runId)}`),
    api(`/api/runs/${enc(runId)}/dir?path=${enc(dir || "")}`),
  ]);
  const t = run.totals;
  const state = runState(run);
  const entries = listing.entries.map((e) => {
    const name = e.path === "/" ? "/" : e.path.split("/").pop();
    const href = e.directory
      ? `#/run/${enc(runId)}/dir/${enc(e.path)}`
      : `#/run/${enc(runId)}/file/${enc(e.path)}`;
    const p = pct(e.totals.lines_covered, e.totals.lines);
    const b = pct(e.totals.branches_taken, e.totals.branches);
    return el("tr", { "data-path": e.path },
      el("td", { class: "kind", "aria-label": e.directory ? "directory" : "file" }, e.directory ? "▸" : "·"),
      el("td", { class: "mono" }, el("a", { href }, name + (e.directory && name !== "/" ? "/" : ""))),
      el("td", { class: "num" }, `${e.totals.lines_covered} / ${e.totals.lines}`),
      el("td", { class: "num" }, fmtPct(p), bar(p)),
      el("td", { class: "num" }, e.totals.branches ? fmtPct(b) : "–"),
      el("td", { class: "num" }, e.directory ? e.totals.files : ""));
  });
  return [
    el("h1", {}, `Run ${run.run_id} `, el("span", { class: `badge ${state}`, id: "run-state" }, state)),
    el("div", { class: "meta" },
      run.project ? el("span", {}, `project ${run.project}`) : null,
      run.branch ? el("span", {}, `branch ${run.branch}`) : null,
      run.commit ? el("span", { class: "mono" }, `commit ${run.commit.slice(0, 12)}`) : null,
      el("span", {}, `lines ${t.lines_covered} / ${t.lines} (${fmtPct(pct(t.lines_covered, t.lines))})`),
      t.branches ? el("span", {}, `branches ${fmtPct(pct(t.branches_taken, t.branches))}`) : null,
      run.missing_shards.length ? el("span", {}, `waiting for ${run.missing_shards.join(", ")}`) : null,
      el("span", {}, `opened ${ago(run.created_at)}`)),
    el("h2", {}, "Shards"),
    shardsTable(run),
    el("h2", {}, "Files"),
    crumbs(runId, dir || ""),
    el("table", { id: "tree" },
      el("thead", {}, el("tr", {},
        el("th", { scope: "col" }, el("span", { class: "skip" }, "kind")), el("th", { scope: "col" }, "Name"),
        el("th", { scope: "col", class: "num" }, "Lines"), el("th", { scope: "col", class: "num" }, "Covered"),
        el("th", { scope: "col", class: "num" }, "Branches"), el("th", { scope: "col", class: "num" }, "Files"))),
      el("tbody", {}, entries)),
  ];
}

async function fileView(runId, path) {
  const f = await api(`/api/runs/${enc(runId)}/file?path=${enc(path)}`);
  const branches = new Map(f.branches.map(([line, taken, total]) => [line, [taken, total]]));
  const source = f.source;
  const row = (line, hits, covered) => {
    const b = branches.get(line);
    let state = covered ? "covered" : "missed";
    if (covered && b && b[0] < b[1]) state = "partial";
    const word = { covered: "covered", missed: "not covered", partial: "branches partly taken" }[state];
    const mark = { covered: "✓", missed: "✗", partial: "◐" }[state];
    return el("div", { class: `line ${state}${source ? " src" : ""}`, "data-line": line },
      el("span", { class: "n" }, line),
      el("span", { class: "h" }, hits === null ? (covered ? "ran" : "0") : hits),
      el("span", { class: "b" }, b ? `${b[0]}/${b[1]}` : ""),
      source
        ? [el("span", { class: "s", title: word }, mark, el("span", { class: "skip" }, ` ${word}`)),
           el("code", {}, source[line - 1] ?? "")]
        : el("span", { class: "s" }, `${mark} ${word === "branches partly taken" ? "partly" : word}`));
  };
  let rows;
  if (source) {
    // Every line of the file; a line the tool measured carries its state. Measured lines
    // past the text's end (a file changed after its coverage) come last.
    const measured = new Map(f.lines.map(([line, hits, covered]) => [line, [hits, covered]]));
    rows = source.map((text, i) => {
      const m = measured.get(i + 1);
      if (m) return row(i + 1, m[0], m[1]);
      return el("div", { class: "line plain src", "data-line": i + 1 },
        el("span", { class: "n" }, i + 1), el("span", { class: "h" }), el("span", { class: "b" }),
        el("span", { class: "s" }), el("code", {}, text));
    });
    rows.push(...f.lines.filter(([line]) => line > source.length).map(([l, h, c]) => row(l, h, c)));
  } else {
    rows = f.lines.map(([line, hits, covered]) => row(line, hits, covered));
  }
  const t = f.totals;
  return [
    el("h1", { class: "mono" }, path.split("/").pop()),
    crumbs(runId, path),
    el("div", { class: "meta" },
      el("span", {}, `lines ${t.lines_covered} / ${t.lines} (${fmtPct(pct(t.lines_covered, t.lines))})`),
      t.branches ? el("span", {}, `branches ${t.branches_taken} / ${t.branches}`) : null,
      t.functions ? el("span", {}, `functions ${t.functions_hit} / ${t.functions}`) : null),
    el("div", { class: "legend" },
      el("span", { class: "covered" }, "covered"), el("span", { class: "missed" }, "not covered"),
      el("span", { class: "partial" }, "branches partly taken")),
    el("p", { class: "muted" }, source
      ? "The file as pushed with the run, each executable line with its hit count and branches taken."
      : "Executable lines with their hit counts and branches taken (no source was pushed with this run: covd push --sources)."),
    el("div", { class: "lines", id: "lines", role: "list", "aria-label": "Lines" }, rows),
  ];
}

// A line chart of series [{name, colour, points: [[x, y]]}] over time; y from 0.
function lineChart(title, series, format) {
  const W = 520, H = 200, L = 52, R = 12, T = 10, B = 26;
  const all = series.flatMap((s) => s.points);
  if (all.length === 0) return el("figure", {}, el("figcaption", {}, title), el("p", { class: "muted" }, "No data."));
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x0 === x1) { x0 -= 43200000; x1 += 43200000; }
  const y1 = Math.max(...ys, 0) * 1.1 || 1;
  const x = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
  const y = (v) => T + (1 - v / y1) * (H - T - B);
  const grid = [0, 0.5, 1].map((f) => {
    const v = y1 * f;
    return svg("g", {}, svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }),
      svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, format(v)));
  });
  const labels = [x0, x1].map((v, i) => svg("text", { x: x(v), y: H - 6, "text-anchor": i ? "end" : "start" },
    new Date(v).toISOString().slice(0, 10)));
  const lines = series.map((s) => {
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
    return svg("g", {},
      svg("path", { d, fill: "none", stroke: s.colour, "stroke-width": 2 }),
      s.points.map((p) => svg("circle", { cx: x(p[0]), cy: y(p[1]), r: 3, fill: s.colour },
        svg("title", {}, `${s.name}: ${format(p[1])} (${new Date(p[0]).toISOString().slice(0, 10)})`))));
  });
  const legend = series.length > 1
    ? el("div", { class: "legend" }, series.map((s) => el("span", { style: `color:${s.colour}` }, s.name)))
    : null;
  return el("figure", {}, el("figcaption", {}, title),
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, width: "100%" }, grid, labels, lines),
    legend);
}

function params() {
  const q = location.hash.split("?")[1] || "";
  return new URLSearchParams(q);
}

function filterForm(section, fields) {
  const p = params();
  const inputs = fields.map(([name, label, kind, options]) => {
    const input = kind === "select"
      ? el("select", { name }, options.map((o) => el("option", { value: o, selected: p.get(name) === o }, o)))
      : el("input", { name, value: p.get(name) || "", placeholder: label });
    return el("label", {}, label, input);
  });
  return el("form", {
    class: "filter",
    onsubmit: (e) => {
      e.preventDefault();
      const q = new URLSearchParams();
      for (const [name] of fields) {
        const v = e.target.elements[name].value;
        if (v) q.set(name, v);
      }
      location.hash = `#/${section}?${q}`;
    },
  }, inputs, el("button", { type: "submit" }, "Show"));
}

async function trendsView() {
  const p = params();
  const q = new URLSearchParams({ by: p.get("by") || "week" });
  if (p.get("project")) q.set("project", p.get("project"));
  if (p.get("branch")) q.set("branch", p.get("branch"));
  const { buckets } = await api(`/api/history?${q}`);
  const at = (b) => Date.parse(b.start);
  const series = (metric, name, colour, scale = 1) => ({
    name, colour,
    points: buckets.filter((b) => b.metrics[metric]).map((b) => [at(b), b.metrics[metric].mean * scale]),
  });
  const form = filterForm("trends", [["project", "Project"], ["branch", "Branch"],
    ["by", "Bucket", "select", ["day", "week", "month"]]]);
  if (buckets.length === 0) {
    return [el("h1", {}, "Trends"), form, el("div", { class: "empty" }, "No complete runs in history for this selection yet.")];
  }
  const runs = buckets.reduce((n, b) => n + b.runs, 0);
  return [
    el("h1", {}, "Trends"),
    form,
    el("p", { class: "muted" }, `${runs} complete runs in ${buckets.length} buckets; each point is the mean of its bucket's runs` +
      (buckets.some((b) => b.down_sampled) ? " (older months are kept per month only)." : ".")),
    el("div", { class: "charts", id: "charts" },
      lineChart("Line coverage", [series("line_rate", "lines", "#0072b2"), series("branch_rate", "branches", "#e69f00")],
        (v) => v.toFixed(0) + "%"),
      lineChart("Tests", [series("tests_passed", "passed", "#009e73"), series("tests_failed", "failed", "#d55e00"),
        series("tests_skipped", "skipped", "#56b4e9"), series("tests_errored", "errored", "#cc79a7")], (v) => v.toFixed(0)),
      lineChart("Test time (shards summed)", [series("test_seconds", "seconds", "#0072b2")], (v) => seconds(v)),
      lineChart("Peak memory of a shard", [series("peak_memory_bytes", "peak", "#cc79a7")], (v) => bytes(v))),
  ];
}

async function flakyView() {
  const p = params();
  const form = filterForm("flaky", [["project", "Project"], ["branch", "Branch"]]);
  if (!p.get("branch") && !p.get("project")) {
    return [el("h1", {}, "Flaky tests"), form,
      el("p", { class: "muted" }, "Choose a project and branch: tests are judged on their latest 30 runs there.")];
  }
  const q = new URLSearchParams({ project: p.get("project") || "", branch: p.get("branch") || "" });
  const { tests } = await api(`/api/flaky?${q}`);
  const rows = tests.map((t) => el("tr", {},
    el("td", {}, el("span", { class: `badge ${t.class}` }, t.class)),
    el("td", { class: "mono" }, t.test),
    el("td", { class: "num" }, `${t.failed} of ${t.runs}`),
    el("td", { class: "num" }, t.flaky_commits || ""),
    el("td", { class: "muted" }, ago(t.first_seen)),
    el("td", { class: "muted" }, t.last_flip ? ago(t.last_flip) : "never")));
  return [
    el("h1", {}, "Flaky tests"),
    form,
    tests.length === 0
      ? el("div", { class: "empty" }, "No flaky or broken tests on this branch.")
      : el("table", { id: "flaky" },
          el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "State"), el("th", { scope: "col" }, "Test"),
            el("th", { scope: "col", class: "num" }, "Failed in runs"),
            el("th", { scope: "col", class: "num" }, "Flaky commits"),
            el("th", { scope: "col" }, "First seen"), el("th", { scope: "col" }, "Last flip"))),
          el("tbody", {}, rows)),
  ];
}

// ---- routing and live updates ------------------------------------------------------------

function route() {
  const [path] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "run" && parts[1]) {
    if (parts[2] === "file") return { section: "runs", view: () => fileView(parts[1], parts.slice(3).join("/")), live: false };
    return { section: "runs", view: () => runView(parts[1], parts[2] === "dir" ? parts.slice(3).join("/") : ""), live: true };
  }
  if (parts[0] === "trends") return { section: "trends", view: trendsView, live: false };
  if (parts[0] === "flaky") return { section: "flaky", view: flakyView, live: false };
  return { section: "runs", view: runsView, live: true };
}

let rendering = 0;
async function render(focus) {
  const r = route();
  const ticket = ++rendering;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.section === r.section) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  let content;
  let signIn = false;
  try {
    content = await r.view();
  } catch (e) {
    signIn = e instanceof SignInNeeded;
    content = signIn ? signInView(e.message)
      : [el("h1", {}, "Not available"), el("p", { class: "muted" }, e.message)];
  }
  if (ticket !== rendering) return; // a later render won
  // A live update must not take the keyboard's place away: the link or control that had the
  // focus gets it back in the new content (found by its address or name).
  const had = document.activeElement;
  const key = had && main.contains(had) ? (had.getAttribute("href") || had.getAttribute("name")) : null;
  main.replaceChildren(...content);
  document.title = `covd · ${main.querySelector("h1")?.textContent || ""}`;
  if (signIn) {
    main.querySelector("#token")?.focus();
  } else if (focus) {
    main.focus();
  } else if (key) {
    const again = [...main.querySelectorAll("a[href], [name]")].find(
      (e) => (e.getAttribute("href") || e.getAttribute("name")) === key);
    again?.focus();
  }
}

window.addEventListener("hashchange", () => render(true));

// Live: the daemon says when runs change; the live views read again (at most every 250 ms).
let pending = null;
let events = null;
function followEvents() {
  events?.close();
  const source = new EventSource("/api/events");
  events = source;
  source.addEventListener("open", () => { live.textContent = "live"; live.classList.add("on"); });
  source.addEventListener("error", () => { live.textContent = "reconnecting…"; live.classList.remove("on"); });
  source.addEventListener("runs", () => {
    if (!route().live || pending) return;
    pending = setTimeout(() => { pending = null; render(false); }, 250);
  });
  // The token this browser signed in with was revoked or expired: no more updates, and the
  // page asks for a token again, saying why.
  source.addEventListener("denied", () => {
    source.close();
    live.textContent = "signed out";
    live.classList.remove("on");
    render(false);
  });
}

render(false);
followEvents();
