"""Rebuilds a GGUF file's SentencePiece vocabulary (``tokenizer.ggml.model == 'llama'``) as a
``tokenizers`` BPE tokenizer: Llama 2, Mistral, Gemma and other llama.cpp "SPM" files.

A GGUF stores a SentencePiece BPE model as pieces, scores and token types, without merges.
SentencePiece encodes by repeatedly joining the adjacent pair of symbols whose concatenation is
the best-scoring piece; a ranked merge list expresses the same thing. Every way of cutting a
normal piece (type 1) into two normal pieces is a merge, ranked by the merged piece: higher
score first, then earlier position in the file (ties only: Gemma 3's scores fall strictly with
position), then, among the cuts of one piece, the longer left part first, which is the order
transformers uses, so that ids agree with it. Control, user-defined, unused and byte pieces are
never the result of a merge, as in SentencePiece. A file that does list merges
(``tokenizer.ggml.merges``) has them used as they are.

The rest mirrors SentencePiece and llama.cpp:

* control tokens (type 3) become special added tokens and user-defined ones (type 4: Gemma's
  runs of newlines, tabs or spaces, HTML tags) plain added tokens: both are cut out of the raw
  text first, longest first. (transformers makes Gemma's space runs BPE pieces instead; the
  two agree up to 31 spaces, but 40 spaces are 31 + 9 here and 16 + 24 there.)
* normalizer: ``" "`` becomes ``"▁"``; with ``tokenizer.ggml.add_space_prefix`` true or absent
  (Llama 2, Mistral) a ``"▁"`` is prepended to every stretch of text between added tokens, as
  SentencePiece, llama.cpp and Llama 2's own ``tokenizer.json`` do. (transformers' GGUF loader
  prepends only at the start of the text and not before a leading space, so it differs on text
  after a special token and on text that starts with a space.) Gemma sets the flag false.
* model: BPE with ``byte_fallback``: a character with no piece becomes its UTF-8 byte pieces
  ``<0xNN>``.
* decoder: ``"▁"`` back to ``" "``, byte pieces to bytes, and the prepended space stripped.
* BOS is added when ``tokenizer.ggml.add_bos_token`` is true or absent (llama.cpp's default for
  SentencePiece vocabularies); EOS when ``add_eos_token`` is true. The end ids are the file's
  eos/eot/eom ids and the control tokens named in ``models.tokenizer.END_TOKEN_NAMES`` (Gemma's
  ``<end_of_turn>``; its ``</s>`` is a user-defined HTML tag and does not count).

Gemma GGUF files carry no chat template: for the ``gemma*`` architectures
:data:`GEMMA_CHAT_TEMPLATE` (Gemma's own, text parts only) is supplied.
"""

from __future__ import annotations

import tokenizers
from tokenizers import decoders, normalizers

from models.gguf import _CONTROL, _USER_DEFINED, _field, set_post_processor
from models.hf import CheckpointError
from models.tokenizer import TextTokenizer, end_token_ids

_NORMAL = 1  # llama.cpp token type of an ordinary piece
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# Gemma's chat template (as in its tokenizer_config.json), for text-only messages: roles
# alternate user/model, a system message is folded into the first user turn.
GEMMA_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def derive_merges(tokens: list[str], scores: list[float], types: list[int]
                  ) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies, best first (see the module doc)."""
    normal = [i for i, ty in enumerate(types) if ty == _NORMAL] if types else range(len(tokens))
    pieces = {tokens[i] for i in normal}
    merges = []
    for i in sorted(normal, key=lambda i: (-scores[i], i)):
        piece = tokens[i]
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                merges.append((left, right))
    return merges


def _vocabulary(reader, path: str) -> tuple[list[str], list[float], list[int]]:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type", [])
    if not tokens:
        raise CheckpointError(f"{path}: the SentencePiece vocabulary has no tokenizer.ggml.tokens;"
                              " re-convert the model with llama.cpp's convert_hf_to_gguf.py.")
    if scores is None or len(scores) != len(tokens):
        found = "no" if scores is None else f"{len(scores)}"
        raise CheckpointError(
            f"{path}: the SentencePiece vocabulary ({len(tokens)} tokens) has {found} "
            "tokenizer.ggml.scores, and the merges are derived from one score per token; "
            "re-convert the model with llama.cpp's convert_hf_to_gguf.py.")
    if types and len(types) != len(tokens):
        raise CheckpointError(f"{path}: {len(types)} tokenizer.ggml.token_type entries for "
                              f"{len(tokens)} tokens; re-convert the model with llama.cpp.")
    return list(tokens), [float(s) for s in scores], [int(t) for t in types]


def spm_tokenizer_from_gguf(reader, path: str = "GGUF file") -> TextTokenizer:
    """The tokenizer of a GGUF file whose ``tokenizer.ggml.model`` is ``'llama'``.

    Args:
      reader: a ``gguf.GGUFReader`` of the file.
      path: the file's name, for error messages.

    Raises:
      CheckpointError: the vocabulary is incomplete (no tokens, or no score per token).
    """
    tokens, scores, types = _vocabulary(reader, path)
    tid = lambda key: _field(reader, f"tokenizer.ggml.{key}")  # noqa: E731
    file_merges = tid("merges")
    merges = ([tuple(m.split(" ", 1)) for m in file_merges] if file_merges
              else derive_merges(tokens, scores, types))
    unk = tid("unknown_token_id")
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
        unk_token=None if unk is None else tokens[unk]))

    add_space_prefix = tid("add_space_prefix")
    add_space_prefix = True if add_space_prefix is None else bool(add_space_prefix)
    steps = [normalizers.Replace(" ", "▁")]
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence(decode_steps)

    backend.add_special_tokens([tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                                for i, ty in enumerate(types) if ty == _CONTROL])
    backend.add_tokens([tokenizers.AddedToken(tokens[i], special=False, normalized=False)
                        for i, ty in enumerate(types) if ty == _USER_DEFINED])

    bos, eos = tid("bos_token_id"), tid("eos_token_id")
    add_bos = tid("add_bos_token")
    set_post_processor(backend, tokens, bos if add_bos is None or add_bos else None,
                       eos if tid("add_eos_token") else None)

    template = _field(reader, "tokenizer.chat_template")
    if template is None and _field(reader, "general.architecture") in _GEMMA_ARCHITECTURES:
        template = GEMMA_CHAT_TEMPLATE
    declared = [eos, tid("eot_token_id"), tid("eom_token_id")]
    eos_ids = [i for i in end_token_ids(backend, declared)
               if i in declared or not types or types[i] == _CONTROL]
    return TextTokenizer(backend, bos_id=bos, eos_ids=eos_ids, pad_id=tid("padding_token_id"),
                         chat_template=template)
