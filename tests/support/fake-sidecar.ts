/**
 * A fake sidecar for the error paths a real one will not show on demand. Run as
 * `node fake-sidecar.js MODE STATE_FILE -m golem_sidecar --listen ADDR --config-json JSON`
 * (the argument list the gateway gives its python), see fakeSidecarPython():
 *   hang        health SERVING; TakeExam is accepted and never answered.
 *   serve-once  as hang the first time; every later start dies at start-up (a crash loop).
 */
import { existsSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import {
  loadPackageDefinition,
  Server,
  ServerCredentials,
  type GrpcObject,
  type ServiceDefinition,
} from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { HealthImplementation } from 'grpc-health-check';

const [mode, stateFile, ...rest] = process.argv.slice(2);
const listen = rest[rest.indexOf('--listen') + 1];
const protoRoot = process.env.FAKE_SIDECAR_PROTO_ROOT ?? '';

if (mode === 'serve-once' && existsSync(stateFile)) {
  process.stderr.write('fake sidecar: the model file is gone; cannot start\n');
  process.exit(3);
}
writeFileSync(stateFile, String(process.pid));

const definition = loadSync(path.join(protoRoot, 'golem/exam/v1/exam.proto'), { includeDirs: [protoRoot] });
const loaded = loadPackageDefinition(definition) as unknown as {
  golem: { exam: { v1: GrpcObject & { ExamService: { service: ServiceDefinition } } } };
};
const server = new Server();
// Accepts the call and never answers: only a deadline or a cancellation ends it.
server.addService(loaded.golem.exam.v1.ExamService.service, { TakeExam: () => undefined });
const health = new HealthImplementation({ '': 'SERVING', 'golem.exam.v1.ExamService': 'SERVING' });
health.addToServer(server);
server.bindAsync(listen, ServerCredentials.createInsecure(), (err) => {
  if (err) {
    process.stderr.write(`fake sidecar: cannot listen on ${listen}: ${err.message}\n`);
    process.exit(1);
  }
  process.stderr.write(`fake sidecar (${mode}) serving on ${listen}\n`);
});
process.on('SIGTERM', () => server.tryShutdown(() => process.exit(0)));
