// The farm dashboard: plain DOM, no framework, no build step. Every page reads the JSON API
// under /api and follows /api/events (server-sent events) to update without reloading.
'use strict';

// ---------- helpers ----------

const $ = (sel, root = document) => root.querySelector(sel);

/** h('div', {class: 'x', onclick: f}, child, 'text', ...) builds an element (text is never HTML). */
function h(tag, attrs, ...children) {
  const el = tag === 'svg' || SVG_TAGS.has(tag)
    ? document.createElementNS('http://www.w3.org/2000/svg', tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const SVG_TAGS = new Set(['rect', 'line', 'text', 'g', 'title', 'path']);

function debounce(fn, ms) {
  let t = null;
  return (...args) => {
    if (t) return;
    t = setTimeout(() => { t = null; fn(...args); }, ms);
  };
}

class Unauthorized extends Error {}

async function api(path, opts = {}) {
  const init = { credentials: 'same-origin', headers: {} };
  if (opts.method) init.method = opts.method;
  if (opts.method && opts.method !== 'GET') init.headers['x-farm-request'] = '1';
  if (opts.body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(opts.body);
  }
  const res = await fetch(path, init);
  if (res.status === 401 && !opts.noRedirect) {
    toLogin();
    throw new Unauthorized('not logged in');
  }
  let data = null;
  try { data = await res.json(); } catch (_) { /* no body */ }
  if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}

function toLogin() {
  const next = location.pathname + location.search;
  if (location.pathname !== '/login') location.href = '/login?next=' + encodeURIComponent(next);
}

function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  return sameDay ? time : d.toLocaleDateString([], { month: 'short', day: 'numeric' }) + ' ' + time;
}

function fmtAge(secs) {
  if (secs === null || secs === undefined) return '—';
  if (secs < 1) return 'just now';
  if (secs < 60) return `${Math.round(secs)}s ago`;
  if (secs < 3600) return `${Math.floor(secs / 60)}m ${Math.round(secs % 60)}s ago`;
  if (secs < 86400) return `${Math.floor(secs / 3600)}h ${Math.floor((secs % 3600) / 60)}m ago`;
  return `${Math.floor(secs / 86400)}d ago`;
}

function fmtDuration(secs) {
  if (secs < 60) return `${secs.toFixed(secs < 10 ? 1 : 0)}s`;
  if (secs < 3600) return `${Math.floor(secs / 60)}m ${Math.round(secs % 60)}s`;
  return `${Math.floor(secs / 3600)}h ${Math.floor((secs % 3600) / 60)}m`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
const badge = (status) => h('span', { class: `badge ${status}`, 'data-status': status, text: status });
const shortId = (id) => id.slice(0, 8);

/** A job's progress bar: succeeded, failed, cancelled, and the running tasks' partial steps. */
function jobBar(job, partial, big) {
  const total = Math.max(job.tasks_total, 1);
  const done = job.tasks_succeeded + job.tasks_failed + job.tasks_cancelled;
  let part = 0;
  if (partial && !TERMINAL.has(job.status)) for (const f of partial.values()) part += f;
  part = Math.min(part, job.tasks_total - done);
  const pct = (n) => `${(100 * n / total).toFixed(2)}%`;
  const bar = h('div', {
    class: big ? 'bar big' : 'bar', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100,
    'aria-valuenow': Math.round(100 * (done + part) / total),
    'data-done': done, 'data-total': job.tasks_total, 'data-testid': 'job-progress',
  });
  const seg = (cls, n) => { const s = h('span', { class: cls }); s.style.width = pct(n); return s; };
  bar.append(seg('ok', job.tasks_succeeded), seg('bad', job.tasks_failed), seg('cx', job.tasks_cancelled), seg('part', part));
  const txt = `${job.tasks_succeeded}/${job.tasks_total}` + (job.tasks_failed ? ` · ${job.tasks_failed} failed` : '') +
    (job.tasks_cancelled ? ` · ${job.tasks_cancelled} cancelled` : '');
  return h('div', { class: 'progress' }, bar, h('span', { class: 'txt', text: txt }));
}

// ---------- live events ----------

function follow(query, handlers) {
  const live = $('#live');
  let es = null;
  let retry = 1000;
  const open = () => {
    es = new EventSource('/api/events' + query);
    es.addEventListener('open', () => { live.classList.add('on'); retry = 1000; });
    es.addEventListener('hello', () => live.classList.add('on'));
    for (const [name, fn] of Object.entries(handlers)) {
      es.addEventListener(name, (e) => {
        let data = null;
        try { data = JSON.parse(e.data); } catch (_) { data = e.data; }
        fn(data);
      });
    }
    es.addEventListener('error', () => {
      live.classList.remove('on');
      if (es.readyState === EventSource.CLOSED) {
        // e.g. the session expired: check, then reopen with backoff.
        setTimeout(() => api('/api/me').then(open).catch(() => {}), retry);
        retry = Math.min(retry * 2, 30000);
      }
    });
  };
  open();
  window.addEventListener('beforeunload', () => es && es.close());
}

// ---------- pages ----------

async function overviewPage(main) {
  const cards = h('div', { class: 'cards' });
  const chart = h('div', { class: 'panel chart' });
  const models = h('div');
  main.replaceChildren(
    h('h1', { text: 'Overview' }), cards,
    h('h2', { text: 'Images per minute — last hour' }), chart,
    h('h2', { text: 'Queue by model' }), models,
  );
  const card = (label, value, sub, cls, testid) => h('div', { class: 'card', 'data-testid': testid },
    h('div', { class: 'label', text: label }),
    h('div', { class: 'value ' + (cls || ''), text: value }),
    h('div', { class: 'sub', text: sub || '' }));
  const render = (o) => {
    const c = o.counts;
    const oldest = o.oldest_waiting;
    cards.replaceChildren(
      card('Workers online', o.workers_online, `${o.busy}/${o.slots} slots busy · ${o.workers_total} known`, '', 'workers-online'),
      card('Queue depth', o.queue_depth, `${c.pending} pending · ${c.queued} queued`, '', 'queue-depth'),
      card('Running', c.running, 'tasks rendering now', '', 'running'),
      card('Succeeded', o.last_hour.succeeded, `last hour · ${c.succeeded} total`, 'ok', 'succeeded'),
      card('Failed', o.last_hour.failed, `last hour · ${c.failed} total`, o.last_hour.failed ? 'bad' : '', 'failed'),
      h('div', { class: 'card', 'data-testid': 'oldest-waiting' },
        h('div', { class: 'label', text: 'Oldest waiting task' }),
        h('div', { class: 'value', text: oldest ? fmtDuration(oldest.age_secs) : '—' }),
        h('div', { class: 'sub' }, oldest
          ? h('a', { href: `/jobs/${oldest.job}`, text: `job ${shortId(oldest.job)} #${oldest.index}` })
          : 'nothing waits')),
    );
    chart.replaceChildren(barChart(o.per_minute), h('div', { class: 'legend' },
      h('span', {}, h('i', { class: 'ok' }), 'succeeded'), h('span', {}, h('i', { class: 'bad' }), 'failed'),
      h('span', { text: `${o.last_hour.succeeded} images in the last hour` })));
    models.replaceChildren(o.models.length
      ? h('table', {},
        h('thead', {}, h('tr', {}, h('th', { text: 'Model' }), h('th', { class: 'num', text: 'Pending' }),
          h('th', { class: 'num', text: 'Queued' }), h('th', { class: 'num', text: 'Running' }))),
        h('tbody', {}, o.models.map((m) => h('tr', {}, h('td', { class: 'mono', text: m.model }),
          h('td', { class: 'num', text: m.pending }), h('td', { class: 'num', text: m.queued }),
          h('td', { class: 'num', text: m.running })))))
      : h('div', { class: 'panel empty', text: 'The queue is empty.' }));
  };
  const load = async () => render(await api('/api/overview'));
  await load();
  const soon = debounce(() => load().catch(console.error), 1000);
  follow('', { changed: soon, lagged: soon });
  setInterval(() => load().catch(console.error), 5000);
}

/** 60 stacked bars (succeeded, failed) of images per minute. */
function barChart(points) {
  const W = 900, H = 200, L = 34, B = 20, T = 8;
  const max = Math.max(1, ...points.map((p) => p.succeeded + p.failed));
  const step = (W - L) / points.length;
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const svg = h('svg', { viewBox: `0 0 ${W} ${H}`, 'data-testid': 'rate-chart', role: 'img', 'aria-label': 'images per minute' });
  svg.append(h('line', { class: 'axis', x1: L, y1: H - B, x2: W, y2: H - B }));
  for (const v of [0, max / 2, max]) {
    svg.append(h('text', { x: L - 6, y: y(v) + 3, 'text-anchor': 'end', text: Number.isInteger(v) ? v : v.toFixed(1) }));
    svg.append(h('line', { class: 'axis', x1: L, y1: y(v), x2: W, y2: y(v), 'stroke-dasharray': '2 4' }));
  }
  points.forEach((p, i) => {
    const x = L + i * step + 1;
    const w = Math.max(step - 2, 1);
    const time = new Date(p.t).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    const g = h('g', {}, h('title', { text: `${time}: ${p.succeeded} succeeded, ${p.failed} failed` }));
    if (p.succeeded) g.append(h('rect', { class: 'bar-ok', x, width: w, y: y(p.succeeded), height: y(0) - y(p.succeeded) }));
    if (p.failed) g.append(h('rect', { class: 'bar-bad', x, width: w, y: y(p.succeeded + p.failed), height: y(0) - y(p.failed) }));
    svg.append(g);
    if (i % 10 === 0 || i === points.length - 1) {
      svg.append(h('text', { x: x + w / 2, y: H - 5, 'text-anchor': 'middle', text: i === points.length - 1 ? 'now' : `-${points.length - 1 - i}m` }));
    }
  });
  return svg;
}

async function jobsPage(main) {
  const params = new URLSearchParams(location.search);
  const state = { status: params.get('status') || '', cursors: [''], jobs: [], next: null };
  const partial = new Map(); // job id -> Map(task index -> fraction of steps done)
  const filter = h('select', { 'data-testid': 'status-filter', 'aria-label': 'status' },
    ['', 'pending', 'running', 'succeeded', 'failed', 'cancelled'].map((s) =>
      h('option', { value: s, text: s || 'all statuses', selected: s === state.status })));
  const body = h('tbody');
  const prev = h('button', { text: '← Newer', 'data-testid': 'prev' });
  const next = h('button', { text: 'Older →', 'data-testid': 'next' });
  const count = h('span', { class: 'muted' });
  main.replaceChildren(
    h('h1', { text: 'Jobs' }),
    h('div', { class: 'toolbar' }, filter, count),
    h('table', { 'data-testid': 'jobs' },
      h('thead', {}, h('tr', {}, ['Job', 'Status', 'Progress', 'Owner', 'Model', 'Size', 'Created', 'Finished']
        .map((t) => h('th', { text: t })))),
      body),
    h('div', { class: 'pager' }, prev, next));

  const row = (j) => h('tr', { 'data-job': j.id },
    h('td', {}, h('a', { class: 'mono', href: `/jobs/${j.id}`, text: shortId(j.id), title: j.prompt || '' })),
    h('td', {}, badge(j.status)),
    h('td', { class: 'bar-cell' }, jobBar(j, partial.get(j.id))),
    h('td', { text: j.tenant }),
    h('td', { class: 'mono', text: j.model }),
    h('td', { text: `${j.width}×${j.height} · ${j.tasks_total} img · ${j.steps} steps` }),
    h('td', { text: fmtTime(j.created_at) }),
    h('td', { text: fmtTime(j.finished_at) }));
  const render = () => {
    body.replaceChildren(...(state.jobs.length ? state.jobs.map(row)
      : [h('tr', {}, h('td', { class: 'empty', colspan: 8, text: 'No jobs.' }))]));
    prev.disabled = state.cursors.length <= 1;
    next.disabled = !state.next;
    count.textContent = `page ${state.cursors.length}`;
  };
  const load = async () => {
    const q = new URLSearchParams({ limit: '25' });
    if (state.status) q.set('status', state.status);
    const after = state.cursors[state.cursors.length - 1];
    if (after) q.set('after', after);
    const data = await api('/api/jobs?' + q);
    state.jobs = data.jobs;
    state.next = data.next;
    for (const j of state.jobs) if (TERMINAL.has(j.status)) partial.delete(j.id);
    render();
  };
  filter.addEventListener('change', () => {
    state.status = filter.value;
    state.cursors = [''];
    const u = new URL(location.href);
    if (state.status) u.searchParams.set('status', state.status); else u.searchParams.delete('status');
    history.replaceState(null, '', u);
    load().catch(console.error);
  });
  next.addEventListener('click', () => { if (state.next) { state.cursors.push(state.next); load().catch(console.error); } });
  prev.addEventListener('click', () => { if (state.cursors.length > 1) { state.cursors.pop(); load().catch(console.error); } });
  await load();
  const soon = debounce(() => load().catch(console.error), 400);
  follow('', {
    progress: (p) => {
      if (!partial.has(p.job)) partial.set(p.job, new Map());
      partial.get(p.job).set(p.index, p.step / Math.max(p.total_steps, 1));
      const j = state.jobs.find((x) => x.id === p.job);
      const cell = body.querySelector(`tr[data-job="${p.job}"] .bar-cell`);
      if (j && cell) cell.replaceChildren(jobBar(j, partial.get(p.job)));
      // A job submitted since the last load shows up on the first page.
      if (!j && state.cursors.length === 1) soon();
    },
    changed: (c) => {
      const m = partial.get(c.job);
      if (m) m.delete(c.index);
      soon();
    },
    lagged: soon,
  });
  setInterval(() => load().catch(console.error), 10000);
}

async function jobPage(main, id) {
  const partial = new Map(); // task index -> {step, total}
  let job = await api(`/api/jobs/${encodeURIComponent(id)}`);
  const head = h('div', { class: 'jobhead' });
  const barBox = h('div', { style: null });
  const params = h('dl', { class: 'kv' });
  const grid = h('div', { class: 'grid', 'data-testid': 'grid' });
  const tasks = h('tbody');
  const banner = h('div');
  const cells = new Map();
  main.replaceChildren(
    banner, head, h('div', { class: 'panel', style: null }, barBox),
    h('div', { class: 'two' },
      h('div', {}, h('h2', { text: 'Parameters' }), h('div', { class: 'panel' }, params)),
      h('div', {}, h('h2', { text: 'Images' }), grid)),
    h('h2', { text: 'Tasks' }),
    h('table', { 'data-testid': 'tasks' },
      h('thead', {}, h('tr', {}, ['#', 'Prompt', 'Seed', 'Status', 'Attempts', 'Worker', 'Progress', 'Size', 'Error']
        .map((t) => h('th', { text: t })))),
      tasks));

  const act = async (what) => {
    banner.replaceChildren();
    try {
      job = await api(`/api/jobs/${job.id}/${what}`, { method: 'POST' });
      render();
    } catch (e) {
      if (!(e instanceof Unauthorized)) banner.replaceChildren(h('div', { class: 'banner', text: `${what}: ${e.message}` }));
    }
  };

  const renderHead = () => {
    const cancel = h('button', { class: 'danger', text: 'Cancel', 'data-testid': 'cancel', onclick: () => act('cancel') });
    const retry = h('button', { text: 'Retry failed', 'data-testid': 'retry', onclick: () => act('retry') });
    cancel.disabled = TERMINAL.has(job.status);
    retry.disabled = !job.tasks_failed || job.status === 'cancelled';
    head.replaceChildren(
      h('h1', {}, 'Job ', h('span', { class: 'mono', text: job.id })),
      h('span', { 'data-testid': 'job-status' }, badge(job.status)),
      h('div', { class: 'actions' }, retry, cancel));
    const parts = new Map([...partial].map(([i, p]) => [i, p.step / Math.max(p.total, 1)]));
    barBox.replaceChildren(jobBar(job, parts, true));
  };

  const renderParams = () => {
    const s = job.spec || {};
    const rows = [
      ['Owner', job.tenant], ['Model', s.model], ['Mode', s.mode], ['Size', `${s.width}×${s.height}`],
      ['Steps', s.steps], ['Scheduler', s.scheduler], ['Guidance', s.guidance_scale],
      ['Prompts', (s.prompts || []).length], ['Seeds', (s.seeds || []).length],
      ['Negative prompt', s.negative_prompt || '—'], ['Priority', s.priority], ['Max attempts', s.max_attempts],
      ['Created', fmtTime(job.created_at)], ['Finished', fmtTime(job.finished_at)],
    ];
    if (s.webhook_url) {
      const w = (job.webhooks || [])[0];
      rows.push(['Webhook', s.webhook_url]);
      rows.push(['Delivery', w ? `${w.status} after ${w.attempts} attempt(s)` + (w.last_error ? ` — ${w.last_error}` : '') : 'when the job ends']);
    }
    for (const [k, v] of Object.entries(s)) {
      if (['strength', 'vae', 'init_image', 'mask'].includes(k) && v !== null && v !== undefined && s.mode !== 'txt2img') rows.push([k, v]);
    }
    params.replaceChildren(...rows.flatMap(([k, v]) => [h('dt', { text: k }), h('dd', { text: v === undefined || v === null ? '—' : v })]));
    if ((s.prompts || []).length) {
      params.append(h('dt', { text: 'Prompt' }), h('dd', { text: s.prompts.length > 1 ? `${s.prompts[0]} (+${s.prompts.length - 1} more)` : s.prompts[0] }));
    }
  };

  const renderCell = (t, cell) => {
    const p = partial.get(t.index);
    const key = `${t.status}|${t.attempts}|${p ? p.step : ''}`;
    if (cell.dataset.key === key) return;
    cell.dataset.key = key;
    cell.dataset.status = t.status;
    cell.className = `cell ${t.status}`;
    const label = h('span', { class: 'idx', text: `#${t.index}` });
    if (t.status === 'succeeded') {
      const src = `/api/jobs/${job.id}/tasks/${t.index}/image`;
      cell.replaceChildren(h('a', { href: src, target: '_blank', rel: 'noopener', title: `${t.prompt}\nseed ${t.seed}` },
        h('img', { class: 'thumb', src, alt: `task ${t.index}`, loading: 'lazy', 'data-index': t.index })), label);
    } else {
      const kids = [label, h('span', { class: 'state', text: t.status + (p ? ` ${p.step}/${p.total}` : '') })];
      if (p && t.status === 'running') {
        const bar = h('div', { class: 'bar' });
        const s = h('span', { class: 'part' });
        s.style.width = `${(100 * p.step / Math.max(p.total, 1)).toFixed(1)}%`;
        bar.append(s);
        kids.push(bar);
      }
      cell.replaceChildren(...kids);
    }
  };

  const renderGrid = () => {
    const seeds = (job.spec && job.spec.seeds && job.spec.seeds.length) || 1;
    const cols = Math.min(seeds, 8);
    grid.style.gridTemplateColumns = seeds <= 8 ? `repeat(${cols}, minmax(60px, 160px))` : 'repeat(auto-fill, minmax(96px, 1fr))';
    for (const t of job.tasks) {
      let cell = cells.get(t.index);
      if (!cell) {
        cell = h('div', { class: 'cell', 'data-index': t.index });
        cells.set(t.index, cell);
        grid.append(cell);
      }
      renderCell(t, cell);
    }
  };

  const renderTasks = () => {
    tasks.replaceChildren(...job.tasks.map((t) => {
      const p = partial.get(t.index);
      let progress = '—';
      if (t.status === 'running' && p) {
        progress = `step ${p.step}/${p.total}` + (p.rate ? ` · ${p.rate.toFixed(2)} s/step` : '');
      } else if (t.started_at && t.finished_at) {
        progress = fmtDuration((new Date(t.finished_at) - new Date(t.started_at)) / 1000);
      }
      return h('tr', { 'data-index': t.index },
        h('td', { class: 'num', text: t.index }),
        h('td', { class: 'prompt', text: t.prompt, title: t.prompt }),
        h('td', { class: 'mono', text: t.seed }),
        h('td', {}, badge(t.status)),
        h('td', { class: 'num', text: t.attempts }),
        h('td', { class: 'mono', text: t.worker || '—' }),
        h('td', { class: 'progress-cell', text: progress }),
        h('td', { text: fmtBytes(t.size_bytes) }),
        h('td', { class: 'error', text: t.error || '' }));
    }));
  };

  const render = () => {
    for (const t of job.tasks) if (t.status !== 'running') partial.delete(t.index);
    document.title = `farm · job ${shortId(job.id)} · ${job.status}`;
    renderHead();
    renderParams();
    renderGrid();
    renderTasks();
  };
  render();

  const load = async () => {
    job = await api(`/api/jobs/${job.id}`);
    render();
  };
  const soon = debounce(() => load().catch(console.error), 250);
  const paint = debounce(() => { renderHead(); renderGrid(); renderTasks(); }, 100);
  follow(`?job=${encodeURIComponent(job.id)}`, {
    progress: (p) => {
      // A report that was in flight when the task ended says nothing new.
      const known = job.tasks.find((x) => x.index === p.index);
      if (known && TERMINAL.has(known.status)) return;
      const now = performance.now();
      const old = partial.get(p.index);
      let rate = old && old.rate;
      if (old && p.step > old.step) {
        const r = (now - old.at) / 1000 / (p.step - old.step);
        rate = rate ? 0.7 * rate + 0.3 * r : r;
      }
      partial.set(p.index, { step: p.step, total: p.total_steps, at: now, rate });
      const t = job.tasks.find((x) => x.index === p.index);
      if (t && t.status !== 'running' && !TERMINAL.has(t.status)) { t.status = 'running'; t.worker = p.worker; }
      paint();
    },
    changed: soon,
    lagged: soon,
  });
  setInterval(() => { if (!TERMINAL.has(job.status) || !job.finished_at) load().catch(console.error); }, 3000);
}

async function workersPage(main) {
  const body = h('tbody');
  const live = new Map(); // worker -> Map(job:index -> {step, total, at, rate, job, index})
  main.replaceChildren(h('h1', { text: 'Workers' }),
    h('table', { 'data-testid': 'workers' },
      h('thead', {}, h('tr', {}, ['Worker', 'Status', 'Device', 'Loaded models', 'Current task', 'Last heartbeat', 'Slots', 'Batch', 'Done', 'Failures']
        .map((t) => h('th', { text: t })))),
      body));
  let workers = [];
  let admin = false;
  const current = (w) => {
    const fromServer = (w.current || []).map((c) => ({ ...c, total: c.total_steps, rate: c.secs_per_step }));
    const mine = live.get(w.id);
    // Progress comes every step or 250 ms while a task runs; older means it ended.
    const fresh = (c) => performance.now() - c.at < Math.max(5000, 3000 * (c.rate || 0));
    const list = mine && mine.size ? [...mine.values()].filter(fresh)
      : fromServer.filter((c) => c.age_secs < Math.max(5, 3 * (c.rate || 0)));
    if (!list.length) return w.running ? h('span', { class: 'muted', text: `${w.running} task(s)` }) : h('span', { class: 'muted', text: 'idle' });
    return h('div', {}, list.map((c) => {
      const bar = h('div', { class: 'bar' });
      const s = h('span', { class: 'part' });
      s.style.width = `${(100 * c.step / Math.max(c.total, 1)).toFixed(1)}%`;
      bar.append(s);
      const name = c.job ? h('a', { class: 'mono', href: `/jobs/${c.job}`, text: `${shortId(c.job)} #${c.index}` }) : h('span', { class: 'mono', text: `#${c.index}` });
      return h('div', { class: 'progress' }, name, bar,
        h('span', { class: 'txt', text: `${c.step}/${c.total}` + (c.rate ? ` · ${c.rate.toFixed(2)} s/step` : '') }));
    }));
  };
  const render = () => {
    body.replaceChildren(...(workers.length ? workers.map((w) => h('tr', { 'data-worker': w.id },
      h('td', {}, h('div', { class: 'mono', text: w.id }), h('div', { class: 'muted', text: w.hostname })),
      h('td', {}, badge(w.online ? (w.draining ? 'draining' : 'online') : 'offline')),
      h('td', { class: 'mono', text: w.device }),
      h('td', { class: 'mono', text: (w.models || []).join(', ') || '—',
        title: `can load: ${(w.available || []).join(', ')}\nloads: ${w.model_loads}, evictions: ${w.model_evictions}` +
          `\ncache: ${(w.cache_used_bytes / 2 ** 20).toFixed(0)} MiB of ${w.cache_capacity_bytes ? (w.cache_capacity_bytes / 2 ** 20).toFixed(0) + ' MiB' : 'no limit'}` }),
      h('td', { class: 'current' }, current(w)),
      h('td', { text: fmtAge(w.last_seen_secs) }),
      h('td', { class: 'num', text: `${w.running}/${w.concurrency}` }),
      h('td', { class: 'num', text: w.max_batch, title: `${w.batches} render calls for ${w.tasks_done} tasks` }),
      h('td', { class: 'num', text: w.tasks_done }),
      h('td', { class: 'num', text: w.tasks_failed })))
      : [h('tr', {}, h('td', { class: 'empty', colspan: 10, text: 'No worker has sent a heartbeat yet.' }))]));
  };
  const load = async () => {
    const data = await api('/api/workers');
    workers = data.workers;
    admin = data.admin;
    render();
  };
  await load();
  const paint = debounce(render, 150);
  follow('', {
    progress: (p) => {
      if (!live.has(p.worker)) live.set(p.worker, new Map());
      const key = `${p.job}:${p.index}`;
      for (const [w, m] of live) if (w !== p.worker) m.delete(key);
      const m = live.get(p.worker);
      const old = m.get(key);
      const now = performance.now();
      let rate = old && old.rate;
      if (old && p.step > old.step) {
        const r = (now - old.at) / 1000 / (p.step - old.step);
        rate = rate ? 0.7 * rate + 0.3 * r : r;
      }
      m.set(key, { job: admin ? p.job : null, index: p.index, step: p.step, total: p.total_steps, at: now, rate });
      paint();
    },
    changed: (c) => { for (const m of live.values()) m.delete(`${c.job}:${c.index}`); paint(); },
  });
  setInterval(() => load().catch(console.error), 3000);
}

function loginPage(main) {
  const input = h('input', { type: 'password', name: 'token', placeholder: 'farm_…', autocomplete: 'current-password', required: true, 'data-testid': 'token' });
  const err = h('div', { class: 'err', 'data-testid': 'login-error' });
  const form = h('form', {},
    h('label', { text: 'API token' }), input,
    h('button', { class: 'primary', type: 'submit', text: 'Log in', 'data-testid': 'login' }), err,
    h('p', { class: 'muted', text: 'Use a token from `farm token create --tenant NAME` (or ./farm-data/token after `farm dev`). It is kept in an HttpOnly cookie.' }));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    err.textContent = '';
    try {
      await api('/api/login', { method: 'POST', body: { token: input.value }, noRedirect: true });
      const next = new URLSearchParams(location.search).get('next') || '/';
      location.href = next.startsWith('/') && !next.startsWith('//') ? next : '/';
    } catch (e2) {
      err.textContent = e2.message;
    }
  });
  main.replaceChildren(h('div', { class: 'login panel' }, h('h1', { text: 'Log in to the farm' }), form));
  input.focus();
}

// ---------- router ----------

async function start() {
  const main = $('#main');
  const path = location.pathname.replace(/\/+$/, '') || '/';
  if (path === '/login') return loginPage(main);
  let me;
  try {
    me = await api('/api/me');
  } catch (e) {
    if (!(e instanceof Unauthorized)) main.replaceChildren(h('div', { class: 'banner', text: e.message }));
    return;
  }
  $('#nav').hidden = false;
  $('#who').textContent = `${me.tenant}${me.admin ? ' (admin)' : ''}`;
  const logout = $('#logout');
  logout.hidden = false;
  logout.addEventListener('click', async () => {
    await api('/api/logout', { method: 'POST', noRedirect: true }).catch(() => {});
    location.href = '/login';
  });
  const section = path === '/' ? 'overview' : path.split('/')[1];
  for (const a of document.querySelectorAll('[data-nav]')) a.classList.toggle('active', a.dataset.nav === section);
  try {
    if (path === '/') await overviewPage(main);
    else if (path === '/jobs') await jobsPage(main);
    else if (path.startsWith('/jobs/')) await jobPage(main, decodeURIComponent(path.slice('/jobs/'.length)));
    else if (path === '/workers') await workersPage(main);
    else main.replaceChildren(h('div', { class: 'empty', text: 'Not found.' }));
  } catch (e) {
    if (!(e instanceof Unauthorized)) main.replaceChildren(h('div', { class: 'banner', text: e.message }));
  }
}

document.addEventListener('DOMContentLoaded', start);
