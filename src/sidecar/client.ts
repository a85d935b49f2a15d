/**
 * The gateway's view of the Python sidecar: its ExamService and its grpc.health.v1 service over
 * one channel.
 */
import {
  credentials,
  makeClientConstructor,
  Metadata,
  type CallOptions,
  type ChannelOptions,
  type ClientReadableStream,
  type ClientUnaryCall,
  type ServiceError,
} from '@grpc/grpc-js';
import { service as healthService, type ServingStatus } from 'grpc-health-check';
import {
  ExamServiceClient,
  type CompareAdaptersRequest,
  type CompareAdaptersResponse,
  type ExamChunk,
  type ListAdaptersRequest,
  type ListAdaptersResponse,
  type LoadAdapterRequest,
  type LoadAdapterResponse,
  type TakeExamRequest,
  type TakeExamResponse,
  type UnloadAdapterRequest,
  type UnloadAdapterResponse,
} from '../gen/golem/exam/v1/exam';

export type { ServingStatus };

/** The exam service's name, as it is registered for health checks on both processes. */
export const EXAM_SERVICE_NAME = 'golem.exam.v1.ExamService';

interface HealthCheckRequest {
  service: string;
}
interface HealthCheckResponse {
  status: ServingStatus | 'SERVICE_UNKNOWN';
}
// grpc-health-check ships its service as a proto-loader definition, so its client is untyped;
// this is the slice of it we call.
interface HealthClient {
  Check(
    request: HealthCheckRequest,
    options: Partial<CallOptions>,
    callback: (error: ServiceError | null, response?: HealthCheckResponse) => void,
  ): ClientUnaryCall;
  Watch(request: HealthCheckRequest, options?: Partial<CallOptions>): ClientReadableStream<HealthCheckResponse>;
  close(): void;
}
const HealthClientConstructor = makeClientConstructor(healthService, 'grpc.health.v1.Health') as unknown as new (
  address: string,
  creds: ReturnType<typeof credentials.createInsecure>,
  options: Record<string, unknown>,
) => HealthClient;

/** grpc-js channel options capping message sizes both ways; the server takes the same keys. */
export function messageSizeOptions(maxMessageBytes: number): ChannelOptions {
  return {
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.max_send_message_length': maxMessageBytes,
  };
}

/** A client for one sidecar address (`unix:/path.sock` or `host:port`). */
export class SidecarClient {
  private readonly exam: ExamServiceClient;
  private readonly health: HealthClient;

  constructor(
    readonly address: string,
    options: ChannelOptions = {},
  ) {
    this.exam = new ExamServiceClient(address, credentials.createInsecure(), options);
    this.health = new HealthClientConstructor(address, credentials.createInsecure(), {
      channelOverride: this.exam.getChannel(),
    });
  }

  /**
   * Calls TakeExam; a failed call rejects with the sidecar's ServiceError, trailers included.
   * Aborting `signal` cancels the call and rejects with the signal's reason.
   */
  takeExam(
    request: TakeExamRequest,
    metadata: Metadata,
    options: Partial<CallOptions>,
    signal?: AbortSignal,
  ): Promise<TakeExamResponse> {
    return unary((done) => this.exam.takeExam(request, metadata, options, done), signal);
  }

  /** Calls StreamExam; the caller reads, and cancels, the stream. */
  streamExam(request: TakeExamRequest, metadata: Metadata, options: Partial<CallOptions>): ClientReadableStream<ExamChunk> {
    return this.exam.streamExam(request, metadata, options);
  }

  /** Calls LoadAdapter, as `takeExam` calls TakeExam. */
  loadAdapter(
    request: LoadAdapterRequest,
    metadata: Metadata,
    options: Partial<CallOptions>,
    signal?: AbortSignal,
  ): Promise<LoadAdapterResponse> {
    return unary((done) => this.exam.loadAdapter(request, metadata, options, done), signal);
  }

  /** Calls UnloadAdapter, as `takeExam` calls TakeExam. */
  unloadAdapter(
    request: UnloadAdapterRequest,
    metadata: Metadata,
    options: Partial<CallOptions>,
    signal?: AbortSignal,
  ): Promise<UnloadAdapterResponse> {
    return unary((done) => this.exam.unloadAdapter(request, metadata, options, done), signal);
  }

  /** Calls ListAdapters, as `takeExam` calls TakeExam. */
  listAdapters(
    request: ListAdaptersRequest,
    metadata: Metadata,
    options: Partial<CallOptions>,
    signal?: AbortSignal,
  ): Promise<ListAdaptersResponse> {
    return unary((done) => this.exam.listAdapters(request, metadata, options, done), signal);
  }

  /** Calls CompareAdapters, as `takeExam` calls TakeExam. */
  compareAdapters(
    request: CompareAdaptersRequest,
    metadata: Metadata,
    options: Partial<CallOptions>,
    signal?: AbortSignal,
  ): Promise<CompareAdaptersResponse> {
    return unary((done) => this.exam.compareAdapters(request, metadata, options, done), signal);
  }

  /** Asks the sidecar how the exam service is doing; rejects when it cannot be reached in time. */
  checkHealth(timeoutMs: number): Promise<ServingStatus> {
    return new Promise((resolve, reject) => {
      const options = { deadline: Date.now() + timeoutMs };
      this.health.Check({ service: EXAM_SERVICE_NAME }, options, (error, response) => {
        if (error || !response) reject(error ?? new Error('empty health response'));
        else resolve(response.status === 'SERVICE_UNKNOWN' ? 'UNKNOWN' : response.status);
      });
    });
  }

  /**
   * Follows the sidecar's health: `onStatus` hears every change, and NOT_SERVING whenever the
   * sidecar cannot be reached (the watch is re-opened after a pause). Returns a function that stops.
   */
  watchHealth(onStatus: (status: ServingStatus) => void, retryMs = 1000): () => void {
    let stopped = false;
    let stream: ClientReadableStream<HealthCheckResponse> | undefined;
    let timer: NodeJS.Timeout | undefined;
    const open = (): void => {
      stream = this.health.Watch({ service: EXAM_SERVICE_NAME });
      stream.on('data', (response: HealthCheckResponse) => {
        onStatus(response.status === 'SERVICE_UNKNOWN' ? 'NOT_SERVING' : response.status);
      });
      // A watch ends only when the sidecar goes away (or we cancel it): report and retry.
      stream.on('error', () => undefined);
      stream.on('close', () => {
        if (stopped) return;
        onStatus('NOT_SERVING');
        timer = setTimeout(open, retryMs);
      });
    };
    open();
    return () => {
      stopped = true;
      clearTimeout(timer);
      stream?.cancel();
    };
  }

  close(): void {
    this.health.close();
    this.exam.close();
  }
}

/**
 * Runs one unary call as a promise: a failed call rejects with its ServiceError; aborting
 * `signal` cancels the call and rejects with the signal's reason.
 */
function unary<T>(
  start: (done: (error: ServiceError | null, response: T) => void) => ClientUnaryCall,
  signal?: AbortSignal,
): Promise<T> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason as Error);
    const onAbort = (): void => {
      reject(signal?.reason as Error);
      call.cancel();
    };
    const call = start((error, response) => {
      signal?.removeEventListener('abort', onAbort);
      if (error) reject(error);
      else resolve(response);
    });
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
