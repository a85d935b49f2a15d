import { ProgressBar, progressLine, type ProgressStream } from '../../src/cli/progress';
import type { ExamPlan } from '../../src/gen/golem/exam/v1/exam';

const PLAN: ExamPlan = {
  examName: 'genres',
  items: 5,
  models: ['__base__', 'a'],
  scorers: ['x'],
  results: 10,
  resumed: 4,
};

function recorder(isTTY: boolean): ProgressStream & { text: string } {
  const stream = {
    isTTY,
    text: '',
    write(chunk: string): boolean {
      stream.text += chunk;
      return true;
    },
  };
  return stream;
}

describe('progress bar', () => {
  it('draws nothing at all when the stream is not a terminal', () => {
    const stream = recorder(false);
    const bar = new ProgressBar(stream, () => 0);
    bar.start(PLAN);
    bar.advance(true);
    bar.advance(false);
    bar.clear();
    expect(stream.text).toBe('');
  });

  it('redraws one line with done/total, percent and an ETA from the graded results only', () => {
    const stream = recorder(true);
    let now = 1000;
    const bar = new ProgressBar(stream, () => now);
    bar.start(PLAN);
    for (let i = 0; i < 4; i++) bar.advance(true);
    expect(stream.text.split('\r').pop()).toContain('4/10  40%  ETA --');
    now += 3000;
    bar.advance(false);
    bar.advance(false);
    // Two graded results in 3 s: 1.5 s each, 4 to go.
    expect(stream.text.split('\r').pop()).toContain('6/10  60%  ETA 6s');
    expect(stream.text).not.toContain('\n');
    bar.clear();
    expect(stream.text.endsWith('\r\x1b[2K')).toBe(true);
  });

  it('formats the bar, the percentage and long ETAs', () => {
    expect(progressLine(0, 40, undefined)).toBe(`grading [${'-'.repeat(24)}] 0/40   0%  ETA --`);
    expect(progressLine(40, 40, 0)).toBe(`grading [${'#'.repeat(24)}] 40/40 100%  ETA 0s`);
    expect(progressLine(10, 40, 65_000)).toBe(`grading [${'#'.repeat(6)}${'-'.repeat(18)}] 10/40  25%  ETA 1m05s`);
    expect(progressLine(1, 40, 2 * 3600_000 + 5 * 60_000)).toContain('ETA 2h05m');
  });
});
