// codeformer-daemon dashboard: the project's own script (MIT, like the rest of the project).
// Two small things, both optional: every page works without them.
(function () {
  "use strict";

  // The overview keeps itself current: its live part is fetched again every few seconds.
  var REFRESH_MS = 3000;
  function refresh(box) {
    var url = box.getAttribute("data-refresh");
    window.setInterval(function () {
      if (document.hidden) { return; }
      fetch(url, { credentials: "same-origin", cache: "no-store", redirect: "error" })
        .then(function (answer) { return answer.ok ? answer.text() : null; })
        .then(function (html) { if (html !== null) { box.innerHTML = html; } })
        .catch(function () { /* the daemon is restarting: try again at the next tick */ });
    }, REFRESH_MS);
  }

  // The job page's comparison: the restoration over the scan, cut at the slider.
  function compare(box) {
    var after = box.querySelector(".after");
    var slider = box.querySelector(".slider");
    box.classList.add("live");
    function cut() {
      after.style.clipPath = "inset(0 " + (100 - Number(slider.value)) + "% 0 0)";
      box.setAttribute("data-split", slider.value);
    }
    slider.addEventListener("input", cut);
    cut();
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(refresh);
    document.querySelectorAll(".compare").forEach(compare);
  });
})();
