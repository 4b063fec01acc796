"""cross_vocab: a draft model with another tokenizer is lossless (greedy output equals plain
decoding; sampled output has the target's joint distribution), its static vocabulary maps are
byte-exact, and a draft that predicts the target well is accepted through them.

The tokenizers are built here with the ``tokenizers`` library: a byte-level BPE trained on a
small text (the target), a pure byte vocabulary in another id order with a BOS (a draft), a
character vocabulary with SentencePiece-style spaces (a draft), the target's vocabulary in a
permuted id order plus merged tokens (a draft that is the target re-expressed), and two tiny
hand-written BPEs for the sequence-level distribution test.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from drafters import registry
from drafters.cross_vocab import make_drafter
from drafters.cross_vocab_maps import build_maps
from models.llama import LlamaConfig, LlamaModel
from models.registry import LoadedModel, tiny_params
from models.tokenizer import TextTokenizer
from sequence_kit import chi_square_pvalue, exact_joint, sample_sequences, seq_model
from specjax.decode import DecodeConfig, generate
from specjax.engine import Engine
from specjax.sampling import SamplingConfig
from specjax.speculative import speculative_generate
from tinymodels import rows_of

TEXT = ("the cat sat on the mat. the dog sat on the log. a cat and a dog met at the mat; then "
        "the theatre thought through three thick themes. café, naïve, jalapeño: 日本語 and "
        "ünïcödé text 🙂. ") * 4
PROMPT_TEXTS = ["the cat", "café, naïve 日本語 and the dog sat on the", "a", "then the theatre"]
NEW_TOKENS = 16


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def bpe_tokenizer() -> TextTokenizer:
    """The target's: a byte-level BPE trained on TEXT (320 ids, ``<eos>`` = 0)."""
    tok = _byte_level(Tokenizer(models.BPE()))
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return TextTokenizer(tok, eos_ids=[tok.token_to_id("<eos>")])


def byte_tokenizer() -> TextTokenizer:
    """A draft's: the 256 bytes in reverse alphabet order, after ``<s>`` (BOS) and ``</s>``."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=True)
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens(["<s>", "</s>"])
    return TextTokenizer(tok, bos_id=0, eos_ids=[1])


def char_tokenizer() -> TextTokenizer:
    """A draft's: TEXT's characters and SentencePiece's ``▁`` for spaces (a decoder that
    drops the first leading space), ``<unk>`` for anything else."""
    chars = sorted(set(TEXT) - {" "})
    vocab = {"<unk>": 0, "</s>": 1, "▁": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(["</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return TextTokenizer(tok, eos_ids=[1])


def permuted_tokenizer(target: TextTokenizer, extra: int = 24, seed: int = 0):
    """The target's vocabulary with its ids permuted, plus ``extra`` merged tokens (ids past
    the target's). Returns ``(tokenizer, perm, [(extra id, first piece's target id)])``."""
    spec = json.loads(target.backend.to_str())["model"]
    vocab, merges = spec["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                    for m in spec["merges"]]
    size = len(vocab)
    perm = np.random.default_rng(seed).permutation(size)
    new_vocab = {s: int(perm[i]) for s, i in vocab.items()}
    pieces = sorted(s for s in vocab if s != "<eos>" and len(s) > 1)
    added = []
    for x, y in zip(pieces, pieces[7:]):
        if len(added) == extra:
            break
        if not y.startswith("Ġ") and x + y not in new_vocab:
            new_vocab[x + y] = size + len(added)
            merges.append((x, y))
            added.append((size + len(added), vocab[x]))
    tok = _byte_level(Tokenizer(models.BPE(vocab=new_vocab, merges=merges)))
    tok.add_special_tokens(["<eos>"])
    return TextTokenizer(tok, eos_ids=[new_vocab["<eos>"]]), perm, added


def tiny(vocab: int, seed: int, layers: int = 2):
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_layers=layers, num_heads=4, num_kv_heads=2,
                         max_position_embeddings=512)
    return LlamaModel(config), jax.tree.map(jnp.asarray, tiny_params(config, seed))


@pytest.fixture(scope="module")
def target():
    tok = bpe_tokenizer()
    model, params = tiny(tok.vocab_size, seed=0)
    prompts = [tok.encode(t, add_special_tokens=False) for t in PROMPT_TEXTS]
    config = DecodeConfig(max_new_tokens=NEW_TOKENS, eos_ids=tok.eos_ids)
    return tok, model, params, prompts, config, rows_of(generate(model, params, prompts, config))


def _bytes(tok: TextTokenizer, ids) -> bytes:
    return tok.decode(ids, skip_special_tokens=False).encode("utf-8")


# (1) greedy output is plain decoding's --------------------------------------------------------


@pytest.mark.parametrize("draft", ["bytes", "chars"])
def test_greedy_equals_plain_decoding(target, draft):
    tok, model, params, prompts, config, rows = target
    assert len({len(p) for p in prompts}) == len(prompts)  # ragged batch
    draft_tok = byte_tokenizer() if draft == "bytes" else char_tokenizer()
    small, small_params = tiny(draft_tok.vocab_size, seed=1, layers=1)
    maps = build_maps(tok, draft_tok, model.vocab_size, small.vocab_size)
    drafter, dparams = make_drafter(small, small_params, maps, draft_len=3, draft_steps=4)
    gen = Engine(model, config, drafter).generate(params, dparams, prompts)
    assert gen.tokens == rows
    assert gen.stats.drafted > 0


# (2) the maps are byte-exact ------------------------------------------------------------------


def test_maps_translate_texts_exactly(target):
    tok = target[0]
    ascii_texts = ["the cat", "a", "then the theatre", TEXT[:60]]
    for draft_tok, texts in ((byte_tokenizer(), PROMPT_TEXTS + [TEXT[:200]]),
                             (char_tokenizer(), ascii_texts)):
        maps = build_maps(tok, draft_tok, tok.vocab_size, draft_tok.vocab_size)
        t2d, t2d_len = maps.target_to_draft, maps.target_to_draft_len
        d2t, d2t_len = maps.draft_to_target, maps.draft_to_target_len
        for text in texts:  # target ids -> draft ids, and draft ids -> target ids, same text
            ids = tok.encode(text, add_special_tokens=False)
            rendered = [d for i in ids for d in t2d[i, :t2d_len[i]].tolist()]
            assert draft_tok.decode(rendered) == text
            back = [t for d in draft_tok.encode(text, add_special_tokens=False)
                    for t in d2t[d, :d2t_len[d]].tolist()]
            # The character draft's own encoding starts with a space marker (SentencePiece).
            assert tok.decode(back) in (text, " " + text)
        assert t2d[tok.eos_id, 0] == draft_tok.eos_id and d2t[draft_tok.eos_id, 0] == tok.eos_id
    # The character draft spells whole characters only: byte pieces of one are untranslated.
    chars = build_maps(tok, char_tokenizer(), tok.vocab_size, 37)
    assert chars.stats["draft_unmapped"] == 0 and chars.stats["target_unmapped"] > 0
    # Bytes: every target id translates (pieces of a character included: the byte-level
    # target has partial UTF-8 tokens for 日本語 and the emoji), every byte but BOS back.
    bytes_maps = build_maps(tok, byte_tokenizer(), tok.vocab_size, 258)
    assert bytes_maps.stats["target_unmapped"] == 0 and bytes_maps.stats["draft_unmapped"] == 1
    byte_tok = byte_tokenizer()
    for i in range(1, tok.vocab_size):  # each id spelled by the byte draft, decoded as a whole
        ids = bytes_maps.target_to_draft[i, :bytes_maps.target_to_draft_len[i]].tolist()
        assert tok.backend.decode([i]) == byte_tok.backend.decode(ids)
    partial = [i for i in range(tok.vocab_size) if "\ufffd" in tok.backend.decode([i])]
    assert partial and all(bytes_maps.target_to_draft_len[i] for i in partial)
    assert bytes_maps.draft_start == 0  # the byte draft's BOS opens its rendering
    # The intersection is a bijection of one-token texts.
    d_of_t, t_of_d = bytes_maps.tli_draft_of_target, bytes_maps.tli_target_of_draft
    for t in np.flatnonzero(d_of_t >= 0):
        assert t_of_d[d_of_t[t]] == t
        assert _bytes(tok, [t]) == _bytes(byte_tokenizer(), [d_of_t[t]]) or t == tok.eos_id
    # Two copies of one tokenizer: identity maps.
    same = build_maps(tok, bpe_tokenizer(), tok.vocab_size, tok.vocab_size)
    assert (same.target_to_draft[:, 0] == np.arange(tok.vocab_size)).all()
    assert (same.target_to_draft_len == 1).all() and same.stats["intersection"] == tok.vocab_size


def test_merge_table_joins_exactly_the_splits_of_target_tokens(target):
    tok = target[0]
    maps = build_maps(tok, byte_tokenizer(), tok.vocab_size, 258)
    start, nxt, into = maps.merge_start, maps.merge_next, maps.merge_into
    assert maps.num_merges == maps.stats["target_merges"] > 0 and start[-1] == maps.num_merges
    from drafters.cross_vocab_maps import _BYTE_OF_CHAR  # byte-level: GPT-2's alphabet
    spelled = lambda i: bytes(_BYTE_OF_CHAR[c] for c in tok.backend.id_to_token(i))  # noqa: E731
    for a in range(tok.vocab_size):
        row = slice(start[a], start[a + 1])
        assert (np.diff(nxt[row]) > 0).all()  # sorted, one entry per pair
        for b, t in zip(nxt[row], into[row]):
            assert spelled(a) + spelled(b) == spelled(t)
    # Every two-token split of every token is there: " the" = " " + "the" or " t" + "he" ...
    pairs = {(a, int(b)) for a in range(tok.vocab_size) for b in nxt[start[a]:start[a + 1]]}
    single = {spelled(i): i for i in range(1, tok.vocab_size)}
    for data, t in single.items():
        for k in range(1, len(data)):
            if data[:k] in single and data[k:] in single:
                assert (single[data[:k]], single[data[k:]]) in pairs
    assert maps.merge_search_steps >= int(np.diff(start).max()).bit_length()


def test_rejoined_pieces_are_the_target_tokenization(target):
    """Text drafted byte by byte comes back as the target's own BPE tokens, for every prompt
    text (pieces of multi-byte characters included), cut to the chain length; a ragged valid
    prefix is respected."""
    from drafters import cross_vocab
    tok = target[0]
    byte_tok = byte_tokenizer()
    maps = build_maps(tok, byte_tok, tok.vocab_size, 258)
    arrays = {k: jnp.asarray(v) for k, v in maps.arrays().items()}
    texts = PROMPT_TEXTS + [TEXT[:90], TEXT[100:170]]
    width = max(len(t.encode("utf-8")) for t in texts)
    pieces = np.zeros((len(texts), width), np.int32)
    ok = np.zeros((len(texts), width), bool)
    for r, text in enumerate(texts):
        ids = [int(maps.draft_to_target[d, 0]) for d in byte_tok.encode(text, False)]
        pieces[r, :len(ids)], ok[r, :len(ids)] = ids, True
    out, valid = cross_vocab._merge_pieces(arrays, jnp.asarray(pieces), jnp.asarray(ok), width,
                                           maps.merge_search_steps)
    for r, text in enumerate(texts):
        got = np.asarray(out[r])[np.asarray(valid[r])].tolist()
        assert got == tok.encode(text, add_special_tokens=False), text
    short, short_valid = cross_vocab._merge_pieces(arrays, jnp.asarray(pieces),
                                                   jnp.asarray(ok), 3, maps.merge_search_steps)
    np.testing.assert_array_equal(np.asarray(short), np.asarray(out)[:, :3])
    np.testing.assert_array_equal(np.asarray(short_valid), np.asarray(valid)[:, :3])
    # The draft's side: the target's text rendered token by token into a draft vocabulary with
    # merged tokens (the permuted one) re-joins into the draft's own BPE encoding.
    draft_tok, _, added = permuted_tokenizer(tok)
    dmaps = build_maps(tok, draft_tok, tok.vocab_size, draft_tok.vocab_size)
    assert dmaps.stats["draft_merges"] > 0 and dmaps.draft_merge_search_steps > 0
    darrays = {k: jnp.asarray(v) for k, v in dmaps.arrays().items()}
    joined_any = False
    for text in texts + [draft_tok.decode([d]) for d, _ in added[:8]]:  # one merged token
        rendered = [d for t in tok.encode(text, add_special_tokens=False)
                    for d in dmaps.target_to_draft[t, :dmaps.target_to_draft_len[t]].tolist()]
        n = len(rendered)
        got, ok2 = cross_vocab._merge_pieces(darrays, jnp.asarray([rendered]),
                                             jnp.ones((1, n), bool), n,
                                             dmaps.draft_merge_search_steps, "dmerge")
        got = np.asarray(got[0])[np.asarray(ok2[0])].tolist()
        assert got == draft_tok.encode(text, add_special_tokens=False), text
        joined_any |= len(got) < n
    assert joined_any  # some text uses the draft's merged tokens
    # Without merging the chain is the byte pieces themselves.
    drafter, dparams = make_drafter(*tiny(258, seed=1, layers=1), maps, merge_pieces=False)
    assert drafter.merge_steps == 0 and "merge_start" not in dparams["maps"]


# (3) a draft that predicts the target is accepted through the maps -----------------------------


def _re_expressed(tok, model, params):
    """The target re-expressed in a permuted vocabulary with extra merged tokens: same layers,
    embedding rows and head columns moved to the permuted ids; an extra token's head column is
    its first piece's plus noise, so it sometimes wins where that piece would (the chain then
    proposes the merged token's target pieces)."""
    draft_tok, perm, added = permuted_tokenizer(tok)
    small, small_params = tiny(draft_tok.vocab_size, seed=2)
    emb, head = np.asarray(params["embedder"]["embedding"]), np.asarray(params["lm_head"])
    new_emb = np.asarray(small_params["embedder"]["embedding"]).copy()
    new_head = np.zeros_like(np.asarray(small_params["lm_head"]))
    new_emb[perm], new_head[:, perm] = emb, head
    noise = np.random.default_rng(3).standard_normal((head.shape[0], len(added))) * 0.05
    for k, (d, first) in enumerate(added):
        new_head[:, d] = head[:, first] + noise[:, k]
    draft_params = dict(params, embedder={"embedding": jnp.asarray(new_emb)},
                        lm_head=jnp.asarray(new_head))
    return draft_tok, small, draft_params


def test_a_good_draft_is_accepted_through_the_maps(target):
    tok, model, params, prompts, config, rows = target
    draft_tok, small, draft_params = _re_expressed(tok, model, params)
    maps = build_maps(tok, draft_tok, model.vocab_size, small.vocab_size)
    assert maps.stats["draft_to_target_width"] >= 2  # merged tokens expand to several ids
    assert maps.stats["intersection"] == tok.vocab_size
    drafter, dparams = make_drafter(small, draft_params, maps, draft_len=4)
    gen = Engine(model, config, drafter).generate(params, dparams, prompts)
    assert gen.tokens == rows
    assert gen.tau > 2.0, gen.stats
    # Sampling: restricted to the intersection, the draft's distribution is the target's, so
    # (up to float rounding) every draft is accepted.
    sampling = SamplingConfig(temperature=1.0)
    drafter, dparams = make_drafter(small, draft_params, maps, draft_len=4, sampling=sampling)
    out = speculative_generate(model, params, drafter, dparams, prompts,
                               DecodeConfig(max_new_tokens=NEW_TOKENS, sampling=sampling,
                                            eos_ids=tok.eos_ids), key=jax.random.key(1))
    stats = jax.device_get(out.stats)
    assert stats.accepted >= 0.9 * stats.drafted > 0, stats


# (4) sampling (TLI) has the target's joint distribution -----------------------------------------


def _fused_bpe(vocab: dict, merges: list, eos: str) -> TextTokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens([eos])
    tok.decoder = decoders.Fuse()
    return TextTokenizer(tok, eos_ids=[vocab[eos]])


ROWS = 2048  # x 2 rounds: 4096 sampled continuations of 3 tokens (512 possible)


def test_sampled_sequences_have_the_target_distribution():
    # Target (8 ids) and draft (7 ids): a, b, c, ab and the EOS are shared; the target's ba, ca,
    # abc and the draft's bc, cab are several tokens on the other side.
    target_tok = _fused_bpe({"a": 0, "b": 1, "c": 2, "ab": 3, "ba": 4, "ca": 5, "abc": 6,
                             "<eos>": 7}, [("a", "b"), ("b", "a"), ("c", "a"), ("ab", "c")],
                            "<eos>")
    draft_tok = _fused_bpe({"c": 0, "b": 1, "a": 2, "bc": 3, "ab": 4, "cab": 5, "</s>": 6},
                           [("a", "b"), ("b", "c"), ("c", "ab")], "</s>")
    model, params = seq_model()
    small, small_params = seq_model(vocab=7, layers=1, seed=11)
    maps = build_maps(target_tok, draft_tok, 8, 7)
    assert maps.stats["intersection"] == 5
    assert maps.target_to_draft_len.tolist() == [1, 1, 1, 1, 2, 2, 2, 1]
    assert maps.draft_to_target_len.tolist() == [1, 1, 1, 2, 1, 2, 1]
    sampling = SamplingConfig(temperature=1.0)
    drafter, dparams = make_drafter(small, small_params, maps, draft_len=2, sampling=sampling)
    seqs, joint = exact_joint(model, params, sampling)
    counts, total = sample_sequences(model, params, drafter, dparams, sampling, rows=ROWS,
                                     rounds=2)
    assert chi_square_pvalue(seqs, joint, counts, total) > 1e-3
    # The same compiled program once more, for its counters: drafts were accepted.
    out = speculative_generate(model, params, drafter, dparams, [[3, 1, 4]] * ROWS,
                               DecodeConfig(max_new_tokens=3, sampling=sampling))
    assert int(out.stats.accepted) > 0.2 * int(out.stats.drafted)


# (5) bad input ---------------------------------------------------------------------------------


def test_missing_tokenizers_are_one_line_errors(target):
    tok, model, params = target[:3]
    for lm, who in ((LoadedModel(model, params, tok, "bpe-target"), "the draft model"),
                    (LoadedModel(model, params, None, "bpe-target"), "the target")):
        with pytest.raises(ValueError, match=f"cross_vocab: {who} .* has no tokenizer") as err:
            registry.build("cross_vocab", lm, draft_model="tiny-llama")
        assert "\n" not in str(err.value)
    drafter, _ = make_drafter(*tiny(258, seed=1, layers=1),
                              build_maps(tok, byte_tokenizer(), 320, 258))
    with pytest.raises(ValueError, match="maps were built for a target vocabulary of 320"):
        drafter.check_compatible(tiny(300, seed=0)[0])
