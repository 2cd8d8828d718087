"""GRPO rollout throughput: seekling's engine against transformers' generate, same checkpoint, one run.

    python bench/bench_rollout.py                      # random tiny preset, 8 prompts x 8 completions x 128 tokens
    python bench/bench_rollout.py --model runs/demo/model --task countdown
    python bench/bench_rollout.py --prompts 2 --group 4 --max-tokens 32 --repeats 1   # a quick look
    python bench/bench_rollout.py --compile            # also the engine with its compiled decode step
    python bench/bench_rollout.py --unshared           # also the engine prefilling every request's prompt

A rollout batch as GRPO draws it (issue 12): P problems from a checkable task's train split, each
rendered through the chat template, and G sampled completions per prompt (temperature 1.0, no
top-k/top-p). Both systems generate exactly --max-tokens tokens per completion (seekling with
ignore_eos; transformers with no eos id), so completion tokens/s compares like with like; a trained
model would stop earlier and unevenly, which continuous batching absorbs and static batching pays
for in padding, so fixed length is the case *least* favourable to the engine.

* seekling: one Engine and one `engine.generate` call with all P*G requests, each with its own
  seed (continuous batching: prefill chunks and decodes share forwards; the G requests of a prompt
  compute it once, EngineConfig.share_prompts). With --compile, a second engine with
  EngineConfig(compile=True) is timed too; its warm-up (the compile, from Inductor's on-disk cache
  after the first run) is reported and not timed. With --unshared, an engine with
  share_prompts=False (every request prefills its prompt, as transformers' generate does once it
  has repeated each prompt G times) shows what sharing the prompts is worth.
* transformers: DeepseekV3ForCausalLM.from_pretrained on the same directory, `generate` with
  do_sample=True, top_k=0, num_return_sequences=G. By default one call with all P prompts
  left-padded (batch P*G), the form nearest to the engine's; `--hf-batch prompt` makes P calls of
  batch G instead. On the 2-core AMD EPYC this was written on (1 thread, defaults), the one batched
  call was twice as fast (829 against 384 tok/s: one forward per position instead of P, with
  P times larger GEMMs), so it is the default: the peer at its better setting.

Wall times are end to end (prefill, decode, sampling), after one short untimed warm-up run of each
system; the --repeats timed runs alternate between systems so a drift in machine speed hits both,
and the best run of each is reported (on a shared machine the least-disturbed run is the truest),
the median beside it. Both run fp32 on the CPU at --threads threads. Prints a table; asserts
nothing about time (a benchmark, not a test).

Left out: the rewards of the completions (a random-weight model's are all zero, and fixed-length
completions run past the answer; that both systems compute the same model is pinned by
tests/test_engine_hf.py, greedy token for token), the GRPO update itself, and GPUs
(bench_decode.py covers the device and dtype axes).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from statistics import median

import torch


def build_checkpoint(args) -> tuple[str, str, tempfile.TemporaryDirectory | None]:
    """(directory, description, temp dir to clean up): --model as given, or a random preset saved."""
    import seekling
    from seekling.model.transformer import Transformer
    from seekling.presets import get_preset
    from seekling.tokenizer import load_default_tokenizer

    if args.model:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise SystemExit(f"--model {args.model}: no config.json there; point at a directory written by "
                             "seekling.save (e.g. runs/demo/model)")
        return args.model, args.model, None
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    seekling.save(Transformer(get_preset(args.preset)), tmp.name)
    load_default_tokenizer().save(tmp.name)
    return tmp.name, f"random {args.preset} preset", tmp


def rollout_prompts(model_dir: str, task_name: str, n: int) -> tuple[list[list[int]], int]:
    """(prompt ids of n train problems, pad id): what a GRPO step feeds the engine."""
    from seekling.r1.tasks import get_task
    from seekling.tokenizer import SeeklingTokenizer

    tokenizer = SeeklingTokenizer.load(model_dir)
    task = get_task(task_name)
    problems = task.problems("train", n, seed=0)
    return [tokenizer.apply_chat_template(task.prompt_messages(p)) for p in problems], tokenizer.pad_id


# ---------------------------------------------------------------- the two systems

class SeeklingRollout:
    """All P*G requests through one engine.generate call; each completion has its own seed."""

    def __init__(self, model_dir: str, prompts: list[list[int]], group: int, max_tokens: int, *, compile: bool,
                 share: bool = True):
        import seekling
        from seekling.inference import Engine, EngineConfig

        self.model = seekling.load(model_dir, dtype=torch.float32)
        self.prompts, self.group = prompts, group
        n = len(prompts) * group
        longest = max(map(len, prompts))
        cfg = EngineConfig(max_seqs=n, max_batch_tokens=max(512, n), compile=compile, share_prompts=share,
                           kv_cache_tokens=n * (longest + max_tokens + 64))
        self.engine = Engine(self.model, cfg)
        t = time.perf_counter()
        self.engine.warm_up((1,) if n == 1 else (2,))  # the compile (a no-op eager), untimed
        self.warm_up_s = time.perf_counter() - t

    def run(self, max_tokens: int) -> int:
        from seekling.inference import SamplingParams

        reqs = [p for p in self.prompts for _ in range(self.group)]
        params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=i)
                  for i in range(len(reqs))]
        outs = self.engine.generate(reqs, params)
        return sum(len(o.output_ids) for o in outs)


class TransformersRollout:
    """DeepseekV3ForCausalLM.generate, num_return_sequences=G, all prompts left-padded or one at a time."""

    def __init__(self, model_dir: str, prompts: list[list[int]], group: int, pad_id: int, *, per_prompt: bool):
        from transformers import DeepseekV3ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        # No eos id at all: every row runs to max_new_tokens, as ignore_eos makes the engine do, and
        # no logits processor masks the eos logit (min_new_tokens would with an eos id set).
        self.model.generation_config.eos_token_id = None
        self.pad_id, self.group = pad_id, group
        batches = [[p] for p in prompts] if per_prompt else [prompts]
        self.batches = [self._left_pad(b) for b in batches]

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return ids, mask

    def run(self, max_tokens: int) -> int:
        torch.manual_seed(0)
        n = 0
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for ids, mask in self.batches:
                out = self.model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                          max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                          num_return_sequences=self.group, pad_token_id=self.pad_id,
                                          eos_token_id=None)
                n += out[:, ids.shape[1]:].numel()
        return n


# ---------------------------------------------------------------- driver

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="seekling checkpoint directory (default: a random --preset saved to a temp dir)")
    ap.add_argument("--preset", default="tiny", help="preset for the random-weight model when no --model is given")
    ap.add_argument("--task", default="addition", help="checkable task the prompts come from (seekling.r1.tasks)")
    ap.add_argument("--prompts", type=int, default=8, help="problems per rollout batch (P)")
    ap.add_argument("--group", type=int, default=8, help="completions per problem (G)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per completion, exactly")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per system, alternating; best and median shown")
    ap.add_argument("--compile", action="store_true", help="also time the engine with EngineConfig(compile=True)")
    ap.add_argument("--unshared", action="store_true",
                    help="also time the engine with share_prompts=False (each request prefills its own prompt)")
    ap.add_argument("--hf-batch", choices=("all", "prompt"), default="all",
                    help="transformers: one call with all prompts left-padded (default) or one call per prompt")
    # One thread by default, as bench_decode.py: on a shared 2-core machine a second OpenMP thread
    # makes every op wait at a barrier for whichever core another process holds.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    for name in ("prompts", "group", "max_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)

    from seekling.checkpoint import read_config

    model_dir, name, tmp = build_checkpoint(args)
    try:
        prompts, pad_id = rollout_prompts(model_dir, args.task, args.prompts)
        cfg = read_config(model_dir)
        longest = max(map(len, prompts))
        if longest + args.max_tokens > cfg.max_seq_len:
            raise SystemExit(f"--max-tokens {args.max_tokens}: prompts of up to {longest} tokens plus that exceed the "
                             f"model's max_seq_len {cfg.max_seq_len}; lower it")
        systems = {"seekling engine": SeeklingRollout(model_dir, prompts, args.group, args.max_tokens, compile=False)}
        if args.compile:
            systems["seekling engine, compiled"] = SeeklingRollout(model_dir, prompts, args.group, args.max_tokens,
                                                                   compile=True)
        if args.unshared:
            systems["seekling engine, prompts not shared"] = SeeklingRollout(model_dir, prompts, args.group,
                                                                             args.max_tokens, compile=False, share=False)
        hf_label = "transformers generate" + (" (per prompt)" if args.hf_batch == "prompt" else "")
        systems[hf_label] = TransformersRollout(model_dir, prompts, args.group, pad_id,
                                                per_prompt=args.hf_batch == "prompt")

        n_params = sum(p.numel() for p in systems["seekling engine"].model.parameters())
        import transformers

        from seekling.device import cpu_name

        print(f"rollout benchmark: {name} ({n_params / 1e6:.1f}M params, fp32 on cpu), task {args.task}, "
              f"{args.prompts} prompts x {args.group} completions x {args.max_tokens} tokens "
              f"(prompts {min(map(len, prompts))}-{longest} tokens), temperature 1.0")
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with "
              f"{torch.get_num_threads()} threads, transformers {transformers.__version__}; "
              f"load average {os.getloadavg()[0]:.1f}")
        for label, s in systems.items():
            if isinstance(s, SeeklingRollout) and s.engine.config.compile:
                print(f"  {label}: warm-up (compile) {s.warm_up_s:.1f} s, untimed")

        expected = args.prompts * args.group * args.max_tokens
        for s in systems.values():  # untimed: first-call allocations, lazy imports, thread pools
            s.run(min(args.max_tokens, 4))
        times: dict[str, list[float]] = {label: [] for label in systems}
        for r in range(args.repeats):
            for label, s in systems.items():
                t = time.perf_counter()
                n = s.run(args.max_tokens)
                dt = time.perf_counter() - t
                times[label].append(dt)
                assert n == expected, f"{label} generated {n} tokens, expected {expected}"
                print(f"  run {r + 1}/{args.repeats} {label}: {dt:.2f} s, {n / dt:.0f} tok/s", flush=True)

        ref = min(times[hf_label])
        print("\n| system | best wall s | median wall s | completion tok/s (best) | vs transformers |")
        print("|---|---:|---:|---:|---:|")
        for label, ts in times.items():
            print(f"| {label} | {min(ts):.2f} | {median(ts):.2f} | {expected / min(ts):.0f} | {ref / min(ts):.2f}x |")
        print(f"\n{expected} completion tokens per run; best of {args.repeats}. "
              f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
