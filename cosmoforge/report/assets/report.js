// The run page: everything is built from the JSON in #run-data, with textContent only (the
// documents are model output and the seeds are the user's data: neither is ever parsed as HTML).
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("run-data").textContent);
  const $ = (tag, attrs, ...children) => {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  };
  const fmt = (value, digits) => {
    if (value === null || value === undefined) return "n/a";
    if (typeof value !== "number") return String(value);
    return value.toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 0 : digits });
  };
  const duration = (seconds) => {
    if (seconds === null || seconds === undefined) return "unknown";
    if (seconds === 0) return "done";
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = Math.round(seconds % 60);
    return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
  };
  const section = (id, title, ...body) => $("section", { id }, $("h2", {}, title), ...body);
  const card = (id, label, value, note) =>
    $("div", { class: "card", id }, $("div", { class: "label" }, label),
      $("div", { class: "value", "data-value": "" }, value), note ? $("div", { class: "note" }, note) : null);

  function header() {
    const p = data.progress;
    const state = data.phase || (p.remaining === 0 ? "finished" : "generating");
    return $("header", {}, $("h1", {}, `cosmoforge run ${data.run} `, $("small", { id: "state" }, `(${state})`)),
      $("div", { class: "uri" }, data.uri));
  }

  function progressSection() {
    const p = data.progress, e = data.estimate;
    const seconds = e.elapsed_seconds || 0;
    const rate = seconds ? p.completion_tokens / seconds : 0;
    return section("progress", "Progress",
      $("div", { class: "cards" },
        card("card-prompts", "prompts", fmt(p.prompts)),
        card("card-generated", "generated", fmt(p.generated), p.exact ? "compacted dataset" : "shards, before compaction"),
        card("card-failed", "failed", fmt(p.failed)),
        card("card-remaining", "remaining", fmt(p.remaining)),
        card("card-tokens", "completion tokens", fmt(p.completion_tokens)),
        card("card-rate", "tokens/s (mean)", fmt(rate, 1)),
        card("card-eta", "ETA", duration(e.eta_seconds), `${fmt(e.documents_per_second, 2)} documents/s lately`),
        card("card-cost", "cost so far", e.cost === null ? "n/a" : fmt(e.cost, 2),
          e.gpu_hour_price === null ? "no GPU-hour price given"
            : `${fmt(e.gpu_hours, 2)} GPU-hours; about ${fmt(e.expected_cost, 2)} at the end`)));
  }

  function chartSection() {
    const t = data.throughput;
    const holder = $("div", { id: "chart" });
    const body = t.time.length ? holder : $("p", { class: "empty" }, "no completions yet");
    const node = section("throughput", "Tokens/s over time", body);
    if (t.time.length && window.uPlot) {
      requestAnimationFrame(() => new uPlot({
        width: Math.max(320, holder.clientWidth || 800), height: 220,
        series: [{}, { label: "tokens/s", stroke: "#2f6fde", width: 2 },
          { label: "documents done", stroke: "#8a94a6", scale: "docs" }],
        axes: [{}, { label: "tokens/s" }, { side: 1, scale: "docs", label: "documents", grid: { show: false } }],
      }, [t.time, t.tokens_per_second, t.documents], holder));
    }
    return node;
  }

  function barTable(id, title, counts) {
    const entries = Object.entries(counts || {});
    const max = Math.max(1, ...entries.map(([, c]) => c));
    const rows = entries.map(([name, count]) =>
      $("tr", { "data-name": name }, $("td", {}, name), $("td", { class: "num" }, fmt(count)),
        $("td", { style: "width:40%" }, $("div", { class: "bar", style: `width:${(100 * count) / max}%` }))));
    return $("div", { id }, $("h3", {}, title),
      entries.length ? $("table", {}, $("tbody", {}, rows)) : $("p", { class: "empty" }, "none"));
  }

  function distributions() {
    const d = data.distributions;
    return section("distributions", "Distributions",
      $("div", { class: "grid2" }, barTable("dist-seed_source", "by source", d.seed_source),
        barTable("dist-audience", "by audience", d.audience), barTable("dist-style", "by style", d.style),
        barTable("dist-topic", "by topic", d.topic), barTable("dist-model", "by model", data.models)));
  }

  function failuresSection() {
    const kinds = Object.entries(data.failures.kinds);
    const rows = kinds.map(([kind, info]) => $("tr", { "data-kind": kind }, $("td", {}, kind),
      $("td", { class: "num" }, fmt(info.count)),
      $("td", {}, info.examples.map((ex) => $("div", { class: "error" }, `${ex.prompt_id.slice(0, 12)}: ${ex.error}`)))));
    return section("failures", `Failures (${fmt(data.failures.total)})`, kinds.length
      ? $("table", {}, $("thead", {}, $("tr", {}, $("th", {}, "kind"), $("th", {}, "prompts"), $("th", {}, "examples"))),
        $("tbody", {}, rows))
      : $("p", { class: "empty" }, "no prompt failed"));
  }

  function keyValues(id, object) {
    const rows = Object.entries(object).filter(([, v]) => typeof v !== "object")
      .map(([k, v]) => $("tr", {}, $("td", {}, k), $("td", { class: "num" }, fmt(v, 4))));
    return $("table", { id }, $("tbody", {}, rows));
  }

  function quality() {
    const q = data.quality;
    if (!q) return section("quality", "Duplicates and openings", $("p", { class: "empty" }, "no statistics yet"));
    const openings = (q.openings && q.openings.top) || [];
    return section("quality", "Duplicates and openings",
      $("div", { class: "grid2" }, keyValues("quality-numbers", q),
        $("table", { id: "openings" }, $("thead", {}, $("tr", {}, $("th", {}, "most common openings"),
          $("th", {}, "documents"), $("th", {}, "share"))),
          $("tbody", {}, openings.map((o) => $("tr", {}, $("td", {}, o.opening), $("td", { class: "num" }, fmt(o.documents)),
            $("td", { class: "num" }, `${fmt(100 * o.share, 1)}%`)))))));
  }

  function postprocess() {
    const parts = [];
    parts.push(data.dedup ? $("div", {}, $("h3", {}, "dedup"), keyValues("dedup-table", data.dedup))
      : $("p", { class: "empty" }, "dedup has not run"));
    const dc = data.decontamination;
    if (dc) {
      const rows = Object.entries(dc.benchmarks || {}).map(([name, b]) => $("tr", { "data-benchmark": name },
        $("td", {}, name), $("td", { class: "num" }, fmt(b.items)), $("td", { class: "num" }, fmt(b.removed)),
        $("td", { class: "num" }, fmt(b.unique_items))));
      parts.push($("div", {}, $("h3", {}, `decontamination: ${fmt(dc.documents_removed)} of ${fmt(dc.documents)} removed`),
        $("table", { id: "decontam-table" }, $("thead", {}, $("tr", {}, $("th", {}, "benchmark"), $("th", {}, "items"),
          $("th", {}, "documents removed"), $("th", {}, "items matched"))), $("tbody", {}, rows))));
    } else parts.push($("p", { class: "empty" }, "decontamination has not run"));
    return section("postprocess", "Dedup and decontamination", $("div", { class: "grid2" }, parts));
  }

  function clustersSection() {
    if (!data.clusters.length) return section("clusters", "Cluster map", $("p", { class: "empty" }, "no clustering in this run"));
    return section("clusters", "Cluster map", data.clusters.map((c) => $("div", {}, $("h3", {}, c.source),
      c.map_png ? $("img", { class: "map", alt: `clusters of ${c.source}`, src: `data:image/png;base64,${c.map_png}` }) : null,
      keyValues(`clusters-${c.source}`, c.summary))));
  }

  function browser() {
    const samples = data.samples, fields = data.lineage_fields;
    const filters = {}, selects = {};
    let query = "", active = null;
    const list = $("div", { class: "results", id: "sample-list" });
    const detail = $("div", { id: "sample-detail" }, $("p", { class: "empty" }, "choose a document"));
    const count = $("span", { id: "sample-count" });
    const matches = (s) => fields.every((f) => !filters[f] || String(s[f] ?? "(none)") === filters[f]) &&
      (!query || `${s.text}\n${s.prompt}`.toLowerCase().includes(query));
    const show = (s) => {
      active = s.prompt_id;
      detail.replaceChildren(
        $("div", { class: "lineage" }, fields.map((f) => `${f}: ${s[f] ?? "(none)"}`).join(" · "),
          ` · prompt_id: ${s.prompt_id} · completion tokens: ${s.completion_tokens}`),
        $("div", { class: "pair" }, $("div", {}, $("strong", {}, "prompt"), $("pre", { id: "sample-prompt" }, s.prompt)),
          $("div", {}, $("strong", {}, "document"), $("pre", { id: "sample-text" }, s.text))));
      for (const row of list.children) row.classList.toggle("active", row.dataset.id === active);
    };
    const refresh = () => {
      const shown = samples.filter(matches);
      count.textContent = `${shown.length} of ${samples.length} sampled documents`;
      list.replaceChildren(...shown.slice(0, 300).map((s) => $("div", {
        "data-id": s.prompt_id, "data-audience": s.audience ?? "", "data-style": s.style ?? "",
        "data-source": s.seed_source ?? "", class: s.prompt_id === active ? "active" : "", onclick: () => show(s),
      }, `${s.seed_source} · ${s.audience} · ${s.style}: ${(s.text || "").slice(0, 90)}`)));
    };
    const controls = fields.map((f) => {
      const values = [...new Set(samples.map((s) => String(s[f] ?? "(none)")))].sort();
      selects[f] = $("select", { id: `filter-${f}`, onchange: (e) => { filters[f] = e.target.value; refresh(); } },
        $("option", { value: "" }, "all"), values.map((v) => $("option", { value: v }, v)));
      return $("label", {}, f, selects[f]);
    });
    const search = $("input", { id: "search", type: "search", placeholder: "words in prompt or document",
      oninput: (e) => { query = e.target.value.trim().toLowerCase(); refresh(); } });
    refresh();
    return section("samples", "Sample browser",
      $("p", {}, "A uniform sample of the run's documents (those with the smallest prompt ids). ", count),
      $("div", { class: "filters" }, controls, $("label", {}, "search", search)),
      $("div", { class: "browser" }, list, detail));
  }

  function specSection() {
    return section("spec", "Spec", $("details", {}, $("summary", {}, "spec.yaml as the run used it"), $("pre", {}, data.spec)));
  }

  document.body.replaceChildren(header(), $("main", {}, progressSection(), chartSection(), failuresSection(),
    distributions(), quality(), postprocess(), clustersSection(), browser(), specSection()));
  document.body.dataset.ready = "true";
})();
