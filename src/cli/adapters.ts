/**
 * `golem adapters load|unload|list` and `golem compare`: calls to a running daemon (none is
 * started for them), each printing one JSON line on stdout and exiting with `exam`'s codes.
 */
import type { ClientUnaryCall, Metadata, ServiceError } from '@grpc/grpc-js';
import {
  CompareAdaptersResponse,
  ExamServiceClient,
  ExamServiceService,
  ListAdaptersResponse,
  LoadAdapterResponse,
} from '../gen/golem/exam/v1/exam';
import { identity } from '../sidecar/client';
import { firstAdapterRoute } from './routing';
import { callMetadata, channelCredentialsFor, cliConfig, daemonAddress } from './daemon';
import { failure, fromError, printOutcome, type ExamOutcome } from './outcome';
import { ExitCode } from './exit-codes';
import { parseCompareInput } from './input';
import { isListening } from './probe';

/** Where and how to reach the daemon, as for `exam`. */
export interface DaemonOptions {
  address?: string;
  configFile?: string;
  tlsCa?: string;
}

/** One registry or comparison call: it starts the call and turns the answer into an outcome. */
type DaemonCall = (
  client: ExamServiceClient,
  metadata: Metadata,
  done: (error: ServiceError | null, outcome?: ExamOutcome) => void,
) => ClientUnaryCall;

/** `golem adapters load NAME PATH [--model M]`. */
export function runLoadAdapter(
  name: string,
  adapterPath: string,
  modelName: string | undefined,
  options: DaemonOptions,
): Promise<ExitCode> {
  return run(options, name, (client, metadata, done) =>
    client.loadAdapter({ name, adapterPath, modelName }, metadata, (error, response) =>
      done(
        error,
        response && success(`loaded ${response.adapter?.name ?? name}`, LoadAdapterResponse.toJSON(response)),
      ),
    ),
  );
}

/** `golem adapters unload NAME [--model M]`. */
export function runUnloadAdapter(
  name: string,
  modelName: string | undefined,
  options: DaemonOptions,
): Promise<ExitCode> {
  return run(options, name, (client, metadata, done) =>
    client.unloadAdapter({ name, modelName }, metadata, (error) => done(error, success(`unloaded ${name}`, {}))),
  );
}

/** `golem adapters list`. */
export function runListAdapters(options: DaemonOptions): Promise<ExitCode> {
  return run(options, undefined, (client, metadata, done) =>
    client.listAdapters({}, metadata, (error, response) =>
      done(
        error,
        response && success(response.adapters.map((a) => a.name).join(', '), ListAdaptersResponse.toJSON(response)),
      ),
    ),
  );
}

/** `golem compare '<json>'`: the JSON line on stdout, a side-by-side table on stderr. */
export function runCompare(input: string, options: DaemonOptions): Promise<ExitCode> {
  const parsed = parseCompareInput(input);
  if (!parsed.ok) {
    const what = parsed.violations.map((v) => `${v.field}: ${v.description}`).join('; ');
    return Promise.resolve(
      printOutcome(
        failure(
          ExitCode.INVALID_INPUT,
          `invalid input: ${what}`,
          'INVALID_ARGUMENT',
          'INVALID_INPUT',
          parsed.violations,
        ),
      ),
    );
  }
  const named = Array.isArray(parsed.request.adapters) ? parsed.request.adapters.map(String) : [];
  const adapters = named.length;
  const method = ExamServiceService.compareAdapters;
  // Sent as the bytes the input parser encoded, like exam's request.
  return run(options, firstAdapterRoute(named), (client, metadata, done) =>
    client.makeUnaryRequest(
      method.path,
      identity,
      method.responseDeserialize,
      Buffer.from(parsed.bytes),
      metadata,
      (error, response) => {
        if (error || !response) return done(error);
        process.stderr.write(compareTable(response));
        done(null, success(`compared ${adapters} adapter(s) with the base`, CompareAdaptersResponse.toJSON(response)));
      },
    ),
  );
}

const ANSWER_WIDTH = 32;

/**
 * One block per prompt: a row per model (base first), its answer (truncated), its token count,
 * and the answer's mean log-probability under each model of the comparison.
 */
export function compareTable(response: CompareAdaptersResponse): string {
  const blocks = response.comparisons.map((comparison) => {
    const models = comparison.answers.map((answer) => answer.model);
    const header = ['model', 'answer', 'tokens', ...models.map((m) => `logp|${m}`)];
    const rows = comparison.answers.map((answer) => [
      answer.model,
      truncate(JSON.stringify(answer.answer), ANSWER_WIDTH),
      String(answer.answerTokens),
      ...models.map((m) => (answer.meanLogprob[m] === undefined ? '-' : answer.meanLogprob[m].toFixed(3))),
    ]);
    const widths = header.map((_, i) => Math.max(...[header, ...rows].map((row) => row[i].length)));
    const line = (row: string[]): string =>
      row
        .map((cell, i) => cell.padEnd(widths[i]))
        .join('  ')
        .trimEnd();
    return [`prompt: ${truncate(JSON.stringify(comparison.prompt), 72)}`, line(header), ...rows.map(line)].join('\n');
  });
  return `${blocks.join('\n\n')}\n`;
}

function truncate(text: string, width: number): string {
  return text.length <= width ? text : `${text.slice(0, width - 1)}…`;
}

function success(result: string, detail: unknown): ExamOutcome {
  return { status: 'success', exitCode: ExitCode.SUCCESS, result, detail };
}

/** Runs one call; `route` is the adapter it is about (routing.ts), none for the registry's list. */
async function run(options: DaemonOptions, route: string | undefined, daemonCall: DaemonCall): Promise<ExitCode> {
  return printOutcome(await outcomeOf(options, route, daemonCall));
}

async function outcomeOf(
  options: DaemonOptions,
  route: string | undefined,
  daemonCall: DaemonCall,
): Promise<ExamOutcome> {
  const loaded = cliConfig(options.configFile);
  if ('exitCode' in loaded) return loaded;
  const { token } = loaded;
  const channelCredentials = channelCredentialsFor(options.tlsCa);
  if ('exitCode' in channelCredentials) return channelCredentials;
  const address = daemonAddress(options.address);
  // Registry calls change a daemon's state: one started just for them would forget it at once.
  if (!(await isListening(address))) {
    const message = `no daemon listens at ${address}; start one with golem serve (or pass --address)`;
    return failure(ExitCode.UNAVAILABLE, message, 'UNAVAILABLE', 'DAEMON_UNAVAILABLE');
  }
  const client = new ExamServiceClient(address, channelCredentials);
  const { metadata, requestId } = callMetadata(token, route);
  try {
    return await new Promise<ExamOutcome>((resolve) => {
      daemonCall(client, metadata, (error, outcome) => {
        if (error) resolve(fromError(error, requestId));
        else if (outcome) resolve(outcome);
      });
    });
  } finally {
    client.close();
  }
}
