/* Attention Lens: a page keeps polling its background job through a server restart or a
 * store outage.
 *
 * Dash's renderer polls a running job with POST _dash-update-component?cacheKey=...; one
 * failed poll (the server restarting, Redis away: 502/503/504 or no answer) ends the poll
 * chain, and the page then shows the progress bar for ever or nothing at all. Here such a
 * poll is retried (honouring Retry-After) for up to RETRY_FOR_MS while a notice says what
 * is happening; the job's result is picked up when the server answers again. Polls read the
 * job's state and start nothing; a job's start is retried only after a 503 (nothing started).
 */
(function () {
    'use strict';
    if (!window.fetch || window.__alJobPollRetry) { return; }
    window.__alJobPollRetry = true;
    var RETRY_FOR_MS = 10 * 60 * 1000;
    var RETRY_STATUS = {502: true, 503: true, 504: true};
    var original = window.fetch.bind(window);
    var failing = 0;

    function notice(text) {
        var el = document.getElementById('al-retry-notice');
        if (!text) {
            if (el) { el.remove(); }
            return;
        }
        if (!el) {
            el = document.createElement('div');
            el.id = 'al-retry-notice';
            el.className = 'alert alert-warning al-retry-notice';
            el.setAttribute('role', 'status');
            el.setAttribute('aria-live', 'polite');
            el.style.cssText = 'position:fixed;left:50%;bottom:1rem;transform:translateX(-50%);' +
                'z-index:2000;max-width:90vw;margin:0;';
            document.body.appendChild(el);
        }
        el.textContent = text;
    }

    function urlOf(input) {
        return typeof input === 'string' ? input : (input && input.url) || '';
    }

    function isPoll(input) {
        var url = urlOf(input);
        return url.indexOf('_dash-update-component') >= 0 && url.indexOf('cacheKey=') >= 0;
    }

    /* A job's start (its request store changed): retried only when the server answered
     * 503 (the job store unreachable: nothing was started), never after no answer. */
    function isJobStart(input, init) {
        var body = init && typeof init.body === 'string' ? init.body : '';
        return urlOf(input).indexOf('_dash-update-component') >= 0 &&
            urlOf(input).indexOf('cacheKey=') < 0 && body.indexOf('-job-request.data"') >= 0;
    }

    function wait(ms) { return new Promise(function (r) { setTimeout(r, ms); }); }

    window.fetch = function (input, init) {
        var poll = isPoll(input);
        if (!poll && !isJobStart(input, init)) { return original(input, init); }
        var started = Date.now();
        var attempt = 0;
        function settle(res) {
            if (failing > 0) { failing -= 1; }
            if (failing === 0) { notice(''); }
            return res;
        }
        function again(res, error) {
            attempt += 1;
            if (attempt === 1) { failing += 1; }
            var ms = Math.min(5000, 500 * attempt);
            var text = 'The server is unreachable (restarting?), retrying…';
            if (res) {
                var after = parseFloat(res.headers.get('Retry-After'));
                if (after > 0) { ms = Math.min(10000, after * 1000); }
                if (res.status === 503) {
                    text = 'The job store is unreachable, retrying…';
                }
            }
            notice(text + ' Your job and this page are kept.');
            if (Date.now() - started + ms > RETRY_FOR_MS) {
                settle(null);
                if (res) { return res; }
                throw error;
            }
            return wait(ms).then(attemptOnce);
        }
        function attemptOnce() {
            return original(input, init).then(function (res) {
                if (RETRY_STATUS[res.status] && (poll || res.status === 503)) {
                    return again(res, null);
                }
                return attempt ? settle(res) : res;
            }, function (error) {
                if (!poll) { throw error; }
                return again(null, error);
            });
        }
        return attemptOnce();
    };
}());
