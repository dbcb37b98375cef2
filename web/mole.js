// ComfyUI-MoLE in the browser: what a MoLE node reports after it runs (its summary and its warnings) is drawn on
// the node itself, and a run with warnings raises one toast. Plain JavaScript against the frontend's extension API
// (app.registerExtension, node.addDOMWidget, api events, extensionManager.toast); no build step.
// It acts only on this pack's nodes (ids "MoLE_..."), and only on the UI data they send: mole_lines, mole_warnings
// (nodes/report.py).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_PREFIX = "MoLE_";
const WIDGET = "mole_report";
const LINE_PX = 15;
const MAX_PX = 480;
const TOAST_LINES = 4;

const STYLE = `
.mole-report { box-sizing: border-box; width: 100%; height: 100%; overflow-y: auto; padding: 4px 6px;
  font: 11px/${LINE_PX}px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap;
  overflow-wrap: anywhere; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border-radius: 6px; user-select: text; }
.mole-report .mole-warning { color: #ffb347; font-weight: 600; margin-top: 2px; }
.mole-report .mole-warning::before { content: "\\26A0  "; }
`;

function addStyle() {
  if (document.getElementById("mole-report-style")) return;
  const style = document.createElement("style");
  style.id = "mole-report-style";
  style.textContent = STYLE;
  document.head.append(style);
}

// rows the text needs at the node's width: monospace 11 px is about 6.7 px a character, wrapped at spaces
function rows(texts, width) {
  const perRow = Math.max(12, Math.floor((width - 28) / 6.7));
  let total = 0;
  for (const text of texts) {
    let count = 1;
    let column = 0;
    for (const word of text.split(/(?<=\s)/)) {
      if (column > 0 && column + word.trimEnd().length > perRow) {
        count += 1;
        column = 0;
      }
      column += word.length;
      while (column > perRow) {
        count += 1;
        column -= perRow;
      }
    }
    total += count;
  }
  return total;
}

function show(node, lines, warnings) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    const element = document.createElement("div");
    element.className = "mole-report";
    widget = node.addDOMWidget(WIDGET, "mole-report", element, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => Math.min(MAX_PX, 12 + LINE_PX * rows([...widget.moleTexts], node.size[0])),
    });
    widget.serialize = false;        // nothing of it goes into the saved workflow
  }
  widget.moleTexts = [...lines, ...warnings];
  const element = widget.element;
  element.replaceChildren(
    ...lines.map((text) => Object.assign(document.createElement("div"), { className: "mole-line", textContent: text })),
    ...warnings.map((text) => Object.assign(document.createElement("div"),
                                            { className: "mole-warning", textContent: text })));
  element.title = warnings.length ? `${warnings.length} MoLE warning(s)` : "";
  // the node grows downwards to fit the report (never narrower or shorter than the artist made it)
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
}

// one toast per run: the warnings of every MoLE node of a prompt, raised when the prompt ends
const runs = new Map();

function toast(promptId) {
  const found = runs.get(promptId);
  runs.delete(promptId);
  if (!found || found.size === 0) return;
  const all = [...found.values()].map(({ title, text }) => `${title}: ${text}`);
  const more = all.length - TOAST_LINES;
  const detail = all.slice(0, TOAST_LINES).join("\n") + (more > 0 ? `\n... and ${more} more on the node` : "");
  app.extensionManager.toast.add({ severity: "warn", summary: `MoLE: ${found.size} warning(s) in this run`,
                                   detail, life: 15000 });
}

app.registerExtension({
  name: "ComfyUI-MoLE.NodeReport",
  setup() {
    addStyle();
    api.addEventListener("executed", ({ detail }) => {
      const warnings = detail?.output?.mole_warnings;
      if (!Array.isArray(warnings) || warnings.length === 0) return;
      const node = app.graph?.getNodeById(detail.display_node ?? detail.node);
      const title = node?.title ?? `node ${detail.node}`;
      if (!runs.has(detail.prompt_id)) runs.set(detail.prompt_id, new Map());
      for (const text of warnings) runs.get(detail.prompt_id).set(`${title}\n${text}`, { title, text: String(text) });
    });
    for (const end of ["execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(end, ({ detail }) => toast(detail?.prompt_id));
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(NODE_PREFIX)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const lines = output?.mole_lines;
      const warnings = output?.mole_warnings;
      if (!Array.isArray(lines) && !Array.isArray(warnings)) return;
      show(this, Array.isArray(lines) ? lines.map(String) : [], Array.isArray(warnings) ? warnings.map(String) : []);
    };
  },
});
