/**
 * The report's disagreements, gathered from GradeExam's stream as it passes: each item's results
 * come together (the base first), so only the current item's base result is held, and at most
 * MAX_DISAGREEMENTS rows are kept. Memory stays the same however long the exam.
 */
import type { ExamPlan, ItemResult } from '../gen/golem/exam/v1/exam';
import { BASE_MODEL, disagreement, MAX_DISAGREEMENTS, type Disagreement, type GradeReport } from './report';

export class DisagreementCollector {
  private readonly found: Disagreement[] = [];
  private omitted = 0;
  private primaryScorer: string | undefined;
  private base: ItemResult | undefined;

  /** The plan's first scorer decides; without the base graded there is nothing to compare. */
  start(plan: ExamPlan): void {
    this.primaryScorer = plan.models[0] === BASE_MODEL ? plan.scorers[0] : undefined;
  }

  add(result: ItemResult): void {
    if (this.primaryScorer === undefined) return;
    if (result.model === BASE_MODEL) {
      this.base = result;
      return;
    }
    if (this.base?.itemId !== result.itemId) return;
    if (!disagreement(this.base, result, this.primaryScorer)) return;
    if (this.found.length < MAX_DISAGREEMENTS) {
      this.found.push({ itemId: result.itemId, model: result.model, base: this.base, adapter: result });
    } else {
      this.omitted += 1;
    }
  }

  result(): Pick<GradeReport, 'disagreements' | 'disagreementsOmitted'> {
    return { disagreements: this.found, disagreementsOmitted: this.omitted };
  }
}
