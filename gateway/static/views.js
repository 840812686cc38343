// How a conversation is drawn. Model output is untrusted text: it reaches the page only
// through textContent, never as markup.

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// One tool call of a reply: name, id, arguments (streamed in fragments), then a field for the
// tool's result.
class ToolCallCard {
  constructor(parent) {
    this.call = { id: "", type: "function", function: { name: "", arguments: "" } };
    this.node = el("div", "tool-call");
    this.title = el("div", "tool-name");
    this.args = el("pre", "tool-args");
    this.node.append(this.title, this.args);
    parent.append(this.node);
  }

  apply(delta) {
    if (delta.id) this.call.id = delta.id;
    const fn = delta.function || {};
    if (fn.name) this.call.function.name = fn.name;
    this.call.function.arguments += fn.arguments || "";
    this.title.textContent = `${this.call.function.name}  ${this.call.id}`;
    this.node.dataset.name = this.call.function.name;
    this.node.dataset.id = this.call.id;
    this.args.textContent = this.call.function.arguments;
  }

  // After the reply: pretty arguments, and an input whose value answers the call.
  finish(onResult) {
    try {
      this.args.textContent = JSON.stringify(JSON.parse(this.call.function.arguments), null, 2);
    } catch {
      this.node.classList.add("invalid"); // shown as streamed: the model's own text
    }
    const form = el("form", "tool-result");
    const input = el("input");
    input.placeholder = "the tool's result";
    form.append(input, el("button", "", "Send result"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      form.querySelectorAll("input, button").forEach((n) => (n.disabled = true));
      onResult(this.call.id, input.value);
    });
    this.node.append(form);
  }
}

// An assistant reply as it streams: reasoning, content, tool-call cards, then a footer.
export class ReplyView {
  constructor(parent) {
    this.message = { role: "assistant", content: "" };
    this.reasoning = "";
    this.cards = [];
    this.node = el("div", "msg assistant");
    this.node.dataset.chunks = "0";
    this.thinking = el("details", "reasoning");
    this.thinking.hidden = true;
    this.thinkingText = el("pre");
    this.thinking.append(el("summary", "", "Reasoning"), this.thinkingText);
    this.content = el("div", "content");
    this.calls = el("div", "tool-calls");
    this.footer = el("div", "footer");
    this.node.append(el("div", "role", "assistant"), this.thinking, this.content, this.calls);
    this.node.append(this.footer);
    parent.append(this.node);
  }

  apply(chunk) {
    if (chunk.usage) {
      const u = chunk.usage;
      this.footer.dataset.usage = JSON.stringify(u);
      this.usage = `${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens`;
    }
    const choice = (chunk.choices || [])[0];
    if (!choice) return;
    const delta = choice.delta || {};
    if (delta.reasoning_content) {
      this.reasoning += delta.reasoning_content;
      this.thinking.hidden = false;
      this.thinkingText.textContent = this.reasoning;
    }
    if (delta.content) {
      this.message.content += delta.content;
      this.content.textContent = this.message.content;
    }
    for (const call of delta.tool_calls || []) {
      this.cards[call.index] ??= new ToolCallCard(this.calls);
      this.cards[call.index].apply(call);
    }
    if (delta.reasoning_content || delta.content || delta.tool_calls) {
      this.node.dataset.chunks = String(Number(this.node.dataset.chunks) + 1);
    }
    if (choice.finish_reason) this.node.dataset.finish = choice.finish_reason;
  }

  // The reply as a history message (partial when stopped), or null when nothing came.
  finish(state, onResult) {
    this.node.dataset.state = state;
    const finish = this.node.dataset.finish ? `finish: ${this.node.dataset.finish}` : state;
    this.footer.textContent = [finish, this.usage].filter(Boolean).join(" · ");
    const calls = this.cards.filter(Boolean);
    if (state === "done") calls.forEach((card) => card.finish(onResult));
    if (!this.message.content && !this.reasoning && !calls.length) return null;
    const message = { ...this.message };
    if (this.reasoning) message.reasoning_content = this.reasoning;
    if (calls.length) message.tool_calls = calls.map((card) => card.call);
    return message;
  }
}
