"""Checkpoints in the Hugging Face DeepSeek-V3 layout, natively: no conversion step.

A checkpoint directory holds `config.json` (model_type "deepseek_v3", the fields transformers
writes) and `model.safetensors`, or numbered shards plus `model.safetensors.index.json` above a
size threshold. Tensor names are transformers' (and DeepSeek's), one set of keys per routed expert.
MTP depth k is stored as `model.layers.{num_hidden_layers + k - 1}.*`, as DeepSeek-V3 releases do.

A model with mHC (hc_mult > 1, model/mhc.py) is not a DeepSeek-V3 model, so its config.json says
model_type "seekling_mhc" (with hc_mult, hc_sinkhorn_iters, hc_eps) and every loader that expects
deepseek_v3 refuses it by name. Its extra tensors use DeepSeek-V4's names, kept in fp32 as V4 keeps
them: `model.layers.N.attn_hc.{fn,base,scale}`, `model.layers.N.ffn_hc.*`,
`model.hc_head.{hc_fn,hc_base,hc_scale}`, and for MTP depth k its own
`model.layers.{num_hidden_layers + k - 1}.hc_head.*`. The checkpoint also carries transformers code
for itself (seekling/hf_remote/, named by config.json's auto_map), so transformers loads it with
trust_remote_code=True and refuses it without. With hc_mult = 1 nothing of this is written.

A model with Engram (cfg.engram.layers, model/engram.py) is no DeepSeek-V3 model either: config.json
says model_type "seekling_engram" and holds the EngramConfig as `engram` (and mHC's fields too when it
also has streams). Its tensors are `model.engram_vocab.compress` (the compressed-id map, int64) and
`model.layers.{i}.engram.*` (table, projections, norms, conv, and the hash multipliers, int64).
transformers has no code for it, so none is shipped and no auto_map written: transformers refuses it
by its model_type, and so does every seekling path that expects deepseek_v3 or seekling_mhc.

All renaming between our module names (DeepSeek's reference vocabulary) and the Hugging Face names
lives in the two tables below. Only safetensors are read: nothing is ever unpickled.
Left out: FP8 block-quantized checkpoints (DeepSeek's own release) - dequantize them first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from seekling.config import ModelConfig
from seekling.model.rope import rope_inv_freq
from seekling.model.transformer import Transformer

# ModelConfig field -> DeepseekV3Config field (rope fields are handled by _rope_to_hf / _rope_from_hf).
CONFIG_MAP = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace",
    "inter_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "n_heads": "num_attention_heads",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "max_seq_len": "max_position_embeddings",
    "rope_interleave": "rope_interleave",
    "moe_inter_dim": "moe_intermediate_size",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group",
    "route_scale": "routed_scaling_factor",
    "norm_topk_prob": "norm_topk_prob",
    "n_mtp_layers": "num_nextn_predict_layers",
    "initializer_range": "initializer_range",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}

# Our parameter name inside a block -> the Hugging Face name inside `model.layers.{i}.`
BLOCK_KEY_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.e_score_correction_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    # stacked experts: split into mlp.experts.{e}.{gate,up,down}_proj.weight by _expert_keys
    "ffn.experts.w13": None,
    "ffn.experts.w2": None,
    # mHC (hc_mult > 1): DeepSeek-V4's names, which are ours too
    **{f"{site}_hc.{p}": f"{site}_hc.{p}" for site in ("attn", "ffn") for p in ("fn", "base", "scale")},
    # Engram (cfg.engram.layers): our names, under the block
    **{f"engram.{p}": f"engram.{p}" for p in (
        "multipliers", "table.weight", "value_proj.weight", "value_proj.bias", "key_proj.weight", "key_proj.bias",
        "key_norm.weight", "query_norm.weight", "conv_norm.weight", "conv.weight")},
}
_HC_HEAD = {f"hc_head.{p}": f"hc_head.{p}" for p in ("hc_fn", "hc_base", "hc_scale")}
MTP_KEY_MAP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
               "eh_proj.weight": "eh_proj.weight", "norm.weight": "shared_head.norm.weight", **_HC_HEAD}
TOP_KEY_MAP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "head.weight": "lm_head.weight", **{k: f"model.{v}" for k, v in _HC_HEAD.items()},
               "engram_vocab.compress": "model.engram_vocab.compress"}
# DeepSeek's MTP layers also carry copies of the shared embedding and head; written for vLLM/SGLang.
MTP_SHARED_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}

# Fields where null in config.json means None, not "use our default" (transformers writes null
# for a model without them; its DeepseekV3Config defaults, 0 and 1, apply only when the key is absent).
_NULLABLE_IDS = ("bos_token_id", "eos_token_id")

MHC_MODEL_TYPE = "seekling_mhc"
MHC_FIELDS = ("hc_mult", "hc_sinkhorn_iters", "hc_eps")  # same names in config.json as in ModelConfig
ENGRAM_MODEL_TYPE = "seekling_engram"
SEEKLING_MODEL_TYPES = ("deepseek_v3", MHC_MODEL_TYPE, ENGRAM_MODEL_TYPE)
# transformers' code for mHC checkpoints (seekling/hf_remote/), copied into each one; config.json's
# auto_map points AutoConfig / AutoModel(ForCausalLM) at it, for trust_remote_code=True.
REMOTE_CODE = Path(__file__).parent / "hf_remote"
REMOTE_CODE_FILES = ("configuration_seekling_mhc.py", "modeling_seekling_mhc.py")
_AUTO_MAP = {"AutoConfig": "configuration_seekling_mhc.SeeklingMHCConfig",
             "AutoModel": "modeling_seekling_mhc.SeeklingMHCModel",
             "AutoModelForCausalLM": "modeling_seekling_mhc.SeeklingMHCForCausalLM"}

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3


# ---------------------------------------------------------------- config.json

def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    d = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    if cfg.has_engram:  # with or without mHC; no transformers code, so no auto_map
        d = {"architectures": ["SeeklingEngramForCausalLM"], "model_type": ENGRAM_MODEL_TYPE,
             "engram": dataclasses.asdict(cfg.engram)}
        d.update({f: getattr(cfg, f) for f in MHC_FIELDS})
    elif cfg.has_mhc:
        d = {"architectures": ["SeeklingMHCForCausalLM"], "model_type": MHC_MODEL_TYPE, "auto_map": dict(_AUTO_MAP)}
        d.update({f: getattr(cfg, f) for f in MHC_FIELDS})
    for ours, theirs in CONFIG_MAP.items():
        d[theirs] = getattr(cfg, ours)
    d.update(
        num_key_value_heads=cfg.n_heads, hidden_act="silu", attention_bias=False, attention_dropout=0.0,
        tie_word_embeddings=False, use_cache=True, scoring_func="sigmoid", topk_method="noaux_tc",
        moe_layer_freq=1, pad_token_id=None, dtype=str(dtype).removeprefix("torch."),
        rope_parameters=_rope_to_hf(cfg),
    )
    return d


def _rope_to_hf(cfg: ModelConfig) -> dict:
    if cfg.rope_type == "default":
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale_all_dim}


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a DeepseekV3Config dict, refusing what we cannot run faithfully."""
    def bad(field, msg):
        raise ValueError(f"{source}: {field} {msg}")

    model_type = d.get("model_type")
    if model_type not in SEEKLING_MODEL_TYPES:
        bad("model_type", f"is {model_type!r}; seekling loads DeepSeek-V3-layout checkpoints (model_type 'deepseek_v3') "
            f"and its own mHC and Engram variants of them ('{MHC_MODEL_TYPE}', '{ENGRAM_MODEL_TYPE}')"
            + ("; DeepSeek-V4's compressed and hash-routed attention is not implemented here" if model_type == "deepseek_v4" else ""))
    if model_type != ENGRAM_MODEL_TYPE and d.get("engram"):
        bad("engram", f"is set but model_type is {model_type!r}, which has no Engram layers; an Engram checkpoint "
            f"says model_type '{ENGRAM_MODEL_TYPE}' (re-save it with seekling.save)")
    if model_type == ENGRAM_MODEL_TYPE and not (isinstance(d.get("engram"), dict) and d["engram"].get("layers")):
        bad("engram", f"is {d.get('engram')!r}; model_type '{ENGRAM_MODEL_TYPE}' needs the Engram settings with at least "
            "one layer; a model without Engram says model_type 'deepseek_v3'")
    if model_type == "deepseek_v3" and d.get("hc_mult", 1) != 1:
        bad("hc_mult", f"is {d['hc_mult']!r} but model_type is 'deepseek_v3', which has no hyper-connections; "
            f"an mHC checkpoint says model_type '{MHC_MODEL_TYPE}' (re-save it with seekling.save)")
    if model_type == MHC_MODEL_TYPE and not (isinstance(d.get("hc_mult"), int) and d["hc_mult"] > 1):
        bad("hc_mult", f"is {d.get('hc_mult')!r}; model_type '{MHC_MODEL_TYPE}' needs hc_mult > 1 (the number of "
            "residual streams); a model without mHC says model_type 'deepseek_v3'")
    if d.get("quantization_config"):
        bad("quantization_config", "is set: quantized (e.g. FP8) checkpoints are not supported; dequantize to bf16 first")
    checks = {"hidden_act": ("silu",), "scoring_func": (None, "sigmoid"), "topk_method": (None, "noaux_tc"),
              "tie_word_embeddings": (None, False), "attention_bias": (None, False), "moe_layer_freq": (None, 1)}
    for key, allowed in checks.items():
        if d.get(key) not in allowed:
            bad(key, f"is {d.get(key)!r}; only {[a for a in allowed if a is not None]} is supported")
    kwargs = {}
    for ours, theirs in CONFIG_MAP.items():
        # A null token id is a statement ("this model has no eos"), as transformers writes it; any
        # other null falls back to the default. A list of eos ids stays a list: each one stops.
        if theirs in d and (d[theirs] is not None or ours in _NULLABLE_IDS):
            kwargs[ours] = d[theirs]
    for key in ("n_expert_groups", "n_limited_groups"):
        kwargs.setdefault(key, 1)
    if model_type in (MHC_MODEL_TYPE, ENGRAM_MODEL_TYPE):
        kwargs.update({f: d[f] for f in MHC_FIELDS if d.get(f) is not None})
    if model_type == ENGRAM_MODEL_TYPE:
        kwargs["engram"] = d["engram"]
    kwargs.update(_rope_from_hf(d, source))
    try:
        return ModelConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _rope_from_hf(d: dict, source: str) -> dict:
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    out = {"rope_theta": float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))}
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype == "default":
        return out | {"rope_type": "default"}
    if rtype != "yarn":
        raise ValueError(f"{source}: rope type {rtype!r} is not supported (use 'default' or 'yarn')")
    orig = rope.get("original_max_position_embeddings", d.get("max_position_embeddings"))
    factor = rope.get("factor") or d["max_position_embeddings"] / orig
    return out | {"rope_type": "yarn", "rope_factor": float(factor), "original_seq_len": int(orig),
                  "beta_fast": float(rope.get("beta_fast") or 32), "beta_slow": float(rope.get("beta_slow") or 1),
                  "mscale": float(rope.get("mscale") or 0.0), "mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0)}


# ---------------------------------------------------------------- tensor names

def _block_to_hf(prefix: str, key: str, t: torch.Tensor, out: dict):
    if key == "ffn.experts.w13":
        inter = t.shape[1] // 2
        for e in range(t.shape[0]):
            out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = t[e, :inter]
            out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = t[e, inter:]
    elif key == "ffn.experts.w2":
        for e in range(t.shape[0]):
            out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = t[e]
    else:
        out[prefix + BLOCK_KEY_MAP[key]] = t


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our state dict renamed (and experts unstacked) to the Hugging Face DeepSeek-V3 names."""
    L = model.cfg.n_layers
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if name in TOP_KEY_MAP:
            out[TOP_KEY_MAP[name]] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
            _block_to_hf(f"model.layers.{m[1]}.", m[2], t, out)
        elif m := re.fullmatch(r"mtp\.(\d+)\.block\.(.+)", name):
            _block_to_hf(f"model.layers.{L + int(m[1])}.", m[2], t, out)
        elif m := re.fullmatch(r"mtp\.(\d+)\.(.+)", name):
            out[f"model.layers.{L + int(m[1])}.{MTP_KEY_MAP[m[2]]}"] = t
        else:
            raise AssertionError(f"no Hugging Face name for parameter {name}")
    sd = model.state_dict()
    for k in range(model.cfg.n_mtp_layers):
        for theirs, ours in MTP_SHARED_COPIES.items():
            out[f"model.layers.{L + k}.{theirs}"] = sd[ours].detach()
    return out


def hf_key_map(cfg: ModelConfig, model_keys) -> dict[str, str]:
    """Hugging Face name -> our name, for every non-expert tensor of a model with these keys."""
    L, out = cfg.n_layers, {}
    inv_block = {v: k for k, v in BLOCK_KEY_MAP.items() if v}
    for name in model_keys:
        if name in TOP_KEY_MAP:
            out[TOP_KEY_MAP[name]] = name
        elif (m := re.fullmatch(r"layers\.(\d+)\.(.+)", name)) and BLOCK_KEY_MAP.get(m[2]):
            out[f"model.layers.{m[1]}.{BLOCK_KEY_MAP[m[2]]}"] = name
        elif (m := re.fullmatch(r"mtp\.(\d+)\.block\.(.+)", name)) and BLOCK_KEY_MAP.get(m[2]):
            out[f"model.layers.{L + int(m[1])}.{BLOCK_KEY_MAP[m[2]]}"] = name
        elif (m := re.fullmatch(r"mtp\.(\d+)\.(.+)", name)) and m[2] in MTP_KEY_MAP:
            out[f"model.layers.{L + int(m[1])}.{MTP_KEY_MAP[m[2]]}"] = name
    assert inv_block  # the table is not empty
    return out


# ---------------------------------------------------------------- save

def save(model, path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: torch.dtype | None = None,
         stop_token_ids: tuple[int, ...] = ()):
    """Write config.json, generation_config.json and safetensors weights into directory `path`.

    `stop_token_ids` are ids besides eos that end a generation (a chat model's end-of-turn):
    generation_config.json then lists them all as `eos_token_id`, which is how transformers'
    `generate` and vLLM learn to stop there.

    Each file is written under a temporary name and renamed into place, weights before config, so
    a crash never leaves a truncated file where a good one was; other files in the directory (a
    tokenizer, training state) are left alone.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    if dtype is not None:
        tensors = {k: (v if keeps_fp32(k) or not v.is_floating_point() else v.to(dtype)) for k, v in tensors.items()}
    # safetensors wants contiguous tensors that own no shared storage.
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    weight_dtype = next(v.dtype for k, v in tensors.items() if k.endswith("embed_tokens.weight"))
    total = sum(v.numel() * v.element_size() for v in tensors.values())

    shards, cur, cur_bytes = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if cur and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = tensors[k]
        cur_bytes += nbytes
    shards.append(cur)

    old_files = {p.name for p in path.glob("model*.safetensors")} | ({SAFE_INDEX} if (path / SAFE_INDEX).exists() else set())
    if len(shards) == 1:
        written = [SAFE_SINGLE]
        _atomic_write(path / SAFE_SINGLE, lambda f: save_file(shards[0], f, metadata={"format": "pt"}))
    else:
        n = len(shards)
        written, weight_map = [], {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            _atomic_write(path / name, lambda f, s=shard: save_file(s, f, metadata={"format": "pt"}))
            written.append(name)
            weight_map.update({k: name for k in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write_text(path / SAFE_INDEX, json.dumps(index, indent=2, sort_keys=True))
        written.append(SAFE_INDEX)
    cfg = model.cfg
    # A model without an eos id lists only the extra stop ids; one id stays a plain number, as DeepSeek writes it.
    eos = list(dict.fromkeys((*cfg.eos_token_ids, *stop_token_ids)))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos if len(eos) > 1 else (eos[0] if eos else None),
           "do_sample": False}
    _atomic_write_text(path / "generation_config.json", json.dumps(gen, indent=2))
    if cfg.has_mhc and not cfg.has_engram:
        for name in REMOTE_CODE_FILES:
            _atomic_write_text(path / name, (REMOTE_CODE / name).read_text().rstrip("\n"))
    _atomic_write_text(path / "config.json", json.dumps(config_to_hf(cfg, weight_dtype), indent=2, sort_keys=True))
    for stale in old_files - set(written):  # weights of an earlier save with a different layout
        (path / stale).unlink(missing_ok=True)


def _atomic_write(dest: Path, write):
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_text(dest: Path, text: str):
    def write(name):
        with open(name, "w") as f:
            f.write(text + "\n")
    _atomic_write(dest, write)


# ---------------------------------------------------------------- load

def read_config(path) -> ModelConfig:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: expected a directory holding config.json and model.safetensors")
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: is it a Hugging Face model directory?")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}); restore it from the original checkpoint") from None
    return config_from_hf(d, str(cfg_file))


def _weight_files(path: Path) -> list[Path]:
    if (path / SAFE_INDEX).is_file():
        try:
            index = json.loads((path / SAFE_INDEX).read_text())
            names = sorted(set(index["weight_map"].values()), key=str)  # key=str: a bad entry is reported below
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{path / SAFE_INDEX} is not a valid safetensors index ({e})") from None
        for name in names:
            _check_shard_name(path, name)
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path / SAFE_INDEX} lists shards that are missing: {', '.join(missing[:5])}")
        return [path / n for n in names]
    if (path / SAFE_SINGLE).is_file():
        return [path / SAFE_SINGLE]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise FileNotFoundError(f"{path} has only pickle-based weights (.bin/.pt); seekling never unpickles files. "
                                "Convert them to safetensors with transformers' save_pretrained(safe_serialization=True)")
    raise FileNotFoundError(f"{path} has no {SAFE_SINGLE} or {SAFE_INDEX}")


def _check_shard_name(path: Path, name) -> None:
    """Refuse an index entry that names a file outside the checkpoint directory.

    The index comes with a downloaded checkpoint, so it must not be able to make us read (and
    report errors about) any other file on the machine. The directories on the way are resolved,
    which catches `..` and a symlinked directory; the shard file itself may be a symlink, because
    the Hugging Face hub cache stores every file of a snapshot as a link into its blobs/ folder.
    """
    index_file = path / SAFE_INDEX
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index_file}: weight_map names shard {name!r}, which is not a file name; "
                         "each value must be a shard file name such as 'model-00001-of-00002.safetensors'")
    root = path.resolve()
    if Path(name).is_absolute() or not (path / name).parent.resolve().is_relative_to(root):
        raise ValueError(f"{index_file}: weight_map names shard {name!r}, which is outside the checkpoint "
                         f"directory {root}; shards must lie inside it: move the shard files into the directory "
                         "and list them by file name (e.g. 'model-00001-of-00002.safetensors')")


def read_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in _weight_files(Path(path)):
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    tensors[k] = st.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e}); it may be truncated or corrupted: "
                             "re-download or re-save it") from None
    return tensors


def load(path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a DeepSeek-V3-layout checkpoint directory into a seekling Transformer."""
    path = Path(path)
    cfg = read_config(path)
    hf = read_tensors(path)
    if cfg.n_mtp_layers and not any(k.startswith(f"model.layers.{cfg.n_layers}.") for k in hf):
        # transformers drops MTP weights when it saves; the main model is still exact without them.
        warnings.warn(f"{path}: config has {cfg.n_mtp_layers} MTP layer(s) but the weights hold none "
                      "(transformers does not save them); loading without MTP", stacklevel=2)
        cfg = cfg.replace(n_mtp_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    _check_mhc_tensors(hf, cfg, path)
    _check_engram_tensors(hf, cfg, path)
    ours = from_hf_state_dict(hf, cfg, model.state_dict(), str(path))
    if dtype is None:
        dtype = ours["embed.weight"].dtype
    # Integer tensors (Engram's id map and hash multipliers) keep their dtype.
    ours = {k: (v if not v.is_floating_point() else v.float() if keeps_fp32(k) else v.to(dtype))
            for k, v in ours.items()}
    model.load_state_dict(ours, assign=True)
    # The rope buffer is not in the checkpoint (non-persistent) and was built on the meta device;
    # so were Engram's primes and offsets.
    model.rope.inv_freq = rope_inv_freq(cfg)[0]
    for layer in model.layers:
        if layer.engram is not None:
            layer.engram.reset_index_buffers()
    return model.to(device).eval()


def keeps_fp32(name: str) -> bool:
    """Tensors that stay fp32 in a bf16 model or checkpoint: the balance bias, and mHC's mixing
    parameters (DeepSeek-V4 keeps them fp32: bf16 would round the Sinkhorn inputs)."""
    return name.endswith("e_score_correction_bias") or bool(re.search(r"(_hc\.(fn|base|scale)|hc_head\.\w+)$", name))


def _check_mhc_tensors(hf: dict, cfg: ModelConfig, path) -> None:
    """Name the mismatch when mHC weights meet a plain config or the reverse (a hand-edited config.json)."""
    has_hc = any(re.search(r"\.(attn_hc|ffn_hc|hc_head)\.", k) for k in hf)
    if has_hc and not cfg.has_mhc:
        raise ValueError(f"{path}: the weights hold mHC tensors (attn_hc / ffn_hc / hc_head) but config.json describes a "
                         f"plain DeepSeek-V3 model; an mHC checkpoint says model_type '{MHC_MODEL_TYPE}' with its hc_mult: "
                         "restore the config.json that was saved with these weights")
    if cfg.has_mhc and not has_hc:
        raise ValueError(f"{path}: config.json says model_type '{MHC_MODEL_TYPE}' with hc_mult {cfg.hc_mult} but the weights "
                         "hold no mHC tensors (attn_hc / ffn_hc / hc_head); config.json and the safetensors files do not match")


def _check_engram_tensors(hf: dict, cfg: ModelConfig, path) -> None:
    """Name the mismatch when Engram weights meet a config without Engram or the reverse."""
    has = any(".engram." in k or k.startswith("model.engram_vocab.") for k in hf)
    if has and not cfg.has_engram:
        raise ValueError(f"{path}: the weights hold Engram tensors (engram_vocab / layers.N.engram) but config.json "
                         f"describes a model without Engram; an Engram checkpoint says model_type '{ENGRAM_MODEL_TYPE}' "
                         "with its engram settings: restore the config.json that was saved with these weights")
    if cfg.has_engram and not has:
        raise ValueError(f"{path}: config.json says model_type '{ENGRAM_MODEL_TYPE}' but the weights hold no Engram "
                         "tensors; config.json and the safetensors files do not match")


def from_hf_state_dict(hf: dict, cfg: ModelConfig, expected: dict, source: str) -> dict:
    """Rename (and restack experts) Hugging Face tensors to our names, checking names and shapes."""
    key_map = hf_key_map(cfg, expected)
    ours, used = {}, set()
    for theirs, name in key_map.items():
        if theirs in hf:
            ours[name] = hf[theirs]
            used.add(theirs)
    for name in expected:
        m = re.fullmatch(r"(layers\.(\d+)|mtp\.(\d+)\.block)\.ffn\.experts\.(w13|w2)", name)
        if not m:
            continue
        layer = int(m[2]) if m[2] is not None else cfg.n_layers + int(m[3])
        pre = f"model.layers.{layer}.mlp.experts."
        parts = ("gate_proj", "up_proj") if m[4] == "w13" else ("down_proj",)
        keys = [[f"{pre}{e}.{p}.weight" for p in parts] for e in range(cfg.n_routed_experts)]
        if all(k in hf for ks in keys for k in ks):
            ours[name] = torch.stack([torch.cat([hf[k] for k in ks]) for ks in keys])
            used.update(k for ks in keys for k in ks)
    for k in range(cfg.n_mtp_layers):  # copies of the shared embedding / head: we use the main ones
        for theirs, main in MTP_SHARED_COPIES.items():
            key = f"model.layers.{cfg.n_layers + k}.{theirs}"
            used.add(key)
            if key in hf and main in ours and not torch.equal(hf[key], ours[main]):
                warnings.warn(f"{source}: {key} differs from the main model's {main}; seekling shares the main "
                              "one, as DeepSeek-V3 trains MTP", stacklevel=3)
    missing = [k for k in expected if k not in ours]
    if missing:
        raise ValueError(f"{source}: the weights lack {len(missing)} tensor(s) the config needs, e.g. "
                         f"{', '.join(missing[:4])}; config.json and the safetensors files do not match")
    unexpected = sorted(set(hf) - used)
    if unexpected:
        raise ValueError(f"{source}: the weights hold {len(unexpected)} tensor(s) the config does not describe, "
                         f"e.g. {', '.join(unexpected[:4])}; config.json and the safetensors files do not match")
    for name, t in ours.items():
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise ValueError(f"{source}: tensor for {name} has shape {tuple(t.shape)} but the config implies {want}; "
                             "config.json and the safetensors files do not match")
    return ours


def n_bytes(model) -> int:
    return sum(math.prod(p.shape) * p.element_size() for p in model.parameters())
