/**
 * Good, broken and out-of-bounds exam files for GradeExam, made by the sidecar suite's own builder
 * (inference_py/tests/bad_exams.py), so that both suites send the same files to golem.
 */
import { pythonFixtures } from './python-fixtures';

export interface BadExams {
  /** The folder to put in security.examRoots; everything below but `outside*` is inside it. */
  root: string;
  /** Two items, with a header beside it that asks for 2-token answers. */
  good: string;
  goodHeader: string;
  /** A results file not written yet: nothing to resume. */
  newResults: string;
  /** Line 2 is not JSON. */
  notJson: string;
  /** Line 3's answer is a number. */
  answerNumber: string;
  /** Blank lines only. */
  empty: string;
  /** Line 3 repeats line 1's id. */
  duplicateIds: string;
  /** Line 2's prompt is longer than the tiny model's context; line 1 is fine. */
  longPrompt: string;
  /** An exam whose header beside it names the scorer "exact_mach". */
  unknownHeaderScorer: string;
  headerUnknownScorer: string;
  /** A header (not beside any exam) whose template uses {questoin}. */
  headerUnknownTemplateField: string;
  /** A folder named like an exam. */
  folder: string;
  missing: string;
  /** A results file whose first line is not JSON, with a complete line after it. */
  badResults: string;
  /** A results file whose first line is JSON but a number, not an object. */
  resultsNotObject: string;
  /** A good exam, header and results file outside the root. */
  outside: string;
  outsideHeader: string;
  outsideResults: string;
  /** A link inside the root to the exam outside it. */
  symlinkOut: string;
  /** An exam inside the root whose header beside it (same stem) links out of it. */
  leakyHeader: string;
  /** `root/../outside/outside.jsonl`. */
  dotDotOut: string;
}

/** Builds every exam case under `dir` (the root is `dir/exams`, outside it `dir/outside`). */
export function badExams(dir: string): BadExams {
  // The builder's names for the cases (bad_exams.py), by this suite's names below.
  const take = pythonFixtures('bad_exams', [dir]);
  return {
    root: take('exam_root'),
    good: take('good_exam'),
    goodHeader: take('good_header'),
    newResults: take('new_results'),
    notJson: take('exam_not_json'),
    answerNumber: take('exam_answer_number'),
    empty: take('exam_empty'),
    duplicateIds: take('exam_duplicate_ids'),
    longPrompt: take('exam_long_prompt'),
    unknownHeaderScorer: take('exam_unknown_header_scorer'),
    headerUnknownScorer: take('header_unknown_scorer'),
    headerUnknownTemplateField: take('header_unknown_template_field'),
    folder: take('exam_folder'),
    missing: take('exam_missing'),
    badResults: take('bad_results'),
    resultsNotObject: take('results_not_object'),
    outside: take('outside_exam'),
    outsideHeader: take('outside_header'),
    outsideResults: take('outside_results'),
    symlinkOut: take('exam_symlink'),
    leakyHeader: take('exam_leaky_header'),
    dotDotOut: take('exam_dotdot'),
  };
}
