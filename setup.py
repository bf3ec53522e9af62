from setuptools import find_packages, setup

setup(
    name="fairseq-distill",
    version="0.1.0",
    description="Knowledge distillation of language models as fairseq plugins",
    packages=find_packages(include=["distill_plugins", "distill_plugins.*"]),
    python_requires=">=3.10",
    # torch is deliberately not listed: a bare `torch` requirement pulls a multi-GB CUDA build.
    # scripts/setup_env.sh installs the pinned CPU wheel (or keeps an existing torch) first.
    install_requires=["ve-fairseq==0.12.3", "sentencepiece>=0.2", "rouge-score>=0.1.2", "pyyaml"],
    extras_require={
        "hf": ["transformers", "safetensors"],
        "plot": ["matplotlib"],
        "test": ["pytest"],
    },
    entry_points={
        "console_scripts": [
            "distill-prepare=distill_plugins.cli.prepare:main",
            "distill-score=distill_plugins.cli.score:main",
        ]
    },
)
