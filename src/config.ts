/**
 * golem's configuration: one JSON file (the same shape the Python sidecar reads), then GOLEM_*
 * environment overrides, validated with zod so that every error names the key at fault.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { isLoopback } from './gateway/roots';

/** The package root: `src/config.ts` and `dist/config.js` both sit one level below it. */
export const PACKAGE_ROOT = path.resolve(__dirname, '..');

/** The embedded default, used when neither `--config` nor GOLEM_CONFIG names a file. */
export const DEFAULT_CONFIG_PATH = path.join(PACKAGE_ROOT, 'config', 'golem.json');

const nonBlank = z.string().trim().min(1, 'must not be blank');
const positiveInt = z.number().int().positive();
const nonNegativeInt = z.number().int().nonnegative();
// Folders the sidecar may load from; empty means anywhere (but see the gateway's roots rule).
const roots = z.array(nonBlank).default([]);

// Shapes only: the values (dtype and 4-bit type names) are the sidecar's to check, once.
const quantizationSchema = z.union([
  z.enum(['auto', 'none', '4bit']),
  z.strictObject({
    loadIn4Bit: z.boolean(),
    bnb4BitComputeDtype: nonBlank.optional(),
    bnb4BitQuantType: nonBlank.optional(),
    bnb4BitUseDoubleQuant: z.boolean().optional(),
  }),
]);

// The exporter would take "host:4317" too, but silently guess plaintext or TLS: make it say.
const otlpEndpoint = z
  .string()
  .trim()
  .refine((url) => url === '' || /^https?:\/\/\S+$/.test(url), {
    message: 'must be a URL such as http://127.0.0.1:4317 (http: plaintext, https: TLS), or empty',
  });

const TRACING_OFF = { otlpEndpoint: '', sidecarSpansFile: '' };

/** The value a refused key held, for messages that say what was given. */
const got = (issue: { input?: unknown }): string => JSON.stringify(issue.input);

// The inference engines a base model can be served by (the sidecar's ENGINES).
const engine = z.enum(['transformers', 'vllm'], {
  error: (issue) => `must be "transformers" or "vllm", got ${got(issue)}`,
});
// A model name as requests write it: a local folder, a .gguf file or a hub id. Checked without
// trim, which would change the key the sidecar matches against.
const modelName = z.string().refine((name) => name.trim() !== '', { error: 'model name must not be blank' });
const engineByModel = z.record(modelName, engine, {
  // zod's own "Invalid key in record" would hide which rule the key broke.
  error: (issue) => (issue.code === 'invalid_key' ? 'model name must not be blank' : undefined),
});

// vLLM refuses any other --max-lora-rank.
const VLLM_LORA_RANKS = [8, 16, 32, 64, 128, 256, 320, 512] as const;
const atLeast = (minimum: number): z.ZodNumber =>
  z
    .number()
    .int()
    .gte(minimum, { error: (issue) => `must be at least ${minimum}, got ${got(issue)}` });

const aShare = (issue: { input?: unknown }): string => `must be above 0 and at most 1, got ${got(issue)}`;

const vllmSchema = z.strictObject({
  // The KV cache on CPU, in whole GiB: vLLM reads VLLM_CPU_KVCACHE_SPACE with int().
  kvCacheGiB: atLeast(1).default(1),
  // The share of each GPU's memory vLLM may take (CUDA only).
  gpuMemoryUtilization: z.number().positive({ error: aShare }).max(1, { error: aShare }).default(0.9),
  // The largest LoRA rank an adapter may have; vLLM sizes its adapter slots by it, and every
  // step pays for the whole slot (the sidecar's VllmSettings says how much).
  maxLoraRank: z
    .literal(VLLM_LORA_RANKS, { error: (issue) => `must be one of ${VLLM_LORA_RANKS.join(', ')}, got ${got(issue)}` })
    .default(16),
  // Context length; 0: the model's own.
  maxModelLen: atLeast(0).default(0),
  tensorParallelSize: atLeast(1).default(1),
  pipelineParallelSize: atLeast(1).default(1),
  // "": vLLM chooses (processes on one host); "ray" is the one that spans hosts.
  distributedExecutorBackend: z
    .enum(['', 'mp', 'ray'], { error: (issue) => `must be "", "mp" or "ray", got ${got(issue)}` })
    .default(''),
});

export const configSchema = z.strictObject({
  listen: nonBlank,
  logLevel: z.enum(['error', 'warn', 'info', 'debug']),
  production: z.boolean(),
  sidecar: z
    .strictObject({
      // Empty: the gateway spawns its own sidecar; otherwise the address of one already running.
      address: z.string(),
      python: nonBlank,
      startTimeoutMs: positiveInt,
      // Keys added after the first release default, so older config files still load.
      // Consecutive failed starts after a crash before the gateway gives up on its sidecar.
      maxRestarts: nonNegativeInt.default(5),
      // The wait before a restart doubles with each crash in a row, from this up to the max.
      restartBackoffMs: positiveInt.default(500),
      restartBackoffMaxMs: positiveInt.default(10000),
      // A serving sidecar is asked for its health this often, each answer due within the timeout;
      // after healthFailures misses in a row it counts as wedged and is killed and restarted
      // (a remote one, which the gateway cannot restart, counts as down until it answers again).
      healthIntervalMs: positiveInt.default(2000),
      healthTimeoutMs: positiveInt.default(2000),
      healthFailures: positiveInt.default(3),
      // A remote sidecar (`address` set): the PEM CA its certificate must chain to; empty: plaintext.
      tlsCaFile: z.string().default(''),
      // The environment variable holding the token sent to a remote sidecar on every call.
      authTokenEnv: nonBlank.default('GOLEM_SIDECAR_TOKEN'),
      // Plaintext to a sidecar beyond loopback; off, such an address needs tlsCaFile.
      allowInsecure: z.boolean().default(false),
    })
    .superRefine((sidecar, ctx) => {
      const problem = remoteSidecarProblem(sidecar);
      if (problem) ctx.addIssue({ code: 'custom', path: [problem.key], message: problem.message });
    }),
  defaults: z.strictObject({
    modelName: nonBlank,
    adapterPath: nonBlank,
    prompt: nonBlank,
    maxNewTokens: positiveInt,
    device: nonBlank,
    quantization: quantizationSchema,
  }),
  limits: z.strictObject({
    maxNewTokensCap: positiveInt,
    requestTimeoutMs: positiveInt,
    // How long calls in flight may run on after SIGTERM/SIGINT before they are cut off.
    shutdownGraceMs: positiveInt.default(10000),
    // gRPC message size cap, both ways, on the gateway and on its sidecar channel.
    maxMessageBytes: positiveInt.default(1048576),
    // The largest JSON argument `golem exam` accepts.
    maxInputBytes: positiveInt.default(65536),
    // The sidecar's batching: most requests decoded together, how long a batch waits to fill,
    // how many may wait (beyond that: RESOURCE_EXHAUSTED), and named adapters resident per base.
    maxBatchSize: positiveInt.default(64),
    batchWaitMs: nonNegativeInt.default(0),
    maxQueue: positiveInt.default(256),
    maxAdapters: positiveInt.default(8),
    // Base models resident per sidecar; beyond it the least recently used is evicted.
    maxModels: positiveInt.default(2),
    // Padded tokens one forward pass holds; larger batches, comparisons and scoring are split.
    maxBatchTokens: positiveInt.min(256).default(65536),
    // A connection to the gateway's port that has not sent the HTTP/2 preface by then is closed.
    handshakeTimeoutMs: positiveInt.default(10000),
  }),
  // Prometheus metrics of the gateway and its sidecar on a port of their own (docs/metrics.md).
  metrics: z
    .strictObject({
      // `host:port` for GET /metrics; empty: off. Off by default, so that several gateways on one
      // machine (tests, one-shot `golem exam`) never compete for a port.
      listen: z
        .string()
        .trim()
        .regex(
          /^$|^(\[[0-9a-fA-F:.]+\]|[^\s:[\]]+):\d{1,5}$/,
          'must be host:port (port 0: any free one), or empty for off',
        )
        .default(''),
    })
    .default({ listen: '' }),
  security: z
    .strictObject({
      trustRemoteCode: z.boolean(),
      allowPickle: z.boolean(),
      // The environment variable holding the bearer token; unset or empty there: no auth.
      authTokenEnv: nonBlank.default('GOLEM_AUTH_TOKEN'),
      // PEM files for TLS on the gateway port; both empty: plaintext.
      tlsCertFile: z.string().default(''),
      tlsKeyFile: z.string().default(''),
      adapterRoots: roots,
      modelRoots: roots,
      // GradeExam's exam, header and resume files.
      examRoots: roots,
      // Off: the sidecar runs with HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE set, local files only.
      allowHubDownloads: z.boolean().default(false),
    })
    .superRefine((security, ctx) => {
      // One without the other is a half-configured TLS: refuse it rather than serve plaintext.
      if (Boolean(security.tlsCertFile) !== Boolean(security.tlsKeyFile)) {
        const missing = security.tlsCertFile ? 'tlsKeyFile' : 'tlsCertFile';
        const given = security.tlsCertFile ? 'tlsCertFile' : 'tlsKeyFile';
        ctx.addIssue({
          code: 'custom',
          path: [missing],
          message: `must be set together with security.${given} (TLS needs both)`,
        });
      }
    }),
  // Off unless given somewhere to send spans: no instrumentation is loaded at all.
  tracing: z
    .strictObject({
      // An OTLP/gRPC collector: gateway and sidecar both export their spans there.
      otlpEndpoint: otlpEndpoint.default(''),
      // A debug exporter: the sidecar appends each of its finished spans here as a JSON line.
      sidecarSpansFile: z.string().default(''),
    })
    .default(TRACING_OFF),
  // Which engine serves each base model; the sidecar reads these (and vllm) whole.
  engines: z
    .strictObject({
      // The engine of a base that `models` does not name.
      default: engine.default('transformers'),
      models: engineByModel.default(() => ({})),
    })
    .default(() => ({ default: 'transformers' as const, models: {} })),
  vllm: vllmSchema.default(() => vllmSchema.parse({})),
});

export type GolemConfig = z.infer<typeof configSchema>;

interface RemoteSidecarKeys {
  address: string;
  tlsCaFile: string;
  allowInsecure: boolean;
}

/**
 * A half-configured link to a remote sidecar, by the key to fix: a CA with nothing to connect
 * to, plaintext beyond loopback (the token and every prompt in the clear) unless allowInsecure
 * says so, or allowInsecure beside a CA (which of the two was meant?).
 */
function remoteSidecarProblem(sidecar: RemoteSidecarKeys): { key: string; message: string } | undefined {
  if (sidecar.tlsCaFile && !sidecar.address) {
    return { key: 'tlsCaFile', message: 'applies to a remote sidecar only: set sidecar.address too' };
  }
  if (sidecar.tlsCaFile && sidecar.allowInsecure) {
    return { key: 'allowInsecure', message: 'cannot be true with sidecar.tlsCaFile set (TLS is used)' };
  }
  if (sidecar.address && !isLoopback(sidecar.address) && !sidecar.tlsCaFile && !sidecar.allowInsecure) {
    return {
      key: 'tlsCaFile',
      message:
        `must name the CA to trust for a sidecar beyond loopback (${sidecar.address}), ` +
        'or set sidecar.allowInsecure: true to connect in plaintext',
    };
  }
  return undefined;
}

/** Thrown for an unreadable or invalid configuration; the message names the file and the key. */
export class ConfigError extends Error {
  override name = 'ConfigError';
}

type EnvKind = 'string' | 'boolean' | 'integer';

/** Each environment override: the variable, the config key it sets, and how to read its text. */
const ENV_OVERRIDES: ReadonlyArray<readonly [string, readonly string[], EnvKind]> = [
  ['GOLEM_LISTEN', ['listen'], 'string'],
  ['GOLEM_LOG_LEVEL', ['logLevel'], 'string'],
  ['GOLEM_PRODUCTION', ['production'], 'boolean'],
  ['GOLEM_SIDECAR_ADDRESS', ['sidecar', 'address'], 'string'],
  ['GOLEM_PYTHON', ['sidecar', 'python'], 'string'],
  ['GOLEM_SIDECAR_TLS_CA_FILE', ['sidecar', 'tlsCaFile'], 'string'],
  ['GOLEM_SIDECAR_ALLOW_INSECURE', ['sidecar', 'allowInsecure'], 'boolean'],
  ['GOLEM_MODEL_NAME', ['defaults', 'modelName'], 'string'],
  ['GOLEM_ADAPTER_PATH', ['defaults', 'adapterPath'], 'string'],
  ['GOLEM_DEVICE', ['defaults', 'device'], 'string'],
  ['GOLEM_MAX_NEW_TOKENS_CAP', ['limits', 'maxNewTokensCap'], 'integer'],
  ['GOLEM_REQUEST_TIMEOUT_MS', ['limits', 'requestTimeoutMs'], 'integer'],
  ['GOLEM_SHUTDOWN_GRACE_MS', ['limits', 'shutdownGraceMs'], 'integer'],
  ['GOLEM_TLS_CERT_FILE', ['security', 'tlsCertFile'], 'string'],
  ['GOLEM_TLS_KEY_FILE', ['security', 'tlsKeyFile'], 'string'],
  ['GOLEM_OTLP_ENDPOINT', ['tracing', 'otlpEndpoint'], 'string'],
  ['GOLEM_METRICS_LISTEN', ['metrics', 'listen'], 'string'],
];

export interface LoadConfigOptions {
  /** The `--config` flag; wins over GOLEM_CONFIG. */
  file?: string;
  /** The environment to read GOLEM_* from; process.env in the CLI, a plain object in tests. */
  env?: NodeJS.ProcessEnv;
}

/** Resolves which config file to read: `--config`, then GOLEM_CONFIG, then the embedded default. */
export function configPath(options: LoadConfigOptions = {}): string {
  const env = options.env ?? process.env;
  return path.resolve(options.file ?? (env.GOLEM_CONFIG || DEFAULT_CONFIG_PATH));
}

/** Loads the config file, applies GOLEM_* overrides and validates the result. */
export function loadConfig(options: LoadConfigOptions = {}): GolemConfig {
  const env = options.env ?? process.env;
  const file = configPath(options);
  const raw = readJsonFile(file);
  applyEnvOverrides(raw, env);
  const parsed = configSchema.safeParse(raw);
  if (!parsed.success) {
    const problems = parsed.error.issues.map((issue) => describeIssue(issue, env));
    throw new ConfigError(`invalid config ${file}: ${problems.join('; ')}`);
  }
  return parsed.data;
}

function readJsonFile(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(`cannot read config ${file}: ${(err as Error).message}`);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`config ${file} is not valid JSON: ${(err as Error).message}`);
  }
  if (!isRecord(value)) {
    throw new ConfigError(`config ${file} must hold a JSON object`);
  }
  return value;
}

function applyEnvOverrides(raw: Record<string, unknown>, env: NodeJS.ProcessEnv): void {
  for (const [name, keyPath, kind] of ENV_OVERRIDES) {
    const text = env[name];
    if (text === undefined || text === '') continue;
    setPath(raw, keyPath, parseEnvValue(name, text, kind));
  }
}

function parseEnvValue(name: string, text: string, kind: EnvKind): string | boolean | number {
  if (kind === 'string') return text;
  if (kind === 'boolean') {
    const lowered = text.trim().toLowerCase();
    if (['1', 'true', 'yes', 'on'].includes(lowered)) return true;
    if (['0', 'false', 'no', 'off'].includes(lowered)) return false;
    throw new ConfigError(`${name} must be true or false, got ${JSON.stringify(text)}`);
  }
  if (!/^\s*\d+\s*$/.test(text)) {
    throw new ConfigError(`${name} must be a positive integer, got ${JSON.stringify(text)}`);
  }
  return Number(text);
}

function setPath(raw: Record<string, unknown>, keyPath: readonly string[], value: unknown): void {
  let node = raw;
  for (const key of keyPath.slice(0, -1)) {
    const child = node[key];
    // A missing or mistyped section is left for the schema to report by its key.
    if (!isRecord(child)) {
      node[key] = {};
    }
    node = node[key] as Record<string, unknown>;
  }
  node[keyPath[keyPath.length - 1]] = value;
}

function describeIssue(issue: z.core.$ZodIssue, env: NodeJS.ProcessEnv): string {
  if (issue.code === 'unrecognized_keys') {
    return `unknown key ${issue.keys.map((k) => formatKey([...issue.path, k])).join(', ')}`;
  }
  const dotted = issue.path.join('.');
  const envName = ENV_OVERRIDES.find(([, keyPath]) => keyPath.join('.') === dotted)?.[0];
  // Say where a bad value came from when an environment variable put it there.
  const hint = envName && env[envName] ? ` (from ${envName})` : '';
  return `${formatKey(issue.path) || '(root)'}: ${issue.message}${hint}`;
}

// Objects keyed by the user's data: their keys (model names, full of dots and slashes) are quoted.
const KEYED_BY_DATA = new Set(['engines.models']);

/** `limits.maxQueue`, `security.adapterRoots.1`, `engines.models["models/x.gguf"]`. */
function formatKey(keyPath: readonly PropertyKey[]): string {
  return keyPath
    .map((part, i) => {
      const parent = keyPath.slice(0, i).join('.');
      const plain = typeof part === 'number' || /^[A-Za-z_$][\w$]*$/.test(String(part));
      if (plain && !KEYED_BY_DATA.has(parent)) return i ? `.${String(part)}` : String(part);
      return `[${JSON.stringify(String(part))}]`;
    })
    .join('');
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
