"""The `seekling` command: thin argument parsing that calls one function per subcommand."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def resolve_config(spec: str):
    """A preset name or a checkpoint directory -> (ModelConfig, description)."""
    from seekling.checkpoint import read_config
    from seekling.presets import PRESETS, get_preset

    if spec in PRESETS:
        return get_preset(spec), f"preset {spec}"
    if Path(spec).exists():
        return read_config(spec), str(spec)
    raise FileNotFoundError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint directory")


def cmd_info(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from seekling.stats import model_stats

    cfg, source = resolve_config(args.model)
    s = model_stats(cfg, context=args.context)
    console = Console()
    arch = Table(title=f"seekling model: {source}", show_header=False, title_justify="left")
    arch.add_column(style="bold")
    arch.add_column()
    n_moe = cfg.n_layers - cfg.n_dense_layers
    rope = "default" if cfg.rope_type == "default" else f"YaRN x{cfg.rope_factor:g} from {cfg.original_seq_len}"
    rows = [
        ("layers", f"{cfg.n_layers} ({cfg.n_dense_layers} dense SwiGLU, {n_moe} MoE) + {cfg.n_mtp_layers} MTP"),
        ("hidden / vocab / context", f"{cfg.dim} / {cfg.vocab_size} / {cfg.max_seq_len}"),
        ("attention (MLA)", f"{cfg.n_heads} heads, q_lora {cfg.q_lora_rank or 'none (direct)'}, kv_lora {cfg.kv_lora_rank}, "
                            f"qk {cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim} rope, v {cfg.v_head_dim}"),
        ("rope", f"{rope}, theta {cfg.rope_theta:g}, {'interleaved' if cfg.rope_interleave else 'half-split'}"),
        ("experts per MoE layer", f"{cfg.n_routed_experts} routed (width {cfg.moe_inter_dim}) + {cfg.n_shared_experts} shared"
         if cfg.has_moe else "none (dense model)"),
        ("routing", f"top-{cfg.n_activated_experts} of {cfg.n_routed_experts}, sigmoid, {cfg.n_expert_groups} groups "
                    f"(keep {cfg.n_limited_groups}), scale {cfg.route_scale:g}, norm_topk {cfg.norm_topk_prob}"
         if cfg.has_moe else "-"),
        ("residual", f"mHC: {cfg.hc_mult} streams, Sinkhorn {cfg.hc_sinkhorn_iters} rounds, eps {cfg.hc_eps:g}"
         if cfg.has_mhc else "plain (one stream)"),
        ("engram", f"layers {', '.join(map(str, e.layers))}: orders 2..{e.max_ngram}, {e.n_heads} heads each, "
                   f"rows >= {e.head_rows} per head, width {e.embed_dim}, conv {e.kernel_size} (dilation {e.conv_dilation})"
         if (e := cfg.engram).enabled else "none"),
        ("parameters, total", f"{_human(s.total_params)} ({s.total_params:,}; MTP {_human(s.mtp_params)}"
                              + (f"; Engram tables {_human(s.table_params)}" if s.table_params else "") + ")"),
        ("parameters, active per token", f"{_human(s.active_params)} ({100 * s.active_params / (s.total_params - s.mtp_params):.1f}% of the main model"
                                         + ("; Engram tables are looked up, not active" if s.table_params else "") + ")"),
        (f"FLOPs per token (forward, ctx {s.context})", _human(s.flops_per_token, "FLOP")),
        ("KV cache per token (bf16)", f"{_human(s.kv_latent_bytes_per_token, 'B')} latent vs {_human(s.kv_full_bytes_per_token, 'B')} "
                                      f"full K/V ({s.kv_full_bytes_per_token / s.kv_latent_bytes_per_token:.1f}x smaller)"),
    ]
    for k, v in rows:
        arch.add_row(k, v)
    console.print(arch)


def cmd_tokenizer_train(args) -> None:
    from seekling.data.commands import tokenizer_train_command

    tokenizer_train_command(args.data, args.vocab_size, args.out)


def cmd_generate(args) -> None:
    from seekling.terminal import run_generate

    run_generate(args)


def cmd_chat(args) -> None:
    from seekling.terminal import run_chat

    run_chat(args)


def cmd_inspect(args) -> None:
    from seekling.terminal import run_inspect

    run_inspect(args)


def cmd_train(args) -> None:
    from seekling.train.commands import resume_command, train_command

    if args.resume:
        resume_command(args.resume, dp=args.dp, ep=args.ep)
        return
    train_command(args.preset, out_dir=args.out, data=args.data, max_steps=args.steps, token_budget=args.tokens,
                  batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr,
                  schedule=args.schedule, warmup_steps=args.warmup, dtype=args.dtype, compile=args.compile,
                  seed=args.seed, eval_every=args.eval_every, ckpt_every=args.ckpt_every, mtp_lambda=args.mtp_lambda,
                  seq_aux_alpha=args.seq_aux_alpha, bias_update_gamma=args.bias_gamma, time_limit_s=args.time_limit,
                  dp=args.dp, ep=args.ep)


def cmd_demo(args) -> None:
    from seekling.train.commands import demo_command

    demo_command(args.out, time_budget_s=args.minutes * 60)


def cmd_plot(args) -> None:
    from seekling.train.commands import plot_command

    plot_command(args.run)


def cmd_serve(args) -> None:
    from seekling.serve import run_server

    run_server(args.model, host=args.host, port=args.port, api_key=args.api_key,
               max_concurrency=args.max_concurrency, max_queue=args.max_queue,
               model_name=args.model_name, torch_threads=args.threads,
               engine_options=(("compile", True),) if args.compile else ())


def cmd_sft(args) -> None:
    from seekling.r1.evaluate import parse_knobs
    from seekling.r1.sft import SFTConfig, resume_sft, sft

    if args.resume:
        resume_sft(args.resume)
        return
    if not args.task or not args.init:
        raise ValueError("give --task and --from (or --resume RUN_DIR)")
    given = dict(task=args.task, knobs=parse_knobs(args.knob), init=args.init, out_dir=args.out, max_steps=args.steps,
                 batch_size=args.batch_size, lr=args.lr, examples=args.examples, eval_every=args.eval_every,
                 eval_problems=args.eval_problems, seed=args.seed, dtype=args.dtype, time_limit_s=args.time_limit,
                 warmup_steps=args.warmup)
    sft(SFTConfig(**{k: v for k, v in given.items() if v is not None}))


def cmd_rl(args) -> None:
    from seekling.r1.evaluate import parse_knobs
    from seekling.r1.rl import RLConfig, resume_rl, rl

    if args.resume:
        resume_rl(args.resume)
        return
    if not args.task or not args.init:
        raise ValueError("give --task and --from (or --resume RUN_DIR)")
    given = dict(task=args.task, knobs=parse_knobs(args.knob), init=args.init, out_dir=args.out, max_steps=args.steps,
                 prompts_per_step=args.prompts, group_size=args.group_size, max_tokens=args.max_tokens,
                 temperature=args.temperature, updates_per_batch=args.updates, micro_batch=args.micro_batch,
                 loss_type=args.loss_type, epsilon=args.epsilon, epsilon_high=args.epsilon_high, beta=args.beta,
                 lr=args.lr, warmup_steps=args.warmup, eval_every=args.eval_every, eval_problems=args.eval_problems,
                 seed=args.seed, dtype=args.dtype, time_limit_s=args.time_limit,
                 skip_zero_variance_groups=False if args.keep_zero_variance else None,
                 rest_zero_variance=True if args.rest_zero_variance else None, problems=args.problems,
                 negative_weight=args.negative_weight,
                 compile_rollouts=True if args.compile else None)
    rl(RLConfig(**{k: v for k, v in given.items() if v is not None}))


def cmd_r1(args) -> None:
    from seekling.r1.recipe import run_recipe

    run_recipe(args.out, base=args.base, pretrain=args.pretrain, time_budget_s=args.minutes * 60, seed=args.seed)


def cmd_eval(args) -> None:
    from seekling.r1.evaluate import eval_command

    eval_command(args.task, args.model, knobs=args.knob, out=args.out, problems=args.problems, k=args.k,
                 samples=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                 batch=args.batch)


def _sampling_flags(p: argparse.ArgumentParser, temperature: float, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 disables")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string; repeat for several")
    g.add_argument("--speculative", type=int, default=None, metavar="K",
                   help="MTP self-speculative decoding with K draft tokens (needs a model with MTP layers)")
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile: ~3x the tokens/s of eager after a one-off "
                        "compile (~1 min cold, seconds once cached); not with --speculative")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seekling", description="DeepSeek-style sparse language models: train, chat, serve.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="architecture and sparsity numbers of a preset or checkpoint")
    info.add_argument("model", metavar="PATH_OR_PRESET")
    info.add_argument("--context", type=int, default=None, help="context length for attention FLOPs (default: max_seq_len)")
    info.set_defaults(func=cmd_info)

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    tok_train = tok_sub.add_parser("train", help="train on --data (default: the embedded Shakespeare corpus)")
    tok_train.add_argument("--data", action="append", metavar="PATH",
                           help=".txt/.md/.jsonl file or directory; repeat for several (default: embedded corpus)")
    tok_train.add_argument("--vocab-size", type=int, default=4096)
    tok_train.add_argument("--out", required=True, metavar="DIR", help="where to write tokenizer.json and friends")
    tok_train.set_defaults(func=cmd_tokenizer_train)

    demo = sub.add_parser("demo", help="train the tiny preset on the embedded corpus, with samples and plots")
    demo.add_argument("--out", default="runs/demo", metavar="DIR")
    demo.add_argument("--minutes", type=float, default=7.5, help="training time budget (default 7.5)")
    demo.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="pretrain a preset on the embedded corpus or --data; --resume RUN continues")
    tr.add_argument("--preset", default="tiny", help="tiny, small, gpu_100m, gpu_1b, tiny_mhc, tiny_engram (default tiny)")
    tr.add_argument("--resume", metavar="RUN", default=None, help="continue RUN from its last checkpoint, bit-exactly")
    tr.add_argument("--data", default=None, metavar="PATH", help=".txt/.md/.jsonl file or directory (default: embedded corpus)")
    tr.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/<preset>)")
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--tokens", type=int, default=None, help="token budget instead of --steps")
    tr.add_argument("--time-limit", type=float, default=None, metavar="SECONDS", help="fix the step count from a measured speed")
    tr.add_argument("--batch-size", type=int, default=None)
    tr.add_argument("--seq-len", type=int, default=None)
    tr.add_argument("--grad-accum", type=int, default=None)
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--schedule", choices=["cosine", "wsd"], default=None)
    tr.add_argument("--warmup", type=int, default=None, help="warmup steps")
    tr.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bf16 autocast on CPUs with AMX or AVX512-BF16 and on GPUs with bf16, else fp32 (README: Notes on CPUs)")
    tr.add_argument("--compile", action="store_true",
                    help="torch.compile the training step (the loss function, the model's forward inside it; ~1 min cold)")
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--eval-every", type=int, default=None)
    tr.add_argument("--ckpt-every", type=int, default=None)
    tr.add_argument("--mtp-lambda", type=float, default=None, help="MTP loss weight (DeepSeek-V3: 0.3)")
    tr.add_argument("--seq-aux-alpha", type=float, default=None, help="sequence-wise balance loss weight (0 = off)")
    tr.add_argument("--bias-gamma", type=float, default=None, help="aux-loss-free bias update speed (preset default: 1e-2 for tiny/small, 1e-3 for GPU sizes)")
    tr.add_argument("--dp", type=int, default=None,
                    help="data-parallel size under torchrun (default: the world size; must equal it)")
    tr.add_argument("--ep", type=int, default=1,
                    help="expert-parallel size under torchrun: routed experts split over this many ranks (default 1)")
    tr.set_defaults(func=cmd_train)

    plot = sub.add_parser("plot", help="draw a run's loss, learning-rate, throughput and expert-load PNGs")
    plot.add_argument("run", metavar="RUN")
    plot.set_defaults(func=cmd_plot)

    gen = sub.add_parser("generate", help="continue a prompt, streaming to stdout")
    gen.add_argument("--model", required=True, metavar="DIR")
    gen.add_argument("prompt")
    _sampling_flags(gen, temperature=0.8, max_tokens=200)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with a model in the terminal (/reset, /exit)")
    chat.add_argument("--model", required=True, metavar="DIR")
    chat.add_argument("--system", default=None, help="system prompt")
    _sampling_flags(chat, temperature=0.7, max_tokens=300)
    chat.set_defaults(func=cmd_chat)

    ins = sub.add_parser("inspect", help="show which experts each token routes to, as a table and a PNG heatmap")
    ins.add_argument("--model", required=True, metavar="DIR")
    ins.add_argument("text")
    ins.add_argument("--png", default="routing.png", help="where to write the heatmap (default routing.png)")
    ins.set_defaults(func=cmd_inspect)

    serve = sub.add_parser("serve", help="OpenAI-compatible API and a chat page at / for a model directory")
    serve.add_argument("--model", required=True, metavar="DIR")
    serve.add_argument("--host", default="127.0.0.1", help="default loopback only")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    serve.add_argument("--max-concurrency", type=int, default=32, help="requests generating at once")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    serve.add_argument("--model-name", default=None, help="model id (default: directory name)")
    serve.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs - 1)")
    serve.add_argument("--compile", action="store_true",
                       help="compile the decode step before listening (~1 min cold): 1.5-3x the tokens/s of eager")
    serve.set_defaults(func=cmd_serve)
    sf = sub.add_parser("sft", help="cold-start SFT on a checkable task's worked solutions (<think> traces)")
    sf.add_argument("--task", help="addition, multiplication or countdown")
    sf.add_argument("--from", dest="init", metavar="MODEL", help="a checkpoint directory, or a preset for fresh weights")
    sf.add_argument("--knob", action="append", metavar="KEY=VALUE", help="a task difficulty knob, e.g. digits=2")
    sf.add_argument("--resume", metavar="RUN_DIR", help="continue an SFT run exactly where it stopped")
    sf.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/sft)")
    sf.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300)")
    sf.add_argument("--batch-size", type=int, default=None, help="worked solutions per step (default 16)")
    sf.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    sf.add_argument("--warmup", type=int, default=None, help="warmup steps (default 20)")
    sf.add_argument("--examples", type=int, default=None, help="distinct training problems (default 4000)")
    sf.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (default 100)")
    sf.add_argument("--eval-problems", type=int, default=None, help="held-out problems per evaluation (default 50)")
    sf.add_argument("--seed", type=int, default=None)
    sf.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16"])
    sf.add_argument("--time-limit", type=float, default=None, metavar="SECONDS", help="stop cleanly (resumable) after this long")
    sf.set_defaults(func=cmd_sft)

    r = sub.add_parser("rl", help="GRPO on a checkable task: sample groups through the engine, reward, update")
    r.add_argument("--task", help="addition, multiplication or countdown")
    r.add_argument("--from", dest="init", metavar="MODEL", help="a checkpoint directory that writes the format (after sft)")
    r.add_argument("--knob", action="append", metavar="KEY=VALUE", help="a task difficulty knob, e.g. digits=2")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a GRPO run exactly where it stopped")
    r.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/rl)")
    r.add_argument("--steps", type=int, default=None, help="rollout steps (default 100)")
    r.add_argument("--prompts", type=int, default=None, help="prompts per step (default 16)")
    r.add_argument("--group-size", type=int, default=None, help="completions per prompt, G (default 8)")
    r.add_argument("--max-tokens", type=int, default=None, help="per completion (default 128)")
    r.add_argument("--temperature", type=float, default=None, help="rollout sampling temperature (default 1.0)")
    r.add_argument("--updates", type=int, default=None, help="optimizer steps per rollout batch (default 1)")
    r.add_argument("--micro-batch", type=int, default=None, help="sequences per forward/backward (default 32)")
    r.add_argument("--loss-type", default=None, choices=["grpo", "dr_grpo", "dapo"], help="loss aggregation (default dapo)")
    r.add_argument("--epsilon", type=float, default=None, help="lower clip (default 0.2)")
    r.add_argument("--epsilon-high", type=float, default=None, help="upper clip (default 0.28)")
    r.add_argument("--beta", type=float, default=None, help="KL to the starting model (default 0: no reference)")
    r.add_argument("--negative-weight", type=float, default=None,
                   help="weight of negative advantages, 0..1 (default 1: plain GRPO)")
    r.add_argument("--keep-zero-variance", action="store_true",
                   help="train on groups whose rewards are all equal (default: count and skip them)")
    r.add_argument("--rest-zero-variance", action="store_true",
                   help="a problem whose group was unanimous sits out the pool's next pass (GRESO)")
    r.add_argument("--problems", type=int, default=None, help="distinct training problems to cycle through (default 4000)")
    r.add_argument("--lr", type=float, default=None, help="learning rate (default 3e-5)")
    r.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5)")
    r.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (default 10)")
    r.add_argument("--eval-problems", type=int, default=None, help="held-out problems per evaluation (default 100)")
    r.add_argument("--compile", action="store_true", help="compiled decode step for the rollouts (~1 min to compile)")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16"])
    r.add_argument("--time-limit", type=float, default=None, metavar="SECONDS", help="stop cleanly (resumable) after this long")
    r.set_defaults(func=cmd_rl)
    r1 = sub.add_parser("r1", help="the R1 recipe: SFT from fresh (or pretrained) weights, then GRPO on 2-digit addition")
    r1.add_argument("--out", default="runs/r1", metavar="DIR", help="run directory (default runs/r1)")
    r1.add_argument("--base", default=None, metavar="DIR",
                    help="start SFT from this checkpoint directory or preset (default: fresh tiny weights)")
    r1.add_argument("--pretrain", action="store_true",
                    help="pretrain the base on the embedded corpus first (`seekling demo`, 5 minutes)")
    r1.add_argument("--minutes", type=float, default=45.0, help="total time budget; GRPO stops cleanly at it (default 45)")
    r1.add_argument("--seed", type=int, default=0)
    r1.set_defaults(func=cmd_r1)
    ev = sub.add_parser("eval", help="held-out pass@1 (greedy) and pass@k (sampled) on a checkable task, as JSON")
    ev.add_argument("--task", required=True, help="addition, multiplication or countdown")
    ev.add_argument("--model", required=True, metavar="DIR", help="a checkpoint directory with its tokenizer")
    ev.add_argument("--knob", action="append", metavar="KEY=VALUE", help="a task difficulty knob, e.g. digits=4")
    ev.add_argument("--problems", type=int, default=None, help="held-out problems (default 200)")
    ev.add_argument("--k", type=int, default=None, help="pass@k (default 8; 0: greedy pass@1 only)")
    ev.add_argument("--samples", type=int, default=None, help="samples per problem for pass@k (default k)")
    ev.add_argument("--temperature", type=float, default=None, help="for the samples (default 1.0)")
    ev.add_argument("--max-tokens", type=int, default=None, help="per completion (default 256)")
    ev.add_argument("--seed", type=int, default=None)
    ev.add_argument("--batch", type=int, default=None, help="sequences in flight (default 32)")
    ev.add_argument("--out", default=None, metavar="FILE", help="the JSON report (default DIR/eval-TASK.json)")
    ev.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"seekling {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
