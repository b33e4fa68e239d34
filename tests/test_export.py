"""The int8 + zlib artifact: quantization error, the storage policy, and an exact, pickle-free round trip."""

import pickle
import zlib

import pytest
import torch
from conftest import tiny_h
from test_model import randomized

import train_gpt
from train_gpt import GPT


def _h():
    return tiny_h(model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=5.0)  # MLP matrices > 65,536 elements


def _trained_like_state(seed=0):
    model = randomized(GPT(_h()), seed)
    keep = {n for n, _ in train_gpt.param_groups(model)["scalar"]}
    return model, model.state_dict(), keep


def test_int8_per_row_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 300) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    w[3, 7] = 50.0  # an outlier beyond the row's clip percentile
    q, scale = train_gpt.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (64,)
    assert q.abs().max() <= 127 and (scale.float() >= 1 / 127 - 1e-6).all()  # the baseline's scale floor
    deq = q.float() * scale.float()[:, None]
    clip = train_gpt.abs_quantile(w, train_gpt.INT8_CLIP_QUANTILE)[:, None]
    inside = w.abs() <= clip
    assert ((deq - w).abs()[inside] <= scale.float()[:, None].expand_as(w)[inside] / 2 + 1e-6).all()
    assert deq[3, 7] <= clip[3, 0] + scale[3].float()  # the outlier is clipped, not stretched over the row


def test_storage_policy():
    model, sd, keep = _trained_like_state()
    tensors, meta = train_gpt.quantize_state_dict_int8(sd, keep)
    schemes = {n: i["scheme"] for n, i in meta["tensors"].items()}
    assert schemes["tok_emb.weight"] == "int8_per_row" and schemes["blocks.0.mlp.fc.weight"] == "int8_per_row"
    assert schemes["blocks.0.attn.c_q.weight"] == "passthrough"  # 128 x 128 <= 65,536 elements
    assert tensors["blocks.0.attn.c_q.weight"].dtype == torch.float16  # small, not a control tensor
    for name in keep:  # control tensors stay fp32, bit for bit
        assert tensors[name].dtype == torch.float32 and torch.equal(tensors[name], sd[name])
    assert tensors["tok_emb.weight.q"].dtype == torch.int8


def test_round_trip_through_the_file_format_is_bit_exact(tmp_path):
    model, sd, keep = _trained_like_state()
    blob, stats = train_gpt.serialize(sd, keep)
    expected = train_gpt.dequantize_state_dict_int8(*train_gpt.quantize_state_dict_int8(sd, keep))
    path = tmp_path / "model.ptz"
    train_gpt.write_atomic(str(path), blob)
    loaded = train_gpt.deserialize(path.read_bytes())
    assert loaded.keys() == sd.keys()
    for name, t in loaded.items():
        assert t.dtype == sd[name].dtype and t.shape == sd[name].shape
        assert torch.equal(t, expected[name])
    fresh = GPT(_h())
    fresh.load_state_dict(loaded, strict=True)
    assert train_gpt.serialize(sd, keep)[0] == blob  # deterministic bytes
    assert stats["payload_bytes"] < stats["state_bytes"] and len(blob) < stats["container_bytes"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_loading_never_unpickles(monkeypatch):
    _, sd, keep = _trained_like_state()
    blob, _ = train_gpt.serialize(sd, keep)

    def refuse(*a, **k):
        raise AssertionError("artifact loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert train_gpt.deserialize(blob).keys() == sd.keys()


def test_container_rejects_damage():
    t = {"a": torch.arange(6, dtype=torch.int16).view(2, 3), "b": torch.ones(0), "c": torch.tensor([True, False])}
    raw = train_gpt.pack_tensors(t, {"k": 1})
    out, meta = train_gpt.unpack_tensors(raw)
    assert meta == {"k": 1} and all(torch.equal(out[k], t[k]) for k in t)
    with pytest.raises(ValueError, match="bad magic"):
        train_gpt.unpack_tensors(b"PICKLE" + raw)
    with pytest.raises(ValueError, match="truncated"):
        train_gpt.unpack_tensors(raw[:-1])
    with pytest.raises(ValueError, match="trailing"):
        train_gpt.unpack_tensors(raw + b"\0")
    with pytest.raises(ValueError, match="unknown artifact format"):
        train_gpt.dequantize_state_dict_int8(*train_gpt.unpack_tensors(raw))
    assert zlib.decompress(zlib.compress(raw, 9)) == raw
