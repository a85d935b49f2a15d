import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ConfigError, DEFAULT_CONFIG_PATH, configPath, loadConfig, PACKAGE_ROOT } from '../../src/config';
import { PYTHON } from '../support/tiny-models';

type Sections = Record<string, unknown>;

/** The sidecar suite's engines/vllm cases (inference_py/tests/engine_configs.py), so both readers
 * are held to the same table. */
function engineConfigs(): { full: Sections; refused: Array<[Sections, string]> } {
  const printed = execFileSync(PYTHON, ['-m', 'tests.engine_configs'], {
    cwd: path.join(PACKAGE_ROOT, 'inference_py'),
  }).toString();
  return JSON.parse(printed) as { full: Sections; refused: Array<[Sections, string]> };
}

describe('loadConfig', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-config-test-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  // Loosely typed on purpose: the tests write configs the schema must refuse.
  type RawConfig = Record<string, Record<string, unknown>>;
  function writeConfig(name: string, edit: (raw: RawConfig) => void): string {
    const raw = JSON.parse(readFileSync(DEFAULT_CONFIG_PATH, 'utf8')) as RawConfig;
    edit(raw);
    const file = path.join(dir, name);
    writeFileSync(file, JSON.stringify(raw));
    return file;
  }

  it('reads the embedded default when no file is named', () => {
    const config = loadConfig({ env: {} });
    expect(config.listen).toBe('127.0.0.1:50051');
    expect(config.limits).toEqual({
      maxNewTokensCap: 512,
      requestTimeoutMs: 300000,
      shutdownGraceMs: 10000,
      maxMessageBytes: 1048576,
      maxInputBytes: 65536,
      maxBatchSize: 64,
      batchWaitMs: 0,
      maxQueue: 256,
      maxAdapters: 8,
      maxModels: 2,
      maxBatchTokens: 65536,
      handshakeTimeoutMs: 10000,
    });
    expect(config.sidecar).toMatchObject({
      maxRestarts: 5,
      restartBackoffMs: 500,
      restartBackoffMaxMs: 10000,
      healthIntervalMs: 2000,
      healthTimeoutMs: 2000,
      healthFailures: 3,
      tlsCaFile: '',
      authTokenEnv: 'GOLEM_SIDECAR_TOKEN',
      allowInsecure: false,
    });
    expect(config.security).toEqual({
      trustRemoteCode: false,
      allowPickle: false,
      authTokenEnv: 'GOLEM_AUTH_TOKEN',
      tlsCertFile: '',
      tlsKeyFile: '',
      adapterRoots: [],
      modelRoots: [],
      examRoots: [],
      allowHubDownloads: false,
    });
    expect(config.defaults.quantization).toBe('auto');
    expect(config.tracing).toEqual({ otlpEndpoint: '', sidecarSpansFile: '' });
    expect(config.engines).toEqual({ default: 'transformers', models: {} });
    expect(config.vllm).toEqual({
      kvCacheGiB: 1,
      gpuMemoryUtilization: 0.9,
      maxLoraRank: 16,
      maxModelLen: 0,
      tensorParallelSize: 1,
      pipelineParallelSize: 1,
      distributedExecutorBackend: '',
    });
  });

  describe('engines and vllm, by the same table as the sidecar', () => {
    const { full, refused } = engineConfigs();

    it('takes every key', () => {
      const file = writeConfig('engines-full.json', (raw) => Object.assign(raw, full));
      const config = loadConfig({ file, env: {} });
      expect(config.engines).toEqual(full.engines);
      expect(config.vllm).toEqual(full.vllm);
    });

    it.each(refused)('refuses %j, naming the key', (sections, message) => {
      const file = writeConfig('engines-bad.json', (raw) => Object.assign(raw, sections));
      expect(() => loadConfig({ file, env: {} })).toThrow(message);
    });
  });

  it('fills keys added later with their defaults, so older config files still load', () => {
    const file = writeConfig('old.json', (raw) => {
      for (const key of [
        'maxRestarts',
        'restartBackoffMs',
        'restartBackoffMaxMs',
        'healthIntervalMs',
        'healthTimeoutMs',
        'healthFailures',
      ]) {
        delete raw.sidecar[key];
      }
      for (const key of ['shutdownGraceMs', 'maxMessageBytes', 'maxInputBytes', 'maxModels', 'handshakeTimeoutMs'])
        delete raw.limits[key];
      for (const key of [
        'authTokenEnv',
        'tlsCertFile',
        'tlsKeyFile',
        'adapterRoots',
        'modelRoots',
        'examRoots',
        'allowHubDownloads',
      ]) {
        delete raw.security[key];
      }
      delete raw.tracing;
      delete raw.metrics;
    });
    expect(loadConfig({ file, env: {} })).toEqual(loadConfig({ env: {} }));
  });

  it('refuses TLS with only one of the certificate and the key, naming the missing key', () => {
    const certOnly = writeConfig('cert-only.json', (raw) => {
      raw.security.tlsCertFile = '/etc/golem/cert.pem';
    });
    expect(() => loadConfig({ file: certOnly, env: {} })).toThrow(
      /security\.tlsKeyFile: must be set together with security\.tlsCertFile/,
    );
    expect(() => loadConfig({ env: { GOLEM_TLS_KEY_FILE: '/etc/golem/key.pem' } })).toThrow(/security\.tlsCertFile: /);
  });

  it('refuses negative restarts and non-string roots, naming the key', () => {
    const file = writeConfig('bad-restarts.json', (raw) => {
      raw.sidecar.maxRestarts = -1;
      raw.security.adapterRoots = ['models', 7];
    });
    expect(() => loadConfig({ file, env: {} })).toThrow(/sidecar\.maxRestarts: .*security\.adapterRoots\.1: /);
  });

  it('refuses a non-positive maxModels, zero health failures and a non-boolean allowHubDownloads, naming each key', () => {
    const file = writeConfig('bad-new-keys.json', (raw) => {
      raw.limits.maxModels = 0;
      raw.sidecar.healthFailures = 0;
      raw.security.allowHubDownloads = 'yes';
    });
    expect(() => loadConfig({ file, env: {} })).toThrow(
      /sidecar\.healthFailures: .*limits\.maxModels: .*security\.allowHubDownloads: /,
    );
  });

  it('refuses a metrics.listen that is not host:port, naming the key', () => {
    const file = writeConfig('metrics.json', (raw) => {
      raw.metrics = { listen: '9464' };
    });
    expect(() => loadConfig({ file, env: {} })).toThrow(/metrics\.listen: must be host:port/);
    const ipv6 = loadConfig({ env: { GOLEM_METRICS_LISTEN: '[::1]:0' } });
    expect(ipv6.metrics.listen).toBe('[::1]:0');
  });

  it('reads the seed profile with its 4-bit quantization object', () => {
    const config = loadConfig({ file: path.join(PACKAGE_ROOT, 'config', 'seed.json'), env: {} });
    expect(config.defaults.quantization).toEqual({ loadIn4Bit: true, bnb4BitComputeDtype: 'float16' });
    // A local base, since no hub is needed: the embedded default's GGUF and the demo adapter.
    expect(config.defaults).toMatchObject({
      modelName: 'models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',
      adapterPath: 'models/adapters/genres/checkpoint-final',
      device: 'auto',
      maxNewTokens: 20,
    });
  });

  it("takes the 4-bit settings and the plain modes; their values are the sidecar's to check", () => {
    for (const quantization of [
      'none',
      '4bit',
      { loadIn4Bit: true, bnb4BitQuantType: 'nf4', bnb4BitUseDoubleQuant: true },
    ]) {
      const file = writeConfig('q.json', (raw) => {
        raw.defaults.quantization = quantization;
      });
      expect(loadConfig({ file, env: {} }).defaults.quantization).toEqual(quantization);
    }
    const bad = writeConfig('bad.json', (raw) => {
      raw.defaults.quantization = { loadIn4Bit: true, bnb4BitUseDoubleQuant: 'yes' };
    });
    expect(() => loadConfig({ file: bad, env: {} })).toThrow(/defaults\.quantization/);
  });

  it('takes --config over GOLEM_CONFIG over the default', () => {
    const a = writeConfig('a.json', () => undefined);
    const b = writeConfig('b.json', () => undefined);
    expect(configPath({ env: {} })).toBe(DEFAULT_CONFIG_PATH);
    expect(configPath({ env: { GOLEM_CONFIG: a } })).toBe(a);
    expect(configPath({ file: b, env: { GOLEM_CONFIG: a } })).toBe(b);
  });

  it('applies every GOLEM_* override, typed', () => {
    const config = loadConfig({
      env: {
        GOLEM_LISTEN: '0.0.0.0:6000',
        GOLEM_LOG_LEVEL: 'debug',
        GOLEM_PRODUCTION: 'true',
        GOLEM_SIDECAR_ADDRESS: 'unix:/run/golem.sock',
        GOLEM_PYTHON: '/usr/bin/python3',
        GOLEM_MODEL_NAME: 'distilgpt2',
        GOLEM_ADAPTER_PATH: 'results/checkpoint-250',
        GOLEM_DEVICE: 'cpu',
        GOLEM_MAX_NEW_TOKENS_CAP: '64',
        GOLEM_REQUEST_TIMEOUT_MS: '1000',
        GOLEM_SHUTDOWN_GRACE_MS: '2500',
        GOLEM_TLS_CERT_FILE: '/etc/golem/cert.pem',
        GOLEM_TLS_KEY_FILE: '/etc/golem/key.pem',
        GOLEM_OTLP_ENDPOINT: 'http://collector:4317',
        GOLEM_SIDECAR_TLS_CA_FILE: '/etc/golem/sidecar-ca.pem',
        GOLEM_SIDECAR_ALLOW_INSECURE: 'false',
        GOLEM_METRICS_LISTEN: '127.0.0.1:9464',
      },
    });
    expect(config).toMatchObject({
      listen: '0.0.0.0:6000',
      logLevel: 'debug',
      production: true,
      sidecar: {
        address: 'unix:/run/golem.sock',
        python: '/usr/bin/python3',
        tlsCaFile: '/etc/golem/sidecar-ca.pem',
        allowInsecure: false,
      },
      defaults: { modelName: 'distilgpt2', adapterPath: 'results/checkpoint-250', device: 'cpu' },
      limits: { maxNewTokensCap: 64, requestTimeoutMs: 1000, shutdownGraceMs: 2500 },
      security: { tlsCertFile: '/etc/golem/cert.pem', tlsKeyFile: '/etc/golem/key.pem' },
      tracing: { otlpEndpoint: 'http://collector:4317' },
      metrics: { listen: '127.0.0.1:9464' },
    });
  });

  it('refuses an OTLP endpoint that is not an http(s) URL, naming the key and the variable', () => {
    expect(() => loadConfig({ env: { GOLEM_OTLP_ENDPOINT: 'collector:4317' } })).toThrow(
      /tracing\.otlpEndpoint: must be a URL .*\(from GOLEM_OTLP_ENDPOINT\)/,
    );
    const file = writeConfig('bad-tracing.json', (raw) => {
      raw.tracing = { otlpEndpoint: '', sidecarSpansFile: 3, sampler: 'always' };
    });
    expect(() => loadConfig({ file, env: {} })).toThrow(/tracing\.sidecarSpansFile: .*unknown key tracing\.sampler/);
  });

  it('names the variable when an override is not a number', () => {
    expect(() => loadConfig({ env: { GOLEM_MAX_NEW_TOKENS_CAP: 'lots' } })).toThrow(
      /GOLEM_MAX_NEW_TOKENS_CAP must be a positive integer/,
    );
  });

  it('names the variable when an override fails the schema', () => {
    expect(() => loadConfig({ env: { GOLEM_LOG_LEVEL: 'loud' } })).toThrow(/logLevel: .*\(from GOLEM_LOG_LEVEL\)/);
  });

  it('names the key of a bad value in the file', () => {
    const file = writeConfig('bad-cap.json', (raw) => {
      raw.limits.maxNewTokensCap = -1;
    });
    expect(() => loadConfig({ file, env: {} })).toThrow(ConfigError);
    expect(() => loadConfig({ file, env: {} })).toThrow(/limits\.maxNewTokensCap/);
  });

  describe('a remote sidecar (sidecar.address)', () => {
    const remote = (env: NodeJS.ProcessEnv): ReturnType<typeof loadConfig> => loadConfig({ env });

    it.each(['10.200.0.2:50052', 'gpu-host:50052', 'dns:///gpu-host:50052'])(
      'refuses plaintext beyond loopback (%s) unless sidecar.allowInsecure',
      (address) => {
        expect(() => remote({ GOLEM_SIDECAR_ADDRESS: address })).toThrow(
          'sidecar.tlsCaFile: must name the CA to trust for a sidecar beyond loopback',
        );
        const insecure = remote({ GOLEM_SIDECAR_ADDRESS: address, GOLEM_SIDECAR_ALLOW_INSECURE: 'true' });
        expect(insecure.sidecar).toMatchObject({ address, allowInsecure: true, tlsCaFile: '' });
      },
    );

    it('takes TLS beyond loopback, and plaintext on loopback as before', () => {
      const tls = remote({ GOLEM_SIDECAR_ADDRESS: '10.200.0.2:50052', GOLEM_SIDECAR_TLS_CA_FILE: '/etc/ca.pem' });
      expect(tls.sidecar).toMatchObject({ tlsCaFile: '/etc/ca.pem', allowInsecure: false });
      for (const address of ['127.0.0.1:50052', 'localhost:50052', 'unix:/run/golem.sock']) {
        expect(remote({ GOLEM_SIDECAR_ADDRESS: address }).sidecar.address).toBe(address);
      }
    });

    it('refuses a CA with no address to use it on', () => {
      expect(() => remote({ GOLEM_SIDECAR_TLS_CA_FILE: '/etc/ca.pem' })).toThrow(
        /sidecar\.tlsCaFile: applies to a remote sidecar only: set sidecar\.address too/,
      );
    });

    it('refuses allowInsecure beside a CA', () => {
      expect(() =>
        remote({
          GOLEM_SIDECAR_ADDRESS: '10.200.0.2:50052',
          GOLEM_SIDECAR_TLS_CA_FILE: '/etc/ca.pem',
          GOLEM_SIDECAR_ALLOW_INSECURE: 'true',
        }),
      ).toThrow(/sidecar\.allowInsecure: cannot be true with sidecar\.tlsCaFile set/);
    });
  });

  it('names unknown keys', () => {
    const file = writeConfig('unknown.json', (raw) => {
      raw.sidecar.pyhton = 'x';
    });
    expect(() => loadConfig({ file, env: {} })).toThrow(/unknown key sidecar\.pyhton/);
  });

  it('names a missing key', () => {
    const file = writeConfig('missing.json', (raw) => {
      delete raw.defaults.prompt;
    });
    expect(() => loadConfig({ file, env: {} })).toThrow(/defaults\.prompt/);
  });

  it('says which file could not be read or parsed', () => {
    expect(() => loadConfig({ file: path.join(dir, 'nope.json'), env: {} })).toThrow(/cannot read config .*nope\.json/);
    const broken = path.join(dir, 'broken.json');
    writeFileSync(broken, '{"listen": ');
    expect(() => loadConfig({ file: broken, env: {} })).toThrow(/broken\.json is not valid JSON/);
  });
});
