// The upload page: send the chosen or dropped image to POST predict, show the top 5 as bars.
"use strict";

(function () {
  const form = document.getElementById("upload-form");
  const input = document.getElementById("image-input");
  const dropzone = document.getElementById("dropzone");
  const button = document.getElementById("classify-button");
  const statusLine = document.getElementById("status");
  const errorBox = document.getElementById("error");
  const result = document.getElementById("result");
  const preview = document.getElementById("preview");
  const caption = document.getElementById("preview-caption");
  const list = document.getElementById("predictions");
  const heading = document.getElementById("result-heading");
  const weightsWarning = document.getElementById("weights-warning");
  const keyBox = document.getElementById("key-box");
  const keyInput = document.getElementById("api-key");
  const modelBox = document.getElementById("model-box");
  const modelSelect = document.getElementById("model-select");
  const KEY_STORAGE = "imgserve-api-key"; // sessionStorage: this tab only, gone when it closes

  let currentFile = null;
  let inFlight = null; // AbortController of the request being waited for
  let previewUrl = null;

  const PREFIXES = {
    400: "The server could not use this file",
    401: "The server needs a valid API key",
    413: "The file is too large",
    503: "The server is busy or not ready",
    504: "The server took too long",
  };

  function percent(p) {
    const value = p * 100;
    if (value > 0 && value < 0.01) return "<0.01%";
    return value.toFixed(value >= 10 ? 1 : 2) + "%";
  }

  function humanLabel(label) {
    return label.replace(/_/g, " ");
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function clearError() {
    errorBox.textContent = "";
    errorBox.hidden = true;
  }

  function setBusy(busy, text) {
    form.setAttribute("aria-busy", busy ? "true" : "false");
    button.disabled = busy;
    statusLine.textContent = text;
  }

  function showPreview(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.alt = "The uploaded image, " + file.name;
    caption.textContent = file.name;
    preview.parentElement.hidden = false;
    preview.src = previewUrl;
  }

  preview.addEventListener("load", function () {
    result.hidden = false;
  });
  preview.addEventListener("error", function () {
    // Not something the browser can display (or not an image at all): show no broken picture.
    preview.parentElement.hidden = true;
    if (!list.children.length) result.hidden = true;
  });

  function renderPredictions(predictions) {
    list.replaceChildren();
    for (const item of predictions) {
      const row = document.createElement("li");
      row.className = "prediction";
      row.dataset.label = item.label;
      row.dataset.probability = String(item.probability);

      const name = document.createElement("span");
      name.className = "prediction-label";
      name.textContent = humanLabel(item.label);

      const track = document.createElement("span");
      track.className = "bar-track";
      track.setAttribute("aria-hidden", "true");
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = Math.min(100, Math.max(0, item.probability * 100)) + "%";
      track.appendChild(bar);

      const value = document.createElement("span");
      value.className = "prediction-value";
      value.textContent = percent(item.probability);

      row.append(name, track, value);
      list.appendChild(row);
    }
    heading.textContent = "Top 5";
    result.hidden = false;
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch (_) {
      return null; // not JSON, e.g. an HTML error page from a proxy
    }
  }

  function failureMessage(response, body) {
    const prefix = PREFIXES[response.status] || "The server answered " + response.status;
    if (!body || typeof body.error !== "string") {
      return prefix + " (HTTP " + response.status + " " + response.statusText + ") without an explanation.";
    }
    let message = prefix + ": " + body.error;
    const retryAfter = response.headers.get("Retry-After");
    if (retryAfter) message += " (the server suggests waiting " + retryAfter + " s)";
    return message;
  }

  // Random weights make every answer meaningless: say so, whether /readyz or an answer tells us.
  function warnIfRandom(weights) {
    if (weights.includes("none")) weightsWarning.hidden = false;
  }

  // With API_KEYS set on the server, ask for a key before the upload and send it as a bearer token.
  function askForKey() {
    keyInput.value = keyInput.value || sessionStorage.getItem(KEY_STORAGE) || "";
    keyBox.hidden = false;
  }

  function apiKey() {
    return keyBox.hidden ? "" : keyInput.value.trim();
  }

  keyInput.addEventListener("input", function () {
    sessionStorage.setItem(KEY_STORAGE, keyInput.value.trim());
  });

  async function checkModel() {
    try {
      const body = await readJson(await fetch("readyz"));
      if (body && body.api_keys_required === true) askForKey();
      if (body && Array.isArray(body.models)) warnIfRandom(body.models.map(function (m) { return m.weights; }));
    } catch (err) {
      // Not ready or unreachable: the upload itself will say so.
    }
    await listModels();
  }

  // The model picker, from GET models: shown when the stack serves more than one model.
  async function listModels() {
    try {
      const headers = apiKey() ? { Authorization: "Bearer " + apiKey() } : {};
      const body = await readJson(await fetch("models", { headers: headers }));
      if (!body || !Array.isArray(body.models)) return;
      modelSelect.replaceChildren();
      for (const model of body.models) {
        const option = document.createElement("option");
        option.value = model.name;
        option.textContent = model.name + (model.workers ? "" : " (no worker yet)");
        option.selected = model.name === body.default;
        modelSelect.appendChild(option);
      }
      modelBox.hidden = body.models.length < 2;
    } catch (err) {
      // The picker stays hidden: uploads go to the default model.
    }
  }

  async function classify(file) {
    if (!keyBox.hidden && !apiKey()) {
      showError("Enter the API key first, then choose Classify.");
      keyInput.focus();
      return;
    }
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;
    clearError();
    list.replaceChildren();
    heading.textContent = "Your image";
    showPreview(file);
    setBusy(true, "Classifying " + file.name + " …");

    const data = new FormData();
    data.append("image", file, file.name);
    try {
      const headers = apiKey() ? { Authorization: "Bearer " + apiKey() } : {};
      // One model: no picker, and the request is as it always was.
      const picked = !modelBox.hidden && modelSelect.value;
      const target = picked ? "predict?model=" + encodeURIComponent(modelSelect.value) : "predict";
      const response = await fetch(target, { method: "POST", body: data, headers: headers, signal: controller.signal });
      const body = await readJson(response);
      if (response.status === 401) askForKey();
      if (response.ok && body && body.success && Array.isArray(body.predictions)) {
        warnIfRandom([body.weights]);
        renderPredictions(body.predictions);
        setBusy(false, "Done: the five most likely classes for " + file.name + ".");
      } else {
        showError(failureMessage(response, body));
        setBusy(false, "");
      }
    } catch (err) {
      if (controller.signal.aborted) return; // a newer upload replaced this one
      showError("Could not reach the server (" + err.message + "). Check that it is running, then try again.");
      setBusy(false, "");
    } finally {
      if (inFlight === controller) inFlight = null;
    }
  }

  input.addEventListener("change", function () {
    if (input.files.length) {
      currentFile = input.files[0];
      classify(currentFile);
    }
  });

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (currentFile) {
      classify(currentFile);
    } else {
      showError("Choose an image first.");
      input.focus();
    }
  });

  ["dragenter", "dragover"].forEach(function (type) {
    dropzone.addEventListener(type, function (event) {
      event.preventDefault();
      dropzone.classList.add("dragging");
    });
  });
  ["dragleave", "drop"].forEach(function (type) {
    dropzone.addEventListener(type, function () {
      dropzone.classList.remove("dragging");
    });
  });
  dropzone.addEventListener("drop", function (event) {
    event.preventDefault();
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) {
      currentFile = files[0];
      classify(currentFile);
    }
  });
  checkModel();
})();
