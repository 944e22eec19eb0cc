// Draws the report's figures from the JSON data block the page carries, and
// keeps the /reports form consistent. No inline script: the report pages' CSP
// allows none, so this file is linked there (and inlined in the HTML file).
"use strict";
(function () {
  var figures = JSON.parse(document.getElementById("report-figures").textContent);
  var drawn = figures.map(function (figure, index) {
    var element = document.getElementById("figure-" + (index + 1));
    return Plotly.newPlot(element, figure.data, figure.layout, {
      responsive: true,
      displaylogo: false,
    });
  });
  // Tests and screenshots wait for this.
  Promise.all(drawn).then(function () {
    document.body.setAttribute("data-drawn", String(drawn.length));
  });

  // A new month starts a new range: from/to would otherwise keep slicing the old one.
  var month = document.getElementById("month");
  if (month) {
    month.addEventListener("change", function () {
      document.getElementById("from").value = "";
      document.getElementById("to").value = "";
    });
  }
})();
