/* Attention Lens: back/forward restore the view from the URL (see components/shell.py). */
window.addEventListener('popstate', function () {
    var dc = window.dash_clientside;
    if (dc && dc.set_props) {
        dc.set_props('shell-nav', {data: {search: window.location.search,
                                          pathname: window.location.pathname,
                                          t: Date.now()}});
    }
});

/* Tick labels never overlap, whatever the screen: after a figure is drawn, an axis whose
   neighbouring tick labels overlap (their rotated boxes intersect) shows half as many,
   again until none overlap. Figures are built on the server without knowing the screen's
   width; this thins them where they are drawn (a phone), never on a wide screen. */
(function () {
    function corners(t) {
        var b = t.getBBox(), m = t.getScreenCTM();
        if (!m) { return null; }
        return [[b.x, b.y], [b.x + b.width, b.y], [b.x + b.width, b.y + b.height],
                [b.x, b.y + b.height]].map(function (p) {
            return [m.a * p[0] + m.c * p[1] + m.e, m.b * p[0] + m.d * p[1] + m.f];
        });
    }
    function separated(a, b) {
        var polys = [a, b];
        for (var k = 0; k < 2; k++) {
            for (var i = 0; i < 4; i++) {
                var p = polys[k][i], q = polys[k][(i + 1) % 4];
                var nx = q[1] - p[1], ny = p[0] - q[0];
                var pa = a.map(function (v) { return v[0] * nx + v[1] * ny; });
                var pb = b.map(function (v) { return v[0] * nx + v[1] * ny; });
                if (Math.max.apply(null, pa) <= Math.min.apply(null, pb) ||
                    Math.max.apply(null, pb) <= Math.min.apply(null, pa)) {
                    return true;
                }
            }
        }
        return false;
    }
    /* number of labels shown on the axis if two neighbours overlap, else 0 */
    function crowded(gd, ax) {
        var layer = gd.querySelector('.subplot.' + ax._mainSubplot + ' > .' +
                                     ax._id.charAt(0) + 'axislayer-above');
        if (!layer) { return 0; }
        var ticks = Array.prototype.filter.call(
            layer.querySelectorAll('.' + ax._id.charAt(0) + 'tick text'), function (t) {
                return (t.textContent || '').trim() && t.getBBox().width > 0;
            }).map(corners).filter(function (c) { return c; });
        /* neighbours along the axis (the DOM keeps ticks in the order they were added) */
        var along = ax._id.charAt(0) === 'x' ? 0 : 1;
        var mid = function (c) { return (c[0][along] + c[2][along]) / 2; };
        ticks.sort(function (a, b) { return mid(a) - mid(b); });
        for (var i = 0; i + 1 < ticks.length; i++) {
            if (!separated(ticks[i], ticks[i + 1])) { return ticks.length; }
        }
        return 0;
    }
    function thin(gd) {
        var fl = gd._fullLayout;
        if (!fl || !gd.layout) { return; }
        if (gd._alThin === undefined || gd._alThin.layout !== gd.layout) {
            gd._alThin = {layout: gd.layout, tries: 0};
        }
        if (gd._alThin.tries >= 6) { return; }
        var update = {};
        /* a figure asking for cells of at least meta.al_cell_px pixels (text inside) shows
           fewer x positions at once on a narrow screen, ending where it ended */
        var cell = fl.meta && fl.meta.al_cell_px, xa = fl.xaxis;
        if (cell && xa && xa.range && !gd._alThin.windowed) {
            var shown = xa.range[1] - xa.range[0];
            if (xa._length / shown < cell - 0.5) {
                var k = Math.max(2, Math.floor(xa._length / cell));
                update['xaxis.range'] = [xa.range[1] - k, xa.range[1]];
                gd._alThin.windowed = true;
            }
        }
        Object.keys(fl).forEach(function (name) {
            if (!/^[xy]axis\d*$/.test(name)) { return; }
            var ax = fl[name];
            if (!ax || !ax.showticklabels || !ax._mainSubplot || !ax.visible) { return; }
            var n = crowded(gd, ax);
            if (!n) { return; }
            var keep = Math.max(2, Math.floor(n / 2));
            var vals = ax.tickmode === 'array' && ax.tickvals ?
                Array.prototype.slice.call(ax.tickvals) : [];
            if (ax.tickmode === 'array' && vals.length) {
                var texts = ax.ticktext ? Array.prototype.slice.call(ax.ticktext) : null;
                var step = Math.ceil(vals.length / keep);
                update[name + '.tickvals'] = [vals.filter(function (v, i) { return i % step === 0; })];
                if (texts) {
                    update[name + '.ticktext'] = [texts.filter(function (v, i) { return i % step === 0; })];
                }
            } else {
                update[name + '.nticks'] = keep;
            }
        });
        if (Object.keys(update).length) {
            gd._alThin.tries += 1;
            window.Plotly.relayout(gd, update);
        }
    }
    function hook() {
        document.querySelectorAll('.js-plotly-plot').forEach(function (gd) {
            if (gd._alHooked || typeof gd.on !== 'function') { return; }
            gd._alHooked = true;
            var later = function () {  // once drawn, and again once a resize has settled
                window.setTimeout(function () { thin(gd); }, 30);
                window.setTimeout(function () { thin(gd); }, 700);
            };
            gd.on('plotly_afterplot', later);
            gd.on('plotly_relayout', later);
            thin(gd);
        });
    }
    window.setInterval(hook, 400);
})();
