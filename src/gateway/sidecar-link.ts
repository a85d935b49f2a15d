/**
 * The gateway's current connection to its sidecar, and the health it shows. A restarted sidecar
 * gets a fresh client (an old channel would sit out its reconnect backoff); while there is none,
 * calls are refused at once with the reason why instead of waiting on a dead socket.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { HealthImplementation } from 'grpc-health-check';
import { SidecarClient, messageSizeOptions } from '../sidecar/client';
import { LOCAL_TRANSPORT, type SidecarTransport } from '../sidecar/transport';
import { GrpcError, SIDECAR_UNAVAILABLE, statusError } from './errors';
import { setServing } from './health';

export const SHUTTING_DOWN = 'SHUTTING_DOWN';

/** An UNAVAILABLE error with its ErrorInfo reason: retry, later or elsewhere. */
export function unavailable(message: string, reason = SIDECAR_UNAVAILABLE): GrpcError {
  return new GrpcError(statusError(GrpcStatus.UNAVAILABLE, message, reason));
}

export class SidecarLink {
  private client: SidecarClient | undefined;
  private stopWatching: () => void = () => undefined;
  private refusal: GrpcError = unavailable('the sidecar is starting');
  private final = false;

  constructor(
    private readonly health: HealthImplementation,
    private readonly maxMessageBytes: number,
    private readonly transport: SidecarTransport = LOCAL_TRANSPORT,
  ) {}

  /**
   * Connects to a sidecar and mirrors its health. `serving`: it is known to be SERVING already
   * (the supervisor waited for it), so health need not wait for the first watch event.
   */
  connect(address: string, serving: boolean): void {
    if (this.final) return;
    this.close();
    const client = new SidecarClient(address, messageSizeOptions(this.maxMessageBytes), this.transport);
    this.client = client;
    if (serving) setServing(this.health, 'SERVING');
    this.stopWatching = client.watchHealth((status) => setServing(this.health, status));
  }

  /** The client to forward a call to; throws the current refusal when there is none. */
  current(): SidecarClient {
    if (this.final || !this.client) throw this.refusal;
    return this.client;
  }

  /**
   * Health goes NOT_SERVING and new calls get `error`. The client stays open for calls already
   * forwarded (close it after ending them). `final`: for good (shutting down), no later
   * `connect` undoes it.
   */
  refuse(error: GrpcError, final = false): void {
    this.final ||= final;
    this.refusal = error;
    this.stopWatching();
    this.stopWatching = () => undefined;
    setServing(this.health, 'NOT_SERVING');
  }

  /** Closes the client; calls still on it fail. */
  close(): void {
    this.client?.close();
    this.client = undefined;
  }
}
