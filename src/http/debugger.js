(() => {
  "use strict";
  const MAX_ROWS = 1000, MAX_PAUSED = 5000;
  // The token travels in the fragment (never sent to a server in a URL); the page hands
  // it to the server once, which answers with an HttpOnly cookie the stream request
  // carries; the fragment is then taken off the address bar.
  const fromHash = tokenFromHash();
  if (fromHash !== null) history.replaceState(null, "", location.pathname + location.search);

  // Read as it is: URLSearchParams would turn a base64 token's "+" into a space.
  // Percent-encoded works too.
  function tokenFromHash() {
    const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (!m) return null;
    try { return decodeURIComponent(m[1]); } catch (e) { return m[1]; }
  }
  const $ = (id) => document.getElementById(id);
  const rows = new Map();       // source + messageId (or a refusal id) -> {data, tr}
  let order = [], paused = false, pending = [], dropped = 0, source = null, selected = null;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function time(at) { return at ? at.slice(11, 23) : ""; }

  function rowFor(ev) {
    // Two sources may use one messageId: each message is its source's.
    const key = ev.kind === "refused" || !ev.messageId ? "unique-" + Math.random()
      : JSON.stringify([ev.source || "", ev.messageId]);
    let r = rows.get(key);
    if (!r) {
      r = { key, data: { at: ev.at, source: ev.source, type: ev.type, event: ev.event,
                         messageId: ev.messageId, message: null, outcomes: {}, status: null } };
      const tr = el("tr", "row");
      tr.addEventListener("click", () => select(key));
      r.tr = tr;
      rows.set(key, r);
      order.push(key);
      $("rows").prepend(tr);
      while (order.length > MAX_ROWS) {
        const old = rows.get(order.shift());
        if (old) { old.tr.remove(); rows.delete(old.key); }
      }
    }
    return r;
  }

  function render(r) {
    const d = r.data, tr = r.tr;
    tr.replaceChildren();
    tr.className = "row" + (d.status === "refused" ? " refused" : "") + (selected === r.key ? " selected" : "");
    tr.append(el("td", "mono", time(d.at)), el("td", null, d.source || "—"),
              el("td", "type", d.type || (d.status === "refused" ? "refused" : "")),
              el("td", null, d.event || d.code || ""), el("td", "mono", d.messageId || ""));
    const cell = el("td");
    if (d.status === "duplicate") cell.append(el("span", "badge duplicate", "duplicate"));
    if (d.status === "blocked") cell.append(el("span", "badge refused", "blocked by plan: " + (d.violations || []).map(v => v.path).join(", ")));
    if (d.status === "refused") cell.append(el("span", "badge refused", (d.httpStatus || "") + " " + (d.field || "")));
    for (const [name, o] of Object.entries(d.outcomes)) {
      const label = name + (o.kind === "retried" ? " ↻" + o.retries : o.kind === "delivered" ? " ✓" : o.kind === "dead_lettered" ? " ✗" : " –");
      cell.append(el("span", "badge " + o.kind, label));
    }
    if (!d.status && Object.keys(d.outcomes).length === 0) cell.append(el("span", "badge pending", "accepted"));
    tr.append(cell);
    if (selected === r.key) detail(r);
  }

  function apply(ev) {
    if (ev.kind === "dropped") {
      dropped += ev.count;
      $("banner").style.display = "block";
      $("banner").textContent = "This view fell behind and lost " + dropped + " events (the pipeline was not slowed).";
      return;
    }
    const r = rowFor(ev), d = r.data;
    if (ev.kind === "accepted") { d.message = ev.message; d.at = ev.at; }
    else if (ev.kind === "duplicate") { d.status = d.status || "duplicate"; }
    else if (ev.kind === "blocked") { d.status = "blocked"; d.message = ev.message; d.at = ev.at;
                                      d.violations = ev.violations; d.type = ev.type; d.event = ev.event; }
    else if (ev.kind === "refused") { d.status = "refused"; d.code = ev.code; d.field = ev.field;
                                      d.httpStatus = ev.status; d.index = ev.index; d.at = ev.at; d.path = ev.path; }
    else if (ev.kind === "inserted") {
      // The insert function's answer: shown beside the destination's outcome, which follows.
      const o = d.outcomes[ev.destination] || { retries: 0, kind: "inserted" };
      o.before = ev.before; o.after = ev.after;
      d.outcomes[ev.destination] = o;
      d.source = d.source || ev.source; d.type = d.type || ev.type; d.event = d.event || ev.event;
    }
    else if (ev.destination) {
      const o = d.outcomes[ev.destination] || { retries: 0 };
      o.kind = ev.kind; o.reason = ev.reason; o.status = ev.status; o.payload = ev.payload;
      if (ev.kind === "retried") o.retries++;
      d.outcomes[ev.destination] = o;
      d.source = d.source || ev.source; d.type = d.type || ev.type; d.event = d.event || ev.event;
    }
    render(r);
    $("empty").style.display = rows.size ? "none" : "block";
    $("counts").textContent = rows.size + " messages" + (paused ? " · paused (" + pending.length + " waiting)" : "");
  }

  function select(key) {
    const before = rows.get(selected);
    selected = key;
    if (before) render(before);
    const r = rows.get(key);
    if (r) render(r);
  }

  function detail(r) {
    const d = r.data, box = $("detail");
    box.replaceChildren();
    box.append(el("h2", null, "Message " + (d.messageId || "")));
    const pre = el("pre", "mono");
    pre.textContent = JSON.stringify(d.message || (d.status === "refused"
      ? { refused: d.httpStatus, code: d.code, field: d.field, index: d.index, path: d.path }
      : "(not shown: a duplicate, or accepted before this view opened)"), null, 2);
    box.append(pre);
    for (const [name, o] of Object.entries(d.outcomes)) {
      const reason = o.reason === "insert_function" ? "dropped by insert_function" : o.reason;
      if (o.before !== undefined) {
        box.append(el("h2", null, name + ": before insert_function"));
        box.append(el("pre", "mono before", JSON.stringify(o.before, null, 2)));
        box.append(el("h2", null, name + ": after insert_function"));
        box.append(el("pre", "mono after", JSON.stringify(o.after, null, 2)));
      }
      box.append(el("h2", null, name + ": " + o.kind.replace("_", " ") +
        (reason ? " (" + reason + ")" : "") + (o.status ? " · HTTP " + o.status : "") +
        (o.retries ? " · retried " + o.retries + "×" : "")));
      const p = el("pre", "mono");
      p.textContent = JSON.stringify(o.payload, null, 2);
      box.append(p);
    }
  }

  function status(cls, text) {
    $("status").className = cls;
    $("status").lastChild.textContent = text;
  }

  async function signIn(token) {
    try {
      const r = await fetch("/debugger/session", { method: "POST", credentials: "same-origin",
                                                   headers: { Authorization: "Bearer " + token } });
      if (!r.ok) status("", "sign-in refused (HTTP " + r.status + ")");
    } catch (e) {
      status("", "sign-in failed: " + e.message);
    }
  }

  // The stream refused (EventSource does not say why, nor try again): ask once and say.
  async function whyClosed() {
    try {
      const r = await fetch("/debugger/events", { credentials: "same-origin" });
      if (r.ok) { r.body.cancel(); status("", "disconnected: Apply to reconnect"); return; }
      const body = await r.json().catch(() => null);
      const message = body && body.error ? body.error.message : "";
      status("", "refused (HTTP " + r.status + ")" + (message ? ": " + message : "") +
             (r.status === 401 ? " — open /debugger#token=<admin token>" : ""));
    } catch (e) {
      status("", "disconnected: " + e.message);
    }
  }

  function connect() {
    if (source) source.close();
    const q = new URLSearchParams();
    for (const f of ["source", "destination", "type"]) {
      const v = $("f-" + f).value.trim();
      if (v) q.set(f, v);
    }
    const stream = new EventSource("/debugger/events?" + q.toString());
    source = stream;
    stream.onopen = () => status("live", "live");
    stream.onerror = () => {
      if (stream.readyState === EventSource.CLOSED) whyClosed();
      else status("", "reconnecting…");
    };
    stream.onmessage = (m) => {
      const ev = JSON.parse(m.data);
      if (paused) { if (pending.length < MAX_PAUSED) pending.push(ev); else if (ev.kind !== "dropped") dropped++; }
      else apply(ev);
    };
  }

  $("apply").onclick = connect;
  $("pause").onclick = () => {
    paused = !paused;
    $("pause").textContent = paused ? "Resume" : "Pause";
    if (!paused) { const waiting = pending; pending = []; waiting.forEach(apply); }
  };
  $("clear").onclick = () => {
    rows.clear(); order = []; $("rows").replaceChildren(); selected = null; dropped = 0;
    $("banner").style.display = "none"; $("empty").style.display = "block";
    $("detail").replaceChildren(el("div", "empty", "Select a message to see it and what each destination did with it."));
    $("counts").textContent = "0 messages";
  };
  if (fromHash !== null) signIn(fromHash).then(connect);
  else connect();
})();
