// The PersonaPlex page: model status, conversation settings, one talk button, live
// transcripts and timings. It speaks the server's websocket protocol (server/protocol.py).

import { LinearResampler, OggOpusDecoder, OggOpusEncoder } from "./ogg-opus.js";

const SAMPLE_RATE = 24000;
const FRAME_SAMPLES = 1920; // one model frame, 80 ms
const JITTER_FRAMES = 3; // playback starts once 240 ms are queued
const CAPTURE_BLOCK = 480; // 20 ms microphone blocks
const SPEAKING_LEVEL = 0.01; // playback RMS above this means the assistant is speaking
const SPEAKING_HANGOVER_MS = 300; // ...and for this long after (room echo dies out)
const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, CONTROL: 3, METADATA: 4, ERROR: 5, PING: 6 };
const STATE_TEXT = {
  connecting: "Connecting…",
  listening: "Listening: speak now.",
  hearing: "Hearing you…",
  thinking: "Thinking…",
  speaking: "Speaking (talk over it to interrupt).",
  live: "Live: speak any time.",
  idle: "Press Talk to start.",
};

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
let conversation = null;
let modelReady = false;

// ---------------------------------------------------------------- server status

function apiFetch(path) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  return fetch(path, { headers }).then((response) => {
    if (!response.ok) return response.json().then((body) => Promise.reject(new Error(body.detail || response.statusText)));
    return response.json();
  });
}

async function pollStatus() {
  try {
    const status = await apiFetch("/api/status");
    $("connection").textContent = "Connected to the server.";
    renderStatus(status);
    modelReady = status.state === "ready";
    setTimeout(pollStatus, modelReady ? 3000 : 500);
  } catch (error) {
    $("connection").textContent = `Cannot reach the server: ${error.message}`;
    setTimeout(pollStatus, 2000);
  }
  updateTalkButton();
}

function renderStatus(status) {
  const percent = status.fraction == null ? "" : ` (${Math.round(status.fraction * 100)}%)`;
  $("load-message").textContent =
    status.state === "ready" ? `Ready, after ${status.elapsed_s.toFixed(1)} s.`
    : status.state === "error" ? "The model could not be loaded:"
    : `${status.message}${percent}`;
  const progress = $("load-progress");
  if (status.fraction == null && status.state === "loading") progress.removeAttribute("value");
  else progress.value = status.state === "ready" ? 1 : status.fraction || 0;

  const order = ["download", "load", "warmup", "ready"];
  const current = order.indexOf(status.stage);
  for (const item of document.querySelectorAll("#load-stages li")) {
    const stage = item.dataset.stage;
    const seconds = status.timings[stage];
    item.querySelector(".timing").textContent = seconds == null ? "" : `${seconds.toFixed(1)} s`;
    item.classList.toggle("done", current > order.indexOf(stage));
    item.classList.toggle("current", status.stage === stage);
  }

  const asr = status.asr;
  $("asr-status").textContent =
    asr.state === "off" ? "Speech recognition is off: turn-based mode shows no transcript of your words."
    : asr.state === "error" ? `Speech recognition unavailable: ${asr.error}`
    : `Speech recognition (${asr.model}): ${asr.state}.`;

  $("load-error").hidden = status.state !== "error";
  $("load-error-message").textContent = status.error || "";
  // One line per numbered step ("1) ... 2) ...") of what to do.
  $("load-error-help").textContent = (status.help || "").replace(/ (?=\d\) )/g, "\n");
  document.body.dataset.model = status.state;
}

// ---------------------------------------------------------------- settings

async function loadChoices() {
  const [voices, prompts] = await Promise.all([apiFetch("/api/voices"), apiFetch("/api/prompts")]);
  const voiceSelect = $("voice");
  for (const name of voices.voices) voiceSelect.add(new Option(name, name, false, name === voices.default));
  const presetSelect = $("prompt-preset");
  for (const name of Object.keys(prompts.presets)) presetSelect.add(new Option(name, name, false, name === prompts.default));
  presetSelect.add(new Option("custom", "custom"));
  const showPreset = () => {
    if (presetSelect.value !== "custom") $("prompt-text").value = prompts.presets[presetSelect.value];
  };
  presetSelect.addEventListener("change", showPreset);
  $("prompt-text").addEventListener("input", () => (presetSelect.value = "custom"));
  showPreset();
}

function currentMode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function updateModeControls() {
  const duplex = currentMode() === "duplex";
  $("max-steps").disabled = duplex || conversation !== null;
  $("echo-suppression").disabled = !duplex || conversation !== null;
}

function currentSettings() {
  // The range is the input's min/max (index.html), the server's rule (runtime/validation.py).
  const input = $("max-steps");
  const maxSteps = Math.min(Number(input.max), Math.max(Number(input.min), Math.round(Number(input.value) || Number(input.defaultValue))));
  input.value = maxSteps;
  return {
    mode: currentMode(),
    voice: $("voice").value,
    systemPrompt: $("prompt-text").value,
    maxSteps,
    echoSuppression: $("echo-suppression").checked,
  };
}

function setSettingsEnabled(enabled) {
  for (const element of document.querySelectorAll("#settings input, #settings select, #settings textarea")) {
    element.disabled = !enabled;
  }
  if (enabled) updateModeControls();
}

function updateTalkButton() {
  const button = $("talk");
  button.disabled = !modelReady && conversation === null;
  button.textContent = conversation ? "Stop" : "Talk";
  button.classList.toggle("active", conversation !== null);
}

// ---------------------------------------------------------------- transcript, stats, log

const transcript = {
  modelLine: null,
  addUser(text) {
    const line = document.createElement("p");
    line.className = "user";
    line.textContent = text;
    $("transcript").append(line);
    this.modelLine = null;
    this.scroll();
  },
  newModelLine() {
    this.modelLine = null;
  },
  addDivider(text) {
    const line = document.createElement("p");
    line.className = "divider";
    line.textContent = text;
    $("transcript").append(line);
    this.modelLine = null;
    this.scroll();
  },
  appendModel(piece) {
    if (!this.modelLine) {
      this.modelLine = document.createElement("p");
      this.modelLine.className = "model";
      $("transcript").append(this.modelLine);
    }
    this.modelLine.textContent += piece;
    this.scroll();
  },
  scroll() {
    $("transcript").scrollTop = $("transcript").scrollHeight;
  },
};

function log(text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toISOString().slice(11, 23)} ${text}`;
  const list = $("log");
  list.append(item);
  while (list.children.length > 300) list.firstChild.remove();
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

function setTalkState(state) {
  document.body.dataset.state = state;
  $("talk-state").textContent = STATE_TEXT[state] || state;
}

// ---------------------------------------------------------------- one conversation

class Conversation {
  constructor(settings) {
    this.settings = settings;
    this.sending = false;
    this.stopped = false;
    this.lastError = null;
    this.framesReceived = 0;
    this.samplesReceived = 0;
    this.agentSpeakingUntil = 0;
  }

  async start() {
    setTalkState("connecting");
    this.context = new AudioContext({ sampleRate: SAMPLE_RATE });
    await this.context.audioWorklet.addModule("/static/worklets.js");
    this.microphone = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    this.startAudioGraph();
    this.decoder = new OggOpusDecoder(
      (samples, rate) => this.onReplyPcm(samples, rate),
      (error) => this.fail(`audio decoding failed: ${error.message}`),
    );
    this.openSocket();
  }

  startAudioGraph() {
    const source = this.context.createMediaStreamSource(this.microphone);
    this.capture = new AudioWorkletNode(this.context, "capture-processor", {
      processorOptions: { blockSize: CAPTURE_BLOCK },
    });
    this.capture.port.onmessage = (event) => this.onMicrophoneBlock(event.data);
    // The capture node must be pulled by the graph to run; a muted gain keeps it silent.
    const mute = this.context.createGain();
    mute.gain.value = 0;
    source.connect(this.capture).connect(mute).connect(this.context.destination);

    this.player = new AudioWorkletNode(this.context, "playback-processor", {
      processorOptions: { jitterSamples: JITTER_FRAMES * FRAME_SAMPLES, reportSamples: SAMPLE_RATE / 20 },
    });
    this.player.port.onmessage = (event) => this.onPlayerState(event.data);
    this.player.connect(this.context.destination);
  }

  openSocket() {
    const query = new URLSearchParams({
      mode: this.settings.mode,
      voice: this.settings.voice,
      text_prompt: this.settings.systemPrompt,
      events: "1", // the session, state and frame events (0x04) this page shows
    });
    if (this.settings.mode === "turn") query.set("max_steps", this.settings.maxSteps);
    if (token) query.set("token", token);
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    this.socket = new WebSocket(`${scheme}://${location.host}/api/chat?${query}`);
    this.socket.binaryType = "arraybuffer";
    this.socket.onmessage = (event) => this.onMessage(new Uint8Array(event.data));
    this.socket.onclose = (event) => this.onClose(event);
  }

  onMessage(message) {
    const kind = message[0];
    const payload = message.subarray(1);
    if (kind === KIND.HANDSHAKE) {
      log("handshake");
      this.startSending();
    } else if (kind === KIND.AUDIO) {
      this.decoder.push(payload);
    } else if (kind === KIND.TEXT) {
      transcript.appendModel(new TextDecoder().decode(payload));
    } else if (kind === KIND.METADATA) {
      this.onEvent(JSON.parse(new TextDecoder().decode(payload)));
    } else if (kind === KIND.ERROR) {
      this.lastError = new TextDecoder().decode(payload);
      log(`error: ${this.lastError}`);
      showError(this.lastError);
    }
  }

  onEvent(event) {
    if (event.type === "frame") {
      this.framesReceived += 1;
      $("stat-frame-ms").textContent = event.compute_ms.toFixed(1);
      $("stat-rtf").textContent = event.rtf.toFixed(2);
      $("stat-frames").textContent = this.framesReceived;
      if (event.buffered_ms != null) $("stat-buffer-ms").textContent = event.buffered_ms;
      return; // too many to log
    }
    log(`${event.type} ${JSON.stringify(event)}`);
    if (event.type === "state") {
      setTalkState(event.state);
      if (event.state === "thinking") transcript.newModelLine();
    } else if (event.type === "transcript") {
      transcript.addUser(event.text);
    } else if (event.type === "speech_started") {
      this.player.port.postMessage({ type: "flush" });
    } else if (event.type === "reply_end") {
      this.player.port.postMessage({ type: "drain" });
    } else if (event.type === "dropped") {
      // `frames` counts 80 ms microphone frames the server dropped (it fell behind): show time.
      $("stat-drops").textContent = ((event.frames * FRAME_SAMPLES) / SAMPLE_RATE).toFixed(1);
    }
  }

  startSending() {
    this.encoder = new OggOpusEncoder(
      SAMPLE_RATE,
      (page) => this.send(KIND.AUDIO, page),
      (error) => this.fail(`microphone encoding failed: ${error.message}`),
    );
    this.sending = true;
  }

  send(kind, payload) {
    if (this.socket.readyState !== WebSocket.OPEN) return;
    const message = new Uint8Array(1 + payload.length);
    message[0] = kind;
    message.set(payload, 1);
    this.socket.send(message);
  }

  onMicrophoneBlock(block) {
    let energy = 0;
    for (const sample of block) energy += sample * sample;
    const rms = Math.sqrt(energy / block.length);
    const decibels = 20 * Math.log10(rms + 1e-9);
    $("level").style.width = `${Math.max(0, Math.min(100, ((decibels + 60) / 60) * 100))}%`;
    if (!this.sending) return;
    const suppress =
      this.settings.mode === "duplex" && this.settings.echoSuppression && performance.now() < this.agentSpeakingUntil;
    this.encoder.encode(suppress ? new Float32Array(block.length) : block);
  }

  onReplyPcm(samples, rate) {
    if (this.replyResampler?.fromRate !== rate) this.replyResampler = new LinearResampler(rate, SAMPLE_RATE);
    const pcm = this.replyResampler.process(samples);
    this.samplesReceived += pcm.length;
    $("stat-audio-seconds").textContent = (this.samplesReceived / SAMPLE_RATE).toFixed(1);
    this.player.port.postMessage({ type: "push", samples: pcm }, [pcm.buffer]);
  }

  onPlayerState(state) {
    if (state.level > SPEAKING_LEVEL) this.agentSpeakingUntil = performance.now() + SPEAKING_HANGOVER_MS;
    if (this.settings.mode === "turn") $("stat-buffer-ms").textContent = Math.round((state.queuedSamples / SAMPLE_RATE) * 1000);
  }

  onClose(event) {
    log(`socket closed (${event.code})`);
    if (!this.stopped) {
      showError(this.lastError || `The server closed the conversation (code ${event.code}).`);
      endConversation();
    }
  }

  fail(message) {
    showError(message);
    log(message);
    endConversation();
  }

  stop() {
    this.stopped = true;
    this.sending = false;
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000);
    if (this.microphone) for (const track of this.microphone.getTracks()) track.stop();
    if (this.encoder) this.encoder.close();
    if (this.decoder) this.decoder.close();
    if (this.context) this.context.close();
  }
}

function resetStats() {
  for (const [id, value] of [["stat-frame-ms", "–"], ["stat-rtf", "–"], ["stat-frames", "0"], ["stat-audio-seconds", "0.0"], ["stat-buffer-ms", "0"], ["stat-drops", "0.0"]]) {
    $(id).textContent = value;
  }
}

async function startConversation() {
  showError("");
  resetStats();
  const settings = currentSettings();
  transcript.addDivider(`${settings.mode === "turn" ? "Turn-based" : "Full-duplex"} conversation, voice ${settings.voice}`);
  conversation = new Conversation(settings);
  setSettingsEnabled(false);
  updateTalkButton();
  try {
    await conversation.start();
  } catch (error) {
    showError(`Cannot start: ${error.message}. Allow the microphone and use http://localhost or https.`);
    endConversation();
  }
}

function endConversation() {
  if (conversation) conversation.stop();
  conversation = null;
  setTalkState("idle");
  setSettingsEnabled(true);
  updateTalkButton();
}

// ---------------------------------------------------------------- start-up

$("talk").addEventListener("click", () => (conversation ? endConversation() : startConversation()));
for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", updateModeControls);
window.addEventListener("pagehide", endConversation); // closing the page ends inference at once
setTalkState("idle");
updateModeControls();
loadChoices().catch((error) => showError(`Cannot load settings: ${error.message}`));
pollStatus();
