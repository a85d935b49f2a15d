/**
 * `golem exam '<json>'`: one question to the daemon, one JSON line on stdout, an exit code.
 * When no daemon listens at the address, a gateway and sidecar are started in this process for
 * the one call and stopped after it.
 */
import { Client, status as GrpcStatus, type ServiceError, type StatusObject } from '@grpc/grpc-js';
import { ExamServiceService, TakeExamResponse, type ExamChunk } from '../gen/golem/exam/v1/exam';
import { identity } from '../sidecar/client';
import { examRoute } from './routing';
import { callMetadata, channelCredentialsFor, cliConfig, connectOrStart, daemonAddress } from './daemon';
import { ExitCode } from './exit-codes';
import { parseExamInput } from './input';
import { cancelOnSignal } from './one-shot';
import { failure, fromError, printOutcome, type ExamOutcome } from './outcome';

export interface ExamOptions {
  input: string;
  address?: string;
  configFile?: string;
  /** PEM file of the CA (or self-signed certificate) to trust: talk TLS to the daemon. */
  tlsCa?: string;
  /** StreamExam: the answer's text goes to stderr as it is generated. */
  stream?: boolean;
}

/** Runs the exam command, prints its outcome and returns the exit code. */
export async function runExam(options: ExamOptions): Promise<ExitCode> {
  return printOutcome(await cancelOnSignal(() => takeExam(options)));
}

async function takeExam(options: ExamOptions): Promise<ExamOutcome> {
  const loaded = cliConfig(options.configFile);
  if ('exitCode' in loaded) return loaded;
  const { config, token } = loaded;
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
  const connection = await connectOrStart(daemonAddress(options.address), channelCredentials, config);
  if ('exitCode' in connection) return connection;
  try {
    const route = examRoute(parsed.request, config.defaults.adapterPath);
    return await (options.stream ? streamCall : call)(connection.client, Buffer.from(parsed.bytes), token, route);
  } finally {
    await connection.close();
  }
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

// The request goes as the bytes the input parser encoded: a uint64 seed stays exact.
function call(client: Client, request: Buffer, token: string | undefined, route: string): Promise<ExamOutcome> {
  const { metadata, requestId } = callMetadata(token, route);
  const method = ExamServiceService.takeExam;
  return new Promise((resolve) => {
    client.makeUnaryRequest(method.path, identity, method.responseDeserialize, request, metadata, (error, response) => {
      resolve(error || !response ? fromError(error as ServiceError, requestId) : fromResponse(response));
    });
  });
}

// The text goes to stderr as it comes; stdout keeps its one JSON line, built from the final chunk.
function streamCall(client: Client, request: Buffer, token: string | undefined, route: string): Promise<ExamOutcome> {
  const { metadata, requestId } = callMetadata(token, route);
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
