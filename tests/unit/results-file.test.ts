import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ResultsWriter, truncatePartialLine } from '../../src/cli/results-file';
import { FinishReason, ItemResult } from '../../src/gen/golem/exam/v1/exam';

function result(itemId: string, model: string): ItemResult {
  return {
    itemId,
    model,
    key: `key-${itemId}-${model}`,
    answer: 'Fantasy',
    answerTokens: 2,
    finishReason: FinishReason.FINISH_REASON_LENGTH,
    scores: { exact_match: 1, mean_logprob: -0.125 },
    resumed: false,
  };
}

describe('results file', () => {
  let dir: string;
  let file: string;

  beforeEach(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-results-'));
    file = path.join(dir, 'results.jsonl');
  });

  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('cuts a partial last line, keeping every whole line', () => {
    writeFileSync(file, '{"itemId":"a"}\n{"itemId":"b"}\n{"itemId":"c","ans');
    expect(truncatePartialLine(file)).toBe('{"itemId":"c","ans'.length);
    expect(readFileSync(file, 'utf8')).toBe('{"itemId":"a"}\n{"itemId":"b"}\n');
  });

  it('leaves a file that ends in a newline as it is', () => {
    writeFileSync(file, '{"itemId":"a"}\n');
    expect(truncatePartialLine(file)).toBe(0);
    expect(readFileSync(file, 'utf8')).toBe('{"itemId":"a"}\n');
  });

  it('empties a file that holds only a partial line', () => {
    writeFileSync(file, '{"itemId":"a"');
    expect(truncatePartialLine(file)).toBe(13);
    expect(readFileSync(file, 'utf8')).toBe('');
  });

  it('finds the last newline more than one read chunk back', () => {
    const partial = 'x'.repeat(200 * 1024);
    writeFileSync(file, `{"itemId":"a"}\n${partial}`);
    expect(truncatePartialLine(file)).toBe(partial.length);
    expect(readFileSync(file, 'utf8')).toBe('{"itemId":"a"}\n');
  });

  it('leaves a missing file missing', () => {
    expect(truncatePartialLine(file)).toBe(0);
    expect(existsSync(file)).toBe(false);
  });

  it('appends one proto3-JSON line per result, which reads back as the same result', () => {
    writeFileSync(file, `${JSON.stringify(ItemResult.toJSON(result('old', '__base__')))}\n`);
    const writer = ResultsWriter.open(file);
    writer.append(result('q1', '__base__'));
    writer.append(result('q1', '/adapters/genres'));
    writer.close();
    const lines = readFileSync(file, 'utf8').split('\n');
    expect(lines.pop()).toBe('');
    expect(lines.map((line) => ItemResult.fromJSON(JSON.parse(line)))).toEqual([
      result('old', '__base__'),
      result('q1', '__base__'),
      result('q1', '/adapters/genres'),
    ]);
    expect(JSON.parse(lines[1])).toMatchObject({ itemId: 'q1', model: '__base__', scores: { exact_match: 1 } });
  });
});
