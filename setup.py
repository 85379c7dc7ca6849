"""extsub: exact, fast Ext-Sub merges of weights, checkpoints and LoRA adapters."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "extsub_kernels" / "__init__.py").read_text()).group(1)

setup(
    name="extsub",
    version=VERSION,
    description="GPU-kernel-accelerated Ext-Sub (Extraction-before-Subtraction) merges for weights, checkpoints and LoRA adapters",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["extsub_kernels", "extsub_kernels.*"]),
    # The CPU kernel's C++ source, compiled at first use (extsub_kernels/kernels/ext_sub_cpu.py).
    package_data={"extsub_kernels.kernels": ["*.cpp"]},
    install_requires=[
        "torch>=2.1,<3",
        "triton>=2.1; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "safetensors>=0.4",
        "huggingface-hub>=0.20",
        "numpy>=1.24",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "peft>=0.10", "transformers>=4.40"],
    },
    entry_points={"console_scripts": ["extsub-merge = extsub_kernels.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
