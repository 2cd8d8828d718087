"""The GRPO objective (r1/grpo.py): advantages and every loss type against hand-computed numbers and a
plain-Python loop, the clip's direction through its gradient, gradient accumulation against one big
batch, the ratio across optimizer steps, and the engine's log-probabilities against the trainer's."""

import math

import pytest
import torch
from test_train_support import TINY_MODEL, _private_cache  # noqa: F401 (fixture: one thread, private cache)

from seekling.inference.engine import Engine, EngineConfig
from seekling.inference.sampling import SamplingParams
from seekling.model.transformer import Transformer
from seekling.r1.grpo import GRPOConfig, group_advantages, grpo_loss_fn, policy_loss, share_step_tokens, token_logprobs
from seekling.train.config import TrainConfig
from seekling.train.core import StepConfig, TrainStep
from seekling.train.optim import build_optimizer

# ------------------------------------------------------------------ advantages


def test_advantages_by_hand():
    adv, zero = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    # group 0: mean 1/4, population std sqrt((0.75^2 + 3 * 0.25^2) / 4) = sqrt(0.1875)
    s = math.sqrt(0.1875) + 1e-4
    assert adv[0].tolist() == pytest.approx([0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s], rel=1e-6)
    assert adv[0, 0].item() == pytest.approx(1.73165, rel=1e-5)
    # group 1: mean 1/2, std 1/2 (the sample std would be 0.577 and give +-0.866)
    assert adv[1].tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001], rel=1e-6)
    assert adv[2].tolist() == [0.0] * 4
    assert zero.tolist() == [False, False, True]
    assert adv.dtype == torch.float32


def test_advantages_against_a_loop():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (6, 5), generator=g).double() / 2
    for scale in (True, False):
        adv, zero = group_advantages(rewards, scale=scale)
        for i, row in enumerate(rewards.tolist()):
            mean = sum(row) / len(row)
            std = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))
            want = [(r - mean) / (std + 1e-4) if scale else r - mean for r in row]
            assert adv[i].tolist() == pytest.approx(want, abs=1e-6)
            assert bool(zero[i]) == (len(set(row)) == 1)


def test_unscaled_advantages_are_reward_minus_mean():
    adv, _ = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), scale=False)  # Dr. GRPO, nanochat
    assert adv[0].tolist() == [0.75, -0.25, -0.25, -0.25]


def test_zero_variance_groups_are_exactly_zero_and_counted():
    # three 0.1s: their float mean is 0.10000000000000002, so r - mean alone is not 0 (-1.4e-17)
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 0.1, 0.1], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    for scale in (True, False):
        adv, zero = group_advantages(rewards, scale=scale)
        assert zero.tolist() == [True, False, True, True]
        assert int(zero.sum()) == 3
        assert (adv[zero] == 0).all()
        assert (adv[~zero] != 0).all()


def test_advantages_reject_one_completion_groups():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.tensor([[1.0], [0.0]]))


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("changes, field", [
    (dict(epsilon=0.0), "epsilon"), (dict(epsilon=1.5), "epsilon"), (dict(epsilon_high=-0.1), "epsilon_high"),
    (dict(loss_type="ppo"), "loss_type"), (dict(beta=-1.0), "beta"), (dict(loss_type="dr_grpo"), "max_completion_len"),
    (dict(max_completion_len=0), "max_completion_len"), (dict(scale_rewards="yes"), "scale_rewards"),
])
def test_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=f"GRPOConfig.{field}:"):
        GRPOConfig(**changes)


def test_config_defaults():
    cfg = GRPOConfig()
    assert (cfg.epsilon, cfg.epsilon_high, cfg.beta, cfg.scale_rewards) == (0.2, 0.2, 0.0, True)
    assert GRPOConfig(epsilon=0.2, epsilon_high=0.28).epsilon_high == 0.28
    assert GRPOConfig(loss_type="dr_grpo", max_completion_len=8).scale_rewards is False
    assert GRPOConfig(loss_type="dapo").scale_rewards is True
    with pytest.raises(TypeError):
        GRPOConfig(0.2)  # keyword-only


# ------------------------------------------------------------------ the loss, by hand

# Two sequences, T = 4, position 0 a prompt token, seq 0 padded at position 3. Ratios (exp of the
# log-ratio) and advantages chosen so that every clip case occurs, with epsilon 0.2, epsilon_high 0.28:
#   seq 0, A = +2: r = 1.5 -> min(3.0, 1.28 * 2 = 2.56) = 2.56, clipped high;  r = 0.5 -> min(1.0, 1.6) = 1.0
#   seq 1, A = -1: r = 0.5 -> min(-0.5, -0.8) = -0.8, clipped low;  r = 1.5 -> min(-1.5, -1.28) = -1.5;  r = 1 -> -1
# Per-token losses (-objective): seq 0 [-2.56, -1.0], seq 1 [0.8, 1.5, 1.0].
RATIOS = [[1.0, 1.5, 0.5, 1.0], [1.0, 0.5, 1.5, 1.0]]
MASK = [[0, 1, 1, 0], [0, 1, 1, 1]]
ADV = [2.0, -1.0]
HAND = {"grpo": ((-2.56 - 1.0) / 2 + (0.8 + 1.5 + 1.0) / 3) / 2,  # -0.34
        "dapo": (-2.56 - 1.0 + 0.8 + 1.5 + 1.0) / 5,  # -0.052
        "dr_grpo": (-2.56 - 1.0 + 0.8 + 1.5 + 1.0) / (2 * 4)}  # -0.0325


def _hand_batch():
    old = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, -3.0, -1.0]])
    logp = old + torch.tensor(RATIOS).log()
    logp[0, 3] = 100.0  # padding holds garbage: exp(100) is inf in fp32, and inf * 0 = nan must not reach the loss
    return logp, old, torch.tensor(ADV), torch.tensor(MASK, dtype=torch.bool)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_every_loss_type_by_hand(loss_type):
    cfg = GRPOConfig(epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_len=4)
    logp, old, adv, mask = _hand_batch()
    loss, stats = policy_loss(logp, old, adv, mask, cfg)
    assert loss.item() == pytest.approx(HAND[loss_type], abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    assert stats["clip_low_frac"].item() == pytest.approx(1 / 5)
    assert stats["clip_high_frac"].item() == pytest.approx(1 / 5)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.0) / 5)
    assert stats["tokens"].item() == 5
    assert "kl" not in stats  # no reference given: not measured, so not reported as 0


def test_negative_weight_scales_only_the_negative_advantages():
    # sequence 1 (A = -1) contributes 0.8 + 1.5 + 1.0 at weight 1; every one of its terms is linear in A
    logp, old, adv, mask = _hand_batch()
    for w in (0.0, 0.5):
        cfg = GRPOConfig(epsilon=0.2, epsilon_high=0.28, loss_type="dapo", negative_weight=w)
        loss, _ = policy_loss(logp, old, adv, mask, cfg)
        assert loss.item() == pytest.approx((-2.56 - 1.0 + w * (0.8 + 1.5 + 1.0)) / 5, abs=1e-6)
    with pytest.raises(ValueError, match="negative_weight"):
        GRPOConfig(negative_weight=1.5)


def test_clipped_tokens_get_no_gradient():
    # d loss / d logp = -r * A / (tokens of the sequence * sequences) where the unclipped term is
    # selected, 0 where the clip binds (grpo: seq 0 weighs 1/(2*2), seq 1 weighs 1/(3*2)).
    cfg = GRPOConfig(epsilon=0.2, epsilon_high=0.28)
    logp, old, adv, mask = _hand_batch()
    logp.requires_grad_(True)
    policy_loss(logp, old, adv, mask, cfg)[0].backward()
    want = [[0.0, 0.0, -0.5 * 2 / 4, 0.0], [0.0, 0.0, 1.5 / 6, 1.0 / 6]]
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-7) for row in want]


def test_kl_term_by_hand():
    # ref - logp = ln 2 at one token: k3 = 2 - ln 2 - 1 = 0.3069; 0 elsewhere
    cfg = GRPOConfig(epsilon=0.2, epsilon_high=0.28, loss_type="dapo", beta=0.1)
    logp, old, adv, mask = _hand_batch()
    ref = logp.clone()
    ref[1, 2] += math.log(2)
    ref[0, 3] = -80.0  # garbage off the mask again
    loss, stats = policy_loss(logp, old, adv, mask, cfg, ref_logp=ref)
    k3 = 2 - math.log(2) - 1
    assert loss.item() == pytest.approx(HAND["dapo"] + 0.1 * k3 / 5, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(k3 / 5, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, adv, mask, cfg)


def _loop_loss(logp, old, ref, adv, mask, eps_lo, eps_hi, beta, loss_type, max_len):
    """The objective written out token by token in plain Python."""
    per_seq, total, n_tok = [], 0.0, 0
    for i in range(len(logp)):
        s, n = 0.0, 0
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            r_clip = min(max(r, 1 - eps_lo), 1 + eps_hi)
            tok = -min(r * adv[i], r_clip * adv[i])
            d = ref[i][t] - logp[i][t]
            tok += beta * (math.exp(d) - d - 1)
            s, n = s + tok, n + 1
        per_seq.append(s / max(n, 1))
        total, n_tok = total + s, n_tok + n
    if loss_type == "grpo":
        return sum(per_seq) / len(per_seq)
    if loss_type == "dapo":
        return total / n_tok
    return total / (len(logp) * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_every_loss_type_against_a_loop(loss_type):
    g = torch.Generator().manual_seed(1)
    B, T = 5, 9
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4  # ratios ~ 0.5-2: all clip cases
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lens = [0, 3, 5, 8, 1]  # an empty completion counts as a sequence with no tokens
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lens):
        mask[i, 1:1 + n] = True
    cfg = GRPOConfig(epsilon=0.2, epsilon_high=0.28, beta=0.05, loss_type=loss_type, max_completion_len=8)
    loss, _ = policy_loss(logp.float(), old.float(), adv.float(), mask, cfg, ref_logp=ref.float())
    want = _loop_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 0.05,
                      loss_type, 8)
    assert loss.item() == pytest.approx(want, abs=1e-5)


# ------------------------------------------------------------------ through the model and TrainStep


def _model(seed=0, head_scale=1.0):
    model = Transformer(TINY_MODEL)
    model.init_weights(seed)
    with torch.no_grad():
        # The initial model is near-uniform (every logprob ~ -ln 4096 = -8.3, spread 0.1), which would
        # let an off-by-one in the positions pass; a sharper head spreads logprobs over ~[-10, 0].
        model.head.weight.mul_(head_scale)
    return model


def _rollout_batch(lens, prompt_len=4, T=20, seed=0):
    """Random prompts and completions of the given lengths, right-padded; advantages from rewards."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    ids = torch.randint(0, TINY_MODEL.vocab_size, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lens):
        mask[i, prompt_len:prompt_len + n] = True
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]][: B // 2])
    adv, _ = group_advantages(rewards)
    return {"input_ids": ids, "completion_mask": mask, "advantages": adv.flatten()}


def _optimizer(model, lr):
    cfg = TrainConfig(model=TINY_MODEL, seq_len=32, lr=lr, weight_decay=0.0, dtype="float32")
    return build_optimizer(model, cfg)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_first_step_has_ratio_one_and_later_steps_do_not(loss_type):
    model = _model()
    lens = [5, 9, 3, 12]
    batch = _rollout_batch(lens)
    adv = [0.5, -1.0, 2.0, 0.25]  # not a group's (those sum to 0 and would make every expected loss 0)
    batch["advantages"] = torch.tensor(adv)
    with torch.no_grad():
        batch["old_logp"] = token_logprobs(model, batch["input_ids"], batch["completion_mask"])
    cfg = GRPOConfig(loss_type=loss_type, max_completion_len=16)
    step = TrainStep(model, _optimizer(model, lr=3e-2), grpo_loss_fn(cfg), StepConfig(grad_clip=0.0))
    first = step([batch])
    # old == new: ratio exactly 1, nothing clipped, and the loss is minus the advantages weighted
    # as the loss type weighs sequences: equally (grpo), by their tokens (dapo, dr_grpo)
    weighted = sum(n * a for n, a in zip(lens, adv))
    want = {"grpo": -sum(adv) / 4, "dapo": -weighted / sum(lens), "dr_grpo": -weighted / (4 * 16)}[loss_type]
    assert first["ratio_mean"] == 1.0
    assert first["clip_frac"] == 0.0
    assert first["loss"] == pytest.approx(want, abs=1e-6)
    second = step([batch])  # the same rollouts, one optimizer step later: off-policy now
    assert abs(second["ratio_mean"] - 1.0) > 1e-3
    assert second["clip_frac"] > 0
    assert second["loss"] < first["loss"]  # the step raised the surrogate objective


class _GradRecorder(torch.optim.Optimizer):
    """An optimizer that keeps the step's gradients and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.clone() if p.grad is not None else None for g in self.param_groups for p in g["params"]]


def _step_grads(model, micro, cfg):
    opt = _GradRecorder(model.parameters())
    TrainStep(model, opt, grpo_loss_fn(cfg), StepConfig(grad_clip=0.0))(micro)
    return opt.grads


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_two_micro_batches_equal_one_big_batch(loss_type):
    model = _model()
    batch = _rollout_batch([2, 14, 6, 6])  # the halves hold 16 and 12 completion tokens
    with torch.no_grad():
        logp = token_logprobs(model, batch["input_ids"], batch["completion_mask"])
    noise = torch.randn(logp.shape, generator=torch.Generator().manual_seed(3)) * 0.3
    batch["old_logp"] = (logp + noise) * batch["completion_mask"]  # ratios away from 1: some tokens clip
    cfg = GRPOConfig(loss_type=loss_type, epsilon_high=0.28, max_completion_len=16)
    # unequal parts: 1 sequence (2 tokens) and 3 sequences (26 tokens), as the last micro-batch of a
    # rollout or one left after skipping zero-variance groups
    parts = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 1), slice(1, 4))]
    big = _step_grads(model, share_step_tokens([batch]), cfg)
    split = _step_grads(model, share_step_tokens(parts), cfg)
    assert sum(g is not None for g in big) > 10
    for a, b in zip(big, split):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    # each part normalised by its own tokens (dapo) or sequences (grpo, dr_grpo) weighs the lone
    # sequence three times as much: not the same gradient
    local = _step_grads(model, parts, cfg)
    assert max((a - b).abs().max().item() for a, b in zip(big, local) if a is not None) > 1e-4


def test_token_logprobs_by_hand():
    # log_softmax(logits at t-1)[token t], fp32, zeros off the mask
    model = _model(head_scale=40.0)
    ids = torch.tensor([[5, 17, 300, 9, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        got = token_logprobs(model, ids, mask)
        logits = model(ids)[0].double()
    want = [0.0, 0.0, 0.0, 0.0, 0.0]
    for t in (2, 3):
        row = logits[t - 1].tolist()
        m = max(row)
        want[t] = row[ids[0, t]] - m - math.log(sum(math.exp(x - m) for x in row))
    assert got[0].tolist() == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="position 0"):
        token_logprobs(model, ids, torch.ones_like(mask))


# ------------------------------------------------------------------ the engine against the trainer


def _sample(engine, prompts, seed0):
    outs = engine.generate(prompts, [SamplingParams(temperature=1.0, seed=seed0 + i, max_tokens=14)
                                     for i in range(len(prompts))])
    T = max(len(o.prompt_ids) + len(o.output_ids) for o in outs)
    ids = torch.zeros(len(outs), T, dtype=torch.long)
    mask = torch.zeros(len(outs), T, dtype=torch.bool)
    engine_lp = torch.zeros(len(outs), T)
    for i, o in enumerate(outs):
        seq, p = o.prompt_ids + o.output_ids, len(o.prompt_ids)
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, p:len(seq)] = True
        engine_lp[i, p:len(seq)] = torch.tensor(o.logprobs)
    return ids, mask, engine_lp


def test_engine_logprobs_equal_the_trainers_before_and_after_a_step():
    model = _model(head_scale=40.0)
    engine = Engine(model, EngineConfig(seed=0))  # absorbed attention, the engine's default path
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11], [42], [5, 6]]
    ids, mask, engine_lp = _sample(engine, prompts, seed0=0)
    assert int(mask.sum()) > 30 and engine_lp[mask].std() > 0.5  # real samples, spread-out logprobs
    with torch.no_grad():
        trainer_lp = token_logprobs(model, ids, mask)
    torch.testing.assert_close(trainer_lp, engine_lp, atol=1e-5, rtol=0)

    # One GRPO step on these rollouts, weights updated in place; the same Engine samples again.
    adv, _ = group_advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    batch = {"input_ids": ids, "completion_mask": mask, "old_logp": engine_lp, "advantages": adv.flatten()}
    metrics = TrainStep(model, _optimizer(model, lr=1e-2), grpo_loss_fn(GRPOConfig()))([batch])
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # old_logp from the engine: ratio 1 up to 1e-5
    with torch.no_grad():
        moved = token_logprobs(model, ids, mask)
    assert (moved - trainer_lp).abs().max() > 1e-2  # the step changed the policy on these tokens

    ids2, mask2, engine_lp2 = _sample(engine, prompts, seed0=100)
    with torch.no_grad():
        trainer_lp2 = token_logprobs(model, ids2, mask2)
    torch.testing.assert_close(trainer_lp2, engine_lp2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_without_old_logp_the_first_update_is_on_policy(loss_type):
    # No old_logp: the loss takes the trainer's own log-probabilities, detached, as the sampling
    # policy's. The gradient must equal the one with old_logp computed beforehand by token_logprobs.
    model = _model()
    batch = _rollout_batch([5, 9, 3, 12])
    cfg = GRPOConfig(loss_type=loss_type)
    with torch.no_grad():
        old = token_logprobs(model, batch["input_ids"], batch["completion_mask"])
    detached = _step_grads(model, [batch], cfg)
    explicit = _step_grads(model, [batch | {"old_logp": old}], cfg)
    assert sum(g is not None for g in detached) > 10
    for a, b in zip(detached, explicit):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    # sampler_logp is compared, never used: a wrong one changes the logged gap, not the gradient
    noisy = _step_grads(model, [batch | {"sampler_logp": old + 0.5}], cfg)
    for a, b in zip(detached, noisy):
        if a is not None:
            assert torch.equal(a, b)
