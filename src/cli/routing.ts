/**
 * The `x-golem-adapter` header the CLI sets on every call about an adapter: a mesh in front of
 * several replicas hashes on it, so each adapter's calls land on the replica that already holds it
 * (deploy/envoy, docs/deploy.md). golem itself never reads it.
 */
import type { JsonObject } from '@bufbuild/protobuf';

/** The route of calls answered by the bare base. */
export const BASE_ROUTE = '__base__';

/** A TakeExamRequest's adapter, as its proto3 JSON names it; left out, the configured default's. */
export function examRoute(request: JsonObject, defaultAdapterPath: string): string {
  if (typeof request.adapterName === 'string') return request.adapterName;
  if (request.disableAdapter === true) return BASE_ROUTE;
  return typeof request.adapterPath === 'string' ? request.adapterPath : defaultAdapterPath;
}

/** A call about several models (CompareAdapters, GradeExam) follows its first adapter. */
export function firstAdapterRoute(adapters: readonly string[]): string {
  return adapters[0] ?? BASE_ROUTE;
}
