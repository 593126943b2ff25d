/* The rotation run page: polls progress.json and updates the progress bar, counters, state,
   controls and checklist in place (no reload). Loaded with <script src defer>; no inline code. */
(function () {
  "use strict";

  var POLL_MS = 1500;
  var IDLE_POLL_MS = 5000; // waiting for approval or the grace period: nothing moves fast

  function setText(root, field, value) {
    root.querySelectorAll('[data-field="' + field + '"]').forEach(function (node) {
      node.textContent = value === null || value === undefined || value === "" ? "\u2014" : String(value);
    });
  }

  function setMessage(root, field, value) {
    root.querySelectorAll('[data-field="' + field + '"]').forEach(function (node) {
      node.textContent = value || "";
      node.hidden = !value;
    });
  }

  function formatEta(seconds) {
    if (seconds === null || seconds === undefined) { return "\u2014"; }
    if (seconds < 90) { return seconds + " s"; }
    if (seconds < 5400) { return Math.round(seconds / 60) + " min"; }
    return (seconds / 3600).toFixed(1) + " h";
  }

  function updateSteps(steps) {
    steps.forEach(function (step) {
      var item = document.getElementById("step-" + step.key);
      if (!item || item.getAttribute("data-status") === step.status) { return; }
      item.setAttribute("data-status", step.status);
      item.className = "kv-step kv-step-" + step.status;
      var status = item.querySelector(".kv-step-status");
      if (status) { status.textContent = step.status_label; }
      var meta = item.querySelector(".kv-step-meta");
      if (meta && step.done_by) {
        meta.textContent = step.done_by + ", " + (step.done_at || "").replace("T", " ").slice(0, 19);
      }
      var evidence = item.querySelector(".kv-step-evidence");
      if (evidence) { evidence.textContent = step.evidence || ""; }
      if (step.status !== "pending") {
        var form = item.querySelector(".kv-tick-form");
        if (form) { form.hidden = true; }
      }
    });
  }

  function updatePartitions(root, partitions) {
    // Owners come from workers: cells are filled with textContent, never HTML.
    if (!partitions) { return; }
    setText(root, "partitions_summary", partitions.summary);
    var table = document.getElementById("kv-partitions");
    if (!table) { return; }
    var body = table.querySelector("tbody");
    body.replaceChildren();
    partitions.open_partitions.forEach(function (part) {
      var row = document.createElement("tr");
      row.className = "kv-partition" + (part.lease_expired ? " kv-lease-expired" : "");
      [[part.id, ""], ["[" + part.lo + ", " + part.hi + ")", ""], [part.owner_label, "kv-partition-owner"],
        [part.lease_label, "kv-partition-lease"], [part.progress_label, ""]].forEach(function (cellSpec) {
        var cell = document.createElement("td");
        cell.textContent = String(cellSpec[0]);
        if (cellSpec[1]) { cell.className = cellSpec[1]; }
        row.appendChild(cell);
      });
      body.appendChild(row);
    });
    table.hidden = partitions.open_partitions.length === 0;
  }

  function update(root, data) {
    var bar = document.getElementById("kv-progress-bar");
    if (bar) { bar.value = data.percent; bar.textContent = data.percent + "%"; }
    setText(root, "percent", data.percent);
    setText(root, "rewrapped", data.rewrapped);
    setText(root, "total", data.total);
    setText(root, "failed", data.failed);
    setText(root, "rate", data.rate);
    setText(root, "previous_version", data.previous_version);
    setText(root, "target_version", data.target_version);
    setText(root, "retire_after", data.retire_after ? data.retire_after.replace("T", " ").slice(0, 19) : null);
    root.querySelectorAll('[data-field="eta"]').forEach(function (node) { node.textContent = formatEta(data.eta_seconds); });
    setMessage(root, "paused_reason", data.paused_reason);
    setMessage(root, "last_error", data.last_error);
    (data.rate_limits || []).forEach(function (limit) {
      var item = root.querySelector('[data-rate-limit="' + limit.provider + '"]');
      if (item) { item.textContent = limit.text; }
    });
    var state = document.getElementById("kv-run-state");
    if (state) {
      state.textContent = data.state_label;
      state.className = "kv-state kv-run-state-" + data.state;
    }
    root.setAttribute("data-state", data.state);
    root.setAttribute("data-active", data.active ? "true" : "false");
    root.querySelectorAll("[data-run-action]").forEach(function (node) {
      node.hidden = data.actions.indexOf(node.getAttribute("data-run-action")) < 0;
    });
    updatePartitions(root, data.partitions);
    updateSteps(data.steps);
  }

  function poll(root) {
    var url = root.getAttribute("data-progress-url");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (data) {
        update(root, data);
        if (data.active) {
          var busy = ["queued", "rotating", "rewrapping", "verifying"].indexOf(data.state) >= 0;
          window.setTimeout(function () { poll(root); }, busy ? POLL_MS : IDLE_POLL_MS);
        }
      })
      .catch(function () {
        window.setTimeout(function () { poll(root); }, IDLE_POLL_MS); // a blip: keep trying, slower
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var root = document.getElementById("kv-run");
    if (root && root.getAttribute("data-progress-url") && root.getAttribute("data-active") === "true") {
      window.setTimeout(function () { poll(root); }, POLL_MS);
    }
  });
})();
