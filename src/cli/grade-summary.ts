/**
 * `golem grade`'s summary for people, on stderr: each model's mean per scorer, then each
 * adapter's change from the base with how many items got better, worse or stayed the same.
 */
import type { ExamSummary } from '../gen/golem/exam/v1/exam';

const MODEL_WIDTH = 40;

export function summaryTable(summary: ExamSummary): string {
  const version = summary.examVersion ? ` v${summary.examVersion}` : '';
  const heading =
    `exam ${summary.examName}${version}: ${summary.items} items, ` +
    `${summary.graded} results graded, ${summary.resumed} resumed`;
  const scorers = summary.models[0]?.scores.map((score) => score.scorer) ?? [];
  const rows = [
    ['model', ...scorers],
    ...summary.models.map((model) => [
      shorten(model.model),
      ...scorers.map((scorer) => {
        const score = model.scores.find((s) => s.scorer === scorer);
        return score ? `${score.mean.toFixed(3)} (n=${score.n})` : '-';
      }),
    ]),
  ];
  const deltas = summary.deltas.flatMap((adapter) =>
    adapter.deltas.map(
      (d) =>
        `delta ${shorten(adapter.model)} ${d.scorer}: ${signed(d.delta)} ` +
        `(n=${d.n}: ${d.better} better, ${d.worse} worse, ${d.same} same)`,
    ),
  );
  return [heading, ...table(rows), ...deltas].join('\n') + '\n';
}

function table(rows: string[][]): string[] {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
  return rows.map((row) =>
    row
      .map((cell, i) => cell.padEnd(widths[i]))
      .join('  ')
      .trimEnd(),
  );
}

// Adapter folders are absolute paths: their end is what tells them apart.
function shorten(model: string): string {
  return model.length <= MODEL_WIDTH ? model : `…${model.slice(model.length - MODEL_WIDTH + 1)}`;
}

function signed(value: number): string {
  return `${value >= 0 ? '+' : ''}${value.toFixed(3)}`;
}
