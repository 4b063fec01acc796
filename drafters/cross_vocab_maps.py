"""Static id maps between two vocabularies, built once on the host from their tokenizers.

The cross-vocabulary drafter (``drafters/cross_vocab.py``) runs on the device under ``jit``, so
the string-level translation between a target and a draft vocabulary is precomputed here as
fixed-width tables:

* ``target_to_draft[t, :target_to_draft_len[t]]``: draft ids whose concatenated bytes are the
  bytes of target id ``t`` (how the draft model sees a committed target token);
* ``draft_to_target[d, :draft_to_target_len[d]]``: target ids whose concatenated bytes are the
  bytes of draft id ``d`` (how a drafted token is proposed to the target);
* ``tli_target_of_draft`` / ``tli_draft_of_target``: the vocabulary *intersection* of
  token-level intersection (TLI, Timor et al.): pairs ``(d, t)`` whose bytes are one token on
  both sides (``d -> [t]`` and ``t -> [d]``), a bijection; -1 elsewhere;
* the target's **merge table** (``merge_start`` / ``merge_next`` / ``merge_into``, compressed
  rows): ``(a, b) -> t`` for every pair of target ids whose concatenated bytes are exactly
  target id ``t``'s (every split of every token into two tokens). The drafter re-joins the
  pieces a drafted text was cut into at the draft's token boundaries, so that a target token
  spanning two draft tokens can be proposed (see ``drafters/cross_vocab.py``); and the
  draft's (``draft_merge_*``), which re-joins the draft's rendering of the target's text.

A length of 0 marks an id with no translation. Every non-empty entry is exact: the bytes of the
translation equal the bytes of the id (checked here for every entry; an entry that fails the
check is dropped, never kept approximately).

Decisions (what "the text of a token" is):

* **Bytes, not strings.** A token's text is its byte string: byte-level BPE vocabularies (GPT-2,
  SmolLM2, Qwen, Llama-3) have tokens that are pieces of one multi-byte UTF-8 character. Such a
  piece is translated when the receiving tokenizer can spell arbitrary bytes (byte-level BPE:
  its own BPE model applied to the piece; SentencePiece byte fallback: ``<0xHH>`` tokens);
  otherwise it gets length 0 (the draft then does not see it; a draft token of that kind ends
  the proposal).
* **Leading spaces.** Bytes come from the tokenizer's decoder *in context*: for byte-level
  decoders from the GPT-2 byte alphabet (``Ġhello`` -> b" hello"), for the others from
  ``decode([anchor, id])`` minus ``decode([anchor])``, so that decoders which strip the first
  token's leading space (SentencePiece's ``▁``, ``Strip``) or glue WordPiece's ``##`` give the
  bytes the token adds in the middle of a text. Encoding into the other vocabulary first looks
  for a single token with exactly those bytes (so two identical vocabularies give identity
  maps), then encodes the text without special tokens and keeps the result only if its bytes
  are exact; a tokenizer that prepends a space (SentencePiece) is retried after an anchor
  (``"\\n"``, ``" "``, ``"a"``) whose own ids are then cut off.
* **Special tokens** (added tokens marked special, and the BOS / EOS ids) never map through
  text: BOS maps to BOS, an EOS id to the other side's token of the same content or else its
  first EOS id, any other special token to the other side's special token of the same content;
  none: length 0. Padding rows of a model whose vocabulary is larger than its tokenizer's, and
  translations longer than ``max_width``, get length 0.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import numpy as np

_ANCHORS = ("\n", " ", "a")

# What "typical text" is when the drafter sizes its buffers: prose, code, numbers, a little
# non-ASCII. Its target tokens' mean expansion sizes the draft's feed blocks and cache.
SAMPLE_TEXT = """The committee met on Tuesday, 4 March 2025, to review the budget. After a long
discussion, they agreed that the new library would open in the autumn; the old building,
which had served the town for 120 years, will become a museum. "We're delighted," said the
mayor. Questions? Write to info@example.org or call +1 (555) 010-2030.

def moving_average(values, window=3):
    \"\"\"Return the running mean of `values` over `window` items.\"\"\"
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    total, out = 0.0, []
    for i, x in enumerate(values):
        total += x
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out

Café crème, naïve façade, 10 € — «très bien»."""


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the other 68 bytes
    for the code points 256, 257, ... in byte order. Returns character -> byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_alphabet()
_CHAR_OF_BYTE = {b: c for c, b in _BYTE_OF_CHAR.items()}


def _decoder_types(backend) -> set:
    spec = json.loads(backend.to_str()).get("decoder") or {}
    types = {spec.get("type")}
    for sub in spec.get("decoders") or ():
        types.add(sub.get("type"))
    return types


class _Vocab:
    """One tokenizer seen as bytes: every id's bytes, its special ids, how it spells bytes."""

    def __init__(self, tok, model_vocab: int, max_width: int):
        self.tok, self.backend = tok, tok.backend
        self.model_vocab, self.max_width = int(model_vocab), int(max_width)
        types = _decoder_types(self.backend)
        self.byte_level = "ByteLevel" in types
        self.byte_fallback = "ByteFallback" in types
        self.size = min(self.backend.get_vocab_size(with_added_tokens=True), self.model_vocab)
        added = self.backend.get_added_tokens_decoder()
        self.special = {i: a.content for i, a in added.items() if a.special and i < self.size}
        for i in (tok.bos_id, *tok.eos_ids):
            if i is not None and i < self.size:
                self.special.setdefault(int(i), self.backend.id_to_token(int(i)) or "")
        self.added_text = {i: a.content for i, a in added.items() if not a.special}
        self._anchor = self._pick_anchor()
        self.bytes = [self._bytes_of(i) for i in range(self.size)]
        self.single = {}  # bytes -> the lowest id spelling exactly them
        for i, b in enumerate(self.bytes):
            if b and i not in self.special:
                self.single.setdefault(b, i)
        self.special_by_content = {}
        for i, c in sorted(self.special.items()):
            self.special_by_content.setdefault(c, i)

    def _pick_anchor(self) -> Optional[str]:
        for text in ("a", "x", "0"):
            token_id = self.backend.token_to_id(text)
            if token_id is not None:
                return text
        return None

    def _bytes_of(self, i: int) -> Optional[bytes]:
        if i in self.special:
            return None
        if i in self.added_text:
            return self.added_text[i].encode("utf-8")
        piece = self.backend.id_to_token(i)
        if piece is None:
            return None
        if self.byte_level:
            if all(c in _BYTE_OF_CHAR for c in piece):
                return bytes(_BYTE_OF_CHAR[c] for c in piece)
            return piece.encode("utf-8")
        if (self.byte_fallback and len(piece) == 6 and piece.startswith("<0x")
                and piece.endswith(">")):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        text = self._decode_pieces([piece])
        if self._anchor is not None:
            before, after = self._decode_pieces([self._anchor]), self._decode_pieces(
                [self._anchor, piece])
            if after.startswith(before):
                text = after[len(before):]
        if "\ufffd" in text and "\ufffd" not in piece:
            return None  # part of a character the decoder cannot show on its own
        return text.encode("utf-8") or None

    def _decode_pieces(self, pieces: list[str]) -> str:
        decoder = self.backend.decoder
        return decoder.decode(pieces) if decoder is not None else " ".join(pieces)

    def spelled(self, ids: Sequence[int]) -> Optional[bytes]:
        parts = []
        for i in ids:
            if not 0 <= i < self.size or self.bytes[i] is None:
                return None
            parts.append(self.bytes[i])
        return b"".join(parts)

    def encode_bytes(self, data: bytes, encoded: Optional[list[int]] = None
                     ) -> Optional[list[int]]:
        """Ids of this vocabulary whose bytes are exactly ``data``, or None."""
        if data in self.single:
            return [self.single[data]]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            ids = encoded if encoded is not None else self.tok.encode(text, False)
            if self.spelled(ids) == data:
                return ids
            for anchor in _ANCHORS:
                head = self.tok.encode(anchor, False)
                ids = self.tok.encode(anchor + text, False)
                if ids[:len(head)] == head and self.spelled(ids[len(head):]) == data:
                    return ids[len(head):]
        if self.byte_level:  # any bytes: this vocabulary's own BPE over its byte alphabet
            ids = [t.id for t in self.backend.model.tokenize(
                "".join(_CHAR_OF_BYTE[b] for b in data))]
            if self.spelled(ids) == data:
                return ids
        if self.byte_fallback:
            ids = [self.backend.token_to_id(f"<0x{b:02X}>") for b in data]
            if None not in ids and self.spelled(ids) == data:
                return ids
        return None


@dataclasses.dataclass(frozen=True, eq=False)
class VocabMaps:
    """The static maps (numpy; see the module docstring). ``draft_start``: the draft id the
    draft's rendering of every prompt starts with (its BOS when the target has none), or -1.
    ``stats``: counts of unmapped ids, the intersection size, widths. ``sample_expansion``:
    draft tokens per target token on :data:`SAMPLE_TEXT` (sizes the drafter's buffers)."""

    target_to_draft: np.ndarray  # int32[V_t, W_td], -1 padded
    target_to_draft_len: np.ndarray  # int32[V_t]
    draft_to_target: np.ndarray  # int32[V_d, W_dt]
    draft_to_target_len: np.ndarray  # int32[V_d]
    tli_draft_of_target: np.ndarray  # int32[V_t]
    tli_target_of_draft: np.ndarray  # int32[V_d]
    draft_start: int
    stats: dict
    sample_expansion: float = 1.0  # expansion() of SAMPLE_TEXT in the target's tokens
    # The target's merge table (rows by first id, sorted by second id): pairs of row a are
    # merge_next[merge_start[a]:merge_start[a + 1]], merging into merge_into[...]. None: empty.
    merge_start: Optional[np.ndarray] = None  # int32[V_t + 1]
    merge_next: Optional[np.ndarray] = None  # int32[P]
    merge_into: Optional[np.ndarray] = None  # int32[P]
    # The draft's merge table, the same way (re-joins the draft's rendering of target text).
    draft_merge_start: Optional[np.ndarray] = None  # int32[V_d + 1]
    draft_merge_next: Optional[np.ndarray] = None
    draft_merge_into: Optional[np.ndarray] = None

    @property
    def target_vocab(self) -> int:
        return self.target_to_draft.shape[0]

    @property
    def draft_vocab(self) -> int:
        return self.draft_to_target.shape[0]

    def expansion(self, target_ids: Optional[Sequence[int]] = None) -> float:
        """Mean draft tokens per translated target token of ``target_ids`` (a text's ids), or
        over the vocabulary without; at least 1. Over a vocabulary it overstates text: rare
        long tokens are many (SmolLM2 ids under a Gemma 3 target: 3.25 per id, 1.01 per token
        of English prompts), so :func:`build_maps` measures :data:`SAMPLE_TEXT` instead."""
        lengths = self.target_to_draft_len
        if target_ids is not None:
            lengths = lengths[np.asarray(list(target_ids), np.int64)]
        mapped = lengths[lengths > 0]
        return max(1.0, float(mapped.mean())) if mapped.size else 1.0

    @property
    def num_merges(self) -> int:
        return 0 if self.merge_next is None else int(self.merge_next.shape[0])

    @property
    def merge_search_steps(self) -> int:
        """Binary-search steps that find any pair of the target's table in its row (0: no
        merges)."""
        return _search_steps(self.merge_start) if self.num_merges else 0

    @property
    def draft_merge_search_steps(self) -> int:
        """The same for the draft's table."""
        if self.draft_merge_next is None or not self.draft_merge_next.shape[0]:
            return 0
        return _search_steps(self.draft_merge_start)

    def arrays(self) -> dict:
        """The arrays the drafter reads on the device (its params ``maps``)."""
        out = {"t2d": self.target_to_draft, "t2d_len": self.target_to_draft_len,
               "d2t": self.draft_to_target, "d2t_len": self.draft_to_target_len,
               "tli_d_of_t": self.tli_draft_of_target, "tli_t_of_d": self.tli_target_of_draft}
        if self.num_merges:
            out |= {"merge_start": self.merge_start, "merge_next": self.merge_next,
                    "merge_into": self.merge_into}
        if self.draft_merge_search_steps:
            out |= {"dmerge_start": self.draft_merge_start, "dmerge_next": self.draft_merge_next,
                    "dmerge_into": self.draft_merge_into}
        return out


def _search_steps(start: np.ndarray) -> int:
    return max(1, int(np.diff(start).max()).bit_length())


def _table(rows: list[Optional[list[int]]], vocab: int, max_width: int):
    width = max([len(r) for r in rows if r] + [1])
    table = np.full((vocab, width), -1, np.int32)
    lengths = np.zeros((vocab,), np.int32)
    for i, r in enumerate(rows):
        if r and len(r) <= max_width:
            table[i, :len(r)] = r
            lengths[i] = len(r)
    used = int(lengths.max()) if lengths.size else 0
    return table[:, :max(used, 1)], lengths


def merge_table(single: dict[bytes, int], vocab: int) -> tuple[np.ndarray, ...]:
    """``(start int32[vocab + 1], next int32[P], into int32[P])``: for every token ``t`` of
    ``single`` (bytes -> id) and every split of its bytes into two tokens ``a`` + ``b`` of
    ``single``, the entry ``(a, b) -> t`` in row ``a`` (rows sorted by ``b``). A pair's bytes
    determine ``t``, so each pair has one entry."""
    pairs = []
    for data, t in single.items():
        if t >= vocab:
            continue
        for k in range(1, len(data)):
            a, b = single.get(data[:k]), single.get(data[k:])
            if a is not None and b is not None and a < vocab and b < vocab:
                pairs.append((a, b, t))
    pairs.sort()
    table = np.asarray(pairs, np.int32).reshape(-1, 3)
    start = np.searchsorted(table[:, 0], np.arange(vocab + 1), side="left").astype(np.int32)
    return start, table[:, 1].copy(), table[:, 2].copy()


def _special_map(src: _Vocab, dst: _Vocab) -> dict[int, int]:
    """Special id of ``src`` -> special id of ``dst`` (BOS to BOS, EOS by content or to the
    first EOS, the rest by content)."""
    out = {}
    src_eos = {i for i in src.tok.eos_ids if i < src.size}
    dst_eos = [i for i in dst.tok.eos_ids if i < dst.size]
    for i, content in src.special.items():
        j = dst.special_by_content.get(content)
        if i == src.tok.bos_id and dst.tok.bos_id is not None:
            j = dst.tok.bos_id
        elif j is None and i in src_eos and dst_eos:
            j = dst_eos[0]
        if j is not None and j < dst.size:
            out[i] = int(j)
    return out


def _direction(src: _Vocab, dst: _Vocab) -> list[Optional[list[int]]]:
    rows: list[Optional[list[int]]] = [None] * src.model_vocab
    for i, j in _special_map(src, dst).items():
        rows[i] = [j]
    todo = [i for i in range(src.size) if rows[i] is None and src.bytes[i]
            and src.bytes[i] not in dst.single]
    texts, ids_of = [], {}
    for i in todo:
        try:
            texts.append((i, src.bytes[i].decode("utf-8")))
        except UnicodeDecodeError:
            pass
    if texts:
        enc = dst.backend.encode_batch([t for _, t in texts], add_special_tokens=False)
        ids_of = {i: list(e.ids) for (i, _), e in zip(texts, enc)}
    for i in range(src.size):
        if rows[i] is None and src.bytes[i]:
            rows[i] = dst.encode_bytes(src.bytes[i], ids_of.get(i))
    return rows


def build_maps(target_tok, draft_tok, target_vocab: int, draft_vocab: int,
               max_width: int = 16) -> VocabMaps:
    """The maps between ``target_tok`` and ``draft_tok`` (``models.tokenizer.TextTokenizer``s)
    for models with ``target_vocab`` / ``draft_vocab`` logits (ids past a tokenizer's size, and
    translations into ids past the other model's vocabulary, get length 0).

    Costs one encode per id not spelled by a single token on the other side (a second or two
    for 50k-token vocabularies)."""
    tv = _Vocab(target_tok, target_vocab, max_width)
    dv = _Vocab(draft_tok, draft_vocab, max_width)
    t2d_rows = [r if r is None or max(r) < draft_vocab else None for r in _direction(tv, dv)]
    d2t_rows = [r if r is None or max(r) < target_vocab else None for r in _direction(dv, tv)]
    t2d, t2d_len = _table(t2d_rows, target_vocab, max_width)
    d2t, d2t_len = _table(d2t_rows, draft_vocab, max_width)
    tli_d_of_t = np.full((target_vocab,), -1, np.int32)
    tli_t_of_d = np.full((draft_vocab,), -1, np.int32)
    for d in np.flatnonzero(d2t_len == 1):
        t = d2t[d, 0]
        if t2d_len[t] == 1 and t2d[t, 0] == d:
            tli_d_of_t[t], tli_t_of_d[d] = d, t
    start = -1
    bos = draft_tok.bos_id
    if bos is not None and target_tok.bos_id is None and bos < draft_vocab:
        start = int(bos)
    sample = [i for i in target_tok.encode(SAMPLE_TEXT, add_special_tokens=False)
              if i < target_vocab]
    stats = {"target_unmapped": int((t2d_len == 0).sum()),
             "draft_unmapped": int((d2t_len == 0).sum()),
             "intersection": int((tli_t_of_d >= 0).sum()),
             "target_to_draft_width": int(t2d.shape[1]),
             "draft_to_target_width": int(d2t.shape[1])}
    merge_start, merge_next, merge_into = merge_table(tv.single, target_vocab)
    d_start, d_next, d_into = merge_table(dv.single, draft_vocab)
    stats["target_merges"] = int(merge_next.shape[0])
    stats["draft_merges"] = int(d_next.shape[0])
    maps = VocabMaps(t2d, t2d_len, d2t, d2t_len, tli_d_of_t, tli_t_of_d, start, stats,
                     merge_start=merge_start, merge_next=merge_next, merge_into=merge_into,
                     draft_merge_start=d_start, draft_merge_next=d_next,
                     draft_merge_into=d_into)
    return dataclasses.replace(maps, sample_expansion=maps.expansion(sample))


def identity_maps(vocab: int) -> VocabMaps:
    """The maps of a draft that shares the target's vocabulary (no tokenizer needed)."""
    ids = np.arange(vocab, dtype=np.int32)
    ones = np.ones((vocab,), np.int32)
    return VocabMaps(ids[:, None], ones, ids[:, None].copy(), ones.copy(), ids.copy(),
                     ids.copy(), -1, {"target_unmapped": 0, "draft_unmapped": 0,
                                      "intersection": vocab, "target_to_draft_width": 1,
                                      "draft_to_target_width": 1})
