/**
 * The contract as data: the descriptors protoc wrote for exam.proto and the google.rpc protos it
 * uses (src/gen/descriptors.binpb). The CLI parses proto3 JSON through them and the gateway
 * debug-logs messages through them, so neither keeps a hand-written copy of a message's fields.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import {
  createFileRegistry,
  fromBinary,
  type DescMessage,
  type DescService,
  type FileRegistry,
} from '@bufbuild/protobuf';
import { FileDescriptorSetSchema } from '@bufbuild/protobuf/wkt';
import { PACKAGE_ROOT } from './config';
import { EXAM_SERVICE_NAME, serviceOfPath } from './wire';

// Under src/ even when running from dist/: protoc writes it next to the generated code.
const DESCRIPTORS = path.join(PACKAGE_ROOT, 'src', 'gen', 'descriptors.binpb');

let registry: FileRegistry | undefined;

/** Every message, enum and service of the contract, read once. */
export function contractRegistry(): FileRegistry {
  registry ??= createFileRegistry(fromBinary(FileDescriptorSetSchema, readFileSync(DESCRIPTORS)));
  return registry;
}

/** The descriptor of a message by its full name, e.g. `golem.exam.v1.TakeExamRequest`. */
export function messageDescriptor(typeName: string): DescMessage {
  const desc = contractRegistry().getMessage(typeName);
  if (!desc) throw new Error(`${typeName} is not in ${DESCRIPTORS}; regenerate it (make gen)`);
  return desc;
}

/** The ExamService descriptor: its methods with their input and output messages. */
export function examServiceDescriptor(): DescService {
  const desc = contractRegistry().getService(EXAM_SERVICE_NAME);
  if (!desc) throw new Error(`${EXAM_SERVICE_NAME} is not in ${DESCRIPTORS}; regenerate it (make gen)`);
  return desc;
}

/** The input and output messages of an ExamService method by its path, if it has one. */
export function methodMessages(methodPath: string): { input: DescMessage; output: DescMessage } | undefined {
  if (serviceOfPath(methodPath) !== EXAM_SERVICE_NAME) return undefined;
  const name = methodPath.slice(methodPath.lastIndexOf('/') + 1);
  const method = examServiceDescriptor().methods.find((m) => m.name === name);
  return method && { input: method.input, output: method.output };
}
