// The personagate browser caller: pick a persona, call it over WebRTC, hear it, read its live
// transcript, and see how long the first audio took. No build step, no dependencies.
//
// Signalling is one HTTP round trip: the complete SDP offer (ICE gathered, no trickle) is POSTed to
// /v1/webrtc/calls/{tenant}/{persona}; the answer comes back with the call's URL in Location and the call's
// secret in Personagate-Call-Secret: a DELETE of that URL with the secret as its bearer token hangs up (nobody
// else can). Call events and the agent's text arrive as JSON on the "events" data channel.
"use strict";

const ICE_GATHERING_CAP_MS = 2000;
const AUDIBLE_RMS = 0.005;  // about -46 dBFS: above decoded silence, well below any voice
const TOKEN_KEY = "personagate.token";
const LABELS = {idle: "Idle", connecting: "Connecting…", ringing: "Ringing…", live: "Live", ended: "Ended"};

const $ = (id) => document.getElementById(id);

// What the page shows, readable by tests and from the console.
const view = window.personagateCall = {
  state: "idle", firstAudioMs: null, setupMs: null, serverSetupMs: null, transcript: "", digits: "", error: null,
};
let iceServers = [];
let call = null;  // the call in progress: {clickedAt, pc, channel, mic, audioContext, meter, location, secret, ended}

function show(state, detail = "") {
  view.state = state;
  const status = $("status");
  status.dataset.state = state;
  status.textContent = LABELS[state] + (detail ? `: ${detail}` : "");
  enableControls();
}

function enableControls() {
  const busy = call !== null;
  $("call").disabled = busy || !$("persona").value;
  $("persona").disabled = busy;
  $("hangup").disabled = !busy;
  for (const key of $("keypad").querySelectorAll("button")) key.disabled = view.state !== "live";
}

function showError(message) {
  view.error = message;
  $("error").textContent = message ?? "";
  $("error").hidden = !message;
}

function showTime(id, ms) {
  $(id).textContent = ms === null ? "–" : `${Math.round(ms)} ms`;
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? {Authorization: `Bearer ${token}`} : {};
}

// An Error saying "HTTP 503: no agent free (retry after 5 s)" from the gateway's {"detail": ...}.
async function httpError(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch { /* not JSON: keep the status text */ }
  const retry = response.headers.get("Retry-After");
  return new Error(`HTTP ${response.status}: ${detail}${retry ? ` (retry after ${retry} s)` : ""}`);
}

function describe(error) {
  return error instanceof DOMException ? `${error.name}: ${error.message}` : error.message;
}

// --- Personas ---------------------------------------------------------------------------------

async function loadPersonas() {
  const token = $("token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
  showError(null);
  try {
    const response = await fetch("/v1/webrtc/personas", {headers: authHeaders()});
    if (!response.ok) throw await httpError(response);
    const body = await response.json();
    iceServers = body.ice_servers ?? [];
    fillPersonas(body.personas);
  } catch (error) {
    showError(`Could not list personas: ${describe(error)}`);
  }
  enableControls();
}

function fillPersonas(personas) {
  const select = $("persona");
  const params = new URLSearchParams(location.search);
  const linked = params.has("tenant") && params.has("persona") ? `${params.get("tenant")}/${params.get("persona")}` : "";
  const wanted = select.value || linked;
  select.replaceChildren();
  const groups = new Map();
  for (const p of personas) {
    if (!groups.has(p.tenant)) {
      groups.set(p.tenant, select.appendChild(document.createElement("optgroup")));
      groups.get(p.tenant).label = p.tenant_name || p.tenant;
    }
    const option = new Option(p.public ? p.persona : `${p.persona} (private)`, `${p.tenant}/${p.persona}`);
    option.dataset.description = [p.tenant_name, p.description].filter(Boolean).join(": ");
    groups.get(p.tenant).appendChild(option);
  }
  // A link may name a persona this list does not show (a private one, before the token is given):
  // offer it anyway, and let the gateway say why it refuses.
  if (wanted && ![...select.options].some((o) => o.value === wanted)) {
    select.appendChild(new Option(wanted, wanted));
  }
  if (wanted) select.value = wanted;
  if (!select.options.length) showError("No personas are available. A tenant admin can enter a token below.");
  describePersona();
}

function describePersona() {
  $("persona-description").textContent = $("persona").selectedOptions[0]?.dataset.description ?? "";
}

// --- The call ---------------------------------------------------------------------------------

async function startCall(event) {
  event.preventDefault();
  if (call || !$("persona").value) return;
  const [tenant, persona] = $("persona").value.split("/");
  // Created inside the click, so that the browser lets it run.
  const current = call = {clickedAt: performance.now(), audioContext: new AudioContext(), ended: false};
  Object.assign(view, {firstAudioMs: null, setupMs: null, serverSetupMs: null, transcript: "", digits: ""});
  $("digits").textContent = "";
  showTime("first-audio", null);
  showTime("setup-time", null);
  $("setup-time").title = "";
  $("transcript").textContent = "";
  showError(null);
  show("connecting");
  try {
    current.mic = await navigator.mediaDevices.getUserMedia(
      {audio: {echoCancellation: true, noiseSuppression: true, autoGainControl: true}},
    ).catch((error) => { throw new Error(`No microphone: ${describe(error)}`); });
    if (current.ended) {  // hung up while the browser asked for the microphone
      current.mic.getTracks().forEach((track) => track.stop());
      return;
    }
    const pc = current.pc = new RTCPeerConnection({iceServers});
    current.mic.getAudioTracks().forEach((track) => pc.addTrack(track, current.mic));
    current.channel = pc.createDataChannel("events");  // before the offer, so that the offer has it
    current.channel.onmessage = (message) => onEvent(current, JSON.parse(message.data));
    pc.ontrack = (event) => listen(current, event.streams[0] ?? new MediaStream([event.track]));
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") fail(current, new Error("the media connection failed"));
    };
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc);
    if (current.ended) return;  // hung up while gathering: nothing to tell the gateway yet
    const response = await fetch(
      `/v1/webrtc/calls/${encodeURIComponent(tenant)}/${encodeURIComponent(persona)}`,
      {method: "POST", headers: {"Content-Type": "application/sdp", ...authHeaders()}, body: pc.localDescription.sdp});
    if (!response.ok) throw await httpError(response);
    current.location = response.headers.get("Location");
    current.secret = response.headers.get("Personagate-Call-Secret");
    const answer = await response.text();
    if (current.ended) {  // hung up while the gateway answered
      deleteCall(current);
      return;
    }
    await pc.setRemoteDescription({type: "answer", sdp: answer});
  } catch (error) {
    fail(current, error);
  }
}

// Resolves once the offer holds every ICE candidate, or after ICE_GATHERING_CAP_MS with those found.
function iceGathered(pc) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      pc.removeEventListener("icegatheringstatechange", done);
      resolve();
    }, ICE_GATHERING_CAP_MS);
    pc.addEventListener("icegatheringstatechange", done);
  });
}

function onEvent(current, message) {
  if (current.ended) return;
  switch (message.type) {
    case "ringing":
      show("ringing");
      break;
    case "ready":
      view.setupMs = performance.now() - current.clickedAt;
      view.serverSetupMs = message.setup_ms ?? null;
      showTime("setup-time", view.setupMs);
      if (view.serverSetupMs !== null) $("setup-time").title = `the gateway's part: ${view.serverSetupMs} ms`;
      // After hours a public link may reach another persona (the after-hours desk): say which one answered.
      show("live", message.persona && !$("persona").value.endsWith(`/${message.persona}`)
        ? `${message.persona} answered` : "");
      break;
    case "text": {
      view.transcript += message.text;
      const box = $("transcript");
      box.textContent = view.transcript;
      box.scrollTop = box.scrollHeight;
      break;
    }
    case "transferring":  // the escalation key was pressed: the agent stays on while a person is called
      show("live", "calling a person…");
      break;
    case "transferred":
      show("live", "talking to a person");
      break;
    case "transfer_failed":
      show("live", `no person could take the call (${message.result ?? "failed"})`);
      break;
    case "ended":
      end(current, message.reason ?? "ended", {byServer: true});
      break;
  }
}

// Plays the agent's audio and times its first audible sample: an AnalyserNode polled every 10 ms.
// Sound before "ready" (a ringback, say) is not the agent's and is not counted.
function listen(current, stream) {
  if (current.meter || current.ended) return;
  // Chrome feeds a remote track to WebAudio only while a media element plays it.
  $("agent-audio").srcObject = stream;
  const analyser = current.audioContext.createAnalyser();
  analyser.fftSize = 512;
  current.audioContext.createMediaStreamSource(stream).connect(analyser);
  current.audioContext.resume();
  const samples = new Float32Array(analyser.fftSize);
  current.meter = setInterval(() => {
    if (view.setupMs === null) return;
    analyser.getFloatTimeDomainData(samples);
    const rms = Math.sqrt(samples.reduce((sum, x) => sum + x * x, 0) / samples.length);
    if (rms < AUDIBLE_RMS) return;
    view.firstAudioMs = performance.now() - current.clickedAt;
    showTime("first-audio", view.firstAudioMs);
    clearInterval(current.meter);
  }, 10);
}

// A key of the keypad: browsers have no telephone-event codec, so keys go on the data channel.
function press(event) {
  const digit = event.target.dataset?.digit;
  if (!digit || !call?.channel || call.channel.readyState !== "open") return;
  call.channel.send(JSON.stringify({type: "dtmf", digit}));
  view.digits += digit;
  $("digits").textContent = view.digits;
}

function hangUp() {
  if (call) end(call, "hangup");
}

function fail(current, error) {
  if (current.ended) return;
  showError(describe(error));
  end(current, "failed");
}

// Ends the call once: tells the gateway (unless it ended the call), then releases everything.
function end(current, reason, {byServer = false} = {}) {
  if (current.ended) return;
  current.ended = true;
  if (!byServer) {
    if (current.channel?.readyState === "open") current.channel.send(JSON.stringify({type: "hangup"}));
    deleteCall(current);
  }
  clearInterval(current.meter);
  current.mic?.getTracks().forEach((track) => track.stop());
  current.pc?.close();
  current.audioContext.close();
  $("agent-audio").srcObject = null;
  if (call === current) call = null;
  show("ended", reason);
}

// Hangs up with the call's own secret (kept in this page's memory only).
function deleteCall(current) {
  if (!current.location || !current.secret) return;
  // keepalive: the request outlives the page when it is closed mid-call.
  fetch(current.location, {method: "DELETE", headers: {Authorization: `Bearer ${current.secret}`}, keepalive: true})
    .catch(() => {});
}

// --- Wiring -----------------------------------------------------------------------------------

$("token").value = sessionStorage.getItem(TOKEN_KEY) ?? "";
$("setup").addEventListener("submit", startCall);
$("hangup").addEventListener("click", hangUp);
$("keypad").addEventListener("click", press);
$("persona").addEventListener("change", describePersona);
$("load").addEventListener("click", loadPersonas);
$("token").addEventListener("keydown", (event) => {
  if (event.key !== "Enter") return;
  event.preventDefault();  // Enter here reloads the list; it does not place a call
  loadPersonas();
});
window.addEventListener("pagehide", () => {
  if (call) end(call, "page closed");
});
show("idle");
loadPersonas();
