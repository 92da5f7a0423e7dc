/* The upload page: Uppy's Dashboard sends disk images to the portal's tus server.
 *
 * Uppy comes as the browser bundle of the `uppy` npm package (window.Uppy, loaded before this
 * file). The page passes everything else in: data- attributes on #uploader and two json_script
 * blocks (disk formats, file endings). No inline script, so a strict CSP can forbid them.
 *
 * What the tus server reads from Upload-Metadata: filename, image_name, disk_format, os_version,
 * min_disk, min_ram, tags. Only those (plus filetype) are sent; Uppy's own meta stays home.
 */
(function () {
  'use strict'

  var root = document.getElementById('uploader')
  if (!root) return

  var problemsBox = document.getElementById('upload-problems')
  var problemList = problemsBox.querySelector('.problem-list')
  var doneBox = document.getElementById('upload-done')
  var doneList = doneBox.querySelector('.done-list')
  var retryingNote = document.getElementById('upload-retrying')
  var problems = new Map() // key -> <li>

  if (!window.Uppy || !window.Uppy.Uppy) {
    showProblem('page', 'The upload tool could not be loaded. Reload the page; if that does not help, tell your portal administrator.')
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
  var maxBytes = Number(root.dataset.maxBytes)

  // ---- small helpers ---------------------------------------------------------------------

  function readJson (id) {
    return JSON.parse(document.getElementById(id).textContent)
  }

  function extensionOf (name) {
    var dot = name.lastIndexOf('.')
    return dot > 0 ? name.slice(dot).toLowerCase() : ''
  }

  function imageNameFor (fileName) {
    var dot = fileName.lastIndexOf('.')
    return (dot > 0 ? fileName.slice(0, dot) : fileName).slice(0, 255) || 'image'
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

  function showDone (file, uploadURL) {
    var item = document.createElement('li')
    var uid = (String(uploadURL || '').match(UUID_RE) || [])[0]
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
  }

  /* The tus server refuses with a plain-text reason written for people ("Tag “x” is not valid…",
     "Connect your cloud account first…"): show it as it is. Anything else gets plain words. */
  function reasonFor (error, response) {
    var res = error && error.originalResponse
    var status = res && res.getStatus ? res.getStatus() : (response && response.status)
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
      return 'The connection to the portal was lost. Check your network, then press Retry: the upload continues where it stopped.'
    }
    if (status === 403) {
      return 'The portal refused the file because your sign-in has ended. Reload this page (sign in again if asked) and add the file again; it continues where it stopped.'
    }
    if (status === 413) return 'The file is 128 GB or larger; IMS takes only smaller images.'
    return 'The portal could not take this file just now (error ' + status + '). Press Retry; if it keeps happening, tell your portal administrator.'
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
    return withHelp(h, 'disk_format', select, 'Chosen from the file name. Change it only if you know the file is in another format.')
  }

  var metaFields = [
    {
      id: 'image_name',
      name: 'Image name',
      render: textField('image_name', { maxLength: 255, required: true, placeholder: 'e.g. ubuntu-24.04-web' },
        'How the image is called in IMS.')
    },
    {
      id: 'os_version',
      name: 'OS version',
      render: textField('os_version', { list: 'os-version-options', maxLength: 255, placeholder: 'e.g. Ubuntu 24.04 server 64bit', autocomplete: 'off' },
        'The operating system inside the image. Pick from the list or type your own.')
    },
    { id: 'disk_format', name: 'Disk format', render: diskFormatField },
    {
      id: 'min_disk',
      name: 'Min disk (GB)',
      render: textField('min_disk', { type: 'number', min: 0, max: 1024, step: 1, inputMode: 'numeric', placeholder: 'e.g. 40' },
        'Smallest system disk for servers made from this image. Leave empty if unsure.')
    },
    {
      id: 'min_ram',
      name: 'Min RAM (MB)',
      render: textField('min_ram', { type: 'number', min: 0, max: 2097152, step: 1, inputMode: 'numeric', placeholder: 'e.g. 2048' },
        'Smallest memory for servers made from this image. Leave empty if unsure.')
    },
    {
      id: 'tags',
      name: 'Tags',
      render: textField('tags', { maxLength: 2000, placeholder: 'e.g. team=web, env=test' },
        'Optional labels as key=value, separated by commas.')
    }
  ]

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
    locale: {
      strings: {
        youCanOnlyUploadFileTypes: 'This is not a disk image file the portal knows. Choose a file ending in %{types}.',
        exceedsSize: '“%{file}” is 128 GB or larger; IMS takes only smaller images.',
        inferiorSize: 'This file is empty: choose the disk image file itself.',
        noDuplicates: '“%{fileName}” is already in the list.',
        failedToUpload: '“%{file}” could not be uploaded',
        dashboardTitle: 'Disk image uploader',
        dropPasteFiles: 'Drop disk images here or %{browseFiles}',
        browseFiles: 'choose files',
        editFile: 'Edit image details',
        editFileWithFilename: 'Edit image details of %{file}',
        editing: 'Image details of %{file}',
        saveChanges: 'Save details',
        finishEditingFile: 'Back to the file list',
        uploadComplete: 'In the portal',
        complete: 'In the portal',
        uploadFailed: 'Upload stopped',
        xFilesSelected: { 0: '%{smart_count} file ready to upload', 1: '%{smart_count} files ready to upload' },
        uploadXFiles: { 0: 'Upload %{smart_count} file', 1: 'Upload %{smart_count} files' },
        uploadXNewFiles: { 0: 'Upload +%{smart_count} file', 1: 'Upload +%{smart_count} files' }
      }
    }
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
    note: 'Disk images smaller than 128 GB each. Use the pencil on a file to set its name, OS and format.',
    metaFields: metaFields
  })

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
    // Tus decides whether to try again (network trouble, 5xx, 409, 423); we only say so.
    onShouldRetry: function (error, attempt, options, next) {
      if (noRoomForNewUpload(error)) return false
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

  uppy.on('upload', function () {
    clearRestrictionProblems()
  })

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
    var reason = reasonFor(error, response)
    var state = { error: reason } // instead of tus's technical message
    if (detailsRefused(error)) {
      reason += ' Use the pencil on the file to change its details, then press Retry.'
      state.error = reason
      // Uppy offers the pencil only for files that never started; this one never did.
      state.progress = { percentage: 0, bytesUploaded: false, bytesTotal: file.size, uploadComplete: false, uploadStarted: null }
    }
    uppy.setFileState(file.id, state)
    showProblem(file.id, reason, file.name)
  })

  function hideRetrying () { retryingNote.hidden = true }
  uppy.on('upload-progress', hideRetrying)
  uppy.on('upload-error', hideRetrying)
  uppy.on('complete', hideRetrying)
  uppy.on('cancel-all', hideRetrying)

  uppy.on('upload-retry', function (file) { if (file) clearProblem(file.id) })
  uppy.on('retry-all', function (files) { files.forEach(function (file) { clearProblem(file.id) }) })
  uppy.on('file-removed', function (file) { clearProblem(file.id) })

  uppy.on('upload-success', function (file, response) {
    if (!file) return
    clearProblem(file.id)
    showDone(file, response && response.uploadURL)
  })

  uppy.on('complete', function (result) {
    if (!result.successful || result.successful.length === 0) return
    var firstTime = doneBox.hidden
    doneBox.hidden = false
    if (firstTime) doneBox.querySelector('.alert__title').focus({ preventScroll: true })
  })

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
