"""Trained tiny models and PEFT adapters, for tests that need weights that learned something.

Everything is built from configs on CPU in seconds, deterministically (fixed seeds), once per
test session, into a folder the caller gives (pytest's `tmp_path_factory`):

    fixtures = trained_fixtures.get(tmp_path_factory)      # one instance per session
    fixtures.base("llama")                      -> Path    # model + tokenizer, AutoModelForCausalLM/AutoTokenizer
    fixtures.adapter("llama", "ia3", "expert")  -> Path    # PEFT folder, PeftModel.from_pretrained(base, path)
    fixtures.adapter("gpt2", "full", "anti")    -> Path    # a full fine-tune (model + tokenizer), for --base
    fixtures.eval_set("keep.txt")               -> Path    # evaluation files (EVAL_SETS)

MODELS: "llama" (4 heads, 4 KV heads), "llama_gqa" (4 heads, 2 KV heads), "gpt2" (Conv1D).
PEFT_TYPES: "lora" (r=4, every linear layer), "ia3" (attention and feedforward modules, so both
(out, 1) and (1, in) vectors occur), "prefix", "prefix_projection" (prefix-tuning without and
with the MLP reparametrisation; PEFT saves the projected `prompt_embeddings` either way), and
"full" (all weights). ROLES: "expert" is trained on task A (`TASKS["expert"]`, reverse) plus the
shared "copy" data, "anti" on task B (`TASKS["anti"]`, repeat) plus the same copy data, so the
two share a general capability and differ in a deficiency. Both roles start from the same
initial adapter (same seed): what differs between them is what training put there.

The vocabulary is a few dozen words; texts look like "reverse red cat sun = sun cat red". The
word-level tokenizer adds "<s>" in front; training appends "</s>".

Run as a script to build everything into a folder and print build times and saved shapes:
`python tests/trained_fixtures.py OUT`.
"""

from __future__ import annotations

import json
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

MODELS = ("llama", "llama_gqa", "gpt2")
PEFT_TYPES = ("lora", "ia3", "prefix", "prefix_projection", "full")
ROLES = ("expert", "anti")
TASKS = {"expert": "reverse", "anti": "repeat"}
GENERAL_TASK = "copy"
BASE_TASK = "sort"  # what the base model is pre-trained on: the format, not the tasks
BASE_STEPS = 150
BASE_LEARNING_RATE = 1e-2

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
WORDS = (
    *("red", "green", "blue", "black", "white", "gold", "pink", "gray"),
    *("cat", "dog", "fox", "owl", "bee", "ant", "cow", "pig"),
    *("sun", "moon", "star", "rain", "snow", "wind", "tree", "leaf"),
    *("rock", "sand", "lake", "hill", "road", "ship", "book", "door"),
)
TASK_WORDS = ("copy", "reverse", "repeat", "sort", "=")
VOCAB = (*SPECIAL_TOKENS, *TASK_WORDS, *WORDS)

SEED = 20240221
STEPS = 50  # optimizer steps per training run
BATCH = 16
TRAIN_LINES = 256  # per task
NUM_VIRTUAL_TOKENS = 5
ENCODER_HIDDEN_SIZE = 16  # prefix_projection's MLP width
LEARNING_RATES = {"lora": 3e-2, "ia3": 1e-1, "prefix": 5e-2, "prefix_projection": 1e-2, "full": 5e-3}

# Evaluation files, from lines disjoint from the training lines: keep = the expert's task,
# forget = the anti-expert's, general = copy. `.jsonl` ones hold {"prompt", "completion"}.
EVAL_SETS = ("keep.txt", "forget.txt", "general.txt", "keep.jsonl", "forget.jsonl", "prompts.txt")
EVAL_LINES = 24


# ---------------------------------------------------------------------------------------------
# Tasks


def task_line(task: str, words: list[str]) -> str:
    """One example of `task` on `words`: "<task> w1 .. wn = <answer>"."""
    if task == "copy":
        answer = words
    elif task == "reverse":
        answer = words[::-1]
    elif task == "sort":
        answer = sorted(words, key=VOCAB.index)
    elif task == "repeat":
        answer = words * 3
    else:
        raise ValueError(f"unknown task {task!r}; expected copy, reverse, sort or repeat")
    return " ".join([task, *words, "=", *answer])


def task_lines(task: str, n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """`n` distinct random examples of `task` (2 to 5 words each), none of them in `exclude`."""
    rng = random.Random(f"{task}:{seed}")
    lines: list[str] = []
    seen = set(exclude)
    while len(lines) < n:
        line = task_line(task, rng.sample(WORDS, rng.randint(2, 5)))
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return lines


def training_lines(role: str) -> list[str]:
    """The training set of `role`: its task's lines and the shared copy lines (the same for both roles)."""
    return task_lines(TASKS[role], TRAIN_LINES, SEED) + task_lines(GENERAL_TASK, TRAIN_LINES, SEED)


# ---------------------------------------------------------------------------------------------
# Tokenizer and models


def make_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over VOCAB: whitespace split, "<s>" prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def make_model(name: str) -> torch.nn.Module:
    """The untrained base model `name` (MODELS), random weights from a fixed seed."""
    import transformers

    ids = {"vocab_size": len(VOCAB), "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    torch.manual_seed(SEED + MODELS.index(name))
    if name in ("llama", "llama_gqa"):
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4 if name == "llama" else 2, max_position_embeddings=64, **ids,
        )
        return transformers.LlamaForCausalLM(config)
    if name == "gpt2":
        config = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids
        )
        return transformers.GPT2LMHeadModel(config)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def peft_config(model: str, peft_type: str):
    """The PEFT config trained for `model` and `peft_type` (not "full")."""
    import peft

    gpt2 = model == "gpt2"
    if peft_type == "lora":
        targets = ["c_attn", "c_proj", "c_fc"] if gpt2 else [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ]
        return peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=gpt2
        )
    if peft_type == "ia3":
        # PEFT's defaults for both: keys, values and the feedforward output layer, whose vector
        # scales its input, (1, in); the others scale outputs, (out, 1).
        targets, feedforward = (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]) if gpt2 else (
            ["k_proj", "v_proj", "down_proj"], ["down_proj"]
        )
        return peft.IA3Config(
            task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=gpt2
        )
    if peft_type in ("prefix", "prefix_projection"):
        return peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS,
            prefix_projection=peft_type == "prefix_projection", encoder_hidden_size=ENCODER_HIDDEN_SIZE,
        )
    raise ValueError(f"unknown PEFT type {peft_type!r}; expected one of {PEFT_TYPES[:-1]}")


# ---------------------------------------------------------------------------------------------
# Training


def encode(tokenizer, lines: list[str]) -> list[list[int]]:
    """Token ids of each line: "<s>" + words + "</s>"."""
    return [ids + [EOS_ID] for ids in tokenizer(lines)["input_ids"]]


def batch_tensors(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), PAD_ID)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def train(model: torch.nn.Module, seqs: list[list[int]], lr: float, steps: int = STEPS, seed: int = SEED) -> None:
    """`steps` AdamW steps (no weight decay) on random batches of `seqs`, in place; leaves `model` in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        loss = model(**batch_tensors(rng.sample(seqs, BATCH))).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _quiet(fn: Callable[[], object]) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# ---------------------------------------------------------------------------------------------
# The session cache


class TrainedFixtures:
    """Builds each base model, adapter and evaluation file on first request, into `root`; returns folders."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.timings: dict[str, float] = {}  # seconds per built item
        self._built: dict[tuple[str, ...], Path] = {}
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The word-level tokenizer (the same one every model folder holds)."""
        if self._tokenizer is None:
            self._tokenizer = make_tokenizer()
        return self._tokenizer

    def _once(self, key: tuple[str, ...], make: Callable[[Path], None]) -> Path:
        if key not in self._built:
            folder = self.root / "-".join(key)
            start = time.perf_counter()
            make(folder)
            self.timings["-".join(key)] = time.perf_counter() - start
            self._built[key] = folder
        return self._built[key]

    def base(self, model: str) -> Path:
        """Folder of the untrained base `model`: config, model.safetensors, tokenizer."""
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")

        def make(folder: Path) -> None:
            net = make_model(model)
            seqs = encode(self.tokenizer, task_lines(BASE_TASK, TRAIN_LINES, SEED))
            _quiet(lambda: train(net, seqs, BASE_LEARNING_RATE, BASE_STEPS, seed=SEED + MODELS.index(model)))
            _quiet(lambda: net.save_pretrained(folder, safe_serialization=True))
            self.tokenizer.save_pretrained(folder)

        return self._once(("base", model), make)

    def load_base(self, model: str) -> torch.nn.Module:
        """A fresh copy of the base `model`, loaded from its folder, in eval mode."""
        from transformers import AutoModelForCausalLM

        return _quiet(lambda: AutoModelForCausalLM.from_pretrained(self.base(model))).eval()

    def adapter(self, model: str, peft_type: str, role: str) -> Path:
        """Folder of the trained `peft_type` adapter of `model` for `role` ("full": a whole fine-tuned model)."""
        if peft_type not in PEFT_TYPES:
            raise ValueError(f"unknown PEFT type {peft_type!r}; expected one of {PEFT_TYPES}")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")

        def make(folder: Path) -> None:
            net = self.load_base(model)
            seqs = encode(self.tokenizer, training_lines(role))
            seed = SEED + 100 * MODELS.index(model) + PEFT_TYPES.index(peft_type)  # not the role: same init
            if peft_type == "full":
                _quiet(lambda: train(net, seqs, LEARNING_RATES[peft_type], seed=seed))
                _quiet(lambda: net.save_pretrained(folder, safe_serialization=True))
                self.tokenizer.save_pretrained(folder)
                return
            import peft

            torch.manual_seed(seed)
            net = _quiet(lambda: peft.get_peft_model(net, peft_config(model, peft_type)))
            _quiet(lambda: train(net, seqs, LEARNING_RATES[peft_type], seed=seed))
            _quiet(lambda: net.save_pretrained(folder))  # base_model_name_or_path: the base's folder

        return self._once((model, peft_type, role), make)

    def eval_set(self, name: str) -> Path:
        """Path of the evaluation file `name` (EVAL_SETS), lines disjoint from all training lines."""
        if name not in EVAL_SETS:
            raise ValueError(f"unknown evaluation set {name!r}; expected one of {EVAL_SETS}")
        self._once(("eval",), write_eval_sets)
        return self.root / "eval" / name

    def build_all(self) -> None:
        """Everything: every base, every adapter of every model, type and role, the evaluation files."""
        for model in MODELS:
            for peft_type in PEFT_TYPES:
                for role in ROLES:
                    self.adapter(model, peft_type, role)
        self.eval_set(EVAL_SETS[0])


def write_eval_sets(folder: Path) -> None:
    """Write EVAL_SETS into `folder`."""
    folder.mkdir(parents=True)
    train_lines = frozenset(training_lines("expert") + training_lines("anti"))
    sets = {
        "keep": task_lines(TASKS["expert"], EVAL_LINES, SEED + 1, train_lines),
        "forget": task_lines(TASKS["anti"], EVAL_LINES, SEED + 1, train_lines),
        "general": task_lines(GENERAL_TASK, EVAL_LINES, SEED + 1, train_lines),
    }
    for name, lines in sets.items():
        (folder / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    for name in ("keep", "forget"):
        rows = [dict(zip(("prompt", "completion"), _split(line))) for line in sets[name]]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = [_split(line)[0] for name in ("keep", "forget", "general") for line in sets[name][:4]]
    (folder / "prompts.txt").write_text("".join(p + "\n" for p in prompts))


def _split(line: str) -> tuple[str, str]:
    """("<task> words =", " answer"): prompt and completion of a task line."""
    prompt, answer = line.split(" = ")
    return prompt + " =", " " + answer


_SESSIONS: dict[int, tuple[object, TrainedFixtures]] = {}


def get(tmp_path_factory) -> TrainedFixtures:
    """The session's fixtures, built under `tmp_path_factory.mktemp("trained")` on first use."""
    entry = _SESSIONS.get(id(tmp_path_factory))
    if entry is None or entry[0] is not tmp_path_factory:
        entry = (tmp_path_factory, TrainedFixtures(tmp_path_factory.mktemp("trained")))
        _SESSIONS[id(tmp_path_factory)] = entry
    return entry[1]


def saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in a folder's safetensors files."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python tests/trained_fixtures.py OUT", file=sys.stderr)
        return 2
    from transformers.utils import logging

    logging.disable_progress_bar()
    fixtures = TrainedFixtures(Path(argv[1]))
    start = time.perf_counter()
    fixtures.build_all()
    total = time.perf_counter() - start
    for key, seconds in fixtures.timings.items():
        print(f"{seconds:7.2f}s  {key}")
    print(f"{total:7.2f}s  total ({torch.get_num_threads()} threads)")
    for model in MODELS:
        for peft_type in PEFT_TYPES[:-1]:
            folder = fixtures.adapter(model, peft_type, "expert")
            config = json.loads((folder / "adapter_config.json").read_text())
            print(f"\n{model} {peft_type}:", {k: v for k, v in config.items() if k in _CONFIG_FIELDS})
            for key, shape in saved_shapes(folder).items():
                print(f"  {key}: {shape}")
    return 0


_CONFIG_FIELDS = (
    "token_dim", "num_attention_heads", "num_layers", "num_virtual_tokens", "num_transformer_submodules",
    "prefix_projection", "encoder_hidden_size", "target_modules", "feedforward_modules", "fan_in_fan_out", "r",
    "lora_alpha",
)

if __name__ == "__main__":
    sys.exit(main(sys.argv))
