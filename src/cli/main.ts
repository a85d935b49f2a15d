/**
 * The `golem` command: `serve` runs the daemon, `exam` asks it one question, `adapters` manages
 * its named adapters, `compare` sets adapters against the base and `grade` grades an exam file.
 */
import { parseArgs } from 'node:util';
import dotenv from 'dotenv';
import { ConfigError } from '../config';
import { SidecarStartError } from '../sidecar/supervisor';
import { runCompare, runListAdapters, runLoadAdapter, runUnloadAdapter } from './adapters';
import { runExam } from './exam';
import { ExitCode } from './exit-codes';
import { DEFAULT_GRADE_TIMEOUT_S, runGrade } from './grade';
import { runServe } from './serve';

const USAGE = `usage:
  golem serve [--config FILE]
  golem exam '<json>' [--stream] [--address HOST:PORT] [--config FILE] [--tls-ca FILE]
  golem adapters load NAME PATH [--model M] [--address HOST:PORT] [--config FILE] [--tls-ca FILE]
  golem adapters unload NAME [--model M] [--address HOST:PORT] [--config FILE] [--tls-ca FILE]
  golem adapters list [--address HOST:PORT] [--config FILE] [--tls-ca FILE]
  golem compare '<json>' [--address HOST:PORT] [--config FILE] [--tls-ca FILE]
  golem grade EXAM [--adapter PATH|NAME]... [--base] [--scorer NAME]... [--header FILE] [--model M]
    [--results FILE] [--report FILE] [--timeout-s S] [--address HOST:PORT] [--config FILE] [--tls-ca FILE]

exam input: the proto3 JSON of TakeExamRequest: modelName, adapterPath, adapterName, prompt,
  maxNewTokens, device, quantization {loadIn4Bit, bnb4BitComputeDtype, bnb4BitQuantType,
  bnb4BitUseDoubleQuant}, expectedAnswer, disableAdapter, temperature, topP, topK, seed, stop, repetitionPenalty.
exam --stream prints the answer on stderr as it is generated; stdout gets the usual JSON line.
compare input: the proto3 JSON of CompareAdaptersRequest: {"prompts": [...], "adapters": [...], "modelName"?, "maxNewTokens"?};
  it prints a table on stderr: per prompt, each model's answer, tokens and mean log-prob under each model.
grade grades the exam file EXAM (JSONL; docs/exams.md) with the bare base (--base) and each
  --adapter (a folder, or a registered adapter's name); --scorer replaces the header's scorers.
  It prints each model's mean per scorer and each adapter's delta from the base on stderr, with a
  progress bar when stderr is a terminal. --results FILE appends every result as a JSON line and
  resumes from the file's results when run again; --report FILE writes an HTML report.
  --timeout-s: the call's deadline, ${DEFAULT_GRADE_TIMEOUT_S} s (a day) by default.
adapters and compare need a running daemon (golem serve); exam and grade start one for the call if
  none runs.
Every command but serve prints one JSON line {status, exitCode, message?, result?, detail?} on stdout.
exam sends the token in $GOLEM_AUTH_TOKEN (or security.authTokenEnv) when set, and talks TLS
  when --tls-ca or $GOLEM_TLS_CA names the CA (or self-signed certificate) to trust.
exit codes: 0 success, 1 other failure, 2 invalid input, 3 not found,
  4 failed precondition, 5 unavailable, 6 deadline exceeded, 7 resource exhausted,
  8 permission denied, 9 unauthenticated, 10 already exists`;

/** Runs the command line (without `node` and the script) and returns the exit code. */
export async function main(argv: string[]): Promise<number> {
  // quiet: dotenv would otherwise announce itself on stdout, which belongs to exam's JSON line.
  dotenv.config({ quiet: true });
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'serve':
        return await serve(rest);
      case 'exam':
        return await exam(rest);
      case 'adapters':
        return await adapters(rest);
      case 'compare':
        return await compare(rest);
      case 'grade':
        return await grade(rest);
      case 'help':
      case '--help':
      case '-h':
        process.stdout.write(`${USAGE}\n`);
        return 0;
      default:
        process.stderr.write(`golem: unknown command ${JSON.stringify(command ?? '')}\n${USAGE}\n`);
        return ExitCode.INVALID_INPUT;
    }
  } catch (err) {
    // A bad config or a sidecar that will not start is the user's to fix; anything else is ours.
    if (err instanceof ConfigError) {
      process.stderr.write(`golem: error: ${err.message}\n`);
      return ExitCode.INVALID_INPUT;
    }
    if (err instanceof SidecarStartError) {
      process.stderr.write(`golem: error: ${err.message}\n`);
      return ExitCode.UNAVAILABLE;
    }
    process.stderr.write(`golem: error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    return ExitCode.FAILURE;
  }
}

async function serve(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({ args, options: { config: { type: 'string' } }, strict: true });
  } catch (err) {
    process.stderr.write(`golem: error: ${(err as Error).message}\n${USAGE}\n`);
    return ExitCode.INVALID_INPUT;
  }
  return runServe(parsed.values.config);
}

async function exam(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: { ...DAEMON_OPTIONS, stream: { type: 'boolean' } },
      allowPositionals: true,
      strict: true,
    });
  } catch (err) {
    return usageError((err as Error).message);
  }
  if (parsed.positionals.length !== 1) {
    return usageError(`exam takes one JSON argument, got ${parsed.positionals.length}`);
  }
  return runExam({
    input: parsed.positionals[0],
    address: parsed.values.address,
    configFile: parsed.values.config,
    tlsCa: parsed.values['tls-ca'],
    stream: parsed.values.stream,
  });
}

const DAEMON_OPTIONS = {
  address: { type: 'string' },
  config: { type: 'string' },
  'tls-ca': { type: 'string' },
} as const;

async function adapters(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: { ...DAEMON_OPTIONS, model: { type: 'string' } },
      allowPositionals: true,
      strict: true,
    });
  } catch (err) {
    return usageError((err as Error).message);
  }
  const { values } = parsed;
  const options = { address: values.address, configFile: values.config, tlsCa: values['tls-ca'] };
  const [verb, ...operands] = parsed.positionals;
  const expected: Record<string, number> = { load: 2, unload: 1, list: 0 };
  if (verb === undefined || !(verb in expected)) {
    return usageError(`adapters takes load, unload or list, got ${JSON.stringify(verb ?? '')}`);
  }
  if (operands.length !== expected[verb]) {
    return usageError(`adapters ${verb} takes ${expected[verb]} argument(s), got ${operands.length}`);
  }
  if (verb === 'list' && values.model !== undefined) return usageError('adapters list takes no --model');
  if (verb === 'load') return runLoadAdapter(operands[0], operands[1], values.model, options);
  if (verb === 'unload') return runUnloadAdapter(operands[0], values.model, options);
  return runListAdapters(options);
}

async function compare(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({ args, options: DAEMON_OPTIONS, allowPositionals: true, strict: true });
  } catch (err) {
    return usageError((err as Error).message);
  }
  if (parsed.positionals.length !== 1) {
    return usageError(`compare takes one JSON argument, got ${parsed.positionals.length}`);
  }
  const { values } = parsed;
  return runCompare(parsed.positionals[0], {
    address: values.address,
    configFile: values.config,
    tlsCa: values['tls-ca'],
  });
}

async function grade(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        ...DAEMON_OPTIONS,
        adapter: { type: 'string', multiple: true },
        base: { type: 'boolean' },
        scorer: { type: 'string', multiple: true },
        header: { type: 'string' },
        model: { type: 'string' },
        results: { type: 'string' },
        report: { type: 'string' },
        'timeout-s': { type: 'string' },
      },
      allowPositionals: true,
      strict: true,
    });
  } catch (err) {
    return usageError((err as Error).message);
  }
  if (parsed.positionals.length !== 1) {
    return usageError(`grade takes one exam file, got ${parsed.positionals.length} arguments`);
  }
  const { values } = parsed;
  const timeoutS = values['timeout-s'] === undefined ? DEFAULT_GRADE_TIMEOUT_S : Number(values['timeout-s']);
  if (!(Number.isFinite(timeoutS) && timeoutS > 0)) {
    return usageError(`--timeout-s must be a positive number of seconds, got ${JSON.stringify(values['timeout-s'])}`);
  }
  return runGrade({
    exam: parsed.positionals[0],
    adapters: values.adapter ?? [],
    base: values.base ?? false,
    scorers: values.scorer ?? [],
    header: values.header,
    model: values.model,
    results: values.results,
    report: values.report,
    timeoutS,
    address: values.address,
    configFile: values.config,
    tlsCa: values['tls-ca'],
  });
}

// Even a bad command line gets the one JSON line, so scripts always have something to parse.
function usageError(message: string): number {
  const outcome = {
    status: 'failure',
    exitCode: ExitCode.INVALID_INPUT,
    message,
    detail: { code: 'INVALID_ARGUMENT', reason: 'INVALID_COMMAND_LINE', fieldViolations: [] },
  };
  process.stdout.write(`${JSON.stringify(outcome)}\n`);
  process.stderr.write(`golem: error: ${message}\n${USAGE}\n`);
  return ExitCode.INVALID_INPUT;
}
