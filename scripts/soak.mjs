#!/usr/bin/env node
/**
 * Soak: N mixed good and bad requests at concurrency 64 through a real `golem serve` on the tiny
 * test model, with the sidecar SIGKILLed in the middle. Every request must end in success or its
 * documented error code; at the end the daemon must still serve; RSS growth of the gateway and
 * of the (restarted) sidecar after warm-up is reported against a 5% target.
 *
 *   npm run build && node scripts/soak.mjs [--requests 2000] [--concurrency 64] [--config FILE]
 *                                          [--strict-rss] [--only KIND,KIND]
 *
 * Without --config it builds the tiny test models (inference_py/tests/tiny_models.py) and serves
 * those. Prints one JSON report on stdout; exits 0 when every request got a documented answer,
 * the sidecar came back and the daemon served and stopped cleanly, 1 otherwise. RSS growth over
 * the target is a warning, and a failure only with --strict-rss: a V8 heap still sizing itself
 * moves a small process's RSS by several percent. RSS is read from /proc, so Linux only.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);
if (!existsSync(path.join(ROOT, 'dist', 'cli', 'main.js'))) {
  process.stderr.write('soak: dist/ is missing; run `npm run build` first\n');
  process.exit(2);
}
const grpc = require('@grpc/grpc-js');
const { ExamServiceClient, TakeExamRequest } = require(path.join(ROOT, 'dist/gen/golem/exam/v1/exam.js'));
const { parseErrorDetails } = require(path.join(ROOT, 'dist/gateway/errors.js'));

const RSS_TARGET = 0.05;
const CALL_DEADLINE_MS = 120000;
const PROMPTS = [
  'Instruction: Which genre is the hobbit?\nResponse:',
  'Instruction: Which genre is Dune?\nResponse:',
  'Instruction: Which genre is Dracula?\nResponse:',
];

const { values: args } = parseArgs({
  options: {
    requests: { type: 'string', default: '2000' },
    concurrency: { type: 'string', default: '64' },
    config: { type: 'string' },
    'strict-rss': { type: 'boolean', default: false },
    // Only these kinds (comma-separated names from KINDS), to find which one makes RSS grow.
    only: { type: 'string' },
  },
});
const REQUESTS = Number(args.requests);
const CONCURRENCY = Number(args.concurrency);
if (!Number.isInteger(REQUESTS) || REQUESTS < 20 || !Number.isInteger(CONCURRENCY) || CONCURRENCY < 1) {
  process.stderr.write('soak: --requests must be an integer >= 20 and --concurrency >= 1\n');
  process.exit(2);
}

/**
 * The request mix: what each kind sends and the code it must get. Kinds that reach the sidecar
 * may also get UNAVAILABLE SIDECAR_UNAVAILABLE, but only while it is down.
 */
const KINDS = [
  { name: 'good', weight: 6, sidecar: true, code: 'OK', request: () => ({ prompt: pick(PROMPTS), maxNewTokens: 1 + random(4) }) },
  { name: 'good, bare base', weight: 2, sidecar: true, code: 'OK', request: () => ({ maxNewTokens: 2, disableAdapter: true }) },
  { name: 'good, graded', weight: 2, sidecar: true, code: 'OK', request: () => ({ maxNewTokens: 3, expectedAnswer: 'Fantasy' }) },
  { name: 'maxNewTokens 0', weight: 1, sidecar: true, code: 'INVALID_ARGUMENT', request: () => ({ maxNewTokens: 0 }) },
  { name: 'blank prompt', weight: 1, sidecar: true, code: 'INVALID_ARGUMENT', request: () => ({ prompt: ' \n' }) },
  { name: 'device tpu', weight: 1, sidecar: true, code: 'INVALID_ARGUMENT', request: () => ({ device: 'tpu' }) },
  { name: 'device cuda:7', weight: 1, sidecar: true, code: 'FAILED_PRECONDITION', request: () => ({ device: 'cuda:7' }) },
  { name: 'good, 4-bit on CPU', weight: 1, sidecar: true, code: 'OK', request: () => ({ maxNewTokens: 2, quantization: { loadIn4bit: true, bnb4bitQuantType: 'nf4' } }) },
  { name: 'unknown 4-bit type', weight: 1, sidecar: true, code: 'INVALID_ARGUMENT', request: () => ({ quantization: { loadIn4bit: true, bnb4bitQuantType: 'nf8' } }) },
  { name: 'missing adapter', weight: 1, sidecar: true, code: 'NOT_FOUND', request: () => ({ adapterPath: '/no/such/adapter' }) },
  { name: 'missing model', weight: 1, sidecar: true, code: 'NOT_FOUND', request: () => ({ modelName: 'no-such-org/no-such-model' }) },
  { name: 'prompt over context', weight: 1, sidecar: true, code: 'INVALID_ARGUMENT', request: () => ({ prompt: 'genre '.repeat(2200) }) },
  { name: 'message over 1 MiB', weight: 1, sidecar: false, code: 'RESOURCE_EXHAUSTED', request: () => ({ prompt: 'x'.repeat((1 << 20) + 10) }) },
  // An idle sidecar may beat a 20 ms deadline; a busy one never does.
  { name: 'deadline 20 ms', weight: 1, sidecar: true, code: 'DEADLINE_EXCEEDED', alsoOk: true, deadlineMs: 20, request: () => ({ maxNewTokens: 4 }) },
  { name: 'bytes that do not parse', weight: 1, sidecar: true, code: 'INVALID_ARGUMENT', raw: ['/golem.exam.v1.ExamService/TakeExam', Buffer.from([0x0a, 0x80, 0x80, 0x80, 0x80, 0x01, 0x61])] },
  { name: 'unknown method', weight: 1, sidecar: false, code: 'UNIMPLEMENTED', raw: ['/golem.exam.v1.ExamService/Nope', Buffer.alloc(0)] },
];
const ONLY = args.only?.split(',');
const WEIGHTED = KINDS.filter((kind) => !ONLY || ONLY.includes(kind.name)).flatMap((kind) => Array(kind.weight).fill(kind));
if (WEIGHTED.length === 0) {
  process.stderr.write(`soak: --only matches no kind; kinds: ${KINDS.map((kind) => kind.name).join(', ')}\n`);
  process.exit(2);
}

function random(n) {
  return Math.floor(Math.random() * n);
}
function pick(list) {
  return list[random(list.length)];
}
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The config to serve: --config, or the embedded one pointed at freshly built tiny models. */
function soakConfig(dir) {
  const base = JSON.parse(readFileSync(args.config ?? path.join(ROOT, 'config', 'golem.json'), 'utf8'));
  let defaults = base.defaults;
  if (!args.config) {
    process.stderr.write('soak: building the tiny test models\n');
    const built = JSON.parse(
      execFileSync(path.join(ROOT, '.venv', 'bin', 'python'), [path.join(ROOT, 'inference_py', 'tests', 'tiny_models.py'), path.join(dir, 'tiny')], {
        env: { ...process.env, HF_HUB_OFFLINE: '1' },
        stdio: ['ignore', 'pipe', 'inherit'],
      }).toString(),
    );
    defaults = { ...defaults, modelName: built.model, adapterPath: built.adapter, device: 'cpu', maxNewTokens: 4, quantization: 'auto' };
  }
  // Info level: the soak follows "gateway ready" and "sidecar ready" (with the pid) in the log.
  return {
    ...base,
    listen: '127.0.0.1:0',
    logLevel: 'info',
    sidecar: { ...base.sidecar, address: '', restartBackoffMs: 200 },
    defaults,
  };
}

/** `golem serve` as a child process, with what its log says about the sidecar. */
function startDaemon(configFile) {
  const child = spawn(process.execPath, [path.join(ROOT, 'bin', 'golem.js'), 'serve', '--config', configFile], {
    cwd: ROOT,
    env: { ...process.env, HF_HUB_OFFLINE: '1' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const daemon = { child, address: undefined, sidecarPids: [], exited: new Promise((resolve) => child.once('exit', resolve)) };
  let buffered = '';
  child.stderr.on('data', (chunk) => {
    buffered += chunk.toString();
    const lines = buffered.split('\n');
    buffered = lines.pop();
    for (const text of lines) {
      let line;
      try {
        line = JSON.parse(text);
      } catch {
        continue; // not one of the JSON log lines (a Python warning, say)
      }
      if (line.message === 'gateway ready') daemon.address = line.address;
      if (line.message === 'sidecar ready') daemon.sidecarPids.push(line.pid);
    }
  });
  return daemon;
}

function rssBytes(pid) {
  const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(match[1]) * 1024;
}

function send(client, kind) {
  return new Promise((resolve) => {
    const done = (error) =>
      resolve({ code: error ? grpc.status[error.code] : 'OK', reason: error ? parseErrorDetails(error.metadata).reason : undefined });
    const deadline = Date.now() + (kind.deadlineMs ?? CALL_DEADLINE_MS);
    if (kind.raw) {
      const [method, bytes] = kind.raw;
      client.makeUnaryRequest(method, (b) => b, (b) => b, bytes, new grpc.Metadata(), { deadline }, done);
      return;
    }
    const request = TakeExamRequest.fromPartial(kind.request());
    client.takeExam(request, new grpc.Metadata(), { deadline }, done);
  });
}

/** Sends `count` requests from the mix, `CONCURRENCY` at a time; `onIssued(i)` before each. */
async function load(client, count, tally, onIssued = () => undefined) {
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const i = next++;
      await onIssued(i);
      const kind = pick(WEIGHTED);
      const outcome = await send(client, kind);
      tally(kind, outcome);
    }
  };
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));
}

function healthServing(address) {
  const { service } = require('grpc-health-check');
  const Health = grpc.makeClientConstructor(service, 'grpc.health.v1.Health');
  const client = new Health(address, grpc.credentials.createInsecure());
  return new Promise((resolve) => {
    client.Check({ service: '' }, { deadline: Date.now() + 2000 }, (error, response) => {
      client.close();
      resolve(!error && response.status === 'SERVING');
    });
  });
}

async function main() {
  const started = Date.now();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'golem-soak-'));
  const configFile = path.join(dir, 'golem.json');
  writeFileSync(configFile, JSON.stringify(soakConfig(dir)));
  const daemon = startDaemon(configFile);
  const report = { requests: REQUESTS, concurrency: CONCURRENCY, outcomes: {}, undocumented: [], checks: {} };
  let sidecarDown = false;
  const tally = (kind, outcome) => {
    const key = outcome.reason ? `${outcome.code} ${outcome.reason}` : outcome.code;
    const counts = (report.outcomes[kind.name] ??= {});
    counts[key] = (counts[key] ?? 0) + 1;
    const expected = outcome.code === kind.code || (kind.alsoOk && outcome.code === 'OK');
    // Lost with the sidecar, or refused while it restarts: the documented retry-later answer.
    const lost = kind.sidecar && sidecarDown && outcome.code === 'UNAVAILABLE' && outcome.reason === 'SIDECAR_UNAVAILABLE';
    if (!expected && !lost && report.undocumented.length < 20) report.undocumented.push({ kind: kind.name, ...outcome });
    if (!expected && !lost) report.undocumentedCount = (report.undocumentedCount ?? 0) + 1;
  };
  try {
    const deadline = Date.now() + 600000;
    while (!daemon.address) {
      if (daemon.child.exitCode !== null || Date.now() > deadline) throw new Error('golem serve did not become ready');
      await sleep(200);
    }
    const client = new ExamServiceClient(daemon.address, grpc.credentials.createInsecure(), {
      'grpc.max_send_message_length': -1,
    });
    const gatewayPid = daemon.child.pid;
    // Warm-up: V8's heap and the sidecar's allocator grow for a while before they settle.
    const warmUp = Math.floor(REQUESTS / 5);
    const underKill = Math.floor((REQUESTS - 2 * warmUp) / 2);
    const rest = REQUESTS - 2 * warmUp - underKill;

    await load(client, warmUp, tally);

    const firstSidecar = daemon.sidecarPids[0];
    await load(client, underKill, tally, (i) => {
      if (i !== Math.floor(underKill / 2)) return;
      sidecarDown = true;
      process.kill(firstSidecar, 'SIGKILL');
    });
    const restartDeadline = Date.now() + 300000;
    while (daemon.sidecarPids.length < 2 || !(await healthServing(daemon.address))) {
      if (Date.now() > restartDeadline) throw new Error('the sidecar did not come back after SIGKILL');
      await sleep(200);
    }
    sidecarDown = false;
    const secondSidecar = daemon.sidecarPids[daemon.sidecarPids.length - 1];
    report.checks.sidecarRestarted = secondSidecar !== firstSidecar;

    // Both baselines after the restarted sidecar's warm-up: the gateway has served 3/5 by then.
    await load(client, warmUp, tally);
    await sleep(500);
    const gatewayWarm = rssBytes(gatewayPid);
    const sidecarWarm = rssBytes(secondSidecar);
    // RSS every tenth of the last phase, to tell a leak (a steady climb) from a heap settling.
    const tenth = Math.max(1, Math.floor(rest / 10));
    const samples = [];
    await load(client, rest, tally, (i) => {
      if (i % tenth === 0) samples.push([+(rssBytes(gatewayPid) / 2 ** 20).toFixed(1), +(rssBytes(secondSidecar) / 2 ** 20).toFixed(1)]);
    });
    await sleep(500);
    const gatewayEnd = rssBytes(gatewayPid);
    const sidecarEnd = rssBytes(secondSidecar);

    const last = await send(client, KINDS[0]);
    report.checks.servesAtEnd = last.code === 'OK' && (await healthServing(daemon.address));
    client.close();
    const growth = (from, to) => ({ warmMiB: +(from / 2 ** 20).toFixed(1), endMiB: +(to / 2 ** 20).toFixed(1), growth: +((to - from) / from).toFixed(4) });
    report.rss = {
      target: RSS_TARGET,
      gateway: growth(gatewayWarm, gatewayEnd),
      sidecar: growth(sidecarWarm, sidecarEnd),
      samplesMiB: { gatewayAndSidecar: samples },
    };
    report.checks.rssWithinTarget = report.rss.gateway.growth < RSS_TARGET && report.rss.sidecar.growth < RSS_TARGET;
  } finally {
    daemon.child.kill('SIGTERM');
    report.checks.exitedCleanly = (await daemon.exited) === 0;
    rmSync(dir, { recursive: true, force: true });
  }
  report.checks.allDocumented = !report.undocumentedCount;
  report.seconds = Math.round((Date.now() - started) / 1000);
  const { rssWithinTarget, ...mustPass } = report.checks;
  report.ok = Object.values(mustPass).every(Boolean) && (rssWithinTarget || !args['strict-rss']);
  if (rssWithinTarget === false) {
    process.stderr.write(`soak: warning: RSS grew more than ${RSS_TARGET * 100}% after warm-up: ${JSON.stringify(report.rss)}\n`);
  }
  process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  return report.ok ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`soak: ${err.stack ?? err}\n`);
    process.exit(1);
  },
);
