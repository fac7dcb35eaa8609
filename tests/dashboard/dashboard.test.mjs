// Drives the coordinator's dashboard in headless Chromium. Run by tests/dashboard.rs, which
// starts the farm and passes: FARM_URL (the dashboard), FARM_ADMIN_TOKEN, FARM_TENANT_TOKEN,
// FARM_BIN (the farm binary, with FARM_COORDINATOR etc. for `farm submit`), FARM_CHROMIUM and
// FARM_SCREENSHOT_DIR.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const URL_ = env('FARM_URL');
const ADMIN = env('FARM_ADMIN_TOKEN');
const TENANT = env('FARM_TENANT_TOKEN');
const SHOTS = env('FARM_SCREENSHOT_DIR');
const log = (...a) => console.log(new Date().toISOString().slice(11, 23), ...a);

function submit(token, ...args) {
  return execFileSync(env('FARM_BIN'), ['submit', ...args], {
    encoding: 'utf8',
    env: { ...process.env, FARM_TOKEN: token },
  }).trim();
}

const profile = mkdtempSync(join(tmpdir(), 'farm-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.FARM_CHROMIUM || '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1360, height: 900 },
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
context.setDefaultTimeout(30_000);
const page = context.pages()[0] || (await context.newPage());
const problems = [];
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('console', (m) => { if (m.type() === 'error' && !/401|Unauthorized/.test(m.text())) problems.push(`console: ${m.text()}`); });

try {
  // --- Login: the dashboard sends a stranger to the login form; a bad token is refused.
  await page.goto(URL_ + '/jobs');
  await page.waitForURL(/\/login\?next=%2Fjobs/);
  await page.fill('[data-testid=token]', 'farm_wrong');
  await page.click('[data-testid=login]');
  await page.waitForFunction(() => document.querySelector('[data-testid=login-error]').textContent.length > 0);
  log('bad token refused:', await page.textContent('[data-testid=login-error]'));
  await page.fill('[data-testid=token]', ADMIN);
  await page.click('[data-testid=login]');
  await page.waitForURL(URL_ + '/jobs');
  const cookie = (await context.cookies()).find((c) => c.name === 'farm_token');
  assert.ok(cookie, 'the token cookie is set');
  assert.equal(cookie.httpOnly, true, 'the token cookie is HttpOnly');
  assert.equal(await page.evaluate(() => document.cookie.includes('farm_token')), false);
  log('logged in; cookie HttpOnly');

  // --- A submitted job appears in the jobs table without a reload, and advances to done.
  await page.evaluate(() => { window.__sameDocument = true; });
  const jobA = submit(ADMIN, '--prompt', 'a lighthouse at dusk', '--prompt', 'an avocado armchair',
    '--seeds', '1,2', '--steps', '120', '--width', '64', '--height', '64');
  log('submitted', jobA);
  const row = page.locator(`tr[data-job="${jobA}"]`);
  await row.waitFor();
  assert.equal(await page.evaluate(() => window.__sameDocument), true, 'no reload');
  log('job row appeared live');
  const rowSeen = new Set();
  for (let i = 0; i < 40; i++) {
    rowSeen.add(await row.locator('[data-testid=job-progress]').getAttribute('aria-valuenow'));
    if (rowSeen.size >= 2) break;
    await page.waitForTimeout(100);
  }
  log('jobs table progress values', [...rowSeen]);
  await page.screenshot({ path: join(SHOTS, 'jobs.png'), fullPage: true });

  await row.locator('a').first().click();
  await page.waitForURL(`${URL_}/jobs/${jobA}`);
  await page.evaluate(() => { window.__sameDocument = true; });
  const seen = [];
  const deadline = Date.now() + 120_000;
  let status = '';
  while (Date.now() < deadline) {
    status = await page.getAttribute('[data-testid=job-status] .badge', 'data-status');
    const v = Number(await page.getAttribute('[data-testid=job-progress]', 'aria-valuenow'));
    if (seen[seen.length - 1] !== v) seen.push(v);
    if (status === 'succeeded') break;
    await page.waitForTimeout(100);
  }
  log('job page progress values', seen.join(' → '), 'status', status);
  assert.equal(status, 'succeeded');
  assert.equal(await page.evaluate(() => window.__sameDocument), true, 'the job page updated without a reload');
  assert.ok(seen.some((v) => v > 0 && v < 100), `progress advanced through intermediate values: ${seen}`);
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i] >= seen[i - 1], `progress never goes back: ${seen}`);
  assert.equal(seen[seen.length - 1], 100);

  // --- Thumbnails render (served through the coordinator from storage).
  await page.waitForFunction(() => {
    const imgs = [...document.querySelectorAll('img.thumb')];
    return imgs.length === 4 && imgs.every((i) => i.complete && i.naturalWidth > 0);
  });
  const sizes = await page.$$eval('img.thumb', (imgs) => imgs.map((i) => `${i.naturalWidth}x${i.naturalHeight}`));
  log('thumbnails', sizes.join(' '));
  assert.deepEqual(sizes, ['64x64', '64x64', '64x64', '64x64']);
  const href = await page.getAttribute('[data-testid=grid] a', 'href');
  const full = await page.request.get(URL_ + href);
  assert.equal(full.status(), 200);
  assert.equal(full.headers()['content-type'], 'image/png');
  assert.equal(await page.isDisabled('[data-testid=cancel]'), true, 'a finished job cannot be cancelled');
  await page.screenshot({ path: join(SHOTS, 'job.png'), fullPage: true });

  // --- Cancel a long job from its page.
  const jobB = submit(ADMIN, '--prompt', 'a very slow render', '--seeds', '1,2,3,4,5,6',
    '--steps', '400', '--width', '64', '--height', '64');
  log('submitted', jobB);
  await page.goto(`${URL_}/jobs/${jobB}`);
  await page.waitForSelector('[data-testid=job-status] .badge');
  // Let it start, so the cancel also stops a running task.
  await page.waitForFunction(() => document.querySelector('[data-testid=tasks] .badge[data-status=running]'), null, { timeout: 60_000 });
  await page.click('[data-testid=cancel]');
  await page.waitForSelector('[data-testid=job-status] .badge[data-status=cancelled]');
  await page.waitForFunction(() => {
    const b = [...document.querySelectorAll('[data-testid=tasks] .badge')].map((x) => x.dataset.status);
    return b.length === 6 && b.every((s) => s === 'cancelled' || s === 'succeeded');
  });
  assert.equal(await page.isDisabled('[data-testid=cancel]'), true);
  const cancelled = await (await page.request.get(`${URL_}/api/jobs/${jobB}`)).json();
  assert.equal(cancelled.status, 'cancelled');
  log('cancelled', jobB, `${cancelled.tasks_cancelled} tasks cancelled`);

  // --- Status filter and the overview.
  await page.goto(URL_ + '/jobs?status=cancelled');
  await page.locator(`tr[data-job="${jobB}"]`).waitFor();
  assert.equal(await page.locator(`tr[data-job="${jobA}"]`).count(), 0, 'the filter hides succeeded jobs');
  await page.selectOption('[data-testid=status-filter]', 'succeeded');
  await page.locator(`tr[data-job="${jobA}"]`).waitFor();
  assert.equal(await page.locator(`tr[data-job="${jobB}"]`).count(), 0);
  log('status filter works');

  // A job for the overview's live numbers and the workers page's step progress.
  const jobC = submit(ADMIN, '--prompt', 'a busy farm', '--seeds', '1,2,3', '--steps', '300', '--width', '64', '--height', '64');
  await page.goto(URL_ + '/');
  await page.waitForFunction(() => Number(document.querySelector('[data-testid=workers-online] .value')?.textContent) >= 1);
  await page.waitForFunction(() => Number(document.querySelector('[data-testid=succeeded] .value')?.textContent) >= 4);
  await page.waitForSelector('[data-testid=rate-chart] rect.bar-ok');
  await page.waitForFunction(() => Number(document.querySelector('[data-testid=running] .value')?.textContent) >= 1, null, { timeout: 60_000 });
  log('overview:', (await page.textContent('.cards')).replace(/\s+/g, ' '));
  await page.screenshot({ path: join(SHOTS, 'overview.png'), fullPage: true });

  await page.goto(URL_ + '/workers');
  await page.waitForSelector('[data-testid=workers] tr[data-worker] .badge[data-status=online]');
  await page.waitForFunction(() => /\d+\/\d+ · [\d.]+ s\/step/.test(document.querySelector('[data-testid=workers] td.current')?.textContent || ''), null, { timeout: 60_000 });
  log('workers:', (await page.textContent('[data-testid=workers] tbody')).replace(/\s+/g, ' '));
  await page.screenshot({ path: join(SHOTS, 'workers.png'), fullPage: true });
  await page.request.post(`${URL_}/api/jobs/${jobC}/cancel`, { headers: { 'x-farm-request': '1' } });

  // --- Retry failed: a task of a model that cannot load fails; Retry gives it another attempt.
  const jobD = submit(ADMIN, '--model', 'broken', '--prompt', 'doomed', '--seeds', '7', '--steps', '2', '--max-attempts', '1');
  await page.goto(`${URL_}/jobs/${jobD}`);
  await page.waitForSelector('[data-testid=job-status] .badge[data-status=failed]', { timeout: 60_000 });
  const error = await page.textContent('[data-testid=tasks] td.error');
  assert.ok(error.length > 0, 'the task shows its error');
  assert.equal(await page.isDisabled('[data-testid=retry]'), false);
  await page.click('[data-testid=retry]');
  await page.waitForFunction(() => document.querySelector('[data-testid=tasks] tr[data-index="0"] td:nth-child(5)')?.textContent === '2', null, { timeout: 60_000 });
  await page.waitForSelector('[data-testid=job-status] .badge[data-status=failed]', { timeout: 60_000 });
  log('retry failed: attempt 2 ran; error:', error.slice(0, 100));

  // --- A cross-site style POST (no x-farm-request header) is refused.
  const forged = await page.request.post(`${URL_}/api/jobs/${jobA}/retry`);
  assert.equal(forged.status(), 403);

  // --- Tenants see only their own jobs.
  const other = await fetch(`${URL_}/api/jobs/${jobA}`, { headers: { authorization: `Bearer ${TENANT}` } });
  assert.equal(other.status, 404, 'another tenant cannot see the job');
  const theirs = await (await fetch(`${URL_}/api/jobs`, { headers: { authorization: `Bearer ${TENANT}` } })).json();
  assert.equal(theirs.jobs.length, 0);
  log('tenant isolation holds');

  // --- Log out: back to the login form.
  await page.click('#logout');
  await page.waitForURL(/\/login/);
  const after = await page.request.get(`${URL_}/api/me`);
  assert.equal(after.status(), 401);

  assert.deepEqual(problems, [], 'no errors in the page');
  log('ok; screenshots in', SHOTS);
} catch (e) {
  await page.screenshot({ path: join(SHOTS, 'failure.png'), fullPage: true }).catch(() => {});
  console.error(e);
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
