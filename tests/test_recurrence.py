"""Depth recurrence (PR #1493) and two-lane parallel residuals (PR #1529), each by its defining property:
the virtual layer order, shared weights whose gradient is the sum over the visits, one switch at the configured
training fraction on every rank at the same step, and the lanes' arithmetic on a hand-made example."""

import copy

import pytest
import torch
from conftest import FRONTIER_ENV, SEED_STACK_ENV, SP1024, run_distributed, tiny_h
from helpers import assert_matches_reference, default_ids, randomized, tiny_default_h
from torch._dynamo.testing import CompileCounter

import train_gpt
from train_gpt import GPT, Dist

LOOPED = dict(num_layers=4, num_loops=2, loop_start=1, loop_end=2, ve_layers="")


def test_virtual_layer_order_and_unet_split_are_the_records():
    """11 layers with 3..5 looped twice more: 17 virtual layers, 8 encoder entries and 8 skip weights; the plain
    pass is 0..10 and uses the first 5 skips (PR #1493)."""
    h = train_gpt.Hyperparameters(num_loops=2, loop_start=3, loop_end=5)
    assert h.layer_order() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert h.layer_order(looped=False) == list(range(11))
    assert train_gpt.Hyperparameters.from_env(SEED_STACK_ENV).layer_order() == list(range(11))  # NUM_LOOPS=0: no repeats
    model = GPT(tiny_h(**LOOPED))
    assert model.orders[True] == [0, 1, 2, 1, 2, 1, 2, 3] and model.skip_weights.shape[0] == 4
    assert model.looping  # a fresh model (evaluation, TTT) always loops


def test_looping_reuses_the_weights_and_adds_no_parameters():
    plain, looped = GPT(tiny_h(num_layers=4, ve_layers="")), GPT(tiny_h(**LOOPED))
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in looped.named_parameters()]
    calls = []
    for i, block in enumerate(looped.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: calls.append(i))
    looped.forward_logits(torch.randint(0, 1024, (1, 16)))
    assert calls == [0, 1, 2, 1, 2, 1, 2, 3]


def test_recurrence_gradient_is_the_sum_over_the_visits():
    """Unrolled into one independent copy of the block per visit, the same forward gives the same loss, and the
    looped model's gradient of each shared weight is the sum of its copies' gradients."""
    torch.manual_seed(0)
    model = randomized(GPT(tiny_h(**LOOPED)))
    order = model.orders[True]
    unrolled = copy.deepcopy(model)
    unrolled.blocks = torch.nn.ModuleList(copy.deepcopy(model.blocks[i]) for i in order)
    unrolled.orders = {True: list(range(len(order)))}
    x = torch.randint(0, 1024, (2, 24))
    loss, ref = model(x, x.roll(-1, 1)), unrolled(x, x.roll(-1, 1))
    assert torch.allclose(loss, ref, rtol=0, atol=1e-6)
    loss.backward()
    ref.backward()
    for i, block in enumerate(model.blocks):
        for name, p in block.named_parameters():
            visits = [unrolled.blocks[j].get_parameter(name).grad for j, k in enumerate(order) if k == i]
            assert torch.allclose(p.grad, sum(visits), rtol=1e-4, atol=1e-6), (i, name, len(visits))


def test_loops_off_is_the_plain_layer_order_and_on_changes_it():
    """On the default preset (layers 1..2 run three times), NUM_LOOPS=0 alone runs each layer once: the reference
    forward of the plain order, with two skip weights instead of four; the loop changes the logits, and the plain
    pass of a looped model (training before ENABLE_LOOPING_AT) is the unlooped model with the first two skips.
    Control: a layer run twice with the loop off is caught."""
    x = default_ids()
    h = tiny_default_h(num_loops=0)
    off = randomized(GPT(h))
    assert off.orders[off.looping] == [0, 1, 2, 3] and off.skip_weights.shape[0] == 2
    assert_matches_reference(off, h, x)
    looped = GPT(tiny_default_h())
    state = off.state_dict()
    looped.load_state_dict({**state, "skip_weights": torch.cat((state["skip_weights"], torch.ones(2, 64))),
                            "skip_gates": torch.cat((state["skip_gates"], torch.zeros(2, 64)))})
    assert looped.orders[True] == [0, 1, 2, 1, 2, 1, 2, 3]
    assert not torch.allclose(looped.forward_logits(x), off.forward_logits(x), atol=1e-2)
    looped.looping = False
    torch.testing.assert_close(looped.forward_logits(x), off.forward_logits(x), rtol=0, atol=0)
    off.orders = {False: [0, 1, 1, 2, 3], True: [0, 1, 1, 2, 3]}  # the control
    with pytest.raises(AssertionError):
        assert_matches_reference(off, h, x)


@pytest.mark.parametrize("env, message", [
    ({"NUM_LOOPS": "1", "LOOP_START": "3", "LOOP_END": "2"}, "LOOP_END=2: must be in \\[LOOP_START=3"),
    ({"NUM_LOOPS": "1", "LOOP_END": "11"}, "LOOP_END=11: must be in"),
    ({"LOOP_START": "1"}, "LOOP_START=1: has no effect unless NUM_LOOPS>0"),
    ({"ENABLE_LOOPING_AT": "0.5"}, "ENABLE_LOOPING_AT=0.5: has no effect unless NUM_LOOPS>0"),
    ({"PARALLEL_START_LAYER": "11"}, "PARALLEL_START_LAYER=11: must be 0 \\(off\\) or below NUM_LAYERS=11"),
    ({"NUM_LOOPS": "2", "PARALLEL_START_LAYER": "5"}, "PARALLEL_START_LAYER=5: .*past the loop's last layer 5"),
])
def test_recurrence_and_parallel_knobs_are_validated(env, message):
    with pytest.raises(train_gpt.ConfigError, match=message):  # on the seed stack: no loop, no lanes
        train_gpt.Hyperparameters.from_env({**SEED_STACK_ENV, **env})


class _Stub(torch.nn.Module):
    """A sub-layer that records its input and returns a fixed function of it."""

    def __init__(self, f):
        super().__init__()
        self.f, self.seen = f, []

    def forward(self, x, *args):
        self.seen.append(x)
        return self.f(x)


def test_parallel_block_computes_the_two_lane_update_on_a_hand_made_example():
    """Attention reads rms_norm(m0 * lane0 + m1 * x0) * ln_scale, the MLP rms_norm(lane1) * ln_scale (no x0, not
    attention's output); lane k <- resid[k] * lane k + post[0, k] * a + post[1, k] * f (PR #1529)."""
    torch.manual_seed(0)
    block = train_gpt.Block(tiny_h(), layer=1, use_fa3=False)
    block.attn, block.mlp = _Stub(lambda x: 2 * x), _Stub(lambda x: x + 1)
    with torch.no_grad():
        block.resid_mix.copy_(torch.randn_like(block.resid_mix))
        block.attn_scale.fill_(0.5)
        block.mlp_scale.fill_(3.0)
    lane0, lane1, x0 = (torch.randn(1, 4, 64) for _ in range(3))
    post, resid = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.1, 0.9])
    out0, out1 = block.parallel((lane0, lane1), x0, post, resid, None, None)
    ln = 2 ** -0.5
    a_in = torch.nn.functional.rms_norm(block.resid_mix[0] * lane0 + block.resid_mix[1] * x0, (64,)) * ln
    f_in = torch.nn.functional.rms_norm(lane1, (64,)) * ln
    assert torch.allclose(block.attn.seen[0], a_in) and torch.allclose(block.mlp.seen[0], f_in)
    a, f = 0.5 * 2 * a_in, 3.0 * (f_in + 1)
    assert torch.allclose(out0, 1.1 * lane0 + 1.0 * a + 3.0 * f)
    assert torch.allclose(out1, 0.9 * lane1 + 2.0 * a + 4.0 * f)


def test_parallel_lanes_split_at_the_start_layer_take_the_skip_in_lane_zero_and_end_in_their_mean():
    """4 layers, parallel from 3: entry 2 is sequential, entry 3 splits the lanes (lane1 = x before the skip,
    which goes into lane 0 only), and the final norm reads (lane0 + lane1) / 2."""
    torch.manual_seed(0)
    model = randomized(GPT(tiny_h(num_layers=4, parallel_start_layer=3, ve_layers="")))
    assert model.parallel_post_lambdas.shape == (4, 2, 2) and model.parallel_resid_lambdas.shape == (4, 2)
    assert "parallel_post_lambdas" in {n for n, _ in train_gpt.param_groups(model)["scalar"]}
    seen = {}
    model.blocks[3].parallel = lambda lanes, x0, post, resid, *a: seen.update(lanes=lanes) or (lanes[0] * 2, lanes[1])
    model.blocks[2].register_forward_hook(lambda m, args, out: seen.update(x2=out))
    model.add_skip = lambda x, skip, j: seen.setdefault("skips", []).append(j) or x + 100
    x = torch.randint(0, 1024, (1, 16))
    logits = model.forward_logits(x)
    lane0, lane1 = seen["lanes"]
    assert torch.equal(lane1, seen["x2"]) and torch.equal(lane0, seen["x2"] + 100) and seen["skips"] == [0, 1]
    hidden = torch.nn.functional.rms_norm(0.5 * (2 * lane0 + lane1), (64,))
    assert torch.allclose(logits, 30 * torch.tanh(hidden @ model.tok_emb.weight.T / 30))


def test_parallel_off_is_one_lane_and_on_changes_it():
    """On the default preset (lanes from layer 3), PARALLEL_START_LAYER=0 alone gives one residual stream and no lane
    parameters: the reference forward without lanes; the lanes change the logits. Control: lanes left on with the
    switch off are caught."""
    x = default_ids()
    h = tiny_default_h(parallel_start_layer=0)
    off = randomized(GPT(h))
    assert not hasattr(off, "parallel_post_lambdas") and off.parallel_start == 0
    assert_matches_reference(off, h, x)
    par = GPT(tiny_default_h())
    par.load_state_dict(off.state_dict(), strict=False)
    assert not torch.allclose(par.forward_logits(x), off.forward_logits(x), atol=1e-2)
    off.parallel_start = 3  # the control
    off.parallel_post_lambdas = torch.nn.Parameter(torch.ones(4, 2, 2))
    off.parallel_resid_lambdas = torch.nn.Parameter(torch.full((4, 2), 1.1))
    with pytest.raises(AssertionError):
        assert_matches_reference(off, h, x)


@pytest.mark.slow  # over 5 s on 2 CPU cores (torch.compile)
def test_the_loop_switch_compiles_one_more_graph_and_never_recompiles_per_step():
    torch._dynamo.reset()
    counter = CompileCounter()
    model = GPT(tiny_h(**LOOPED, parallel_start_layer=3))
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    x = torch.randint(0, 1024, (2, 32))
    for looping, graphs in ((False, 1), (True, 2), (False, 2), (True, 2)):
        model.looping = looping
        for _ in range(2):
            compiled(x, x.roll(-1, 1)).backward()
        assert counter.frame_count == graphs


def _switch_rank(rank, world_size, shards):
    d = Dist(rank, world_size, rank, torch.device("cpu"))
    h = tiny_h(data_path=str(shards), tokenizer_path=str(SP1024), iterations=8, warmup_steps=1,
               enable_looping_at=0.5, **LOOPED)
    sp, train_files, val_files = train_gpt.check_inputs(h)
    torch.manual_seed(h.seed)
    model, lines = GPT(h), []
    result = train_gpt.train(h, d, model, train_gpt.TrainingData(train_files, h.vocab_size),
                             train_gpt.load_validation(h, sp, val_files, d.device), lines.append)
    return [line for line in lines if "layer_loop" in line or "warmup_step" in line], result.final.val_loss


@pytest.mark.slow  # over 5 s on 2 CPU cores (three training runs)
def test_the_loop_switches_on_at_the_configured_fraction_on_every_rank(short_val_shards):
    """By steps (no wall-clock cap): fraction 0.5 of 8 steps is step 4, on both ranks; the warm-up compiles both
    graphs; and 2 ranks train exactly as 1 (run in this process, as the other one-rank references are)."""
    one = _switch_rank(0, 1, short_val_shards)
    two = run_distributed(_switch_rank, 2, short_val_shards)
    for lines, _ in [one, *two]:
        assert lines[0] == "warmup_step:1/1" and lines[1] == "warmup_step:1/1 looped"
        assert lines[2].startswith("layer_loop:enabled step:4 frac:0.500 order:0,1,2,1,2,1,2,3")
    assert two[0][1] == two[1][1] and abs(one[1] - two[0][1]) < 1e-5


def test_the_frontier_preset_has_the_records_parameter_count():
    """PR #2014 logs model_params:35945673: PR #1855's 35,945,671 plus the two logit caps."""
    h = train_gpt.Hyperparameters.from_env(FRONTIER_ENV)
    assert sum(p.numel() for p in GPT(h).parameters()) == 35_945_673
    h = train_gpt.Hyperparameters.from_env({**FRONTIER_ENV, "LOGIT_SOFTCAP_ASYM": "0"})
    assert sum(p.numel() for p in GPT(h).parameters()) == 35_945_671
    assert len(h.layer_order()) == 17 and h.rope == (16, 10000.0)  # no NTK scaling of the base, as the records
