/**
 * `golem grade --results FILE`: one ItemResult per line (proto3 JSON), appended as each arrives,
 * so an interrupted run can be resumed from it (GradeExamRequest.resume_path). Every line is
 * written by one synchronous call as its result arrives: a kill at any moment leaves whole lines
 * and at most one partial last line, which the next run cuts off before resuming.
 */
import { closeSync, ftruncateSync, fstatSync, openSync, readSync, writeSync } from 'node:fs';
import { ItemResult } from '../gen/golem/exam/v1/exam';

const NEWLINE = 0x0a;
const CHUNK_BYTES = 64 * 1024;

/**
 * Cuts the file back to just after its last newline (to empty when it has none); a missing file
 * is left missing. Returns the number of bytes cut.
 */
export function truncatePartialLine(file: string): number {
  let fd: number;
  try {
    fd = openSync(file, 'r+');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0;
    throw err;
  }
  try {
    const size = fstatSync(fd).size;
    const keep = endOfLastLine(fd, size);
    if (keep < size) ftruncateSync(fd, keep);
    return size - keep;
  } finally {
    closeSync(fd);
  }
}

// Reads backwards a chunk at a time: only the partial line's bytes are read, however big the file.
function endOfLastLine(fd: number, size: number): number {
  const chunk = Buffer.alloc(CHUNK_BYTES);
  let end = size;
  while (end > 0) {
    const start = Math.max(0, end - CHUNK_BYTES);
    const read = readSync(fd, chunk, 0, end - start, start);
    const newline = chunk.subarray(0, read).lastIndexOf(NEWLINE);
    if (newline >= 0) return start + newline + 1;
    end = start;
  }
  return 0;
}

/** Appends results to the results file, one line each, written before `append` returns. */
export class ResultsWriter {
  private constructor(private readonly fd: number) {}

  /** Opens (creating it when missing) the file for appending; cut it with truncatePartialLine first. */
  static open(file: string): ResultsWriter {
    return new ResultsWriter(openSync(file, 'a'));
  }

  append(result: ItemResult): void {
    const line = Buffer.from(`${JSON.stringify(ItemResult.toJSON(result))}\n`);
    let written = 0;
    while (written < line.length) written += writeSync(this.fd, line, written);
  }

  close(): void {
    closeSync(this.fd);
  }
}
