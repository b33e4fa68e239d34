"""The baseline GPT: shape and size, causality, the attention switch point, parameter routing, learning."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BASELINE_ENV, SEED_STACK_ENV, tiny_h
from helpers import CPU, randomized

import train_gpt
from train_gpt import GPT, Hyperparameters, Optimizers

def test_sizes_match_the_official_counts():
    baseline = GPT(Hyperparameters.from_env(BASELINE_ENV))
    assert sum(p.numel() for p in baseline.parameters()) == 17_059_912  # the official baseline's (docs/presets.md)
    assert baseline.skip_weights.shape == (4, 512) and baseline.lm_head is None
    record = GPT(Hyperparameters.from_env(SEED_STACK_ENV))
    assert sum(p.numel() for p in record.parameters()) == 27_067_484  # PR #1019's model_params
    assert sum(p.numel() for p in GPT(Hyperparameters()).parameters()) == 35_945_673  # the defaults: PR #2014's


@pytest.mark.parametrize("tie", [True, False])
def test_causality(tie):
    torch.manual_seed(0)
    model = randomized(GPT(tiny_h(num_layers=3, tie_embeddings=tie)))
    x = torch.randint(0, 1024, (2, 32))
    base = model.forward_logits(x)
    for t in (0, 7, 31):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randint(0, 1024, x2[:, t + 1 :].shape)
        x2[:, t] = x[:, t]
        out = model.forward_logits(x2)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1])  # positions <= t see only tokens <= t
        if t < 31:
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_gqa_attention_equals_repeated_kv_heads():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, 8, 32), torch.randn(2, 16, 2, 32), torch.randn(2, 16, 2, 32)
    y = train_gpt.attention(q, k, v, use_fa3=False)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(4, 2).transpose(1, 2),
                                         v.repeat_interleave(4, 2).transpose(1, 2), is_causal=True)
    torch.testing.assert_close(y, ref.transpose(1, 2))


def test_flash_attention_3_switch_point(monkeypatch):
    """A stand-in with FA3's calling convention ((B, T, H, D) bf16 tensors, causal=True, GQA by head count,
    returning (out, lse)) must give the model the same output as the SDPA path, up to bf16 rounding."""
    calls = []

    def fake_fa3(q, k, v, causal):
        assert causal and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.shape[:2] == k.shape[:2]
        calls.append(q.shape)
        group = q.size(2) // k.size(2)
        out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().repeat_interleave(group, 2).transpose(1, 2),
                                             v.float().repeat_interleave(group, 2).transpose(1, 2), is_causal=True)
        return out.transpose(1, 2).bfloat16(), None

    monkeypatch.setattr(train_gpt, "flash_attn_func", fake_fa3)
    torch.manual_seed(0)
    h = tiny_h(num_layers=2)
    sdpa = randomized(GPT(h, use_fa3=False))
    fa3 = GPT(h, use_fa3=True)
    fa3.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 1024, (2, 24))
    # bf16 inputs to the kernel: measured max error 0.067 (0.1% of logits above 0.05); the tolerance is 0.1, and a stand-in
    # that reads the wrong KV head (interleaved instead of grouped) misses it by far (the control below)
    reference = sdpa.forward_logits(x)
    torch.testing.assert_close(fa3.forward_logits(x), reference, atol=0.1, rtol=0)
    assert calls == [(2, 24, 4, 16)] * 2
    group = lambda t: t.repeat(1, 1, 2, 1)  # noqa: E731  head h reads KV head h % 2: the GQA bug
    monkeypatch.setattr(train_gpt, "flash_attn_func", lambda q, k, v, causal: fake_fa3(q, group(k), group(v), causal))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(fa3.forward_logits(x), reference, atol=0.1, rtol=0)


def _activation_dtypes(model: GPT, x, monkeypatch) -> set:
    """The dtypes of the first block's inputs (stream, x0, RoPE tables), of q, k, v at every attention call and
    what the kernel returns, of the attention output after XSA (proj's input) and of every block's output."""
    seen, attention = set(), train_gpt.attention

    def spy(q, k, v, use_fa3, segments=None):
        y = attention(q, k, v, use_fa3, segments)
        seen.update((q.dtype, k.dtype, v.dtype, y.dtype))
        return y

    monkeypatch.setattr(train_gpt, "attention", spy)
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(t.dtype for t in args[:4]))
    for block in model.blocks:
        block.attn.proj.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype))
        block.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
    logits = model.forward_logits(x)
    return seen | {("logits", logits.dtype)}


@pytest.mark.parametrize("autocast", [False, True])
def test_activations_are_carried_in_the_autocast_dtype(monkeypatch, autocast):
    """Under bf16 autocast (CUDA's fast path, here on CPU) the whole activation path is bf16: the stream at every
    block boundary, q and k after RoPE, the attention output and XSA's, also where CUDA autocast runs a norm in
    fp32 (emulated: F.rms_norm and F.normalize return fp32); the logits are fp32 and the same function as the
    fp32 path's up to bf16 rounding. Without autocast every activation stays fp32."""
    torch.manual_seed(0)
    h = tiny_h()
    assert h.xsa_layers and h.value_embed_layers and h.bigram_vocab_size and h.smear_gate == "static" and h.rope[0] < h.head_dim
    model = randomized(GPT(h))
    x = torch.randint(0, 1024, (2, 32))
    reference = model.forward_logits(x)
    if not autocast:
        assert _activation_dtypes(model, x, monkeypatch) == {torch.float32, ("logits", torch.float32)}
        return
    for name in ("rms_norm", "normalize"):
        fn = getattr(F, name)
        monkeypatch.setattr(F, name, lambda t, *a, fn=fn, **k: fn(t.float(), *a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _activation_dtypes(model, x, monkeypatch) == {torch.bfloat16, ("logits", torch.float32)}
        error = (model.forward_logits(x) - reference).abs()
    assert error.mean() < 0.025 * reference.std() and error.max() < 0.25 * reference.std()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("env", ["tiny", "baseline"])
def test_param_groups_cover_every_parameter_once(tie, env):
    h = tiny_h(tie_embeddings=tie) if env == "tiny" else Hyperparameters.from_env(
        {**BASELINE_ENV, "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
         "TIE_EMBEDDINGS": str(int(tie))})
    model = GPT(h)
    groups = train_gpt.param_groups(model)
    ids = [id(p) for members in groups.values() for _, p in members]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    names = {k: {n for n, _ in v} for k, v in groups.items()}
    assert names["matrix"] == {f"blocks.{i}.{m}.weight" for i in range(2)
                               for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")}
    assert names["head"] == (set() if tie else {"lm_head.weight"})
    extras = {"bigram.proj.weight", "bigram.scale", "smear.gate", "ve_shared.proj.weight", "ve_shared.scale",
              "ve_layer_scales"}
    controls = {"skip_weights"} | {f"blocks.{i}.{n}" for i in range(2)
                                   for n in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain")}
    if env == "tiny":  # the record's routing (PR #1019): tables with the embedding, the rest scalar AdamW
        assert names["embed"] == {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"}
        assert names["scalar"] == controls | extras
    else:
        assert names["embed"] == {"tok_emb.weight"} and names["scalar"] == controls


def test_per_token_loss_matches_mean_loss():
    torch.manual_seed(0)
    model = randomized(GPT(tiny_h()))
    x, y = torch.randint(0, 1024, (2, 16)), torch.randint(0, 1024, (2, 16))
    per_token = model(x, y, reduction="none")
    assert per_token.shape == (2, 16)
    torch.testing.assert_close(per_token.mean(), model(x, y))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    h = tiny_h(matrix_lr=0.05, scalar_lr=0.02, tied_embed_lr=0.05, muon_momentum_warmup_steps=0)
    model = GPT(h)
    opt = Optimizers(h, model, train_gpt.bank_block_matrices(model, CPU), CPU)
    x = torch.randint(0, 1024, (4, 64))
    y = torch.roll(x, -1, dims=1)
    first = model(x, y).item()
    for _ in range(150):
        loss = model(x, y)
        loss.backward()
        opt.step(1.0, h.muon_momentum)
        opt.zero_grad()
    assert first > 6.5 and loss.item() < 0.2


@pytest.mark.slow  # over 5 s on 2 CPU cores (torch.compile)
def test_compiled_model_has_no_graph_breaks_and_matches_eager():
    """The CUDA path compiles with fullgraph=True; inductor on CPU checks the same graph capture."""
    torch.manual_seed(0)
    model = randomized(GPT(tiny_h(num_layers=2)))
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    x, y = torch.randint(0, 1024, (2, 16)), torch.randint(0, 1024, (2, 16))
    torch.testing.assert_close(compiled(x, y), model(x, y), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled(x, y, reduction="none"), model(x, y, reduction="none"), rtol=1e-4, atol=1e-4)
