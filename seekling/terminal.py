"""Talking to a model from a terminal: `seekling generate`, `seekling chat` and `seekling inspect`.

All three load a model directory (HF-layout weights plus tokenizer files) and go through the one
inference engine. Text is streamed as it is produced: token ids are detokenised incrementally, and
a partial UTF-8 character is held back until its last byte arrives. In chat, `<think>` reasoning
is shown dimmed and apart from the answer, and is not fed back into the history (as DeepSeek-R1's
template does: earlier turns keep only their answers).
"""

from __future__ import annotations

import codecs
import sys
from pathlib import Path

from seekling.inference.engine import Engine, EngineConfig
from seekling.inference.sampling import SamplingParams
from seekling.tokenizer import SeeklingTokenizer


def load_model_dir(model_dir: str):
    """(model, tokenizer) from a checkpoint directory, with errors that say what is missing."""
    import seekling

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist; train one with `seekling demo` "
                                "(it writes runs/demo/model) or point --model at a checkpoint directory")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json; copy the tokenizer used in training next to the "
                                "weights (SeeklingTokenizer.save) - seekling's trainer writes it there")
    model = seekling.load(path)
    if model.embed.weight.dtype != __import__("torch").float32:
        model = model.float()  # fp32 is the fast and exact dtype on CPUs (see seekling/device.py)
    tok = SeeklingTokenizer.load(path)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{model_dir}: tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size}")
    return model, tok


class TextStream:
    """Incremental detokenisation: feed token ids, get the newly completed text.

    Token bytes go through an incremental UTF-8 decoder, which keeps a character cut between
    tokens until its last byte arrives; each token costs the same however long the text grows.
    (The server's `ChoiceText` does the same, plus stop strings and the reasoning split.)
    """

    def __init__(self, tok: SeeklingTokenizer):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tok.token_bytes(token_id))


def sampling_from_args(args, stop_token_ids=()) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop or ()),
        stop_token_ids=tuple(stop_token_ids))


def engine_from_args(model, tok: SeeklingTokenizer, args) -> Engine:
    """The engine for one interactive stream, compiled first (with a line on stderr) under --compile."""
    engine = Engine(model, EngineConfig(speculative_tokens=args.speculative or 0, compile=args.compile),
                    decode=tok.decode)
    if args.compile:
        print("compiling the decode step (once; cached on disk for later runs)...", file=sys.stderr, flush=True)
        engine.warm_up((1,))  # one stream: the batch-1 graph only
    return engine


def run_generate(args) -> None:
    model, tok = load_model_dir(args.model)
    engine = engine_from_args(model, tok, args)
    ids = [tok.bos_id] + tok.encode(args.prompt)
    params = sampling_from_args(args)
    out = sys.stdout
    stream = TextStream(tok)
    n = 0
    for event in engine.stream(ids, params):  # a bad request raises before anything is printed
        if n == 0:
            out.write(args.prompt)
        piece = stream.push(event.token_id)
        if event.token_id != tok.eos_id:
            out.write(piece)
            out.flush()
        n += 1
    out.write("\n")
    if engine.config.speculative_tokens:
        print(f"[{n} tokens, MTP speculation: {engine.acceptance_rate:.0%} of drafts accepted]", file=sys.stderr)


def run_chat(args) -> None:
    from rich.console import Console

    model, tok = load_model_dir(args.model)
    engine = engine_from_args(model, tok, args)
    console = Console(highlight=False)
    console.print(f"[bold]seekling chat[/] - {args.model} ({model.cfg.n_layers} layers). "
                  "Type a message; /reset clears the history, /exit quits.")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            console.print()
            return
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            messages = messages[:1] if args.system else []
            console.print("[dim](history cleared)[/]")
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        params = sampling_from_args(args, stop_token_ids=(tok.eot_id, tok.eos_id))
        try:
            reasoning, answer = _stream_reply(engine, tok, ids, params, console)
        except ValueError as e:  # e.g. the conversation outgrew the context
            console.print(f"[red]error:[/] {e}. Use /reset to start over.")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})


def _stream_reply(engine, tok, ids, params, console) -> tuple[str, str]:
    """Stream one assistant turn; reasoning between <think> and </think> is shown dimmed."""
    console.print("[bold]seekling>[/] ", end="")
    thinking, parts = False, {"reasoning": [], "answer": []}
    stream = TextStream(tok)
    for event in engine.stream(ids, params):
        t = event.token_id
        if t in (tok.eot_id, tok.eos_id):
            break
        if t == tok.think_id:
            thinking = True
            console.print("[dim italic]<think>[/]", end="")
            continue
        if t == tok.end_think_id:
            thinking = False
            console.print("[dim italic]</think>[/]\n", end="")
            continue
        piece = stream.push(t)
        parts["reasoning" if thinking else "answer"].append(piece)
        console.print(piece, end="", style="dim italic" if thinking else None, markup=False)
    console.print()
    return "".join(parts["reasoning"]), "".join(parts["answer"]).strip()


def run_inspect(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from seekling.inference.inspect import route_table, write_heatmap

    model, tok = load_model_dir(args.model)
    ids = tok.encode(args.text)
    if not ids:
        raise ValueError("the text is empty: give some words to route")
    table = route_table(model, ids)
    console = Console(highlight=False)
    grid = Table(title=f"routed experts per token (expert:weight), top-{model.cfg.n_activated_experts} "
                       f"of {table.n_experts}", title_justify="left")
    grid.add_column("token", style="bold")
    for layer in table.layers:
        grid.add_column(f"layer {layer}")
    for t, tid in enumerate(table.token_ids):
        cells = [" ".join(f"{int(e)}:{float(w):.2f}" for e, w in zip(table.experts[t, i], table.weights[t, i]))
                 for i in range(len(table.layers))]
        grid.add_row(repr(tok.decode([tid])), *cells)
    console.print(grid)
    load = table.expert_load()
    usage = Table(title="expert usage over the text (tokens per expert)", title_justify="left")
    usage.add_column("layer", style="bold")
    usage.add_column("busiest")
    usage.add_column("idle experts")
    for i, layer in enumerate(table.layers):
        order = load[i].argsort(descending=True)
        busiest = ", ".join(f"{int(e)} ({int(load[i, e])})" for e in order[:5])
        idle = [str(int(e)) for e in range(table.n_experts) if load[i, e] == 0]
        usage.add_row(str(layer), busiest, ", ".join(idle) or "none")
    console.print(usage)
    png = write_heatmap(table, args.png, decode=lambda ids_: tok.decode(ids_))
    console.print(f"heatmap written to {png}")
