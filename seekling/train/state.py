"""The run directory and its checkpoints, laid out so that `kill -9` at any moment loses at most
the steps since the last complete checkpoint.

    runs/<name>/
      train_config.json        the TrainConfig (written once, when the run starts)
      metrics.jsonl            one JSON object per logged step
      ckpt-000400/             the newest complete checkpoint:
        config.json, generation_config.json, model.safetensors   Hugging Face layout (fp32 master weights)
        tokenizer.json, tokenizer_config.json, special_tokens_map.json
        train_state.safetensors  AdamW moments and step counters (keyed by parameter name), torch RNG
        state.json               step, tokens, data position, elapsed time, Python/numpy RNG, dtype,
                                 the TrainConfig - written last
      latest                   the name of the newest checkpoint, for people and scripts
      model/                   hard links to the newest checkpoint's model and tokenizer files:
                               the one stable path for `seekling generate --model runs/<name>/model`

A torchrun job writes the same directory, with `dcp/` (torch.distributed.checkpoint: model and
AdamW shards of every rank, resharded on load to any world or ep size, or to one process) in place
of train_state.safetensors; rank 0 gathers the full model for the Hugging Face files, so `model/`
is the same as a single-process run's, and state.json and the rename are rank 0's, after every
rank's shards are written.

A checkpoint is written into `ckpt-N.tmp/`, every file fsynced, then renamed to `ckpt-N` in one
atomic step; only then are older checkpoints removed (renamed to `*.del` first, so a half-deleted
one is never mistaken for complete). Resume scans for the newest `ckpt-N` holding a valid state.json
and never trusts `latest`. `model/` is updated file by file with os.replace, each file always whole;
the files are never modified in place, so hard-linking them is safe.

Only safetensors, JSON and DCP's own files are written or read: nothing here pickles (torch.save would).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from seekling.checkpoint import REMOTE_CODE_FILES, from_hf_state_dict, read_tensors, save
from seekling.distributed.checkpoint import full_model, load_full_optimizer, load_sharded, save_sharded
from seekling.distributed.parallelize import Parallel
from seekling.train.config import TrainConfig

TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
LATEST = "latest"
MODEL_DIR = "model"
STATE = "state.json"
TRAIN_STATE = "train_state.safetensors"
DCP_DIR = "dcp"
_CKPT = re.compile(r"ckpt-(\d+)")
# Copied into model/, weights first and config.json last (a reader that sees the new config sees new weights).
_MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                *REMOTE_CODE_FILES)  # an mHC checkpoint's transformers code (checkpoint.py)


# ---------------------------------------------------------------- small atomic-write helpers

def fsync_dir(path: Path) -> None:
    """Make a rename or a new file inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- the run directory

def init_run(run_dir: Path, cfg, name: str = TRAIN_CONFIG, command: str = "seekling train") -> None:
    """Create a run directory for a new run and write its config (`cfg.to_dict()`) as `name`;
    refuse a directory that already holds a run. `command` is what continues one, for the error."""
    if (run_dir / name).exists() or find_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds a run; continue it with `{command} --resume {run_dir}` "
                         "or pass another --out directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / name, cfg.to_dict())


def read_run_config(run_dir: Path, name: str = TRAIN_CONFIG, command: str = "seekling train") -> dict:
    """A run's config as written by init_run, with errors that say what to do."""
    path = run_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run of `{command}` (no {name}); start one with `{command}`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or start a new run") from None


def read_train_config(run_dir: Path) -> TrainConfig:
    return TrainConfig.from_dict(read_run_config(run_dir), str(run_dir / TRAIN_CONFIG))


def read_metrics(run_dir: Path) -> list[dict]:
    """Every complete line of metrics.jsonl (a line cut short by a crash is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop logged steps after `step` (they will be trained again), atomically."""
    path = run_dir / METRICS
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- checkpoints

def _step_of(path: Path) -> int | None:
    m = _CKPT.fullmatch(path.name)
    return int(m[1]) if m else None


def read_state(ckpt: Path) -> dict | None:
    try:
        state = json.loads((ckpt / STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and "step" in state else None


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    if not Path(run_dir).is_dir():
        return None
    found = sorted(((s, p) for p in Path(run_dir).iterdir() if p.is_dir() and (s := _step_of(p)) is not None), reverse=True)
    for _, path in found:
        if read_state(path) is not None:
            return path
    return None


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            if torch.is_tensor(value):
                out[f"optim.{names[id(p)]}.{key}"] = value.detach().to("cpu").contiguous().clone()
    return out


def save_checkpoint(run_dir: Path, model, optimizer, tokenizer, state: dict, keep: int = 1) -> Path:
    """Write ckpt-<step> atomically, point `latest` and `model/` at it, then drop older checkpoints."""
    run_dir = Path(run_dir)
    name = f"ckpt-{state['step']:06d}"
    final, tmp = run_dir / name, run_dir / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
    tmp.mkdir(parents=True)
    save(model, tmp, stop_token_ids=(tokenizer.eot_id,))  # chat turns end at <|end_of_turn|>
    tokenizer.save(tmp)
    tensors = _optimizer_tensors(model, optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / TRAIN_STATE), metadata={"format": "seekling-train-state"})
    nprng = np.random.get_state()
    state = dict(state, rng={"python": _jsonable(random.getstate()),
                             "numpy": [nprng[0], nprng[1].tolist(), *nprng[2:]]})
    with open(tmp / STATE, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
    return _commit(run_dir, tmp, final, state["step"], keep)


def _commit(run_dir: Path, tmp: Path, final: Path, step: int, keep: int) -> Path:
    """Make a fully written `tmp` the checkpoint `final`: fsync, rename, `latest`, `model/`, drop older ones."""
    name = final.name
    for path in tmp.iterdir():  # tokenizer files and state.json are not fsynced by their writers
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():
        # This step was saved before and training is deterministic, so it holds the same weights:
        # keep it rather than open a window in which neither copy exists.
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    fsync_dir(run_dir)
    latest = run_dir / LATEST
    tmp_latest = run_dir / f".{LATEST}.tmp-{os.getpid()}"
    tmp_latest.write_text(name + "\n")
    os.replace(tmp_latest, latest)
    publish_model(run_dir, final)
    older = sorted((p for p in run_dir.iterdir() if p.is_dir() and (s := _step_of(p)) is not None and s < step),
                   key=_step_of)
    for path in older[: max(0, len(older) - (keep - 1))]:
        _remove(path)
    for path in run_dir.glob("ckpt-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)
    return final


def save_checkpoint_sharded(run_dir: Path, model, optimizer, tokenizer, state: dict, par: Parallel,
                            keep: int = 1) -> Path:
    """A torchrun job's save (every rank calls it): DCP shards from every rank, the Hugging Face files
    and state.json from rank 0, and rank 0's atomic rename only once every shard is on disk.

    A rank killed at any point leaves `ckpt-N.tmp` unrenamed (the survivors fail in their next
    collective), so the previous checkpoint stays the newest complete one.
    """
    run_dir = Path(run_dir)
    name = f"ckpt-{state['step']:06d}"
    final, tmp = run_dir / name, run_dir / f"{name}.tmp"
    if par.primary:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        tmp.mkdir(parents=True)
    par.barrier()
    # dcp.save returns on every rank only after rank 0 wrote .metadata, which follows every rank's
    # shards (FileSystemWriter fsyncs them): after it, the shards are complete.
    save_sharded(tmp / DCP_DIR, model, optimizer)
    plain = full_model(model)  # a collective; the full weights land on rank 0 only
    if par.primary:
        save(plain, tmp, stop_token_ids=(tokenizer.eot_id,))
        tokenizer.save(tmp)
        with open(tmp / STATE, "w", encoding="utf-8") as f:
            json.dump(dict(state, world_size=par.world_size, ep=par.ep), f, indent=2)
        for path in (tmp / DCP_DIR).iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp / DCP_DIR)
        _commit(run_dir, tmp, final, state["step"], keep)
    par.barrier()
    return final


def _remove(path: Path) -> None:
    trash = path.with_name(path.name + ".del")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)  # no longer matches ckpt-N: never picked by find_checkpoint, even half-deleted
    shutil.rmtree(trash, ignore_errors=True)


def publish_model(run_dir: Path, ckpt: Path) -> Path:
    """Point runs/<name>/model/ at a checkpoint's model and tokenizer files, one atomic file at a time."""
    out = run_dir / MODEL_DIR
    out.mkdir(exist_ok=True)
    weights = sorted(p.name for p in ckpt.glob("model*.safetensors*"))
    names = weights + [n for n in _MODEL_FILES if (ckpt / n).exists()] + ["config.json"]
    for n in names:
        tmp = out / f".{n}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(ckpt / n, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copy2(ckpt / n, tmp)
        os.replace(tmp, out / n)
    for stale in out.glob("model*.safetensors*"):
        if stale.name not in weights:
            stale.unlink(missing_ok=True)
    fsync_dir(out)
    return out


def load_checkpoint(ckpt: Path, model, optimizer, sharded: bool = False) -> dict:
    """Restore model weights (and expert biases), AdamW state and RNG states in place; returns state.json.

    A checkpoint of a torchrun job (it has dcp/) loads into any layout: sharded (`sharded=True`, the
    model already parallelized) or one plain process. A single-process checkpoint loads into a
    sharded model through full state dicts (every rank reads the files and keeps its shards)."""
    state = read_state(ckpt)
    if state is None:
        raise ValueError(f"{ckpt} is not a complete checkpoint (no valid {STATE}); delete it to resume from an earlier one")
    if (ckpt / DCP_DIR).is_dir():
        load_sharded(ckpt / DCP_DIR, model, optimizer)
        return state  # a job's ranks drew no random numbers worth restoring: batches are pure in (seed, step)
    if sharded:
        _load_full_into_sharded(ckpt, model, optimizer)
        return state
    weights = from_hf_state_dict(read_tensors(ckpt), model.cfg, model.state_dict(), str(ckpt))
    model.load_state_dict(weights, strict=True)
    try:
        tensors = load_file(str(ckpt / TRAIN_STATE))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{ckpt / TRAIN_STATE} is unreadable ({e}); "
                         f"delete {ckpt} to resume from an earlier checkpoint") from None
    params = dict(model.named_parameters())
    restored = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        name, field = key[len("optim."):].rsplit(".", 1)
        if name not in params:
            raise ValueError(f"{ckpt}: optimizer state for {name}, which the model does not have; "
                             "the checkpoint belongs to a different model configuration")
        restored.setdefault(name, {})[field] = value.to(params[name].device)  # fused AdamW keeps `step` beside the weights
    for name, st in restored.items():
        optimizer.state[params[name]] = st
    torch.set_rng_state(tensors["rng.torch"])
    rng = state.get("rng", {})
    if "python" in rng:
        random.setstate(_tupled(rng["python"]))
    if "numpy" in rng:
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    return state


def _load_full_into_sharded(ckpt: Path, model, optimizer) -> None:
    full = StateDictOptions(full_state_dict=True)
    # a sharded model's state dict holds DTensors, whose .shape is the full one the files must match
    weights = from_hf_state_dict(read_tensors(ckpt), model.cfg, model.state_dict(), str(ckpt))
    set_model_state_dict(model, weights, options=full)
    try:
        tensors = load_file(str(ckpt / TRAIN_STATE))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{ckpt / TRAIN_STATE} is unreadable ({e}); "
                         f"delete {ckpt} to resume from an earlier checkpoint") from None
    st: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, field = key[len("optim."):].rsplit(".", 1)
            st.setdefault(name, {})[field] = value
    load_full_optimizer(model, optimizer, st)


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x
