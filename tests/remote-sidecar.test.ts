/**
 * A sidecar on another host: the gateway in this process reaches it at `sidecar.address` over
 * TLS (a CA made here with openssl) with a bearer token. The "host" is a network namespace on a
 * veth pair where this machine allows one, else a separate process on TCP loopback; the suite's
 * name says which. The namespace is removed in afterAll, whatever happened before.
 */
import { credentials, Metadata, status, type ChannelCredentials } from '@grpc/grpc-js';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT, type GolemConfig } from '../src/config';
import { startGateway, type Gateway } from '../src/gateway/server';
import type { ExamServiceClient } from '../src/gen/golem/exam/v1/exam';
import { examClient, healthStatus, takeExam } from './support/grpc';
import { captureLogs, type CapturedLogs } from './support/logs';
import { canUseNetns, sidecarHost, type SidecarHost } from './support/netns';
import { tinyConfig, tinyModels, PYTHON, type TinyModels } from './support/tiny-models';
import { makeCa, makeServerCert } from './support/tls';
import { waitFor } from './support/wait';

const TOKEN = 'remote-sidecar-token-never-logged';
const TOKEN_ENV = 'GOLEM_TEST_SIDECAR_TOKEN';
// The sidecar loads torch and the tiny model on each start: slow on a small shared CPU.
const START_MS = 150000;
const ISOLATED = canUseNetns();

function bearer(token: string): Metadata {
  const metadata = new Metadata();
  metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

/** A free TCP port on loopback (a fresh namespace has every port free, loopback may not). */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

/** Health of `service` on `address`, or UNREACHABLE when the call itself fails. */
async function healthOf(address: string, creds?: ChannelCredentials): Promise<string> {
  return healthStatus(address, '', creds).catch(() => 'UNREACHABLE');
}

const where = ISOLATED
  ? 'in its own network namespace (veth pair)'
  : 'as a separate process on TCP loopback (no netns)';

describe(`a remote sidecar ${where}, over TLS with a token`, () => {
  let dir: string;
  let host: SidecarHost | undefined;
  let models: TinyModels;
  let sidecarAddress: string;
  let sidecarConfigFile: string;
  let caCert: string;
  let otherCaCert: string;
  let trusting: ChannelCredentials;
  let sidecar: ChildProcess | undefined;
  let sidecarOutput = '';
  let gateway: Gateway;
  let gatewayLogs: CapturedLogs;
  let client: ExamServiceClient;
  const extraGateways: Gateway[] = [];
  const extraClients: ExamServiceClient[] = [];

  function startSidecar(): ChildProcess {
    const command = host!.wrap([PYTHON, '-m', 'golem_sidecar', '--config', sidecarConfigFile, '--exit-with-stdin']);
    const child = spawn(command[0], command.slice(1), {
      cwd: PACKAGE_ROOT,
      stdio: ['pipe', 'pipe', 'pipe'],
      env: { ...process.env, [TOKEN_ENV]: TOKEN, OMP_NUM_THREADS: '1', HF_HUB_OFFLINE: '1' },
    });
    child.stdout?.on('data', (chunk: Buffer) => (sidecarOutput += chunk.toString()));
    child.stderr?.on('data', (chunk: Buffer) => (sidecarOutput += chunk.toString()));
    return child;
  }

  async function killSidecar(): Promise<void> {
    const child = sidecar;
    sidecar = undefined;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGKILL');
    await exited;
  }

  async function untilSidecarServes(): Promise<void> {
    await waitFor(async () => (await healthOf(sidecarAddress, trusting)) === 'SERVING', START_MS, 'sidecar SERVING');
  }

  function gatewayConfig(sidecar: Partial<GolemConfig['sidecar']> = {}): GolemConfig {
    const config = tinyConfig(models);
    return {
      ...config,
      sidecar: {
        ...config.sidecar,
        address: sidecarAddress,
        tlsCaFile: caCert,
        authTokenEnv: TOKEN_ENV,
        // Quick to notice a sidecar gone and back, for the test's sake.
        healthIntervalMs: 300,
        healthTimeoutMs: 1000,
        healthFailures: 2,
        ...sidecar,
      },
    };
  }

  async function extraGateway(config: GolemConfig, env: NodeJS.ProcessEnv): Promise<ExamServiceClient> {
    const started = await startGateway(config, { listen: '127.0.0.1:0', env, logger: captureLogs('error').logger });
    extraGateways.push(started);
    const extra = examClient(started.address);
    extraClients.push(extra);
    return extra;
  }

  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-remote-'));
    host = sidecarHost();
    models = tinyModels();
    const ca = makeCa(dir, 'golem-test-ca');
    caCert = ca.cert;
    otherCaCert = makeCa(dir, 'some-other-ca').cert;
    const server = makeServerCert(dir, 'sidecar', ca, [host.ip]);
    trusting = credentials.createSsl(readFileSync(caCert));
    sidecarAddress = `${host.ip}:${host.isolated ? 50052 : await freePort()}`;
    // The sidecar's own config file, as on the GPU host. Beyond loopback its roots would default
    // to ./models, so they name the tiny models' folder.
    const tinyRoot = path.join(os.tmpdir(), path.relative(os.tmpdir(), models.model).split(path.sep)[0]);
    const base = tinyConfig(models);
    sidecarConfigFile = path.join(dir, 'sidecar.json');
    writeFileSync(
      sidecarConfigFile,
      JSON.stringify({
        // Debug: if the token were logged anywhere, it would be at this level.
        logLevel: 'debug',
        defaults: base.defaults,
        limits: base.limits,
        security: { ...base.security, adapterRoots: [tinyRoot], modelRoots: [tinyRoot] },
        sidecar: { listen: sidecarAddress, tlsCertFile: server.cert, tlsKeyFile: server.key, authTokenEnv: TOKEN_ENV },
      }),
    );
    sidecar = startSidecar();
    await untilSidecarServes();
    gatewayLogs = captureLogs('debug');
    gateway = await startGateway(
      { ...gatewayConfig(), logLevel: 'debug' },
      { listen: '127.0.0.1:0', env: { [TOKEN_ENV]: TOKEN }, logger: gatewayLogs.logger },
    );
    client = examClient(gateway.address);
  }, 2 * START_MS);

  afterAll(async () => {
    client?.close();
    extraClients.forEach((extra) => extra.close());
    await Promise.all([gateway, ...extraGateways].map((g) => g?.close()));
    await killSidecar();
    host?.remove();
    rmSync(dir, { recursive: true, force: true });
  });

  it('answers TakeExam through the gateway', async () => {
    await waitFor(async () => (await healthOf(gateway.address)) === 'SERVING', 10000, 'gateway SERVING');
    const { response, error } = await takeExam(client, { prompt: 'Instruction: hello\nResponse:', maxNewTokens: 2 });
    expect(error).toBeUndefined();
    expect(response?.model?.modelName).toBe(models.model);
    expect(response?.answerTokens).toBeGreaterThan(0);
  });

  it("merges the remote sidecar's metrics, read over its TLS channel with the token, and none without it", async () => {
    const scrape = async (env: NodeJS.ProcessEnv): Promise<string> => {
      const config = { ...gatewayConfig(), metrics: { listen: '127.0.0.1:0' } };
      const started = await startGateway(config, { listen: '127.0.0.1:0', env, logger: captureLogs('error').logger });
      extraGateways.push(started);
      await waitFor(async () => (await healthOf(started.address)) === 'SERVING', 10000, 'gateway SERVING');
      return (await fetch(`http://${started.metricsAddress}/metrics`)).text();
    };
    const withToken = await scrape({ [TOKEN_ENV]: TOKEN });
    expect(withToken).toMatch(/^golem_gateway_sidecar_up 1$/m);
    expect(withToken).toMatch(/^vllm:num_requests_waiting 0\.0$/m);
    // The sidecar refuses Scrape without the token: its labels name models and adapter paths.
    const without = await scrape({});
    expect(without).toMatch(/^golem_gateway_sidecar_up 0$/m);
    expect(without).not.toContain('vllm:');
  });

  it('refuses a call straight to the sidecar without the token or with a wrong one; health stays open', async () => {
    const direct = examClient(sidecarAddress, trusting);
    try {
      for (const metadata of [new Metadata(), bearer('wrong'), bearer(`${TOKEN}x`)]) {
        const { error, details } = await takeExam(direct, { maxNewTokens: 1 }, metadata);
        expect(error?.code).toBe(status.UNAUTHENTICATED);
        expect(details?.reason).toBe('UNAUTHENTICATED');
      }
      expect((await takeExam(direct, { maxNewTokens: 1 }, bearer(TOKEN))).error).toBeUndefined();
      expect(await healthStatus(sidecarAddress, '', trusting)).toBe('SERVING');
    } finally {
      direct.close();
    }
  });

  it.each([
    ['a wrong token', { [TOKEN_ENV]: 'not-the-token' }],
    ['no token', {}],
  ])("sends the gateway's own token: one with %s is refused, whatever its caller sends", async (_what, env) => {
    const extra = await extraGateway(gatewayConfig(), env);
    // The caller's header stays at the gateway, even when it holds the sidecar's token.
    const { error, details } = await takeExam(extra, { maxNewTokens: 1 }, bearer(TOKEN));
    expect(error?.code).toBe(status.UNAUTHENTICATED);
    expect(details?.reason).toBe('UNAUTHENTICATED');
  });

  it('cannot be reached by a client that does not trust its CA', async () => {
    const systemRoots = examClient(sidecarAddress, credentials.createSsl());
    try {
      const { error } = await takeExam(systemRoots, { maxNewTokens: 1 }, bearer(TOKEN));
      expect(error?.code).toBe(status.UNAVAILABLE);
    } finally {
      systemRoots.close();
    }
    const wrongCa = await extraGateway(gatewayConfig({ tlsCaFile: otherCaCert }), { [TOKEN_ENV]: TOKEN });
    const { error, details } = await takeExam(wrongCa, { maxNewTokens: 1 });
    expect(error?.code).toBe(status.UNAVAILABLE);
    expect(details?.reason).toBe('SIDECAR_UNAVAILABLE');
    expect(await healthOf(extraGateways[extraGateways.length - 1].address)).toBe('NOT_SERVING');
  });

  (ISOLATED ? it : it.skip)('goes NOT_SERVING while the link is cut, and serves again once it is back', async () => {
    await waitFor(async () => (await healthOf(gateway.address)) === 'SERVING', 10000, 'gateway SERVING');
    host!.setLink(false);
    try {
      await waitFor(async () => (await healthOf(gateway.address)) === 'NOT_SERVING', 10000, 'gateway NOT_SERVING');
      const { error, details } = await takeExam(client, { maxNewTokens: 1 });
      expect(error?.code).toBe(status.UNAVAILABLE);
      expect(details?.reason).toBe('SIDECAR_UNAVAILABLE');
    } finally {
      host!.setLink(true);
    }
    await waitFor(async () => (await healthOf(gateway.address)) === 'SERVING', 20000, 'gateway SERVING again');
    expect((await takeExam(client, { maxNewTokens: 1 })).error).toBeUndefined();
  });

  it(
    'goes NOT_SERVING and UNAVAILABLE when the sidecar dies, and recovers when it is back',
    async () => {
      await killSidecar();
      await waitFor(async () => (await healthOf(gateway.address)) === 'NOT_SERVING', 10000, 'gateway NOT_SERVING');
      const { error, details } = await takeExam(client, { maxNewTokens: 1 });
      expect(error?.code).toBe(status.UNAVAILABLE);
      expect(details?.reason).toBe('SIDECAR_UNAVAILABLE');
      sidecar = startSidecar();
      await untilSidecarServes();
      await waitFor(async () => (await healthOf(gateway.address)) === 'SERVING', 20000, 'gateway SERVING again');
      expect((await takeExam(client, { maxNewTokens: 1 })).error).toBeUndefined();
    },
    2 * START_MS,
  );

  it('never logs the token, on either side', () => {
    expect(gatewayLogs.text()).toContain('remote sidecar');
    expect(gatewayLogs.text()).not.toContain(TOKEN);
    expect(sidecarOutput).toContain('sidecar security');
    expect(sidecarOutput).not.toContain(TOKEN);
  });
});
