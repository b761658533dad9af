// "Your subjects": the key's subject ids a page at a time, each labelled from its record
// ("cat — A photo of a cat in the park"); labels are remembered for this tab.

import { call } from "./api.js";
import { clearErrors, showError } from "./errors.js";

const PAGE = 20;
const LABELS = "consistory.labels";

export function labels() {
  return JSON.parse(sessionStorage.getItem(LABELS) || "{}");
}

export function remember(record) {
  const all = labels();
  all[record.subject_id] = `${record.subjects.join(", ")} — ${record.prompts[0] || ""}`;
  sessionStorage.setItem(LABELS, JSON.stringify(all));
}

function button(className, text, onClick) {
  const node = Object.assign(document.createElement("button"), { type: "button", className, textContent: text });
  node.addEventListener("click", onClick);
  return node;
}

// actions: {open(id), remove(id), openId()}; answers refresh(more) for the list in `aside`.
export function subjectList(aside, actions) {
  const list = aside.querySelector("#subject-list");
  const moreButton = aside.querySelector("#more-subjects");
  let after = null; // `after` of the next page

  function item(id, label) {
    const node = document.createElement("li");
    node.dataset.id = id;
    node.classList.toggle("open", actions.openId() === id);
    const name = Object.assign(document.createElement("span"), { className: "name", textContent: label || id, title: id });
    node.append(name, button("quiet open", "Open", () => actions.open(id)), button("quiet delete", "Delete", () => actions.remove(id)));
    return node;
  }

  async function refresh(more = false) {
    clearErrors(aside);
    let page;
    try {
      page = await call("GET", `v1/subjects?limit=${PAGE}${more && after ? `&after=${encodeURIComponent(after)}` : ""}`);
    } catch (error) {
      showError(aside, error, "list");
      return;
    }
    if (!more) list.replaceChildren();
    after = page.next_after || null;
    moreButton.hidden = !after;
    const known = labels();
    for (const id of page.subject_ids) list.append(item(id, known[id]));
    if (!page.subject_ids.length && !more) list.append(Object.assign(document.createElement("li"), { textContent: "None yet." }));
    // Subjects made elsewhere are labelled from their records, in the background.
    for (const id of page.subject_ids.filter((i) => !known[i])) {
      call("GET", `v1/subjects/${id}`).then((record) => {
        remember(record);
        const name = list.querySelector(`li[data-id="${id}"] .name`);
        if (name) name.textContent = labels()[id];
      }, () => {});
    }
  }

  moreButton.addEventListener("click", () => refresh(true));
  return refresh;
}
