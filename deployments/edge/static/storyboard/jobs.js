// Follows a job to its end: the job's Server-Sent Events, read with fetch (EventSource cannot
// send the Authorization header), resumed with Last-Event-ID when a stream is cut; polling of the
// job's record where no stream can be read.

import { ApiError, call, openStream } from "./api.js";

const POLL_S = 1;
const MAX_RECONNECTS = 20;

const sleep = (s) => new Promise((resolve) => setTimeout(resolve, s * 1000));

// One SSE block ("id: 3\nevent: image\ndata: {...}") as {id, event, data}; null for comments.
export function parseEvent(block) {
  let id = null;
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") id = value;
    else if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  return { id, event, data: JSON.parse(data.join("\n")) };
}

// Reads one stream; answers the final status event's data, or null if the stream ended early.
async function readStream(response, handlers, seen) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return null;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const parsed = parseEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (!parsed) continue;
      if (parsed.id !== null) seen(parsed.id);
      if (parsed.event === "progress") handlers.progress(parsed.data);
      else if (parsed.event === "image") handlers.image(parsed.data);
      else if (parsed.event === "status" && ["succeeded", "failed", "cancelled"].includes(parsed.data.status)) {
        await reader.cancel().catch(() => {});
        return parsed.data;
      }
    }
  }
}

async function poll(jobId, handlers) {
  for (;;) {
    let job;
    try {
      job = await call("GET", `v1/jobs/${jobId}`);
    } catch (error) {
      if (!(error instanceof ApiError) || !(error.status === 0 || error.status === 429 || error.status >= 500)) throw error;
      await sleep(Math.max(POLL_S, error.retryAfterS));
      continue;
    }
    handlers.progress(job.progress);
    if (job.status === "succeeded") {
      for (const image of job.result.images) handlers.image(image);
      return { status: "succeeded" };
    }
    if (job.status === "failed") return { status: "failed", error: { status: job.error_status, ...job.error } };
    if (job.status === "cancelled") return { status: "cancelled" };
    await sleep(POLL_S);
  }
}

// handlers: {progress(data), image(data)}. Answers {status, error?} once the job has finished.
export async function followJob(jobId, handlers) {
  if (typeof ReadableStream === "undefined" || typeof TextDecoderStream === "undefined") return poll(jobId, handlers);
  let last = null;
  for (let attempt = 0; attempt < MAX_RECONNECTS; attempt++) {
    try {
      const response = await openStream(`v1/jobs/${jobId}/events`, last, undefined);
      if (!response.body) return poll(jobId, handlers);
      const final = await readStream(response, handlers, (id) => { last = id; });
      if (final) return final;
    } catch (error) {
      // A client error (401, 404) will not mend itself; anything else is worth another try.
      if (error instanceof ApiError && error.status >= 400 && error.status < 500 && error.status !== 429) throw error;
      await sleep(Math.max(POLL_S, error.retryAfterS || 0));
    }
  }
  return poll(jobId, handlers);
}

// The fraction of an image's work done, from a `running` entry of a progress event: pass 2
// (feature injection) follows pass 1, each over the same number of steps.
export function fractionDone(running) {
  const passes = 2;
  const done = (running.pass_index - 1) * running.steps + running.step + 1;
  return Math.min(1, Math.max(0, done / (passes * running.steps)));
}
