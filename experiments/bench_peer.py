"""The benchmark's transformers peer: Hugging Face ``generate`` on the same checkpoint and
prompts (float32, batch 1, greedy, the same EOS ids and max_new_tokens, torch threads = cores),
each mode warmed up once: plain, prompt lookup (``prompt_lookup_num_tokens`` = our
prompt_lookup draft length) and, with a peer draft model, assisted generation (across tokenizers
when the draft's vocabulary differs: universal assisted generation, the twin of specjax's
cross_vocab; ``assisted_twin`` names the specjax run it mirrors). Its speedups are
HF mode vs HF plain; ``vs_specjax_ar`` is HF tokens/s over specjax ``ar`` tokens/s. The model
code is :mod:`experiments.hf_peer` (transformers and torch: test / benchmark time only).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

from experiments.bench_metrics import aggregate, first_mismatch, summarize
from experiments.common import UserError

MODES = ("plain", "prompt_lookup", "assisted")


@dataclasses.dataclass(frozen=True)
class PeerSettings:
    """What the peer runs: ``modes`` (a prefix-ordered subset of :data:`MODES`), the model,
    the draft lengths of its prompt lookup and assisted modes, its draft model and threads,
    and the specjax run its assisted mode mirrors."""

    model: str
    modes: tuple[str, ...]
    max_new_tokens: int
    lookup_len: int
    assisted_len: int
    draft_model: Optional[str] = None
    threads: int = 0
    assisted_twin: str = "draft_model"


def load(loaded, settings: PeerSettings):
    """The loaded :class:`hf_peer.Peer` (UserError with what to do when it cannot load)."""
    from experiments import hf_peer
    tok = loaded.tokenizer
    if tok is None:
        raise UserError(f"the transformers peer needs a tokenizer's EOS ids; "
                        f"{settings.model} has none (use --nopeer)")
    t0 = time.perf_counter()
    draft = settings.draft_model if "assisted" in settings.modes else None
    try:
        peer = hf_peer.Peer.load(settings.model, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                                 draft=draft, num_threads=settings.threads or None)
    except (ValueError, OSError) as e:
        raise UserError(f"the transformers peer failed to load: {e}") from e
    peer.load_s = time.perf_counter() - t0
    return peer


def _generate(peer, ids, mode: str, settings: PeerSettings):
    if mode == "plain":
        return peer.generate(ids, settings.max_new_tokens)
    if mode == "prompt_lookup":
        return peer.generate(ids, settings.max_new_tokens,
                             prompt_lookup_num_tokens=settings.lookup_len)
    return peer.generate(ids, settings.max_new_tokens, assisted=True,
                         draft_len=settings.assisted_len)


def run(peer, settings: PeerSettings, prompts, ar_recs, groups, bar) -> dict:
    """Every mode on every prompt; per-prompt records and their summaries per mode."""
    import torch
    import transformers
    out = {"transformers": transformers.__version__, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "load_s": peer.load_s, "modes": {},
           "twins": {"plain": "ar", "prompt_lookup": "prompt_lookup",
                     "assisted": settings.assisted_twin},
           "cross_vocab": bool(getattr(peer, "cross_vocab", False)),
           "draft_lens": {"prompt_lookup": settings.lookup_len,
                          "assisted": settings.assisted_len}}
    plain = None
    for mode in settings.modes:
        bar.set_description(f"HF {mode}")
        recs = []
        for p, ar in zip(prompts, ar_recs):
            r = _generate(peer, p.ids, mode, settings)
            rec = {"question_id": p.question_id, "group": p.group, "generated_ids": r.generated,
                   "new_tokens": len(r.generated), "wall_s": r.wall_s,
                   "tokens_per_s": r.tokens_per_s, "target_calls": r.target_calls,
                   "draft_calls": r.draft_calls, "tau": r.tau,
                   "matches_specjax_ar": first_mismatch(ar["generated_ids"], r.generated) is None}
            if plain is not None:
                rec["matches_hf_plain"] = first_mismatch(
                    plain[len(recs)]["generated_ids"], r.generated) is None
            recs.append(rec)
            bar.update(1)
        summary = summarize(recs, plain, groups)
        for key, agg in [("overall", summary["overall"])] + list(summary["by_category"].items()):
            sel = recs if key == "overall" else [r for r in recs if r["group"] == key]
            mine = aggregate([a for a in ar_recs if key == "overall" or a["group"] == key])
            agg["vs_specjax_ar"] = (agg["tokens_per_s"] / mine["tokens_per_s"]
                                    if mine["tokens_per_s"] else 0.0)
            agg["matches_specjax_ar"] = sum(r["matches_specjax_ar"] for r in sel)
        out["modes"][mode] = {"per_prompt": recs, **summary}
        if mode == "plain":
            plain = recs
    return out
