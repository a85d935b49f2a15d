/**
 * golem's processes leave nothing behind and survive what they cannot control: a SIGKILLed
 * gateway takes its sidecar and socket folder with it, a one-shot `golem exam` stopped by SIGTERM
 * cleans up and still prints its line, stderr on a full disk does not stop `golem serve`, and
 * the sidecar is offline unless the config allows hub downloads.
 */
import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT, type GolemConfig } from '../src/config';
import { SidecarProcess } from '../src/sidecar/process';
import {
  buildCli,
  CLI_ENV,
  environmentOf,
  freePort,
  GOLEM,
  isGone,
  serve,
  sidecarPid,
  sidecarSocketDir,
  startGolem,
  stopDaemon,
  type Daemon,
} from './support/daemon';
import { fakeSidecarPython } from './support/fake-sidecar-command';
import { examClient, healthStatus, takeExam } from './support/grpc';
import { captureLogs } from './support/logs';
import { tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';
import { waitFor } from './support/wait';

// The gateway must turn the hub off by itself: the environment it gets does not.
const ONLINE_ENV: NodeJS.ProcessEnv = { ...CLI_ENV };
delete ONLINE_ENV.HF_HUB_OFFLINE;
delete ONLINE_ENV.TRANSFORMERS_OFFLINE;

describe('process hygiene', () => {
  let models: TinyModels;
  let dir: string;
  let daemon: Daemon | undefined;
  // Sidecars a failed test may have left behind, killed in afterEach.
  const strays: number[] = [];

  beforeAll(() => {
    buildCli();
    models = tinyModels();
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-hygiene-'));
  });

  afterEach(async () => {
    if (daemon && daemon.child.exitCode === null && daemon.child.signalCode === null) daemon.child.kill('SIGKILL');
    await daemon?.exited;
    daemon = undefined;
    for (const pid of strays.splice(0)) {
      if (!isGone(pid)) process.kill(pid, 'SIGKILL');
    }
  });

  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  function writeConfig(name: string, edit: (config: GolemConfig) => GolemConfig = (c) => c): string {
    const file = path.join(dir, name);
    // Info level: the tests follow the processes through their log lines.
    writeFileSync(file, JSON.stringify(edit({ ...tinyConfig(models), logLevel: 'info' })));
    return file;
  }

  const logged = (message: string) => () => daemon?.lines.some((line) => line.message === message) ?? false;

  it('SIGKILL of the gateway leaves no sidecar and no socket folder within 5 s', async () => {
    daemon = serve(writeConfig('kill.json'), ONLINE_ENV);
    await daemon.ready;
    const pid = sidecarPid(daemon);
    const socketDir = sidecarSocketDir(daemon);
    strays.push(pid);
    expect(existsSync(socketDir)).toBe(true);
    // Offline by default, though the gateway's own environment did not say so.
    expect(environmentOf(pid)).toMatchObject({ HF_HUB_OFFLINE: '1', TRANSFORMERS_OFFLINE: '1' });

    daemon.child.kill('SIGKILL');
    await daemon.exited;
    const killedAt = Date.now();
    await waitFor(() => isGone(pid) && !existsSync(socketDir), 5000, 'sidecar gone and socket folder removed');
    expect(Date.now() - killedAt).toBeLessThan(5000);
  });

  it('SIGTERM of a one-shot golem exam stops its gateway and sidecar, removes the socket folder, prints CANCELLED, exits 1', async () => {
    // Debug level: the gateway logs "call started" as it forwards the call.
    const config = writeConfig('one-shot.json', (c) => ({
      ...c,
      logLevel: 'debug',
      limits: { ...c.limits, maxNewTokensCap: 1900 },
    }));
    // Nothing listens there: exam starts its own gateway and sidecar.
    const address = `127.0.0.1:${await freePort()}`;
    // Seconds of generation on the tiny model: still running when the signal comes.
    const input = JSON.stringify({ maxNewTokens: 1900, adapterPath: models.adapter_b });
    daemon = startGolem(['exam', input, '--config', config, '--address', address], ONLINE_ENV);
    await daemon.ready;
    const pid = sidecarPid(daemon);
    const socketDir = sidecarSocketDir(daemon);
    strays.push(pid);
    await waitFor(logged('call started'), 10000, 'the call forwarded');

    daemon.child.kill('SIGTERM');
    expect(await daemon.exited).toBe(1);
    const lines = daemon.stdout().split('\n').filter(Boolean);
    expect(lines).toHaveLength(1);
    expect(JSON.parse(lines[0])).toMatchObject({ status: 'failure', exitCode: 1, detail: { code: 'CANCELLED' } });
    await waitFor(() => isGone(pid), 5000, 'sidecar gone');
    expect(existsSync(socketDir)).toBe(false);
  });

  it('golem serve with stderr on a full disk still serves and answers TakeExam', async () => {
    const port = await freePort();
    const config = writeConfig('full-disk.json', (c) => ({ ...c, listen: `127.0.0.1:${port}` }));
    // /dev/full fails every write with ENOSPC: every log line, the gateway's and the sidecar's.
    const full = openSync('/dev/full', 'w');
    const child = spawn('node', [GOLEM, 'serve', '--config', config], {
      env: CLI_ENV,
      cwd: PACKAGE_ROOT,
      stdio: ['ignore', 'ignore', full],
    });
    closeSync(full);
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    daemon = { child, exited, ready: Promise.resolve(''), lines: [], stderr: () => '', stdout: () => '' };
    const address = `127.0.0.1:${port}`;
    await waitFor(
      async () => {
        // A crash on the first failed log write is what this test is about: report it at once.
        if (child.exitCode !== null) throw new Error(`golem serve exited with ${child.exitCode}`);
        return (await healthStatus(address, '').catch(() => '')) === 'SERVING';
      },
      90000,
      'health SERVING',
    );
    const client = examClient(address);
    const { response, error } = await takeExam(client, { maxNewTokens: 2 });
    client.close();
    expect(error).toBeUndefined();
    expect(response?.answerTokens).toBeGreaterThanOrEqual(1);
    expect(await stopDaemon(daemon)).toBe(0);
  });

  it.each([
    [false, '1'],
    [true, undefined],
  ])(
    'allowHubDownloads %s: the sidecar starts with HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE %s',
    async (allow, offline) => {
      const config = tinyConfig(models);
      const fake: GolemConfig = {
        ...config,
        sidecar: { ...config.sidecar, python: fakeSidecarPython(dir, 'hang') },
        security: { ...config.security, allowHubDownloads: allow },
      };
      const saved = { ...process.env };
      delete process.env.HF_HUB_OFFLINE;
      delete process.env.TRANSFORMERS_OFFLINE;
      const address = `unix:${path.join(dir, `fake-${allow}.sock`)}`;
      let sidecar: SidecarProcess | undefined;
      try {
        sidecar = SidecarProcess.spawn({ config: fake, address, logger: captureLogs().logger });
        await sidecar.waitUntilServing(30000);
        const env = environmentOf(sidecar.pid as number);
        expect(env.HF_HUB_OFFLINE).toBe(offline);
        expect(env.TRANSFORMERS_OFFLINE).toBe(offline);
      } finally {
        process.env = saved;
        await sidecar?.stop(2000);
      }
    },
  );
});
