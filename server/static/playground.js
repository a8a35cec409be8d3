// dgserve playground (docs/playground.md). Plain JavaScript, no build step, nothing fetched but
// this server's own API. Invariant: model output only ever reaches the page through textContent
// (never innerHTML), so text such as <img onerror=...> shows as those characters.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "dgserve.apiKey";
  const state = { model: null, info: null, history: [], controllers: [] };

  class ApiError extends Error {
    constructor(status, message, code, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  // ---- HTTP ---------------------------------------------------------------------------------

  function requestHeaders() {
    const headers = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  async function errorFrom(response) {
    let message = response.statusText || "request failed";
    let code = null;
    try {
      const body = await response.json();
      if (body && body.error) ({ message, code } = body.error);
    } catch (_) { /* not JSON: keep the status text */ }
    return new ApiError(response.status, message, code, response.headers.get("Retry-After"));
  }

  async function getJSON(path) {
    const response = await fetch(path, { headers: requestHeaders() });
    if (!response.ok) throw await errorFrom(response);
    return response.json();
  }

  function parseEvent(raw) {
    let event = null;
    const data = [];
    for (const line of raw.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    return data.length ? { event, data: data.join("\n") } : null;
  }

  // POST a streaming request and hand each SSE event to view.chunk(event, data) until [DONE].
  async function stream(path, payload, view) {
    const controller = new AbortController();
    state.controllers.push(controller);
    const response = await fetch(path, {
      method: "POST", headers: requestHeaders(), body: JSON.stringify(payload), signal: controller.signal,
    });
    if (!response.ok) throw await errorFrom(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const ev = parseEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (!ev) continue;
        if (ev.data === "[DONE]") return;
        const data = JSON.parse(ev.data);
        if (ev.event === "error") {
          const e = data.error || {};
          throw new ApiError(null, e.message || "stream failed", e.code, null);
        }
        view.chunk(ev.event, data);
      }
    }
  }

  // ---- one answer: committed text, the block's draft, telemetry --------------------------------

  function fmt(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  function drawSpark(canvas, values) {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (values.length < 2) { canvas.classList.add("empty"); return; }
    canvas.classList.remove("empty");
    const top = Math.max(...values, 1);
    const dx = canvas.width / (values.length - 1);
    ctx.strokeStyle = "#2457c5";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, i) => {
      const y = canvas.height - 2 - (v / top) * (canvas.height - 4);
      if (i === 0) ctx.moveTo(0, y); else ctx.lineTo(i * dx, y);
    });
    ctx.stroke();
  }

  class AnswerView {
    constructor(parent, title) {
      const node = $("answer-template").content.firstElementChild.cloneNode(true);
      this.node = node;
      this.committed = node.querySelector(".committed");
      this.draftEl = node.querySelector(".draft");
      this.stepEl = node.querySelector(".draft-step");
      this.canvasEl = node.querySelector(".canvas");
      this.liveEl = node.querySelector(".live");
      this.figures = node.querySelector(".figures");
      this.spark = node.querySelector(".spark");
      node.querySelector(".who").textContent = title;
      parent.append(node);
      this.text = "";
      this.stepChars = []; // characters committed by each text update (one engine step each)
      this.previousDraft = [];
      this.started = performance.now();
      this.firstAt = null;
      this.timings = null;
      node.scrollIntoView({ block: "nearest" });
    }

    chunk(event, data) {
      if (event === "refinement") return this.showDraft(data.refinement);
      if (data.timings) this.finish(data.timings);
      const choice = data.choices && data.choices[0];
      const text = choice ? (choice.delta ? choice.delta.content : choice.text) : null;
      if (text) this.commit(text);
    }

    commit(text) {
      // Each piece starts in the draft style and settles (CSS animation) into committed text.
      const piece = document.createElement("span");
      piece.className = "fresh";
      piece.textContent = text;
      this.committed.append(piece);
      // A step's draft is sent before its commit and starts with the tokens the step accepts:
      // those leave the draft as they settle into the committed text.
      const draft = this.draftEl.textContent;
      this.draftEl.textContent = draft.startsWith(text) ? draft.slice(text.length) : "";
      this.text += text;
      this.stepChars.push(text.length);
      if (this.firstAt === null) this.firstAt = performance.now();
      this.showLive();
    }

    showDraft(draft) {
      if (!draft) return;
      this.draftEl.textContent = draft.draft_text;
      this.stepEl.textContent = `draft of the block, refinement step ${draft.step ?? "–"}`;
      if (state.info && state.info.kind === "diffusion") this.showCanvas(draft.draft_ids);
    }

    showCanvas(ids) {
      const cells = ids.map((id, i) => {
        const cell = document.createElement("span");
        cell.className = id !== this.previousDraft[i] ? "cell changed" : "cell";
        return cell;
      });
      this.canvasEl.replaceChildren(...cells);
      this.previousDraft = ids;
    }

    elapsed() { return (performance.now() - this.started) / 1000; }

    showLive() {
      const s = this.elapsed();
      const steps = this.stepChars.length;
      this.liveEl.textContent = `live: ${fmt(s, 1)} s · ${fmt(this.text.length / s, 0)} chars/s · `
        + `${steps} steps · ${fmt(this.text.length / steps, 1)} chars/step`;
    }

    finish(t) {
      this.timings = t;
      this.draftEl.textContent = "";
      this.stepEl.textContent = "";
      this.canvasEl.replaceChildren();
      this.liveEl.textContent = "";
      const rows = [
        ["time to first token", fmt(t.time_to_first_token_s, 2) + " s"],
        ["tokens/s", fmt(t.tokens_per_s, 1)],
        ["tokens per forward", fmt(t.tokens_per_forward, 2)],
        ["forwards", String(t.forward_passes)],
        ["tokens", String(t.generated_tokens)],
        ["sampler", t.sampler],
      ];
      if (t.denoising_steps !== undefined) rows.push(["denoising steps", String(t.denoising_steps)]);
      this.figures.replaceChildren(...rows.map(([name, value]) => {
        const div = document.createElement("div");
        const dt = document.createElement("dt");
        const dd = document.createElement("dd");
        dt.textContent = name;
        dd.textContent = value;
        div.append(dt, dd);
        return div;
      }));
      // Tokens per step estimated from each step's text at the answer's tokens per character,
      // so the line's mean is the measured tokens per forward when every forward committed text.
      // Averaged over 8 steps: one step's text length varies with the tokens' lengths.
      const perChar = this.text.length ? t.generated_tokens / this.text.length : 0;
      const perStep = this.stepChars.map((c) => c * perChar);
      drawSpark(this.spark, perStep.map((_, i) => {
        const window = perStep.slice(Math.max(0, i - 7), i + 1);
        return window.reduce((a, b) => a + b, 0) / window.length;
      }));
    }

    stopped(reason) {
      this.draftEl.textContent = "";
      this.stepEl.textContent = reason;
    }
  }

  // ---- requests ------------------------------------------------------------------------------

  function numberField(id) {
    const raw = $(id).value.trim();
    return raw === "" ? null : Number(raw);
  }

  function payload(sampler) {
    const body = {
      model: state.model,
      stream: true,
      stream_options: { include_usage: true },
      stream_refinements: $("show-drafts").checked,
      sampler,
    };
    for (const [field, id] of [["temperature", "temperature"], ["max_tokens", "max-tokens"],
      ["seed", "seed"], ["steps", "steps"]]) {
      const value = numberField(id);
      if (value !== null) body[field] = value;
    }
    return body;
  }

  function addTurn(role, text) {
    const turn = document.createElement("article");
    turn.className = "turn " + role;
    const who = document.createElement("h2");
    who.textContent = role;
    const body = document.createElement("div");
    body.className = "body";
    body.textContent = text;
    turn.append(who, body);
    $("transcript").append(turn);
  }

  async function runChat(prompt) {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history, { role: "user", content: prompt });
    addTurn("user", prompt);
    const view = new AnswerView($("transcript"), "assistant · " + $("sampler").value);
    try {
      await stream("/v1/chat/completions", { ...payload($("sampler").value), messages }, view);
    } finally {
      // A stopped answer stays in the conversation as far as it got.
      state.history.push({ role: "user", content: prompt }, { role: "assistant", content: view.text });
    }
  }

  async function runCompletion(prompt) {
    addTurn("prompt", prompt);
    const view = new AnswerView($("transcript"), "completion · " + $("sampler").value);
    await stream("/v1/completions", { ...payload($("sampler").value), prompt }, view);
  }

  function raceSamplers() {
    const served = (state.info && state.info.samplers) || [];
    const fast = served.find((s) => s !== "ar");
    return served.includes("ar") && fast ? ["ar", fast] : null;
  }

  async function runRace(prompt) {
    const pair = raceSamplers();
    if (!pair) throw new ApiError(null, "The race needs ar and a second sampler; this model serves "
      + ((state.info && state.info.samplers) || []).join(", "), "race_unavailable", null);
    $("race-ratio").textContent = "racing…";
    const views = pair.map((sampler, i) => {
      const lane = $(i === 0 ? "lane-a" : "lane-b");
      lane.replaceChildren();
      return new AnswerView(lane, sampler);
    });
    // Both at once: the engine steps every sampler once per turn, so they share the CPU fairly.
    const results = await Promise.allSettled(pair.map((sampler, i) =>
      stream("/v1/completions", { ...payload(sampler), prompt }, views[i])));
    const failed = results.find((r) => r.status === "rejected");
    if (failed) throw failed.reason;
    const [a, b] = views.map((v) => v.timings);
    if (a && b && a.tokens_per_s && b.tokens_per_s) {
      $("race-ratio").textContent = `${pair[1]} ${fmt(b.tokens_per_s / a.tokens_per_s, 2)}× the speed of ${pair[0]}`
        + ` (${fmt(b.tokens_per_s, 1)} vs ${fmt(a.tokens_per_s, 1)} tokens/s; `
        + `${fmt(b.tokens_per_forward, 2)} vs ${fmt(a.tokens_per_forward, 2)} tokens per forward)`;
    } else {
      $("race-ratio").textContent = "no ratio: an answer produced no tokens";
    }
  }

  // ---- page state ----------------------------------------------------------------------------

  function mode() { return document.querySelector("input[name=mode]:checked").value; }

  function showError(err) {
    const box = $("error");
    if (err && err.name === "AbortError") { setStatus("Stopped; the server cancelled the request."); return; }
    let text = err instanceof ApiError
      ? `${err.status ? "HTTP " + err.status + " " : ""}${err.code ? "(" + err.code + ") " : ""}${err.message}`
      : `Request failed: ${err && err.message ? err.message : err}`;
    if (err && err.retryAfter) text += `\nRetry after ${err.retryAfter} s.`;
    if (err && err.status === 401) text += "\nEnter the server's key in the API key field.";
    box.textContent = text;
    box.hidden = false;
  }

  function setStatus(text) { $("status").textContent = text; }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  }

  async function send(event) {
    event.preventDefault();
    const prompt = $("prompt").value;
    if (!prompt.trim() || !$("stop").disabled) return;
    $("error").hidden = true;
    setBusy(true);
    setStatus("Generating…");
    const run = { chat: runChat, completion: runCompletion, race: runRace }[mode()];
    try {
      if (mode() !== "race") $("prompt").value = "";
      await run(prompt);
      setStatus("Done.");
    } catch (err) {
      if (err.name !== "AbortError") setStatus("Failed.");
      showError(err);
      document.querySelectorAll(".answer .draft").forEach((d) => { d.textContent = ""; });
    } finally {
      state.controllers = [];
      setBusy(false);
    }
  }

  function stop() {
    state.controllers.forEach((c) => c.abort());
  }

  function applyMode() {
    const m = mode();
    $("system-area").hidden = m !== "chat";
    $("transcript").hidden = m === "race";
    $("race").hidden = m !== "race";
    $("prompt-label").textContent = { chat: "Message", completion: "Prompt", race: "Prompt for both samplers" }[m];
    $("sampler").disabled = m === "race";
    const pair = raceSamplers();
    $("sampler-hint").textContent = m === "race"
      ? (pair ? `Race: ${pair[0]} against ${pair[1]}, same prompt, seed and temperature.` : "This model serves one sampler: no race.")
      : "Temperature 0 (greedy) gives this base model's best text and parallel refinement its largest speed-up.";
  }

  async function loadModel() {
    try {
      state.info = await getJSON("/playground/info");
    } catch (err) {
      showError(err);
      return;
    }
    if (!state.info.samplers) {
      setStatus(`Model ${state.info.model} is loading…`);
      setTimeout(loadModel, 2000);
      return;
    }
    const select = $("sampler");
    select.replaceChildren(...state.info.samplers.map((name) => new Option(name, name)));
    if (state.info.samplers.includes(state.info.default_sampler)) select.value = state.info.default_sampler;
    try {
      const models = await getJSON("/v1/models");
      state.model = models.data[0].id;
      $("error").hidden = true;
      setStatus(`Ready: ${state.model} (${state.info.kind}).`);
    } catch (err) {
      state.model = state.info.model;
      setStatus("Cannot list models.");
      showError(err);
    }
    $("model").value = state.model;
    applyMode();
  }

  function init() {
    $("api-key").value = localStorage.getItem(KEY_STORE) || "";
    $("api-key").addEventListener("change", () => {
      localStorage.setItem(KEY_STORE, $("api-key").value.trim());
      loadModel();
    });
    $("composer").addEventListener("submit", send);
    $("controls").addEventListener("submit", (e) => e.preventDefault());
    $("stop").addEventListener("click", stop);
    $("clear").addEventListener("click", () => {
      state.history = [];
      $("transcript").replaceChildren();
      $("error").hidden = true;
    });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("show-drafts").addEventListener("change", () => {
      document.body.classList.toggle("hide-drafts", !$("show-drafts").checked);
    });
    document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", applyMode));
    applyMode();
    loadModel();
  }

  init();
})();
