/* Traffic telemetry snippet: <script defer src="https://HOST/t.js" data-site="example.com"></script>
 * Sends one pageview on load and one per single-page-app navigation. No cookies,
 * no storage, no identifiers: the server sees the request and hashes its address. */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || window.__telemetry) return;
  window.__telemetry = true;
  var respectDnt = __RESPECT_DNT__;
  if (respectDnt && (navigator.doNotTrack === "1" || window.doNotTrack === "1")) return;
  var endpoint = new URL("/track", script.src).href;
  var site = script.getAttribute("data-site");
  var lastUrl = null;

  function send() {
    var url = location.href;
    if (url === lastUrl) return; // pushState to the same address is not a new view
    var referrer = lastUrl || document.referrer || null;
    lastUrl = url;
    var event = { url: url };
    if (site) event.site = site;
    if (referrer) event.referrer = referrer;
    var body = JSON.stringify(event);
    // text/plain keeps the request "simple": no CORS preflight, and sendBeacon
    // survives the page being closed.
    if (navigator.sendBeacon && navigator.sendBeacon(endpoint, new Blob([body], { type: "text/plain" }))) return;
    if (window.fetch) {
      fetch(endpoint, { method: "POST", body: body, keepalive: true, credentials: "omit",
                        headers: { "Content-Type": "text/plain" } }).catch(function () {});
    }
  }

  var pushState = history.pushState;
  history.pushState = function () {
    var result = pushState.apply(this, arguments);
    send();
    return result;
  };
  window.addEventListener("popstate", send);
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", send);
  else send();
})();
