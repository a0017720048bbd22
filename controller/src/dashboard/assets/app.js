// Lifeboat dashboard: live updates (server-sent events), POSTs with the CSRF
// header, dialogs, relative times. Plain JS, no dependencies; the CSP allows
// no inline script, so everything the page needs is in data-* attributes.
"use strict";

(function () {
  function csrf() {
    var m = document.querySelector('meta[name="lifeboat-csrf"]');
    return m ? m.getAttribute("content") : "";
  }

  // Relative times: <time data-ms="...">.
  function ago(ms) {
    var s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h ago";
    return new Date(ms).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }
  function tickTimes() {
    var ts = document.querySelectorAll("time[data-ms]");
    for (var i = 0; i < ts.length; i++) {
      var ms = Number(ts[i].getAttribute("data-ms"));
      if (ms > 0) {
        ts[i].textContent = ago(ms);
        ts[i].title = new Date(ms).toISOString();
      }
    }
  }

  // Sign-in: the form is submitted on load (a link preview runs no script,
  // so it cannot use the one-time token up).
  function autoLogin() {
    var f = document.forms.namedItem("login");
    if (f) f.submit();
  }

  // A live update replaces a fragment; a filter field the operator is
  // typing in (a GET form inside it) keeps its text and focus.
  function replaceKeepingInput(el, html) {
    var kept = [];
    var inputs = el.querySelectorAll("form[method=get] input[name]");
    for (var i = 0; i < inputs.length; i++) {
      if (inputs[i].value !== inputs[i].defaultValue || inputs[i] === document.activeElement) {
        kept.push({ name: inputs[i].name, value: inputs[i].value, focus: inputs[i] === document.activeElement,
                    start: inputs[i].selectionStart, end: inputs[i].selectionEnd });
      }
    }
    el.innerHTML = html;
    kept.forEach(function (k) {
      var n = el.querySelector('form[method=get] input[name="' + k.name + '"]');
      if (!n) return;
      n.value = k.value;
      if (k.focus) {
        n.focus();
        try { n.setSelectionRange(k.start, k.end); } catch (e) { /* not a text field */ }
      }
    });
  }

  // Reloads the page, but never under an open dialog (a plan being
  // reviewed, an attestation being typed): after it closes.
  function reloadWhenIdle() {
    if (document.querySelector("dialog[open]")) {
      setTimeout(reloadWhenIdle, 2000);
      return;
    }
    location.reload();
  }

  // Why the live stream closed: 429 (the controller serves as many live
  // pages as it may) is said in a banner and retried every 10 s without a
  // reload; any other answer reloads.
  function whyClosed(url) {
    var stop = typeof AbortController === "undefined" ? null : new AbortController();
    fetch(url, { credentials: "same-origin", redirect: "manual", signal: stop ? stop.signal : undefined })
      .then(function (res) {
        if (stop) stop.abort();
        if (res.status === 429) {
          document.body.dataset.liveState = "full";
          setTimeout(live, 10000);
          return;
        }
        reloadWhenIdle();
      }, function () { reloadWhenIdle(); });
  }

  // Live updates.
  function live() {
    var url = document.body.dataset.live;
    if (!url || typeof EventSource === "undefined") return;
    var errors = 0;
    var es = new EventSource(url);
    es.onopen = function () {
      errors = 0;
      document.body.dataset.liveState = "open";
    };
    es.onerror = function () {
      document.body.dataset.liveState = "error";
      errors += 1;
      // A non-200 answer or a redirect (401 after a restart, 503 or 307
      // in a failover) closes an EventSource for good. Ask once what it
      // was: a full controller (429) is retried in place; anything else
      // reloads the page, after a pause so a 503 page's own refresh is not
      // hammered.
      if (es.readyState === EventSource.CLOSED) {
        setTimeout(function () { whyClosed(url); }, 2000);
        return;
      }
      if (errors >= 5) {
        es.close();
        reloadWhenIdle();
      }
    };
    ["summary", "alarms", "live"].forEach(function (name) {
      es.addEventListener(name, function (ev) {
        var el = document.getElementById(name);
        if (el) {
          replaceKeepingInput(el, ev.data);
          tickTimes();
        }
      });
    });
    es.addEventListener("signed-out", function () {
      es.close();
      location.href = "/signed-out";
    });
    // A newer page of this session took this page's place (4 live pages
    // per session): stay as is, say so, do not reconnect.
    es.addEventListener("replaced", function () {
      es.close();
      document.body.dataset.liveState = "replaced";
    });
    // A page the browser hides (navigation, back/forward cache) gives its
    // stream back at once; shown again from that cache, it opens a new one.
    window.addEventListener("pagehide", function () { es.close(); }, { once: true });
  }

  window.addEventListener("pageshow", function (ev) {
    if (ev.persisted) live();
  });

  // POST forms (class "post"): sent with fetch and the CSRF header.
  function onSubmit(ev) {
    var form = ev.target;
    if (!(form instanceof HTMLFormElement) || !form.classList.contains("post")) return;
    ev.preventDefault();
    var out = form.querySelector(".result");
    var body = new URLSearchParams(new FormData(form));
    var button = ev.submitter;
    var action = (button && button.getAttribute("formaction")) || form.getAttribute("action");
    fetch(action, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-Lifeboat-Csrf": csrf(), "Content-Type": "application/x-www-form-urlencoded" },
      body: body.toString()
    }).then(function (res) {
      var go = res.headers.get("X-Lifeboat-Location");
      return res.text().then(function (text) {
        if (go) {
          location.href = go;
          return;
        }
        var dialog = form.closest("dialog");
        if (res.ok && res.headers.get("X-Lifeboat-Done") && dialog && dialog.close) {
          // Done: the live update shows the change; the dialog closes.
          dialog.close();
          return;
        }
        if (out) {
          out.innerHTML = res.headers.get("Content-Type") && res.headers.get("Content-Type").indexOf("text/html") === 0
            ? text
            : "";
          if (!out.innerHTML) out.textContent = text;
        } else if (!res.ok) {
          alert(text);
        }
      });
    }).catch(function (e) {
      if (out) out.textContent = "The request failed: " + e;
    });
  }

  // The move dialog: the guest and its host come from the pressed button,
  // the targets from GET /targets?from=H (<option> elements).
  function fillMove(d, button) {
    var f = d.querySelector("form");
    if (!f) return;
    var from = button.getAttribute("data-from") || "";
    f.elements.namedItem("from").value = from;
    f.elements.namedItem("vm").value = button.getAttribute("data-uuid") || "";
    var n = d.querySelector(".move-name");
    if (n) n.textContent = (button.getAttribute("data-name") || "") + " from " + from;
    var sel = f.elements.namedItem("target");
    sel.innerHTML = '<option value="">(loading…)</option>';
    delete sel.dataset.loaded;
    fetch("/targets?from=" + encodeURIComponent(from), { credentials: "same-origin" }).then(function (res) {
      return res.text().then(function (text) {
        if (res.ok) {
          sel.innerHTML = text;
          sel.dataset.loaded = "true";
        }
      });
    });
  }

  // Dialogs: a button with data-dialog opens it, data-close closes it.
  function onClick(ev) {
    var t = ev.target;
    if (!(t instanceof Element)) return;
    var open = t.closest("[data-dialog]");
    if (open) {
      var d = document.getElementById(open.getAttribute("data-dialog"));
      if (d && d.showModal) {
        var r = d.querySelector(".result");
        if (r) r.innerHTML = "";
        if (open.hasAttribute("data-uuid")) fillMove(d, open);
        d.showModal();
      }
      return;
    }
    var close = t.closest("[data-close]");
    if (close) {
      var c = document.getElementById(close.getAttribute("data-close"));
      if (c && c.close) c.close();
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    autoLogin();
    tickTimes();
    setInterval(tickTimes, 1000);
    live();
    document.addEventListener("submit", onSubmit);
    document.addEventListener("click", onClick);
  });
})();
