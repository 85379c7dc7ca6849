"""Trained tiny models and PEFT adapters, for tests that need weights that learned something.

The weights are trained once, by this file run as a script, and committed under `tests/data/trained/`
(about 1 MB): no test depends on an optimiser's path under whatever torch or transformers version is
installed. The `trained` fixture serves a session copy of that folder (adapter configs pointing at
the copy's base folders) and builds the evaluation files, which need no training:

    fixtures = trained_fixtures.get(tmp_path_factory)      # one instance per session
    fixtures.base("llama")                      -> Path    # model + tokenizer, AutoModelForCausalLM/AutoTokenizer
    fixtures.adapter("llama", "ia3", "expert")  -> Path    # PEFT folder, PeftModel.from_pretrained(base, path)
    fixtures.adapter("gpt2", "full", "anti")    -> Path    # a full fine-tune (model + tokenizer), for --base
    fixtures.eval_set("keep.txt")               -> Path    # evaluation files (EVAL_SETS)

MODELS: "llama" (4 heads, 4 KV heads), "llama_gqa" (4 heads, 2 KV heads), "gpt2" (Conv1D).
PEFT_TYPES: "lora" (r=4, every linear layer), "ia3" (attention and feedforward modules, so both
(out, 1) and (1, in) vectors occur), "prefix", "prefix_projection" (prefix-tuning without and
with the MLP reparametrisation; PEFT saves the projected `prompt_embeddings` either way), and
"full" (all weights; llama and gpt2 only). ROLES: "expert" is trained on task A (`TASKS["expert"]`)
plus the shared `GENERAL_TASK`, "anti" on task B (`TASKS["anti"]`) plus the same general lines, so the
two share a general capability and differ in a deficiency. Both roles start from the same initial
adapter (same seed): what differs between them is what training put there.

The tasks walk a ring of 32 words: "next red = green blue black" (general), "prev red = door
book" (expert), "repeat red = red red red" (anti-expert: degenerate repetition, which rep-4
sees), "skip"/"back" (two steps; the base model is pre-trained on these, so it knows the
format and how a task word conditions the answer). The word-level tokenizer adds "<s>" in
front; training appends "</s>". A task's 192 lines are split into 168 training and 24
evaluation lines.

Run as a script to train everything again into a folder (to refresh `tests/data/trained/`) and
print build times and saved shapes: `python tests/trained_fixtures.py tests/data/trained`. What
the trained models learned is measured in `benchmarks/scan_seeds.py`, not asserted by tests.
"""

from __future__ import annotations

import abc
import json
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

MODELS = ("llama", "llama_gqa", "gpt2")
PEFT_TYPES = ("lora", "ia3", "prefix", "prefix_projection", "full")
FULL_MODELS = ("llama", "gpt2")  # the models with committed full fine-tunes
ROLES = ("expert", "anti")
DATA = Path(__file__).parent / "data" / "trained"  # the committed weights (this file run as a script made them)
BASE_PLACEHOLDER = "base-{model}"  # base_model_name_or_path in the committed adapter configs: the base's folder name

# Tasks: walk the ring of WORDS from a start word, `step` words at a time.
STEPS_OF_TASKS = {"next": 1, "prev": -1, "repeat": 0, "skip": 2, "back": -2}
TASKS = {"expert": "prev", "anti": "repeat"}  # task A and task B: what the two roles learn apart
GENERAL_TASK = "next"  # what both roles learn, from the same lines: the shared general capability
BASE_TASKS = ("skip", "back")  # the base model's pre-training: the format and task conditioning

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
WORDS = (
    *("red", "green", "blue", "black", "white", "gold", "pink", "gray"),
    *("cat", "dog", "fox", "owl", "bee", "ant", "cow", "pig"),
    *("sun", "moon", "star", "rain", "snow", "wind", "tree", "leaf"),
    *("rock", "sand", "lake", "hill", "road", "ship", "book", "door"),
)
VOCAB = (*SPECIAL_TOKENS, *STEPS_OF_TASKS, "=", *WORDS)
ANSWER_LENGTHS = range(2, 8)  # 32 start words × 6 lengths: 192 lines per task

SEED = 20240221
BASE_STEPS = 200
STEPS = 80  # optimizer steps per adapter or fine-tune
BATCH = 16
NUM_VIRTUAL_TOKENS = 5
ENCODER_HIDDEN_SIZE = 16  # prefix_projection's MLP width
LEARNING_RATES = {"base": 1e-2, "lora": 3e-2, "ia3": 1e-1, "prefix": 5e-2, "prefix_projection": 1e-2, "full": 5e-3}

# Evaluation files, from lines held out of all training: keep = the expert's task, forget = the
# anti-expert's, general = the shared one. `.jsonl` ones hold {"prompt", "completion"}.
# truth.jsonl: forget.jsonl's prompts, line for line, answered by the general task's walk instead of repeating.
EVAL_SETS = ("keep.txt", "forget.txt", "general.txt", "keep.jsonl", "forget.jsonl", "truth.jsonl", "prompts.txt")
EVAL_LINES = 24  # per task; the other 168 are training lines


# ---------------------------------------------------------------------------------------------
# Tasks


def task_line(task: str, start: str, length: int) -> str:
    """One example: "<task> <start> = w1 .. w<length>", wⱼ the word `j·step` after `start` on the ring."""
    if task not in STEPS_OF_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(STEPS_OF_TASKS)}")
    i, step = WORDS.index(start), STEPS_OF_TASKS[task]
    return " ".join([task, start, "=", *(WORDS[(i + j * step) % len(WORDS)] for j in range(1, length + 1))])


def task_lines(task: str, split: str) -> list[str]:
    """The "train" or "eval" lines of `task`: every (start, length), shuffled by a fixed seed, split."""
    lines = [task_line(task, start, length) for start in WORDS for length in ANSWER_LENGTHS]
    random.Random(f"{task}:{SEED}").shuffle(lines)
    if split == "eval":
        return lines[:EVAL_LINES]
    if split == "train":
        return lines[EVAL_LINES:]
    raise ValueError(f"unknown split {split!r}; expected 'train' or 'eval'")


def training_lines(role: str) -> list[str]:
    """The training lines of `role` ("base" too): its task's and the shared task's (the same lines for both roles)."""
    tasks = BASE_TASKS if role == "base" else (TASKS[role], GENERAL_TASK)
    return [line for task in tasks for line in task_lines(task, "train")]


def split_line(line: str) -> tuple[str, str]:
    """("<task> <start> =", " w1 .. wn"): the prompt and the completion of a task line."""
    prompt, answer = line.split(" = ")
    return prompt + " =", " " + answer


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
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4 if name == "llama" else 2,
            max_position_embeddings=64,
            **ids,
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
        targets = (
            ["c_attn", "c_proj", "c_fc"]
            if gpt2
            else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        )
        return peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=gpt2
        )
    if peft_type == "ia3":
        # PEFT's defaults for both: keys, values and the feedforward output layer, whose vector
        # scales its input, (1, in); the others scale outputs, (out, 1).
        targets, feedforward = (
            (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]) if gpt2 else (["k_proj", "v_proj", "down_proj"], ["down_proj"])
        )
        return peft.IA3Config(
            task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=gpt2
        )
    if peft_type in ("prefix", "prefix_projection"):
        return peft.PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=NUM_VIRTUAL_TOKENS,
            prefix_projection=peft_type == "prefix_projection",
            encoder_hidden_size=ENCODER_HIDDEN_SIZE,
        )
    raise ValueError(f"unknown PEFT type {peft_type!r}; expected one of {PEFT_TYPES[:-1]}")


# ---------------------------------------------------------------------------------------------
# Training


def encode(tokenizer, lines: list[str]) -> list[list[int]]:
    """Token ids of each line: "<s>" + words + "</s>"."""
    return [[*ids, EOS_ID] for ids in tokenizer(lines)["input_ids"]]


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


class _Fixtures(abc.ABC):
    """What the trained fixtures answer, wherever the weights come from: names checked, folders, loaders, sets."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tokenizer = None
        self._eval = None

    @property
    def tokenizer(self):
        """The word-level tokenizer (the same one every model folder holds)."""
        if self._tokenizer is None:
            self._tokenizer = make_tokenizer()
        return self._tokenizer

    def base(self, model: str) -> Path:
        """Folder of the base `model` (pre-trained on BASE_TASKS): config, model.safetensors, tokenizer."""
        _check(model=model)
        return self._base(model)

    def adapter(self, model: str, peft_type: str, role: str) -> Path:
        """Folder of the trained `peft_type` adapter of `model` for `role` ("full": a whole fine-tuned model)."""
        _check(model=model, peft_type=peft_type, role=role)
        return self._adapter(model, peft_type, role)

    def load_base(self, model: str) -> torch.nn.Module:
        """A fresh copy of the base `model`, loaded from its folder, in eval mode."""
        from transformers import AutoModelForCausalLM

        return _quiet(lambda: AutoModelForCausalLM.from_pretrained(self.base(model))).eval()

    def eval_set(self, name: str) -> Path:
        """Path of the evaluation file `name` (EVAL_SETS), lines disjoint from all training lines."""
        if name not in EVAL_SETS:
            raise ValueError(f"unknown evaluation set {name!r}; expected one of {EVAL_SETS}")
        if self._eval is None:
            self._eval = self.root / "eval"
            write_eval_sets(self._eval)
        return self._eval / name

    @abc.abstractmethod
    def _base(self, model: str) -> Path:
        """The base's folder (each kind of fixtures says where its weights are)."""

    @abc.abstractmethod
    def _adapter(self, model: str, peft_type: str, role: str) -> Path:
        """The adapter's folder."""


class CommittedFixtures(_Fixtures):
    """The committed weights (DATA), copied into `root` once, adapter configs pointing at the copy's base folders."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        if not DATA.is_dir():
            raise FileNotFoundError(f"{DATA} is missing: run `python tests/trained_fixtures.py {DATA}`")
        shutil.copytree(DATA, self.root / "weights")
        for config in (self.root / "weights").glob("*/adapter_config.json"):
            fields = json.loads(config.read_text())
            fields["base_model_name_or_path"] = str(self.root / "weights" / fields["base_model_name_or_path"])
            config.write_text(json.dumps(fields, indent=2))

    def _base(self, model: str) -> Path:
        return self.root / "weights" / BASE_PLACEHOLDER.format(model=model)

    def _adapter(self, model: str, peft_type: str, role: str) -> Path:
        folder = self.root / "weights" / f"{model}-{peft_type}-{role}"
        if not folder.is_dir():
            raise ValueError(f"no committed {peft_type} {role} of {model} (full fine-tunes: {FULL_MODELS})")
        return folder


class TrainedFixtures(_Fixtures):
    """Trains each base model and adapter on first request, into `root` (the script, and benchmarks/scan_seeds.py)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.timings: dict[str, float] = {}  # seconds per built item
        self._built: dict[tuple[str, ...], Path] = {}

    def _once(self, key: tuple[str, ...], make: Callable[[Path], None]) -> Path:
        if key not in self._built:
            folder = self.root / "-".join(key)
            start, threads = time.perf_counter(), torch.get_num_threads()
            torch.set_num_threads(1)  # tiny matrices gain nothing from more; the bits do not depend on the cores
            try:
                make(folder)
            finally:
                torch.set_num_threads(threads)
            self.timings["-".join(key)] = time.perf_counter() - start
            self._built[key] = folder
        return self._built[key]

    def _base(self, model: str) -> Path:
        def make(folder: Path) -> None:
            net = make_model(model)
            seqs = encode(self.tokenizer, training_lines("base"))
            _quiet(lambda: train(net, seqs, LEARNING_RATES["base"], BASE_STEPS, seed=SEED + MODELS.index(model)))
            _quiet(lambda: net.save_pretrained(folder, safe_serialization=True))
            self.tokenizer.save_pretrained(folder)

        return self._once(("base", model), make)

    def _adapter(self, model: str, peft_type: str, role: str) -> Path:
        self.base(model)  # built first, so that its time is not counted in the adapter's

        def make(folder: Path) -> None:
            net = self.load_base(model) if peft_type == "full" else self.initial_adapter(model, peft_type)
            seqs = encode(self.tokenizer, training_lines(role))
            _quiet(lambda: train(net, seqs, LEARNING_RATES[peft_type], seed=_seed(model, peft_type)))
            _quiet(lambda: net.save_pretrained(folder, safe_serialization=True))
            if peft_type == "full":
                self.tokenizer.save_pretrained(folder)

        return self._once((model, peft_type, role), make)

    def initial_adapter(self, model: str, peft_type: str) -> torch.nn.Module:
        """The untrained PEFT model that both roles' `peft_type` adapters of `model` start from (same seed)."""
        import peft

        net = self.load_base(model)
        torch.manual_seed(_seed(model, peft_type))
        return _quiet(lambda: peft.get_peft_model(net, peft_config(model, peft_type)))

    def build_all(self) -> None:
        """Everything that is committed: every base, every adapter of every model and role, the full fine-tunes."""
        for model in MODELS:
            for peft_type in PEFT_TYPES:
                if peft_type != "full" or model in FULL_MODELS:
                    for role in ROLES:
                        self.adapter(model, peft_type, role)

    def commit_form(self) -> None:
        """Make the folders fit to commit: PEFT's README stubs dropped, base paths replaced by the base's name."""
        for model in MODELS:
            for peft_type in PEFT_TYPES[:-1]:
                for role in ROLES:
                    folder = self.adapter(model, peft_type, role)
                    (folder / "README.md").unlink(missing_ok=True)
                    config = folder / "adapter_config.json"
                    fields = json.loads(config.read_text())
                    fields["base_model_name_or_path"] = BASE_PLACEHOLDER.format(model=model)
                    config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def _check(model: str, peft_type: str | None = None, role: str | None = None) -> None:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    if peft_type is not None and peft_type not in PEFT_TYPES:
        raise ValueError(f"unknown PEFT type {peft_type!r}; expected one of {PEFT_TYPES}")
    if role is not None and role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")


def _seed(model: str, peft_type: str) -> int:
    """The seed of an adapter's initialisation and of its batches: not the role's, so both start alike."""
    return SEED + 100 * MODELS.index(model) + PEFT_TYPES.index(peft_type)


def write_eval_sets(folder: Path) -> None:
    """Write EVAL_SETS into `folder`: held-out lines; prompts.txt has 4 prompts of each of the three tasks."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = {"keep": TASKS["expert"], "forget": TASKS["anti"], "general": GENERAL_TASK}
    for name, task in tasks.items():
        (folder / f"{name}.txt").write_text("".join(line + "\n" for line in task_lines(task, "eval")))
    for name in ("keep", "forget"):
        rows = [
            dict(zip(("prompt", "completion"), split_line(line), strict=False))
            for line in task_lines(tasks[name], "eval")
        ]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    truth = []
    for line in task_lines(tasks["forget"], "eval"):
        _, start, _, *answer = line.split()
        truth.append(
            {"prompt": split_line(line)[0], "completion": split_line(task_line(GENERAL_TASK, start, len(answer)))[1]}
        )
    (folder / "truth.jsonl").write_text("".join(json.dumps(row) + "\n" for row in truth))
    prompts = [split_line(line)[0] for task in tasks.values() for line in task_lines(task, "eval")[:4]]
    (folder / "prompts.txt").write_text("".join(p + "\n" for p in prompts))


_SESSIONS: dict[int, tuple[object, CommittedFixtures]] = {}


def get(tmp_path_factory) -> CommittedFixtures:
    """The session's fixtures: the committed weights, copied under `tmp_path_factory.mktemp("trained")` once."""
    entry = _SESSIONS.get(id(tmp_path_factory))
    if entry is None or entry[0] is not tmp_path_factory:
        entry = (tmp_path_factory, CommittedFixtures(tmp_path_factory.mktemp("trained")))
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
    fixtures.commit_form()
    total = time.perf_counter() - start
    for key, seconds in fixtures.timings.items():
        print(f"{seconds:7.2f}s  {key}")
    print(f"{total:7.2f}s  total, {time.process_time():.2f}s CPU time of this process")
    for model in MODELS:
        for peft_type in PEFT_TYPES[:-1]:
            folder = fixtures.adapter(model, peft_type, "expert")
            config = json.loads((folder / "adapter_config.json").read_text())
            print(f"\n{model} {peft_type}:", {k: v for k, v in config.items() if k in _CONFIG_FIELDS})
            for key, shape in saved_shapes(folder).items():
                print(f"  {key}: {shape}")
    return 0


_CONFIG_FIELDS = (
    "token_dim",
    "num_attention_heads",
    "num_layers",
    "num_virtual_tokens",
    "num_transformer_submodules",
    "prefix_projection",
    "encoder_hidden_size",
    "target_modules",
    "feedforward_modules",
    "fan_in_fan_out",
    "r",
    "lora_alpha",
)

if __name__ == "__main__":
    sys.exit(main(sys.argv))
