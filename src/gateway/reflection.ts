/**
 * Server reflection, so `grpcurl -plaintext HOST:PORT list` and `describe` work, and grpcurl decodes
 * the google.rpc.Status details of golem's errors (ErrorInfo, BadRequest) instead of printing bytes.
 * The exam contract and the google.rpc files come from the descriptor set the gen step builds with
 * their imports; health and reflection come from their packages' own proto files.
 */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fromBinary, toBinary } from '@bufbuild/protobuf';
import { FileDescriptorProtoSchema, FileDescriptorSetSchema } from '@bufbuild/protobuf/wkt';
import type {
  handleBidiStreamingCall,
  Server,
  ServerDuplexStream,
  ServiceDefinition,
  UntypedServiceImplementation,
} from '@grpc/grpc-js';
import {
  loadFileDescriptorSetFromBuffer,
  loadSync,
  type AnyDefinition,
  type EnumTypeDefinition,
  type MessageTypeDefinition,
  type PackageDefinition,
} from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { protoPath as healthProtoPath } from 'grpc-health-check';
import { PACKAGE_ROOT } from '../config';

/** Written by the gen step (Makefile): exam.proto plus google/rpc/{status,error_details}.proto. */
export const DESCRIPTOR_SET_PATH = path.join(PACKAGE_ROOT, 'src', 'gen', 'descriptors.binpb');

const REFLECTION_PROTO = path.join(
  path.dirname(require.resolve('@grpc/reflection/package.json')),
  'build',
  'proto',
  'grpc',
  'reflection',
  'v1',
  'reflection.proto',
);

/** The reflection messages as @grpc/reflection handles them (camelCase, oneofs set). */
interface ReflectionResponse {
  originalRequest?: { allExtensionNumbersOfType?: string };
  errorResponse?: unknown;
  allExtensionNumbersResponse?: { baseTypeName: string; extensionNumber: number[] };
}
type ReflectionCall = ServerDuplexStream<unknown, ReflectionResponse>;

/** What the gateway's reflection serves; `addToServer` adds both reflection versions. */
export interface GatewayReflection {
  addToServer(server: Pick<Server, 'addService'>): void;
}

/** Builds the reflection service describing everything the gateway serves, and the error details. */
export function createReflection(): GatewayReflection {
  const definition = { ...contractDefinition(), ...loadSync([healthProtoPath, REFLECTION_PROTO], { keepCase: true }) };
  const messages = new Set(Object.keys(definition).filter((name) => isMessage(definition[name])));
  const service = new ReflectionService(definition);
  return {
    addToServer: (server) =>
      service.addToServer({
        addService: (reflection: ServiceDefinition, implementation: UntypedServiceImplementation) =>
          server.addService(reflection, withExtensionLists(implementation, messages)),
      }),
  };
}

/**
 * The contract's definition, each entry carrying the descriptor set's own files. proto-loader
 * regroups types into files by package and drops their imports, so grpcurl could not link
 * google.rpc.Status to google.protobuf.Any; reflection serves the first copy of each file it sees.
 */
function contractDefinition(): PackageDefinition {
  if (!existsSync(DESCRIPTOR_SET_PATH)) throw new Error(`${DESCRIPTOR_SET_PATH} is missing: run \`make gen\``);
  const bytes = readFileSync(DESCRIPTOR_SET_PATH);
  const files = fromBinary(FileDescriptorSetSchema, bytes).file.map((file) =>
    Buffer.from(toBinary(FileDescriptorProtoSchema, file)),
  );
  const definition = loadFileDescriptorSetFromBuffer(bytes, { keepCase: true });
  const entries = Object.entries(definition).map(([name, entry]): [string, AnyDefinition] => [
    name,
    isTypeDefinition(entry) ? { ...entry, fileDescriptorProtos: files } : entry,
  ]);
  return Object.fromEntries(entries);
}

/** Messages and enums carry their files; a service is a map of its methods. */
function isTypeDefinition(entry: AnyDefinition): entry is MessageTypeDefinition<object, object> | EnumTypeDefinition {
  return typeof entry.format === 'string';
}

function isMessage(entry: AnyDefinition | undefined): boolean {
  return entry !== undefined && isTypeDefinition(entry) && entry.format === 'Protocol Buffer 3 DescriptorProto';
}

/**
 * @grpc/reflection answers "which extensions does this type have" with NOT_FOUND for a type that
 * has none, where the spec wants an empty list; grpcurl 1.8.6 then gives up decoding that type
 * (error details print as raw bytes). golem declares no extensions, so a known message has none.
 */
function withExtensionLists(
  implementation: UntypedServiceImplementation,
  messages: Set<string>,
): UntypedServiceImplementation {
  const serve = implementation.ServerReflectionInfo as handleBidiStreamingCall<unknown, ReflectionResponse>;
  return {
    ServerReflectionInfo: (call: ReflectionCall) => {
      const write = call.write.bind(call);
      call.write = (response: ReflectionResponse, ...rest: unknown[]) =>
        (write as (chunk: ReflectionResponse, ...more: unknown[]) => boolean)(
          emptyExtensionList(response, messages),
          ...rest,
        );
      serve(call);
    },
  };
}

function emptyExtensionList(response: ReflectionResponse, messages: Set<string>): ReflectionResponse {
  const type = response.originalRequest?.allExtensionNumbersOfType;
  if (!response.errorResponse || type === undefined || !messages.has(type)) return response;
  return {
    ...response,
    errorResponse: undefined,
    allExtensionNumbersResponse: { baseTypeName: type, extensionNumber: [] },
  };
}
