// Sensor hub dashboard.
//
// Plain script, no build step; it needs vendor/autobahn.min.js (autobahn-browser) and vendor/uPlot.iife.min.js
// (uPlot). It logs in as "dashboard" with the ticket from the URL fragment and subscribes to every reading
// (prefix iot.sensor.). The device table comes from iot.list_devices and stays current from the live events.
// The charts show the charted devices (the 10 most recent by default) over a time range: live (the last
// 5 minutes, back-filled per device, then streaming), or a past range fetched per device, raw readings where a
// series has at most MAX_POINTS of them, else iot.aggregate buckets (mean line, min-max band).
// window.sensorHub is a read-only view of the page's data for tests and for poking around in the console.
(() => {
  'use strict';

  const AUTHID = 'dashboard';
  const DEFAULT_REALM = 'iot';
  const TOPIC_PREFIX = 'iot.sensor.';
  const ID_RE = /^[0-9a-z_]{1,64}$/;           // the wire contract's device_id and sensor_type
  const TOO_MANY = 'iot.error.too_many_results';
  const LIVE_S = 300;                           // the live range: the last 5 minutes
  const RANGES = {'1h': 3600, '24h': 86400, '7d': 7 * 86400, '30d': 30 * 86400};
  const MAX_POINTS = 1000;                      // per series, raw or buckets
  const BUCKETS_S = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
  const DEFAULT_CHARTED = 10;                   // without a choice, the charts show the 10 most recent devices
  const PAGE_ROWS = 20;                         // the device table renders one page of rows
  const DRAW_INTERVAL_MS = 250;                 // at most 4 redraws a second, however fast readings come
  const RATE_WINDOW_S = 5;                      // readings/s is averaged over the last 5 whole seconds
  const GAP_S = 15;                             // raw readings: a longer silence (or 3 usual steps) breaks the line
  const STALE_S = 60;                           // a device silent for longer is greyed out in the table
  const LOAD_RETRIES = 20;                      // while no query service is registered: every 3 s for a minute
  const LOAD_RETRY_MS = 3000;
  const AUTOBAHN_RETRY = {                      // reconnect for as long as the page is open, at most 5 s apart
    max_retries: -1, initial_retry_delay: 0.5, max_retry_delay: 5, retry_delay_growth: 1.5, retry_delay_jitter: 0.1,
  };
  const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf',
    '#7f7f7f', '#bcbd22'];

  const $ = (id) => document.getElementById(id);
  const nowS = () => Date.now() / 1000;
  const byId = (a, b) => a.localeCompare(b, 'en', {numeric: true});

  // ---- state

  const devices = new Map();   // device_id -> {id, types: Set, last: Map(sensor_type -> {value, ts}), lastSeen}
  const sensorTypes = new Set();
  const status = {state: 'connecting', message: '', history: '', note: '', noteIsError: false,
    received: 0, skipped: 0, loads: 0, draws: 0};
  const drawMs = [];           // the last 100 redraw times, ms
  let view = {range: 'live', start: 0, end: 0};   // start/end: epoch seconds; live ones move with the clock
  let zoomStack = [];          // the views before each zoom, for double-click
  let charted = [];            // device ids in the charts, in colour order
  let chosen = false;          // charted was picked (fragment or table), not the default "10 most recent"
  let sensor = '';
  let search = '';
  let page = 0;
  // What the charts show: mode 'raw' (series of [ts, value]) or 'buckets' (series of [start, count, min, max, mean])
  let shown = {mode: 'raw', bucket: null, start: 0, end: 0, live: true, series: new Map()};
  let session = null;
  let generation = 0;          // a newer load makes the answers of an older one stale

  function device(id) {
    let d = devices.get(id);
    if (!d) {
      d = {id, types: new Set(), last: new Map(), lastSeen: null};
      devices.set(id, d);
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

  function noteDevice(deviceId, sensorType, r) {
    const d = device(deviceId);
    d.types.add(sensorType);
    sensorTypes.add(sensorType);
    const last = d.last.get(sensorType);
    if (!last || r.ts >= last.ts) d.last.set(sensorType, {value: r.value, ts: r.ts});
    if (d.lastSeen === null || r.ts > d.lastSeen) d.lastSeen = r.ts;
  }

  function seriesOf(deviceId, sensorType) {
    const key = deviceId + '/' + sensorType;
    let s = shown.series.get(key);
    if (!s) {
      s = {device: deviceId, sensor: sensorType, points: []};
      shown.series.set(key, s);
    }
    return s;
  }

  // Insert in ts order; a reading seen both live and in the back-fill is kept once.
  function insertPoint(points, ts, value) {
    const n = points.length;
    if (n === 0 || ts > points[n - 1][0]) {
      points.push([ts, value]);                 // the usual case: readings come in order
      return;
    }
    const i = firstIndexFrom(points, ts);
    if (i < n && points[i][0] === ts) return;
    points.splice(i, 0, [ts, value]);
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

  // ---- readings per second: counts per whole second of a monotonic clock, in a small ring

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
    const span = rate.start === null ? 0 : Math.min(RATE_WINDOW_S, rate.second - rate.start - 1);
    let sum = 0;
    for (let s = rate.second - span; s < rate.second; s++) sum += rate.slots[slot(s)];
    return span > 0 ? sum / span : 0;
  }

  // ---- live events: every one updates the table; the charts stream only in the live range

  function onEvent(args, kwargs, details) {
    try {
      const payload = args ? args[0] : undefined;
      const items = Array.isArray(payload) ? payload : [payload];
      const topic = String(details && details.topic);
      const parts = topic.slice(TOPIC_PREFIX.length).split('.');
      if (!topic.startsWith(TOPIC_PREFIX) || parts.length !== 2 || !ID_RE.test(parts[0]) || !ID_RE.test(parts[1])) {
        status.skipped += items.length;
        return;
      }
      const [deviceId, sensorType] = parts;
      const streaming = view.range === 'live' && shown.live && charted.includes(deviceId);
      let accepted = 0;
      for (const r of items) {
        if (!isReading(r, deviceId, sensorType)) {
          status.skipped += 1;
          continue;
        }
        accepted += 1;
        noteDevice(deviceId, sensorType, r);
        if (streaming) insertPoint(seriesOf(deviceId, sensorType).points, r.ts, r.value);
      }
      if (view.range === 'live' && !chosen && charted.length < DEFAULT_CHARTED && accepted &&
          !charted.includes(deviceId) && session) {
        charted.push(deviceId);                 // a new device while fewer than 10 are charted: chart it too
        const gen = generation;
        backfillDevice(deviceId, gen).catch((err) => {
          if (gen === generation) showNote('query refused: ' + errorText(err), true);
        });
      }
      status.received += accepted;
      countReadings(accepted);
      requestDraw();
    } catch (err) {
      // An exception here would only be logged by autobahn; count it so it is visible, keep the subscription.
      status.skipped += 1;
      console.warn('sensor hub: event not handled', err);
    }
  }

  // ---- queries

  function errorText(err) {
    if (err && err.error) return err.error + (err.args && err.args.length ? ': ' + err.args[0] : '');
    return String(err);
  }

  function showNote(text, isError = false) {
    status.note = text;
    status.noteIsError = isError;
    requestDraw();
  }

  async function loadDevices() {
    for (const row of await session.call('iot.list_devices')) {
      if (!row || typeof row.device_id !== 'string' || !ID_RE.test(row.device_id)) continue;
      const d = device(row.device_id);
      for (const t of row.sensor_types || []) {
        if (ID_RE.test(t)) { d.types.add(t); sensorTypes.add(t); }
      }
      if (Number.isFinite(row.last_ts) && (d.lastSeen === null || row.last_ts > d.lastSeen)) d.lastSeen = row.last_ts;
    }
    // the table's last values of every sensor type, also of those no chart shows live (one call, from device rows)
    for (const r of await session.call('iot.get_latest')) {
      if (r && ID_RE.test(String(r.device_id)) && ID_RE.test(String(r.sensor_type)) &&
          isReading(r, r.device_id, r.sensor_type)) noteDevice(r.device_id, r.sensor_type, r);
    }
  }

  function mostRecent(n) {
    return [...devices.values()].sort(byLastSeen).slice(0, n).map((d) => d.id);
  }

  function byLastSeen(a, b) {
    return (b.lastSeen ?? -Infinity) - (a.lastSeen ?? -Infinity) || byId(a.id, b.id);
  }

  const filterArgs = (deviceId) => (sensor ? {device_id: deviceId, sensor_type: sensor} : {device_id: deviceId});
  const seriesCap = (deviceId) => MAX_POINTS * (sensor ? 1 : Math.max(1, device(deviceId).types.size));

  // Live: the newest readings of one device (fetch_last_window answers the newest, as a live chart wants),
  // cut to the live window.
  async function backfillDevice(deviceId, gen) {
    const rows = await session.call('iot.fetch_last_window', [seriesCap(deviceId)], filterArgs(deviceId));
    if (gen !== generation) return;
    const since = nowS() - LIVE_S;
    for (const r of rows) {
      if (r && r.ts >= since && ID_RE.test(String(r.sensor_type)) && isReading(r, deviceId, r.sensor_type)) {
        insertPoint(seriesOf(deviceId, r.sensor_type).points, r.ts, r.value);
        noteDevice(deviceId, r.sensor_type, r);   // the table's last values, before the device sends again
      }
    }
    requestDraw();
  }

  function bucketFor(span) {
    const want = span / MAX_POINTS;
    return BUCKETS_S.find((b) => b >= want) || Math.ceil(want / 86400) * 86400;
  }

  // A past range: raw readings when every charted series fits in MAX_POINTS, else buckets for all of them.
  async function loadPast(start, end, gen) {
    const ids = charted.slice();
    const raw = await Promise.all(ids.map((id) => {
      const cap = seriesCap(id);
      return session.call('iot.fetch_between_window', [start, end], {...filterArgs(id), limit: cap + 1})
        .then((rows) => (rows.length > cap ? null : rows), (err) => {
          if (err.error === TOO_MANY) return null;   // more than this query service answers at once: buckets
          throw err;
        });
    }));
    if (gen !== generation) return null;
    if (raw.every((rows) => rows !== null)) {
      shown = {mode: 'raw', bucket: null, start, end, live: false, series: new Map()};
      for (const rows of raw) {
        for (const r of rows) {
          if (r && ID_RE.test(String(r.device_id)) && ID_RE.test(String(r.sensor_type)) &&
              isReading(r, r.device_id, r.sensor_type)) {
            insertPoint(seriesOf(r.device_id, r.sensor_type).points, r.ts, r.value);
          }
        }
      }
      return 'readings';
    }
    const bucket = bucketFor(end - start);
    const from = Math.floor(start / bucket) * bucket;   // buckets on whole multiples: a refetch draws the same ones
    const answers = await Promise.all(ids.map((id) =>
      session.call('iot.aggregate', [from, end, bucket], filterArgs(id))));
    if (gen !== generation) return null;
    shown = {mode: 'buckets', bucket, start, end, live: false, series: new Map()};
    for (const rows of answers) {
      for (const b of rows) {
        if (!b || !ID_RE.test(String(b.device_id)) || !ID_RE.test(String(b.sensor_type))) continue;
        seriesOf(b.device_id, b.sensor_type).points.push([b.bucket_start, b.count, b.min, b.max, b.mean]);
      }
    }
    return 'buckets of ' + duration(bucket);
  }

  function duration(s) {
    if (s < 60) return s + ' s';
    if (s < 3600) return s / 60 + ' min';
    if (s < 86400) return s / 3600 + ' h';
    return s / 86400 + ' d';
  }

  // Everything the view needs, on every (re)connect (withDevices: the device list too, and the default devices
  // picked again) and every change of range, zoom, devices or sensor.
  async function load(attempt = 0, withDevices = false) {
    if (!session) return;
    const gen = ++generation;
    const s = session;
    try {
      if (withDevices || fragmentDevices !== null) {
        await loadDevices();
        if (gen !== generation) return;
        checkFragmentDevices();
      }
      if (!chosen && (withDevices || !charted.length)) charted = mostRecent(DEFAULT_CHARTED);
      let what;
      if (view.range === 'live') {
        // Live after live (a reconnect, another sensor or device) keeps what streamed in: storage may not have
        // committed the last second yet. The back-fill merges with it.
        if (!shown.live) shown = {mode: 'raw', bucket: null, start: 0, end: 0, live: true, series: new Map()};
        await Promise.all(charted.map((id) => backfillDevice(id, gen)));
        what = 'live, back-filled ' + charted.length + ' devices';
      } else {
        const {start, end} = windowOf(view);
        what = await loadPast(start, end, gen);
        if (what === null) return;
        what = rangeLabel() + ': ' + what;
      }
      if (gen !== generation) return;
      status.history = what;
      if (status.noteIsError) showNote('');
      status.loads += 1;
    } catch (err) {
      if (gen !== generation || s !== session) return;
      const missing = err && err.error === 'wamp.error.no_such_procedure';
      status.history = '';
      showNote('query refused: ' + errorText(err) + (missing && attempt < LOAD_RETRIES ? '; trying again' : ''), true);
      if (missing && attempt < LOAD_RETRIES) {
        setTimeout(() => { if (gen === generation && s === session) load(attempt + 1, withDevices); }, LOAD_RETRY_MS);
      }
    }
    requestDraw();
  }

  function windowOf(v) {
    if (v.range === 'live') {
      const end = nowS();
      return {start: end - LIVE_S, end};
    }
    if (v.range === 'custom') return {start: v.start, end: v.end};
    return {start: v.end - RANGES[v.range], end: v.end};
  }

  function rangeLabel() {
    if (view.range === 'custom') return isoS(view.start) + ' to ' + isoS(view.end);
    return {'1h': 'last hour', '24h': 'last 24 h', '7d': 'last 7 days', '30d': 'last 30 days'}[view.range];
  }

  const isoS = (ts) => new Date(ts * 1000).toISOString().replace('.000Z', 'Z');

  // A fragment's devices that storage does not know: back to live and the default devices, and say so.
  let fragmentDevices = null;
  function checkFragmentDevices() {
    if (fragmentDevices === null) return;
    const unknown = fragmentDevices.filter((id) => !devices.has(id));
    fragmentDevices = null;
    if (!unknown.length) return;
    fallBack('no device ' + unknown.join(', ') + ' is known');
    chosen = false;
  }

  function fallBack(why) {
    view = {range: 'live', start: 0, end: 0};
    zoomStack = [];
    charted = [];
    chosen = false;
    const params = hashParams();
    for (const k of ['range', 'from', 'to', 'devices']) params.delete(k);
    writeHash(params);
    showNote('The address asked for something this page cannot show (' + why + '): showing live, the ' +
      DEFAULT_CHARTED + ' most recent devices.');
  }

  // ---- the connection

  let connection = null;
  let ticket = '';
  let lastLogin = null;

  function wsUrl() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return scheme + '//' + location.host + '/ws';
  }

  function setState(state, message = '') {
    status.state = state;
    status.message = message;
    requestDraw();
  }

  function connect() {
    const params = hashParams();
    ticket = params.get('ticket') || '';
    lastLogin = [params.get('ticket'), params.get('user'), params.get('realm')].join(' ');
    const old = connection;
    connection = null;                          // its onclose must not act any more
    session = null;
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
      onchallenge: (s, method) => {
        if (method !== 'ticket') throw new Error('the router asked for ' + method + ', this page only has a ticket');
        return ticket;
      },
      // msgpack first: JSON cannot carry the NaN a broken device may send, and the browser's JSON.parse would
      // then fail on the whole message and drop the connection instead of skipping one reading.
      serializers: [new autobahn.serializer.MsgpackSerializer(), new autobahn.serializer.JSONSerializer()],
      use_es6_promises: true,
    }, AUTOBAHN_RETRY));

    conn.onopen = (s) => {
      if (conn !== connection) return;
      s.subscribe(TOPIC_PREFIX, onEvent, {match: 'prefix'}).then(() => {
        session = s;
        setState('connected');
        return load(0, true);
      }, (err) => {
        setState('failed', 'cannot subscribe to ' + TOPIC_PREFIX + ' (' + errorText(err) + ')');
      });
    };

    conn.onclose = (reason, details) => {
      if (conn !== connection) return true;
      session = null;
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

  // ---- the URL fragment: ticket, range (range= or from= and to=), devices, sensor; other parameters kept

  function hashParams() {
    return new URLSearchParams(location.hash.slice(1));
  }

  function writeHash(params) {
    // replaceState: no history entry per click, and no hashchange event back to us
    history.replaceState(null, '', '#' + params.toString());
    updateShareLink();
  }

  // "2026-12-03T10:00:00Z" or epoch seconds; NaN when it is neither.
  function parseTime(text) {
    if (/^-?\d+(\.\d+)?$/.test(text)) return Number(text);
    if (!/^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)$/.test(text)) return NaN;
    return Date.parse(text) / 1000;
  }

  // The view the fragment asks for; a malformed one falls back to live with a note.
  function readFragment() {
    const params = hashParams();
    const problems = [];
    const range = params.get('range');
    const from = params.get('from');
    const to = params.get('to');
    let next = {range: 'live', start: 0, end: 0};
    if (from !== null || to !== null) {
      const start = parseTime(from || '');
      const end = parseTime(to || '');
      if (Number.isFinite(start) && Number.isFinite(end) && start < end) next = {range: 'custom', start, end};
      else problems.push('from=' + from + ' to=' + to + ' is not a time range');
    } else if (range !== null && range !== 'live') {
      if (RANGES[range]) next = {range, start: 0, end: nowS()};   // fixed, as when chosen in the page
      else problems.push('range=' + range + ' is not one of live, ' + Object.keys(RANGES).join(', '));
    }
    const ids = (params.get('devices') || '').split(',').filter((x) => x);
    const bad = ids.filter((id) => !ID_RE.test(id));
    if (bad.length) problems.push('no device ' + bad.join(', ') + ' is known');
    const s = params.get('sensor') || '';
    if (s && !ID_RE.test(s)) problems.push('sensor=' + s + ' is not a sensor type');
    view = next;
    zoomStack = [];
    sensor = ID_RE.test(s) ? s : '';
    chosen = ids.length > 0 && !bad.length;
    charted = chosen ? ids : [];
    fragmentDevices = chosen ? ids : null;
    if (problems.length) fallBack(problems.join('; '));
    else if (!status.noteIsError) showNote('');
    updateShareLink();
  }

  function writeView() {
    const params = hashParams();
    for (const k of ['range', 'from', 'to']) params.delete(k);
    if (view.range === 'custom') {
      params.set('from', isoS(view.start));
      params.set('to', isoS(view.end));
    } else if (view.range !== 'live') {
      params.set('range', view.range);
    }
    if (chosen) params.set('devices', charted.join(',')); else params.delete('devices');
    if (sensor) params.set('sensor', sensor); else params.delete('sensor');
    writeHash(params);
  }

  function updateShareLink() {
    // A view is shared without the ticket: whoever opens it is asked for their own.
    const params = hashParams();
    params.delete('ticket');
    $('share-link').href = location.pathname + '#' + params.toString();
  }

  function setView(next, zoom = false) {
    if (zoom) zoomStack.push(view); else zoomStack = [];
    // A past range is fixed when it is chosen, so the charts, the CSV and a refetch after a reconnect agree.
    view = next.range === 'live' || next.range === 'custom' ? next : {...next, end: nowS()};
    writeView();
    showNote('');
    load();
  }

  function zoomTo(a, b) {
    if (!(b - a > 0.001)) return;
    setView({range: 'custom', start: a, end: b}, true);
  }

  function zoomOut() {
    if (!zoomStack.length) return;
    view = zoomStack.pop();
    writeView();
    load();
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

  function draw() {
    drawPending = false;
    const t0 = performance.now();
    lastDraw = t0;
    status.draws += 1;
    const now = nowS();
    drawHeader();
    drawControls();
    drawTable(now);
    drawCharts(now);
    // uPlot paints in a microtask queued by setData: this one runs after it, so the time includes the painting.
    queueMicrotask(() => {
      drawMs.push(performance.now() - t0);
      if (drawMs.length > 100) drawMs.shift();
    });
  }

  function drawHeader() {
    const el = $('state');
    el.textContent = status.state;
    el.className = 'state ' + status.state.replace(/ /g, '-');
    $('state-message').textContent = status.message;
    $('rate').textContent = readingsPerSecond().toFixed(1) + ' readings/s';
    $('skipped').textContent = status.skipped ? status.skipped + ' skipped' : '';
    $('history').textContent = status.history;
    const note = $('note');
    note.hidden = !status.note;
    note.textContent = status.note;
    note.className = status.noteIsError ? 'error' : '';
  }

  function drawControls() {
    const range = $('range');
    if (document.activeElement !== range) range.value = view.range;
    $('custom-range').hidden = view.range !== 'custom';
    if (view.range === 'custom' && document.activeElement !== $('from') && document.activeElement !== $('to')) {
      $('from').value = isoS(view.start).slice(0, 19);
      $('to').value = isoS(view.end).slice(0, 19);
    }
    const select = $('sensor-filter');
    const all = [...new Set([...sensorTypes, ...(sensor ? [sensor] : [])])].sort(byId);
    if (select.dataset.options !== all.join(',')) {
      select.dataset.options = all.join(',');
      select.length = 1;                        // keep the "all" option
      for (const v of all) select.add(new Option(v, v));
    }
    select.value = sensor;
  }

  function ago(seconds) {
    if (seconds < 2) return 'just now';
    if (seconds < 120) return Math.round(seconds) + ' s ago';
    if (seconds < 7200) return Math.round(seconds / 60) + ' min ago';
    if (seconds < 172800) return Math.round(seconds / 3600) + ' h ago';
    return Math.round(seconds / 86400) + ' days ago';
  }

  function tableDevices() {
    const q = search.toLowerCase();
    return [...devices.values()]
      .filter((d) => (!q || d.id.includes(q)) && (!sensor || d.types.has(sensor)))
      .sort(byLastSeen);
  }

  const colorOf = (id) => PALETTE[charted.indexOf(id) % PALETTE.length];

  // Only the rows of one page are in the document, whatever the number of devices.
  function drawTable(now) {
    const list = tableDevices();
    const pages = Math.max(1, Math.ceil(list.length / PAGE_ROWS));
    page = Math.min(page, pages - 1);
    const rows = list.slice(page * PAGE_ROWS, (page + 1) * PAGE_ROWS);
    const body = document.createElement('tbody');
    for (const d of rows) {
      const tr = body.insertRow();
      tr.dataset.device = d.id;
      if (d.lastSeen === null || now - d.lastSeen > STALE_S) tr.className = 'stale';
      const pick = tr.insertCell().appendChild(document.createElement('input'));
      pick.type = 'checkbox';
      pick.checked = charted.includes(d.id);
      pick.dataset.device = d.id;
      pick.setAttribute('aria-label', 'chart device ' + d.id);
      const name = tr.insertCell();
      if (pick.checked) {
        const swatch = name.appendChild(document.createElement('span'));
        swatch.className = 'swatch';
        swatch.style.background = colorOf(d.id);
      }
      name.append(d.id);
      const values = tr.insertCell();
      for (const [type, last] of [...d.last].sort((a, b) => byId(a[0], b[0]))) {
        if (sensor && type !== sensor) continue;
        const item = values.appendChild(document.createElement('span'));
        item.className = 'value';
        item.dataset.sensor = type;
        item.textContent = type + ' ' + last.value.toFixed(2);
      }
      const seen = tr.insertCell();
      seen.textContent = d.lastSeen === null ? 'never' : ago(now - d.lastSeen);
      if (d.lastSeen !== null) seen.title = isoS(d.lastSeen);
    }
    $('devices').tBodies[0].replaceWith(body);
    $('page-info').textContent = list.length ? (page * PAGE_ROWS + 1) + '-' + (page * PAGE_ROWS + rows.length) +
      ' of ' + list.length + (list.length < devices.size ? ' (of ' + devices.size + ' devices)' : '') : 'no devices';
    $('prev-page').disabled = page === 0;
    $('next-page').disabled = page >= pages - 1;
  }

  // ---- charts: one uPlot per sensor type, rebuilt when its series change, else given new data

  const charts = new Map();    // sensor_type -> {fig, plot, signature}

  function chartSeries() {
    const bySensor = new Map();
    for (const s of shown.series.values()) {
      if ((sensor && s.sensor !== sensor) || !charted.includes(s.device)) continue;
      if (!bySensor.has(s.sensor)) bySensor.set(s.sensor, []);
      bySensor.get(s.sensor).push(s);
    }
    for (const list of bySensor.values()) list.sort((a, b) => charted.indexOf(a.device) - charted.indexOf(b.device));
    return new Map([...bySensor].sort((a, b) => byId(a[0], b[0])));
  }

  function drawCharts(now) {
    const {start, end} = view.range === 'live' ? windowOf(view) : shown;
    const bySensor = chartSeries();
    $('no-data').hidden = bySensor.size > 0;
    const hidden = devices.size - charted.length;
    $('chart-note').textContent = charted.length + ' of ' + devices.size + ' devices charted' +
      (hidden > 0 ? ', ' + hidden + ' hidden: tick them in the table to chart them' : '');
    for (const [type, chart] of charts) {
      if (!bySensor.has(type)) {
        chart.plot.destroy();
        chart.fig.remove();
        charts.delete(type);
      }
    }
    for (const [type, list] of bySensor) {
      const data = shown.mode === 'raw' ? rawData(list, start, end) : bucketData(list, start, end);
      const signature = shown.mode + ':' + list.map((s) => s.device).join(',');
      let chart = charts.get(type);
      if (chart && chart.signature !== signature) {
        chart.plot.destroy();
        chart.fig.remove();
        chart = null;
      }
      if (!chart) {
        chart = newChart(type, list, signature);
        charts.set(type, chart);
      }
      chart.range = [start, end];
      chart.plot.setData(data);
      drawLegend(chart.fig.querySelector('.legend'), list);
    }
    const box = $('charts');
    const order = [...bySensor.keys()].map((type) => charts.get(type).fig);
    if (order.some((fig, i) => box.children[i + 1] !== fig)) for (const fig of order) box.append(fig);
  }

  // Raw readings of several devices on one time axis: x is the union of their ts, undefined where a device has
  // no reading (uPlot joins across it), null inside a gap (uPlot breaks the line).
  function rawData(list, start, end) {
    const cut = list.map((s) => {
      const p = s.points;
      const rows = p.slice(Math.max(0, firstIndexFrom(p, start) - 1), firstIndexFrom(p, end + 1e-6) + 1);
      return withGaps(rows);
    });
    const xs = [...new Set(cut.flatMap((rows) => rows.map((r) => r[0])))].sort((a, b) => a - b);
    const at = new Map(xs.map((x, i) => [x, i]));
    const ys = cut.map((rows) => {
      const y = new Array(xs.length).fill(undefined);
      for (const [x, v] of rows) y[at.get(x)] = v;
      return y;
    });
    return [xs, ...ys];
  }

  function withGaps(rows) {
    if (rows.length < 3) return rows;
    const steps = [];
    for (let i = 1; i < rows.length; i++) steps.push(rows[i][0] - rows[i - 1][0]);
    const usual = steps.slice().sort((a, b) => a - b)[steps.length >> 1];
    const gap = Math.max(GAP_S, 3 * usual);
    const out = [rows[0]];
    for (let i = 1; i < rows.length; i++) {
      if (steps[i - 1] > gap) out.push([(rows[i - 1][0] + rows[i][0]) / 2, null]);
      out.push(rows[i]);
    }
    return out;
  }

  // Buckets on one grid: x is each bucket's middle; an empty bucket is null, so the line breaks there.
  function bucketData(list, start, end) {
    const b = shown.bucket;
    const first = Math.floor(start / b) * b;
    const n = Math.max(1, Math.ceil((end - first) / b));
    const xs = Array.from({length: n}, (_, k) => first + (k + 0.5) * b);
    const out = [xs];
    for (const s of list) {
      const mean = new Array(n).fill(null);
      const lo = new Array(n).fill(null);
      const hi = new Array(n).fill(null);
      for (const [t, , min, max, avg] of s.points) {
        const k = Math.round((t - first) / b);
        if (k >= 0 && k < n) { mean[k] = avg; lo[k] = min; hi[k] = max; }
      }
      out.push(mean, lo, hi);
    }
    return out;
  }

  function newChart(type, list, signature) {
    const fig = document.createElement('figure');
    fig.dataset.sensor = type;
    fig.innerHTML = '<figcaption></figcaption><div class="plot"></div><div class="legend"></div>';
    fig.querySelector('figcaption').textContent = type;
    $('charts').append(fig);
    const chart = {fig, signature, range: [0, 1], plot: null};
    const series = [{}];
    const bands = [];
    for (const s of list) {
      const color = colorOf(s.device);
      series.push({label: s.device, stroke: color, width: 1.5, spanGaps: false});
      if (shown.mode === 'buckets') {
        series.push({label: s.device + ' min', stroke: 'transparent', width: 0, points: {show: false}});
        series.push({label: s.device + ' max', stroke: 'transparent', width: 0, points: {show: false}});
        bands.push({series: [series.length - 1, series.length - 2], fill: color + '33'});
      }
    }
    const box = fig.querySelector('.plot');
    chart.plot = new uPlot({
      width: Math.max(200, box.clientWidth || fig.clientWidth - 24),
      height: 220,
      series,
      bands,
      legend: {show: false},
      scales: {x: {time: true, range: () => chart.range}},
      axes: [{stroke: '#666', grid: {stroke: '#eee'}}, {stroke: '#666', grid: {stroke: '#eee'}, size: 56}],
      cursor: {drag: {x: true, y: false, setScale: false}},
      hooks: {
        setSelect: [(u) => {
          if (u.select.width > 4) zoomTo(u.posToVal(u.select.left, 'x'), u.posToVal(u.select.left + u.select.width, 'x'));
          u.setSelect({left: 0, top: 0, width: 0, height: 0}, false);
        }],
      },
    }, [[], ...series.slice(1).map(() => [])], box);
    chart.plot.over.addEventListener('dblclick', zoomOut);
    return chart;
  }

  function drawLegend(el, list) {
    const signature = list.map((s) => s.device).join(',') + (shown.mode === 'buckets' ? ' ' + shown.bucket : '');
    if (el.dataset.devices === signature) return;
    el.dataset.devices = signature;
    el.textContent = '';
    for (const s of list) {
      const item = el.appendChild(document.createElement('span'));
      const swatch = item.appendChild(document.createElement('span'));
      swatch.className = 'swatch';
      swatch.style.background = colorOf(s.device);
      item.append('device ' + s.device);
    }
    if (shown.mode === 'buckets') el.append('line: mean per ' + duration(shown.bucket) + ', band: min to max');
  }

  window.addEventListener('resize', () => {
    for (const chart of charts.values()) {
      const box = chart.fig.querySelector('.plot');
      chart.plot.setSize({width: Math.max(200, box.clientWidth), height: 220});
    }
  });

  // ---- CSV of the current view: what the charts show, raw readings or buckets

  function csvText() {
    const {start, end} = view.range === 'live' ? windowOf(view) : shown;
    const raw = shown.mode === 'raw';
    const lines = [raw ? 'time_iso,time_epoch,device_id,sensor_type,value'
      : 'time_iso,time_epoch,device_id,sensor_type,count,min,max,mean,bucket_seconds'];
    const rows = [];
    for (const list of chartSeries().values()) {
      for (const s of list) {
        for (const p of s.points) {
          if (raw ? p[0] < start || p[0] > end : p[0] + shown.bucket <= start || p[0] > end) continue;
          rows.push([p[0], s.device, s.sensor, ...(raw ? [p[1]] : [p[1], p[2], p[3], p[4], shown.bucket])]);
        }
      }
    }
    rows.sort((a, b) => a[0] - b[0] || byId(a[1], b[1]) || byId(a[2], b[2]));
    for (const r of rows) lines.push([new Date(r[0] * 1000).toISOString(), ...r].join(','));
    return lines.join('\n') + '\n';
  }

  function downloadCsv() {
    const url = URL.createObjectURL(new Blob([csvText()], {type: 'text/csv'}));
    const a = document.createElement('a');
    a.href = url;
    a.download = 'sensor-hub-' + (view.range === 'custom' ? isoS(view.start) : view.range) + '.csv';
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // ---- start

  $('range').addEventListener('change', (e) => {
    const range = e.target.value;
    if (range === 'custom') {
      const {start, end} = windowOf(view);
      setView({range: 'custom', start: Math.floor(start), end: Math.ceil(end)});
    } else {
      setView({range, start: 0, end: 0});
    }
  });
  $('apply-range').addEventListener('click', () => {
    const start = parseTime($('from').value + 'Z');
    const end = parseTime($('to').value + 'Z');
    if (Number.isFinite(start) && Number.isFinite(end) && start < end) setView({range: 'custom', start, end});
    else showNote('from must be a time before to', true);
  });
  $('sensor-filter').addEventListener('change', (e) => {
    sensor = e.target.value;
    writeView();
    load();
  });
  $('search').addEventListener('input', (e) => {
    search = e.target.value.trim();
    page = 0;
    requestDraw();
  });
  $('prev-page').addEventListener('click', () => { page = Math.max(0, page - 1); requestDraw(); });
  $('next-page').addEventListener('click', () => { page += 1; requestDraw(); });
  $('devices').addEventListener('change', (e) => {
    const id = e.target.dataset.device;
    if (!id) return;
    const rest = charted.filter((x) => x !== id);
    charted = e.target.checked ? [...rest, id] : rest;
    chosen = true;
    writeView();
    load();
  });
  $('csv').addEventListener('click', downloadCsv);
  $('ticket-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const params = hashParams();
    params.set('ticket', $('ticket-input').value.trim());
    $('ticket-input').value = '';
    writeHash(params);
    connect();
  });
  window.addEventListener('hashchange', () => {
    // Someone edited the address: a new view applies at once; a new ticket (or user, realm) needs a new login.
    readFragment();
    const params = hashParams();
    const login = [params.get('ticket'), params.get('user'), params.get('realm')].join(' ');
    if (login !== lastLogin || status.state === 'auth failed') connect(); else load();
  });
  // The live time axis and the "last seen" column move even when nothing arrives.
  setInterval(() => {
    if (view.range === 'live') {
      const since = nowS() - LIVE_S - 10;
      for (const s of shown.series.values()) {
        const k = firstIndexFrom(s.points, since);
        if (k > 0) s.points.splice(0, k);
      }
    }
    requestDraw();
  }, 1000);

  const copy = (s) => ({device_id: s.device, sensor_type: s.sensor, points: s.points.map((p) => p.slice())});
  window.sensorHub = Object.freeze({
    get state() { return status.state; },
    get message() { return status.message; },
    get received() { return status.received; },   // live readings accepted
    get skipped() { return status.skipped; },
    get loads() { return status.loads; },         // views loaded (each (re)connect and change of view)
    get history() { return status.history; },
    get note() { return status.note; },
    get draws() { return status.draws; },
    readingsPerSecond,
    drawMs: () => drawMs.slice(),
    view: () => ({...view, ...windowOf(view), mode: shown.mode, bucket: shown.bucket, sensor, zoomed: zoomStack.length}),
    charted: () => charted.slice(),
    knownDevices: () => devices.size,
    // The table's rows (search and sensor filter applied, all pages), and the charts' series, as copies.
    devices: () => tableDevices().map((d) => ({
      device_id: d.id,
      last_seen: d.lastSeen,
      last: Object.fromEntries([...d.last].filter(([t]) => !sensor || t === sensor).map(([t, l]) => [t, {...l}])),
    })),
    series: () => [...chartSeries().values()].flat().map(copy),
    csv: csvText,
  });

  readFragment();
  connect();
})();
