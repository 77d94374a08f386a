// Sensor hub live dashboard.
//
// Plain script, no build step; it needs only vendor/autobahn.min.js (autobahn-browser 22.11.1). It logs in as
// "dashboard" with the ticket from the URL fragment, subscribes to every reading (prefix iot.sensor.), back-fills
// the last minutes from the query service and draws one chart per sensor type by hand on a <canvas>.
// window.sensorHub is a read-only view of the page's data for tests and for poking around in the console.
(() => {
  'use strict';

  const AUTHID = 'dashboard';
  const DEFAULT_REALM = 'iot';
  const TOPIC_PREFIX = 'iot.sensor.';
  const ID_RE = /^[0-9a-z_]{1,64}$/;           // the wire contract's device_id and sensor_type
  const TOO_MANY = 'iot.error.too_many_results';
  const WINDOW_S = 300;                         // the charts show (and the back-fill asks for) the last 5 minutes
  const BACKFILL_LIMIT = 5000;                  // one answer stays small whatever the number of devices
  const BACKFILL_RETRIES = 20;                  // while no query service is registered: every 3 s for a minute
  const BACKFILL_RETRY_MS = 3000;
  const MAX_POINTS = 1000;                      // per series: 5 minutes at 3 readings/s, or the newest 1000
  const DRAW_INTERVAL_MS = 250;                 // at most 4 redraws a second, however fast readings come
  const RATE_WINDOW_S = 5;                      // readings/s is averaged over the last 5 whole seconds
  const GAP_S = 15;                             // a longer silence breaks the line, so outages show
  const STALE_S = 60;                           // a device silent for longer is greyed out in the table
  const AUTOBAHN_RETRY = {                      // reconnect for as long as the page is open, at most 5 s apart
    max_retries: -1, initial_retry_delay: 0.5, max_retry_delay: 5, retry_delay_growth: 1.5, retry_delay_jitter: 0.1,
  };
  const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf',
    '#7f7f7f', '#bcbd22'];

  const $ = (id) => document.getElementById(id);

  // ---- the data: bounded whatever the rate, kept for every device so a filter change shows history at once

  const devices = new Map();   // device_id -> {id, types: Set, last: Map(sensor_type -> {value, ts}), lastSeen}
  const series = new Map();    // "device_id/sensor_type" -> {device, sensor, points: [[ts, value], ...] by ts}
  const sensorTypes = new Set();
  const colors = new Map();    // device_id -> colour, in order of first sight so it is the same on every chart
  const status = {state: 'connecting', message: '', history: '', received: 0, skipped: 0, backfills: 0, draws: 0};
  let filters = {device: '', sensor: ''};

  function device(id) {
    let d = devices.get(id);
    if (!d) {
      d = {id, types: new Set(), last: new Map(), lastSeen: null};
      devices.set(id, d);
      colors.set(id, PALETTE[colors.size % PALETTE.length]);
    }
    return d;
  }

  function isReading(r, deviceId, sensorType) {
    return r !== null && typeof r === 'object' && !Array.isArray(r) &&
      typeof r.value === 'number' && Number.isFinite(r.value) &&
      typeof r.ts === 'number' && Number.isFinite(r.ts) &&
      (r.device_id === undefined || r.device_id === deviceId) &&
      (r.sensor_type === undefined || r.sensor_type === sensorType);
  }

  // Insert in ts order; a reading seen both live and in the back-fill is kept once.
  function insertPoint(points, ts, value) {
    const n = points.length;
    if (n === 0 || ts > points[n - 1][0]) {
      points.push([ts, value]);                 // the usual case: readings come in order
    } else {
      let lo = 0;
      let hi = n;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (points[mid][0] < ts) lo = mid + 1; else hi = mid;
      }
      if (points[lo][0] === ts) return false;
      points.splice(lo, 0, [ts, value]);
    }
    // Trim in chunks: dropping one point per reading would shift the whole array every time.
    if (points.length > MAX_POINTS * 1.25) points.splice(0, points.length - MAX_POINTS);
    return true;
  }

  // Add one reading; false (and counted as skipped) when it is not a valid reading.
  function addReading(deviceId, sensorType, r) {
    if (!ID_RE.test(deviceId) || !ID_RE.test(sensorType) || !isReading(r, deviceId, sensorType)) {
      status.skipped += 1;
      return false;
    }
    const key = deviceId + '/' + sensorType;
    let s = series.get(key);
    if (!s) {
      s = {device: deviceId, sensor: sensorType, points: []};
      series.set(key, s);
      sensorTypes.add(sensorType);
    }
    insertPoint(s.points, r.ts, r.value);
    const d = device(deviceId);
    d.types.add(sensorType);
    const last = d.last.get(sensorType);
    if (!last || r.ts >= last.ts) d.last.set(sensorType, {value: r.value, ts: r.ts});
    if (d.lastSeen === null || r.ts > d.lastSeen) d.lastSeen = r.ts;
    return true;
  }

  // ---- readings per second: counts per whole second of a monotonic clock, in a small ring

  // start: the second of the first live reading, a partial second, so it is never part of the average
  const rate = {start: null, second: 0, slots: new Array(RATE_WINDOW_S + 1).fill(0)};

  const slot = (second) => ((second % rate.slots.length) + rate.slots.length) % rate.slots.length;

  function rateTick() {
    const now = Math.floor(performance.now() / 1000);
    if (now - rate.second >= rate.slots.length) rate.slots.fill(0);
    else for (let s = rate.second + 1; s <= now; s++) rate.slots[slot(s)] = 0;
    rate.second = now;
  }

  function countReadings(k) {
    rateTick();
    if (rate.start === null) rate.start = rate.second;
    rate.slots[slot(rate.second)] += k;
  }

  function readingsPerSecond() {
    rateTick();
    // Fewer whole seconds than the window right after load: average over those, not over empty ones.
    const span = rate.start === null ? 0 : Math.min(RATE_WINDOW_S, rate.second - rate.start - 1);
    let sum = 0;
    for (let s = rate.second - span; s < rate.second; s++) sum += rate.slots[slot(s)];
    return span > 0 ? sum / span : 0;
  }

  // ---- live events: whatever arrives, count what is not a reading and carry on

  function onEvent(args, kwargs, details) {
    try {
      const payload = args ? args[0] : undefined;
      const items = Array.isArray(payload) ? payload : [payload];
      const topic = String(details && details.topic);
      const parts = topic.slice(TOPIC_PREFIX.length).split('.');
      if (!topic.startsWith(TOPIC_PREFIX) || parts.length !== 2) {
        status.skipped += items.length;
        return;
      }
      let accepted = 0;
      for (const r of items) if (addReading(parts[0], parts[1], r)) accepted += 1;
      status.received += accepted;
      countReadings(accepted);
      requestDraw();
    } catch (err) {
      // An exception here would only be logged by autobahn; count it so it is visible, keep the subscription.
      status.skipped += 1;
      console.warn('sensor hub: event not handled', err);
    }
  }

  // ---- back-fill on every (re)connect: what was stored while the page was closed or the connection down

  function errorText(err) {
    if (err && err.error) return err.error + (err.args && err.args.length ? ': ' + err.args[0] : '');
    return String(err);
  }

  // The last WINDOW_S seconds, at most BACKFILL_LIMIT readings. When the window holds more, fetch_last_n_sec
  // with limit= answers its *oldest* readings, and a live chart wants the newest: fetch_last_window gives those.
  // A query service whose query.max_results is below our limit refuses with too_many_results: ask for fewer.
  async function fetchRecent(session) {
    let limit = BACKFILL_LIMIT;
    try {
      const rows = await session.call('iot.fetch_last_n_sec', [WINDOW_S], {limit});
      if (rows.length < limit) return {rows, note: rows.length + ' readings of the last ' + WINDOW_S + ' s'};
    } catch (err) {
      if (err.error !== TOO_MANY) throw err;
    }
    for (;;) {
      try {
        const rows = await session.call('iot.fetch_last_window', [limit]);
        return {rows, note: 'the newest ' + rows.length + ' readings'};
      } catch (err) {
        if (err.error !== TOO_MANY || limit <= 1) throw err;
        limit = Math.floor(limit / 2);
      }
    }
  }

  async function backfill(session, attempt = 0) {
    const notes = [];
    let missing = false;
    const failed = (what, err) => {
      missing = missing || (err && err.error) === 'wamp.error.no_such_procedure';
      notes.push(what + ' unavailable (' + errorText(err) + ')');
    };
    try {
      for (const row of await session.call('iot.list_devices')) {
        if (!row || typeof row.device_id !== 'string' || !ID_RE.test(row.device_id)) continue;
        const d = device(row.device_id);
        for (const t of row.sensor_types || []) {
          if (ID_RE.test(t)) { d.types.add(t); sensorTypes.add(t); }
        }
        if (Number.isFinite(row.last_ts) && (d.lastSeen === null || row.last_ts > d.lastSeen)) d.lastSeen = row.last_ts;
      }
    } catch (err) {
      failed('device list', err);
    }
    try {
      const {rows, note} = await fetchRecent(session);
      for (const r of rows) addReading(String(r && r.device_id), String(r && r.sensor_type), r);
      notes.unshift('history: ' + note);
    } catch (err) {
      failed('history', err);
    }
    status.history = notes.join('; ');
    status.backfills += 1;
    requestDraw();
    // After a router restart the page is often back before the query service has registered again.
    if (missing && attempt < BACKFILL_RETRIES) {
      setTimeout(() => { if (session.isOpen) backfill(session, attempt + 1); }, BACKFILL_RETRY_MS);
    }
  }

  // ---- the connection

  let connection = null;
  let ticket = '';
  let lastLogin = '';                           // ticket, user and realm of the current login

  function setState(state, message) {
    status.state = state;
    status.message = message || '';
    requestDraw();
  }

  function wsUrl() {
    return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
  }

  function connect() {
    const params = hashParams();
    ticket = params.get('ticket') || '';
    lastLogin = [params.get('ticket'), params.get('user'), params.get('realm')].join(' ');
    const old = connection;
    connection = null;                          // its onclose must not act any more
    if (old) {
      try { old.close(); } catch (err) { /* already closed */ }
    }
    if (!ticket) {
      showTicketForm('This page needs a ticket to log in.');
      setState('no ticket', 'enter the dashboard ticket');
      return;
    }
    $('ticket-form').hidden = true;
    setState('connecting');
    const conn = new autobahn.Connection(Object.assign({
      url: wsUrl(),
      realm: params.get('realm') || DEFAULT_REALM,
      authmethods: ['ticket'],
      authid: params.get('user') || AUTHID,       // another reader principal may use the page too
      onchallenge: (session, method) => {
        if (method !== 'ticket') throw new Error('the router asked for ' + method + ', this page only has a ticket');
        return ticket;
      },
      // msgpack first: JSON cannot carry the NaN a broken device may send, and the browser's JSON.parse would
      // then fail on the whole message and drop the connection instead of skipping one reading.
      serializers: [new autobahn.serializer.MsgpackSerializer(), new autobahn.serializer.JSONSerializer()],
      use_es6_promises: true,
    }, AUTOBAHN_RETRY));

    conn.onopen = (session) => {
      if (conn !== connection) return;
      session.subscribe(TOPIC_PREFIX, onEvent, {match: 'prefix'}).then(() => {
        setState('connected');
        return backfill(session);
      }, (err) => {
        setState('failed', 'cannot subscribe to ' + TOPIC_PREFIX + ' (' + errorText(err) + ')');
      });
    };

    conn.onclose = (reason, details) => {
      if (conn !== connection) return true;
      const why = details && details.reason;
      if (why && why.startsWith('wamp.error.')) {
        // The router refused the session: retrying with the same ticket cannot help.
        const text = details.message || why;
        showTicketForm('The router refused the login: ' + text);
        setState('auth failed', text + ' (' + why + ')');
        return true;
      }
      if (details && details.will_retry) {
        setState('reconnecting', 'connection ' + reason + '; next try in ' + details.retry_delay.toFixed(1) + ' s');
      } else {
        // The router said goodbye (a clean shutdown): autobahn does not retry after that, so try again ourselves.
        setState('reconnecting', 'the router closed the session' + (why ? ' (' + why + ')' : '') + '; trying again');
        setTimeout(() => { if (conn === connection) conn.open(); }, 1000);
      }
      return false;
    };

    connection = conn;
    conn.open();
  }

  function showTicketForm(reason) {
    $('ticket-reason').textContent = reason;
    $('ticket-form').hidden = false;
  }

  // ---- the URL fragment: ticket, filters (and any other parameter, left as it is)

  function hashParams() {
    return new URLSearchParams(location.hash.slice(1));
  }

  function writeHash(params) {
    // replaceState: no history entry per filter click, and no hashchange event back to us
    history.replaceState(null, '', '#' + params.toString());
    updateShareLink();
  }

  function readFilters() {
    const params = hashParams();
    filters = {device: params.get('device') || '', sensor: params.get('sensor') || ''};
    updateShareLink();
  }

  function setFilter(name, value) {
    filters[name] = value;
    const params = hashParams();
    if (value) params.set(name, value); else params.delete(name);
    writeHash(params);
    requestDraw();
  }

  function updateShareLink() {
    // A view is shared without the ticket: whoever opens it is asked for their own.
    const params = hashParams();
    params.delete('ticket');
    $('share-link').href = location.pathname + '#' + params.toString();
  }

  // ---- drawing: throttled, from the data above

  let drawPending = false;
  let lastDraw = 0;

  function requestDraw() {
    if (drawPending) return;
    drawPending = true;
    const wait = Math.max(0, lastDraw + DRAW_INTERVAL_MS - performance.now());
    setTimeout(() => requestAnimationFrame(draw), wait);
  }

  function visibleSeries() {
    return [...series.values()]
      .filter((s) => (!filters.device || s.device === filters.device) && (!filters.sensor || s.sensor === filters.sensor))
      .sort((a, b) => byId(a.sensor, b.sensor) || byId(a.device, b.device));
  }

  function visibleDevices() {
    return [...devices.values()]
      .filter((d) => (!filters.device || d.id === filters.device) &&
        (!filters.sensor || d.types.has(filters.sensor)))
      .sort((a, b) => byId(a.id, b.id));
  }

  function byId(a, b) {
    return a.localeCompare(b, 'en', {numeric: true});
  }

  function draw() {
    drawPending = false;
    lastDraw = performance.now();
    status.draws += 1;
    const nowS = Date.now() / 1000;
    drawHeader();
    drawFilterOptions();
    drawTable(nowS);
    drawCharts(nowS);
  }

  function drawHeader() {
    const el = $('state');
    el.textContent = status.state;
    el.className = 'state ' + status.state.replace(/ /g, '-');
    $('state-message').textContent = status.message;
    $('rate').textContent = readingsPerSecond().toFixed(1) + ' readings/s';
    $('skipped').textContent = status.skipped ? status.skipped + ' skipped' : '';
    $('history').textContent = status.history;
  }

  function fillSelect(select, values, selected) {
    // The filter from the URL stays selectable even before any reading of it arrived.
    const all = [...new Set([...values, ...(selected ? [selected] : [])])].sort(byId);
    const signature = all.join(',');
    if (select.dataset.options !== signature) {
      select.dataset.options = signature;
      select.length = 1;                        // keep the "all" option
      for (const v of all) select.add(new Option(v, v));
    }
    select.value = selected;
  }

  function drawFilterOptions() {
    fillSelect($('device-filter'), devices.keys(), filters.device);
    fillSelect($('sensor-filter'), sensorTypes, filters.sensor);
  }

  function ago(seconds) {
    if (seconds < 2) return 'just now';
    if (seconds < 120) return Math.round(seconds) + ' s ago';
    if (seconds < 7200) return Math.round(seconds / 60) + ' min ago';
    if (seconds < 172800) return Math.round(seconds / 3600) + ' h ago';
    return Math.round(seconds / 86400) + ' days ago';
  }

  function drawTable(nowS) {
    const body = document.createElement('tbody');
    for (const d of visibleDevices()) {
      const tr = body.insertRow();
      tr.dataset.device = d.id;
      if (d.lastSeen === null || nowS - d.lastSeen > STALE_S) tr.className = 'stale';
      const name = tr.insertCell();
      const swatch = name.appendChild(document.createElement('span'));
      swatch.className = 'swatch';
      swatch.style.background = colors.get(d.id);
      name.append(d.id);
      const values = tr.insertCell();
      for (const [type, last] of [...d.last].sort((a, b) => byId(a[0], b[0]))) {
        if (filters.sensor && type !== filters.sensor) continue;
        const item = values.appendChild(document.createElement('span'));
        item.className = 'value';
        item.dataset.sensor = type;
        item.textContent = type + ' ' + last.value.toFixed(2);
      }
      const seen = tr.insertCell();
      seen.textContent = d.lastSeen === null ? 'never' : ago(nowS - d.lastSeen);
      if (d.lastSeen !== null) seen.title = new Date(d.lastSeen * 1000).toLocaleString();
    }
    $('devices').tBodies[0].replaceWith(body);
  }

  function drawCharts(nowS) {
    const shown = visibleSeries();
    const bySensor = new Map();
    for (const s of shown) {
      if (!bySensor.has(s.sensor)) bySensor.set(s.sensor, []);
      bySensor.get(s.sensor).push(s);
    }
    const box = $('charts');
    $('no-data').hidden = bySensor.size > 0;
    for (const fig of [...box.querySelectorAll('figure')]) {
      if (!bySensor.has(fig.dataset.sensor)) fig.remove();
    }
    for (const [sensor, list] of bySensor) {
      let fig = box.querySelector('figure[data-sensor="' + sensor + '"]');   // sensor matches ID_RE: safe here
      if (!fig) {
        fig = document.createElement('figure');
        fig.dataset.sensor = sensor;
        fig.innerHTML = '<figcaption></figcaption><canvas></canvas><div class="legend"></div>';
        fig.querySelector('figcaption').textContent = sensor;
        box.append(fig);
      }
      drawChart(fig.querySelector('canvas'), list, nowS);
      drawLegend(fig.querySelector('.legend'), list);
    }
  }

  function drawLegend(el, list) {
    const signature = list.map((s) => s.device).join(',');
    if (el.dataset.devices === signature) return;
    el.dataset.devices = signature;
    el.textContent = '';
    for (const s of list) {
      const item = el.appendChild(document.createElement('span'));
      const swatch = item.appendChild(document.createElement('span'));
      swatch.className = 'swatch';
      swatch.style.background = colors.get(s.device);
      item.append('device ' + s.device);
    }
  }

  function firstIndexFrom(points, ts) {
    let lo = 0;
    let hi = points.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (points[mid][0] < ts) lo = mid + 1; else hi = mid;
    }
    return lo;
  }

  function drawChart(canvas, list, nowS) {
    // Size the bitmap to the element in device pixels, so lines stay sharp on high-density screens.
    const dpr = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
      canvas.width = Math.round(width * dpr);
      canvas.height = Math.round(height * dpr);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const x0 = nowS - WINDOW_S;
    let lo = Infinity;
    let hi = -Infinity;
    for (const s of list) {
      for (let i = firstIndexFrom(s.points, x0); i < s.points.length; i++) {
        const v = s.points[i][1];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    }
    if (lo === Infinity) { lo = 0; hi = 1; }
    if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
    // Round ticks (1, 2 or 5 times a power of ten), about four of them, the axis widened to whole ticks.
    const rough = (hi - lo) / 4;
    const magnitude = Math.pow(10, Math.floor(Math.log10(rough)));
    const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= rough);
    lo = Math.floor(lo / step) * step;
    hi = Math.ceil(hi / step) * step;
    const decimals = Math.max(0, -Math.floor(Math.log10(step)));

    const left = 48;
    const right = width - 8;
    const top = 8;
    const bottom = height - 22;
    const xOf = (ts) => left + (ts - x0) / WINDOW_S * (right - left);
    const yOf = (v) => bottom - (v - lo) / (hi - lo) * (bottom - top);

    ctx.font = '11px system-ui, sans-serif';
    ctx.fillStyle = '#666';
    ctx.strokeStyle = '#e4e4e4';
    ctx.lineWidth = 1;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    const ticks = Math.round((hi - lo) / step);
    for (let k = 0; k <= ticks; k++) {
      const v = lo + k * step;
      const y = Math.round(yOf(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(right, y); ctx.stroke();
      ctx.fillText(v.toFixed(decimals), left - 4, y);
    }
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    for (let t = Math.ceil(x0 / 60) * 60; t <= nowS; t += 60) {
      const x = Math.round(xOf(t)) + 0.5;
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, bottom); ctx.stroke();
      if (x - left < 30 || right - x < 30) continue;   // a label cut by the edge is worse than none
      ctx.fillText(new Date(t * 1000).toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'}), x, bottom + 4);
    }

    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, right - left, bottom - top);
    ctx.clip();
    ctx.lineWidth = 1.5;
    ctx.lineJoin = 'round';
    for (const s of list) {
      const p = s.points;
      ctx.strokeStyle = ctx.fillStyle = colors.get(s.device);
      ctx.beginPath();
      // Start one point before the window, so the line enters from the left edge.
      for (let i = Math.max(0, firstIndexFrom(p, x0) - 1); i < p.length; i++) {
        const [ts, v] = p[i];
        if (i > 0 && ts - p[i - 1][0] <= GAP_S) ctx.lineTo(xOf(ts), yOf(v)); else ctx.moveTo(xOf(ts), yOf(v));
      }
      ctx.stroke();
      // A point with no neighbour to join draws no line: mark it, and the newest point, with a dot.
      for (let i = Math.max(0, firstIndexFrom(p, x0)); i < p.length; i++) {
        const alone = (i === 0 || p[i][0] - p[i - 1][0] > GAP_S) && (i === p.length - 1 || p[i + 1][0] - p[i][0] > GAP_S);
        if (alone || i === p.length - 1) ctx.fillRect(xOf(p[i][0]) - 2, yOf(p[i][1]) - 2, 4, 4);
      }
    }
    ctx.restore();
  }

  // ---- start

  $('device-filter').addEventListener('change', (e) => setFilter('device', e.target.value));
  $('sensor-filter').addEventListener('change', (e) => setFilter('sensor', e.target.value));
  $('ticket-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const params = hashParams();
    params.set('ticket', $('ticket-input').value.trim());
    $('ticket-input').value = '';
    writeHash(params);
    connect();
  });
  window.addEventListener('hashchange', () => {
    // Someone edited the address: new filters apply at once; a new ticket (or user, realm) needs a new login.
    readFilters();
    const params = hashParams();
    const login = [params.get('ticket'), params.get('user'), params.get('realm')].join(' ');
    if (login !== lastLogin || status.state === 'auth failed') connect();
    requestDraw();
  });
  // The time axis and the "last seen" column move even when nothing arrives.
  setInterval(requestDraw, 1000);

  const copy = (s) => ({device_id: s.device, sensor_type: s.sensor, points: s.points.map((p) => p.slice())});
  window.sensorHub = Object.freeze({
    get state() { return status.state; },
    get message() { return status.message; },
    get received() { return status.received; },   // live readings accepted
    get skipped() { return status.skipped; },
    get backfills() { return status.backfills; },
    get history() { return status.history; },
    get draws() { return status.draws; },
    filters: () => ({...filters}),
    readingsPerSecond,
    // What the table and the charts show (filters applied), as copies.
    devices: () => visibleDevices().map((d) => ({
      device_id: d.id,
      last_seen: d.lastSeen,
      last: Object.fromEntries([...d.last].filter(([t]) => !filters.sensor || t === filters.sensor)
        .map(([t, l]) => [t, {...l}])),
    })),
    series: () => visibleSeries().map(copy),
  });

  readFilters();
  connect();
})();
