/* Live status on My uploads and on an upload's own page.
 *
 * Every element with data-status-url holds one upload's status block (uploads/snippets/
 * status_block.html). It asks that URL every 2 seconds and rewrites the block in place from the
 * status JSON (documented at uploads.views.status_json): the badge, the line of detail, the bar,
 * the problem box and which buttons show, with their labels. Words come from the server (in the
 * person's language), and the few of its own through Django's JavaScript catalogue (gettext).
 * It stops when the upload is final, asks less often while the tab is hidden or the upload waits
 * for a person, and backs off when the portal does not answer. On an upload's own page it also
 * brings the details and the timeline up to date (from a fresh copy of the page) whenever the
 * JSON says they changed. Text is only ever set with textContent.
 */
(function () {
  'use strict'

  // Django's JavaScript catalogue (/jsi18n/, loaded first by base.html); without it, English.
  var gettext = window.gettext || function (text) { return text }
  var interpolate = window.interpolate || function (text, values) {
    return text.replace(/%\(\w+\)s/g, function (match) { return values[match.slice(2, -2)] })
  }

  var POLL_MS = 2000
  var WAITING_POLL_MS = 15000 // failed / refused / reconnect / awaiting review: only a person moves these on
  var HIDDEN_POLL_MS = 10000
  var MAX_BACKOFF_MS = 60000
  // The part of the status block that shows each kind of action (status_block.html).
  var SLOTS = { use_format: 'use_format', retry: 'retry', reconnect: 'reconnect', upload_again: 'upload_again', remove: 'stop', cancel: 'stop' }
  var SLOT_NAMES = ['use_format', 'retry', 'reconnect', 'upload_again', 'stop']

  // ---- the page --------------------------------------------------------------------------

  var announcer = document.createElement('div')
  announcer.className = 'visually-hidden'
  announcer.setAttribute('aria-live', 'polite')
  document.body.appendChild(announcer)

  function announce (text) {
    announcer.textContent = ''
    // A fresh text node after a tick makes screen readers read it even when it repeats.
    window.setTimeout(function () { announcer.textContent = text }, 50)
  }

  /* Each status block has a polite live region of its own (data-live="announce", in the page
     from the start, so screen readers follow it). It gets the status when it changes (with the
     reason, when the upload stopped) and, on an upload's own page, how far it is in quarters:
     never every percent, which would talk over everything else every two seconds. */
  var QUARTER = 25

  function announceIn (block, text) {
    var region = part(block, 'announce')
    if (!region) return
    region.textContent = ''
    window.setTimeout(function () { region.textContent = text }, 50)
  }

  function statusWords (s) {
    var words = interpolate(gettext('%(name)s: %(status)s.'), { name: s.name, status: s.status_label }, true)
    return s.error_message ? words + ' ' + s.error_message : words
  }

  function quarterOf (s) {
    return s.active ? Math.floor(s.progress_percent / QUARTER) : 0
  }

  function progressWords (s) {
    // The percent sign goes with the number: interpolate() knows no %% for a plain one.
    return interpolate(gettext('%(name)s: %(status)s, %(percent)s.'),
      { name: s.name, status: s.status_label, percent: quarterOf(s) * QUARTER + '%' }, true)
  }

  function setText (el, text) {
    if (el && el.textContent !== text) el.textContent = text
  }

  function show (el, visible) {
    if (el) el.hidden = !visible
  }

  function part (block, name) {
    return block.querySelector('[data-live="' + name + '"]')
  }

  function render (block, s) {
    var status = block.querySelector('.status')
    status.dataset.status = s.status

    var badge = part(block, 'badge')
    badge.dataset.status = s.status
    setText(badge, s.status_label)
    setText(part(block, 'detail'), s.detail)

    var bar = part(block, 'bar')
    bar.value = s.progress_percent
    setText(bar, s.progress_percent + '%')
    part(block, 'bar-wrap').classList.toggle('bar--active', !!s.active)

    show(part(block, 'ready'), s.status === 'ready' && !!s.ims_image_id)
    setText(part(block, 'image-id'), s.ims_image_id || '')
    show(part(block, 'receiving-hint'), s.status === 'receiving' || s.status === 'sending_early')
    // Sent on to IMS while the browser still sends it: the second hop's bar.
    show(part(block, 'hops'), !!s.both_hops)
    var sendBar = part(block, 'send-bar')
    if (sendBar) {
      sendBar.value = s.send_percent || 0
      setText(sendBar, (s.send_percent || 0) + '%')
    }

    var problem = part(block, 'problem')
    show(problem, !!s.error_message)
    problem.classList.toggle('notice--error', !!s.stopped)
    problem.classList.toggle('notice--warning', !s.stopped)
    setText(part(block, 'error-message'), s.error_message || '')
    setText(part(block, 'error-hint'), s.error_hint || '')
    show(part(block, 'error-hint'), !!s.error_hint)

    renderActions(block, s.actions || [])
  }

  /* Show the actions the server offers, with its labels; the primary one looks primary. */
  function renderActions (block, actions) {
    var offered = {}
    actions.forEach(function (action) { offered[SLOTS[action.kind]] = action })
    SLOT_NAMES.forEach(function (name) {
      var slot = part(block, name)
      var action = offered[name]
      show(slot, !!action)
      if (!slot || !action) return
      var button = part(block, name + '-button') || slot
      setText(button, action.label)
      button.classList.toggle('button--primary', !!action.primary)
      button.classList.toggle(button.dataset.quiet, !action.primary)
      if (action.format) part(block, name + '-value').value = action.format
      if (action.confirm) slot.dataset.confirm = action.confirm
    })
  }

  /* The upload's own page: swap in the details and the timeline of a fresh copy of the page.
   * Only the latest of overlapping refreshes is applied, so an older copy never wins. */
  var refreshes = 0

  function refreshSections (block) {
    var number = ++refreshes
    return window.fetch(block.dataset.detailPage, { credentials: 'same-origin', cache: 'no-store' })
      .then(function (response) {
        if (!response.ok || response.redirected) throw new Error('HTTP ' + response.status)
        return response.text()
      })
      .then(function (html) {
        if (number !== refreshes) return
        var fresh = new window.DOMParser().parseFromString(html, 'text/html')
        document.querySelectorAll('[data-live-section]').forEach(function (section) {
          var name = section.dataset.liveSection
          var replacement = fresh.querySelector('[data-live-section="' + name + '"]')
          if (!replacement) throw new Error('no ' + name + ' in the fresh page')
          section.replaceWith(document.adoptNode(replacement))
        })
        show(part(block, 'page-stale'), false)
      })
      .catch(function () {
        show(part(block, 'page-stale'), true)
      })
  }

  function setStale (block, text) {
    var stale = part(block, 'stale')
    setText(stale, text)
    show(stale, !!text)
  }

  function StopPolling (message) {
    this.message = message
  }

  // How long until the next question: a person must act first, or nobody is looking.
  function delayFor (s) {
    if (s.needs_action || s.waiting_on === 'reviewer') return WAITING_POLL_MS
    return document.hidden ? HIDDEN_POLL_MS : POLL_MS
  }

  // The status JSON from `url`; StopPolling when asking again cannot help.
  function fetchStatus (url) {
    return window.fetch(url, { headers: { Accept: 'application/json' }, credentials: 'same-origin', cache: 'no-store' })
      .then(function (response) {
        if (response.redirected || response.status === 401 || response.status === 403) {
          throw new StopPolling(gettext('You are signed out, so this page stopped updating. Reload it to sign in again.'))
        }
        if (response.status === 404) throw new StopPolling(gettext('This upload no longer exists.'))
        if (!response.ok) throw new Error('HTTP ' + response.status)
        return response.json()
      })
  }

  function watch (block, startDelay) {
    var url = block.dataset.statusUrl
    var current = block.querySelector('.status').dataset.status
    var quarter = null // the last quarter of progress announced (an upload's own page only)
    var detailsVersion = block.dataset.detailsVersion
    var failures = 0
    var timer = null
    var stopped = false

    function schedule (ms) {
      timer = window.setTimeout(poll, ms)
    }

    function poll () {
      timer = null
      fetchStatus(url)
        .then(function (s) {
          failures = 0
          setStale(block, '')
          if (s.status !== current) {
            announceIn(block, statusWords(s))
            current = s.status
            quarter = quarterOf(s)
          } else if (block.dataset.detailPage && quarter !== null && quarterOf(s) > quarter && quarterOf(s) < 4) {
            quarter = quarterOf(s)
            announceIn(block, progressWords(s))
          } else if (quarter === null) {
            quarter = quarterOf(s) // where it stood when the page opened: nothing to say yet
          }
          render(block, s)
          if (block.dataset.detailPage && s.details_version !== detailsVersion) {
            detailsVersion = s.details_version
            refreshSections(block)
          }
          if (s.final) {
            stopped = true
          } else {
            schedule(delayFor(s))
          }
        })
        .catch(function (error) {
          if (error instanceof StopPolling) {
            stopped = true
            setStale(block, error.message)
            return
          }
          failures++
          var delay = Math.min(POLL_MS * Math.pow(2, failures), MAX_BACKOFF_MS)
          if (failures >= 2) {
            setStale(block, interpolate(gettext('The portal is not answering right now; trying again in %(seconds)s seconds.'),
              { seconds: Math.round(delay / 1000) }, true))
          }
          schedule(delay)
        })
    }

    schedule(startDelay)

    return {
      // Ask at once (the tab came back into view), unless a request is already on its way.
      wake: function () {
        if (stopped || timer === null || failures > 0) return
        window.clearTimeout(timer)
        poll()
      }
    }
  }

  var watchers = Array.prototype.map.call(document.querySelectorAll('[data-status-url]'), function (block, index) {
    return watch(block, Math.min(index * 120, 2000)) // spread the first requests of a long list
  })

  document.addEventListener('visibilitychange', function () {
    if (!document.hidden) watchers.forEach(function (watcher) { watcher.wake() })
  })

  // ---- buttons ---------------------------------------------------------------------------

  function copyText (text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text)
    // Plain http (not localhost): select the text in a temporary field and copy that.
    return new Promise(function (resolve, reject) {
      var field = document.createElement('textarea')
      field.value = text
      field.setAttribute('readonly', '')
      field.className = 'visually-hidden'
      document.body.appendChild(field)
      field.select()
      var ok = false
      try { ok = document.execCommand('copy') } catch (e) { ok = false }
      field.remove()
      if (ok) { resolve() } else { reject(new Error('copy failed')) }
    })
  }

  document.addEventListener('click', function (event) {
    var button = event.target.closest('[data-copy]')
    if (!button) return
    var code = button.closest('.status').querySelector('[data-live="image-id"]')
    var label = button.textContent
    copyText(code.textContent.trim()).then(function () {
      button.textContent = gettext('Copied')
      announce(gettext('Image id copied'))
    }, function () {
      button.textContent = gettext('Select and copy by hand')
      window.getSelection().selectAllChildren(code)
    }).then(function () {
      window.setTimeout(function () { button.textContent = label }, 2000)
    })
  })

  document.addEventListener('submit', function (event) {
    var form = event.target
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault()
      return
    }
    // One press is enough: the page reloads with the result.
    var button = form.querySelector('button[type="submit"]')
    if (button) window.setTimeout(function () { button.disabled = true }, 0)
  })
})()
