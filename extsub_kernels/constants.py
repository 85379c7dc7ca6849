"""Every file name and environment variable the package reads or writes, in one place (as huggingface_hub's own),
below every other module, so each name is spelled one way."""

# Checkpoints: a .safetensors file, a folder of shards with their index, a model's config.
SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"  # "model" + INDEX_SUFFIX: the index of model-0000N-of-0000M.safetensors
MODEL_WEIGHTS = "model.safetensors"
SHARD_NAME = "{stem}-{index:05d}-of-{count:05d}" + SAFETENSORS_SUFFIX  # model-00001-of-00003.safetensors
MODEL_CONFIG = "config.json"

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"  # a pickle: refused, never read

# What a folder output gets beside its weights, and what a run leaves while it writes.
CARD_NAME = "README.md"
RECIPE_NAME = "extsub_recipe.yaml"
TEMP_TAG = ".extsub-tmp-"  # a run's temporary beside OUT: ".OUT.extsub-tmp-PID-XXXXXXXX"

MOUNT_INFO = "/proc/self/mountinfo"  # Linux: where every file system (bind mounts too) is mounted

ENV_CACHE_DIR = "EXTSUB_CACHE_DIR"  # where the C++ kernel is built (default: $XDG_CACHE_HOME/extsub)
ENV_CPP_KERNEL = "EXTSUB_CPP_KERNEL"  # 0/off/false/no: the CPU op runs in eager torch instead
ENV_CXX = "CXX"  # the C++ compiler of the CPU kernel
ENV_TRITON_INTERPRET = "TRITON_INTERPRET"  # Triton's interpreter: the kernel runs on CPU tensors
ENV_HF_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # hub ids from the cache only
ENV_HF_CACHE = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")  # the hub cache, else $HF_HOME/hub
ENV_HF_HOME = "HF_HOME"
ENV_XDG_CACHE = "XDG_CACHE_HOME"
