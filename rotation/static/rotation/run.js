/* The rotation run page: polls progress.json and updates every part in place (no reload): state
   and summary, progress bar and counters, approvals, timeline, the controls the state allows and
   the runbook checklist. Also gives the runbook panel's code copy buttons and remembers whether
   the panel is open. Loaded with <script src defer>; no inline code (strict CSP). Everything from
   the server is set with textContent, never as HTML. */
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

  function cell(text) {
    var node = document.createElement("td");
    node.textContent = text === null || text === undefined || text === "" ? "\u2014" : String(text);
    return node;
  }

  function updateApprovals(data) {
    var table = document.getElementById("kv-approvals-table");
    if (!table || !data.approvals) { return; }
    var body = table.querySelector("tbody");
    body.replaceChildren();
    data.approvals.forEach(function (approval) {
      var row = document.createElement("tr");
      row.className = "kv-approval";
      [approval.who, approval.decision, approval.comment, approval.break_glass ? "yes" : "no", approval.when]
        .forEach(function (text) { row.appendChild(cell(text)); });
      body.appendChild(row);
    });
    table.hidden = data.approvals.length === 0;
    var none = document.getElementById("kv-no-approvals");
    if (none) { none.hidden = data.approvals.length > 0; }
  }

  function updateTimeline(entries) {
    var list = document.getElementById("kv-timeline-list");
    if (!list || !entries) { return; }
    list.replaceChildren();
    entries.forEach(function (entry) {
      var item = document.createElement("li");
      var time = document.createElement("time");
      time.setAttribute("datetime", entry.at);
      time.textContent = entry.when;
      var label = document.createElement("span");
      label.className = "kv-timeline-label";
      label.textContent = entry.label;
      var actor = document.createElement("span");
      actor.className = "kv-actor";
      actor.textContent = "(" + entry.actor + ")";
      item.append(time, " ", label, " ", actor);
      list.appendChild(item);
    });
    if (entries.length === 0) {
      var empty = document.createElement("li");
      empty.textContent = "No events yet.";
      list.appendChild(empty);
    }
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
    root.querySelectorAll('[data-field="eta"]').forEach(function (node) { node.textContent = formatEta(data.eta_seconds); });
    setMessage(root, "paused_reason", data.paused_reason);
    // A failed run's error is its status sentence; a retrying run's error shows under the counters.
    setMessage(root, "last_error", data.phase === "failed" ? "" : data.last_error);
    (data.rate_limits || []).forEach(function (limit) {
      var item = root.querySelector('[data-rate-limit="' + limit.provider + '"]');
      if (item) { item.textContent = limit.text; }
    });
    var state = document.getElementById("kv-run-state");
    if (state) {
      state.textContent = data.badge;
      state.title = data.state_label;
      state.className = "kv-state kv-run-state-" + data.state;
    }
    setText(root, "summary", data.summary);
    setText(root, "retire_after_label", data.retire_after_label);
    setText(root, "approvals_summary", data.approvals_summary);
    var status = document.getElementById("kv-status");
    if (status) { status.className = "module kv-run-status kv-phase-" + data.phase; }
    var line = document.getElementById("kv-progress-line");
    if (line) { line.hidden = !data.show_bar; }
    var counts = document.getElementById("kv-progress-counts");
    if (counts) { counts.hidden = !data.show_counts; }
    var partitions = document.getElementById("kv-partitions-box");
    if (partitions) { partitions.hidden = !data.show_counts; } // nothing to partition before data keys are counted
    updateApprovals(data);
    updateTimeline(data.timeline);
    root.setAttribute("data-state", data.state);
    root.setAttribute("data-phase", data.phase);
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

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) { return navigator.clipboard.writeText(text); }
    var area = document.createElement("textarea"); // plain http: the old way
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "kv-copy-scratch";
    document.body.appendChild(area);
    area.select();
    var copied = document.execCommand("copy");
    area.remove();
    return copied ? Promise.resolve() : Promise.reject(new Error("copy refused"));
  }

  function addCopyButtons(panel) {
    // One button per command: each code block, and each inline `code` that is a command (has a
    // space), not a lone name such as `local`.
    panel.querySelectorAll("code").forEach(function (code) {
      var pre = code.parentElement && code.parentElement.tagName === "PRE" ? code.parentElement : null;
      if (!pre && !/\s/.test(code.textContent.trim())) { return; }
      var button = document.createElement("button");
      button.type = "button";
      button.className = "kv-copy";
      button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy " + code.textContent);
      button.addEventListener("click", function () {
        copyText(code.textContent).then(function () {
          button.textContent = "Copied";
          button.classList.add("kv-copied");
        }, function () {
          button.textContent = "Select and copy";
        });
        window.setTimeout(function () { button.textContent = "Copy"; button.classList.remove("kv-copied"); }, 2000);
      });
      if (pre) { pre.classList.add("kv-has-copy"); pre.appendChild(button); } else { code.after(button); }
    });
  }

  function rememberPanel(panel) {
    var key = "kv-runbook-panel-open";
    try {
      if (window.localStorage.getItem(key) === "false") { panel.open = false; }
      panel.addEventListener("toggle", function () { window.localStorage.setItem(key, String(panel.open)); });
    } catch (error) { /* storage disabled: the panel simply starts open */ }
  }

  document.addEventListener("DOMContentLoaded", function () {
    var panel = document.getElementById("kv-runbook");
    if (panel) { addCopyButtons(panel); rememberPanel(panel); }
    var root = document.getElementById("kv-run");
    if (root && root.getAttribute("data-progress-url") && root.getAttribute("data-active") === "true") {
      window.setTimeout(function () { poll(root); }, POLL_MS);
    }
  });
})();
