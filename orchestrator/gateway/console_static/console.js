// drflow console: asks the gateway for the page's data every second and swaps the server-
// rendered fragments in place; draws the RTO/RPO charts with uPlot. No build step, no framework.
(function () {
  "use strict";
  var EVERY_MS = 1000;
  var api = document.body.dataset.api;
  var live = document.getElementById("live");
  var history = document.getElementById("history");
  var conn = document.getElementById("conn");
  var charts = {};
  var lastHtml = null, lastHistory = null, lastChart = null, failingSince = null;

  function clock(t) {
    return new Date(t * 1000).toLocaleTimeString();
  }

  function setConn(ok, text) {
    conn.textContent = text;
    conn.className = ok ? "conn" : "conn down";
  }

  function split(rows, pick, failover) {
    // One series per kind: failovers and drills on the same axes, nulls elsewhere.
    return rows[pick].map(function (v, i) { return rows.failover[i] === failover ? v : null; });
  }

  function draw(id, data, pick) {
    var el = document.getElementById(id);
    if (!el) return;
    var cols = [data.t, split(data, pick, 1), split(data, pick, 0)];
    el.dataset.points = String(data.t.length);
    if (!charts[id] && data.t.length === 0) return;  // made with its first point, when shown
    if (charts[id]) {
      charts[id].setData(cols);
      return;
    }
    var opts = {
      width: Math.max(280, el.clientWidth || 420), height: 220,
      // Padded so that the first and last points (often the only one) are not on the edge.
      scales: { x: { time: true, range: function (u, min, max) {
        var pad = Math.max((max - min) * 0.05, 60);
        return [min - pad, max + pad];
      } } },
      axes: [{}, { label: "seconds" }],
      series: [
        {},
        { label: "failover", stroke: "#c0392b", width: 2, spanGaps: true, points: { size: 8 } },
        { label: "drill", stroke: "#2471a3", width: 2, spanGaps: true, points: { size: 8 } },
      ],
    };
    charts[id] = new uPlot(opts, cols, el);
  }

  function drawCharts(chart) {
    var key = JSON.stringify(chart);
    if (key === lastChart) return;
    lastChart = key;
    // No point yet: the note instead of two empty axes. Shown before drawing, so that a chart
    // made now takes its container's real width.
    var empty = document.getElementById("chart-empty");
    if (empty) empty.hidden = chart.t.length > 0;
    var row = document.querySelector(".chart-row");
    if (row) row.hidden = chart.t.length === 0;
    draw("chart-rto", chart, "rto_s");
    draw("chart-rpo", chart, "rpo_s");
  }

  function tick() {
    fetch(api, { cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (d) {
        // Only a changed fragment is swapped in: text being read or selected stays put.
        if (live && d.html !== lastHtml) { live.innerHTML = d.html; lastHtml = d.html; }
        if (history && d.history_html !== undefined && d.history_html !== lastHistory) {
          history.innerHTML = d.history_html; lastHistory = d.history_html;
        }
        if (d.chart) drawCharts(d.chart);
        failingSince = null;
        document.body.classList.remove("offline");
        setConn(true, "live · " + clock(d.generated_at));
      })
      .catch(function (e) {
        // The page keeps the last data but says loudly that it is no longer current.
        failingSince = failingSince || Date.now() / 1000;
        document.body.classList.add("offline");
        setConn(false, "gateway unreachable since " + clock(failingSince) +
                " (" + e.message + "): the data shown is OLD");
      })
      .finally(function () { setTimeout(tick, EVERY_MS); });
  }

  tick();
})();
