// The whole flow a user takes, through the client generated from openapi/v1.yaml, against a
// live server: ingest (multipart and JSON), the job, list, get, chunks, search, query, a
// replacement followed by its job's events, delete.
//
//   RAGAPI_E2E_URL=http://127.0.0.1:8000 RAGAPI_E2E_API_KEY=rk_... npm run e2e
//
// Exits non-zero at the first check that fails, naming it.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import createClient from "openapi-fetch";
import type { components, paths } from "./src/schema.js";

type Schemas = components["schemas"];

const baseUrl = process.env.RAGAPI_E2E_URL ?? "http://127.0.0.1:8000";
const key = process.env.RAGAPI_E2E_API_KEY;
const api = createClient<paths>({ baseUrl, headers: key ? { "X-API-Key": key } : {} });

// Names this run's documents on a server that others may share.
const run = randomUUID().slice(0, 8);
const RUST = [
  "Rust manages memory through ownership. Every value has exactly one owner, a variable, and " +
    "when the owner goes out of scope the value is dropped and its memory is freed, without a " +
    "garbage collector.",
  "References borrow a value without taking ownership. The borrow checker allows either any " +
    "number of shared references or exactly one mutable reference at a time.",
];
const SATURN = [
  "Saturn has more than one hundred known moons. Titan, the largest, is bigger than the " +
    "planet Mercury and is the only moon in the solar system with a thick atmosphere, made " +
    "mostly of nitrogen.",
  "Enceladus, a small icy moon, sprays plumes of water vapour from cracks near its south pole.",
];

/** The body of a call that answered `status`; fails with the problem it got otherwise. */
function ok<T>(result: { data?: T; error?: unknown; response: Response }, status = 200): T {
  assert.equal(result.response.status, status, JSON.stringify(result.error));
  assert.ok(result.data !== undefined, "the answer has a body");
  return result.data;
}

/** IngestUpload as multipart/form-data: one part per file, under its name, and the metadata
 * as a JSON string. (Blob and a name, not File: Node 18 has no global File.) */
function multipart(upload: Schemas["IngestUpload"], names: string[]): FormData {
  const form = new FormData();
  upload.files.forEach((file, i) => form.append("files", file, names[i]));
  if (upload.metadata) form.append("metadata", JSON.stringify(upload.metadata));
  return form;
}

async function finished(jobId: string): Promise<Schemas["Job"]> {
  const deadline = Date.now() + 120_000;
  for (;;) {
    const job = ok(await api.GET("/api/v1/jobs/{job_id}", { params: { path: { job_id: jobId } } }));
    if (job.status === "succeeded" || job.status === "failed") return job;
    assert.ok(Date.now() < deadline, `job ${jobId} is still ${job.status}`);
    await sleep(200);
  }
}

let passed = 0;
async function check(name: string, body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (error) {
    console.error(`not ok - ${name}`);
    throw error;
  }
  passed += 1;
  console.log(`ok - ${name}`);
}

let markdownId = "";
let textId = "";

await check("a multipart upload answers 202 and its job succeeds", async () => {
  const file = new Blob([`# Rust ${run}\n\n${RUST.join("\n\n")}\n`]);
  const upload: Schemas["IngestUpload"] = { files: [file], metadata: { run, year: 2026 } };
  const result = await api.POST("/api/v1/ingest", {
    body: upload,
    bodySerializer: () => multipart(upload, [`rust-${run}.md`]),
  });
  const accepted = ok(result, 202);
  assert.ok(result.response.headers.get("location")?.endsWith(`/jobs/${accepted.job.id}`));
  const job = await finished(accepted.job.id);
  assert.equal(job.status, "succeeded", JSON.stringify(job.error));
  assert.ok(job.chunks_total > 0 && job.chunks_done === job.chunks_total);
  assert.equal(job.document_ids.length, 1);
  markdownId = job.document_ids[0] ?? "";
});

await check("text sent as JSON with wait=true is ready at once", async () => {
  const body: Schemas["IngestText"] = { title: `Saturn ${run}`, text: SATURN.join("\n\n") };
  const result = await api.POST("/api/v1/ingest", { params: { query: { wait: true } }, body });
  const ingested = ok(result);
  assert.equal(ingested.job.status, "succeeded");
  const [document] = ingested.documents;
  assert.ok(document);
  assert.deepEqual(
    [document.title, document.filename, document.media_type, document.status],
    [`Saturn ${run}`, null, "text/plain", "ready"],
  );
  textId = document.id;
});

await check("the uploaded document is ready, recognised as Markdown", async () => {
  const params = { path: { doc_id: markdownId } };
  const document = ok(await api.GET("/api/v1/documents/{doc_id}", { params }));
  assert.deepEqual(
    [document.filename, document.media_type, document.status],
    [`rust-${run}.md`, "text/markdown", "ready"],
  );
  assert.deepEqual(document.metadata, { run, year: 2026 });
});

await check("both are listed, newest first", async () => {
  const params = { query: { title: run, limit: 10 } };
  const page = ok(await api.GET("/api/v1/documents", { params }));
  assert.deepEqual(
    page.items.map((d) => d.id),
    [textId, markdownId],
  );
  assert.equal(page.next_cursor, null);
});

let chunks: Schemas["Chunk"][] = [];

await check("the chunks come in order and hold the text", async () => {
  const params = { path: { doc_id: markdownId } };
  chunks = ok(await api.GET("/api/v1/documents/{doc_id}/chunks", { params })).items;
  assert.deepEqual(
    chunks.map((c) => c.index),
    chunks.map((_, i) => i),
  );
  const text = chunks.map((c) => c.text.split(/\s+/).join(" ")).join(" ");
  assert.ok(text.includes("the value is dropped and its memory is freed"));
});

const ours: Schemas["SearchFilters"] = { document_ids: [] };

await check("search ranks the right document first", async () => {
  ours.document_ids = [markdownId, textId];
  const body = { query: "Which moon has a thick nitrogen atmosphere?", top_k: 3, filters: ours };
  const results = ok(await api.POST("/api/v1/search", { body })).results;
  assert.equal(results[0]?.document_id, textId);
});

await check("every retrieval mode finds it, each hit explained by its signals", async () => {
  for (const mode of ["dense", "lexical", "hybrid"] as const) {
    const query = "Which moon has a thick nitrogen atmosphere?";
    const body = { query, top_k: 3, filters: ours, retrieval: { mode } };
    const [first] = ok(await api.POST("/api/v1/search", { body })).results;
    assert.equal(first?.document_id, textId, mode);
    const signals = Object.keys(first?.explain ?? {});
    assert.ok(signals.length > 0 && signals.every((s) => mode === "hybrid" || s === mode), mode);
  }
});

await check("an answer cites the passage it comes from", async () => {
  const question = "What happens to a value in Rust when its owner goes out of scope?";
  const answer = ok(await api.POST("/api/v1/query", { body: { question, filters: ours } }));
  assert.equal(answer.found, true);
  const [citation] = answer.citations;
  assert.ok(citation, "the answer has a citation");
  assert.equal(citation.document_id, markdownId);
  assert.ok(answer.answer.includes(`[${citation.marker}]`));
  const chunk = chunks.find((c) => c.id === citation.chunk_id);
  assert.ok(chunk?.text.includes(citation.quote), "the quote is in its chunk");
});

await check("a replacement's job events run from queued to the new version ready", async () => {
  const params = { path: { doc_id: textId } };
  const body: Schemas["IngestText"] = { text: [...SATURN].reverse().join("\n\n") };
  const accepted = ok(await api.PUT("/api/v1/documents/{doc_id}", { params, body }), 202);
  // The stream ends after the job's last event: read it whole, then its `data:` lines.
  const stream = await api.GET("/api/v1/jobs/{job_id}/events", {
    params: { path: { job_id: accepted.job.id } },
    parseAs: "text",
  });
  assert.equal(stream.response.status, 200);
  assert.ok(stream.response.headers.get("content-type")?.startsWith("text/event-stream"));
  const events: Schemas["JobEvent"][] = (stream.data ?? "")
    .split("\n")
    .filter((line) => line.startsWith("data: "))
    .map((line) => JSON.parse(line.slice("data: ".length)) as Schemas["JobEvent"]);
  const types = events.map((e) => e.type);
  assert.deepEqual(types.slice(0, 2), ["job.queued", "job.running"]);
  assert.deepEqual(types.slice(-2), ["document.ready", "job.finished"]);
  const ready = events[events.length - 2];
  assert.equal(ready?.document_id, textId);
  assert.equal(ready?.data.version, 2);
  assert.equal(events[events.length - 1]?.data.status, "succeeded");
});

await check("deleted documents are gone, told as a 404 problem", async () => {
  for (const doc_id of [markdownId, textId]) {
    const params = { path: { doc_id } };
    const deleted = await api.DELETE("/api/v1/documents/{doc_id}", { params });
    assert.equal(deleted.response.status, 204);
    const gone = await api.GET("/api/v1/documents/{doc_id}", { params });
    assert.equal(gone.response.status, 404);
    assert.equal(gone.error?.type, "urn:ragapi:problem:not-found");
  }
  const body = { query: "Titan nitrogen atmosphere", filters: ours };
  assert.deepEqual(ok(await api.POST("/api/v1/search", { body })).results, []);
});

console.log(`${passed} passed, 0 failed`);
