/**
 * The gateway's view of the Python sidecar: any ExamService method by its path, as raw bytes
 * (the gateway forwards messages without re-encoding them), and its grpc.health.v1 service, over
 * one channel.
 */
import {
  Client,
  makeClientConstructor,
  type CallOptions,
  type ChannelOptions,
  type ClientReadableStream,
  type ClientUnaryCall,
  type Metadata,
  type ChannelCredentials,
  type ServiceError,
} from '@grpc/grpc-js';
import { service as healthService, type ServingStatus } from 'grpc-health-check';
import { EXAM_SERVICE_NAME } from '../wire';
import { LOCAL_TRANSPORT, type SidecarTransport } from './transport';

export type { ServingStatus };

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
  creds: ChannelCredentials,
  options: Record<string, unknown>,
) => HealthClient;

/** grpc-js channel options capping message sizes both ways; the server takes the same keys. */
export function messageSizeOptions(maxMessageBytes: number): ChannelOptions {
  return {
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.max_send_message_length': maxMessageBytes,
  };
}

/** Passes a message's bytes through untouched, both ways. */
export const identity = (bytes: Buffer): Buffer => bytes;

/**
 * A client for one sidecar address (`unix:/path.sock` or `host:port`), over `transport`
 * (plaintext by default; TLS and a token for a remote sidecar).
 */
export class SidecarClient {
  private readonly channel: Client;
  private readonly health: HealthClient;

  constructor(
    readonly address: string,
    options: ChannelOptions = {},
    transport: SidecarTransport = LOCAL_TRANSPORT,
  ) {
    const { credentials, interceptors } = transport;
    this.channel = new Client(address, credentials, { ...transport.options, ...options, interceptors });
    // Interceptors belong to a client, not to the channel it shares: health sends the token too.
    this.health = new HealthClientConstructor(address, credentials, {
      channelOverride: this.channel.getChannel(),
      interceptors,
    });
  }

  /**
   * Calls a unary method (`/package.Service/Method`) with a serialized request; resolves with the
   * serialized response. A failed call rejects with the sidecar's ServiceError, trailers included;
   * aborting `signal` cancels the call and rejects with the signal's reason.
   */
  unary(
    path: string,
    request: Buffer,
    metadata: Metadata,
    options: Partial<CallOptions>,
    signal?: AbortSignal,
  ): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      if (signal?.aborted) return reject(signal.reason as Error);
      const onAbort = (): void => {
        reject(signal?.reason as Error);
        call.cancel();
      };
      const call: ClientUnaryCall = this.channel.makeUnaryRequest(
        path,
        identity,
        identity,
        request,
        metadata,
        options,
        (error, response) => {
          signal?.removeEventListener('abort', onAbort);
          if (error) reject(error);
          else resolve(response as Buffer);
        },
      );
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** Calls a server-streaming method with a serialized request; the caller reads, and cancels, the stream. */
  serverStream(
    path: string,
    request: Buffer,
    metadata: Metadata,
    options: Partial<CallOptions>,
  ): ClientReadableStream<Buffer> {
    return this.channel.makeServerStreamRequest(path, identity, identity, request, metadata, options);
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
    this.channel.close();
  }
}
