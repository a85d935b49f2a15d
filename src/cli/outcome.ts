/**
 * The one JSON line every command but `serve` prints on stdout, and how a failed call becomes one:
 * the same shape (status, exitCode, message, result, detail) whatever the command.
 */
import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { parseErrorDetails, type FieldViolation } from '../gateway/errors';
import { ExitCode, exitCodeForStatus } from './exit-codes';

/** The one line a command prints on stdout. */
export interface ExamOutcome {
  status: 'success' | 'failure';
  exitCode: ExitCode;
  message?: string;
  result?: unknown;
  detail?: unknown;
}

/** The outcome for a failed call: its code's exit code, and its details. */
export function fromError(error: ServiceError, requestId: string): ExamOutcome {
  const details = parseErrorDetails(error.metadata);
  const code = GrpcStatus[error.code] ?? String(error.code);
  const message = `${code}: ${error.details} (request ${requestId})`;
  return failure(exitCodeForStatus(error.code), message, code, details.reason ?? '', details.fieldViolations);
}

export function failure(
  exitCode: ExitCode,
  message: string,
  code: string,
  reason: string,
  fieldViolations: FieldViolation[] = [],
): ExamOutcome {
  return { status: 'failure', exitCode, message, detail: { code, reason, fieldViolations } };
}

/** Prints the outcome's line (and a failure's message on stderr); returns its exit code. */
export function printOutcome(outcome: ExamOutcome): ExitCode {
  process.stdout.write(`${JSON.stringify(outcome)}\n`);
  if (outcome.status === 'failure') process.stderr.write(`golem: error: ${outcome.message}\n`);
  return outcome.exitCode;
}
