/* Attention Lens: back/forward restore the view from the URL (see components/shell.py). */
window.addEventListener('popstate', function () {
    var dc = window.dash_clientside;
    if (dc && dc.set_props) {
        dc.set_props('shell-nav', {data: {search: window.location.search,
                                          pathname: window.location.pathname,
                                          t: Date.now()}});
    }
});
