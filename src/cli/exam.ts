/**
 * `golem exam '<json>'`: one question to the daemon, one JSON line on stdout, an exit code.
 * When no daemon listens at the address, a gateway and sidecar are started in this process for
 * the one call and stopped after it.
 */
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import {
  Client,
  credentials,
  Metadata,
  status as GrpcStatus,
  type ChannelCredentials,
  type ServiceError,
  type StatusObject,
} from '@grpc/grpc-js';
import { ConfigError, loadConfig, type GolemConfig } from '../config';
import { parseErrorDetails, type FieldViolation } from '../gateway/errors';
import { startGateway, type Gateway } from '../gateway/server';
import { ExamServiceService, TakeExamResponse, type ExamChunk } from '../gen/golem/exam/v1/exam';
import { createLogger } from '../log';
import { identity } from '../sidecar/client';
import { AUTHORIZATION_KEY, REQUEST_ID_KEY } from '../wire';
import { ExitCode, exitCodeForStatus } from './exit-codes';
import { parseExamInput } from './input';
import { cancelOnSignal } from './one-shot';
import { isListening } from './probe';

export const DEFAULT_ADDRESS = '127.0.0.1:50051';

export interface ExamOptions {
  input: string;
  address?: string;
  configFile?: string;
  /** PEM file of the CA (or self-signed certificate) to trust: talk TLS to the daemon. */
  tlsCa?: string;
  /** StreamExam: the answer's text goes to stderr as it is generated. */
  stream?: boolean;
}

/** The one line `golem exam` prints on stdout. */
export interface ExamOutcome {
  status: 'success' | 'failure';
  exitCode: ExitCode;
  message?: string;
  result?: string;
  detail?: unknown;
}

/** Runs the exam command, prints its outcome and returns the exit code. */
export async function runExam(options: ExamOptions): Promise<ExitCode> {
  const outcome = await cancelOnSignal(() => takeExam(options));
  process.stdout.write(`${JSON.stringify(outcome)}\n`);
  if (outcome.status === 'failure') process.stderr.write(`golem: error: ${outcome.message}\n`);
  return outcome.exitCode;
}

async function takeExam(options: ExamOptions): Promise<ExamOutcome> {
  let config: GolemConfig;
  try {
    config = loadConfig({ file: options.configFile });
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    return failure(ExitCode.INVALID_INPUT, err.message, 'INVALID_ARGUMENT', 'INVALID_CONFIG');
  }
  const tooLarge = checkInputSize(options.input, config.limits.maxInputBytes);
  if (tooLarge) return tooLarge;
  const parsed = parseExamInput(options.input);
  if (!parsed.ok) {
    const what = parsed.violations.map((v) => `${v.field}: ${v.description}`).join('; ');
    return failure(
      ExitCode.INVALID_INPUT,
      `invalid input: ${what}`,
      'INVALID_ARGUMENT',
      'INVALID_INPUT',
      parsed.violations,
    );
  }
  const channelCredentials = channelCredentialsFor(options.tlsCa);
  if ('exitCode' in channelCredentials) return channelCredentials;
  const token = process.env[config.security.authTokenEnv] || undefined;
  const address = daemonAddress(options.address);
  let gateway: Gateway | undefined;
  let client: Client;
  if (await isListening(address)) {
    client = new Client(address, channelCredentials);
  } else {
    process.stderr.write(`golem: no daemon at ${address}; starting one for this call\n`);
    const started = await startOwnGateway(config);
    if ('exitCode' in started) return started;
    gateway = started;
    client = new Client(gateway.address, credentials.createInsecure());
  }
  try {
    return await (options.stream ? streamCall : call)(client, Buffer.from(parsed.bytes), token);
  } finally {
    client.close();
    await gateway?.close();
  }
}

/** The channel credentials for `--tls-ca` (or GOLEM_TLS_CA): TLS trusting that CA, else plaintext. */
export function channelCredentialsFor(tlsCaOption: string | undefined): ChannelCredentials | ExamOutcome {
  const tlsCa = tlsCaOption ?? (process.env.GOLEM_TLS_CA || undefined);
  try {
    return tlsCa ? credentials.createSsl(readFileSync(tlsCa)) : credentials.createInsecure();
  } catch (err) {
    const message = `cannot read the TLS CA ${tlsCa} (--tls-ca or GOLEM_TLS_CA): ${(err as Error).message}`;
    return failure(ExitCode.INVALID_INPUT, message, 'INVALID_ARGUMENT', 'INVALID_COMMAND_LINE');
  }
}

/** `--address`, else GOLEM_ADDRESS, else the default. */
export function daemonAddress(option: string | undefined): string {
  return option ?? (process.env.GOLEM_ADDRESS || DEFAULT_ADDRESS);
}

/** Metadata for one call: a fresh request id, and the bearer token when there is one. */
export function callMetadata(token: string | undefined): { metadata: Metadata; requestId: string } {
  const requestId = randomUUID();
  const metadata = new Metadata();
  metadata.set(REQUEST_ID_KEY, requestId);
  if (token) metadata.set(AUTHORIZATION_KEY, `Bearer ${token}`);
  return { metadata, requestId };
}

// Counted in bytes, as the limit is: a shell argument is bytes, whatever the characters.
function checkInputSize(input: string, maxBytes: number): ExamOutcome | undefined {
  const size = Buffer.byteLength(input, 'utf8');
  if (size <= maxBytes) return undefined;
  const description = `is ${size} bytes, over the limit of ${maxBytes} bytes (limits.maxInputBytes)`;
  return failure(ExitCode.INVALID_INPUT, `invalid input: input ${description}`, 'INVALID_ARGUMENT', 'INPUT_TOO_LARGE', [
    { field: 'input', description },
  ]);
}

async function startOwnGateway(config: GolemConfig): Promise<Gateway | ExamOutcome> {
  try {
    // Any free loopback port, private to this call: plaintext, whatever the daemon's TLS setting.
    const security = { ...config.security, tlsCertFile: '', tlsKeyFile: '' };
    return await startGateway(
      { ...config, security },
      { listen: '127.0.0.1:0', logger: createLogger(config.logLevel) },
    );
  } catch (err) {
    const message = `no daemon is running and none could be started: ${(err as Error).message}`;
    return failure(ExitCode.UNAVAILABLE, message, 'UNAVAILABLE', 'DAEMON_UNAVAILABLE');
  }
}

// The request goes as the bytes the input parser encoded: a uint64 seed stays exact.
function call(client: Client, request: Buffer, token: string | undefined): Promise<ExamOutcome> {
  const { metadata, requestId } = callMetadata(token);
  const method = ExamServiceService.takeExam;
  return new Promise((resolve) => {
    client.makeUnaryRequest(method.path, identity, method.responseDeserialize, request, metadata, (error, response) => {
      resolve(error || !response ? fromError(error as ServiceError, requestId) : fromResponse(response));
    });
  });
}

// The text goes to stderr as it comes; stdout keeps its one JSON line, built from the final chunk.
function streamCall(client: Client, request: Buffer, token: string | undefined): Promise<ExamOutcome> {
  const { metadata, requestId } = callMetadata(token);
  const method = ExamServiceService.streamExam;
  return new Promise((resolve) => {
    let final: TakeExamResponse | undefined;
    let wrote = false;
    const stream = client.makeServerStreamRequest(method.path, identity, method.responseDeserialize, request, metadata);
    stream.on('data', (chunk: ExamChunk) => {
      if (chunk.text !== undefined) {
        process.stderr.write(chunk.text);
        wrote = true;
      }
      if (chunk.final) final = chunk.final;
    });
    stream.on('error', (error: ServiceError) => {
      if (wrote) process.stderr.write('\n');
      resolve(fromError(error, requestId));
    });
    stream.on('status', (status: StatusObject) => {
      if (status.code !== GrpcStatus.OK) return;
      if (wrote) process.stderr.write('\n');
      resolve(
        final
          ? fromResponse(final)
          : failure(ExitCode.FAILURE, 'the stream ended without its final chunk', 'INTERNAL', 'NO_FINAL_CHUNK'),
      );
    });
  });
}

function fromResponse(response: TakeExamResponse): ExamOutcome {
  return {
    status: 'success',
    exitCode: ExitCode.SUCCESS,
    result: response.answer,
    detail: TakeExamResponse.toJSON(response),
  };
}

/** The outcome for a failed call: its code's exit code, and its details. */
export function fromError(error: ServiceError, requestId: string): ExamOutcome {
  const details = parseErrorDetails(error.metadata);
  const code = GrpcStatus[error.code] ?? String(error.code);
  const message = `${code}: ${error.details} (request ${requestId})`;
  return failure(exitCodeForStatus(error.code), message, code, details.reason ?? '', details.fieldViolations);
}

export function failure(
  exitCode: ExitCode,
  message: string,
  code: string,
  reason: string,
  fieldViolations: FieldViolation[] = [],
): ExamOutcome {
  return { status: 'failure', exitCode, message, detail: { code, reason, fieldViolations } };
}
