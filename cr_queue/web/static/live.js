// crh web: live parts of a page, without a reload.
// An element with data-live="URL" data-every="SECONDS" has its content replaced by
// what URL answers (the same part the server rendered into the page), every few
// seconds; a part that the server renders without data-live (a job that ended)
// stops the polling.  Only GET requests, to the same server.
(function () {
  "use strict";
  var state = document.getElementById("live-state");

  function say(text) {
    if (state) { state.textContent = text; }
  }

  function follow(element) {
    var url = element.getAttribute("data-live");
    var every = parseFloat(element.getAttribute("data-every") || "3") * 1000;
    function tick() {
      fetch(url, { credentials: "same-origin", cache: "no-store" })
        .then(function (response) {
          if (!response.ok) { throw new Error("HTTP " + response.status); }
          return response.text();
        })
        .then(function (html) {
          element.innerHTML = html;
          element.setAttribute("data-updated", String(Date.now()));
          say("updated " + new Date().toLocaleTimeString());
          var ended = element.querySelector("[data-ended]");
          if (!ended) { window.setTimeout(tick, every); }
        })
        .catch(function (error) {
          say("cannot update (" + error.message + "); trying again");
          window.setTimeout(tick, every * 2);
        });
    }
    window.setTimeout(tick, every);
  }

  function reloadLater(element) {
    var every = parseFloat(element.getAttribute("data-reload-every") || "3") * 1000;
    window.setTimeout(function () { window.location.reload(); }, every);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(follow);
    document.querySelectorAll("[data-reload-every]").forEach(reloadLater);
  });
})();
