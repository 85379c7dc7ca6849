"""A tiny chat model with random weights and a byte-level tokenizer with a chat template, built in a second.

Nothing is trained: tests use it for mechanisms whose answer is known by construction (the same
tokens scored two ways, a batched pass against a plain forward), never for what a model learned.
The tokenizer spells any text byte by byte (a BPE without merges over the 256 byte symbols), so
TruthfulQA's own questions tokenise, and adds no special tokens of its own, as chat tokenizers
(SmolLM2's) do not: the chat template writes them.
"""

from pathlib import Path

import torch

SEED = 20241207
SPECIALS = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_ID, EOS_ID, START_ID, END_ID = range(len(SPECIALS))
# SmolLM2's (ChatML): a turn is <|im_start|>role\ncontent<|im_end|>\n.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat: bool = True):
    """The byte-level tokenizer (ids 0–3 the specials, then the 256 bytes), with the chat template if `chat`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIALS, *alphabet])}
    tok = Tokenizer(models.BPE(vocab, [], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>", additional_special_tokens=SPECIALS[2:]
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(name: str = "llama", seed: int = SEED) -> torch.nn.Module:
    """A 2-layer model over the tokenizer's vocabulary, random weights from `seed`; its generation config stops at
    end of turn as well as at EOS (as a chat model's does)."""
    import transformers

    vocab = len(SPECIALS) + 256
    ids = {"vocab_size": vocab, "pad_token_id": PAD_ID, "bos_token_id": START_ID, "eos_token_id": EOS_ID}
    torch.manual_seed(seed)
    if name == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **ids,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **ids)
        model = transformers.GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = [EOS_ID, END_ID]
    return model.eval()


def save_base(folder: Path, name: str = "llama", chat: bool = True) -> Path:
    """The model and its tokenizer saved as a model folder (what --base takes)."""
    make_model(name).save_pretrained(folder)
    make_tokenizer(chat).save_pretrained(folder)
    return folder
