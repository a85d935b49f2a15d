/**
 * Broken, foreign and out-of-bounds adapter folders for the bad-input matrix, made from the tiny
 * models in a temp dir. The foreign adapters need torch, so they are built once per version of
 * their snippet and kept, like the tiny models.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PYTHON, type TinyModels } from './tiny-models';

const WEIGHTS = 'adapter_model.safetensors';

// A LoRA on q_proj/v_proj made for a Llama of hidden size 32 (the tiny base has 64): the same
// module names, other shapes.
const OTHER_SIZE_ADAPTER = `
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(7)
base = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
get_peft_model(base, lora).save_pretrained(sys.argv[1], safe_serialization=True)
`;

export interface BadAdapters {
  missing: string;
  file: string;
  noConfig: string;
  configNotJson: string;
  configNotPeft: string;
  noWeights: string;
  pickleOnly: string;
  truncatedWeights: string;
  corruptWeights: string;
  otherSize: string;
  missingTargets: string;
  /** A good adapter in a folder outside the daemon's adapter roots. */
  outsideRoots: string;
  /** A link inside the roots to a folder outside them. */
  symlinkOut: string;
  /** `root/../outside/adapter`. */
  dotDotOut: string;
  /** A copy of the tiny base in a new folder: asking for it means loading it. */
  unloadedModel: string;
}

/** Builds every bad adapter under `root` (inside the daemon's roots) and `outside` (not). */
export function badAdapters(models: TinyModels, root: string, outside: string): BadAdapters {
  const copy = (name: string): string => {
    const to = path.join(root, name);
    cpSync(models.adapter, to, { recursive: true });
    return to;
  };
  const file = path.join(root, 'adapter.safetensors');
  writeFileSync(file, 'not a folder');
  const noConfig = copy('no-config');
  rmSync(path.join(noConfig, 'adapter_config.json'));
  const configNotJson = copy('config-not-json');
  writeFileSync(path.join(configNotJson, 'adapter_config.json'), '{not json');
  const configNotPeft = copy('config-not-peft');
  writeFileSync(path.join(configNotPeft, 'adapter_config.json'), JSON.stringify({ r: 8 }));
  const noWeights = copy('no-weights');
  rmSync(path.join(noWeights, WEIGHTS));
  const pickleOnly = copy('pickle-only');
  renameSync(path.join(pickleOnly, WEIGHTS), path.join(pickleOnly, 'adapter_model.bin'));
  const weights = readFileSync(path.join(models.adapter, WEIGHTS));
  const truncatedWeights = copy('truncated-weights');
  writeFileSync(path.join(truncatedWeights, WEIGHTS), weights.subarray(0, weights.length >> 1));
  const corruptWeights = copy('corrupt-weights');
  writeFileSync(path.join(corruptWeights, WEIGHTS), Buffer.alloc(weights.length, 0xa5));
  const missingTargets = copy('missing-targets');
  const config = JSON.parse(readFileSync(path.join(missingTargets, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
  writeFileSync(path.join(missingTargets, 'adapter_config.json'), JSON.stringify({ ...config, target_modules: ['c_attn'] }));
  const otherSize = path.join(root, 'other-size');
  cpSync(otherSizeAdapter(), otherSize, { recursive: true });

  const outsideRoots = path.join(outside, 'adapter');
  cpSync(models.adapter, outsideRoots, { recursive: true });
  const symlinkOut = path.join(root, 'escape');
  symlinkSync(outsideRoots, symlinkOut, 'dir');
  const unloadedModel = path.join(root, 'unloaded-model');
  cpSync(models.model, unloadedModel, { recursive: true });
  return {
    missing: path.join(root, 'no-such-adapter'),
    file,
    noConfig,
    configNotJson,
    configNotPeft,
    noWeights,
    pickleOnly,
    truncatedWeights,
    corruptWeights,
    otherSize,
    missingTargets,
    outsideRoots,
    symlinkOut,
    dotDotOut: `${root}/../${path.basename(outside)}/adapter`,
    unloadedModel,
  };
}

function otherSizeAdapter(): string {
  const version = createHash('sha256').update(OTHER_SIZE_ADAPTER).digest('hex').slice(0, 12);
  const dir = path.join(os.tmpdir(), `golem-other-size-adapter-${version}`);
  if (!existsSync(path.join(dir, WEIGHTS))) {
    const building = mkdtempSync(`${dir}-building-`);
    mkdirSync(building, { recursive: true });
    execFileSync(PYTHON, ['-c', OTHER_SIZE_ADAPTER, building], { stdio: 'ignore', env: { ...process.env, HF_HUB_OFFLINE: '1' } });
    rmSync(dir, { recursive: true, force: true });
    renameSync(building, dir);
  }
  return dir;
}
