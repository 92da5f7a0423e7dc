/* The upload page: Uppy's Dashboard sends disk images to the portal's tus server.
 *
 * Uppy comes as the browser bundle of the `uppy` npm package (window.Uppy, loaded before this
 * file). The page passes everything else in: data- attributes on #uploader and json_script
 * blocks (disk formats, file endings, the limits of each detail, the page's sentences). No
 * inline script, so a strict CSP can forbid them.
 *
 * What the tus server reads from Upload-Metadata: filename, image_name, disk_format, os_version,
 * min_disk, min_ram, tags. Only those (plus filetype) are sent; Uppy's own meta stays home.
 */
(function () {
  'use strict'

  var root = document.getElementById('uploader')
  if (!root) return

  // Words in the person's language: Django's JavaScript catalogue (/jsi18n/, loaded first by
  // base.html) defines gettext, ngettext and interpolate; without it the English stands.
  var gettext = window.gettext || function (text) { return text }
  var ngettext = window.ngettext || function (one, many, n) { return n === 1 ? one : many }
  var interpolate = window.interpolate || function (text, values, named) {
    return text.replace(/%\(\w+\)s/g, function (match) { return values[match.slice(2, -2)] })
  }

  var problemsBox = document.getElementById('upload-problems')
  var problemList = problemsBox.querySelector('.problem-list')
  var doneBox = document.getElementById('upload-done')
  var doneList = doneBox.querySelector('.done-list')
  var retryingNote = document.getElementById('upload-retrying')
  var problems = new Map() // key -> <li>

  if (!window.Uppy || !window.Uppy.Uppy) {
    showProblem('page', gettext('The upload tool could not be loaded. Reload the page; if that does not help, tell your portal administrator.'))
    return
  }

  var Uppy = window.Uppy.Uppy
  var Dashboard = window.Uppy.Dashboard
  var Tus = window.Uppy.Tus

  var MiB = 1024 * 1024
  var SENT_META = ['filename', 'filetype', 'image_name', 'disk_format', 'os_version', 'min_disk', 'min_ram', 'tags']
  var ZERO_UUID = '00000000-0000-0000-0000-000000000000'
  var UUID_RE = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/i

  var diskFormats = readJson('disk-formats') // [["qcow2", "QCOW2"], ...]
  var extensionFormats = readJson('extension-formats') // {".qcow2": "qcow2", ...}
  var extensions = Object.keys(extensionFormats)
  var limits = readJson('upload-limits') // {"min_ram": {"min": 0, "max": ...}, "max_bytes": ...}
  var words = readJson('upload-words') // {"cancelled": "Cancelled on My uploads...", ...}
  var maxBytes = limits.max_bytes

  // ---- small helpers ---------------------------------------------------------------------

  function readJson (id) {
    return JSON.parse(document.getElementById(id).textContent)
  }

  /* Uppy's locale for the page's language: the language pack the page loaded
     (window.Uppy.locales, e.g. de_DE for <html lang="de">) with `strings` on top; English needs none. */
  function uppyLocale (strings) {
    var lang = (document.documentElement.lang || 'en').toLowerCase()
    var packs = (window.Uppy && window.Uppy.locales) || {}
    var pack = packs[root.dataset.uppyLocale || ''] || null
    if (!pack || lang.indexOf('en') === 0) return { strings: strings }
    return { strings: Object.assign({}, pack.strings, strings), pluralize: pack.pluralize }
  }

  function extensionOf (name) {
    var dot = name.lastIndexOf('.')
    return dot > 0 ? name.slice(dot).toLowerCase() : ''
  }

  function imageNameFor (fileName) {
    var dot = fileName.lastIndexOf('.')
    return (dot > 0 ? fileName.slice(0, dot) : fileName).slice(0, limits.image_name.max_length) || 'image'
  }

  function uidOf (url) {
    return (String(url || '').match(UUID_RE) || [])[0] || ''
  }

  function cookie (name) {
    var match = document.cookie.match(new RegExp('(?:^|;\\s*)' + name + '=([^;]*)'))
    return match ? decodeURIComponent(match[1]) : ''
  }

  // The cookie is the freshest copy (it changes when the person signs in again in another tab);
  // the page's own token covers a set-up where the cookie is not readable.
  function csrfToken () {
    return cookie('csrftoken') || root.dataset.csrfToken
  }

  // ---- what the person sees besides the Dashboard ----------------------------------------

  function showProblem (key, text, fileName) {
    var item = problems.get(key)
    if (!item) {
      item = document.createElement('li')
      problems.set(key, item)
      problemList.appendChild(item)
    }
    item.textContent = ''
    if (fileName) {
      var name = document.createElement('strong')
      name.textContent = fileName
      item.appendChild(name)
      item.appendChild(document.createTextNode(': '))
    }
    item.appendChild(document.createTextNode(text))
    problemsBox.hidden = false
  }

  function clearProblem (key) {
    var item = problems.get(key)
    if (!item) return
    item.remove()
    problems.delete(key)
    problemsBox.hidden = problems.size === 0
  }

  function clearRestrictionProblems () {
    Array.from(problems.keys()).forEach(function (key) {
      if (key.indexOf('refused:') === 0) clearProblem(key)
    })
  }

  /* What a screen reader hears (#upload-announcer, polite): each file's steps, not Uppy's status
     bar, which changes many times a second. Started, every quarter sent, in the portal; what
     comes within a second is said at once. Problems go to #upload-problems (role=alert). */
  var announcer = document.getElementById('upload-announcer')
  var QUARTER = 25
  var quarterSaid = new Map() // file id -> the last quarter said
  var toSay = []
  var sayTimer = null

  function announce (text) {
    toSay.push(text)
    if (sayTimer) return
    sayTimer = window.setTimeout(function () {
      sayTimer = null
      announcer.textContent = toSay.join(' ')
      toSay = []
    }, 1000)
  }

  function announceProgress (file, progress) {
    if (!file || !progress.bytesTotal) return
    var quarter = Math.floor(progress.bytesUploaded / progress.bytesTotal * 100 / QUARTER)
    if (quarter < 1 || quarter > 3 || quarter <= (quarterSaid.get(file.id) || 0)) return
    quarterSaid.set(file.id, quarter)
    // The percent sign goes with the number: interpolate() knows no %% for a plain one.
    announce(interpolate(gettext('%(file)s: %(percent)s sent.'), { file: file.name, percent: quarter * QUARTER + '%' }, true))
  }

  function showDone (file, uid) {
    announce(interpolate(gettext('%(file)s: in the portal.'), { file: file.name }, true))
    var item = document.createElement('li')
    if (uid) {
      var link = document.createElement('a')
      link.href = root.dataset.detailUrl.replace(ZERO_UUID, uid)
      link.textContent = file.meta.image_name || file.name
      item.appendChild(link)
    } else {
      item.appendChild(document.createTextNode(file.meta.image_name || file.name))
    }
    item.appendChild(document.createTextNode(' (' + file.name + ')'))
    doneList.appendChild(item)
    if (doneBox.hidden) {
      doneBox.hidden = false
      doneBox.querySelector('.alert__title').focus({ preventScroll: true })
    }
  }

  var SIGNED_OUT = gettext('The portal refused the file because your sign-in has ended. Reload this page (sign in again if asked) and add the file again; it continues where it stopped.')

  /* The tus server refuses with a plain-text reason written for people ("Tag “x” is not valid…",
     "Connect your cloud account first…"): show it as it is. Anything else gets plain words. */
  function reasonFor (error, response) {
    var res = error && error.originalResponse
    var refusal = refusedContinuation(error)
    var status = res && res.getStatus ? res.getStatus() : ((refusal && refusal.status) || (response && response.status))
    var body = ''
    var type = ''
    if (res && res.getBody) {
      body = res.getBody() || ''
      type = (res.getHeader && res.getHeader('Content-Type')) || ''
    } else if (response && response.body && response.body.xhr) {
      body = response.body.xhr.responseText || ''
      type = response.body.xhr.getResponseHeader('Content-Type') || ''
    }
    body = String(body).trim()
    if (body && type.indexOf('text/plain') === 0) return body
    if (!status) {
      return gettext('The connection to the portal was lost. Check your network, then press Retry: the upload continues where it stopped.')
    }
    if (status === 403) return SIGNED_OUT
    if (status === 413) return words.too_large
    return interpolate(gettext('The portal could not take this file just now (error %(status)s). Press Retry; if it keeps happening, tell your portal administrator.'), { status: status }, true)
  }

  // ---- the fields of the "Image details" card --------------------------------------------

  function inputId (fieldId) {
    // The Dashboard's <label for> points at this id.
    return 'uppy-Dashboard-FileCard-input-' + fieldId
  }

  function withHelp (h, fieldId, control, help) {
    return h('div', { class: 'ims-field' }, control, h('p', { class: 'ims-field-help', id: inputId(fieldId) + '-help' }, help))
  }

  function textField (fieldId, attrs, help) {
    return function (field, h) {
      var props = {
        id: inputId(fieldId),
        class: field.fieldCSSClasses.text,
        form: field.form,
        type: 'text',
        value: field.value,
        onInput: function (event) { field.onChange(event.target.value) },
        'data-uppy-super-focusable': true
      }
      if (help) props['aria-describedby'] = inputId(fieldId) + '-help'
      Object.keys(attrs).forEach(function (key) { props[key] = attrs[key] })
      var input = h('input', props)
      return help ? withHelp(h, fieldId, input, help) : input
    }
  }

  function diskFormatField (field, h) {
    var options = diskFormats.map(function (choice) {
      return h('option', { value: choice[0], key: choice[0] }, choice[1])
    })
    var select = h('select', {
      id: inputId('disk_format'),
      class: 'ims-select',
      form: field.form,
      value: field.value,
      required: true,
      'aria-describedby': inputId('disk_format') + '-help',
      onChange: function (event) { field.onChange(event.target.value) }
    }, options)
    return withHelp(h, 'disk_format', select, gettext('Chosen from the file name. Change it only if you know the file is in another format.'))
  }

  var metaFields = [
    {
      id: 'image_name',
      name: gettext('Image name'),
      render: textField('image_name', { maxLength: limits.image_name.max_length, required: true, placeholder: gettext('e.g. ubuntu-24.04-web') },
        gettext('How the image is called in IMS.'))
    },
    {
      id: 'os_version',
      name: gettext('OS version'),
      render: textField('os_version', { list: 'os-version-options', maxLength: limits.os_version.max_length, placeholder: gettext('e.g. Ubuntu 24.04 server 64bit'), autocomplete: 'off' },
        gettext('The operating system inside the image. Pick from the list or type your own.'))
    },
    { id: 'disk_format', name: gettext('Disk format'), render: diskFormatField },
    {
      id: 'min_disk',
      name: gettext('Min disk (GB)'),
      render: textField('min_disk', { type: 'number', min: limits.min_disk.min, max: limits.min_disk.max, step: 1, inputMode: 'numeric', placeholder: gettext('e.g. 40') },
        gettext('Smallest system disk for servers made from this image. Leave empty if unsure.'))
    },
    {
      id: 'min_ram',
      name: gettext('Min RAM (MB)'),
      render: textField('min_ram', { type: 'number', min: limits.min_ram.min, max: limits.min_ram.max, step: 1, inputMode: 'numeric', placeholder: gettext('e.g. 2048') },
        gettext('Smallest memory for servers made from this image. Leave empty if unsure.'))
    },
    {
      id: 'tags',
      name: gettext('Tags'),
      render: textField('tags', { maxLength: limits.tags.max_length, placeholder: gettext('e.g. team=web, env=test') },
        gettext('Optional labels as key=value, separated by commas.'))
    }
  ]

  // ---- an upload the portal ended while this page was sending it --------------------------

  /* To continue an upload, tus-js-client asks where it stands (HEAD). On any refusal but 423 it
     quietly forgets that upload and starts the file again as a new one from byte 0: a file
     cancelled on My uploads (PATCH 409, then HEAD 410) was sent all over again and nobody was
     told. A HEAD goes only to an upload this page (or an earlier visit) made, so a refusal means
     that upload is over or unreachable: turn the reply into an error, which tus reports. */
  function refuseToStartAgain (req, res) {
    var status = res.getStatus()
    if (req.getMethod() !== 'HEAD' || (status >= 200 && status < 300) || status === 423) return
    var error = new Error('tus: the portal answered ' + status + ' to continuing an upload')
    error.refusedContinuation = { url: req.getURL(), status: status }
    throw error
  }

  // The portal was busy or down for a moment: trying the same upload again can help.
  function passing (status) {
    return status === 423 || status === 429 || status >= 500
  }

  function refusedHead (error) {
    return (error && error.causingError && error.causingError.refusedContinuation) || null
  }

  // {url, status} of a refused HEAD or PATCH of an upload this page was continuing, else null.
  function refusedContinuation (error) {
    if (!error) return null
    if (refusedHead(error)) return refusedHead(error)
    var req = error.originalRequest
    var res = error.originalResponse
    if (req && res && req.getMethod() === 'PATCH') return { url: req.getURL(), status: res.getStatus() }
    return null
  }

  // 404: no such upload (any more); 410: cancelled or expired; 409 (after tus's own retries):
  // it stopped receiving bytes. Either way it is over: say why, never start it again silently.
  function uploadIsOver (refusal) {
    return !!refusal && [404, 409, 410].indexOf(refusal.status) !== -1
  }

  /* Forget where the ended upload was (tus keeps it in localStorage, Uppy on the file), so that
     Retry, which the person presses knowing why, starts the file as a new upload. */
  function forgetUpload (file, url) {
    try {
      for (var i = localStorage.length - 1; i >= 0; i--) {
        var key = localStorage.key(i)
        if (key.indexOf('tus::') === 0 && storedUploadUrl(key) === url) localStorage.removeItem(key)
      }
    } catch (e) {
      // No storage in this browser (private mode, blocked): then nothing was kept either.
    }
    var current = uppy.getFile(file.id)
    if (current && current.tus && current.tus.uploadUrl) {
      uppy.setFileState(file.id, { tus: Object.assign({}, current.tus, { uploadUrl: null }) })
    }
  }

  function storedUploadUrl (key) {
    try {
      return (JSON.parse(localStorage.getItem(key)) || {}).uploadUrl
    } catch (e) {
      return null
    }
  }

  /* What became of upload `uid`, from its live status: {over: true, text, again, gone} when it
     ended (`again`: Retry can start it afresh; `gone`: its bytes are not in the portal),
     {over: false} while it is still receiving (`signedOut`: the session ended, so the portal
     would not say), or null when the portal cannot tell. Only an ended upload is forgotten. */
  function whatBecameOf (uid) {
    if (!uid) return Promise.resolve(null)
    return fetch(root.dataset.statusUrl.replace(ZERO_UUID, uid), {
      credentials: 'same-origin',
      redirect: 'manual', // to the sign-in page: the session ended, which says nothing of the upload
      headers: { Accept: 'application/json' }
    }).then(function (res) {
      if (res.type === 'opaqueredirect') return { over: false, signedOut: true }
      if (res.status === 404) return { over: true, gone: true, text: words.removed, again: true }
      if (!res.ok) return null
      return res.json().then(function (upload) {
        if (upload.status === 'receiving' || upload.status === 'sending_early') return { over: false }
        if (upload.status === 'cancelled') return { over: true, gone: true, text: words.cancelled, again: true }
        if (upload.status === 'failed') {
          return { over: true, text: (words.failed + ' ' + (upload.error_message || '')).trim(), again: true }
        }
        return { over: true, text: words.elsewhere, again: false }
      })
    }).catch(function () {
      return null
    })
  }

  function stopFile (file, text) {
    if (!uppy.getFile(file.id)) return
    uppy.setFileState(file.id, { error: text })
    showProblem(file.id, text, file.name) // in a role=alert region: read out when it appears
  }

  /* The portal refused to go on with this file's upload. Ask what became of it: if it ended,
     forget it and say why; else (still receiving, or no answer) report the refusal as any other
     error, keeping the upload for Retry to continue. */
  function endedUpload (file, refusal, otherwise) {
    uppy.setFileState(file.id, { error: words.checking })
    whatBecameOf(uidOf(refusal.url)).then(function (fate) {
      if (fate && fate.signedOut) {
        stopFile(file, SIGNED_OUT)
        return
      }
      if (!fate || !fate.over) {
        otherwise()
        return
      }
      forgetUpload(file, refusal.url)
      stopFile(file, fate.again ? fate.text + ' ' + words.start_again : fate.text)
    })
  }

  // ---- Uppy ------------------------------------------------------------------------------

  var uppy = new Uppy({
    // A stable id keeps Uppy's file ids, and so tus's resume fingerprints, the same across visits.
    id: root.dataset.uppyId || 'ims-upload',
    autoProceed: false,
    // Browsers guess odd types for disk images (".vhd" as VHDL source code); call them all bytes.
    onBeforeFileAdded: function (file) {
      file.type = 'application/octet-stream'
      file.meta.type = file.type
      return file
    },
    restrictions: {
      maxFileSize: maxBytes,
      minFileSize: 1,
      allowedFileTypes: extensions
    },
    // Uppy's own words in the page's language (its German pack, @uppy/locales, loaded before this
    // file when the page is German), with the portal's words on top.
    locale: uppyLocale({
      youCanOnlyUploadFileTypes: gettext('This is not a disk image file the portal knows. Choose a file ending in %{types}.'),
      exceedsSize: words.too_large_file,
      inferiorSize: words.empty_file,
      noDuplicates: gettext('“%{fileName}” is already in the list.'),
      failedToUpload: gettext('“%{file}” could not be uploaded'),
      dashboardTitle: gettext('Disk image uploader'),
      dropPasteFiles: gettext('Drop disk images here or %{browseFiles}'),
      browseFiles: gettext('choose files'),
      editFile: gettext('Edit image details'),
      editFileWithFilename: gettext('Edit image details of %{file}'),
      editing: gettext('Image details of %{file}'),
      saveChanges: gettext('Save details'),
      finishEditingFile: gettext('Back to the file list'),
      uploadComplete: gettext('In the portal'),
      complete: gettext('In the portal'),
      uploadFailed: gettext('Upload stopped'),
      // Uppy picks one of the two by its own plural rule (the locale's pluralize).
      xFilesSelected: { 0: gettext('%{smart_count} file ready to upload'), 1: gettext('%{smart_count} files ready to upload') },
      uploadXFiles: { 0: gettext('Upload %{smart_count} file'), 1: gettext('Upload %{smart_count} files') },
      uploadXNewFiles: { 0: gettext('Upload +%{smart_count} file'), 1: gettext('Upload +%{smart_count} files') }
    })
  })

  uppy.use(Dashboard, {
    inline: true,
    target: '#uppy-dashboard',
    width: '100%',
    height: 520,
    theme: 'light',
    // Problems are written out below the Dashboard instead, where they stay until dealt with.
    disableInformer: true,
    proudlyDisplayPoweredByUppy: false,
    disableThumbnailGenerator: true,
    fileManagerSelectionType: 'files',
    singleFileFullScreen: false,
    autoOpen: 'metaEditor',
    note: words.size_note,
    metaFields: metaFields
  })

  // Uppy names its inline Dashboard ("Disk image uploader") but gives it no role, so the name
  // is not said (axe: aria-prohibited-attr). As a region it is a landmark one can jump to.
  var dashboardRoot = root.querySelector('.uppy-Dashboard')
  if (dashboardRoot && !dashboardRoot.getAttribute('role')) dashboardRoot.setAttribute('role', 'region')

  uppy.use(Tus, {
    endpoint: root.dataset.endpoint,
    chunkSize: 50 * MiB,
    retryDelays: [0, 1000, 3000, 5000, 10000, 20000, 30000, 60000],
    limit: 3,
    // Resume: tus-js-client remembers each file's upload URL in localStorage, so the same file
    // chosen again (even after closing the tab) continues from the server's offset.
    storeFingerprintForResuming: true,
    removeFingerprintOnSuccess: true,
    allowedMetaFields: SENT_META,
    headers: function () { return { 'X-CSRFToken': csrfToken() } },
    onAfterResponse: refuseToStartAgain,
    // Tus decides whether to try again (network trouble, 5xx, 409, 423); we only say so. A
    // refused HEAD is final unless the portal was only busy or down for a moment.
    onShouldRetry: function (error, attempt, options, next) {
      if (noRoomForNewUpload(error)) return false
      var refusal = refusedHead(error)
      if (refusal && !passing(refusal.status)) return false
      var again = next(error)
      if (again) retryingNote.hidden = false
      return again
    }
  })

  uppy.on('file-added', function (file) {
    uppy.setFileMeta(file.id, {
      filename: file.name,
      filetype: file.type,
      image_name: imageNameFor(file.name),
      disk_format: extensionFormats[extensionOf(file.name)] || '',
      os_version: '',
      min_disk: '',
      min_ram: '',
      tags: ''
    })
  })

  uppy.on('restriction-failed', function (file, error) {
    var name = file && file.name
    showProblem('refused:' + (name || error.message), error.message, name)
  })

  uppy.on('upload', function (uploadID, files) {
    clearRestrictionProblems()
    var count = (files || []).length
    if (count) {
      files.forEach(function (file) { quarterSaid.delete(file.id) })
      announce(interpolate(ngettext('Sending %(count)s file to the portal.', 'Sending %(count)s files to the portal.', count),
        { count: count }, true))
    }
  })
  uppy.on('upload-progress', announceProgress)

  // True when the server refused the details of a file (400 to the creation request, before any
  // byte was sent): then the details can still be changed and the upload tried again.
  function detailsRefused (error) {
    var req = error && error.originalRequest
    var res = error && error.originalResponse
    return !!(req && res && req.getMethod && req.getMethod() === 'POST' && res.getStatus() === 400)
  }

  // True when the server has no room for a new file just now (507 to the creation request): its
  // message says to try later, and asking again within the minute would only repeat it.
  function noRoomForNewUpload (error) {
    var req = error && error.originalRequest
    var res = error && error.originalResponse
    return !!(req && res && req.getMethod && req.getMethod() === 'POST' && res.getStatus() === 507)
  }

  uppy.on('upload-error', function (file, error, response) {
    if (!file || !uppy.getFile(file.id)) return
    var refusal = refusedContinuation(error)
    if (uploadIsOver(refusal)) {
      endedUpload(file, refusal, function () { showUploadError(file, error, response) })
    } else {
      showUploadError(file, error, response)
    }
  })

  function showUploadError (file, error, response) {
    if (!uppy.getFile(file.id)) return
    var reason = reasonFor(error, response)
    var state = { error: reason } // instead of tus's technical message
    if (detailsRefused(error)) {
      reason += ' Use Edit in the list of files to change its details, then press Retry.'
      state.error = reason
      // Uppy offers the pencil only for files that never started; this one never did.
      state.progress = { percentage: 0, bytesUploaded: false, bytesTotal: file.size, uploadComplete: false, uploadStarted: null }
    }
    uppy.setFileState(file.id, state)
    showProblem(file.id, reason, file.name)
  }

  function hideRetrying () { retryingNote.hidden = true }
  uppy.on('upload-progress', hideRetrying)
  uppy.on('upload-error', hideRetrying)
  uppy.on('complete', hideRetrying)
  uppy.on('cancel-all', hideRetrying)

  uppy.on('upload-retry', function (file) { if (file) clearProblem(file.id) })
  uppy.on('retry-all', function (files) { files.forEach(function (file) { clearProblem(file.id) }) })
  uppy.on('file-removed', function (file) { clearProblem(file.id) })

  /* The last bytes can arrive just after the upload was cancelled on My uploads (the PATCH had
     started before): then the tus reply is a success, but the file is not in the portal. */
  uppy.on('upload-success', function (file, response) {
    if (!file) return
    clearProblem(file.id)
    var uid = uidOf(response && response.uploadURL)
    whatBecameOf(uid).then(function (fate) {
      if (fate && fate.gone) {
        stopFile(file, fate.text + ' ' + words.add_again)
      } else {
        showDone(file, uid)
      }
    })
  })

  // ---- the second hop: sent on to IMS while the file still arrives ----------------------

  /* A QCOW2, RAW or VHD file may be sent on to IMS while the browser still sends it (the status
     JSON's `both_hops`): each such file gets a line with a bar of its own, from the status JSON,
     followed until nothing moves any more (ready, or waiting for a person). */
  var hopBox = document.getElementById('ims-hop')
  var hopList = hopBox.querySelector('ul')
  var hops = new Map() // upload uid -> { bar, text }
  var HOP_POLL_MS = 2000

  function showHop (file, uid, s) {
    var hop = hops.get(uid)
    if (!hop) {
      if (!s.both_hops) return
      var item = document.createElement('li')
      item.appendChild(document.createTextNode((file.meta.image_name || file.name) + ' '))
      hop = { bar: document.createElement('progress'), text: document.createElement('span') }
      hop.bar.max = 100
      hop.bar.className = 'bar__progress'
      hop.bar.setAttribute('aria-label', file.meta.image_name || file.name)
      item.appendChild(hop.bar)
      item.appendChild(document.createTextNode(' '))
      item.appendChild(hop.text)
      hopList.appendChild(item)
      hops.set(uid, hop)
      hopBox.hidden = false
    }
    hop.bar.value = s.send_percent || 0
    hop.text.textContent = s.both_hops ? words.sent_to_ims.replace('{percent}', s.send_percent || 0) : s.status_label
    hop.done = !!s.finished // ready, or waiting for a person: nothing moves any more
  }

  function pollHops () {
    uppy.getFiles().forEach(function (file) {
      var uid = uidOf(file.tus && file.tus.uploadUrl)
      var hop = hops.get(uid)
      if (!uid || (hop && hop.done)) return
      if (!hop && (!file.progress.uploadStarted || file.progress.uploadComplete || file.error)) return
      fetch(root.dataset.statusUrl.replace(ZERO_UUID, uid), {
        credentials: 'same-origin', redirect: 'manual', headers: { Accept: 'application/json' }
      }).then(function (res) {
        return res.ok ? res.json() : null
      }).then(function (s) {
        if (s) showHop(file, uid, s)
      }).catch(function () {}) // the next round asks again
    })
  }
  window.setInterval(pollHops, HOP_POLL_MS)

  // ---- every file's details, in a list of their own -------------------------------------

  /* The Dashboard shows a file's details only in its editor, which opens by itself for the
     first file of a batch: the others went with their defaults unseen. This list shows the
     details of every file not yet sent, each with its own Edit; "Same for every file" sets the
     OS version, min RAM and tags of all of them at once. */
  var detailsBox = document.getElementById('file-details')
  var detailRows = detailsBox.querySelector('tbody')
  var applyForm = document.getElementById('apply-all')
  var applyStatus = document.getElementById('apply-all-status')
  var rows = new Map() // file id -> <tr>
  var APPLY_FIELDS = [
    { id: 'os_version', label: gettext('OS version') },
    { id: 'min_ram', label: gettext('Min RAM') },
    { id: 'tags', label: gettext('Tags') }
  ]

  function formatLabel (value) {
    var choice = diskFormats.filter(function (c) { return c[0] === value })[0]
    return choice ? choice[1] : ''
  }

  function notYetSent (file) {
    return !file.progress.uploadStarted
  }

  function cell (tr, text, emptyText) {
    var td = document.createElement('td')
    setCell(td, text, emptyText)
    tr.appendChild(td)
  }

  function setCell (td, text, emptyText) {
    td.textContent = text || emptyText || '—'
    td.classList.toggle('muted', !text)
  }

  function newRow (file) {
    var tr = document.createElement('tr')
    var head = document.createElement('th')
    head.scope = 'row'
    var name = document.createElement('span')
    name.className = 'file-table__name'
    var fileName = document.createElement('span')
    fileName.className = 'file-table__filename'
    fileName.textContent = file.name
    head.appendChild(name)
    head.appendChild(fileName)
    tr.appendChild(head)
    for (var i = 0; i < 5; i++) cell(tr, '')
    var actions = document.createElement('td')
    var edit = document.createElement('button')
    edit.type = 'button'
    edit.className = 'button button--small button--quiet'
    edit.appendChild(document.createTextNode(gettext('Edit')))
    // The whole name as one sentence, so that each language may order it its own way.
    edit.setAttribute('aria-label', interpolate(gettext('Edit the details of %(file)s'), { file: file.name }, true))
    edit.addEventListener('click', function () { openEditor(file.id, edit) })
    actions.appendChild(edit)
    tr.appendChild(actions)
    return tr
  }

  function fillRow (tr, file) {
    var meta = file.meta
    var cells = tr.children
    setCell(cells[0].firstChild, meta.image_name, gettext('No name'))
    setCell(cells[1], formatLabel(meta.disk_format), gettext('Not chosen'))
    setCell(cells[2], meta.os_version, gettext('Not set'))
    setCell(cells[3], String(meta.min_disk || ''), gettext('Not set'))
    setCell(cells[4], String(meta.min_ram || ''), gettext('Not set'))
    setCell(cells[5], meta.tags, gettext('None'))
  }

  function showDetailsList () {
    var waiting = uppy.getFiles().filter(notYetSent)
    var ids = new Set(waiting.map(function (file) { return file.id }))
    rows.forEach(function (tr, id) {
      if (!ids.has(id)) {
        tr.remove()
        rows.delete(id)
      }
    })
    waiting.forEach(function (file, index) {
      var tr = rows.get(file.id)
      if (!tr) {
        tr = newRow(file)
        rows.set(file.id, tr)
      }
      fillRow(tr, file)
      // The Dashboard's order; a row already in place is not moved, which would lose its focus.
      var here = detailRows.children[index]
      if (here !== tr) detailRows.insertBefore(tr, here || null)
    })
    detailsBox.hidden = waiting.length === 0
  }

  var editedFrom = null // the Edit button that opened the editor, to go back to

  function openEditor (fileId, button) {
    editedFrom = button
    uppy.getPlugin('Dashboard').toggleFileCard(true, fileId)
    var still = window.matchMedia && window.matchMedia('(prefers-reduced-motion: reduce)').matches
    root.scrollIntoView({ block: 'start', behavior: still ? 'auto' : 'smooth' })
  }

  uppy.on('dashboard:file-edit-complete', function () {
    var button = editedFrom
    editedFrom = null
    // After the Dashboard has drawn the file list again (it moves the focus there).
    if (button) setTimeout(function () { if (button.isConnected) button.focus() }, 0)
  })

  // The values to apply, or a sentence saying what is wrong with them (that field is marked).
  function valuesToApply () {
    var values = {}
    var problem = ''
    APPLY_FIELDS.forEach(function (field) {
      var input = applyForm.elements[field.id]
      var value = input.value.trim()
      input.setAttribute('aria-invalid', String(!input.validity.valid))
      if (!input.validity.valid) {
        if (!problem) input.focus()
        problem = problem || (field.label + ': ' + input.validationMessage)
      } else if (value) {
        values[field.id] = value
      }
    })
    return problem || values
  }

  applyForm.addEventListener('submit', function (event) {
    event.preventDefault()
    var values = valuesToApply()
    var waiting = uppy.getFiles().filter(notYetSent)
    if (typeof values === 'string') {
      applyStatus.textContent = values
      return
    }
    var names = APPLY_FIELDS.filter(function (field) { return field.id in values })
      .map(function (field) { return field.label })
    if (names.length === 0) {
      applyStatus.textContent = words.nothing_to_apply
      return
    }
    if (waiting.length === 0) {
      applyStatus.textContent = words.no_files
      return
    }
    waiting.forEach(function (file) { uppy.setFileMeta(file.id, values) })
    applyStatus.textContent = words.applied.replace('{fields}', names.join(', ')).replace('{count}', waiting.length)
  })

  uppy.on('state-update', showDetailsList)
  uppy.on('files-added', function () { applyStatus.textContent = '' }) // it spoke of the files before

  // Closing the page stops bytes in flight; warn while a file is still on its way to the portal.
  window.addEventListener('beforeunload', function (event) {
    var sending = uppy.getFiles().some(function (file) {
      return file.progress.uploadStarted && !file.progress.uploadComplete && !file.error && !file.isPaused
    })
    if (sending) {
      event.preventDefault()
      event.returnValue = ''
    }
  })
})()
