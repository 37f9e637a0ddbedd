// The research page: POST the question, follow the run's server-sent events, render the report with
// citations that open their passage (GET /api/chunks/ID). Text is inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function add(parent, tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  parent.appendChild(node);
  return node;
}

function progress(text) { add($("progress"), "li", text); }

async function showPassage(chunkId) {
  const box = $("passage");
  box.replaceChildren();
  const response = await fetch(`/api/chunks/${chunkId}`);
  const body = await response.json();
  if (!response.ok) { add(box, "p", body.error.message, "hint"); return; }
  add(box, "h3", body.context);
  add(box, "p", `${body.source}, chunk ${body.label}`, "hint");
  add(box, "pre", body.text).id = "passage-text";
}

function citationLink(parent, number, source) {
  const link = add(parent, "a", `[${number}]`, "cite");
  link.href = "#";
  link.dataset.chunk = source.chunk_id;
  link.title = source.context;
  link.addEventListener("click", (event) => { event.preventDefault(); showPassage(source.chunk_id); });
}

function renderReport(report) {
  const box = $("report");
  box.replaceChildren();
  const byNumber = new Map(report.sources.map((s) => [s.number, s]));
  for (const section of report.sections) {
    add(box, "h3", section.title);
    const para = add(box, "p");
    if (!section.sentences.length) add(para, "em", "No relevant passage was found for this section.");
    for (const sentence of section.sentences) {
      para.appendChild(document.createTextNode(sentence.text + " "));
      for (const n of sentence.citations) citationLink(para, n, byNumber.get(n));
      para.appendChild(document.createTextNode(" "));
    }
  }
  add(box, "h3", "Sources");
  const list = add(box, "ol", undefined, "sources");
  for (const source of report.sources) {
    const item = add(list, "li");
    citationLink(item, source.number, source);
    item.appendChild(document.createTextNode(` ${source.context} (${source.source})`));
  }
}

const describe = {
  status: (d) => d.message,
  plan: (d) => `plan: ${d.sections.length} sections` + (d.note ? ` (${d.note})` : ""),
  search: (d) => `searching the ${d.tool} for ${d.queries.length} queries`,
  judge: (d) => `judged ${d.relevance.reduce((n, r) => n + r.length, 0)} passages for relevance`,
  section: (d) => `wrote "${d.title}": ${d.sentences} sentences, ${d.citations} citations`,
  reflect: (d) => `reflection ${d.round}: ${d.queries.join("; ") || "no new queries"}`,
  report: (d) => `report written in ${d.seconds} s`,
  error: (d) => `error: ${d.message}`,
};

function follow(url) {
  const source = new EventSource(url);
  for (const kind of Object.keys(describe)) {
    source.addEventListener(kind, (event) => {
      const data = JSON.parse(event.data);
      progress(describe[kind](data));
      if (kind === "plan") {
        for (const s of data.sections) add($("plan"), "li", `${s.title} (${s.query})`);
      } else if (kind === "report") {
        renderReport(data.report);
      } else if (kind === "error") {
        $("error").textContent = data.message;
      }
      if (kind === "report" || kind === "error") { source.close(); $("submit").disabled = false; }
    });
  }
}

$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  for (const id of ["plan", "progress", "report"]) $(id).replaceChildren();
  $("error").textContent = "";
  $("submit").disabled = true;
  const response = await fetch("/api/research", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({question: $("question").value}),
  });
  const body = await response.json();
  if (!response.ok) { $("error").textContent = body.error.message; $("submit").disabled = false; return; }
  follow(body.events);
});
