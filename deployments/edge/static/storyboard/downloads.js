// A story as one grid PNG or as a zip of its PNGs plus a JSON record of prompts and seeds.
// Both read the images' bytes by URL, so images on another origin (S3) need CORS there.

import { zipBlob } from "./zip.js";

const GRID_COLUMNS = 4;

async function imageBytes(url) {
  let response;
  try {
    response = await fetch(url, { cache: "force-cache" });
  } catch (error) {
    throw new Error(`could not read ${url.split("?")[0]} (${error.message}); a store on another origin must allow CORS`);
  }
  if (!response.ok) {
    throw new Error(`an image answered ${response.status}: its URL may have expired; open the subject and make it again`);
  }
  return new Uint8Array(await response.arrayBuffer());
}

function save(blob, filename) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

// images: [{url, prompt, seed, kind}] in story order.
export async function downloadGrid(images, filename) {
  const bitmaps = await Promise.all(images.map(async (image) => createImageBitmap(new Blob([await imageBytes(image.url)]))));
  const tileW = Math.max(...bitmaps.map((b) => b.width));
  const tileH = Math.max(...bitmaps.map((b) => b.height));
  const columns = Math.min(GRID_COLUMNS, bitmaps.length);
  const canvas = document.createElement("canvas");
  canvas.width = columns * tileW;
  canvas.height = Math.ceil(bitmaps.length / columns) * tileH;
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  bitmaps.forEach((bitmap, i) => context.drawImage(bitmap, (i % columns) * tileW, Math.floor(i / columns) * tileH));
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  save(blob, filename);
}

export async function downloadZip(story, images, filename) {
  const files = [];
  const record = { subject_id: story.subjectId, subjects: story.subjects, images: [] };
  for (const [i, image] of images.entries()) {
    const name = `${String(i).padStart(2, "0")}-${image.kind}.png`;
    files.push({ name, bytes: await imageBytes(image.url) });
    record.images.push({ file: name, kind: image.kind, prompt: image.prompt, seed: image.seed });
  }
  files.push({ name: "story.json", bytes: new TextEncoder().encode(JSON.stringify(record, null, 1)) });
  save(zipBlob(files), filename);
}
