"""torchrun on the CPU: 2 gloo processes against 1, through the real `seekling train` driver.

Each run is a subprocess (tests/dist_worker.py, under torch.distributed.run for 2 processes) on a
micro model in fp32 with one thread per process. The runs are made once per module and each test
reads what it needs from them:

    ref      1 process, 5 steps                      the curve every other run must follow
    dp2      2 processes, 5 steps                    FSDP2 data parallelism
    ep2      2 processes, ep 2, stopped at step 3    expert parallelism, then its checkpoint...
    ep2->1   1 process resuming ep2 to step 5        ...resumed at another world and ep size
    one->2   1 process stopped at step 3, resumed by 2 processes with ep 2            (slow)
    killed   2 processes, rank 1 SIGKILLed inside the step-4 save (ckpt_every 2)      (slow)
    revived  2 processes resuming `killed` from its last complete checkpoint (step 2) (slow)

and the same for a micro Engram model (replicated tables, sparse gradients, RowSparseAdam), 4 steps:

    engram ref, dp2, ep2 (stopped at step 2), ep2->1 (resumed to step 4), one->2  (the last slow)

Each run is made on first use, so the default suite (no slow tests) makes only the first four of each.

Tolerances: the ranks' mean of per-rank losses and FSDP's reduce-scatter sum in another order
than one process does, so 2-process numbers match 1-process ones to float rounding (measured:
|diff| <= 5e-7 on losses, 3e-5 relative on gradient norms, over 5 steps), not bit for bit;
1e-4 relative leaves room across CPUs. The Engram tables' gradients are summed across ranks in
another order too (measured: losses to 5e-7, gradient norms to 1.2e-5 relative, final tables to 7e-8).
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seekling.checkpoint import load
from seekling.model.engram import table_parameters
from seekling.presets import tiny, with_engram
from seekling.train import state as run_state

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_worker.py"
STEPS = 5
ENGRAM_STEPS = 4


def micro_model():
    # 1 dense + 1 MoE layer and an MTP depth (also MoE): every sharded kind of module, in ~0.5M params
    return tiny().replace(dim=64, n_layers=2, inter_dim=128, n_heads=2, kv_lora_rank=32, qk_nope_head_dim=16,
                          qk_rope_head_dim=8, v_head_dim=16, moe_inter_dim=32, n_routed_experts=8,
                          n_activated_experts=2, max_seq_len=64)


def micro_engram_model():
    # Engram at both layers: two tables, which the gradient gathers concatenate. Heads of ~61 rows, so
    # the two ranks' halves of a batch share many rows and their gradients really add up.
    return with_engram(micro_model(), layers=(0, 1), n_heads=2, head_rows=61, embed_dim=16)


def launch(tmp: Path, name: str, cfg: dict, nproc: int, timeout: float = 240, **spec) -> subprocess.CompletedProcess:
    spec_path = tmp / f"{name}.json"
    spec_path.write_text(json.dumps({"cfg": cfg, **spec}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(spec_path)]
        env.pop("WORLD_SIZE", None)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", str(WORKER), str(spec_path)]
    # a session of its own, so that a hung job is killed whole (torchrun and its workers) on timeout
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{name} timed out after {timeout} s\n{out[-3000:]}\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in run_state.read_metrics(run_dir)}


class Runs:
    """The module's runs, each made on first use (a test of a subset makes only what it reads)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.data = tmp / "corpus.txt"
        # a deterministic text with some structure to learn, long enough for train and val windows
        self.data.write_text("\n".join(f"line {i}: the {['cat', 'dog', 'bird'][i % 3]} saw {i * 7 % 13} stars "
                                       f"and {i % 5} moons" for i in range(3000)))
        self._done: dict = {}

    def cfg(self, name: str, **kw) -> dict:
        base = dict(model=dataclasses.asdict(micro_model()), data=str(self.data),
                    token_cache_dir=str(self.tmp / "tokens"), out_dir=str(self.tmp / name), batch_size=4, seq_len=32,
                    max_steps=STEPS, warmup_steps=1, lr=3e-3, log_every=1, eval_every=0, eval_batches=2,
                    ckpt_every=0, dtype="float32", bias_update_gamma=1e-2, seed=0)
        return base | kw

    def _once(self, key, make):
        if key not in self._done:
            self._done[key] = make()
        return self._done[key]

    def ref(self) -> Path:  # also tokenizes into the shared cache, before any 2-process run
        return self._once("ref", lambda: ok(launch(self.tmp, "ref", self.cfg("ref"), 1)) and self.tmp / "ref")

    def dp2(self) -> Path:
        self.ref()
        return self._once("dp2", lambda: ok(launch(self.tmp, "dp2", self.cfg("dp2"), 2)) and self.tmp / "dp2")

    def ep2(self) -> dict[int, float]:
        """The ep-2 run's losses when it stopped at step 3 (its directory then goes on to step 5)."""
        self.ref()
        return self._once("ep2", lambda: ok(launch(self.tmp, "ep2", self.cfg("ep2"), 2, ep=2, stop_at=3))
                          and losses(self.tmp / "ep2"))

    def ep2_resumed_at_1(self) -> Path:
        self.ep2()
        return self._once("ep2-resume", lambda: ok(launch(self.tmp, "ep2-resume", self.cfg("ep2"), 1, resume=True))
                          and self.tmp / "ep2")

    def one_to_two(self) -> Path:
        """A single-process run stopped at step 3, resumed by 2 processes with ep 2 to step 5."""
        self.ref()

        def make():
            ok(launch(self.tmp, "one", self.cfg("one"), 1, stop_at=3))
            ok(launch(self.tmp, "one-resume", self.cfg("one"), 2, resume=True, ep=2))
            return self.tmp / "one"
        return self._once("one_to_two", make)

    def engram_cfg(self, name: str) -> dict:
        return self.cfg(name, model=dataclasses.asdict(micro_engram_model()), max_steps=ENGRAM_STEPS)

    def engram_ref(self) -> Path:  # tokenizes into the shared cache too, if ref() has not
        return self._once("engram-ref", lambda: ok(launch(self.tmp, "engram-ref", self.engram_cfg("engram-ref"), 1))
                          and self.tmp / "engram-ref")

    def engram_dp2(self) -> Path:
        self.engram_ref()
        return self._once("engram-dp2", lambda: ok(launch(self.tmp, "engram-dp2", self.engram_cfg("engram-dp2"), 2))
                          and self.tmp / "engram-dp2")

    def engram_ep2(self) -> dict[int, float]:
        """The Engram ep-2 run's losses when it stopped at step 2 (its directory then goes on to step 4)."""
        self.engram_ref()
        return self._once("engram-ep2", lambda: ok(launch(self.tmp, "engram-ep2", self.engram_cfg("engram-ep2"), 2,
                                                          ep=2, stop_at=2)) and losses(self.tmp / "engram-ep2"))

    def engram_ep2_resumed_at_1(self) -> Path:
        self.engram_ep2()
        return self._once("engram-ep2-resume", lambda: ok(launch(self.tmp, "engram-ep2-resume",
                                                                 self.engram_cfg("engram-ep2"), 1, resume=True))
                          and self.tmp / "engram-ep2")

    def engram_one_to_two(self) -> Path:
        """A single-process Engram run stopped at step 2, resumed by 2 processes with ep 2 to step 4."""
        self.engram_ref()

        def make():
            ok(launch(self.tmp, "engram-one", self.engram_cfg("engram-one"), 1, stop_at=2))
            ok(launch(self.tmp, "engram-one-resume", self.engram_cfg("engram-one"), 2, resume=True, ep=2))
            return self.tmp / "engram-one"
        return self._once("engram_one_to_two", make)

    def killed(self) -> dict:
        self.ref()

        def make():
            p = launch(self.tmp, "killed", self.cfg("killed", ckpt_every=2), 2, ep=2, kill_rank=1, kill_in_save_at=4)
            run = self.tmp / "killed"
            return {"proc": p, "ckpt": run_state.find_checkpoint(run),
                    "dirs": sorted(q.name for q in run.iterdir() if q.name.startswith("ckpt-"))}
        return self._once("killed", make)

    def revived(self) -> Path:
        self.killed()
        return self._once("revived", lambda: ok(launch(self.tmp, "revived", self.cfg("killed"), 2, resume=True, ep=2))
                          and self.tmp / "killed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("dist"))


def close(a: dict[int, float], b: dict[int, float], steps) -> None:
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-5), (s, a[s], b[s])


def test_two_processes_follow_the_one_process_curve(runs):
    ref, dp2 = losses(runs.ref()), losses(runs.dp2())
    assert sorted(ref) == sorted(dp2) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1] - 0.05  # the run learns: equal curves are not two flat lines
    close(ref, dp2, range(1, STEPS + 1))
    # AdamW forgives a gradient off by a constant factor in the loss; the logged global norm does not
    close(losses(runs.ref(), "grad_norm"), losses(runs.dp2(), "grad_norm"), range(1, STEPS + 1))


def test_expert_parallel_2_equals_expert_parallel_1(runs):
    ep2 = runs.ep2()
    assert sorted(ep2) == [1, 2, 3]
    close(losses(runs.ref()), ep2, [1, 2, 3])
    # expert gradients arrive summed over the ep group: a wrong divide factor shows in the norm
    close(losses(runs.ref(), "grad_norm"), losses(runs.tmp / "ep2", "grad_norm"), [1, 2, 3])
    row = run_state.read_metrics(runs.tmp / "ep2")[0]
    # global counts: each token of the 4x32 global batch routed to K=2 experts by the MoE layer, and
    # each of the 4x31 the MTP depth predicts from
    assert [sum(layer) for layer in row["expert_load"]] == [4 * 32 * 2, 4 * 31 * 2]


def test_two_process_checkpoint_resumes_at_one_process_on_the_same_curve(runs):
    run = runs.ep2_resumed_at_1()  # steps 1-3 at 2 processes with ep 2, 4-5 at 1 process
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    close(losses(runs.ref()), resumed, [4, 5])
    state = run_state.read_state(run / "ckpt-000005")
    assert state["step"] == STEPS and "world_size" not in state  # the last save was a plain one-process one


@pytest.mark.slow
def test_single_process_checkpoint_resumes_at_two_processes(runs):
    run = runs.one_to_two()  # full state dicts from the Hugging Face files and train_state, into shards
    assert not (run / "ckpt-000003").exists() and (run / "ckpt-000005" / "dcp").is_dir()
    close(losses(runs.ref()), losses(run), range(1, STEPS + 1))


def test_export_is_the_single_process_layout_and_loads(runs):
    # the 2-process run's model/ is the Hugging Face layout a single process writes and reads back
    ckpt = runs.dp2() / "ckpt-000005"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "model.safetensors").is_file()
    model, ref = load(runs.dp2() / "model"), load(runs.ref() / "model")
    assert set(model.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-3, atol=1e-4, msg=k)


def test_expert_biases_identical_across_ranks(runs):
    for run, steps in ((runs.dp2(), range(1, STEPS + 1)), (runs.tmp / "ep2", [1, 2, 3])):
        runs.ep2()
        for s in steps:
            r0 = json.loads((run / f"bias-r0-s{s}.json").read_text())
            r1 = json.loads((run / f"bias-r1-s{s}.json").read_text())
            assert r0 == r1, (run, s)
    last = json.loads((runs.dp2() / f"bias-r0-s{STEPS}.json").read_text())
    assert any(b != 0 for layer in last for b in layer)  # the update ran: equal zeros would prove nothing


@pytest.mark.slow
def test_rank_killed_mid_save_leaves_the_last_checkpoint_resumable(runs):
    killed = runs.killed()
    assert killed["proc"].returncode != 0  # the job died
    assert killed["ckpt"] is not None and killed["ckpt"].name == "ckpt-000002", killed["dirs"]
    assert "ckpt-000004" not in killed["dirs"]  # the half-written save never became a checkpoint
    revived = losses(runs.revived())
    assert sorted(revived) == list(range(1, STEPS + 1))
    close(losses(runs.ref()), revived, range(1, STEPS + 1))


def tables_equal_across_ranks(run: Path, steps) -> None:
    digests = [(run / f"tables-r0-s{s}.txt").read_text() for s in steps]
    assert digests == [(run / f"tables-r1-s{s}.txt").read_text() for s in steps], run
    assert len(set(digests)) == len(digests)  # the tables moved at every step: frozen equal tables prove nothing


def final_tables(run: Path) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in table_parameters(load(run / "model"))}


def test_engram_two_processes_follow_the_one_process_curve(runs):
    ref, dp2, ep2 = runs.engram_ref(), runs.engram_dp2(), runs.engram_ep2()
    steps = range(1, ENGRAM_STEPS + 1)
    assert losses(ref)[ENGRAM_STEPS] < losses(ref)[1] - 0.05
    close(losses(ref), losses(dp2), steps)
    close(losses(ref), ep2, [1, 2])
    # the tables' share of the global norm: summed instead of averaged over ranks, or counted once
    # per rank, it shows here (Adam would forgive it in the loss)
    close(losses(ref, "grad_norm"), losses(dp2, "grad_norm"), steps)
    close(losses(ref, "grad_norm"), losses(runs.tmp / "engram-ep2", "grad_norm"), [1, 2])
    tables_equal_across_ranks(dp2, steps)  # every rank applied the same row updates
    tables_equal_across_ranks(runs.tmp / "engram-ep2", [1, 2])
    # rank 0's export holds the tables, those of one process with the whole batch
    ours, theirs = final_tables(dp2), final_tables(ref)
    assert len(theirs) == 2 and set(ours) == set(theirs)
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=0, atol=1e-6, msg=name)


def test_engram_checkpoint_resumes_at_one_process_on_the_same_curve(runs):
    run = runs.engram_ep2_resumed_at_1()  # steps 1-2 at 2 processes with ep 2, 3-4 at 1 process
    ref = runs.engram_ref()
    close(losses(ref), losses(run), range(1, ENGRAM_STEPS + 1))
    # the tables' RowSparseAdam moments and step came through DCP: the resumed run ends with those of
    # the uninterrupted one (both final checkpoints are single-process ones, keyed by name)
    ours = load_file(str(run / f"ckpt-{ENGRAM_STEPS:06d}" / "train_state.safetensors"))
    theirs = load_file(str(ref / f"ckpt-{ENGRAM_STEPS:06d}" / "train_state.safetensors"))
    keys = sorted(k for k in theirs if ".engram.table.weight." in k)
    assert len(keys) == 6 and set(keys) <= set(ours)  # exp_avg, exp_avg_sq, step for each of two tables
    for k in keys:  # against the largest moment: elementwise, a near-cancelled moment is all rounding
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-3 * theirs[k].abs().max().item(), msg=k)
    assert theirs[keys[-1]].item() == ENGRAM_STEPS  # the step counters ran on through the resume
    resumed = final_tables(run)
    for name, t in final_tables(ref).items():
        torch.testing.assert_close(resumed[name], t, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_engram_single_process_checkpoint_resumes_at_two_processes(runs):
    run = runs.engram_one_to_two()  # the tables' state from train_state.safetensors, whole on every rank
    close(losses(runs.engram_ref()), losses(run), range(1, ENGRAM_STEPS + 1))
    tables_equal_across_ranks(run, [3, 4])
    resumed = final_tables(run)
    for name, t in final_tables(runs.engram_ref()).items():
        torch.testing.assert_close(resumed[name], t, rtol=0, atol=1e-6, msg=name)


def test_mhc_mixing_stays_fp32_under_bf16_sharding(tmp_path):
    """FSDP2's bf16 policy all-gathers parameters in bf16; mHC's fn/base/scale must arrive in fp32
    (the mixing is computed in fp32, as DeepSeek-V4), while the rest of the block arrives in bf16.
    One process in a 1-rank gloo group is enough to see the dtypes the forward receives."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from seekling.distributed.parallelize import Parallel, parallelize
    from seekling.model.mhc import HyperConnection, HyperHead
    from seekling.model.transformer import Transformer
    from seekling.presets import with_mhc

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("efsdp", "ep"))
        par = Parallel(rank=0, world_size=1, ep=1, local_rank=0, device=torch.device("cpu"), mesh=mesh,
                       dp_mesh=mesh["efsdp", "ep"]._flatten("dp"), owns_group=False)
        model = parallelize(Transformer(with_mhc(micro_model())), par, torch.bfloat16)
        seen = []
        for m in model.modules():
            if isinstance(m, (HyperConnection, HyperHead)):
                m.register_forward_pre_hook(lambda mod, args: seen.extend(p.dtype for p in mod.parameters()))
        attn = []
        model.layers[0].attn.register_forward_pre_hook(lambda mod, args: attn.extend(p.dtype for p in mod.parameters()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model.hidden(torch.randint(0, 100, (1, 8)))
        assert len(seen) > 0 and set(seen) == {torch.float32}
        assert set(attn) == {torch.bfloat16}  # the policy is on: everything else arrives in bf16
        # And the backward reaches every block's (sharded, fp32) mixing parameters.
        h.float().square().mean().backward()
        grads = [p.grad for name, m in model.named_modules() if isinstance(m, (HyperConnection, HyperHead))
                 and not name.startswith("mtp.") for p in m.parameters()]  # hidden() does not run the MTP block
        assert grads and all(g is not None and g.full_tensor().abs().sum() > 0 for g in grads)
    finally:
        dist.destroy_process_group()
