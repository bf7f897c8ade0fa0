// Ocellus's chat page: talks to the server's own OpenAI API (/v1/models,
// /v1/chat/completions with "stream": true) and renders the answer as it arrives. No build
// step and no dependencies; the markdown renderer escapes everything first, so a model's
// output can never become markup.
"use strict";

const $ = (selector) => document.querySelector(selector);
const conversation = []; // the messages sent so far, as the API takes them
let attachments = []; // {kind: "image" | "video", url: data URI, name}
let running = null; // the AbortController of the stream in flight

// ---- markdown: fenced code, inline code, bold, italics, headings, lists, paragraphs ----

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function inline(text) {
  return text
    .split(/(`[^`\n]+`)/)
    .map((piece, i) => {
      if (i % 2 === 1) return `<code>${piece.slice(1, -1)}</code>`;
      return piece.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>").replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
    })
    .join("");
}

function blocks(text) {
  const out = [];
  let list = null;
  const closeList = () => {
    if (list) out.push(`</${list}>`);
    list = null;
  };
  for (const paragraph of text.split(/\n{2,}/)) {
    for (const line of paragraph.split("\n")) {
      const item = line.match(/^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/);
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (item) {
        const kind = item[1] ? "ul" : "ol";
        if (list !== kind) {
          closeList();
          out.push(`<${kind}>`);
          list = kind;
        }
        out.push(`<li>${inline(item[3])}</li>`);
      } else if (heading) {
        closeList();
        const level = Math.min(heading[1].length + 2, 6);
        out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      } else if (line.trim()) {
        closeList();
        out.push(`<p>${inline(line)}</p>`);
      }
    }
    closeList();
  }
  return out.join("");
}

function renderMarkdown(text) {
  // Split on fences first: what is inside a fence is shown as written. An unclosed fence
  // (mid-stream) is code to the end.
  return escapeHtml(text)
    .split(/^```[^\n]*\n?/m)
    .map((piece, i) => (i % 2 === 1 ? `<pre><code>${piece.replace(/\n$/, "")}</code></pre>` : blocks(piece)))
    .join("");
}

// ---- the API ----

function headers() {
  const key = $("#api-key").value.trim();
  const sent = { "Content-Type": "application/json" };
  if (key) sent.Authorization = `Bearer ${key}`;
  return sent;
}

// The API's error as it sent it: status, code and message.
async function apiError(response) {
  const text = await response.text();
  try {
    const { error } = JSON.parse(text);
    return `${response.status} ${error.code || error.type}: ${error.message}`;
  } catch {
    return `${response.status}: ${text}`;
  }
}

function notice(text) {
  $("#notice").textContent = text || "";
  $("#notice").hidden = !text;
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    notice(`Models: ${await apiError(response)}`);
    return;
  }
  notice("");
  const select = $("#model");
  const chosen = select.value;
  select.replaceChildren(
    ...(await response.json()).data.map((model) => {
      const option = new Option(model.parent ? `${model.id} (adapter of ${model.parent})` : model.id, model.id);
      option.selected = model.id === chosen;
      return option;
    }),
  );
  select.dataset.loaded = "true";
}

function requestBody() {
  const body = { model: $("#model").value, messages: conversation, stream: true };
  const temperature = $("#temperature").value;
  const maxTokens = $("#max-tokens").value;
  if (temperature !== "") body.temperature = Number(temperature);
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  const extra = $("#extra").value.trim();
  return extra ? { ...body, ...JSON.parse(extra) } : body;
}

// ---- the page ----

function bubble(role) {
  const element = document.createElement("article");
  element.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "body";
  element.append(body);
  $("#messages").append(element);
  return element;
}

function mediaElement({ kind, url, name }) {
  const element = document.createElement(kind === "video" ? "video" : "img");
  element.src = url;
  if (kind === "video") element.controls = true;
  else element.alt = name;
  return element;
}

function showAttachments() {
  $("#attachments").replaceChildren(
    ...attachments.map((attachment, i) => {
      const figure = document.createElement("figure");
      const remove = document.createElement("button");
      remove.textContent = "×";
      remove.title = `Remove ${attachment.name}`;
      remove.onclick = () => {
        attachments.splice(i, 1);
        showAttachments();
      };
      figure.append(mediaElement(attachment), remove);
      return figure;
    }),
  );
}

function addFiles(files) {
  for (const file of files) {
    const kind = file.type.startsWith("video/") ? "video" : "image";
    const reader = new FileReader();
    reader.onload = () => {
      attachments.push({ kind, url: reader.result, name: file.name });
      showAttachments();
    };
    reader.readAsDataURL(file);
  }
}

function userContent(text) {
  if (!attachments.length) return text;
  const parts = attachments.map(({ kind, url }) =>
    kind === "video" ? { type: "video_url", video_url: { url } } : { type: "image_url", image_url: { url } },
  );
  return text ? [...parts, { type: "text", text }] : parts;
}

// Reads an SSE body, calling `onData` with each event's data.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }
}

function setRunning(controller) {
  running = controller;
  $("#send").hidden = Boolean(controller);
  $("#stop").hidden = !controller;
}

async function send() {
  const text = $("#prompt").value.trim();
  if (running || (!text && !attachments.length)) return;
  let body;
  try {
    conversation.push({ role: "user", content: userContent(text) });
    body = JSON.stringify(requestBody());
  } catch (error) {
    conversation.pop();
    notice(`More fields: ${error.message}`);
    return;
  }
  notice("");
  const user = bubble("user");
  if (attachments.length) {
    const media = document.createElement("div");
    media.className = "media";
    media.append(...attachments.map(mediaElement));
    user.prepend(media);
  }
  user.querySelector(".body").textContent = text;
  $("#prompt").value = "";
  attachments = [];
  showAttachments();

  const answer = bubble("assistant");
  const output = answer.querySelector(".body");
  let raw = "";
  // Rendered at most once a frame: a fast model sends many tokens between two frames.
  let frame = null;
  const render = () => {
    frame = null;
    output.innerHTML = renderMarkdown(raw);
    $("#messages").scrollTop = $("#messages").scrollHeight;
  };
  const show = (state) => {
    answer.dataset.state = state;
    answer.dataset.raw = raw;
    if (state !== "streaming") {
      cancelAnimationFrame(frame);
      render();
    } else if (frame === null) {
      frame = requestAnimationFrame(render);
    }
  };
  const fail = (message) => {
    const error = document.createElement("div");
    error.className = "error";
    error.textContent = message;
    answer.append(error);
  };
  show("streaming");
  const controller = new AbortController();
  setRunning(controller);
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body, signal: controller.signal });
    if (!response.ok) {
      conversation.pop(); // not answered: not sent again with the next question
      fail(await apiError(response));
      show("error");
      return;
    }
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        fail(`${chunk.error.code}: ${chunk.error.message}`);
        return;
      }
      raw += chunk.choices?.[0]?.delta?.content || "";
      show("streaming");
    });
    show(answer.querySelector(".error") ? "error" : "done");
  } catch (error) {
    if (error.name === "AbortError") show("stopped");
    else {
      fail(String(error));
      show("error");
    }
  } finally {
    if (raw) conversation.push({ role: "assistant", content: raw });
    setRunning(null);
  }
}

function init() {
  const key = $("#api-key");
  key.value = localStorage.getItem("ocellus-api-key") || "";
  key.onchange = () => {
    localStorage.setItem("ocellus-api-key", key.value);
    loadModels();
  };
  $("#send").onclick = send;
  $("#stop").onclick = () => running?.abort();
  $("#prompt").onkeydown = (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      send();
    }
  };
  $("#files").onchange = (event) => {
    addFiles(event.target.files);
    event.target.value = "";
  };
  document.addEventListener("paste", (event) => {
    if (event.clipboardData?.files.length) addFiles(event.clipboardData.files);
  });
  const main = $("#messages");
  main.ondragover = (event) => {
    event.preventDefault();
    main.classList.add("dragging");
  };
  main.ondragleave = () => main.classList.remove("dragging");
  main.ondrop = (event) => {
    event.preventDefault();
    main.classList.remove("dragging");
    addFiles(event.dataTransfer.files);
  };
  $("#clear").onclick = () => {
    conversation.length = 0;
    main.replaceChildren();
  };
  loadModels();
}

window.ocellus = { renderMarkdown };
init();
