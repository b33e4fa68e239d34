"""The 8xH100 speed path exercised on CPU: the FlashAttention 3 call through a stand-in module of the same name
and signature, torch.compile without graph breaks or per-step recompiles (model, banked training step,
Newton-Schulz), and the model FLOP counts behind the step budget."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SEED_STACK_ENV, tiny_h
from torch._dynamo.testing import CompileCounter

import train_gpt
from train_gpt import GPT, Dist

CPU = Dist(0, 1, 0, torch.device("cpu"))

FA3_STANDIN = '''
import sys, types, torch, torch.nn.functional as F
calls = []
def flash_attn_func(q, k, v, causal=False, softmax_scale=None):
    """FA3's convention: (B, T, H, D) bf16 tensors, native GQA (k, v with fewer heads), causal flag."""
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and causal and softmax_scale is None
    calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), is_causal=True, enable_gqa=True)
    out = out.transpose(1, 2).bfloat16()
    return (out, None) if RETURNS_TUPLE else out
varlen_calls = []
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False):
    """FA3's varlen convention: (total, H, D) bf16 tensors, int32 boundaries (0, ..., total), causal in each segment."""
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and causal and softmax_scale is None and q.dim() == 3
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    varlen_calls.append((cu_seqlens_q.tolist(), max_seqlen_q, max_seqlen_k, tuple(q.shape), tuple(k.shape)))
    out, b = torch.zeros_like(q), cu_seqlens_q.tolist()
    for s, e in zip(b, b[1:]):
        assert e - s <= max_seqlen_q
        if e > s:
            seg = [t[s:e].float().transpose(0, 1)[None] for t in (q, k, v)]
            out[s:e] = F.scaled_dot_product_attention(*seg, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    return (out, None) if RETURNS_TUPLE else out
module = types.ModuleType("flash_attn_interface")
module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
sys.modules["flash_attn_interface"] = module
'''


# after FA3_STANDIN: an SDPA model and an FA3 model with the same weights
STANDIN_MODELS = f'''
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
import train_gpt
from conftest import tiny_h
assert train_gpt.flash_attn_func is flash_attn_func and train_gpt.flash_attn_varlen_func is flash_attn_varlen_func
torch.manual_seed(0)
h = tiny_h()
sdpa = train_gpt.GPT(h, use_fa3=False)
for p in sdpa.parameters():
    torch.nn.init.normal_(p, std=0.1)
fa3 = train_gpt.GPT(h, use_fa3=True)
fa3.load_state_dict(sdpa.state_dict())
'''


def _run_with_standin(returns_tuple: bool, checks: str):
    code = f"RETURNS_TUPLE = {returns_tuple}\n" + FA3_STANDIN + STANDIN_MODELS + checks + "print('ok')\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("returns_tuple", [False, True])
def test_flash_attention_3_standin_is_called_with_its_real_convention(returns_tuple):
    """Installed as the module train_gpt imports, the stand-in is picked up at import, receives (B, T, H, D)
    with the 2 KV heads undoubled, and the model output equals the SDPA path's up to bf16 rounding."""
    _run_with_standin(returns_tuple, '''
x = torch.randint(0, 1024, (2, 24))
reference, got = sdpa.forward_logits(x), fa3.forward_logits(x)
torch.testing.assert_close(got, reference, atol=0.1, rtol=0)  # bf16 kernel inputs; measured 0.067 in test_model
assert calls == [((2, 24, 4, 16), (2, 24, 2, 16), (2, 24, 2, 16))] * h.num_layers, calls
wrong = lambda t: t.repeat(1, 1, 2, 1)[:, :, :t.size(2)].flip(2)  # the control: each query head reads the other KV head
train_gpt.flash_attn_func = lambda q, k, v, causal=False, softmax_scale=None: flash_attn_func(q, wrong(k), wrong(v),
                                                                                             causal)
try:
    torch.testing.assert_close(fa3.forward_logits(x), reference, atol=0.1, rtol=0)
    raise SystemExit("the tolerance lets a stand-in that reads the wrong KV head through")
except AssertionError:
    pass
''')


@pytest.mark.parametrize("returns_tuple", [False, True])
def test_flash_attention_3_varlen_standin_gets_the_packed_rows_segments(returns_tuple):
    """A packed row (DOC_PACKING): FA3's varlen kernel receives the flattened (T, H, D) tensors and exactly the
    loader's cu_seqlens and cap, and the model output equals the SDPA path's block-diagonal mask."""
    _run_with_standin(returns_tuple, '''
x = torch.randint(2, 1024, (1, 70))
x[0, [9, 20, 21, 50]] = 1
cu = train_gpt.cu_seqlens(x[0].numpy(), 1, 16)
assert cu.tolist()[:7] == [0, 9, 20, 21, 37, 50, 66] and set(cu.tolist()[7:]) == {70}
segments = (torch.from_numpy(cu), 16)
out = fa3.forward_logits(x, segments)
torch.testing.assert_close(out, sdpa.forward_logits(x, segments), atol=0.15, rtol=0.05)
assert not torch.allclose(out, sdpa.forward_logits(x), atol=0.15, rtol=0.05)  # the tolerance tells the masks apart
assert varlen_calls == [(cu.tolist(), 16, 16, (70, 4, 16), (70, 2, 16))] * h.num_layers and not calls
''')


# every frontier model knob on (PR #1948, #1218, #1667/#1736/#1787, #1667/#1851, #1923), one attention gate each
FRONTIER = dict(mlp_leaky_slope=0.3, skip_gates=True, smear_gate="input", logit_softcap_asym=True,
                num_loops=2, loop_start=0, loop_end=0, parallel_start_layer=1)  # + PR #1493's loop, #1529's lanes


@pytest.mark.parametrize("config", [{}, {**FRONTIER, "attn_gate": "sparse", "attn_gate_scale": 0.5},
                                    {**FRONTIER, "attn_gate": "out"}, {**FRONTIER, "attn_gate": "dense"}],
                         ids=["defaults", "frontier-sparse", "frontier-out", "frontier-dense"])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_model_forward_has_no_graph_breaks(autocast, config):
    """Also under bf16 autocast (CUDA's path), where the model reads the autocast state to pick its dtype."""
    h = tiny_h(**config)
    model = GPT(h)
    x = torch.randint(0, 1024, (2, 32))
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            explanation = torch._dynamo.explain(model)(x, x.roll(-1, 1))
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.parametrize("looping", [False, True])
def test_every_frontier_feature_with_a_packed_row_has_no_graph_break(looping):
    """The frontier model knobs, the recurrence (plain and looped) and the parallel lanes on a packed row."""
    model = GPT(tiny_h(**FRONTIER, attn_gate="sparse", attn_gate_scale=0.5))
    model.looping = looping
    x = torch.randint(0, 1024, (1, 128))
    x[0, [0, 50, 51, 90]] = 1
    segments = (torch.from_numpy(train_gpt.cu_seqlens(x[0].numpy(), 1, 32)), 32)
    explanation = torch._dynamo.explain(model)(x, x.roll(-1, 1), segments=segments)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_qat_and_mode_switches_recompile_at_most_once():
    """Steps with fixed shapes compile once; switching late QAT on (a buffer) compiles nothing new; eval mode
    under inference_mode is one more graph, and going back to training reuses the first."""
    torch._dynamo.reset()
    counter = CompileCounter()
    h = tiny_h(late_qat_threshold=0.5)
    model = GPT(h)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    x = torch.randint(0, 1024, (2, 32))
    for _ in range(3):
        compiled(x, x.roll(-1, 1)).backward()
    assert counter.frame_count == 1
    train_gpt.set_qat(model, True)
    for _ in range(3):
        compiled(x, x.roll(-1, 1)).backward()
    assert counter.frame_count == 1
    model.eval()
    with torch.inference_mode():
        for _ in range(3):
            compiled(x, x.roll(-1, 1), reduction="none")
    assert counter.frame_count == 2
    model.train()
    compiled(x, x.roll(-1, 1)).backward()
    assert counter.frame_count == 2


@pytest.mark.slow  # over 5 s on 2 CPU cores (torch.compile)
def test_banked_training_step_compiled_matches_eager():
    """AOTAutograd (the compiled backward) accumulates into the bank gradients exactly as eager does."""
    runs = []
    for backend in (None, "aot_eager"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        h = tiny_h()
        model = GPT(h)
        opt = train_gpt.Optimizers(h, model, train_gpt.bank_block_matrices(model, CPU), CPU)
        fwd = torch.compile(model, backend=backend, fullgraph=True, dynamic=False) if backend else model
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            x = torch.randint(0, 1024, (4, 32), generator=g)
            for _ in range(2):  # two micro-batches accumulate
                (fwd(x, x.roll(-1, 1)) / 2).backward()
            opt.step(1.0, 0.95)
            opt.zero_grad()
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-5)


def test_newton_schulz_compiles_once_per_bank_shape_and_batches_exactly():
    torch._dynamo.reset()
    counter = CompileCounter()
    ns = torch.compile(train_gpt.zeropower_via_newtonschulz5, backend=counter, dynamic=False)
    g = torch.Generator().manual_seed(0)
    banks = [torch.randn(3, 32, 16, generator=g), torch.randn(2, 24, 24, generator=g)]
    for _ in range(3):
        for b in banks:
            out = ns(b, 5)
            per_matrix = torch.stack([train_gpt.zeropower_via_newtonschulz5(m, 5) for m in b])
            torch.testing.assert_close(out, per_matrix, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == len(banks)


def test_default_model_flops():
    mm, att = train_gpt.forward_flops_per_token(train_gpt.Hyperparameters.from_env(SEED_STACK_ENV), 2048)
    assert (mm, att) == (2 * 26_566_656, 11 * 4 * 512 * 2049 / 2)  # the record's model, 2048-token sequences


@pytest.mark.parametrize("gate, width", [("out", 12), ("sparse", 12), ("dense", 512)])
def test_attention_gates_count_their_weights_in_the_flops(gate, width):
    import dataclasses

    h = dataclasses.replace(train_gpt.Hyperparameters.from_env(SEED_STACK_ENV), attn_gate=gate, quant_gate_bits=8)
    mm, _ = train_gpt.forward_flops_per_token(h, 2048)
    assert mm == 2 * 26_566_656 + 2 * 11 * 8 * width  # heads x window (dense: x model_dim) per layer
