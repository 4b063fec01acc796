"""Generate text with specjax: plain or speculative decoding on any supported model.

  python -m experiments.generate --prompt="What is the capital of France?" --chat
  python -m experiments.generate --prompts_file=prompts.txt --output_json=out.json --nostream
  python -m experiments.generate --mesh=2x4 --prompts_file=prompts.txt --nostream   # 8 devices

On several hosts (a Cloud TPU pod slice) run the same command on every host: it calls
``jax.distributed.initialize()`` (``--distributed``), builds the mesh over every host's devices,
and only process 0 prints and writes ``--output_json``.

Output JSON (written atomically): for one prompt, an object with ``prompt``, ``prompt_ids``,
``generated_ids``, ``text`` and ``stats`` (``new_tokens``, ``target_calls``, ``tau``, ``wall_s``,
``tokens_per_s``, ...); for ``--prompts_file``, ``{"results": [one object per prompt], "stats":
{totals}}``.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app, flags

from experiments import common, method_flags, methods

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """The binary's flags, in ``fv`` (defined by ``__main__`` only, so that tests can build
    them in their own ``FlagValues``)."""
    d = dict(flag_values=fv)
    flags.DEFINE_string("model", "smollm2-135m", "Registry name, HF checkpoint directory or "
                        ".gguf file.", **d)
    flags.DEFINE_string("prompt", "What is the capital of France? Answer in one sentence.",
                        "Prompt text (ignored when --prompts_file is given).", **d)
    flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line, run as a "
                        "batch.", **d)
    flags.DEFINE_bool("chat", True, "Wrap each prompt in the model's chat template.", **d)
    flags.DEFINE_integer("max_new_tokens", 128, "Most new tokens per prompt (>= 1).",
                         lower_bound=1, **d)
    flags.DEFINE_float("temperature", 0.0, "0 = greedy; otherwise sampling temperature.",
                       lower_bound=0.0, **d)
    flags.DEFINE_integer("top_k", 0, "Keep the k most probable tokens (0 = off).",
                         lower_bound=0, **d)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).", **d)
    flags.DEFINE_float("min_p", 0.0, "Min-p sampling threshold in [0, 1) (0 = off).", **d)
    flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.", **d)
    flags.DEFINE_string("output_json", None, "Write prompts, ids, text and stats here "
                        "(atomically).", **d)
    flags.DEFINE_bool("stream", True, "Print text as it is generated (Python-driven step "
                      "loop); --nostream runs the whole generation in one on-device loop.", **d)
    method_flags.define_flags(fv=fv)
    flags.adopt_module_key_flags(method_flags, flag_values=fv)
    common.define_mesh_flags(fv)


class TextStreamer:
    """Prints decoded text incrementally (re-decodes the ids and prints the new suffix, so
    multi-byte characters split across tokens come out whole)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.printed = ""

    def push(self, ids: list[int]) -> None:
        text = self.tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


def _encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)


def _read_prompts() -> list[str]:
    """The prompts of --prompts_file or --prompt, checked (exist, UTF-8, not empty)."""
    if FLAGS.prompts_file:
        return common.read_prompts_file(FLAGS.prompts_file)
    prompt = common.check_text(FLAGS.prompt, "--prompt")
    if not prompt.strip():
        raise common.UserError("the prompt is empty: give --prompt some text")
    return [prompt]


def main(argv):
    common.start(argv, quiet=False)
    with common.user_errors():
        common.init_distributed(FLAGS.distributed)  # before anything touches a device
        # Every check that needs no weights comes before the slow model load.
        run = methods.build_run(FLAGS)
        prompts = _read_prompts()
        common.check_outputs(FLAGS, "output_json")
        config = method_flags.model_config(FLAGS)  # the architecture only, not the weights
        plan = common.mesh_plan(FLAGS.mesh, config, len(prompts))
        loaded = run.load()
        if loaded.tokenizer is None:
            raise common.UserError(f"model {FLAGS.model!r} has no tokenizer: use a real model")
        ids = [_encode(loaded.tokenizer, p, FLAGS.chat) for p in prompts]
        loaded = common.place_on_mesh(loaded, plan)  # weights placed once, sharded
        run = dataclasses.replace(run, plan=plan)
        import jax
        main_process = jax.process_index() == 0
        streaming = FLAGS.stream and len(prompts) == 1 and jax.process_count() == 1
        if streaming:
            printer = TextStreamer(loaded.tokenizer)
            result = run.stream(loaded, ids, on_tokens=printer.push)
            printer.finish()
        else:
            result = run.generate(loaded, ids)
        records = []
        for prompt, prompt_ids, gen in zip(prompts, ids, result.generated):
            text = loaded.tokenizer.decode_complete(gen)  # no half character at a length cut
            if not streaming and main_process:
                print(text)
            records.append({"prompt": prompt, "prompt_ids": prompt_ids, "generated_ids": gen,
                            "text": text, "stats": result.row_stats(gen)})
        summary = result.summary() | {"mesh": str(plan) if plan else "1x1"}
        if not main_process:
            return
        print(f"[{run.method}] {summary['new_tokens']} tokens in {summary['wall_s']:.2f}s "
              f"({summary['tokens_per_s']:.1f} tok/s, tau {summary['tau']:.2f}, "
              f"compile {summary['compile_s']:.1f}s, mesh {summary['mesh']})", file=sys.stderr)
        if FLAGS.output_json:
            obj = records[0] | {"stats": summary} if len(records) == 1 else {
                "results": records, "stats": summary}
            common.write_json_atomic(FLAGS.output_json, obj)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=common.parse_flags)
