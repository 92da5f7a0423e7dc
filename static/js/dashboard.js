/* The dashboard's workers part (uploads/overview_views.py dashboard_workers): asked for once the
 * rest of the page is shown, since the workers take up to a second to answer a ping, and again
 * every 30 seconds. The server's HTML replaces the placeholder; words come from the server only.
 * Without JavaScript the page offers a link that asks the workers with the page itself. */
(function () {
  'use strict'

  var REFRESH_MS = 30000
  var box = document.querySelector('[data-workers-url]')
  if (!box) return

  function load () {
    box.setAttribute('aria-busy', 'true')
    window.fetch(box.getAttribute('data-workers-url'), { credentials: 'same-origin', headers: { Accept: 'text/html' } })
      .then(function (response) {
        if (!response.ok) throw new Error(String(response.status))
        return response.text()
      })
      .then(function (html) {
        var fresh = new window.DOMParser().parseFromString(html, 'text/html').querySelector('[data-workers-report]')
        if (fresh) box.replaceChildren(document.importNode(fresh, true))
        var failed = document.querySelector('[data-workers-failed]')
        if (failed) failed.hidden = true
      })
      .catch(function () {
        var failed = document.querySelector('[data-workers-failed]')
        if (failed) failed.hidden = false
      })
      .then(function () {
        box.removeAttribute('aria-busy')
        window.setTimeout(load, REFRESH_MS)
      })
  }

  load()
})()
