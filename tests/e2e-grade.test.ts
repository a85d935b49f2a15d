/**
 * `golem grade` end to end: the built command against a real `golem serve` on the tiny model.
 * Scores, deltas, the results file and resuming after a SIGKILL, the progress bar on a terminal
 * (and nowhere else), refusals of bad exams, and the HTML report read back in Chromium.
 */
import { execFile } from 'node:child_process';
import { appendFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT } from '../src/config';
import { formatScore } from '../src/cli/report';
import { openInChromium, summaryCells } from './support/chromium';
import {
  buildCli,
  CLI_ENV,
  GOLEM,
  golem,
  serve,
  startGolem,
  stopDaemon,
  type Daemon,
  type ExamRun,
} from './support/daemon';
import { tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';
import { sleep } from './support/wait';

/** An ExamSummary's JSON as the command prints it (proto3 JSON: zeros are left out). */
interface ScoreJson {
  scorer: string;
  mean?: number;
  n?: number;
}
interface SummaryJson {
  items: number;
  graded?: number;
  resumed?: number;
  models: Array<{ model: string; adapterHash?: string; scores: ScoreJson[] }>;
  deltas?: Array<{
    model: string;
    deltas: Array<ScoreJson & { delta?: number; better?: number; worse?: number; same?: number }>;
  }>;
}

/** The summary's numbers with the zeros proto3 JSON leaves out written in, as `result` has them. */
function filledIn(summary: SummaryJson): unknown {
  return {
    models: summary.models.map((m) => ({
      model: m.model,
      adapterHash: m.adapterHash ?? '',
      scores: m.scores.map((s) => ({ scorer: s.scorer, mean: s.mean ?? 0, n: s.n ?? 0 })),
    })),
    deltas: (summary.deltas ?? []).map((a) => ({
      model: a.model,
      deltas: a.deltas.map((d) => ({
        scorer: d.scorer,
        delta: d.delta ?? 0,
        n: d.n ?? 0,
        better: d.better ?? 0,
        worse: d.worse ?? 0,
        same: d.same ?? 0,
      })),
    })),
  };
}
interface ResultJson {
  itemId: string;
  model: string;
  scores?: Record<string, number>;
}

const GENRES = ['Fantasy', 'Horror', 'Romance', 'Science fiction', 'Mystery', 'Adventure'];

// `script` (util-linux) runs a command on a pseudo-terminal: the only way to give the CLI a TTY.
const SCRIPT = ['/usr/bin/script', '/bin/script'].find((file) => existsSync(file));

function lines(file: string): string[] {
  return readFileSync(file, 'utf8').split('\n').filter(Boolean);
}

/** Whole lines: those ended by a newline. */
function wholeLines(file: string): number {
  return existsSync(file) ? readFileSync(file, 'utf8').split('\n').length - 1 : 0;
}

/** Polls often: the tiny model grades a result every few milliseconds. */
async function waitForLines(file: string, count: number, timeoutMs = 60000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (wholeLines(file) < count) {
    if (Date.now() > deadline) throw new Error(`${file} had no ${count} lines within ${timeoutMs} ms`);
    await sleep(2);
  }
}

function summaryOf(run: ExamRun): SummaryJson {
  return run.json.detail as SummaryJson;
}

describe('golem grade end to end', () => {
  let models: TinyModels;
  let dir: string;
  let daemon: Daemon;
  let address: string;
  let smallExam: string;
  let smallHeader: string;
  let bigExam: string;

  beforeAll(async () => {
    buildCli();
    models = tinyModels();
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-grade-'));
    const config = tinyConfig(models);
    // One item per window (a batch of 2: base and adapter), so a run of 40 items streams its
    // results over a few seconds and a kill lands mid-run; every run batches alike, too.
    const limits = { ...config.limits, maxBatchSize: 2 };
    const configFile = path.join(dir, 'golem.json');
    writeFileSync(configFile, JSON.stringify({ ...config, limits, logLevel: 'info' }));
    daemon = serve(configFile);
    address = await daemon.ready;

    smallExam = path.join(dir, 'small.jsonl');
    const small = GENRES.slice(0, 5).map((genre, i) => ({
      id: `q${i}`,
      question: `Which genre is book ${i}?`,
      answer: genre,
    }));
    small.push({ id: 'mc', question: 'Which genre is dune?', answer: 'Science fiction', choices: GENRES } as never);
    writeFileSync(smallExam, small.map((item) => JSON.stringify(item)).join('\n') + '\n');
    // Not beside the exam under its stem: only --header finds it.
    smallHeader = path.join(dir, 'header-for-small.yaml');
    writeFileSync(
      smallHeader,
      'name: small\nversion: 2\nscorers: [exact_match, contains, mean_logprob, choice_accuracy]\n' +
        'generation:\n  max_new_tokens: 4\n',
    );
    bigExam = path.join(dir, 'big.jsonl');
    const big = Array.from({ length: 40 }, (_, i) => ({
      id: `b${i}`,
      question: `Which genre is volume ${i}?`,
      answer: GENRES[i % GENRES.length],
    }));
    writeFileSync(bigExam, big.map((item) => JSON.stringify(item)).join('\n') + '\n');
    writeFileSync(
      path.join(dir, 'big.yaml'),
      'scorers: [exact_match, mean_logprob]\ngeneration: {max_new_tokens: 4}\n',
    );
  });

  afterAll(async () => {
    await stopDaemon(daemon);
    rmSync(dir, { recursive: true, force: true });
  });

  const gradeSmall = (...extra: string[]): Promise<ExamRun> =>
    golem([
      'grade',
      smallExam,
      '--header',
      smallHeader,
      '--base',
      '--adapter',
      models.adapter,
      '--address',
      address,
      ...extra,
    ]);

  const gradeBig = (results: string): string[] => [
    'grade',
    bigExam,
    '--base',
    '--adapter',
    models.adapter,
    '--results',
    results,
    '--address',
    address,
  ];

  it('grades base and adapter: one JSON line, each delta the adapter mean minus the base mean', async () => {
    const run = await gradeSmall();
    expect(run.code).toBe(0);
    expect(run.json).toMatchObject({ status: 'success', exitCode: 0 });
    const summary = summaryOf(run);
    expect(run.json.result).toEqual(filledIn(summary));
    expect(summary).toMatchObject({ items: 6, graded: 12 });
    expect(summary.models.map((m) => m.model)).toEqual(['__base__', models.adapter]);
    const [base, adapter] = summary.models;
    expect(base.scores.map((s) => s.scorer)).toEqual(['exact_match', 'contains', 'mean_logprob', 'choice_accuracy']);
    // choice_accuracy applies to the one multiple-choice item only.
    expect(base.scores.map((s) => s.n)).toEqual([6, 6, 6, 1]);
    const mean = (scores: ScoreJson[], scorer: string): number => scores.find((s) => s.scorer === scorer)?.mean ?? 0;
    expect(mean(base.scores, 'mean_logprob')).toBeLessThan(0);
    expect(summary.deltas).toHaveLength(1);
    const deltas = summary.deltas?.[0].deltas ?? [];
    expect(deltas.map((d) => d.scorer)).toEqual(base.scores.map((s) => s.scorer));
    for (const d of deltas) {
      const expected = mean(adapter.scores, d.scorer) - mean(base.scores, d.scorer);
      expect(Math.abs((d.delta ?? 0) - expected)).toBeLessThanOrEqual(1e-9);
    }
    // Both numbers for people on stderr: each model's means, the adapter's delta.
    expect(run.stderr).toContain('exam small v2: 6 items, 12 results graded, 0 resumed');
    expect(run.stderr).toContain(formatScore(mean(base.scores, 'mean_logprob')));
    expect(run.stderr).toMatch(/delta .*adapter mean_logprob: [+-]\d\.\d{3} \(n=6: \d+ better, \d+ worse, \d+ same\)/);
    // Not a terminal: no progress bar.
    expect(run.stderr).not.toContain('\r');
    expect(run.stderr).not.toContain('grading [');
  });

  it('keeps results in --results and, killed mid-run, resumes to the same result', async () => {
    const whole = path.join(dir, 'whole.jsonl');
    const first = await golem(gradeBig(whole));
    expect(first.code).toBe(0);
    expect(lines(whole)).toHaveLength(80);

    const resumed = path.join(dir, 'resumed.jsonl');
    const killed = startGolem(gradeBig(resumed));
    await waitForLines(resumed, 6);
    killed.child.kill('SIGKILL');
    await killed.exited;
    const kept = wholeLines(resumed);
    // The kill landed mid-run: there is something left to grade.
    expect(kept).toBeLessThan(80);
    // As a kill in the middle of a write leaves it: the CLI cuts it before resuming.
    appendFileSync(resumed, '{"itemId":"b3","mod');

    const second = await golem(gradeBig(resumed));
    expect(second.code).toBe(0);
    expect(second.json.result).toEqual(first.json.result);
    expect(summaryOf(second).resumed).toBe(kept);
    expect(kept).toBeGreaterThanOrEqual(6);
    const results = lines(resumed).map((line) => JSON.parse(line) as ResultJson);
    expect(results).toHaveLength(80);
    expect(new Set(results.map((r) => `${r.itemId}\0${r.model}`)).size).toBe(80);
  });

  it('on SIGINT cancels the call, prints CANCELLED, exits 1, and keeps whole result lines', async () => {
    const results = path.join(dir, 'interrupted.jsonl');
    const run = startGolem(gradeBig(results));
    await waitForLines(results, 2);
    run.child.kill('SIGINT');
    expect(await run.exited).toBe(1);
    expect(JSON.parse(run.stdout())).toMatchObject({ status: 'failure', exitCode: 1, detail: { code: 'CANCELLED' } });
    const text = readFileSync(results, 'utf8');
    expect(text.endsWith('\n')).toBe(true);
    for (const line of lines(results)) expect(JSON.parse(line)).toHaveProperty('itemId');
    // The daemon is free again.
    expect((await gradeSmall()).code).toBe(0);
  });

  (SCRIPT ? it : it.skip)(
    `draws a progress bar when stderr is a terminal${SCRIPT ? '' : ' (skipped: no util-linux `script` for a pty)'}`,
    async () => {
      const args = ['node', GOLEM, 'grade', smallExam, '--header', smallHeader, '--base', '--address', address];
      const command = args.map((arg) => `'${arg.replace(/'/g, `'\\''`)}'`).join(' ');
      const { code, output } = await new Promise<{ code: number; output: string }>((resolve) => {
        execFile(SCRIPT ?? '', ['-qefc', command, '/dev/null'], { env: CLI_ENV, cwd: PACKAGE_ROOT }, (error, stdout) =>
          resolve({ code: error ? Number(error.code) : 0, output: stdout }),
        );
      });
      expect(code).toBe(0);
      expect(output).toContain('\r\x1b[2Kgrading [');
      expect(output).toMatch(/grading \[[#-]{24}\] \d+\/6 +\d+%/);
      expect(output).toContain('grading [########################] 6/6 100%');
      expect(output).toContain('"status":"success"');
    },
  );

  it('refuses an unknown scorer with exit 2, suggesting the closest name', async () => {
    const run = await gradeSmall('--scorer', 'exact_match', '--scorer', 'containz');
    expect(run.code).toBe(2);
    expect(run.json).toMatchObject({ status: 'failure', exitCode: 2, detail: { code: 'INVALID_ARGUMENT' } });
    expect(run.json.message).toContain('scorers');
    expect(run.json.message).toContain("did you mean 'contains'");
    expect((await gradeSmall()).code).toBe(0);
  });

  it('refuses a malformed exam line with exit 2, naming the file and the line', async () => {
    const bad = path.join(dir, 'malformed.jsonl');
    writeFileSync(bad, '{"id": "a", "question": "Q?", "answer": "A"}\n{"id": "b", "question": \n');
    const run = await golem(['grade', bad, '--base', '--address', address]);
    expect(run.code).toBe(2);
    expect(run.json).toMatchObject({ status: 'failure', exitCode: 2, detail: { code: 'INVALID_ARGUMENT' } });
    expect(run.json.message).toContain('malformed.jsonl:2:');
    expect((await gradeSmall()).code).toBe(0);
  });

  it('fails with exit 3 when the exam file does not exist', async () => {
    const run = await golem(['grade', path.join(dir, 'missing.jsonl'), '--base', '--address', address]);
    expect(run.code).toBe(3);
    expect(run.json).toMatchObject({ status: 'failure', exitCode: 3, detail: { code: 'NOT_FOUND' } });
    expect(run.json.message).toContain('missing.jsonl');
    expect((await gradeSmall()).code).toBe(0);
  });

  it('writes --report, whose summary table in Chromium shows the numbers of the JSON line', async () => {
    const report = path.join(dir, 'report.html');
    const run = await gradeSmall('--report', report);
    expect(run.code).toBe(0);
    expect(existsSync(report)).toBe(true);
    const expected = summaryOf(run).models.flatMap((model) =>
      model.scores.map((score) => ({
        model: model.model,
        scorer: score.scorer,
        mean: score.mean ?? 0,
        n: score.n ?? 0,
      })),
    );
    const { browser, page } = await openInChromium(report);
    try {
      const cells = await summaryCells(page);
      expect(cells).toHaveLength(expected.length);
      for (const want of expected) {
        const cell = cells.find((c) => c.model === want.model && c.scorer === want.scorer);
        expect(cell?.text).toBe(formatScore(want.mean));
        expect(cell?.n).toBe(`n=${want.n}`);
      }
    } finally {
      await browser.close();
    }
  });
});
