// yigong console: CSRF token on every htmx request; error responses are shown, not dropped.
(function () {
  "use strict";
  var meta = document.querySelector('meta[name="csrf-token"]');
  var token = meta ? meta.getAttribute("content") : "";
  document.addEventListener("htmx:configRequest", function (e) {
    e.detail.headers["X-CSRF-Token"] = token;
  });
  document.addEventListener("htmx:beforeSwap", function (e) {
    if (e.detail.xhr.status >= 400) {
      e.detail.shouldSwap = true;
      e.detail.isError = false;
    }
  });
  // Typed confirmations: a submit button stays disabled until the typed text matches.
  document.querySelectorAll("[data-confirm-text]").forEach(function (input) {
    var button = document.getElementById(input.getAttribute("data-confirm-button"));
    var want = input.getAttribute("data-confirm-text");
    function check() { if (button) { button.disabled = input.value.trim() !== want; } }
    input.addEventListener("input", check);
    check();
  });
})();
