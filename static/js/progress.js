/* Live status on My uploads and on an upload's own page.
 *
 * Every element with data-status-url holds one upload's status block (uploads/snippets/
 * status_block.html). It asks that URL every 2 seconds and rewrites the block in place: the
 * badge, the line of detail, the bar, the problem box and which buttons show. It stops when the
 * upload is finished, asks less often while the tab is hidden or the upload waits for a person,
 * and backs off when the portal does not answer. Text is only ever set with textContent.
 */
(function () {
  'use strict'

  var POLL_MS = 2000
  var WAITING_POLL_MS = 15000 // failed / reconnect: only a person moves these on
  var HIDDEN_POLL_MS = 10000
  var MAX_BACKOFF_MS = 60000
  var ACTIVE = { receiving: true, checking: true, converting: true, pushing: true, processing: true }
  var WAITING_FOR_A_PERSON = { failed: true, reconnect: true }
  var NBSP = '\u00a0'

  // ---- words and numbers, the same as the templates write them ---------------------------

  /* Like Django's filesizeformat: 1024-based, one decimal, "bytes" below 1 KB. */
  function formatBytes (bytes) {
    bytes = Number(bytes) || 0
    if (bytes < 1024) return bytes + NBSP + (bytes === 1 ? 'byte' : 'bytes')
    var units = ['KB', 'MB', 'GB', 'TB', 'PB']
    var value = bytes / 1024
    var unit = 0
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024
      unit++
    }
    return value.toFixed(1) + NBSP + units[unit]
  }

  function formatDuration (seconds) {
    if (seconds < 60) return 'less than a minute'
    if (seconds < 3600) return 'about ' + Math.round(seconds / 60) + ' min'
    var hours = Math.floor(seconds / 3600)
    var minutes = Math.round((seconds % 3600) / 60)
    if (minutes === 60) { hours++; minutes = 0 }
    return 'about ' + hours + ' h' + (minutes ? ' ' + minutes + ' min' : '')
  }

  function utcTime (iso) {
    var date = new Date(iso)
    if (isNaN(date)) return ''
    var pad = function (n) { return (n < 10 ? '0' : '') + n }
    return pad(date.getUTCHours()) + ':' + pad(date.getUTCMinutes()) + ' UTC'
  }

  function detailText (s) {
    switch (s.status) {
      case 'receiving':
        return formatBytes(s.received_bytes) + ' of ' + formatBytes(s.size) + ' received'
      case 'received':
        return s.retry_at
          ? 'Waiting to be sent again (attempt ' + (s.attempt + 1) + ') at ' + utcTime(s.retry_at)
          : 'Waiting to be sent to IMS'
      case 'checking':
        return 'Checking what the file really is'
      case 'converting':
        return 'Converting to QCOW2, which IMS takes · ' + s.convert_percent + '%'
      case 'pushing': {
        var parts = [formatBytes(s.sent_bytes) + ' of ' + formatBytes(s.send_size || s.size) + ' sent']
        if (s.send_rate >= 1) parts.push(formatBytes(s.send_rate) + '/s')
        if (s.eta_seconds !== null && s.eta_seconds !== undefined) parts.push(formatDuration(s.eta_seconds) + ' left')
        return parts.join(' · ')
      }
      case 'processing':
        return 'IMS is checking the image (status: ' + (s.ims_status || 'saving') + ')'
      case 'ready':
        return 'Ready · image id'
      case 'failed':
        return 'Stopped'
      case 'reconnect':
        return 'Waiting for you to reconnect your cloud account'
      case 'cancelled':
        return 'Cancelled · the portal removed its copy of the file'
      default:
        return s.status_label
    }
  }

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
    setText(part(block, 'detail'), detailText(s))

    var bar = part(block, 'bar')
    bar.value = s.progress_percent
    setText(bar, s.progress_percent + '%')
    part(block, 'bar-wrap').classList.toggle('bar--active', !!ACTIVE[s.status])

    show(part(block, 'ready'), s.status === 'ready' && !!s.ims_image_id)
    setText(part(block, 'image-id'), s.ims_image_id || '')
    show(part(block, 'receiving-hint'), s.status === 'receiving')

    var problem = part(block, 'problem')
    show(problem, !!s.error_message)
    problem.classList.toggle('notice--error', s.status === 'failed')
    problem.classList.toggle('notice--warning', s.status !== 'failed')
    setText(part(block, 'error-message'), s.error_message || '')
    setText(part(block, 'error-hint'), s.error_hint || '')
    show(part(block, 'error-hint'), !!s.error_hint)
    show(part(block, 'reconnect-link'), s.status === 'reconnect')

    show(part(block, 'use-format'), !!s.suggested_format)
    if (s.suggested_format) {
      part(block, 'use-format-value').value = s.suggested_format
      setText(part(block, 'use-format-label'), 'Upload it as ' + s.suggested_format.toUpperCase())
    }
    show(part(block, 'retry'), s.can_retry)
    show(part(block, 'cancel'), s.can_cancel)
  }

  function setStale (block, text) {
    var stale = part(block, 'stale')
    setText(stale, text)
    show(stale, !!text)
  }

  function StopPolling (message) {
    this.message = message
  }

  function watch (block, startDelay) {
    var url = block.dataset.statusUrl
    var current = block.querySelector('.status').dataset.status
    var failures = 0
    var timer = null
    var stopped = false

    function schedule (ms) {
      timer = window.setTimeout(poll, ms)
    }

    function delayFor (status) {
      if (WAITING_FOR_A_PERSON[status]) return WAITING_POLL_MS
      return document.hidden ? HIDDEN_POLL_MS : POLL_MS
    }

    function poll () {
      timer = null
      window.fetch(url, { headers: { Accept: 'application/json' }, credentials: 'same-origin', cache: 'no-store' })
        .then(function (response) {
          if (response.redirected || response.status === 401 || response.status === 403) {
            throw new StopPolling('You are signed out, so this page stopped updating. Reload it to sign in again.')
          }
          if (response.status === 404) throw new StopPolling('This upload no longer exists.')
          if (!response.ok) throw new Error('HTTP ' + response.status)
          return response.json()
        })
        .then(function (s) {
          failures = 0
          setStale(block, '')
          if (s.status !== current) {
            announce('“' + s.name + '”: ' + s.status_label)
            show(part(block, 'page-stale'), block.hasAttribute('data-detail-page'))
            current = s.status
          }
          render(block, s)
          if (s.finished) {
            stopped = true
          } else {
            schedule(delayFor(s.status))
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
            setStale(block, 'The portal is not answering right now; trying again in ' + Math.round(delay / 1000) + ' seconds.')
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
      button.textContent = 'Copied'
      announce('Image id copied')
    }, function () {
      button.textContent = 'Select and copy by hand'
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
