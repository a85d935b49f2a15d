/**
 * `golem grade --report out.html`: one self-contained HTML page of an exam's result. Styles are
 * inline and there is no script and no external resource, so the file reads offline, in any
 * browser, mailed or archived, exactly as written.
 */
import type { ExamSummary, ItemResult } from '../gen/golem/exam/v1/exam';
import { escapeHtml } from './html';
import { renderCharts } from './report-chart';

/** An item whose primary score differs between the bare base and one adapter. */
export interface Disagreement {
  itemId: string;
  model: string;
  base: ItemResult;
  adapter: ItemResult;
}

/** Everything the report shows. */
export interface GradeReport {
  examPath: string;
  summary: ExamSummary;
  /** At most MAX_DISAGREEMENTS, in stream order. */
  disagreements: Disagreement[];
  /** Disagreements beyond MAX_DISAGREEMENTS, counted but not shown. */
  disagreementsOmitted: number;
}

/** Disagreement rows kept in a report; a whole exam of them would make the page unreadable. */
export const MAX_DISAGREEMENTS = 200;

/** The model label of the bare base in results and summaries. */
export const BASE_MODEL = '__base__';

/**
 * Scores are shown with 3 decimals: enough to tell exact_match means of a few hundred items apart
 * (1/300 ≈ 0.003), and the exact value stays in each cell's data-mean attribute.
 */
export function formatScore(value: number): string {
  return value.toFixed(3);
}

/** A delta with its sign; one that rounds to zero shows as 0.000 rather than -0.000. */
export function formatDelta(delta: number): string {
  const text = formatScore(delta);
  if (Number(text) === 0) return formatScore(0);
  return delta > 0 ? `+${text}` : text;
}

/** The first scorer the run used: its verdict decides what "disagree" means. */
export function primaryScorer(summary: ExamSummary): string | undefined {
  return summary.models[0]?.scores[0]?.scorer;
}

/**
 * Whether base and adapter disagree on an item. Their answers nearly always differ as text (a
 * word more, other punctuation), so the text cannot be the test: the exam's own verdict is, the
 * score of its first scorer.
 */
export function disagreement(base: ItemResult, adapter: ItemResult, primaryScorer: string): boolean {
  return base.scores[primaryScorer] !== adapter.scores[primaryScorer];
}

/** The report as one HTML document. */
export function renderReport(report: GradeReport): string {
  const { summary } = report;
  const title = `${summary.examName} ${summary.examVersion}`.trim();
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>golem grade: ${escapeHtml(title)}</title>
<style>${STYLE}</style></head>
<body>
${renderHeading(report)}
<h2>Scores</h2>
${renderSummaryTable(summary)}
${renderCharts(summary, formatScore)}
<h2>Adapter minus base</h2>
${renderDeltas(summary)}
<h2>Disagreements</h2>
${renderDisagreements(report)}
</body></html>
`;
}

const STYLE = `body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:24px 0 8px}
.meta{color:#555;margin:2px 0}code{font-size:13px}
table{border-collapse:collapse;margin:4px 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
small{color:#666}.answer{white-space:pre-wrap;max-width:360px;font-family:ui-monospace,monospace;font-size:12px}
.better{color:#0a7a2f}.worse{color:#b3261e}
.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:4px 16px;margin:12px 0 4px}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #e3e3e3}
.chart text{font-size:10px;fill:#333}.chart .title{font-size:12px;font-weight:600}.chart .axis{stroke:#888}`;

/** The first 12 digits of a hash, past any "sha256:"-like prefix; the page keeps the whole one in a tooltip. */
function shortHash(hash: string): string {
  return hash.replace(/^[a-z0-9]+:/i, '').slice(0, 12);
}

function renderHeading({ examPath, summary }: GradeReport): string {
  const model = summary.model;
  const fourBit = model?.quantization?.loadIn4bit ? 'yes' : 'no';
  return `<h1>${escapeHtml(summary.examName)} <small>version ${escapeHtml(summary.examVersion)}</small></h1>
<p class="meta">Exam <code>${escapeHtml(examPath)}</code>, hash <code title="${escapeHtml(summary.examHash)}">${escapeHtml(shortHash(summary.examHash))}</code>: ${summary.items} items; ${summary.graded} results graded, ${summary.resumed} resumed.</p>
<p class="meta">Base <code>${escapeHtml(model?.modelName ?? '')}</code> on ${escapeHtml(model?.device ?? '')}, dtype ${escapeHtml(model?.dtype ?? '')}, 4-bit: ${fourBit}.</p>`;
}

function renderSummaryTable(summary: ExamSummary): string {
  const scorers = summary.models[0]?.scores.map((s) => s.scorer) ?? [];
  const head = scorers.map((s) => `<th>${escapeHtml(s)}</th>`).join('');
  const rows = summary.models.map((m) => {
    const cells = m.scores.map(
      (s) =>
        `<td class="num" data-model="${escapeHtml(m.model)}" data-scorer="${escapeHtml(s.scorer)}" data-mean="${s.mean}"><span class="mean">${formatScore(s.mean)}</span> <small class="n">n=${s.n}</small></td>`,
    );
    return `<tr><th>${escapeHtml(m.model)}</th>${cells.join('')}</tr>`;
  });
  return `<table id="summary"><thead><tr><th>model</th>${head}</tr></thead><tbody>${rows.join('')}</tbody></table>`;
}

function renderDeltas(summary: ExamSummary): string {
  if (summary.deltas.length === 0) return '<p id="deltas">The bare base was not graded, so there are no deltas.</p>';
  const rows = summary.deltas.flatMap((a) =>
    a.deltas.map(
      (d) =>
        `<tr><td>${escapeHtml(a.model)}</td><td>${escapeHtml(d.scorer)}</td><td class="num ${d.delta > 0 ? 'better' : d.delta < 0 ? 'worse' : ''}" data-model="${escapeHtml(a.model)}" data-scorer="${escapeHtml(d.scorer)}" data-delta="${d.delta}">${formatDelta(d.delta)}</td><td class="num">${d.n}</td><td class="num">${d.better}</td><td class="num">${d.worse}</td><td class="num">${d.same}</td></tr>`,
    ),
  );
  return `<table id="deltas"><thead><tr><th>adapter</th><th>scorer</th><th>Δ mean</th><th>n</th><th>better</th><th>worse</th><th>same</th></tr></thead><tbody>${rows.join('')}</tbody></table>`;
}

function renderDisagreements({ summary, disagreements, disagreementsOmitted }: GradeReport): string {
  const scorer = primaryScorer(summary) ?? '';
  const rule = `<p>Items where an adapter's ${escapeHtml(scorer)} score differs from the bare base's (the first scorer decides).</p>`;
  if (!summary.models.some((m) => m.model === BASE_MODEL))
    return '<p id="no-disagreements">The bare base was not graded, so there is nothing to disagree with.</p>';
  if (disagreements.length === 0)
    return `${rule}<p id="no-disagreements">No item where an adapter and the base disagree.</p>`;
  const score = (r: ItemResult): string => {
    // Absent when the scorer does not apply to the item (choice_accuracy without choices).
    const value = r.scores[scorer];
    return value === undefined ? '–' : formatScore(value);
  };
  const rows = disagreements.map(
    (d) =>
      `<tr><td>${escapeHtml(d.itemId)}</td><td>${escapeHtml(d.model)}</td><td class="answer">${escapeHtml(d.base.answer)}</td><td class="num">${score(d.base)}</td><td class="answer">${escapeHtml(d.adapter.answer)}</td><td class="num">${score(d.adapter)}</td></tr>`,
  );
  const omitted =
    disagreementsOmitted > 0
      ? `<p id="disagreements-omitted">${disagreementsOmitted} more disagreements omitted: a report keeps the first ${MAX_DISAGREEMENTS}.</p>`
      : '';
  return `${rule}<table id="disagreements"><thead><tr><th>item</th><th>adapter</th><th>base answer</th><th>base score</th><th>adapter answer</th><th>adapter score</th></tr></thead><tbody>${rows.join('')}</tbody></table>${omitted}`;
}
