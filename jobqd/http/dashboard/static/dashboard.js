// jobqd dashboard: live refresh of the page's #live part, and confirmations for forms
// marked data-confirm. No inline script anywhere: the Content-Security-Policy forbids it.
(function () {
  "use strict";

  // Refresh #live every data-refresh seconds through htmx, unless the viewer is typing in
  // it or the tab is hidden.
  function arm(live) {
    var seconds = parseInt(live.getAttribute("data-refresh"), 10);
    if (!seconds || !window.htmx) { return; }
    window.setTimeout(function () {
      var busy = live.contains(document.activeElement) &&
        /^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement.tagName);
      if (busy || document.hidden) { arm(live); return; }
      window.htmx.ajax("GET", window.location.pathname + window.location.search, {
        target: "#live", select: "#live", swap: "outerHTML"
      }).then(function () {
        var fresh = document.getElementById("live");
        // No #live in the answer (signed out meanwhile): load the page the server gives.
        if (!fresh) { window.location.reload(); return; }
        arm(fresh);
      }, function () { arm(live); });
    }, seconds * 1000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var live = document.getElementById("live");
    if (live) { arm(live); }
  });

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { event.preventDefault(); }
  });
})();
