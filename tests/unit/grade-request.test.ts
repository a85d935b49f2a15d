import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { gradeRequest, type GradeOptions } from '../../src/cli/grade';

describe('gradeRequest', () => {
  let dir: string;
  let cwd: string;

  beforeAll(() => {
    cwd = process.cwd();
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-grade-request-'));
    mkdirSync(path.join(dir, 'adapters', 'genres'), { recursive: true });
    process.chdir(dir);
  });

  afterAll(() => {
    process.chdir(cwd);
    rmSync(dir, { recursive: true, force: true });
  });

  const options: GradeOptions = {
    exam: 'exams/books.jsonl',
    adapters: ['adapters/genres', 'registered-name'],
    base: true,
    scorers: ['exact_match'],
    header: 'exams/books.yaml',
    results: 'out/results.jsonl',
    timeoutS: 60,
  };

  it('sends paths absolute from the CLI cwd, and an adapter that is no path as its name', () => {
    const request = gradeRequest(options);
    expect(request).toMatchObject({
      examPath: path.join(dir, 'exams', 'books.jsonl'),
      headerPath: path.join(dir, 'exams', 'books.yaml'),
      resumePath: path.join(dir, 'out', 'results.jsonl'),
      adapters: [path.join(dir, 'adapters', 'genres'), 'registered-name'],
      includeBase: true,
      scorers: ['exact_match'],
    });
  });

  it('leaves out what the command line left out', () => {
    const request = gradeRequest({ ...options, header: undefined, results: undefined, model: undefined });
    expect(request.headerPath).toBeUndefined();
    expect(request.resumePath).toBeUndefined();
    expect(request.modelName).toBeUndefined();
  });
});
