/**
 * Traces on the gateway: @opentelemetry/instrumentation-grpc gives every ExamService call a
 * server span that continues the caller's W3C `traceparent`, and the forward to the sidecar a
 * client span, its child, whose `traceparent` the sidecar continues. The GenAI attributes are the
 * sidecar's to set (golem_sidecar/tracing.py): only it knows the model, adapter and tokens.
 *
 * Loaded only when tracing is on (`golem serve` imports this module lazily), so tracing off costs
 * nothing.
 */
import * as grpc from '@grpc/grpc-js';
import { context, propagation } from '@opentelemetry/api';
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-grpc';
import { GrpcInstrumentation } from '@opentelemetry/instrumentation-grpc';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BatchSpanProcessor, SimpleSpanProcessor, TracerProvider, type SpanExporter } from '@opentelemetry/sdk-trace';
import type { GolemConfig } from './config';
import { REQUEST_ID_KEY } from './wire';

// Health probes come every few seconds from balancers and from our own sidecar watch,
// reflection from grpcurl, and the sidecar metrics scrape as often as every 50 ms: spans of
// those would bury the ones that matter.
const UNTRACED_METHODS = ['Check', 'Watch', 'ServerReflectionInfo', 'Scrape'];

/** Tracing as started: `shutdown` flushes the spans not yet exported and removes the patches. */
export interface Tracing {
  shutdown(): Promise<void>;
}

/**
 * Starts tracing for this process: spans go to `tracing.otlpEndpoint` in batches, or, when a test
 * or a debugging session passes one, to `exporter` as each span ends.
 *
 * The instrumentation patches the grpc-js module this process uses directly, rather than through
 * its require hook: the hook only sees grpc-js if it is loaded after this runs, which the CLI's
 * imports do not allow (and jest's module registry never calls it). Patching the shared
 * prototypes (Server.register, Client.make*Request) reaches every server and channel made after
 * this call, which is all of them: the gateway starts after tracing.
 */
export function startTracing(tracing: GolemConfig['tracing'], exporter?: SpanExporter): Tracing {
  const processor = exporter
    ? new SimpleSpanProcessor({ exporter })
    : new BatchSpanProcessor({ exporter: new OTLPTraceExporter({ url: tracing.otlpEndpoint }) });
  const provider = new TracerProvider({
    resource: resourceFromAttributes({ 'service.name': 'golem-gateway' }),
    spanProcessors: [processor],
  });
  // Context must follow a call across the handler's promises to its forward to the sidecar.
  context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
  propagation.setGlobalPropagator(new W3CTraceContextPropagator());
  const instrumentation = new GrpcInstrumentation({
    // Constructed disabled so it installs no require hook; patched by hand below.
    enabled: false,
    ignoreGrpcMethods: UNTRACED_METHODS,
    // The request id joins each span to the log lines of its call.
    metadataToSpanAttributes: { server: { requestMetadata: [REQUEST_ID_KEY] } },
  });
  instrumentation.setTracerProvider(provider);
  const definitions = instrumentation.getModuleDefinitions();
  for (const definition of definitions) definition.patch?.(grpc);
  return {
    shutdown: async () => {
      for (const definition of definitions) definition.unpatch?.(grpc);
      await provider.shutdown();
      propagation.disable();
      context.disable();
    },
  };
}
