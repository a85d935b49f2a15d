/**
 * `golem exam '<json>'`: one question to the daemon, one JSON line on stdout, an exit code.
 * When no daemon listens at the address, a gateway and sidecar are started in this process for
 * the one call and stopped after it.
 */
import { randomUUID } from 'node:crypto';
import { connectivityState, credentials, Metadata, status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { loadConfig } from '../config';
import { parseErrorDetails, type FieldViolation } from '../gateway/errors';
import { REQUEST_ID_KEY, startGateway, type Gateway } from '../gateway/server';
import { ExamServiceClient, TakeExamRequest, TakeExamResponse } from '../gen/golem/exam/v1/exam';
import { createLogger } from '../log';
import { ExitCode, exitCodeForStatus } from './exit-codes';
import { parseExamInput } from './input';

export const DEFAULT_ADDRESS = '127.0.0.1:50051';
const PROBE_TIMEOUT_MS = 3000;

export interface ExamOptions {
  input: string;
  address?: string;
  configFile?: string;
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
  const outcome = await takeExam(options);
  process.stdout.write(`${JSON.stringify(outcome)}\n`);
  if (outcome.status === 'failure') process.stderr.write(`golem: error: ${outcome.message}\n`);
  return outcome.exitCode;
}

async function takeExam(options: ExamOptions): Promise<ExamOutcome> {
  const parsed = parseExamInput(options.input);
  if (!parsed.ok) {
    const what = parsed.violations.map((v) => `${v.field}: ${v.description}`).join('; ');
    return failure(ExitCode.INVALID_INPUT, `invalid input: ${what}`, 'INVALID_ARGUMENT', 'INVALID_INPUT', parsed.violations);
  }
  const address = options.address ?? (process.env.GOLEM_ADDRESS || DEFAULT_ADDRESS);
  let client = new ExamServiceClient(address, credentials.createInsecure());
  let gateway: Gateway | undefined;
  try {
    if (!(await isListening(client))) {
      client.close();
      process.stderr.write(`golem: no daemon at ${address}; starting one for this call\n`);
      const started = await startOwnGateway(options.configFile);
      if ('exitCode' in started) return started;
      gateway = started;
      client = new ExamServiceClient(gateway.address, credentials.createInsecure());
    }
    return await call(client, parsed.request);
  } finally {
    client.close();
    await gateway?.close();
  }
}

async function startOwnGateway(configFile: string | undefined): Promise<Gateway | ExamOutcome> {
  try {
    const config = loadConfig({ file: configFile });
    // Any free port: the one-shot gateway must not collide with whatever the address was.
    return await startGateway(config, { listen: '127.0.0.1:0', logger: createLogger(config.logLevel) });
  } catch (err) {
    const message = `no daemon is running and none could be started: ${(err as Error).message}`;
    return failure(ExitCode.UNAVAILABLE, message, 'UNAVAILABLE', 'DAEMON_UNAVAILABLE');
  }
}

function call(client: ExamServiceClient, request: TakeExamRequest): Promise<ExamOutcome> {
  const requestId = randomUUID();
  const metadata = new Metadata();
  metadata.set(REQUEST_ID_KEY, requestId);
  return new Promise((resolve) => {
    client.takeExam(request, metadata, (error: ServiceError | null, response: TakeExamResponse) => {
      resolve(error ? fromError(error, requestId) : fromResponse(response));
    });
  });
}

function fromResponse(response: TakeExamResponse): ExamOutcome {
  return { status: 'success', exitCode: ExitCode.SUCCESS, result: response.answer, detail: TakeExamResponse.toJSON(response) };
}

function fromError(error: ServiceError, requestId: string): ExamOutcome {
  const details = parseErrorDetails(error.metadata);
  const code = GrpcStatus[error.code] ?? String(error.code);
  const message = `${code}: ${error.details} (request ${requestId})`;
  return failure(exitCodeForStatus(error.code), message, code, details.reason ?? '', details.fieldViolations);
}

function failure(
  exitCode: ExitCode,
  message: string,
  code: string,
  reason: string,
  fieldViolations: FieldViolation[] = [],
): ExamOutcome {
  return { status: 'failure', exitCode, message, detail: { code, reason, fieldViolations } };
}

/**
 * Whether a gRPC server answers at the client's address: connect and see whether the channel
 * gets READY or fails (a refused connection fails at once).
 */
async function isListening(client: ExamServiceClient): Promise<boolean> {
  const channel = client.getChannel();
  const deadline = Date.now() + PROBE_TIMEOUT_MS;
  let state = channel.getConnectivityState(true);
  while (state !== connectivityState.READY) {
    if (state === connectivityState.TRANSIENT_FAILURE || state === connectivityState.SHUTDOWN) return false;
    const changed = await new Promise<boolean>((resolve) => {
      channel.watchConnectivityState(state, deadline, (err) => resolve(!err));
    });
    if (!changed) return false;
    state = channel.getConnectivityState(true);
  }
  return true;
}
