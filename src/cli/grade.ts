/**
 * `golem grade EXAM`: grades an exam file with the base and adapters through GradeExam's stream.
 * stdout gets the one JSON line (each model's scores and each adapter's deltas); stderr a table
 * of the same numbers and, on a terminal, a progress bar. `--results` keeps every result as it
 * arrives and resumes from them; `--report` writes an HTML page of the summary. Like `exam`, it
 * starts a daemon in this process for the call when none listens.
 */
import { accessSync, constants as fsConstants, existsSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { type Client, type ServiceError, status as GrpcStatus, type StatusObject } from '@grpc/grpc-js';
import {
  ExamServiceService,
  ExamSummary,
  type GradeExamRequest,
  type GradeExamResponse,
} from '../gen/golem/exam/v1/exam';
import { DisagreementCollector } from './disagreements';
import { firstAdapterRoute } from './routing';
import { callMetadata, channelCredentialsFor, cliConfig, connectOrStart, daemonAddress } from './daemon';
import { ExitCode } from './exit-codes';
import { summaryTable } from './grade-summary';
import { cancelOnSignal } from './one-shot';
import { failure, fromError, printOutcome, type ExamOutcome } from './outcome';
import { ProgressBar } from './progress';
import { renderReport, type GradeReport } from './report';
import { ResultsWriter, truncatePartialLine } from './results-file';

/**
 * An exam can take hours on a CPU, far past the gateway's default (limits.requestTimeoutMs), so
 * grade sets its own deadline: a day, unless --timeout-s says otherwise.
 */
export const DEFAULT_GRADE_TIMEOUT_S = 24 * 60 * 60;

export interface GradeOptions {
  exam: string;
  /** Adapter folders or registered names. */
  adapters: string[];
  base: boolean;
  scorers: string[];
  header?: string;
  model?: string;
  /** The results file: appended to, and resumed from. */
  results?: string;
  /** The HTML report to write. */
  report?: string;
  timeoutS: number;
  address?: string;
  configFile?: string;
  tlsCa?: string;
}

/** Runs the grade command, prints its outcome and returns the exit code. */
export async function runGrade(options: GradeOptions): Promise<ExitCode> {
  const progress = new ProgressBar();
  return printOutcome(
    await cancelOnSignal(
      () => grade(options, progress),
      () => progress.clear(),
    ),
  );
}

async function grade(options: GradeOptions, progress: ProgressBar): Promise<ExamOutcome> {
  const loaded = cliConfig(options.configFile);
  if ('exitCode' in loaded) return loaded;
  const { config, token } = loaded;
  const channelCredentials = channelCredentialsFor(options.tlsCa);
  if ('exitCode' in channelCredentials) return channelCredentials;
  const unwritable = checkReportFolder(options.report);
  if (unwritable) return unwritable;
  const results = openResults(options.results);
  if ('exitCode' in results) return results;
  const connection = await connectOrStart(daemonAddress(options.address), channelCredentials, config);
  if ('exitCode' in connection) {
    results.writer?.close();
    return connection;
  }
  const disagreements = new DisagreementCollector();
  let summary: ExamSummary | ExamOutcome;
  try {
    const deadline = Date.now() + options.timeoutS * 1000;
    const record = recorder(progress, results.writer, disagreements);
    summary = await gradeCall(connection.client, gradeRequest(options), token, deadline, record);
  } finally {
    progress.clear();
    results.writer?.close();
    await connection.close();
  }
  if ('exitCode' in summary) return summary;
  return graded(options, summary, disagreements);
}

/** What each message of the stream feeds: the progress bar, the results file, the report. */
function recorder(
  progress: ProgressBar,
  writer: ResultsWriter | undefined,
  disagreements: DisagreementCollector,
): (message: GradeExamResponse) => void {
  return ({ plan, item }) => {
    if (plan) {
      progress.start(plan);
      disagreements.start(plan);
    }
    if (!item) return;
    // A resumed result is already in the file it came from.
    if (!item.resumed) writer?.append(item);
    disagreements.add(item);
    progress.advance(item.resumed);
  };
}

/** The summary on stderr, the report when asked for, and the success line. */
function graded(options: GradeOptions, summary: ExamSummary, disagreements: DisagreementCollector): ExamOutcome {
  process.stderr.write(summaryTable(summary));
  if (options.report !== undefined) {
    const examPath = path.resolve(options.exam);
    const failed = writeReport(options.report, { examPath, summary, ...disagreements.result() });
    if (failed) return failed;
  }
  return {
    status: 'success',
    exitCode: ExitCode.SUCCESS,
    result: scoresOf(summary),
    detail: ExamSummary.toJSON(summary),
  };
}

/**
 * The result's numbers with every field written out: proto3 JSON leaves out zeros, so a base
 * that scored 0 would show no "mean" at all, and a script reading the line would have to know
 * that absent means 0.
 */
export function scoresOf(summary: ExamSummary): { models: unknown[]; deltas: unknown[] } {
  return {
    models: summary.models.map(({ model, adapterHash, scores }) => ({
      model,
      adapterHash,
      scores: scores.map(({ scorer, mean, n }) => ({ scorer, mean, n })),
    })),
    deltas: summary.deltas.map(({ model, deltas }) => ({
      model,
      deltas: deltas.map(({ scorer, delta, n, better, worse, same }) => ({ scorer, delta, n, better, worse, same })),
    })),
  };
}

/**
 * The request, its paths absolute from this process's cwd (the daemon may run elsewhere). An
 * adapter that is not an existing path is a registered name and goes as it is.
 */
export function gradeRequest(options: GradeOptions): GradeExamRequest {
  return {
    examPath: path.resolve(options.exam),
    headerPath: options.header === undefined ? undefined : path.resolve(options.header),
    modelName: options.model,
    includeBase: options.base,
    adapters: options.adapters.map((adapter) => (existsSync(adapter) ? path.resolve(adapter) : adapter)),
    scorers: options.scorers,
    device: undefined,
    quantization: undefined,
    resumePath: options.results === undefined ? undefined : path.resolve(options.results),
  };
}

// Found before the exam runs, not after hours of grading.
function checkReportFolder(report: string | undefined): ExamOutcome | undefined {
  if (report === undefined) return undefined;
  const folder = path.dirname(path.resolve(report));
  try {
    accessSync(folder, fsConstants.W_OK);
    return undefined;
  } catch (err) {
    const message = `cannot write the report ${report} (--report): ${(err as Error).message}`;
    return failure(ExitCode.INVALID_INPUT, message, 'INVALID_ARGUMENT', 'INVALID_COMMAND_LINE');
  }
}

function writeReport(file: string, report: GradeReport): ExamOutcome | undefined {
  try {
    writeFileSync(file, renderReport(report));
    process.stderr.write(`golem: report written to ${file}\n`);
    return undefined;
  } catch (err) {
    const message = `graded, but cannot write the report ${file} (--report): ${(err as Error).message}`;
    return failure(ExitCode.FAILURE, message, 'INTERNAL', 'REPORT_NOT_WRITTEN');
  }
}

// A run killed mid-write left a partial last line: cut it, so the appended lines start whole.
function openResults(file: string | undefined): { writer?: ResultsWriter } | ExamOutcome {
  if (file === undefined) return {};
  try {
    truncatePartialLine(file);
    return { writer: ResultsWriter.open(file) };
  } catch (err) {
    const message = `cannot write the results file ${file} (--results): ${(err as Error).message}`;
    return failure(ExitCode.INVALID_INPUT, message, 'INVALID_ARGUMENT', 'INVALID_COMMAND_LINE');
  }
}

/**
 * The GradeExam stream: each message goes to `onMessage` as it comes; the summary, or the
 * failure, is the answer. A message `onMessage` cannot take (a results file that cannot be
 * written) cancels the call: grading on without keeping the results would waste the work.
 */
function gradeCall(
  client: Client,
  request: GradeExamRequest,
  token: string | undefined,
  deadline: number,
  onMessage: (message: GradeExamResponse) => void,
): Promise<ExamSummary | ExamOutcome> {
  const { metadata, requestId } = callMetadata(token, firstAdapterRoute(request.adapters));
  const method = ExamServiceService.gradeExam;
  return new Promise((resolve) => {
    let summary: ExamSummary | undefined;
    const stream = client.makeServerStreamRequest(
      method.path,
      method.requestSerialize,
      method.responseDeserialize,
      request,
      metadata,
      { deadline },
    );
    stream.on('data', (message: GradeExamResponse) => {
      try {
        onMessage(message);
      } catch (err) {
        resolve(failure(ExitCode.FAILURE, `grading stopped: ${(err as Error).message}`, 'CANCELLED', 'LOCAL_FAILURE'));
        stream.cancel();
      }
      if (message.summary) summary = message.summary;
    });
    stream.on('error', (error: ServiceError) => resolve(fromError(error, requestId)));
    stream.on('status', (status: StatusObject) => {
      if (status.code !== GrpcStatus.OK) return;
      resolve(summary ?? failure(ExitCode.FAILURE, 'the stream ended without its summary', 'INTERNAL', 'NO_SUMMARY'));
    });
  });
}
