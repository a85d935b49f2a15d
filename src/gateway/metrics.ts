/**
 * golem's Prometheus endpoint, on a port of its own (`metrics.listen`): the gateway's metrics
 * (prom-client) followed by its sidecar's, which the gateway fetches at each scrape over the
 * channel it already holds (golem.sidecar.v1.SidecarMetricsService/Scrape), so one scrape shows
 * both processes at one moment and a scraper needs one address. docs/metrics.md lists every name.
 *
 * The two never share a name: the gateway's all start `golem_gateway_`, which the sidecar never
 * uses, so the texts join without a second HELP or TYPE line for any family.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';
import { Metadata, ServerInterceptingCall, status as GrpcStatus, type ServerInterceptor } from '@grpc/grpc-js';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import { ScrapeRequest, ScrapeResponse, SidecarMetricsServiceService } from '../gen/golem/sidecar/v1/metrics';
import type { Logger } from '../log';
import type { SidecarLink } from './sidecar-link';

// Seconds, from a health check to a long generation; the sidecar's histograms use the same.
const DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
// A scrape every 50 ms must not queue up behind a wedged sidecar: past this it reports the
// gateway's own metrics, with golem_gateway_sidecar_up 0.
const SIDECAR_SCRAPE_TIMEOUT_MS = 1000;
const SCRAPE_REQUEST = Buffer.from(ScrapeRequest.encode({}).finish());

/** The gateway's instruments, in a registry of their own (no process metrics: see docs/metrics.md). */
export class GatewayMetrics {
  readonly registry = new Registry();
  private readonly calls = new Counter({
    name: 'golem_gateway_requests_total',
    help: 'Calls the gateway finished, by method and status code, those it refused itself included.',
    labelNames: ['method', 'code'],
    registers: [this.registry],
  });
  private readonly durations = new Histogram({
    name: 'golem_gateway_request_duration_seconds',
    help: "Time from a call's arrival at the gateway to its status, by method.",
    labelNames: ['method'],
    buckets: DURATION_BUCKETS,
    registers: [this.registry],
  });
  private readonly sidecarUp = new Gauge({
    name: 'golem_gateway_sidecar_up',
    help: "1 when this scrape holds the sidecar's metrics, 0 when the sidecar could not be read.",
    registers: [this.registry],
  });

  /** Counts a call that ended with `code`, `seconds` after it arrived. */
  callEnded(method: string, code: GrpcStatus, seconds: number): void {
    this.calls.inc({ method, code: GrpcStatus[code] });
    this.durations.observe({ method }, seconds);
  }

  /** The gateway's metrics and then the sidecar's, as one text exposition. */
  async exposition(link: SidecarLink): Promise<string> {
    const sidecar = await sidecarText(link);
    this.sidecarUp.set(sidecar === undefined ? 0 : 1);
    return (await this.registry.metrics()) + (sidecar ?? '');
  }
}

/**
 * A server interceptor that counts every call as it ends: its status as sent, or CANCELLED when
 * the caller left first. Placed before the refusals (shutdown, auth), so they are counted too.
 */
export function callMetrics(metrics: GatewayMetrics): ServerInterceptor {
  return (method, call) => {
    const started = performance.now();
    let ended = false;
    const end = (code: GrpcStatus): void => {
      if (ended) return;
      ended = true;
      metrics.callEnded(method.path.slice(1), code, (performance.now() - started) / 1000);
    };
    return new ServerInterceptingCall(call, {
      start: (next) => next({ onCancel: () => end(GrpcStatus.CANCELLED) }),
      sendStatus: (status, passOn) => {
        end(status.code);
        passOn(status);
      },
    });
  };
}

async function sidecarText(link: SidecarLink): Promise<string | undefined> {
  try {
    const options = { deadline: Date.now() + SIDECAR_SCRAPE_TIMEOUT_MS };
    const path = SidecarMetricsServiceService.scrape.path;
    const bytes = await link.current().unary(path, SCRAPE_REQUEST, new Metadata(), options);
    return ScrapeResponse.decode(bytes).text;
  } catch {
    // Starting, restarting or gone: the gateway's metrics still answer, and say so.
    return undefined;
  }
}

export interface MetricsEndpoint {
  /** `host:port` as bound, with the real port when 0 was asked for. */
  address: string;
  close(): Promise<void>;
}

/** Serves GET /metrics on `listen` (`host:port`, `[v6]:port`) until closed. */
export async function serveMetrics(
  listen: string,
  metrics: GatewayMetrics,
  link: SidecarLink,
  logger: Logger,
): Promise<MetricsEndpoint> {
  const server = createServer((request, response) => {
    void answer(request, response, metrics, link, logger);
  });
  const colon = listen.lastIndexOf(':');
  const host = listen.slice(0, colon).replace(/^\[(.*)\]$/, '$1');
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(Number(listen.slice(colon + 1)), host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  const address = `${listen.slice(0, colon)}:${port}`;
  logger.info('metrics listening', { address, path: '/metrics' });
  return {
    address,
    close: () =>
      new Promise<void>((resolve) => {
        // Scrapers keep their connections open between scrapes; they must not hold shutdown.
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

async function answer(
  request: IncomingMessage,
  response: ServerResponse,
  metrics: GatewayMetrics,
  link: SidecarLink,
  logger: Logger,
): Promise<void> {
  const path = (request.url ?? '').split('?')[0];
  if (path !== '/metrics' || (request.method !== 'GET' && request.method !== 'HEAD')) {
    response.writeHead(404, { 'content-type': 'text/plain' }).end('not found: GET /metrics\n');
    return;
  }
  try {
    const text = await metrics.exposition(link);
    response.writeHead(200, { 'content-type': metrics.registry.contentType }).end(text);
  } catch (err) {
    logger.error('metrics scrape failed', { error: (err as Error).message });
    response.writeHead(500, { 'content-type': 'text/plain' }).end('metrics failed\n');
  }
}
