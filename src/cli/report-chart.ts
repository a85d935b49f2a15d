/**
 * The report's chart: one small inline SVG bar chart per scorer, one bar per model. Each scorer
 * gets its own scale because their ranges differ (exact_match lies in [0, 1], mean_logprob is
 * negative and unbounded), and every scale includes 0 so a bar's direction shows its sign.
 */
import type { ExamSummary } from '../gen/golem/exam/v1/exam';
import { escapeHtml } from './html';

const WIDTH = 260;
const HEIGHT = 180;
// Room for the y axis' label and tick values (left), the title (top) and the x axis' label (bottom).
const PLOT = { left: 58, right: WIDTH - 10, top: 28, bottom: HEIGHT - 30 };
// Readable on white and told apart by most colour-blind readers (Okabe–Ito); the base is grey.
const PALETTE = ['#7f7f7f', '#0072b2', '#e69f00', '#009e73', '#cc79a7', '#d55e00', '#56b4e9', '#f0e442', '#000000'];

/** The bar colour of the model at `index` in summary.models. */
export function modelColor(index: number): string {
  return PALETTE[index % PALETTE.length];
}

/** A legend (model name beside its bar colour) and one chart per scorer, as HTML. */
export function renderCharts(summary: ExamSummary, format: (value: number) => string): string {
  const legend = summary.models
    .map(
      (m, i) =>
        `<li><svg width="12" height="12" aria-hidden="true"><rect width="12" height="12" fill="${modelColor(i)}"/></svg> ${escapeHtml(m.model)}</li>`,
    )
    .join('');
  const scorers = summary.models[0]?.scores.map((s) => s.scorer) ?? [];
  const charts = scorers.map((scorer) => scorerChart(summary, scorer, format)).join('');
  return `<ul class="legend">${legend}</ul><div class="charts">${charts}</div>`;
}

function scorerChart(summary: ExamSummary, scorer: string, format: (value: number) => string): string {
  const means = summary.models.map((m) => m.scores.find((s) => s.scorer === scorer)?.mean ?? 0);
  const low = Math.min(0, ...means);
  const high = Math.max(0, ...means);
  const span = high - low || 1; // all zero: any scale draws flat bars on the zero line
  const y = (v: number): number => PLOT.top + ((high - v) / span) * (PLOT.bottom - PLOT.top);
  const slot = (PLOT.right - PLOT.left) / means.length;
  const bars = means.map((mean, i) => {
    const x = PLOT.left + i * slot + slot * 0.15;
    const top = y(Math.max(mean, 0));
    const height = Math.max(y(Math.min(mean, 0)) - top, 1);
    // Value labels sit beyond the bar's end: above a positive bar, below a negative one.
    const labelY = mean < 0 ? top + height + 11 : top - 3;
    return (
      `<rect x="${x.toFixed(1)}" y="${top.toFixed(1)}" width="${(slot * 0.7).toFixed(1)}" height="${height.toFixed(1)}" fill="${modelColor(i)}"><title>${escapeHtml(summary.models[i].model)}: ${format(mean)}</title></rect>` +
      `<text x="${(x + slot * 0.35).toFixed(1)}" y="${labelY.toFixed(1)}" text-anchor="middle" class="value">${format(mean)}</text>`
    );
  });
  const ticks = [...new Set([high, 0, low])]
    .map(
      (v) =>
        `<text x="${PLOT.left - 4}" y="${(y(v) + 3).toFixed(1)}" text-anchor="end" class="tick">${format(v)}</text>`,
    )
    .join('');
  const name = escapeHtml(scorer);
  const mid = (PLOT.top + PLOT.bottom) / 2;
  return (
    `<svg class="chart" data-scorer="${name}" width="${WIDTH}" height="${HEIGHT}" viewBox="0 0 ${WIDTH} ${HEIGHT}" role="img" aria-label="${name}: mean score per model">` +
    `<text x="${WIDTH / 2}" y="14" text-anchor="middle" class="title">${name}</text>` +
    `<line x1="${PLOT.left}" y1="${PLOT.top}" x2="${PLOT.left}" y2="${PLOT.bottom}" class="axis"/>` +
    `<line x1="${PLOT.left}" y1="${y(0).toFixed(1)}" x2="${PLOT.right}" y2="${y(0).toFixed(1)}" class="axis"/>` +
    ticks +
    bars.join('') +
    `<text transform="translate(12 ${mid}) rotate(-90)" text-anchor="middle" class="label">mean score</text>` +
    `<text x="${(PLOT.left + PLOT.right) / 2}" y="${HEIGHT - 6}" text-anchor="middle" class="label">model (see legend)</text>` +
    `</svg>`
  );
}
