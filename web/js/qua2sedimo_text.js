// Qua²SeDiMo: show each of our nodes' text (the `text` of its `ui` output) on the node.
//
// ComfyUI's frontend shows `ui.text` only on its own Preview Any node. This extension gives every node whose
// type starts with "Qua2SeDiMo" a read-only multi-line text box (the Preview Any / ShowText pattern), filled on
// every run. The box is created on the first text, is never sent with a prompt nor saved as a widget value
// (so workflows keep their widget values), and the last text is kept in the node's properties so that a
// reloaded workflow shows it again, marked as coming from an earlier run.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const PREFIX = "Qua2SeDiMo";
const WIDGET = "qua2sedimo_text";
const PROPERTY = "qua2sedimo_last_text";
const RESTORED = "(last run, restored with the workflow)\n";

function textOf(output) {
  const text = output?.text;
  if (text === undefined || text === null) return null;
  return (Array.isArray(text) ? text : [text]).map(String).join("\n");
}

function textWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (widget) return widget;
  widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
  widget.serialize = false; // not a widget value of the workflow
  widget.options ??= {};
  widget.options.serialize = false; // not an input of the prompt
  const el = widget.element ?? widget.inputEl;
  if (el) {
    el.readOnly = true;
    el.dataset.qua2sedimo = "text";
    el.style.opacity = "0.85";
  }
  return widget;
}

function show(node, text) {
  const widget = textWidget(node);
  widget.value = text;
  const el = widget.element ?? widget.inputEl;
  if (el) el.value = text;
  // grow the node to fit the text box, never shrink what the user sized
  const size = node.computeSize?.();
  if (size && node.size) node.setSize?.([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  node.setDirtyCanvas?.(true, true);
}

function isOurs(name) {
  return typeof name === "string" && name.startsWith(PREFIX);
}

app.registerExtension({
  name: "Qua2SeDiMo.NodeText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isOurs(nodeData?.name)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const text = textOf(output);
      if (text === null) return;
      this.properties = this.properties ?? {};
      this.properties[PROPERTY] = text;
      show(this, text);
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      const text = this.properties?.[PROPERTY];
      if (typeof text === "string" && text) show(this, RESTORED + text);
      return result;
    };
  },
  // newer frontends replay stored outputs (switching workflow tabs) through this hook
  onNodeOutputsUpdated(nodeOutputs) {
    for (const [id, output] of Object.entries(nodeOutputs ?? {})) {
      const node = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
      const text = textOf(output);
      if (node && isOurs(node.comfyClass ?? node.type) && text !== null) show(node, text);
    }
  },
});
