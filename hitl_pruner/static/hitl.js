/* hitl-pruner in the browser: Prune/Fail buttons and outcome toasts inside optuna-dashboard,
   and the Human actions page.

   Inside the dashboard this script only reads and adds DOM; it never edits the dashboard's
   files. It relies on:
   - fetch: the dashboard's API client calls window.fetch for every request (0.21; 0.19 and
     0.20 call XMLHttpRequest, through axios: wrapped too), so wrapping it lets us read
     X-Hitl-Outcome from note saves and see which trial states the dashboard got;
   - the trial view (TrialListDetail): an <h4> "Trial N (trial_id=T)" followed by a row whose
     first chip is the trial's state, and the trial list, whose items are "Trial N" followed
     by chips.

   Why the stand-in chip: the dashboard refreshes a study every 2-10 s, and then only from its
   first RUNNING or WAITING trial on; trials before that are never fetched again until the page
   is reloaded. So a relabelled COMPLETE trial would keep its old chip. Until the dashboard's
   own copy of the trial shows the new state, we hide its chip and show the state the server
   reported: after this page's own note saves, and for every change made anywhere else (another
   user, a script's note, the sweep, a worker), which a short poll of the study's audit brings
   within a second (see "live" below). */
(() => {
  "use strict";

  const SCRIPT = document.currentScript;
  const PREFIX = SCRIPT
    ? new URL(SCRIPT.src, location.href).pathname.replace(/\/hitl\/static\/hitl\.js$/, "")
    : "";
  const OUTCOME_HEADER = "X-Hitl-Outcome";
  const NOTE_PATH = /^\/api\/studies\/(\d+)\/(\d+)\/note\/*$/;
  const STUDY_PATH = /^\/api\/studies\/(\d+)\/*$/;
  const STUDY_PAGE = /^\/dashboard\/studies\/(\d+)(?:\/|$)/;
  const TRIALS_PAGE = /^\/dashboard\/studies\/(\d+)\/trials\/*$/;
  const DETAIL_TITLE = /^Trial (\d+) \(trial_id=(\d+)\)$/;
  const LIST_TITLE = /^Trial (\d+)$/;
  const LABELS = {
    RUNNING: "Running",
    WAITING: "Waiting",
    COMPLETE: "Complete",
    PRUNED: "Pruned",
    FAIL: "Fail",
  };

  const realFetch = window.fetch.bind(window);

  /* -- under a path prefix ------------------------------------------------------------------ */

  // Behind a proxy at e.g. /optuna, the server moves the dashboard's routes and API calls under
  // the prefix (in its bundle), but the dashboard still writes some root-relative URLs:
  // artifact images and links, images in notes (saved as /artifacts/...), the CSV download.
  // Those are moved under the prefix as they are set, before the browser requests them.
  const ROOTED = /^\/(api|artifacts|csv|static|dashboard)(\/|\?|$)/;
  const underPrefix = (value) => (ROOTED.test(value) ? PREFIX + value : value);
  if (PREFIX) {
    const setAttribute = Element.prototype.setAttribute;
    Element.prototype.setAttribute = function hitlSetAttribute(name, value) {
      const attr = String(name).toLowerCase();
      const moved = attr === "src" || attr === "href" ? underPrefix(String(value)) : value;
      return setAttribute.call(this, name, moved);
    };
    for (const [type, prop] of [
      [HTMLImageElement, "src"],
      [HTMLAnchorElement, "href"],
      [HTMLIFrameElement, "src"],
    ]) {
      const desc = Object.getOwnPropertyDescriptor(type.prototype, prop);
      Object.defineProperty(type.prototype, prop, {
        ...desc,
        set(value) {
          desc.set.call(this, underPrefix(String(value)));
        },
      });
    }
  }

  // trial_id -> {studyId, number, state: "Pruned"}: states the server reported (after a note
  // save, or in the study's changes) that the dashboard does not show yet.
  const overrides = new Map();
  // `${trialId}:${state}` -> Promise of /hitl/api/studies/<sid>/<tid>, for the buttons.
  const trialInfo = new Map();

  const local = (url) => {
    const u = new URL(url, location.href);
    if (u.origin !== location.origin || !u.pathname.startsWith(PREFIX)) {
      return null;
    }
    return u.pathname.slice(PREFIX.length);
  };

  /* -- toasts --------------------------------------------------------------------------- */

  const toastBox = () => {
    let box = document.querySelector(".hitl-toasts");
    if (!box) {
      box = document.createElement("div");
      box.className = "hitl-toasts";
      box.setAttribute("role", "status");
      box.setAttribute("aria-live", "polite");
      document.body.appendChild(box);
    }
    return box;
  };

  const toast = ({ kind, action, title, detail, links }) => {
    const el = document.createElement("div");
    el.className = "hitl-toast";
    el.dataset.kind = kind;
    if (action) {
      el.dataset.action = action;
    }
    const body = document.createElement("div");
    body.className = "hitl-toast-body";
    const titleEl = document.createElement("div");
    titleEl.className = "hitl-toast-title";
    titleEl.textContent = title;
    body.appendChild(titleEl);
    if (detail) {
      const detailEl = document.createElement("div");
      detailEl.className = "hitl-toast-detail";
      detailEl.textContent = detail;
      body.appendChild(detailEl);
    }
    if (links && links.length) {
      const linksEl = document.createElement("div");
      linksEl.className = "hitl-toast-links";
      for (const link of links) {
        let a;
        if (link.href) {
          a = document.createElement("a");
          a.href = link.href;
        } else {
          a = document.createElement("button");
          a.type = "button";
          a.addEventListener("click", link.onClick);
        }
        a.textContent = link.text;
        linksEl.appendChild(a);
      }
      body.appendChild(linksEl);
    }
    const close = document.createElement("button");
    close.type = "button";
    close.className = "hitl-toast-close";
    close.setAttribute("aria-label", "Close");
    close.textContent = "\u00d7";
    close.addEventListener("click", () => el.remove());
    el.append(body, close);
    toastBox().appendChild(el);
    const box = toastBox();
    while (box.children.length > 4) {
      box.firstElementChild.remove();
    }
    setTimeout(() => el.remove(), kind === "success" || kind === "info" ? 8000 : 15000);
    return el;
  };

  const trialName = (number, trialId) =>
    number !== undefined && number !== null ? `Trial ${number}` : `Trial id ${trialId}`;

  // What a note save did, for a person: one toast per X-Hitl-Outcome.
  const describe = (outcome, number) => {
    const who = trialName(number, outcome.trial_id);
    const change = outcome.from && outcome.to ? `${outcome.from} \u2192 ${outcome.to}` : "";
    // From a study's page, to its actions (and from there back to it).
    const here = STUDY_PAGE.exec(location.pathname.slice(PREFIX.length));
    const actions = { text: "Human actions", href: `${PREFIX}/hitl/actions${here ? `?study=${here[1]}` : ""}` };
    // Plots, tables and notes of finished trials update only when the page loads again.
    const reload = { text: "Reload page", onClick: () => location.reload() };
    switch (outcome.action) {
      case "applied":
        return {
          kind: "success",
          title: `${who}: ${change}`,
          detail: outcome.reason,
          links: document.body.dataset.hitlPage === "actions" ? [] : [actions, reload],
        };
      case "requested":
        return {
          kind: "info",
          title: `Requested from the worker: ${who} \u2192 ${outcome.to || "?"}`,
          detail: `${outcome.reason}: it ends the trial at its next pruning check, or the server does after a grace period`,
          links: [actions],
        };
      case "dry run":
        return {
          kind: "info",
          title: `Dry run, nothing changed: ${who} would go ${change}`,
          detail: outcome.reason,
        };
      case "refused":
        return { kind: "warning", title: `Refused for ${who}`, detail: outcome.reason };
      case "not monitored":
        return { kind: "warning", title: `Not applied: ${who} is not monitored`, detail: outcome.reason };
      case "nothing to do":
        return { kind: "info", title: `Note saved: nothing to change for ${who}`, detail: outcome.reason };
      case "lost race":
        return {
          kind: "warning",
          title: `Not applied yet: ${who} changed meanwhile`,
          detail: "the sweep looks at the note again in a moment",
        };
      case "error":
        return { kind: "error", title: `Not applied yet for ${who}`, detail: outcome.reason };
      default:
        return { kind: "info", title: `${who}: ${outcome.action}`, detail: outcome.reason };
    }
  };

  const showOutcome = (outcome, number) => {
    toast({ action: outcome.action, ...describe(outcome, number) });
  };

  /* -- fetch: outcomes, fresh states, and the dashboard's 204 answers --------------------- */

  const numberOf = (trialId) => {
    for (const h of document.querySelectorAll("h4")) {
      const m = DETAIL_TITLE.exec(h.textContent || "");
      if (m && Number(m[2]) === trialId) {
        return Number(m[1]);
      }
    }
    const o = overrides.get(trialId);
    return o ? o.number : undefined;
  };

  // Read the outcome of a saved trial note, show it, and remember a changed state.
  const noteSaved = (studyId, trialId, response, number) => {
    const raw = response.headers.get(OUTCOME_HEADER);
    if (!raw) {
      return null;
    }
    let outcome;
    try {
      outcome = JSON.parse(raw);
    } catch (e) {
      return null;
    }
    forgetInfo(trialId);
    const num = number !== undefined ? number : numberOf(trialId);
    if (outcome.action === "applied" && LABELS[outcome.to]) {
      overrides.set(trialId, { studyId, number: num, state: LABELS[outcome.to] });
    }
    showOutcome(outcome, num);
    decorate();
    return outcome;
  };

  // The dashboard fetched some of a study's trials: those it got in the state we stand in for
  // need us no more. One in another state keeps its stand-in: with several server processes,
  // the answer can come from one that cached the trial just before the change (for a moment:
  // each process forgets a changed study within a quarter second, live.py).
  const studyFetched = (studyId, readJson) => {
    const waiting = [...overrides.values()].some((o) => o.studyId === studyId);
    if (!waiting) {
      return;
    }
    readJson()
      .then((data) => {
        for (const trial of data.trials || []) {
          const o = overrides.get(trial.trial_id);
          if (o && o.state === trial.state) {
            overrides.delete(trial.trial_id);
          }
        }
        // The dashboard renders the same answer; look again once it has.
        setTimeout(decorate, 50);
      })
      .catch(() => {});
  };

  // An answer of the dashboard's API, whichever way the dashboard asked (fetch or XHR, below):
  // ``answer`` has status, ok and headers.get/has; ``readJson`` reads its body.
  const answered = (url, method, answer, readJson) => {
    const path = local(url);
    if (path === null || !path.startsWith("/api/")) {
      return;
    }
    try {
      const note = NOTE_PATH.exec(path);
      const study = STUDY_PATH.exec(path);
      if (note && method === "PUT" && editorSaves.has(Number(note[2]))) {
        // A button's save through the dashboard's note editor (act): the button reads it.
        // Its body is read now, before the dashboard reads (and so uses up) the answer.
        const body = readJson().catch(() => ({}));
        if (answer.status === 409) {
          editorConflictAt = performance.now();
        }
        editorSaves.get(Number(note[2]))({ status: answer.status, answer, body });
      } else if (note && method === "PUT" && answer.status === 204) {
        noteSaved(Number(note[1]), Number(note[2]), answer);
      } else if (answer.headers.has(OUTCOME_HEADER)) {
        // e.g. the dashboard's Fail Trial button, which hitl-pruner handles too.
        const outcome = JSON.parse(answer.headers.get(OUTCOME_HEADER));
        showOutcome(outcome, numberOf(outcome.trial_id));
      } else if (study && method === "GET" && answer.ok) {
        studyFetched(Number(study[1]), readJson);
      }
    } catch (e) {
      // Never let our bookkeeping break the dashboard's request.
    }
  };

  // optuna-dashboard 0.19 and 0.20 call their API through axios, that is XMLHttpRequest
  // (0.21 calls fetch): their answers are read here, before axios hands them on.
  const realOpen = XMLHttpRequest.prototype.open;
  const realSend = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.open = function hitlOpen(method, url, ...rest) {
    this.hitlRequest = { method: String(method).toUpperCase(), url: String(url) };
    return realOpen.call(this, method, url, ...rest);
  };
  XMLHttpRequest.prototype.send = function hitlSend(body) {
    const request = this.hitlRequest;
    if (request) {
      this.addEventListener("load", () => {
        const headers = {
          get: (name) => this.getResponseHeader(name),
          has: (name) => this.getResponseHeader(name) !== null,
        };
        const ok = this.status >= 200 && this.status < 300;
        const readJson = () => new Promise((resolve) => resolve(JSON.parse(this.responseText)));
        answered(request.url, request.method, { status: this.status, ok, headers }, readJson);
      });
    }
    return realSend.call(this, body);
  };

  window.fetch = async function hitlFetch(input, init) {
    if (PREFIX && typeof input === "string") {
      input = underPrefix(input);
    }
    const url = input instanceof Request ? input.url : String(input);
    const method = ((init && init.method) || (input instanceof Request ? input.method : "GET"))
      .toUpperCase();
    const response = await realFetch(input, init);
    answered(url, method, response, () => response.clone().json());
    if (response.status === 204) {
      // optuna-dashboard 0.21's API client parses every answer as JSON, and its 204 answers
      // have no body: without this, saving a note, telling a trial or deleting an artifact
      // throws in the browser, with or without hitl-pruner. We hand it an empty object.
      return new Response("{}", {
        status: 200,
        statusText: "OK",
        headers: response.headers,
      });
    }
    return response;
  };

  /* -- live: every human action, wherever it was made -------------------------------------- */

  // Every state change a human causes through hitl-pruner is an audit record. While a study is
  // on screen (and the tab visible), ask for the records after the last one seen every half
  // second, and show each trial's new state as this page's own saves are shown. A short poll:
  // no request stays open on the server. No toast: the sweep or a script can end hundreds of
  // trials at once, and the chip that changes (with a brief highlight) is the news.
  const LIVE_EVERY_MS = 500;
  const LIVE_RETRY_MS = 5000;
  // Audit ids are handed out before commit, so a record can become visible a moment after one
  // with a higher id (two servers writing at once). Each poll asks again from the cursor as it
  // was this long ago; a record seen before changes nothing, unless a note save's answer that
  // was under way meanwhile put an older state on screen.
  const LATE_COMMIT_MS = 2000;
  const live = {
    cursor: null, // the server's "latest": records up to it have been asked for
    left: [], // [{cursor, at}]: cursors moved past within LATE_COMMIT_MS, oldest first
    resume: null, // the answer stopped at its limit ("more"): go on from here at once
    newest: new Map(), // trial_id -> the id of its newest record seen
  };

  const forgetInfo = (trialId) => {
    for (const key of trialInfo.keys()) {
      if (key.startsWith(`${trialId}:`)) {
        trialInfo.delete(key);
      }
    }
  };

  const liveSince = (now) => {
    if (live.resume !== null) {
      return live.resume;
    }
    while (live.left.length && now - live.left[0].at > LATE_COMMIT_MS) {
      live.left.shift();
    }
    return live.left.length ? live.left[0].cursor : live.cursor;
  };

  // A record of this study: its trial shows the record's state, unless a newer record of the
  // trial was seen. Seen before, it stands in again only for a different state on screen.
  const liveChange = (studyId, change) => {
    const state = LABELS[change.to_state];
    const newest = live.newest.get(change.trial_id);
    if (!state || (newest !== undefined && newest > change.id)) {
      return false;
    }
    live.newest.set(change.trial_id, change.id);
    const o = overrides.get(change.trial_id);
    if (newest === change.id && (!o || o.state === state)) {
      return false;
    }
    overrides.set(change.trial_id, { studyId, number: change.number, state });
    forgetInfo(change.trial_id);
    return true;
  };

  // One poll; returns how long to wait before the next.
  const pollLive = async () => {
    const path = local(location.href);
    const page = path && STUDY_PAGE.exec(path);
    if (!page || document.visibilityState !== "visible") {
      return LIVE_EVERY_MS;
    }
    const studyId = Number(page[1]);
    const now = performance.now();
    const since = live.cursor === null ? null : liveSince(now);
    const query = since === null ? "" : `?since=${since}`;
    const res = await realFetch(`${PREFIX}/hitl/api/studies/${studyId}/changes${query}`, {
      headers: { Accept: "application/json" },
      cache: "no-store",
    });
    if (!res.ok) {
      return LIVE_RETRY_MS;
    }
    const data = await res.json();
    let changed = false;
    for (const change of data.changes) {
      changed = liveChange(studyId, change) || changed;
    }
    if (live.cursor === null || data.latest > live.cursor) {
      if (live.cursor !== null) {
        live.left.push({ cursor: live.cursor, at: now });
      }
      live.cursor = data.latest;
    }
    live.resume = data.more ? data.latest : null;
    if (changed) {
      decorate();
    }
    return data.more ? 0 : LIVE_EVERY_MS;
  };

  // Polls start every half second (or as soon as the previous answer came, when it took
  // longer): a slow answer does not add to the wait.
  const liveLoop = async () => {
    const started = performance.now();
    let wait = LIVE_RETRY_MS;
    try {
      wait = await pollLive();
    } catch (e) {
      // The server is away (restarting, or the database is): the dashboard says so; try later.
    }
    setTimeout(liveLoop, Math.max(0, wait - (performance.now() - started)));
  };

  /* -- the buttons ------------------------------------------------------------------------ */

  const getTrialInfo = (studyId, trialId, state) => {
    const key = `${trialId}:${state}`;
    if (!trialInfo.has(key)) {
      const promise = realFetch(`${PREFIX}/hitl/api/studies/${studyId}/${trialId}`, {
        headers: { Accept: "application/json" },
        cache: "no-store",
      }).then(async (res) => {
        const data = await res.json().catch(() => ({}));
        if (!res.ok) {
          throw new Error(data.reason || `${res.status} ${res.statusText}`);
        }
        return data;
      });
      trialInfo.set(key, promise);
      promise.catch(() => trialInfo.delete(key));
    }
    return trialInfo.get(key);
  };

  // As script.with_command: the reason on the line before the command word, which stays last.
  const withCommand = (body, text, reason) => {
    const kept = body.replace(/\s+$/, "");
    const added = reason ? `${reason}\n${text}` : text;
    return kept ? `${kept}\n\n${added}` : added;
  };

  // trial_id -> resolve({status, answer, body}): a button waits for the dashboard's note
  // save it started (answered() hands it over).
  const editorSaves = new Map();
  // When a button's save met a 409: the dashboard's editor then rejects a promise nobody
  // catches (as it does for a typed save), after showing its own message; we show ours too,
  // so that rejection is not reported again as an uncaught error.
  let editorConflictAt = -Infinity;
  window.addEventListener("unhandledrejection", (event) => {
    const reason = event.reason;
    const status = reason && reason.response && reason.response.status;
    if (status === 409 && performance.now() - editorConflictAt < 5000) {
      editorConflictAt = -Infinity;
      event.preventDefault();
    }
  });

  const soon = (find, ms = 3000) =>
    new Promise((resolve, reject) => {
      const start = performance.now();
      const look = () => {
        const found = find();
        if (found) {
          resolve(found);
        } else if (performance.now() - start > ms) {
          reject(new Error("the dashboard's note editor did not open"));
        } else {
          requestAnimationFrame(look);
        }
      };
      look();
    });

  // The note box of the trial on view: the element after its "Note" heading.
  const noteBox = (bar) => {
    const heading = [...(bar.parentElement || document).querySelectorAll("h5")].find(
      (h) => (h.textContent || "").trim() === "Note",
    );
    return heading ? heading.nextElementSibling : null;
  };

  // Save the note through the dashboard's own note editor, as a user would: the dashboard
  // then holds the new note and its version (its editor reads both from its own copy of the
  // trial, which it never fetches again for a finished trial), so the user's next edit is not
  // met with a 409; a concurrent edit still gets the dashboard's conflict answer.
  const saveInEditor = async (bar, trialId, edit) => {
    const box = noteBox(bar);
    if (!box) {
      throw new Error("the trial's note is not on the page");
    }
    if (box.querySelector("textarea")) {
      throw new Error("save or close the note you are editing first, then click again");
    }
    const pencil = box.querySelector("button");
    if (!pencil) {
      throw new Error("the note has no edit button");
    }
    pencil.click();
    const textarea = await soon(() => box.querySelector("textarea"));
    const setValue = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, "value").set;
    setValue.call(textarea, edit(textarea.value));
    // React reads the editor's text on "input" (its onChange), which marks it changed.
    textarea.dispatchEvent(new Event("input", { bubbles: true }));
    const save = await soon(() =>
      [...box.querySelectorAll("button")].find(
        (b) => (b.textContent || "").trim() === "Save" && !b.disabled,
      ),
    );
    const answered = new Promise((resolve) => editorSaves.set(trialId, resolve));
    try {
      save.click();
      return await answered;
    } finally {
      editorSaves.delete(trialId);
    }
  };

  // Write the command (with the reason typed next to the buttons, if any) into the trial's
  // note: through the dashboard's note editor, so its save is the dashboard's own, with the
  // stored version + 1.
  const act = async (bar, studyId, trialId, command) => {
    const buttons = bar.querySelectorAll("button, input");
    buttons.forEach((b) => {
      b.disabled = true;
    });
    const input = bar.querySelector("input.hitl-reason");
    const reason = input ? input.value.replace(/\s+/g, " ").trim() : "";
    try {
      // The answer the bar was drawn from (asked again only if it was forgotten): the
      // command's text is the server's, and the server decides again on the save itself.
      // Asking afresh put a round trip between the click and the save.
      const info = await getTrialInfo(studyId, trialId, bar.dataset.state);
      const cmd = info.commands[command];
      const saved = await saveInEditor(bar, trialId, (body) => withCommand(body, cmd.text, reason));
      if (saved.status === 204) {
        noteSaved(studyId, trialId, saved.answer, info.number);
        return;
      }
      const data = await saved.body;
      toast({
        kind: "error",
        action: "failed",
        title: `Failed: ${data.reason || `${saved.status}`}`,
      });
    } catch (e) {
      toast({ kind: "error", action: "failed", title: "Failed to save the note", detail: String(e.message || e) });
    } finally {
      buttons.forEach((b) => {
        b.disabled = false;
      });
      bar.dataset.key = "";
      decorate();
    }
  };

  const renderBar = (bar, studyId, trialId, state) => {
    const key = `${trialId}:${state}`;
    if (bar.dataset.key === key) {
      return;
    }
    bar.dataset.key = key;
    bar.dataset.trial = String(trialId);
    bar.dataset.state = state;
    getTrialInfo(studyId, trialId, state)
      .then((info) => {
        if (bar.dataset.key !== key) {
          return;
        }
        const parts = [];
        const label = document.createElement("span");
        label.className = "hitl-bar-label";
        label.textContent = "Human decision:";
        parts.push(label);
        const refused = new Set();
        if (Object.values(info.commands).some((c) => c.allowed)) {
          const reason = document.createElement("input");
          reason.type = "text";
          reason.className = "hitl-reason";
          reason.maxLength = 500;
          reason.placeholder = "reason (optional)";
          reason.setAttribute("aria-label", "Reason, written into the note with the command");
          parts.push(reason);
        }
        for (const [command, cls] of [
          ["PRUNE", "hitl-btn-prune"],
          ["FAIL", "hitl-btn-fail"],
        ]) {
          const c = info.commands[command];
          if (c.allowed) {
            const b = document.createElement("button");
            b.type = "button";
            b.className = `hitl-btn ${cls}`;
            b.dataset.command = command;
            b.textContent = command === "PRUNE" ? "Prune" : "Fail";
            b.title = `Write ${c.text} into this trial's note: ${c.reason} (${state} \u2192 ${LABELS[c.to]})`;
            b.addEventListener("click", () => act(bar, studyId, trialId, command));
            parts.push(b);
          } else if (c.action === "refused") {
            refused.add(c.reason);
          }
        }
        if (parts.length === 1) {
          label.textContent = "Human decision: none possible.";
        }
        const hints = [...refused];
        if (info.dry_run) {
          hints.unshift("dry run: nothing will change");
        }
        if (hints.length) {
          const hint = document.createElement("span");
          hint.className = "hitl-bar-hint";
          hint.textContent = hints.join("; ");
          parts.push(hint);
        }
        const link = document.createElement("a");
        // The actions page links back to this study.
        link.href = `${PREFIX}/hitl/actions?study=${encodeURIComponent(studyId)}`;
        link.textContent = "Human actions";
        parts.push(link);
        bar.replaceChildren(...parts);
      })
      .catch((e) => {
        if (bar.dataset.key === key) {
          bar.replaceChildren();
          bar.dataset.key = "";
        }
        console.warn("hitl-pruner: no buttons for trial", trialId, String(e));
      });
  };

  /* -- decorating the dashboard's trial view ------------------------------------------------- */

  // Show our chip for an overridden trial in place of the dashboard's stale ones.
  const standIn = (container, override, small) => {
    let ours = container.querySelector(":scope > .hitl-chip");
    const chips = container.querySelectorAll(":scope > .MuiChip-root");
    chips.forEach((chip, i) => {
      // A trial that is not COMPLETE is no best trial: hide that chip too.
      const hide = !!override && (i === 0 || override.state !== "Complete");
      if (chip.classList.contains("hitl-hidden") !== hide) {
        chip.classList.toggle("hitl-hidden", hide);
      }
    });
    // The dashboard's "Fail Trial" button is for the RUNNING trial it still believes in.
    for (const button of container.querySelectorAll(":scope > button")) {
      if (button.classList.contains("hitl-hidden") !== !!override) {
        button.classList.toggle("hitl-hidden", !!override);
      }
    }
    if (!override) {
      if (ours) {
        ours.remove();
      }
      return;
    }
    if (!ours) {
      ours = document.createElement("span");
      ours.className = small ? "hitl-chip hitl-chip-small" : "hitl-chip";
      container.insertBefore(ours, container.firstChild);
    }
    if (ours.textContent !== override.state) {
      ours.textContent = override.state;
      ours.dataset.state = override.state.toLowerCase();
      // Restart the highlight: the state just changed on screen.
      ours.classList.remove("hitl-chip-new");
      void ours.offsetWidth;
      ours.classList.add("hitl-chip-new");
    }
  };

  const decorateDetail = (title, studyId, trialId) => {
    const row = title.nextElementSibling;
    if (!row || row.classList.contains("hitl-bar")) {
      return;
    }
    const override = overrides.get(trialId);
    standIn(row, override, false);
    const chip = row.querySelector(":scope > .MuiChip-root");
    const state = override ? override.state : chip ? chip.textContent : "";
    if (!LABELS[state.toUpperCase()]) {
      return;
    }
    let bar = row.nextElementSibling;
    if (!bar || !bar.classList.contains("hitl-bar")) {
      bar = document.createElement("div");
      bar.className = "hitl-bar";
      row.after(bar);
    }
    renderBar(bar, studyId, trialId, state);
  };

  const decorateListItem = (primary, byNumber, number) => {
    const item = primary.closest(".MuiListItemButton-root");
    const text = primary.closest(".MuiListItemText-root");
    const chips = text && text.nextElementSibling;
    if (!item || !chips) {
      return;
    }
    standIn(chips, byNumber.get(number) || null, true);
  };

  const syncTheme = () => {
    const bg = getComputedStyle(document.body).backgroundColor;
    const rgba = (bg.match(/[\d.]+/g) || []).map(Number);
    if (rgba.length < 3 || (rgba.length === 4 && rgba[3] === 0)) {
      return; // nothing painted yet: the system preference stands
    }
    const luminance = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2];
    const theme = luminance < 128 ? "dark" : "light";
    if (document.documentElement.dataset.hitlTheme !== theme) {
      document.documentElement.dataset.hitlTheme = theme;
    }
  };

  const decorate = () => {
    const path = local(location.href);
    const page = path && TRIALS_PAGE.exec(path);
    if (!page) {
      return;
    }
    const studyId = Number(page[1]);
    for (const title of document.querySelectorAll("h4")) {
      const m = DETAIL_TITLE.exec(title.textContent || "");
      if (m) {
        decorateDetail(title, studyId, Number(m[2]));
      }
    }
    // Looked up by number once per pass: a script may have changed hundreds of trials.
    const byNumber = new Map();
    for (const o of overrides.values()) {
      if (o.studyId === studyId) {
        byNumber.set(o.number, o);
      }
    }
    for (const primary of document.querySelectorAll(".MuiListItemText-primary")) {
      const m = LIST_TITLE.exec(primary.textContent || "");
      if (m) {
        decorateListItem(primary, byNumber, Number(m[1]));
      }
    }
  };

  /* -- bulk action: prune, fail or undo many trials of the study on view ------------------------ */

  // A panel of our own (the dashboard's trial list is its React state, not ours to extend): a
  // filter (trial numbers like "3 5 7-9", a state, a parameter range), a preview that is the
  // server's dry run of exactly that request, and an Apply that needs a second click to confirm.
  // POST /hitl/api/studies/<id>/bulk sends every trial through the note-save path (bulk.py).
  const bulkEl = (tag, props, ...children) => {
    const el = document.createElement(tag);
    Object.assign(el, props || {});
    el.append(...children);
    return el;
  };

  const bulkField = (label, input) =>
    bulkEl("label", { className: "hitl-bulk-field" }, bulkEl("span", {}, label), input);

  // "3 5, 7-9" -> [3, 5, "7-9"]; throws with a message for anything else.
  const bulkTrials = (text) =>
    text
      .split(/[\s,]+/)
      .filter(Boolean)
      .map((part) => {
        if (/^\d+$/.test(part)) {
          return Number(part);
        }
        if (/^\d+-\d+$/.test(part)) {
          return part;
        }
        throw new Error(`"${part}" is not a trial number or a range like 7-9`);
      });

  const bulk = { studyId: null, panel: null, preview: null };

  const bulkRequest = (form) => {
    const body = { action: form.action.value };
    const trials = bulkTrials(form.trials.value);
    if (trials.length) {
      body.trials = trials;
    }
    const filter = {};
    if (form.state.value) {
      filter.state = form.state.value;
    }
    if (form.param.value.trim()) {
      const param = { name: form.param.value.trim() };
      for (const key of ["min", "max"]) {
        if (form[key].value.trim() !== "") {
          param[key] = Number(form[key].value);
        }
      }
      filter.param = param;
    }
    if (Object.keys(filter).length) {
      body.filter = filter;
    }
    if (form.reason.value.trim() && body.action !== "undo") {
      body.reason = form.reason.value.trim();
    }
    return body;
  };

  const bulkPost = async (studyId, body) => {
    const res = await realFetch(`${PREFIX}/hitl/api/studies/${studyId}/bulk`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
    });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) {
      throw new Error(data.reason || `${res.status} ${res.statusText}`);
    }
    return data;
  };

  const bulkCounts = (counts) =>
    Object.entries(counts)
      .map(([action, n]) => `${n} ${action === "dry run" ? "would change" : action}`)
      .join(", ") || "no trials";

  const bulkShow = (panel, data) => {
    const rows = data.results.map((r) => {
      const tr = bulkEl("tr", {});
      tr.dataset.action = r.action;
      tr.append(
        bulkEl("td", {}, `Trial ${r.number}`),
        bulkEl("td", {}, r.from && r.to ? `${r.from} \u2192 ${r.to}` : "\u2014"),
        bulkEl("td", { className: "hitl-bulk-outcome" }, r.action),
        bulkEl("td", { className: "hitl-muted" }, r.reason),
      );
      return tr;
    });
    const table = panel.querySelector(".hitl-bulk-results");
    table.replaceChildren(...rows);
    table.hidden = rows.length === 0;
    const summary = panel.querySelector(".hitl-bulk-summary");
    // The dashboard never fetches a finished trial again until the page loads: its note
    // editor would send the old version (a 409) until then.
    const finished = !data.dry_run && data.results.some(
      (r) => r.action === "applied" && r.from && r.from !== "RUNNING" && r.from !== "WAITING");
    summary.textContent = data.dry_run
      ? `Preview (nothing changed yet): ${data.matched} trials match; ${bulkCounts(data.counts)}.`
      : `Done: ${bulkCounts(data.counts)}.${finished
        ? " Reload the page before you edit those finished trials' notes here." : ""}`;
  };

  const bulkApplyButton = (panel) => panel.querySelector(".hitl-bulk-apply");

  const bulkReset = (panel) => {
    bulk.preview = null;
    const apply = bulkApplyButton(panel);
    apply.disabled = true;
    apply.dataset.confirm = "";
    apply.textContent = "Apply";
  };

  const bulkSubmit = async (panel, dryRun) => {
    const form = panel.querySelector("form");
    const apply = bulkApplyButton(panel);
    let body;
    try {
      body = bulkRequest(form.elements);
    } catch (e) {
      panel.querySelector(".hitl-bulk-summary").textContent = String(e.message || e);
      return;
    }
    if (!dryRun) {
      // Only what was previewed, and only after a second click that says how many.
      if (JSON.stringify(body) !== JSON.stringify(bulk.preview && bulk.preview.body)) {
        bulkReset(panel);
        return;
      }
      if (apply.dataset.confirm !== "yes") {
        apply.dataset.confirm = "yes";
        apply.textContent = `Confirm: ${body.action} ${bulk.preview.willChange} trials`;
        return;
      }
    }
    panel.querySelectorAll("button").forEach((b) => {
      b.disabled = true;
    });
    try {
      const data = await bulkPost(bulk.studyId, { ...body, dry_run: dryRun });
      bulkShow(panel, data);
      if (dryRun) {
        const willChange = data.results.filter((r) => r.action === "dry run").length;
        bulkReset(panel);
        bulk.preview = { body, willChange };
        apply.disabled = willChange === 0;
        apply.textContent = `Apply to ${willChange} trials`;
      } else {
        bulkReset(panel);
        for (const r of data.results) {
          forgetInfo(r.trial_id);
          if (r.action === "applied" && LABELS[r.to]) {
            overrides.set(r.trial_id, { studyId: bulk.studyId, number: r.number, state: LABELS[r.to] });
          }
        }
        decorate();
        toast({
          kind: "success",
          action: "bulk",
          title: `${body.action}: ${bulkCounts(data.counts)}`,
          // Plots, tables and notes of finished trials update only when the page loads again.
          links: [{ text: "Human actions", href: `${PREFIX}/hitl/actions?study=${bulk.studyId}` },
            { text: "Reload page", onClick: () => location.reload() }],
        });
      }
    } catch (e) {
      bulkReset(panel);
      panel.querySelector(".hitl-bulk-summary").textContent = `Refused: ${e.message || e}`;
    } finally {
      panel.querySelectorAll(".hitl-bulk-preview, .hitl-bulk-close").forEach((b) => {
        b.disabled = false;
      });
    }
  };

  const bulkPanel = () => {
    const select = (name, options) =>
      bulkEl("select", { name }, ...options.map(([value, text]) => bulkEl("option", { value }, text)));
    const input = (name, props) => bulkEl("input", { name, type: "text", ...props });
    const form = bulkEl(
      "form",
      { className: "hitl-bulk-form" },
      bulkField("Action", select("action", [["prune", "Prune"], ["fail", "Fail"], ["undo", "Undo"]])),
      bulkField("Trials", input("trials", { placeholder: "3 5 7-9" })),
      bulkField(
        "State",
        select("state", [["", "any"], ...Object.keys(LABELS).map((s) => [s, LABELS[s]])]),
      ),
      bulkField("Parameter", input("param", { placeholder: "name" })),
      bulkField("from", input("min", { inputMode: "decimal", placeholder: "min" })),
      bulkField("to", input("max", { inputMode: "decimal", placeholder: "max" })),
      bulkField("Reason", input("reason", { placeholder: "optional, goes into each note", maxLength: 500 })),
    );
    const preview = bulkEl("button", { type: "button", className: "hitl-btn hitl-bulk-preview" }, "Preview");
    const apply = bulkEl("button", { type: "button", className: "hitl-btn hitl-btn-prune hitl-bulk-apply", disabled: true }, "Apply");
    const close = bulkEl("button", { type: "button", className: "hitl-btn hitl-bulk-close" }, "Close");
    const panel = bulkEl(
      "section",
      { className: "hitl-bulk" },
      bulkEl("h2", { className: "hitl-bulk-title" }, "Bulk action"),
      form,
      bulkEl("div", { className: "hitl-bulk-buttons" }, preview, apply, close),
      bulkEl("div", { className: "hitl-bulk-summary", role: "status" }),
      bulkEl("table", { className: "hitl-bulk-results", hidden: true }),
    );
    panel.setAttribute("aria-label", "Bulk action on trials");
    panel.hidden = true;
    form.addEventListener("input", () => bulkReset(panel));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      bulkSubmit(panel, true);
    });
    preview.addEventListener("click", () => bulkSubmit(panel, true));
    apply.addEventListener("click", () => bulkSubmit(panel, false));
    close.addEventListener("click", () => {
      panel.hidden = true;
    });
    return panel;
  };

  // The "Bulk action" button and its panel, on the pages of one study only.
  const placeBulk = () => {
    if (document.body.dataset.hitlPage === "actions") {
      return;
    }
    const path = local(location.href);
    const page = path && STUDY_PAGE.exec(path);
    let opener = document.querySelector(".hitl-bulk-open");
    if (!page) {
      if (opener) {
        opener.hidden = true;
        bulk.panel.hidden = true;
      }
      return;
    }
    if (!opener) {
      bulk.panel = bulkPanel();
      opener = bulkEl("button", { type: "button", className: "hitl-btn hitl-bulk-open" }, "Bulk action");
      opener.addEventListener("click", () => {
        bulk.panel.hidden = !bulk.panel.hidden;
        if (!bulk.panel.hidden) {
          bulk.panel.querySelector("input[name=trials]").focus();
        }
      });
      document.body.append(opener, bulk.panel);
    }
    opener.hidden = false;
    const studyId = Number(page[1]);
    if (bulk.studyId !== studyId) {
      bulk.studyId = studyId;
      bulkReset(bulk.panel);
    }
  };

  if (document.body.dataset.hitlPage !== "actions") {
    new MutationObserver(placeBulk).observe(document.body, { childList: true });
    window.addEventListener("popstate", placeBulk);
    setInterval(placeBulk, 1000); // the dashboard routes with pushState, which fires no event
    placeBulk();
  }

  /* -- the Human actions page ---------------------------------------------------------------- */

  // Filters and the page's cursor live in the address (?study=1&user=ann&before=812), so a
  // view can be reloaded and shared; the API takes the same names (ui.py).
  const FILTERS = ["study", "trial", "user", "action"];
  const PAGE_SIZE = 100;
  const view = {
    filters: {},
    before: null, // the cursor of this page; null: the newest
    newer: [], // the cursors of the pages before this one, to go back to
    next: null, // the cursor of the next (older) page, from the last answer
  };

  const readAddress = () => {
    const params = new URLSearchParams(location.search);
    for (const name of FILTERS) {
      const value = params.get(name);
      if (value) {
        view.filters[name] = value;
      }
    }
    const before = params.get("before");
    view.before = before && /^[0-9]+$/.test(before) ? before : null;
  };

  const queryOf = (withCursor) => {
    const params = new URLSearchParams();
    for (const name of FILTERS) {
      if (view.filters[name]) {
        params.set(name, view.filters[name]);
      }
    }
    if (withCursor && view.before !== null) {
      params.set("before", view.before);
    }
    return params.toString();
  };

  const withQuery = (path, query) => (query ? `${path}?${query}` : path);

  const showFilters = () => {
    const form = document.getElementById("hitl-filters");
    for (const name of FILTERS) {
      form.elements[name].value = view.filters[name] || "";
    }
    // A trial number means something only within a study.
    form.elements.trial.disabled = !view.filters.study;
    const study = view.filters.study;
    document.getElementById("hitl-dashboard-link").href = study
      ? `${PREFIX}/dashboard/studies/${encodeURIComponent(study)}`
      : `${PREFIX}/dashboard`;
    document.getElementById("hitl-csv-link").href = withQuery(`${PREFIX}/hitl/api/actions.csv`, queryOf(false));
    document.getElementById("hitl-json-link").href = withQuery(`${PREFIX}/hitl/api/actions`, queryOf(true));
    history.replaceState(null, "", withQuery(location.pathname, queryOf(true)));
  };

  // The study picker lists the studies the dashboard lists; one that is gone stays pickable.
  const loadStudies = async () => {
    const select = document.getElementById("hitl-filters").elements.study;
    try {
      const res = await realFetch(`${PREFIX}/api/studies`, { cache: "no-store" });
      const data = res.ok ? await res.json() : {};
      for (const s of data.study_summaries || []) {
        const option = document.createElement("option");
        option.value = String(s.study_id);
        option.textContent = `${s.study_name} (${s.study_id})`;
        select.appendChild(option);
      }
    } catch (e) {
      console.warn("hitl-pruner: no study list", String(e));
    }
    const chosen = view.filters.study;
    if (chosen && ![...select.options].some((o) => o.value === chosen)) {
      const option = document.createElement("option");
      option.value = chosen;
      option.textContent = `study_id=${chosen}`;
      select.appendChild(option);
    }
    select.value = chosen || "";
  };

  const cell = (row, content, className) => {
    const td = document.createElement("td");
    if (className) {
      td.className = className;
    }
    if (content instanceof Node) {
      td.appendChild(content);
    } else {
      td.textContent = content;
    }
    row.appendChild(td);
    return td;
  };

  const stateEl = (state) => {
    const span = document.createElement("span");
    span.className = "hitl-state";
    span.dataset.state = state.toLowerCase();
    span.textContent = state;
    return span;
  };

  // Local time, always the same width: 2025-05-01 14:03:07.
  const when = (iso) => {
    const t = new Date(iso);
    const two = (n) => String(n).padStart(2, "0");
    return `${t.getFullYear()}-${two(t.getMonth() + 1)}-${two(t.getDate())} ` +
      `${two(t.getHours())}:${two(t.getMinutes())}:${two(t.getSeconds())}`;
  };

  const undo = async (action, button) => {
    const command = action.to === "PRUNED" ? "PRUNE" : action.to;
    const asked = window.confirm(
      `Undo the relabel of trial ${action.trial_number} of study "${action.study_name}"?\n\n` +
      `${command} is removed from the trial's note, and the trial goes back from ` +
      `${action.to} to ${action.from}.`,
    );
    if (!asked) {
      return;
    }
    button.disabled = true;
    try {
      const res = await realFetch(`${PREFIX}/hitl/api/actions/${action.id}/undo`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: "{}",
      });
      const data = await res.json().catch(() => ({}));
      if (res.ok && data.outcome) {
        showOutcome(data.outcome, action.trial_number);
      } else {
        toast({
          kind: "error",
          action: "failed",
          title: `Undo failed: ${data.reason || `${res.status} ${res.statusText}`}`,
        });
      }
    } catch (e) {
      toast({ kind: "error", action: "failed", title: "Undo failed", detail: String(e) });
    }
    await loadActions();
  };

  const renderActions = (tbody, actions) => {
    const rows = actions.map((a) => {
      const tr = document.createElement("tr");
      tr.dataset.id = a.id === null ? "" : String(a.id);
      tr.dataset.trial = String(a.trial_id);
      cell(tr, when(a.time), "hitl-nowrap").title = a.time;
      const user = cell(tr, a.user || "\u2014", "hitl-clip");
      user.title = a.user || "no user: a note written outside this dashboard";
      const study = document.createElement("a");
      study.href = a.study_url;
      study.textContent = a.study_name;
      study.title = `${a.study_name} (study_id=${a.study_id})`;
      cell(tr, study, "hitl-clip hitl-study");
      const link = document.createElement("a");
      link.href = a.trial_url;
      link.textContent = a.trial_number === null ? a.action : `Trial ${a.trial_number}`;
      link.title = `trial_id=${a.trial_id}`;
      cell(tr, link, "hitl-nowrap");
      const change = document.createElement("span");
      change.append(stateEl(a.from), " \u2192 ", stateEl(a.to));
      const tagged = (el, text, title) => {
        const tag = document.createElement("span");
        tag.className = "hitl-tag";
        tag.textContent = text;
        tag.title = title;
        el.appendChild(tag);
      };
      if (a.undo) {
        tagged(change, "undo", "a relabel undone: the command left the note");
      } else if (a.retroactive) {
        tagged(change, "relabel", "a finished trial relabelled (retroactive)");
      }
      if (a.reason) {
        // The reason the note gave with its command (text, never markup).
        const why = document.createElement("span");
        why.className = "hitl-action-reason";
        why.textContent = a.reason;
        why.title = a.reason;
        change.appendChild(why);
      }
      cell(tr, change, "hitl-change hitl-nowrap");
      cell(tr, a.state_now ? stateEl(a.state_now) : "\u2014");
      cell(tr, a.note_version === null ? "\u2014" : `v${a.note_version}`, "hitl-nowrap");
      const via = document.createElement("span");
      via.textContent = a.source;
      if (a.how === "worker") {
        tagged(via, "worker", "ended by its worker on request");
      } else if (a.how === "grace") {
        tagged(via, "grace", "forced after the grace period");
      }
      cell(tr, via, "hitl-muted hitl-nowrap");
      const actionCell = cell(tr, "");
      if (a.undoable) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "hitl-btn hitl-btn-undo";
        b.textContent = "Undo";
        b.title = `Remove the command from the note: ${a.to} \u2192 ${a.from}`;
        b.addEventListener("click", () => undo(a, b));
        actionCell.appendChild(b);
      } else if (a.retroactive && !a.undo && a.undo_refused) {
        actionCell.textContent = "\u2014";
        actionCell.title = `No undo: ${a.undo_refused}`;
        actionCell.className = "hitl-muted";
      }
      return tr;
    });
    tbody.replaceChildren(...rows);
  };

  const showPager = (count) => {
    document.getElementById("hitl-newest").disabled = view.before === null;
    document.getElementById("hitl-newer").disabled = view.newer.length === 0;
    document.getElementById("hitl-older").disabled = view.next === null;
    const depth = view.before === null ? "newest" : `older than #${view.before}`;
    document.getElementById("hitl-page-info").textContent = count
      ? `${count} action${count === 1 ? "" : "s"}, ${depth}`
      : "";
  };

  let loading = null;
  let again = false;
  const loadActions = () => {
    if (loading) {
      // A filter or page chosen while an answer is on its way: ask again after it.
      again = true;
      return loading;
    }
    const tbody = document.getElementById("hitl-actions");
    const query = `${queryOf(true)}${queryOf(true) ? "&" : ""}limit=${PAGE_SIZE}`;
    loading = realFetch(`${PREFIX}/hitl/api/actions?${query}`, { cache: "no-store" })
      .then(async (res) => {
        const data = await res.json().catch(() => ({}));
        if (!res.ok) {
          throw new Error(data.reason || `${res.status} ${res.statusText}`);
        }
        renderActions(tbody, data.actions);
        view.next = data.next === null || data.next === undefined ? null : String(data.next);
        const empty = document.getElementById("hitl-empty");
        empty.hidden = data.actions.length > 0;
        empty.textContent = queryOf(false) ? "No actions match these filters." : "No human actions yet.";
        showPager(data.actions.length);
        document.body.dataset.loaded = "true";
      })
      .catch((e) => {
        toast({ kind: "error", action: "failed", title: "Cannot load the actions", detail: String(e) });
      })
      .finally(() => {
        loading = null;
        if (again) {
          again = false;
          loadActions();
        }
      });
    return loading;
  };

  const go = (before, newer) => {
    view.before = before;
    view.newer = newer;
    showFilters();
    return loadActions();
  };

  const startActionsPage = () => {
    readAddress();
    const form = document.getElementById("hitl-filters");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const filters = {};
      for (const name of FILTERS) {
        const value = form.elements[name].value.trim();
        if (value && !(name === "trial" && !form.elements.study.value)) {
          filters[name] = value;
        }
      }
      view.filters = filters;
      go(null, []);
    });
    // Picking from a list filters at once; typed fields on Enter or Filter.
    for (const name of ["study", "action"]) {
      form.elements[name].addEventListener("change", () => {
        form.elements.trial.disabled = !form.elements.study.value;
        form.requestSubmit();
      });
    }
    document.getElementById("hitl-clear").addEventListener("click", () => {
      view.filters = {};
      showFilters();
      go(null, []);
    });
    document.getElementById("hitl-newest").addEventListener("click", () => go(null, []));
    document.getElementById("hitl-newer").addEventListener("click", () => {
      const newer = view.newer.slice(0, -1);
      go(view.newer[view.newer.length - 1], newer);
    });
    document.getElementById("hitl-older").addEventListener("click", () => {
      if (view.next !== null) {
        go(view.next, [...view.newer, view.before]);
      }
    });
    showFilters();
    loadStudies();
    loadActions();
    // The page on view is asked again: the newest page shows new actions, and every page the
    // state now and whether Undo still can.
    setInterval(() => {
      if (document.visibilityState === "visible") {
        loadActions();
      }
    }, 5000);
  };

  /* -- start ------------------------------------------------------------------------------------ */

  if (document.body.dataset.hitlPage === "actions") {
    // Opened from a study ("?study=1"): filtered to it, and "Dashboard" goes back to it.
    startActionsPage();
    return;
  }
  new MutationObserver(decorate).observe(document.body, {
    childList: true,
    subtree: true,
    characterData: true,
  });
  // The dashboard starts light and turns dark after its first render when the system prefers
  // dark, and its colour-mode switch only restyles: no DOM change to observe. So look.
  document.addEventListener("click", () => requestAnimationFrame(syncTheme), true);
  setInterval(syncTheme, 500);
  syncTheme();
  decorate();
  // Now, before the dashboard's first fetch of the study: what changes after it is polled for.
  liveLoop();
})();

/* Stop a study (study_stop.py): on a study's pages, a "Stop study" button, and while the study
   is stopped a banner saying who stopped it and when, with "Resume study". A click posts to
   /hitl/api/studies/<id>/stop, which writes STOP into the study's note (or takes it out)
   through the dashboard's study note API on the server, the path of a typed note. Self-contained:
   it shares nothing with the code above but the page. Text from the server is set as text. */
(() => {
  "use strict";

  if (document.body && document.body.dataset.hitlPage === "actions") {
    return;
  }
  const SCRIPT = document.currentScript;
  const PREFIX = SCRIPT
    ? new URL(SCRIPT.src, location.href).pathname.replace(/\/hitl\/static\/hitl\.js$/, "")
    : "";
  const STUDY_PAGE = /^\/dashboard\/studies\/(\d+)(?:\/|$)/;
  const EVERY_MS = 1000;

  const studyId = () => {
    const u = new URL(location.href);
    if (!u.pathname.startsWith(PREFIX)) {
      return null;
    }
    const m = STUDY_PAGE.exec(u.pathname.slice(PREFIX.length));
    return m ? Number(m[1]) : null;
  };

  let box = null;
  let busy = false;
  const render = (state) => {
    if (!box) {
      box = document.createElement("div");
      box.className = "hitl-study-stop";
      box.setAttribute("role", "status");
      document.body.appendChild(box);
    }
    box.dataset.stopped = String(state.stopped);
    const text = document.createElement("span");
    text.className = "hitl-study-stop-text";
    const button = document.createElement("button");
    button.type = "button";
    button.className = "hitl-btn hitl-study-stop-btn";
    button.disabled = busy;
    if (state.stopped) {
      const s = state.stop || {};
      const at = s.at ? new Date(s.at).toLocaleString() : "";
      const who = s.user ? ` by ${s.user}` : "";
      text.textContent = `Study stopped${who}${at ? ` at ${at}` : ""}: workers start no new trial.`;
      text.title = `STOP in the study's note (v${s.note_version}), via ${s.source}`;
      button.textContent = "Resume study";
      button.dataset.stop = "false";
    } else {
      text.textContent = "";
      button.textContent = "Stop study";
      button.dataset.stop = "true";
      button.title = "Write STOP into the study's note: workers finish their current trials " +
        "and start no new one";
    }
    button.addEventListener("click", () => click(state.study_id, !state.stopped));
    box.replaceChildren(...(state.stopped ? [text, button] : [button]));
    box.hidden = false;
  };

  const click = async (id, stop) => {
    if (stop && !window.confirm("Stop this study? Its workers finish their current trials and start no new one.")) {
      return;
    }
    busy = true;
    try {
      const res = await fetch(`${PREFIX}/hitl/api/studies/${id}/stop`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ stop }),
      });
      const data = await res.json().catch(() => ({}));
      const outcome = data.outcome || {};
      if (!res.ok || outcome.action === "refused") {
        const reason = outcome.reason || data.reason || `${res.status} ${res.statusText}`;
        window.alert(`${stop ? "Stop" : "Resume"} study: ${reason}`);
      }
    } finally {
      busy = false;
      await poll();
    }
  };

  const poll = async () => {
    const id = studyId();
    if (id === null) {
      if (box) {
        box.hidden = true;
      }
      return;
    }
    if (document.visibilityState !== "visible") {
      return;
    }
    const res = await fetch(`${PREFIX}/hitl/api/studies/${id}/stop`, {
      headers: { Accept: "application/json" },
      cache: "no-store",
    });
    if (res.ok && studyId() === id) {
      render(await res.json());
    }
  };

  const loop = async () => {
    try {
      await poll();
    } catch (e) {
      // The server is away: the dashboard says so; look again later.
    }
    setTimeout(loop, EVERY_MS);
  };
  loop();
})();
