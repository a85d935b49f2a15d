/**
 * The `golem` command: `serve` runs the daemon, `exam` asks it one question.
 */
import { parseArgs } from 'node:util';
import dotenv from 'dotenv';
import { ConfigError } from '../config';
import { SidecarStartError } from '../sidecar/supervisor';
import { runExam } from './exam';
import { ExitCode } from './exit-codes';
import { runServe } from './serve';

const USAGE = `usage:
  golem serve [--config FILE]
  golem exam '<json>' [--address HOST:PORT] [--config FILE] [--tls-ca FILE]

exam sends the token in $GOLEM_AUTH_TOKEN (or security.authTokenEnv) when set, and talks TLS
  when --tls-ca or $GOLEM_TLS_CA names the CA (or self-signed certificate) to trust.
exam exit codes: 0 success, 1 other failure, 2 invalid input, 3 not found,
  4 failed precondition, 5 unavailable, 6 deadline exceeded, 7 resource exhausted,
  8 permission denied, 9 unauthenticated`;

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
      options: { address: { type: 'string' }, config: { type: 'string' }, 'tls-ca': { type: 'string' } },
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
  });
}

// Even a bad command line gets exam's one JSON line, so scripts always have something to parse.
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
