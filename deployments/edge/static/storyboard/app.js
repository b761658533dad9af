// The storyboard page: a subject from its anchor prompts, scenes added to it, each image shown as
// its job reports it. Every action is one call of the public v1 API, and "Copy curl" gives that
// same call for a terminal.

import { ApiError, apiKey, call, curlCommand, setApiKey } from "./api.js";
import { downloadGrid, downloadZip } from "./downloads.js";
import { clearErrors, showError } from "./errors.js";
import { followJob } from "./jobs.js";
import { lines, settingPrompt } from "./prompts.js";
import { Story, frameHandlers } from "./story.js";
import { labels, remember, subjectList } from "./subject_list.js";

const $ = (selector) => document.querySelector(selector);
const SAMPLING = ["seed", "steps", "width", "height", "guidance_scale"];

let story = null; // the open subject's Story
const refreshSubjects = subjectList($("#subjects"), {
  open: (id) => openSubject(id),
  remove: (id) => deleteSubject(id),
  openId: () => story?.subjectId,
});

// --- the requests, built once for both the call and its curl ---
function subjectRequest() {
  const form = $("#subject-form");
  const subject = {
    prompts: lines(form.elements.prompts.value),
    subjects: form.elements.subjects.value.split(",").map((s) => s.trim()).filter(Boolean),
  };
  for (const name of SAMPLING) {
    const value = form.elements[name].value.trim();
    if (value !== "") subject[name] = Number(value);
  }
  return { method: "POST", path: "v1/jobs", body: { subject } };
}

function scenesRequest() {
  const prompts = lines($("#scenes-form").elements.prompts.value);
  return { method: "POST", path: "v1/jobs", body: { images: { subject_id: story.subjectId, prompts } } };
}

async function showCurl(request) {
  const text = curlCommand(request.method, request.path, request.body);
  $("#curl-text").textContent = text;
  $("#curl").hidden = false;
  const status = $("#curl-status");
  try {
    await navigator.clipboard.writeText(text);
    status.textContent = "Copied. Set CONSISTORY_API_KEY in your shell if the service needs a key.";
  } catch {
    status.textContent = "The browser refused the clipboard: select the command above and copy it.";
  }
}

// --- one subject ---
function showStory(record, made = false) {
  story = new Story($("#frames"), record);
  $("#story").hidden = false;
  $("#story-title").textContent = record.subjects.join(", ");
  clearErrors($("#story"));
  $("#story-note").hidden = made || story.remembered;
  describe(record);
  for (const item of document.querySelectorAll("#subject-list li")) item.classList.toggle("open", item.dataset.id === record.subject_id);
}

function describe(record) {
  const config = record.config || {};
  const parts = [`id ${record.subject_id}`, `${record.prompts.length} anchors`];
  if (config.width) parts.push(`${config.width} × ${config.height} px`, `${config.num_inference_steps} steps`);
  if (record.seeds) parts.push(`seeds from ${record.seeds[0]}`);
  $("#story-summary").textContent = parts.join(" · ");
}

async function openSubject(id) {
  try {
    const record = await call("GET", `v1/subjects/${id}`);
    remember(record);
    showStory(record);
    $("#story").scrollIntoView({ block: "start", behavior: "smooth" });
  } catch (error) {
    showError($("#subjects"), error, "list");
  }
}

function confirmDelete(label) {
  const dialog = $("#confirm-delete");
  $("#confirm-name").textContent = label;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "delete"), { once: true });
  });
}

async function deleteSubject(id) {
  if (!(await confirmDelete(labels()[id] || id))) return;
  try {
    await call("DELETE", `v1/subjects/${id}`);
  } catch (error) {
    showError(story?.subjectId === id ? $("#story") : $("#subjects"), error, story?.subjectId === id ? "story" : "list");
    return;
  }
  Story.forget(id);
  if (story?.subjectId === id) {
    story = null;
    $("#story").hidden = true;
  }
  await refreshSubjects();
}

// --- jobs ---
async function runJob(job, frames, form) {
  let final;
  try {
    final = await followJob(job.job_id, frameHandlers(frames));
  } catch (error) {
    final = { status: "failed", error: { status: error.status ?? 0, detail: error.message } };
  }
  if (final.status === "succeeded" && frames.some((frame) => !frame.image)) {
    // A stream can end between an image and its event being read: the job's result has them all.
    const done = await call("GET", `v1/jobs/${job.job_id}`).catch(() => null);
    for (const image of done?.result?.images || []) if (!frames[image.index].image) frames[image.index].show(image);
  }
  if (final.status === "failed") {
    for (const frame of frames) frame.fail("failed");
    showError(form, new ApiError(final.error?.status ?? 0, final.error?.detail || "the job failed"));
  } else if (final.status === "cancelled") {
    for (const frame of frames) frame.fail("cancelled");
  }
  return final;
}

async function submit(form, request) {
  clearErrors(form);
  const button = form.querySelector('button[type="submit"]');
  button.disabled = true;
  try {
    return await call(request.method, request.path, request.body);
  } catch (error) {
    showError(form, error);
    return null;
  } finally {
    button.disabled = false;
  }
}

async function createSubject(event) {
  event.preventDefault();
  const form = $("#subject-form");
  const request = subjectRequest();
  const job = await submit(form, request);
  if (!job) return;
  const { prompts, subjects } = request.body.subject;
  showStory({ subject_id: job.subject_id, subjects, prompts }, true);
  $("#story").scrollIntoView({ block: "start", behavior: "smooth" });
  const final = await runJob(job, story.addFrames("anchor", prompts), form);
  if (final.status === "succeeded") {
    const record = await call("GET", `v1/subjects/${job.subject_id}`).catch(() => null);
    if (record) {
      remember(record);
      if (story?.subjectId === record.subject_id) describe(record);
    }
    await refreshSubjects();
  }
}

async function addScenes(event) {
  event.preventDefault();
  const form = $("#scenes-form");
  const request = scenesRequest();
  const job = await submit(form, request);
  if (!job) return;
  form.elements.prompts.value = "";
  await runJob(job, story.addFrames("scene", request.body.images.prompts), form);
}

// "A photo of" + subject + each setting line, into the prompts field beside it.
function fillPrompts(details) {
  const form = details.closest("form");
  const subject = form.id === "subject-form" ? form.elements.subjects.value.split(",")[0] : story?.subjects[0];
  clearErrors(form);
  if (!subject || !subject.trim()) {
    showError(form, new ApiError(422, "subjects: write the subject word first; the prompts are built around it"));
    return;
  }
  const style = details.querySelector('[name="shortcut-style"]').value;
  const settings = lines(details.querySelector('[name="shortcut-settings"]').value);
  document.getElementById(details.dataset.fill).value = settings.map((s) => settingPrompt(style, subject, s)).join("\n");
}

async function download(kind) {
  const slot = $("#story");
  slot.querySelector('[data-error-for="download"]').textContent = "";
  const images = story.images();
  try {
    if (!images.length) throw new Error("no finished images yet; wait for the anchors or add scenes");
    const name = `story-${story.subjectId.slice(0, 8)}`;
    if (kind === "grid") await downloadGrid(images, `${name}.png`);
    else await downloadZip(story, images, `${name}.zip`);
  } catch (error) {
    showError(slot, error, "download");
  }
}

function start() {
  const keyForm = $("#key-form");
  $("#api-key").value = apiKey();
  const keyHint = keyForm.querySelector(".hint");
  const hintText = keyHint.textContent;
  keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("#api-key").value.trim());
    keyHint.textContent = hintText;
    clearErrors(keyForm);
    refreshSubjects();
  });
  $("#forget-key").addEventListener("click", () => {
    setApiKey("");
    $("#api-key").value = "";
    $("#subject-list").replaceChildren();
  });
  $("#refresh-subjects").addEventListener("click", () => refreshSubjects());
  $("#new-subject").addEventListener("click", () => $("#subject-words").focus());
  $("#subject-form").addEventListener("submit", createSubject);
  $("#scenes-form").addEventListener("submit", addScenes);
  $("#subject-form .curl").addEventListener("click", () => showCurl(subjectRequest()));
  $("#scenes-form .curl").addEventListener("click", () => showCurl(scenesRequest()));
  $("#curl-list").addEventListener("click", () => showCurl({ method: "GET", path: "v1/subjects" }));
  $("#curl-record").addEventListener("click", () => showCurl({ method: "GET", path: `v1/subjects/${story.subjectId}` }));
  $("#curl-delete").addEventListener("click", () => showCurl({ method: "DELETE", path: `v1/subjects/${story.subjectId}` }));
  $("#delete-subject").addEventListener("click", () => deleteSubject(story.subjectId));
  $("#download-grid").addEventListener("click", () => download("grid"));
  $("#download-zip").addEventListener("click", () => download("zip"));
  for (const form of document.querySelectorAll("#subject-form, #scenes-form")) {
    // An error stays next to its field until the field is changed.
    form.addEventListener("input", (event) => {
      if (event.target.getAttribute("aria-invalid") !== "true") return;
      event.target.removeAttribute("aria-invalid");
      for (const slot of form.querySelectorAll("[data-error-for]")) slot.textContent = "";
    });
  }
  for (const details of document.querySelectorAll("details.shortcut")) {
    details.querySelector(".fill").addEventListener("click", () => fillPrompts(details));
  }
  // With keys switched on, a call without one is a 401 (and a console error): ask first.
  if (document.documentElement.dataset.auth === "required" && !apiKey()) {
    keyHint.textContent = "This service needs an API key. It is kept in this tab's session storage only.";
    $("#api-key").focus();
  } else {
    refreshSubjects();
  }
}

start();
