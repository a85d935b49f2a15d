/**
 * Server reflection, so `grpcurl -plaintext HOST:PORT list` and `describe` work. The descriptors
 * come from the proto files themselves: the exam contract, health and reflection.
 */
import path from 'node:path';
import { loadSync } from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { protoPath as healthProtoPath } from 'grpc-health-check';
import { PACKAGE_ROOT } from '../config';

const EXAM_PROTO = path.join(PACKAGE_ROOT, 'proto', 'golem', 'exam', 'v1', 'exam.proto');
const REFLECTION_PROTO = path.join(
  path.dirname(require.resolve('@grpc/reflection/package.json')),
  'build',
  'proto',
  'grpc',
  'reflection',
  'v1',
  'reflection.proto',
);

/** Builds the reflection service describing everything the gateway serves. */
export function createReflection(): ReflectionService {
  const definition = loadSync([EXAM_PROTO, healthProtoPath, REFLECTION_PROTO], {
    keepCase: true,
    includeDirs: [path.join(PACKAGE_ROOT, 'proto')],
  });
  return new ReflectionService(definition);
}
