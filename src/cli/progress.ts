/**
 * `golem grade`'s progress on stderr: one line redrawn in place ("\r") with the results done out
 * of the plan's, the percentage and an ETA. Drawn only on a terminal: a log file or a pipe gets
 * none of it.
 */
import type { ExamPlan } from '../gen/golem/exam/v1/exam';

const BAR_WIDTH = 24;

/** The stream the bar draws on: a terminal's, or one that is not and gets nothing. */
export interface ProgressStream {
  isTTY?: boolean;
  write(text: string): boolean;
}

export class ProgressBar {
  private total = 0;
  private done = 0;
  private graded = 0;
  private startedMs = 0;
  private drawn = false;

  constructor(
    private readonly stream: ProgressStream = process.stderr,
    private readonly now: () => number = Date.now,
  ) {}

  /** The plan has come: the work is known, the clock starts. */
  start(plan: ExamPlan): void {
    this.total = plan.results;
    this.startedMs = this.now();
    this.draw();
  }

  /** One more result; resumed ones cost no time, so they do not count in the rate. */
  advance(resumed: boolean): void {
    this.done += 1;
    if (!resumed) this.graded += 1;
    this.draw();
  }

  /** Clears the line, so what is written next starts on a clean one. */
  clear(): void {
    if (!this.drawn) return;
    this.stream.write('\r\x1b[2K');
    this.drawn = false;
  }

  private draw(): void {
    if (!this.stream.isTTY) return;
    this.stream.write(`\r\x1b[2K${progressLine(this.done, this.total, this.eta())}`);
    this.drawn = true;
  }

  // Time per graded result so far, times the results still to come (resumed ones come at once).
  private eta(): number | undefined {
    if (this.graded === 0) return undefined;
    return ((this.now() - this.startedMs) / this.graded) * (this.total - this.done);
  }
}

/** `[#####-------] 12/40  30%  ETA 1m05s`; the ETA is `--` until a result has been graded. */
export function progressLine(done: number, total: number, etaMs: number | undefined): string {
  const fraction = total === 0 ? 1 : Math.min(1, done / total);
  const filled = Math.round(fraction * BAR_WIDTH);
  const bar = `${'#'.repeat(filled)}${'-'.repeat(BAR_WIDTH - filled)}`;
  const percent = `${Math.floor(fraction * 100)}%`.padStart(4);
  return `grading [${bar}] ${done}/${total} ${percent}  ETA ${etaMs === undefined ? '--' : duration(etaMs)}`;
}

function duration(ms: number): string {
  const seconds = Math.round(ms / 1000);
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (h > 0) return `${h}h${String(m).padStart(2, '0')}m`;
  if (m > 0) return `${m}m${String(s).padStart(2, '0')}s`;
  return `${s}s`;
}
