/** Small promise wrappers over real gRPC clients, for the tests. */
import {
  Client,
  credentials,
  loadPackageDefinition,
  makeClientConstructor,
  Metadata,
  type CallOptions,
  type ChannelCredentials,
  type ServiceError,
} from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import path from 'node:path';
import { service as healthService } from 'grpc-health-check';
import {
  ExamServiceClient,
  GradeExamRequest,
  TakeExamRequest,
  type ExamChunk,
  type GradeExamResponse,
  type TakeExamResponse,
} from '../../src/gen/golem/exam/v1/exam';
import { parseErrorDetails, type ErrorDetails } from '../../src/gateway/errors';

export interface CallResult {
  response?: TakeExamResponse;
  error?: ServiceError;
  details?: ErrorDetails;
  headers?: Metadata;
}

/** Calls TakeExam and collects the answer or the error with its parsed details. */
export function takeExam(
  client: ExamServiceClient,
  request: Partial<TakeExamRequest>,
  metadata = new Metadata(),
  options: Partial<CallOptions> = {},
): Promise<CallResult> {
  const full = TakeExamRequest.fromPartial(request);
  return new Promise((resolve) => {
    let headers: Metadata | undefined;
    const call = client.takeExam(full, metadata, options, (error, response) => {
      if (error) resolve({ error, details: parseErrorDetails(error.metadata), headers });
      else resolve({ response, headers });
    });
    call.on('metadata', (received: Metadata) => {
      headers = received;
    });
  });
}

export interface GradeResult {
  /** Every message the stream sent, in order, up to its end or its error. */
  messages: GradeExamResponse[];
  error?: ServiceError;
  details?: ErrorDetails;
}

/** Calls GradeExam and reads the stream to its end or its error. */
export function gradeExam(
  client: ExamServiceClient,
  request: Partial<GradeExamRequest>,
  options: Partial<CallOptions> = {},
): Promise<GradeResult> {
  const result: GradeResult = { messages: [] };
  return new Promise((resolve) => {
    const stream = client.gradeExam(GradeExamRequest.fromPartial(request), options);
    stream.on('data', (message: GradeExamResponse) => result.messages.push(message));
    stream.on('error', (error: ServiceError) =>
      resolve({ ...result, error, details: parseErrorDetails(error.metadata) }),
    );
    stream.on('status', (status: { code: number }) => {
      if (status.code === 0) resolve(result);
    });
  });
}

export interface RawResult {
  /** The response messages, as bytes: one for a unary method, each chunk for a stream. */
  messages: Buffer[];
  error?: ServiceError;
  details?: ErrorDetails;
  headers?: Metadata;
}

export interface RawCallOptions extends Partial<CallOptions> {
  metadata?: Metadata;
  /** A server-streaming method: read every message until the status. */
  responseStream?: boolean;
}

const asBytes = (raw: Buffer): Buffer => raw;

/**
 * Sends raw bytes as the request of any method, as a misbehaving client would (or one that must
 * not re-encode, for a uint64 beyond 2^53); the reply is taken as raw bytes too.
 */
export function rawCall(
  address: string,
  method: string,
  bytes: Buffer | Uint8Array,
  options: RawCallOptions = {},
): Promise<RawResult> {
  const { metadata = new Metadata(), responseStream = false, ...callOptions } = options;
  const client = new Client(address, credentials.createInsecure());
  const result: RawResult = { messages: [] };
  const finish = (resolve: (r: RawResult) => void, error: ServiceError | null): void => {
    client.close();
    if (error) Object.assign(result, { error, details: parseErrorDetails(error.metadata) });
    resolve(result);
  };
  return new Promise((resolve) => {
    const body = Buffer.from(bytes);
    if (responseStream) {
      const stream = client.makeServerStreamRequest(method, asBytes, asBytes, body, metadata, callOptions);
      stream.on('metadata', (headers: Metadata) => (result.headers = headers));
      stream.on('data', (message: Buffer) => result.messages.push(message));
      stream.on('error', (error: ServiceError) => finish(resolve, error));
      stream.on('status', (status: { code: number }) => {
        if (status.code === 0) finish(resolve, null);
      });
      return;
    }
    const call = client.makeUnaryRequest(method, asBytes, asBytes, body, metadata, callOptions, (error, response) => {
      if (response) result.messages.push(response);
      finish(resolve, error);
    });
    call.on('metadata', (headers: Metadata) => (result.headers = headers));
  });
}

export function examClient(
  address: string,
  creds: ChannelCredentials = credentials.createInsecure(),
): ExamServiceClient {
  return new ExamServiceClient(address, creds);
}

interface ReflectionResponse {
  list_services_response?: { service: { name: string }[] };
  file_descriptor_response?: { file_descriptor_proto: Buffer[] };
  error_response?: { error_message: string };
}
type ReflectionRequest = { list_services: string } | { file_containing_symbol: string };
interface ReflectionStream {
  write(request: ReflectionRequest): void;
  end(): void;
  on(event: 'data', listener: (response: ReflectionResponse) => void): void;
  on(event: 'error', listener: (error: Error) => void): void;
}
type ReflectionClient = { ServerReflectionInfo(): ReflectionStream; close(): void };

/** Lists the services a server's reflection reports, as grpcurl's `list` does. */
export async function listServices(address: string, creds?: ChannelCredentials): Promise<string[]> {
  const response = await reflect(address, { list_services: '' }, creds);
  return response.list_services_response?.service.map((s) => s.name) ?? [];
}

/** The descriptor files reflection gives for a symbol, as grpcurl's `describe` asks. */
export async function describeSymbol(address: string, symbol: string): Promise<Buffer[]> {
  const response = await reflect(address, { file_containing_symbol: symbol });
  if (response.error_response) throw new Error(response.error_response.error_message);
  return response.file_descriptor_response?.file_descriptor_proto ?? [];
}

function reflect(
  address: string,
  request: ReflectionRequest,
  creds: ChannelCredentials = credentials.createInsecure(),
): Promise<ReflectionResponse> {
  const protoFile = path.join(
    path.dirname(require.resolve('@grpc/reflection/package.json')),
    'build/proto/grpc/reflection/v1/reflection.proto',
  );
  const loaded = loadPackageDefinition(loadSync(protoFile, { keepCase: true })) as unknown as {
    grpc: { reflection: { v1: { ServerReflection: new (a: string, c: unknown) => ReflectionClient } } };
  };
  const client = new loaded.grpc.reflection.v1.ServerReflection(address, creds);
  return new Promise((resolve, reject) => {
    const stream = client.ServerReflectionInfo();
    stream.on('data', (response) => {
      resolve(response);
      stream.end();
      client.close();
    });
    stream.on('error', reject);
    stream.write(request);
  });
}

type HealthClient = {
  Check(
    request: { service: string },
    callback: (error: ServiceError | null, response?: { status: string }) => void,
  ): void;
  close(): void;
};

/** Asks a server's grpc.health.v1 Check about one service name. */
export function healthStatus(
  address: string,
  service: string,
  creds: ChannelCredentials = credentials.createInsecure(),
): Promise<string> {
  const Client = makeClientConstructor(healthService, 'grpc.health.v1.Health') as unknown as new (
    a: string,
    c: unknown,
  ) => HealthClient;
  const client = new Client(address, creds);
  return new Promise((resolve, reject) => {
    client.Check({ service }, (error, response) => {
      client.close();
      if (error) reject(error);
      else resolve(response?.status ?? '');
    });
  });
}

type HealthWatchClient = {
  Watch(request: { service: string }): {
    on(event: 'data', listener: (response: { status: string }) => void): void;
    on(event: 'error' | 'end' | 'close', listener: () => void): void;
    cancel(): void;
  };
  close(): void;
};

export interface HealthWatch {
  /** Every status the server pushed, in order. */
  statuses: string[];
  /** Resolves when the stream ends (the server went away, or `cancel`). */
  ended: Promise<void>;
  cancel(): void;
}

/** Follows a server's grpc.health.v1 Watch for one service name. */
export function watchHealth(address: string, service: string): HealthWatch {
  const Client = makeClientConstructor(healthService, 'grpc.health.v1.Health') as unknown as new (
    a: string,
    c: unknown,
  ) => HealthWatchClient;
  const client = new Client(address, credentials.createInsecure());
  const stream = client.Watch({ service });
  const statuses: string[] = [];
  stream.on('data', (response) => statuses.push(response.status));
  const ended = new Promise<void>((resolve) => {
    stream.on('error', () => undefined);
    stream.on('close', () => {
      client.close();
      resolve();
    });
  });
  return { statuses, ended, cancel: () => stream.cancel() };
}

export interface StreamResult {
  texts: string[];
  final?: TakeExamResponse;
  error?: ServiceError;
  details?: ErrorDetails;
}

/** Calls StreamExam and collects every chunk; `onChunk` may cancel the call midway. */
export function streamExam(
  client: ExamServiceClient,
  request: Partial<TakeExamRequest>,
  onChunk: (chunk: ExamChunk, cancel: () => void) => void = () => undefined,
): Promise<StreamResult> {
  const stream = client.streamExam(TakeExamRequest.fromPartial(request), new Metadata());
  const result: StreamResult = { texts: [] };
  return new Promise((resolve) => {
    stream.on('data', (chunk: ExamChunk) => {
      if (chunk.text !== undefined) result.texts.push(chunk.text);
      if (chunk.final) result.final = chunk.final;
      onChunk(chunk, () => stream.cancel());
    });
    stream.on('error', (error: ServiceError) => {
      resolve({ ...result, error, details: parseErrorDetails(error.metadata) });
    });
    stream.on('status', (status: { code: number }) => {
      if (status.code === 0) resolve(result);
    });
  });
}

/** Calls any unary ExamService method and collects the answer or the error with its details. */
export function unaryCall<Req, Res>(
  start: (request: Req, metadata: Metadata, callback: (error: ServiceError | null, response: Res) => void) => unknown,
  request: Req,
): Promise<{ response?: Res; error?: ServiceError; details?: ErrorDetails }> {
  return new Promise((resolve) => {
    start(request, new Metadata(), (error, response) => {
      if (error) resolve({ error, details: parseErrorDetails(error.metadata) });
      else resolve({ response });
    });
  });
}
