"""Text <-> token ids, and chat templates, over a Hugging Face ``tokenizers.Tokenizer``.

:class:`TextTokenizer` is what the loaders in ``models/`` return next to the params. It does not
depend on transformers: the chat template is rendered with jinja2 in a sandboxed environment set
up the way transformers sets it up (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a
``raise_exception`` helper, a ``tojson`` filter that does not HTML-escape, ``strftime_now``), with
``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token`` as variables.

Streaming: :meth:`TextTokenizer.decode_incremental` decodes a growing id sequence piece by piece
(prefix-diff decoding), holding text back while a multi-byte character is still incomplete.
"""

from __future__ import annotations

import datetime
import json
from typing import Iterable, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

# Names that end a turn or a document in common chat vocabularies. A loader adds the ids of those
# present in the vocabulary to ``eos_ids`` (after the checkpoint's own eos id).
END_TOKEN_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>",
                   "<end_of_turn>", "</s>", "<|end|>")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compiles a chat template in a sandbox (templates come from checkpoints: untrusted)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special ids and chat template of one checkpoint.

    Args:
      tokenizer: the backend tokenizer. Its post-processor decides what
        ``add_special_tokens=True`` adds (e.g. a BOS id).
      bos_id: beginning-of-sequence id, or None.
      eos_ids: every id that ends generation; ``eos_ids[0]`` is the checkpoint's own eos id
        (rendered as ``eos_token`` in chat templates).
      pad_id: padding id, or None.
      chat_template: jinja2 source of the chat template, or None.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_id: Optional[int] = None,
                 eos_ids: Sequence[int] = (), pad_id: Optional[int] = None,
                 chat_template: Optional[str] = None):
        self.backend = tokenizer
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.pad_id = None if pad_id is None else int(pad_id)
        self.chat_template = chat_template
        self._template = None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> Optional[int]:
        return self.eos_ids[0] if self.eos_ids else None

    def id_to_token(self, token_id: Optional[int]) -> Optional[str]:
        return None if token_id is None else self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens`` applies the post-processor (BOS etc.)."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (any iterable of ints, e.g. a numpy row)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_complete(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` without a trailing incomplete UTF-8 character: a generation cut by
        ``max_new_tokens`` inside a multi-byte character would otherwise end in U+FFFD. The
        bytes of that character are held back (the ids keep every token), as
        :meth:`decode_incremental` does while streaming."""
        ids = [int(i) for i in ids]
        text = self.decode(ids, skip_special_tokens)
        if not text.endswith("\ufffd"):
            return text
        for k in range(1, min(3, len(ids)) + 1):  # a character is at most 4 bytes
            shorter = self.decode(ids[:-k], skip_special_tokens)
            if not shorter.endswith("\ufffd"):
                return shorter
        return text

    def decode_incremental(self, ids: Sequence[int], prefix_offset: int = 0, read_offset: int = 0,
                           skip_special_tokens: bool = True) -> tuple[str, int, int]:
        """The text that ``ids[read_offset:]`` adds, for streaming output.

        Decodes ``ids[prefix_offset:read_offset]`` and ``ids[prefix_offset:]`` and returns their
        difference, so that decoders which depend on context (leading-space stripping) and
        characters split over several byte tokens come out right. While the newest ids end in an
        incomplete UTF-8 character nothing is returned and the offsets stay put.

        Usage::

            text, prefix, read = "", 0, 0
            for token in stream:
                ids.append(token)
                delta, prefix, read = tok.decode_incremental(ids, prefix, read)
                text += delta

        Returns:
          ``(delta, new_prefix_offset, new_read_offset)``.
        """
        ids = [int(i) for i in ids]
        before = self.decode(ids[prefix_offset:read_offset], skip_special_tokens)
        after = self.decode(ids[prefix_offset:], skip_special_tokens)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            return after[len(before):], read_offset, len(ids)
        return "", prefix_offset, read_offset

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            **extra) -> str:
        """Renders ``messages`` (dicts with ``role`` and ``content``) with the chat template.

        ``extra`` becomes extra template variables (e.g. ``tools=...``). Encode the result with
        ``add_special_tokens=False``: templates write their own special tokens.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (the checkpoint ships none): "
                             "format the prompt yourself and call encode().")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        variables = dict(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
            bos_token=self.id_to_token(self.bos_id) or "",
            eos_token=self.id_to_token(self.eos_id) or "",
            pad_token=self.id_to_token(self.pad_id) or "",
            tools=None, documents=None)
        variables.update(extra)
        return self._template.render(**variables)

    def __repr__(self) -> str:
        return (f"TextTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, chat_template={'yes' if self.chat_template else 'no'})")


def end_token_ids(tokenizer: tokenizers.Tokenizer, eos_ids: Iterable[Optional[int]] = ()
                  ) -> tuple[int, ...]:
    """``eos_ids`` (None dropped) followed by the ids of :data:`END_TOKEN_NAMES` in the vocab."""
    ids = [int(i) for i in eos_ids if i is not None]
    for name in END_TOKEN_NAMES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            ids.append(token_id)
    return tuple(dict.fromkeys(ids))
