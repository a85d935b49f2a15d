/**
 * Broken, foreign and out-of-bounds adapter folders for the bad-input matrix, made from the tiny
 * models by the sidecar suite's own builder (inference_py/tests/bad_adapters.py), so that both
 * suites throw the same folders at golem.
 */
import { pythonFixtures } from './python-fixtures';
import type { TinyModels } from './tiny-models';

export interface BadAdapters {
  missing: string;
  file: string;
  noConfig: string;
  configNotJson: string;
  configNotPeft: string;
  noWeights: string;
  pickleOnly: string;
  prefixTuning: string;
  truncatedWeights: string;
  corruptWeights: string;
  emptyWeights: string;
  otherSize: string;
  otherArch: string;
  missingTargets: string;
  /** A good adapter in a folder outside the daemon's adapter roots. */
  outsideRoots: string;
  /** A link inside the roots to a folder outside them. */
  symlinkOut: string;
  /** `root/../outside/adapter`. */
  dotDotOut: string;
  /** A folder inside the roots whose weights file links out of them. */
  leakyWeights: string;
  /** A path outside the roots where nothing is. */
  outsideMissing: string;
  /** A copy of the tiny base in a new folder: asking for it means loading it. */
  unloadedModel: string;
}

/** Builds every bad adapter under `root` (inside the daemon's roots) and `outside` (not). */
export function badAdapters(models: TinyModels, root: string, outside: string): BadAdapters {
  // The builder's names for the cases (bad_adapters.py), by this suite's names below.
  const take = pythonFixtures('bad_adapters', [JSON.stringify(models), root, outside]);
  return {
    missing: take('adapter_missing'),
    file: take('adapter_file'),
    noConfig: take('no_config'),
    configNotJson: take('config_not_json'),
    configNotPeft: take('config_not_peft'),
    noWeights: take('no_weights'),
    pickleOnly: take('pickle_only'),
    prefixTuning: take('prefix_tuning'),
    truncatedWeights: take('truncated'),
    corruptWeights: take('corrupt'),
    emptyWeights: take('empty_weights'),
    otherSize: take('adapter_other_size'),
    otherArch: take('adapter_other_arch'),
    missingTargets: take('missing_targets'),
    outsideRoots: take('outside_adapter'),
    symlinkOut: take('adapter_symlink'),
    dotDotOut: take('adapter_dotdot'),
    leakyWeights: take('adapter_leaky_weights'),
    outsideMissing: take('adapter_outside_missing'),
    unloadedModel: take('unloaded_model'),
  };
}
