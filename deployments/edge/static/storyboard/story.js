// The open subject's story: one frame per image, anchors first, filled in as its job reports.
// Finished images are remembered in this tab's session storage, since the API lists a subject's
// record but not the images made of it.

import { fractionDone } from "./jobs.js";

const storyItem = (subjectId) => `consistory.story.${subjectId}`;

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

class Frame {
  constructor(story, kind, prompt) {
    this.story = story;
    this.kind = kind;
    this.prompt = prompt;
    this.image = null; // {url, seed} once made
    this.best = 0; // progress only moves forward, whatever order events arrive in
    this.node = element("li", `frame ${kind}`);
    this.picture = element("div", "picture");
    this.progress = element("progress");
    this.progress.max = 1;
    this.progress.value = 0;
    this.state = element("p", "state", "queued");
    this.node.append(this.picture, this.progress, element("p", "caption", prompt), this.state);
  }

  step(running) {
    this.best = Math.max(this.best, fractionDone(running));
    this.progress.value = this.best;
    this.state.textContent = `pass ${running.pass_index} · step ${running.step + 1} of ${running.steps}`;
  }

  show(image) {
    this.image = { url: image.url, seed: image.seed };
    const img = element("img");
    img.alt = this.prompt;
    img.decoding = "async";
    img.src = image.url;
    this.picture.replaceChildren(img);
    this.progress.value = 1;
    this.progress.hidden = true;
    this.state.textContent = `seed ${image.seed}`;
    this.story.save();
  }

  fail(text) {
    if (this.image) return;
    this.node.classList.add("failed");
    this.progress.hidden = true;
    this.state.textContent = text;
  }
}

export class Story {
  constructor(list, record) {
    this.list = list;
    this.subjectId = record.subject_id;
    this.subjects = record.subjects;
    this.frames = [];
    list.replaceChildren();
    const saved = JSON.parse(sessionStorage.getItem(storyItem(this.subjectId)) || "null");
    for (const image of saved?.images || []) this.addFrames(image.kind, [image.prompt])[0].show(image);
  }

  get remembered() {
    return this.frames.some((frame) => frame.image);
  }

  addFrames(kind, prompts) {
    const added = prompts.map((prompt) => new Frame(this, kind, prompt));
    this.frames.push(...added);
    this.list.append(...added.map((frame) => frame.node));
    return added;
  }

  // Finished images in story order, for downloads.
  images() {
    return this.frames.filter((f) => f.image).map((f) => ({ kind: f.kind, prompt: f.prompt, ...f.image }));
  }

  save() {
    const body = { subject_id: this.subjectId, images: this.images() };
    sessionStorage.setItem(storyItem(this.subjectId), JSON.stringify(body));
  }

  static forget(subjectId) {
    sessionStorage.removeItem(storyItem(subjectId));
  }
}

// Routes a job's events to its frames: `frames[i]` is the job's image of index i.
export function frameHandlers(frames) {
  return {
    progress(data) {
      for (const running of data.running || []) frames[running.index]?.step(running);
    },
    image(data) {
      frames[data.index]?.show(data);
    },
  };
}
