"""The token-only n-gram hints of the records' online expert (train_gpt.ngram_hints): equal to a per-token
dictionary implementation of the read-before-write definition, causal, and in range."""

import numpy as np
import pytest
import sentencepiece as spm
from conftest import SP8192

import train_gpt

PRIMES = (36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521, 1048583,
          1179653, 1310729, 1441801)  # the records' constants, written out again here


def kappa(context) -> int:
    key = 0
    for j, t in enumerate(context):  # j = 0 the oldest token
        key ^= int(t) * PRIMES[j] % 2**64
    return key


def reference(tokens, order, threshold):
    """One token at a time: read the context's state (hint if top/total >= threshold in float32), then count."""
    k = order - 1
    total, pairs, top = {}, {}, {}
    hints = np.full(len(tokens) - 1, -1)
    for i in range(k - 1, len(tokens) - 1):
        key, y = kappa(tokens[i + 1 - k:i + 1]), int(tokens[i + 1])
        if key in total and np.float32(top[key][1]) / np.float32(total[key]) >= np.float32(threshold):
            hints[i] = top[key][0]
        pairs[key, y] = pairs.get((key, y), 0) + 1
        total[key] = total.get(key, 0) + 1
        if pairs[key, y] > top.get(key, (-1, 0))[1]:
            top[key] = (y, pairs[key, y])
    return hints


def random_stream(seed, n, vocab):
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


def repeated_stream(seed, block=300, vocab=8192):
    """A random block, filler, the block again, filler, the block a third time."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, vocab, block)
    return np.concatenate([b, rng.integers(0, vocab, 200), b, rng.integers(0, vocab, 50), b]).astype(np.uint16)


@pytest.fixture(scope="module")
def real_tokens(sample_texts):
    """About 3,000 tokens of FineWeb (8192-piece tokenizer, [BOS] + tokens per document) with a passage repeated."""
    sp = spm.SentencePieceProcessor(model_file=str(SP8192))
    docs = [[sp.bos_id()] + sp.encode(t) for t in sample_texts[:6]]
    ids = np.concatenate(docs)[:2500]
    return np.concatenate([ids, ids[300:900]]).astype(np.uint16)


@pytest.mark.parametrize("vocab", [5, 20])
@pytest.mark.parametrize("order", [3, 4])
@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_equals_the_per_token_definition_on_repetitive_random_tokens(vocab, order, threshold):
    tokens = random_stream(vocab * order, 3000, vocab)
    hints = train_gpt.ngram_hints(tokens, order, threshold)
    assert np.array_equal(hints, reference(tokens, order, threshold))
    assert min((hints >= 0).sum(), (hints == -1).sum()) > 20  # the gate both opens and stays shut


def test_equals_the_definition_on_long_repeats_at_order_16():
    tokens = repeated_stream(0)
    hints = train_gpt.ngram_hints(tokens, 16, 0.8)
    assert np.array_equal(hints, reference(tokens, 16, 0.8))
    # the second and third copies are predicted exactly once their first 15 tokens are in the context
    for start in (500, 850):
        assert np.array_equal(hints[start + 14:start + 299], tokens[start + 15:start + 300])


@pytest.mark.parametrize("order,threshold", [(2, 0.5), (4, 0.8), (16, 0.8)])
def test_equals_the_definition_on_real_tokens(real_tokens, order, threshold):
    hints = train_gpt.ngram_hints(real_tokens, order, threshold)
    assert np.array_equal(hints, reference(real_tokens, order, threshold))
    assert (hints[2500:] >= 0).mean() > (0.9 if order == 16 else 0.3)  # the repeated passage


def test_contexts_with_equal_hashes_share_counts():
    a, b = (620, 828), (2641, 3527)
    assert a != b and kappa(a) == kappa(b)  # a collision of the order-3 hash
    tokens = np.array([1, *a, 7, 2, *b, 9], dtype=np.uint16)
    hints = train_gpt.ngram_hints(tokens, 3, 0.8)
    assert hints[6] == 7  # after b: the token seen after a
    assert np.array_equal(hints, reference(tokens, 3, 0.8))


def test_a_tie_keeps_the_token_that_reached_the_count_first():
    tokens = np.array([3, 1, 3, 2, 3, 2, 3, 1, 3, 1, 3, 0], dtype=np.uint16)  # after 3: 1, 2, 2, 1, 1, 0
    hints = train_gpt.ngram_hints(tokens, 2, 0.0)
    assert hints[0::2].tolist() == [-1, 1, 1, 2, 2, 1]  # 1,2 -> 1 (tie); 1,2,2 -> 2; 1,2,2,1 -> 2 (tie); 1,2,2,1,1 -> 1
    assert np.array_equal(hints, reference(tokens, 2, 0.0))


def test_the_first_context_is_the_streams_own_first_tokens():
    """The first eligible target's context is tokens 0..14, BOS included, so a document that starts the stream
    and recurs later is hinted from its 15th token on. The records seed their ring with the second token twice
    (context 1,1,2..14), which never recurs here; on the fixture corpus (5.1M targets) the two rules gave
    identical hints (issue 28)."""
    rng = np.random.default_rng(5)
    doc = np.concatenate([[1], rng.integers(2, 8192, 40)])
    tokens = np.concatenate([doc, rng.integers(2, 8192, 100), doc]).astype(np.uint16)
    hints, again = train_gpt.ngram_hints(tokens, 16, 0.8), len(tokens) - len(doc)
    assert hints[again + 14] == tokens[again + 15]
    assert np.array_equal(hints, reference(tokens, 16, 0.8))


@pytest.mark.parametrize("order", [3, 16])
def test_causal_a_hint_never_reads_its_target_or_later_tokens(order):
    tokens = np.concatenate([random_stream(1, 1000, 6), repeated_stream(2, block=100, vocab=30)])
    hints = train_gpt.ngram_hints(tokens, order, 0.5)
    rng = np.random.default_rng(3)
    for t in (0, 1, order - 2, order - 1, 200, 999, 1200, len(tokens) - 2):
        changed = tokens.copy()
        changed[t + 1:] = rng.integers(0, 30, len(tokens) - t - 1)
        assert np.array_equal(train_gpt.ngram_hints(changed, order, 0.5)[:t + 1], hints[:t + 1]), t


@pytest.mark.parametrize("order", [2, 5, 16])
def test_hints_are_tokens_or_minus_one_and_none_before_a_full_context(order):
    tokens = repeated_stream(order, block=80, vocab=50)
    hints = train_gpt.ngram_hints(tokens, order, 0.3)
    assert hints.shape == (len(tokens) - 1,) and hints.dtype == np.int32
    assert (hints >= -1).all() and (hints < 50).all()
    assert (hints[:order - 2] == -1).all() and (hints >= 0).any()
    assert (train_gpt.ngram_hints(tokens[:order - 1], order, 0.3) == -1).all()  # too short for any context


@pytest.mark.parametrize("order", [1, 17])
def test_order_outside_the_hash_is_refused(order):
    with pytest.raises(ValueError, match="TOKEN_ORDER"):
        train_gpt.ngram_hints(np.zeros(10, dtype=np.uint16), order, 0.8)


@pytest.mark.parametrize("world", [2, 3, 8])
def test_ranks_share_the_hints_by_hash_and_a_max_merges_them_exactly(real_tokens, world):
    """part=(r, w) builds only the targets whose context hash is r mod w: the shares are disjoint, each non-empty
    on real text, and their elementwise max is the whole (score_artifact all-reduces them with MAX)."""
    whole = train_gpt.ngram_hints(real_tokens, 4, 0.5)
    shares = [train_gpt.ngram_hints(real_tokens, 4, 0.5, (r, world)) for r in range(world)]
    assert np.array_equal(np.maximum.reduce(shares), whole) and (whole >= 0).sum() > 50
    assert ((np.stack(shares) >= 0).sum(0) <= 1).all() and all((s >= 0).any() for s in shares[:2])
