/**
 * Traces end to end: a caller's span, the gateway's server and client spans (in this process,
 * into the SDK's in-memory exporter) and the sidecar's server span (in its process, written by
 * its debug exporter, `tracing.sidecarSpansFile`) make one trace, each span the child of the one
 * before, and the sidecar's carries the GenAI attributes.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Metadata } from '@grpc/grpc-js';
import { context, propagation, SpanKind, trace } from '@opentelemetry/api';
import { InMemorySpanExporter, SimpleSpanProcessor, TracerProvider, type ReadableSpan } from '@opentelemetry/sdk-trace';
import { startGateway, type Gateway } from '../src/gateway/server';
import type { ExamServiceClient } from '../src/gen/golem/exam/v1/exam';
import { startTracing, type Tracing } from '../src/tracing';
import { examClient, takeExam } from './support/grpc';
import { tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';
import { waitFor } from './support/wait';

process.env.HF_HUB_OFFLINE = '1';
const TAKE_EXAM = 'golem.exam.v1.ExamService/TakeExam';

/** A span as the Python SDK writes it (ReadableSpan.to_json): ids as 0x-prefixed hex. */
interface SidecarSpan {
  name: string;
  kind: string;
  context: { trace_id: string; span_id: string };
  parent_id: string | null;
  attributes: Record<string, unknown>;
}

function sidecarSpans(file: string): SidecarSpan[] {
  if (!existsSync(file)) return [];
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((line) => JSON.parse(line) as SidecarSpan);
}

function gatewaySpan(spans: ReadableSpan[], kind: SpanKind): ReadableSpan {
  const found = spans.filter((span) => span.kind === kind && span.name === `grpc.${TAKE_EXAM}`);
  expect(found).toHaveLength(1);
  return found[0];
}

describe('traces through gateway and sidecar', () => {
  let models: TinyModels;
  let folder: string;
  let spansFile: string;
  let exporter: InMemorySpanExporter;
  let tracing: Tracing;
  let gateway: Gateway;
  let client: ExamServiceClient;

  beforeAll(async () => {
    models = tinyModels();
    folder = mkdtempSync(path.join(os.tmpdir(), 'golem-traces-'));
    spansFile = path.join(folder, 'sidecar-spans.jsonl');
    const config = { ...tinyConfig(models), tracing: { otlpEndpoint: '', sidecarSpansFile: spansFile } };
    exporter = new InMemorySpanExporter();
    tracing = startTracing(config.tracing, exporter);
    gateway = await startGateway(config);
    client = examClient(gateway.address);
  });

  afterAll(async () => {
    client?.close();
    await gateway?.close();
    await tracing?.shutdown();
    rmSync(folder, { recursive: true, force: true });
  });

  it('One traced call through gateway and sidecar gives one trace, with parent and child spans and the GenAI attributes', async () => {
    // The caller: its own tracer, its span's context sent as a W3C traceparent.
    const caller = new TracerProvider({ spanProcessors: [new SimpleSpanProcessor({ exporter })] }).getTracer('caller');
    const callerSpan = caller.startSpan('caller');
    const metadata = new Metadata();
    metadata.set('x-request-id', 'traced-call-1');
    propagation.inject(trace.setSpan(context.active(), callerSpan), metadata, {
      set: (carrier, key, value) => carrier.set(key, value),
    });
    expect(metadata.get('traceparent')).toHaveLength(1);
    const { response, error } = await takeExam(client, { maxNewTokens: 3 }, metadata);
    callerSpan.end();
    expect(error).toBeUndefined();
    const traceId = callerSpan.spanContext().traceId;

    const spans = exporter.getFinishedSpans();
    const server = gatewaySpan(spans, SpanKind.SERVER);
    const forward = gatewaySpan(spans, SpanKind.CLIENT);
    expect(server.spanContext().traceId).toBe(traceId);
    expect(server.parentSpanContext?.spanId).toBe(callerSpan.spanContext().spanId);
    expect(forward.spanContext().traceId).toBe(traceId);
    expect(forward.parentSpanContext?.spanId).toBe(server.spanContext().spanId);
    expect(server.attributes['rpc.grpc.status_code']).toBe(0);
    expect(server.attributes['rpc.request.metadata.x_request_id']).toEqual(['traced-call-1']);

    // The sidecar writes its span as it ends, just before its answer leaves.
    const inTrace = (): SidecarSpan[] => sidecarSpans(spansFile).filter((s) => s.context.trace_id === `0x${traceId}`);
    await waitFor(() => inTrace().length > 0, 10000, "the sidecar's span in its spans file");
    const [sidecar, ...others] = inTrace();
    expect(others).toEqual([]);
    expect(sidecar.name).toBe(`/${TAKE_EXAM}`);
    expect(sidecar.kind).toBe('SpanKind.SERVER');
    expect(sidecar.parent_id).toBe(`0x${forward.spanContext().spanId}`);
    expect(sidecar.attributes).toMatchObject({
      'gen_ai.operation.name': 'text_completion',
      'gen_ai.request.model': models.adapter,
      'golem.base_model': models.model,
      'gen_ai.request.max_tokens': 3,
      'gen_ai.usage.input_tokens': response?.promptTokens,
      'gen_ai.usage.output_tokens': response?.answerTokens,
    });
    expect(response?.answerTokens).toBeGreaterThan(0);
  });

  it("makes no spans of health probes, the gateway's own watch of its sidecar included", () => {
    const names = [...exporter.getFinishedSpans().map((s) => s.name), ...sidecarSpans(spansFile).map((s) => s.name)];
    expect(names.length).toBeGreaterThan(0);
    expect(names.filter((name) => name.includes('grpc.health'))).toEqual([]);
  });
});
