// esolm decoding trace: draws the events of a /v1/completions stream (or an embedded offline trace,
// window.ESOLM_TRACE) as tiles, one per sequence position, filled and coloured by the step that decided them.
(function () {
  "use strict";

  // the colour scale over steps (viridis stops; the same as --scale in trace.css)
  const STOPS = [[0x44, 0x01, 0x54], [0x3b, 0x52, 0x8b], [0x21, 0x91, 0x8c], [0x5e, 0xc9, 0x62], [0xfd, 0xe7, 0x25]];
  const $ = (id) => document.getElementById(id);
  const tilesEl = $("tiles");

  const state = { tiles: [], promptLength: 0, length: 0, domain: 1, nfe: 0, decided: 0, t0: 0, live: false,
                  phases: { diffusion: [0, 0], sequential: [0, 0] }, fresh: [] };

  function colour(step) {
    const t = state.domain > 1 ? Math.min(step / (state.domain - 1), 1) : 0;
    const x = t * (STOPS.length - 1);
    const i = Math.min(Math.floor(x), STOPS.length - 2);
    const f = x - i;
    const rgb = STOPS[i].map((a, c) => Math.round(a + (STOPS[i + 1][c] - a) * f));
    const dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 140;
    return { css: `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`, dark };
  }

  function shown(text) {
    if (text === "") return "\u2205";
    if (/^ +$/.test(text)) return "\u2423".repeat(text.length);
    return text.replace(/\r?\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }

  function paint(tile) {
    const c = colour(Number(tile.dataset.step));
    tile.style.backgroundColor = c.css;
    tile.classList.toggle("dark", c.dark);
  }

  function setDomain(n) {
    state.domain = Math.max(1, n);
    for (const tile of state.tiles) if (tile.dataset.step !== undefined) paint(tile);
    $("legend-last").textContent = `step ${state.domain}`;
  }

  function updateLegend() {
    for (const phase of ["diffusion", "sequential"]) {
      const [steps, tokens] = state.phases[phase];
      $(`legend-${phase}`).textContent = `${phase}: ${steps} step${steps === 1 ? "" : "s"}, ` +
        `${tokens} token${tokens === 1 ? "" : "s"}`;
    }
  }

  function setStatus(text, error) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", Boolean(error));
  }

  function onStart(ev) {
    tilesEl.textContent = "";
    state.tiles = [];
    state.promptLength = ev.prompt_length;
    state.length = ev.length;
    state.nfe = 0;
    state.decided = 0;
    state.fresh = [];
    state.phases = { diffusion: [0, 0], sequential: [0, 0] };
    state.t0 = performance.now();
    for (let pos = 0; pos < ev.length; pos++) {
      const tile = document.createElement("span");
      tile.className = "tile";
      tile.dataset.pos = String(pos);
      if (pos < ev.prompt_length) {
        tile.classList.add("prompt");
        tile.textContent = shown(ev.prompt_tokens[pos] ?? "");
        tile.title = `position ${pos} · prompt`;
      } else {
        tile.classList.add("completion");
        tile.title = `position ${pos} · not decided yet`;
      }
      state.tiles.push(tile);
      tilesEl.appendChild(tile);
    }
    setDomain(ev.length - ev.prompt_length);
    $("nfe").textContent = "NFE 0";
    $("tps").textContent = "– tok/s";
    $("text").textContent = "";
    setStatus("decoding…");
    updateLegend();
  }

  function onStep(ev) {
    for (const tile of state.fresh) tile.classList.remove("fresh");
    state.fresh = [];
    ev.positions.forEach((pos, j) => {
      const tile = state.tiles[pos];
      if (!tile) return;
      tile.classList.add("decided", ev.phase, "fresh");
      tile.dataset.step = String(ev.step);
      tile.dataset.phase = ev.phase;
      tile.textContent = shown(ev.token_texts[j]);
      tile.title = `position ${pos} · step ${ev.step + 1} (${ev.phase}) · token ${ev.tokens[j]} ` +
        JSON.stringify(ev.token_texts[j]);
      paint(tile);
      state.fresh.push(tile);
    });
    state.decided += ev.positions.length;
    state.nfe = ev.nfe;
    const ph = state.phases[ev.phase];
    if (ph) { ph[0] += 1; ph[1] += ev.positions.length; }
    $("nfe").textContent = `NFE ${ev.nfe}`;
    const n = ev.positions.length;
    setStatus(`step ${ev.step + 1} · ${ev.phase} · ${n} token${n === 1 ? "" : "s"}`);
    if (state.live) {
      const secs = (performance.now() - state.t0) / 1000;
      if (secs > 0) $("tps").textContent = `${(state.decided / secs).toFixed(1)} tok/s`;
    }
    updateLegend();
  }

  function onDone(ev, text, reason) {
    state.finished = true;
    for (const tile of state.fresh) tile.classList.remove("fresh");
    state.fresh = [];
    state.nfe = ev.nfe;
    setDomain(ev.nfe);
    $("nfe").textContent = `NFE ${ev.nfe}`;
    if (typeof ev.tokens_per_second === "number") $("tps").textContent = `${ev.tokens_per_second.toFixed(1)} tok/s`;
    $("text").textContent = text || "";
    setStatus(`done (${reason || "length"}) · ${Number(ev.seconds).toFixed(3)} s`);
  }

  function handle(chunk) {
    if (chunk.error) { setStatus(`error: ${chunk.error.message}`, true); state.failed = true; return; }
    const ev = chunk.esolm;
    if (!ev || ev.index !== 0) return;
    const choice = (chunk.choices || [])[0] || {};
    if (ev.event === "start") onStart(ev);
    else if (ev.event === "step") onStep(ev);
    else if (ev.event === "done") onDone(ev, choice.text, choice.finish_reason);
  }

  // ---- live: POST /v1/completions with stream=true, read the server-sent events ----
  function number(id) {
    const v = $(id).value.trim();
    return v === "" ? undefined : Number(v);
  }

  async function generate(e) {
    e.preventDefault();
    const button = $("generate");
    button.disabled = true;
    setStatus("generating…");
    const body = { prompt: $("prompt").value, max_tokens: number("max-tokens"), seed: number("seed"), n: 1,
                   stream: true, alpha0: number("alpha0"), steps: number("steps") };
    state.live = true;
    state.failed = false;
    state.finished = false;
    try {
      const resp = await fetch("/v1/completions", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      if (!resp.ok) {
        let msg = `HTTP ${resp.status}`;
        try { msg += ": " + (await resp.json()).error.message; } catch (_) { /* not a JSON error body */ }
        setStatus(msg, true);
        return;
      }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      stream: for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, "");
          buffer = buffer.slice(nl + 1);
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") break stream;
          handle(JSON.parse(data));
        }
      }
      if (!state.finished && !state.failed) setStatus("the stream ended before the result", true);
    } catch (err) {
      setStatus(`failed: ${err.message}`, true);
    } finally {
      button.disabled = false;
    }
  }

  // ---- offline: an embedded trace, drawn at once; Replay animates it ----
  let replayTimer = null;

  function replay(events) {
    clearTimeout(replayTimer);
    const steps = events.filter((c) => c.esolm && c.esolm.event === "step").length;
    const delay = Math.max(15, Math.min(200, 2500 / Math.max(1, steps)));
    let i = 0;
    const next = () => {
      if (i >= events.length) return;
      handle(events[i++]);
      replayTimer = setTimeout(next, delay);
    };
    next();
  }

  tilesEl.addEventListener("mouseover", (e) => {
    const tile = e.target.closest(".tile");
    if (tile) $("info").textContent = tile.title;
  });

  if (Array.isArray(window.ESOLM_TRACE)) {
    const events = window.ESOLM_TRACE;
    $("form").hidden = true;
    for (const chunk of events) handle(chunk);
    const model = events.length ? events[0].model : "";
    $("status").textContent += model ? ` · ${model}` : "";
    const button = $("replay");
    button.hidden = false;
    button.addEventListener("click", () => replay(events));
  } else {
    $("form").addEventListener("submit", generate);
  }
})();
