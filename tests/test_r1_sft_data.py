"""Cold-start SFT data (r1/sft_data.py): targets on the assistant turn only, and a real learning signal."""

import pytest
import torch
from test_train_support import TINY_MODEL

from seekling.model.transformer import Transformer
from seekling.r1.sft_data import IGNORE, batch_order, collate, sft_example, sft_examples
from seekling.r1.tasks import get_task
from seekling.tokenizer import load_default_tokenizer
from seekling.train.config import TrainConfig
from seekling.train.core import StepConfig, TrainStep, evaluate, next_token_loss
from seekling.train.optim import build_optimizer


@pytest.fixture(scope="module")
def tok():
    return load_default_tokenizer()


@pytest.mark.parametrize("name", ["addition", "multiplication", "countdown"])
def test_targets_are_the_completion_a_rollout_is_scored_on(name, tok):
    task = get_task(name)
    problems = task.problems("train", 3, seed=1)
    examples = sft_examples(task, tok, 3, seed=1)
    x, y = collate(examples, tok.pad_id)
    for i, (p, e) in enumerate(zip(problems, examples)):
        targets = [t for t in y[i].tolist() if t != IGNORE]
        assert targets[-1] == tok.eot_id  # the model learns to end its turn
        text = tok.decode(targets[:-1])
        assert text == task.render_trace(p)
        assert task.check(p, text).correct
        prompt = tok.apply_chat_template(task.prompt_messages(p))
        assert e.ids[:len(prompt)] == tuple(prompt) and e.n_prompt == len(prompt)
        assert (y[i, :len(prompt) - 1] == IGNORE).all()  # no loss on the prompt
        assert x[i, :len(e.ids) - 1].tolist() == list(e.ids[:-1])


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch():
    a = [i for s in range(5) for i in batch_order(10, s, 4, seed=3)]
    assert a == [i for s in range(5) for i in batch_order(10, s, 4, seed=3)]
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))
    assert a[:10] != a[10:20]  # each epoch its own shuffle
    assert a != [i for s in range(5) for i in batch_order(10, s, 4, seed=4)]


def test_sft_steps_lower_the_loss_on_held_out_traces(tok, one_thread):
    """Masked SFT through the shared training step: the held-out completion loss falls."""
    task = get_task("addition", digits=2)
    train = sft_examples(task, tok, 64, seed=0)
    held = [collate([sft_example(task, p, tok) for p in task.problems("test", 16, seed=0)], tok.pad_id)]
    model = Transformer(TINY_MODEL.replace(max_seq_len=128))
    model.init_weights(0)
    step = TrainStep(model, build_optimizer(model, TrainConfig(model=TINY_MODEL, seq_len=16, lr=3e-3)),
                     next_token_loss(), StepConfig(grad_clip=1.0))
    before, n = evaluate(model, held, torch.float32)
    for s in range(30):
        step([collate([train[i] for i in batch_order(len(train), s, 8, seed=0)], tok.pad_id)], lr=3e-3)
    after, _ = evaluate(model, held, torch.float32)
    assert after / n < 0.8 * before / n


def test_collate_refuses_what_does_not_fit(tok):
    with pytest.raises(ValueError, match="at least one"):
        collate([], tok.pad_id)
    examples = sft_examples(get_task("addition"), tok, 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        collate(examples, tok.pad_id, max_len=4)
