// Small charts on a canvas, no library: the live page and the benchmark's HTML report share them.
// PagedCharts.line(canvas, {xs, series: [{name, values, color, xs?}], unit, xFormat, xLabel}): null values are
// gaps; a series may carry its own xs. Hovering shows each series' value nearest the cursor.
// PagedCharts.bars(canvas, {labels, values, unit}).
(function () {
  "use strict";
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }

  // A canvas sized to its CSS box at the screen's pixel ratio (resized only when that changed), cleared.
  function setup(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 300, h = canvas.clientHeight || 150;
    if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    return { ctx, w, h };
  }

  function line(canvas, opts, hoverX) {
    const { ctx, w, h } = setup(canvas);
    const xs = opts.xs || [];
    const series = opts.series || [];
    const xsOf = (s) => s.xs || xs;
    const left = 44, right = 8, top = 18, bottom = opts.xLabel ? 30 : 20;
    const pw = w - left - right, ph = h - top - bottom;
    let ymax = 0, x0 = Infinity, x1 = -Infinity;
    for (const s of series) {
      for (const v of s.values) if (v !== null && v > ymax) ymax = v;
      const own = xsOf(s);
      if (own.length) { x0 = Math.min(x0, own[0]); x1 = Math.max(x1, own[own.length - 1]); }
    }
    if (!(x1 >= x0)) { x0 = 0; x1 = 1; }
    ymax = opts.yMax || niceMax(ymax);
    const sx = (x) => left + (x1 > x0 ? (x - x0) / (x1 - x0) : 1) * pw;
    const sy = (y) => top + ph - (y / ymax) * ph;
    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeStyle = "#e5e7eb";
    ctx.fillStyle = "#6b7280";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = (ymax * i) / 4;
      ctx.beginPath();
      ctx.moveTo(left, sy(y));
      ctx.lineTo(left + pw, sy(y));
      ctx.stroke();
      ctx.fillText(fmt(y), left - 4, sy(y));
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const xFormat = opts.xFormat || ((x) => fmt(x));
    for (let i = 0; i <= 4; i++) {
      const x = x0 + ((x1 - x0) * i) / 4;
      ctx.fillText(xFormat(x), sx(x), top + ph + 4);
    }
    if (opts.xLabel) ctx.fillText(opts.xLabel, left + pw / 2, top + ph + 16);
    series.forEach((s, k) => {
      ctx.strokeStyle = s.color || PALETTE[k % PALETTE.length];
      ctx.lineWidth = 1.6;
      ctx.beginPath();
      let pen = false;
      const sxs = xsOf(s);
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) { pen = false; return; }
        const X = sx(sxs[i]), Y = sy(Math.min(v, ymax));
        if (pen) ctx.lineTo(X, Y); else ctx.moveTo(X, Y);
        pen = true;
      });
      ctx.stroke();
    });
    // legend: name and latest value of each series
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    let lx = left;
    series.forEach((s, k) => {
      let last = null;
      for (let i = s.values.length - 1; i >= 0; i--) if (s.values[i] !== null) { last = s.values[i]; break; }
      const label = `${s.name} ${fmt(last)}${opts.unit ? " " + opts.unit : ""}`;
      ctx.fillStyle = s.color || PALETTE[k % PALETTE.length];
      ctx.fillRect(lx, 4, 8, 8);
      ctx.fillStyle = "#374151";
      ctx.fillText(label, lx + 11, 2);
      lx += ctx.measureText(label).width + 24;
    });
    if (hoverX !== undefined && hoverX >= left && hoverX <= left + pw) {
      // the value of each series nearest the cursor's x
      const x = x0 + ((hoverX - left) / pw) * (x1 - x0);
      ctx.strokeStyle = "#9ca3af";
      ctx.beginPath(); ctx.moveTo(hoverX, top); ctx.lineTo(hoverX, top + ph); ctx.stroke();
      const lines = [xFormat(x)];
      series.forEach((s) => {
        const sxs = xsOf(s);
        let best = -1;
        for (let i = 0; i < sxs.length; i++) if (best < 0 || Math.abs(sxs[i] - x) < Math.abs(sxs[best] - x)) best = i;
        if (best >= 0) lines.push(`${s.name}: ${fmt(s.values[best])}${opts.unit ? " " + opts.unit : ""}`);
      });
      const bw = Math.max(...lines.map((l) => ctx.measureText(l).width)) + 10;
      const bx = hoverX + bw + 8 > w ? hoverX - bw - 6 : hoverX + 6;
      ctx.fillStyle = "rgba(17,24,39,0.85)";
      ctx.fillRect(bx, top + 2, bw, 14 * lines.length + 6);
      ctx.fillStyle = "#f9fafb";
      lines.forEach((l, i) => ctx.fillText(l, bx + 5, top + 5 + 14 * i));
    }
    canvas.dataset.points = String(Math.max(xs.length, ...series.map((s) => xsOf(s).length), 0));
    canvas._chart = opts;
    if (!canvas._hover) {
      canvas._hover = true;
      canvas.addEventListener("mousemove", (ev) => {
        const r = canvas.getBoundingClientRect();
        line(canvas, canvas._chart, ev.clientX - r.left);
      });
      canvas.addEventListener("mouseleave", () => line(canvas, canvas._chart));
    }
  }

  function bars(canvas, opts) {
    const { ctx, w, h } = setup(canvas);
    const labels = opts.labels || [], values = opts.values || [];
    const left = 44, right = 8, top = 14, bottom = 34;
    const pw = w - left - right, ph = h - top - bottom;
    const ymax = niceMax(Math.max(0, ...values));
    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeStyle = "#e5e7eb";
    ctx.fillStyle = "#6b7280";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = top + ph - (ph * i) / 4;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + pw, y); ctx.stroke();
      ctx.fillText(fmt((ymax * i) / 4), left - 4, y);
    }
    const slot = pw / Math.max(1, values.length);
    values.forEach((v, i) => {
      const bh = (v / ymax) * ph, x = left + slot * i + slot * 0.15;
      ctx.fillStyle = PALETTE[i % PALETTE.length];
      ctx.fillRect(x, top + ph - bh, slot * 0.7, bh);
      ctx.fillStyle = "#111827";
      ctx.textAlign = "center";
      ctx.textBaseline = "bottom";
      ctx.fillText(fmt(v) + (opts.unit ? " " + opts.unit : ""), x + slot * 0.35, top + ph - bh - 1);
      ctx.textBaseline = "top";
      ctx.fillStyle = "#374151";
      ctx.fillText(labels[i], x + slot * 0.35, top + ph + 4);
    });
    canvas.dataset.points = String(values.length);
  }

  window.PagedCharts = { line, bars, fmt, setup, PALETTE };
})();
