/**
 * End to end through the built `golem` command, as real processes: one `golem serve` shared by
 * the exam calls (via --address), and one call in the self-starting one-shot mode.
 */
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT } from '../src/config';
import { tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';

const GOLEM = path.join(PACKAGE_ROOT, 'bin', 'golem.js');
const ENV = { ...process.env, HF_HUB_OFFLINE: '1', GOLEM_ADDRESS: '' };

interface Run {
  code: number;
  stdout: string;
  stderr: string;
  json: Record<string, unknown>;
}

/** Runs `golem ARGS` to completion; stdout must be exactly one JSON line. */
function golem(args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    execFile('node', [GOLEM, ...args], { env: ENV, cwd: PACKAGE_ROOT }, (error, stdout, stderr) => {
      const code = error ? Number(error.code) : 0;
      const lines = stdout.split('\n').filter(Boolean);
      expect(lines).toHaveLength(1);
      resolve({ code, stdout, stderr, json: JSON.parse(lines[0]) as Record<string, unknown> });
    });
  });
}

/** Starts `golem serve`; `ready` resolves with its address once it logs that it is ready. */
function serve(configFile: string): { child: ChildProcess; ready: Promise<string> } {
  const child = spawn('node', [GOLEM, 'serve', '--config', configFile], {
    env: ENV,
    cwd: PACKAGE_ROOT,
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const ready = new Promise<string>((resolve, reject) => {
    let buffered = '';
    child.stderr?.on('data', (chunk: Buffer) => {
      buffered += chunk.toString();
      const lines = buffered.split('\n');
      buffered = lines.pop() ?? '';
      for (const line of lines) {
        if (!line.includes('"gateway ready"')) continue;
        resolve((JSON.parse(line) as { address: string }).address);
      }
    });
    child.once('exit', (code) => reject(new Error(`golem serve exited early with ${code}`)));
  });
  return { child, ready };
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const server = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

describe('golem CLI end to end', () => {
  let models: TinyModels;
  let dir: string;
  let configFile: string;
  let daemon: ChildProcess;
  let address: string;

  beforeAll(async () => {
    // The command runs from dist/: build it from the sources under test.
    execFileSync(path.join(PACKAGE_ROOT, 'node_modules', '.bin', 'tsc'), ['-p', 'tsconfig.build.json'], {
      cwd: PACKAGE_ROOT,
    });
    models = tinyModels();
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-e2e-'));
    configFile = path.join(dir, 'golem.json');
    // Info level: the test waits for the "gateway ready" line.
    writeFileSync(configFile, JSON.stringify({ ...tinyConfig(models), logLevel: 'info' }));
    const started = serve(configFile);
    daemon = started.child;
    address = await started.ready;
  });

  afterAll(async () => {
    if (daemon && daemon.exitCode === null) {
      const exited = new Promise<number | null>((resolve) => daemon.once('exit', resolve));
      daemon.kill('SIGTERM');
      expect(await exited).toBe(0);
    }
    rmSync(dir, { recursive: true, force: true });
  });

  it('answers a valid exam: success, exit 0, a short answer and the full response', async () => {
    const input = { modelName: models.model, adapterPath: models.adapter, maxNewTokens: 3, expectedAnswer: 'Fantasy' };
    const run = await golem(['exam', JSON.stringify(input), '--address', address]);
    expect(run.code).toBe(0);
    expect(run.json).toMatchObject({ status: 'success', exitCode: 0 });
    expect(typeof run.json.result).toBe('string');
    expect(run.json.detail).toMatchObject({
      answer: run.json.result,
      adapter: { path: models.adapter, peftType: 'LORA' },
      grade: { normalizedExpected: 'fantasy' },
    });
  });

  it('streams the answer on stderr and prints the usual JSON line on stdout with --stream', async () => {
    const input = { adapterPath: models.adapter_b, maxNewTokens: 6 };
    const unary = await golem(['exam', JSON.stringify(input), '--address', address]);
    const run = await golem(['exam', JSON.stringify(input), '--stream', '--address', address]);
    expect(run.code).toBe(0);
    expect(run.json).toMatchObject({ status: 'success', exitCode: 0, result: unary.json.result });
    expect(run.stderr).toContain(String(run.json.result));
  });

  it('loads, lists and unloads a named adapter with golem adapters', async () => {
    const load = await golem(['adapters', 'load', 'cli_b', models.adapter_b, '--address', address]);
    expect(load.code).toBe(0);
    expect(load.json).toMatchObject({ status: 'success', exitCode: 0, detail: { adapter: { name: 'cli_b' } } });
    // Other weights under the taken name: refused, exit 10; the name keeps its weights.
    const taken = await golem(['adapters', 'load', 'cli_b', models.adapter, '--address', address]);
    expect(taken.code).toBe(10);
    expect(taken.json).toMatchObject({
      exitCode: 10,
      detail: { code: 'ALREADY_EXISTS', reason: 'ADAPTER_NAME_TAKEN' },
    });
    const list = await golem(['adapters', 'list', '--address', address]);
    expect(list.code).toBe(0);
    expect(JSON.stringify(list.json.detail)).toContain('"cli_b"');
    const exam = await golem(['exam', '{"adapterName": "cli_b", "maxNewTokens": 2}', '--address', address]);
    expect(exam.code).toBe(0);
    const unload = await golem(['adapters', 'unload', 'cli_b', '--address', address]);
    expect(unload.json).toMatchObject({ status: 'success', exitCode: 0 });
    const again = await golem(['adapters', 'unload', 'cli_b', '--address', address]);
    expect(again.code).toBe(3);
    expect(again.json).toMatchObject({ status: 'failure', exitCode: 3, detail: { code: 'NOT_FOUND' } });
  });

  it('compares adapters: a table on stderr, the JSON line on stdout', async () => {
    const input = {
      prompts: ['Instruction: Which genre is the hobbit?\nResponse:'],
      adapters: [models.adapter_b],
      maxNewTokens: 3,
    };
    const run = await golem(['compare', JSON.stringify(input), '--address', address]);
    expect(run.code).toBe(0);
    expect(run.json).toMatchObject({ status: 'success', exitCode: 0 });
    expect(run.stderr).toMatch(/^model\s+answer\s+tokens\s+logp\|__base__/m);
    expect(run.stderr).toMatch(/^__base__\s/m);
    const bad = await golem(['compare', '{"adapters": []}', '--address', address]);
    expect(bad.code).toBe(2);
    // CompareAdaptersRequest has no `prompt`: the input is its proto3 JSON, nothing else.
    const shorthand = await golem(['compare', '{"prompt": "x", "adapters": ["a"]}', '--address', address]);
    expect(shorthand.code).toBe(2);
    expect(shorthand.json.message).toMatch(/prompt: unknown key/);
  });

  it('fails adapters list with exit 5 when no daemon listens', async () => {
    const nobody = `127.0.0.1:${await freePort()}`;
    const run = await golem(['adapters', 'list', '--address', nobody]);
    expect(run.code).toBe(5);
    expect(run.json.message).toMatch(/no daemon listens/);
  });

  it('fails with exit 3 and an error on stderr when the adapter is missing', async () => {
    const missing = path.join(dir, 'no-such-adapter');
    const run = await golem(['exam', JSON.stringify({ adapterPath: missing }), '--address', address]);
    expect(run.code).toBe(3);
    expect(run.json).toMatchObject({
      status: 'failure',
      exitCode: 3,
      detail: { code: 'NOT_FOUND', reason: 'ADAPTER_NOT_FOUND' },
    });
    expect(run.stderr).toContain('golem: error: NOT_FOUND');
  });

  it('fails with exit 2 naming the field when the daemon refuses a value', async () => {
    const run = await golem(['exam', '{"maxNewTokens": 100000}', '--address', address]);
    expect(run.code).toBe(2);
    expect(run.json).toMatchObject({
      exitCode: 2,
      detail: { code: 'INVALID_ARGUMENT', fieldViolations: [{ field: 'max_new_tokens' }] },
    });
  });

  it('refuses bad JSON with exit 2 before calling anyone', async () => {
    const run = await golem(['exam', '{"prompt": ', '--address', address]);
    expect(run.code).toBe(2);
    expect(run.json).toMatchObject({ status: 'failure', exitCode: 2 });
    expect(run.json.message).toMatch(/not valid JSON/);
    expect(run.stderr).toMatch(/golem: error: .*not valid JSON/);
  });

  it('refuses an unknown key or a wrong type with exit 2, naming the key', async () => {
    const unknown = await golem(['exam', '{"maxTokens": 5}', '--address', address]);
    expect(unknown.code).toBe(2);
    expect(unknown.json.message).toMatch(/maxTokens: unknown key/);
    const wrongType = await golem(['exam', '{"maxNewTokens": "five"}', '--address', address]);
    expect(wrongType.code).toBe(2);
    expect(wrongType.json.message).toMatch(/maxNewTokens: /);
  });

  it('takes the whole uint64 range for seed, as a JSON number', async () => {
    const input = '{"seed": 18446744073709551615, "temperature": 0.7, "maxNewTokens": 2}';
    const run = await golem(['exam', input, '--address', address]);
    expect(run).toMatchObject({ code: 0, json: { status: 'success', exitCode: 0 } });
  });

  it('starts its own daemon for one call when nothing listens at the address', async () => {
    const nobody = `127.0.0.1:${await freePort()}`;
    const run = await golem(['exam', '{"maxNewTokens": 2}', '--address', nobody, '--config', configFile]);
    expect(run.stderr).toContain(`no daemon at ${nobody}; starting one for this call`);
    expect(run.code).toBe(0);
    expect(run.json).toMatchObject({ status: 'success', exitCode: 0 });
    expect(run.stderr).toContain('"sidecar stopped"');
  });

  it('fails with exit 5 when no daemon runs and none can be started', async () => {
    const nobody = `127.0.0.1:${await freePort()}`;
    const broken = path.join(dir, 'broken.json');
    writeFileSync(
      broken,
      JSON.stringify({ ...tinyConfig(models), sidecar: { address: '', python: '/no/python', startTimeoutMs: 1000 } }),
    );
    const run = await golem(['exam', '{}', '--address', nobody, '--config', broken]);
    expect(run.code).toBe(5);
    expect(run.json).toMatchObject({ status: 'failure', exitCode: 5, detail: { code: 'UNAVAILABLE' } });
    expect(run.stderr).toMatch(/golem: error: no daemon is running and none could be started/);
  });
});
