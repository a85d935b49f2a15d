/**
 * Safe by default, switched on: one `golem serve` with TLS (a self-signed certificate made here
 * with openssl) and a bearer token, on the tiny model; called over gRPC and through the CLI.
 */
import { credentials, Metadata, status, type ChannelCredentials } from '@grpc/grpc-js';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ConfigError, loadConfig } from '../src/config';
import { startGateway } from '../src/gateway/server';
import type { ExamServiceClient } from '../src/gen/golem/exam/v1/exam';
import { buildCli, CLI_ENV, golem, serve, stopDaemon, type Daemon } from './support/daemon';
import { examClient, healthStatus, listServices, takeExam } from './support/grpc';
import { makeCa } from './support/tls';
import { tinyConfig, tinyModels } from './support/tiny-models';

const TOKEN = 's3cret-token-that-must-never-be-logged';
const TOKEN_ENV = 'GOLEM_TEST_AUTH_TOKEN';

function bearer(token: string, scheme = 'Bearer'): Metadata {
  const metadata = new Metadata();
  metadata.set('authorization', `${scheme} ${token}`);
  return metadata;
}

describe('gateway with TLS and a bearer token', () => {
  let dir: string;
  let cert: string;
  let daemon: Daemon;
  let address: string;
  let tls: ChannelCredentials;
  let client: ExamServiceClient;

  beforeAll(async () => {
    buildCli();
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-security-'));
    // Self-signed for 127.0.0.1: the CLI and clients trust it as their CA (--tls-ca).
    const made = makeCa(dir, 'localhost', ['127.0.0.1']);
    cert = made.cert;
    const key = made.key;
    const config = tinyConfig(tinyModels());
    const configFile = path.join(dir, 'golem.json');
    writeFileSync(
      configFile,
      JSON.stringify({
        ...config,
        // Debug: if the token were logged anywhere, it would be at this level.
        logLevel: 'debug',
        security: { ...config.security, authTokenEnv: TOKEN_ENV, tlsCertFile: cert, tlsKeyFile: key },
      }),
    );
    daemon = serve(configFile, { ...CLI_ENV, [TOKEN_ENV]: TOKEN });
    address = await daemon.ready;
    tls = credentials.createSsl(readFileSync(cert));
    client = examClient(address, tls);
  });

  afterAll(async () => {
    client?.close();
    expect(await stopDaemon(daemon)).toBe(0);
    rmSync(dir, { recursive: true, force: true });
  });

  it('answers a call with the right token', async () => {
    const { response, error } = await takeExam(client, { maxNewTokens: 1 }, bearer(TOKEN));
    expect(error).toBeUndefined();
    expect(response?.answerTokens).toBe(1);
    // The scheme is case-insensitive (RFC 7235).
    expect((await takeExam(client, { maxNewTokens: 1 }, bearer(TOKEN, 'bearer'))).error).toBeUndefined();
  });

  it.each([
    ['no authorization', new Metadata()],
    ['a wrong token', bearer('not-the-token')],
    ['a token with one more byte', bearer(`${TOKEN}x`)],
    ['a prefix of the token', bearer(TOKEN.slice(0, 8))],
    ['another scheme', bearer(TOKEN, 'Basic')],
  ])('refuses %s with UNAUTHENTICATED before looking at the request', async (_name, metadata) => {
    // An invalid request too: authentication comes first, so it says nothing about the input.
    const { error, details } = await takeExam(client, { maxNewTokens: 0 }, metadata);
    expect(error?.code).toBe(status.UNAUTHENTICATED);
    expect(details?.reason).toBe('UNAUTHENTICATED');
  });

  it('keeps health and reflection open for probes without a token', async () => {
    expect(await healthStatus(address, '', tls)).toBe('SERVING');
    expect(await listServices(address, tls)).toEqual(expect.arrayContaining(['golem.exam.v1.ExamService']));
  });

  it('refuses a plaintext client', async () => {
    const plain = examClient(address);
    const { error } = await takeExam(plain, { maxNewTokens: 1 }, bearer(TOKEN));
    plain.close();
    expect(error?.code).toBe(status.UNAVAILABLE);
  });

  it('CLI: sends the token from the environment and trusts --tls-ca or GOLEM_TLS_CA', async () => {
    const env = { ...CLI_ENV, [TOKEN_ENV]: TOKEN };
    const config = path.join(dir, 'golem.json');
    const viaFlag = await golem(
      ['exam', '{"maxNewTokens": 1}', '--address', address, '--config', config, '--tls-ca', cert],
      env,
    );
    expect(viaFlag).toMatchObject({ code: 0, json: { status: 'success' } });
    const viaEnv = await golem(['exam', '{"maxNewTokens": 1}', '--address', address, '--config', config], {
      ...env,
      GOLEM_TLS_CA: cert,
    });
    expect(viaEnv).toMatchObject({ code: 0, json: { status: 'success' } });
  });

  it('CLI: exit 9 without the token', async () => {
    const config = path.join(dir, 'golem.json');
    const run = await golem([
      'exam',
      '{"maxNewTokens": 1}',
      '--address',
      address,
      '--config',
      config,
      '--tls-ca',
      cert,
    ]);
    expect(run.code).toBe(9);
    expect(run.json).toMatchObject({ exitCode: 9, detail: { code: 'UNAUTHENTICATED', reason: 'UNAUTHENTICATED' } });
  });

  it('CLI: without the CA it fails UNAVAILABLE, and does not start a daemon of its own', async () => {
    const env = { ...CLI_ENV, [TOKEN_ENV]: TOKEN };
    const run = await golem(
      ['exam', '{"maxNewTokens": 1}', '--address', address, '--config', path.join(dir, 'golem.json')],
      env,
    );
    expect(run.code).toBe(5);
    expect(run.stderr).not.toContain('starting one for this call');
  });

  it('never logs the token', () => {
    expect(daemon.stderr().length).toBeGreaterThan(0);
    expect(daemon.stderr()).not.toContain(TOKEN);
    expect(daemon.stderr()).not.toContain(TOKEN.slice(0, 8));
  });
});

describe('TLS configuration errors', () => {
  it('names the key of a PEM file that cannot be read, before starting anything', async () => {
    const config = loadConfig({ env: {} });
    const security = { ...config.security, tlsCertFile: '/no/such/cert.pem', tlsKeyFile: '/no/such/key.pem' };
    const started = startGateway({ ...config, listen: '127.0.0.1:0', security });
    await expect(started).rejects.toThrow(ConfigError);
    await expect(started).rejects.toThrow(/security\.tlsCertFile: cannot read \/no\/such\/cert\.pem/);
  });
});
