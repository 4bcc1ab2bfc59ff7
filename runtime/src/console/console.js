// The weir console: pages drawn from the node's HTTP API (/health, /topics, /groups,
// /pipelines, /cluster), refreshed every two seconds. Charts are drawn with uPlot (embedded,
// see vendor/README).
"use strict";

const REFRESH_MS = 2000;
const HISTORY = 60; // points kept per chart (two minutes)
// series: recent samples by name ({ t: [seconds], v: [values] }), kept across pages;
// counters: the last reading of each counter a rate is taken from.
const state = { timer: null, series: {}, counters: {}, browser: null, reset: {} };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `${path}: ${r.status}`);
  return body;
}

function fmt(n) { return Number(n).toLocaleString("en-US"); }
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function table(headers, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map(h => el("th", { class: h.num ? "num" : "" }, h.label || h)))),
    el("tbody", {}, rows.length ? rows : [el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, "none"))]));
}
function num(v) { return el("td", { class: "num" }, fmt(v)); }
function stateCell(s) { return el("td", {}, el("span", { class: `state ${s}` }, s)); }

// Adds a sample to the series `name`, at most one per refresh, keeping HISTORY of them.
function sample(name, value) {
  const s = state.series[name] || (state.series[name] = { t: [], v: [] });
  const now = Date.now() / 1000;
  if (s.t.length && now - s.t[s.t.length - 1] < REFRESH_MS / 2000) return;
  s.t.push(now);
  s.v.push(value);
  if (s.t.length > HISTORY) { s.t.shift(); s.v.shift(); }
}

// Samples the per-second rate of a counter into the series `name` (from the second reading
// on; a counter that went back, as after a restart, starts over).
function sampleRate(name, counter) {
  const now = Date.now() / 1000;
  const last = state.counters[name];
  state.counters[name] = { counter, at: now };
  if (!last || now - last.at < REFRESH_MS / 2000) return;
  sample(name, Math.max(0, (counter - last.counter) / (now - last.at)));
}

// Tick steps of the value axes: 1, 2, 5, 10, 20, 50, ...
const WHOLE_STEPS = [...Array(10).keys()].flatMap(e => [1, 2, 5].map(m => m * 10 ** e));

// A uPlot chart of the series `name`: with axes (a time axis and `label`), or a bare
// sparkline for table cells. Drawn anew at each refresh, as the rest of the page.
function chart(name, { label, sparkline = false, height = 180 } = {}) {
  const s = state.series[name] || { t: [], v: [] };
  const box = el("div", { class: sparkline ? "sparkline" : "chart", "data-series": name,
    "data-points": s.t.length });
  const stroke = "#1f6feb";
  // The last two minutes, whatever the samples cover; whole numbers on the value axis.
  const now = Date.now() / 1000;
  const x = { time: !sparkline, range: () => [now - HISTORY * REFRESH_MS / 1000, now] };
  const y = { range: (u, min, max) => [0, Math.max(1, max) * (sparkline ? 1 : 1.1)] };
  const opts = sparkline
    ? { width: 120, height: 28, cursor: { show: false }, legend: { show: false },
        scales: { x, y }, axes: [{ show: false }, { show: false }],
        series: [{}, { stroke, width: 1.5 }] }
    : { width: Math.max(300, document.getElementById("page").clientWidth - 50), height,
        legend: { show: false }, scales: { x, y },
        axes: [{}, { size: 70, incrs: WHOLE_STEPS, values: (u, ticks) => ticks.map(fmt) }],
        series: [{}, { label, stroke, width: 2, fill: "rgba(31,111,235,0.08)" }] };
  // uPlot needs the box in the document to measure it: drawn once the page is in place.
  queueMicrotask(() => new uPlot(opts, [s.t.slice(), s.v.slice()], box));
  return box;
}

// Records appended to `topics`, all told (their partitions' end offsets).
function endOffsets(topics) {
  return topics.reduce((s, t) => s + t.partitions.reduce((a, p) => a + p.log_end_offset, 0), 0);
}

const pages = {
  async overview(main) {
    const [health, topics, groups, pipelines] = await Promise.all([
      api("/health"), api("/topics"), api("/groups"), api("/pipelines")]);
    const user = topics.topics.filter(t => !t.internal);
    sampleRate("produced", endOffsets(user));
    const running = pipelines.pipelines.filter(f => f.pipeline && f.pipeline.state === "running").length;
    const card = (value, label) => el("div", { class: "card" },
      el("div", { class: "value" }, value), el("div", { class: "label" }, label));
    main.replaceChildren(
      el("h1", {}, "Overview"),
      el("div", { class: "cards" },
        card(health.status, "status"),
        card(health.cluster ? `${health.cluster.nodes} nodes` : "single node", "cluster"),
        card(fmt(user.length), "topics"),
        card(bytes(user.reduce((s, t) => s + t.size_bytes, 0)), "on disk"),
        card(fmt(groups.groups.length), "consumer groups"),
        card(`${running} / ${pipelines.pipelines.length}`, "pipelines running")),
      el("h2", {}, "Records produced per second"),
      chart("produced", { label: "records/s" }));
    if (health.cluster) {
      const cluster = await api("/cluster");
      main.append(el("h2", {}, "Nodes"), table(["node", "address", "role", "state"],
        cluster.nodes.map(n => el("tr", {},
          el("td", {}, n.id), el("td", {}, n.kafka),
          el("td", {}, n.voter ? "voter" : "observer"),
          stateCell(n.fenced ? "fenced" : "running")))));
    }
  },

  async topics(main, name) {
    if (name) return topicPage(main, name);
    const { topics } = await api("/topics");
    sampleRate("produced", endOffsets(topics.filter(t => !t.internal)));
    main.replaceChildren(el("h1", {}, "Topics"), table(
      ["topic", { label: "partitions", num: 1 }, { label: "records (end offsets)", num: 1 }, { label: "size", num: 1 }],
      topics.map(t => el("tr", {},
        el("td", {}, el("a", { href: `#/topics/${encodeURIComponent(t.name)}` }, t.name),
          t.internal ? el("span", { class: "muted" }, " internal") : null),
        num(t.partitions.length),
        num(t.partitions.reduce((s, p) => s + p.log_end_offset, 0)),
        el("td", { class: "num" }, bytes(t.size_bytes))))));
  },

  async groups(main, id) {
    const { groups } = await api("/groups");
    for (const g of groups) sample(`lag:${g.group}`, g.lag);
    const shown = id ? groups.filter(g => g.group === id) : groups;
    main.replaceChildren(el("h1", {}, id ? `Consumer group ${id}` : "Consumer groups"), table(
      ["group", "state", { label: "members", num: 1 }, { label: "lag", num: 1 }],
      shown.map(g => el("tr", {},
        el("td", {}, el("a", { href: `#/groups/${encodeURIComponent(g.group)}` }, g.group)),
        stateCell(g.state), num(g.members.length), num(g.lag)))));
    for (const g of id ? shown : []) {
      main.append(el("h2", {}, "Lag over time"), chart(`lag:${g.group}`, { label: "records behind" }));
      main.append(el("h2", {}, "Offsets and lag"), table(
        ["topic", { label: "partition", num: 1 }, { label: "committed", num: 1 }, { label: "high watermark", num: 1 }, { label: "lag", num: 1 }],
        g.offsets.map(o => el("tr", {}, el("td", {}, o.topic), num(o.partition), num(o.committed), num(o.high_watermark), num(o.lag)))));
      main.append(resetForm(g));
      main.append(el("h2", {}, "Members"), table(["member", "client", "host"],
        g.members.map(m => el("tr", {}, el("td", {}, m.member_id), el("td", {}, m.client_id), el("td", {}, m.client_host)))));
    }
  },

  async pipelines(main) {
    const { directory, pipelines } = await api("/pipelines");
    for (const f of pipelines) {
      if (f.pipeline) sampleRate(`in:${f.pipeline.name}`, f.pipeline.records_in);
    }
    const act = (name, what) => async () => {
      try { await api(`/pipelines/${encodeURIComponent(name)}/${what}`, { method: "POST" }); }
      catch (e) { alert(e.message); }
      refresh();
    };
    main.replaceChildren(el("h1", {}, "Pipelines"),
      directory ? el("p", { class: "muted" }, `from ${directory}`) :
        el("p", { class: "muted" }, "this node has no pipelines directory (weir serve --pipelines DIR)"),
      table(["pipeline", "flow", "state", { label: "in", num: 1 }, { label: "out", num: 1 }, { label: "dead letters", num: 1 }, { label: "source lag", num: 1 }, "records/s in", ""],
        pipelines.map(f => {
          const p = f.pipeline;
          if (!p) {
            return el("tr", {}, el("td", {}, f.file), el("td", {}), stateCell("invalid"),
              el("td", { colspan: 6 }, el("div", { class: "error" }, f.invalid), refusedYaml(f.refused)));
          }
          const flow = el("div", { class: "flow" }, ...(p.flow || []).flatMap((step, i) =>
            [i ? el("span", { class: "arrow" }, "→") : null, el("span", { class: "box" }, step)]));
          return el("tr", { "data-pipeline": p.name },
            el("td", {}, p.name, el("div", { class: "muted" }, p.file),
              f.invalid ? el("div", { class: "error" }, f.invalid) : null, refusedYaml(f.refused)),
            el("td", {}, flow),
            el("td", {}, el("span", { class: `state ${p.state}` }, p.state),
              p.error ? el("div", { class: "error" }, p.error) : null),
            num(p.records_in), num(p.records_out.reduce((a, b) => a + b, 0)), num(p.dead_letters),
            el("td", { class: "num" }, !p.source_lag ? "—"
              : p.source_lag.bytes !== undefined ? bytes(p.source_lag.bytes) : `${fmt(p.source_lag.records)} records`),
            el("td", {}, chart(`in:${p.name}`, { sparkline: true })),
            el("td", {},
              p.state === "paused"
                ? el("button", { onclick: act(p.name, "resume") }, "Resume")
                : el("button", { onclick: act(p.name, "pause") }, "Pause"),
              el("button", { onclick: act(p.name, "restart") }, "Restart")));
        })));
  },
};

// A refused pipeline file's YAML, numbered, with the line the error points at marked and a
// caret under its column.
function refusedYaml(refused) {
  if (!refused) return null;
  const lines = refused.text.replace(/\n$/, "").split("\n");
  const width = String(lines.length).length;
  const rows = lines.flatMap((line, i) => {
    const n = i + 1;
    const row = el("div", { class: n === refused.line ? "yaml-line bad" : "yaml-line" },
      `${String(n).padStart(width)}  ${line}`);
    const caret = n === refused.line
      ? el("div", { class: "yaml-line caret" }, `${" ".repeat(width + 2 + refused.column - 1)}^`) : null;
    return [row, caret];
  });
  return el("details", { class: "yaml", open: "" },
    el("summary", {}, `the refused YAML (line ${refused.line}, column ${refused.column})`),
    el("pre", {}, rows));
}

// The WASM plugins of the pipelines this node runs, and what each has counted.
pages.plugins = async function (main) {
  const { host, plugins } = await api("/plugins");
  const faults = f => Object.keys(f).length
    ? Object.entries(f).map(([k, n]) => el("div", { class: "error" }, `${k}: ${fmt(n)}`))
    : el("span", { class: "muted" }, "none");
  main.replaceChildren(el("h1", {}, "Plugins"),
    host ? el("p", { class: "muted" },
      `modules compiled ${fmt(host.compiled)}, loaded from the disk cache ${fmt(host.from_disk_cache)}, ` +
      `from memory ${fmt(host.from_memory_cache)}`) : null,
    table(["plugin", "pipeline", "state", { label: "calls", num: 1 }, { label: "records in", num: 1 },
      { label: "records out", num: 1 }, "faults", { label: "fuel", num: 1 }, { label: "restarts", num: 1 }],
    plugins.map(p => el("tr", { "data-plugin": p.plugin },
      el("td", {}, p.plugin, el("div", { class: "muted" }, p.path)),
      el("td", {}, p.pipeline, el("div", { class: "muted" }, p.stage)),
      stateCell(p.state), num(p.calls), num(p.records_in), num(p.records_out),
      el("td", {}, faults(p.faults)), num(p.fuel), num(p.restarts)))));
};

// A topic's partitions and a record browser that follows the end of a partition.
async function topicPage(main, name) {
  const t = await api(`/topics/${encodeURIComponent(name)}`);
  const partition = state.browser && state.browser.topic === name ? state.browser.partition : 0;
  const records = await api(`/topics/${encodeURIComponent(name)}/records?partition=${partition}&limit=30`);
  state.browser = { topic: name, partition };
  const select = el("select", { onchange: e => { state.browser.partition = Number(e.target.value); refresh(); } },
    t.partitions.map(p => {
      const o = el("option", { value: p.partition }, `partition ${p.partition}`);
      if (p.partition === partition) o.selected = true;
      return o;
    }));
  const show = v => {
    if (v === null || v === undefined) return el("span", { class: "muted" }, "null");
    if (typeof v === "object") return el("span", { class: "muted" }, `base64 ${v.base64}`);
    try { return el("pre", {}, JSON.stringify(JSON.parse(v), null, 2)); } catch { return el("pre", {}, v); }
  };
  main.replaceChildren(
    el("h1", {}, `Topic ${name}`),
    table(["partition", { label: "start", num: 1 }, { label: "end", num: 1 }, { label: "high watermark", num: 1 }, { label: "size", num: 1 }, { label: "segments", num: 1 }],
      t.partitions.map(p => el("tr", {}, num(p.partition), num(p.log_start_offset), num(p.log_end_offset),
        num(p.high_watermark), el("td", { class: "num" }, bytes(p.size_bytes)), num(p.segments)))),
    el("h2", {}, "Configs"),
    Object.keys(t.configs).length
      ? table(["config", "value"], Object.entries(t.configs).map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v))))
      : el("p", { class: "muted" }, "broker defaults"),
    el("h2", {}, "Records"),
    el("div", { class: "toolbar" }, select, el("span", { class: "muted" }, "the latest 30, following new ones")),
    table([{ label: "offset", num: 1 }, "timestamp", "key", "value", "headers"],
      records.records.slice().reverse().map(r => el("tr", { class: "record" },
        num(r.offset), el("td", {}, new Date(r.timestamp).toISOString()), el("td", {}, show(r.key)),
        el("td", {}, show(r.value)),
        el("td", {}, r.headers.map(([k, v]) =>
          el("div", {}, `${k}: `, typeof v === "string" ? v : show(v))))))));
}

// Moving an empty group's offsets for one of its topics. The choices survive the page's
// refreshes.
function resetForm(g) {
  const topics = [...new Set(g.offsets.map(o => o.topic))];
  const choice = state.reset;
  if (!topics.includes(choice.topic)) choice.topic = topics[0];
  choice.to = choice.to || "earliest";
  const select = (id, key, values) => {
    const s = el("select", { id, onchange: () => { choice[key] = s.value; } },
      values.map(v => el("option", { value: v }, v)));
    s.value = choice[key];
    return s;
  };
  const empty = g.state === "Empty";
  const button = el("button", {
    id: "reset-offsets",
    onclick: async () => {
      try {
        await api(`/groups/${encodeURIComponent(g.group)}/reset-offsets`, {
          method: "POST", headers: { "content-type": "application/json" },
          body: JSON.stringify({ topic: choice.topic, to: choice.to }),
        });
      } catch (e) { alert(e.message); }
      refresh();
    },
  }, "Reset offsets");
  button.disabled = !empty || !topics.length;
  return el("div", { class: "reset" }, el("h2", {}, "Reset offsets"),
    el("p", {}, select("reset-topic", "topic", topics), " to ",
      select("reset-to", "to", ["earliest", "latest"]), " ", button,
      empty ? null : el("span", { class: "muted" }, " only an empty group: stop its consumers first")));
}

async function refresh() {
  const [page, arg] = (location.hash.replace(/^#\//, "") || "overview").split("/");
  const main = document.getElementById("page");
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("active", a.dataset.page === page);
  }
  const draw = pages[page] || pages.overview;
  try {
    await draw(main, arg && decodeURIComponent(arg));
  } catch (e) {
    main.replaceChildren(el("h1", {}, "Cannot load this page"), el("p", { class: "error" }, e.message));
  }
}

async function start() {
  try {
    const h = await api("/health");
    document.getElementById("node").textContent =
      `node ${h.node_id} · ${h.cluster ? `cluster of ${h.cluster.nodes}` : "single node"} · ${h.cluster_id}`;
  } catch (e) { /* the page shows the error */ }
  window.addEventListener("hashchange", refresh);
  await refresh();
  state.timer = setInterval(refresh, REFRESH_MS);
}

start();
