from setuptools import find_packages, setup

setup(
    name="fairseq-distill",
    version="0.1.0",
    description="Knowledge distillation of language models as fairseq plugins",
    packages=find_packages(include=["distill_plugins", "distill_plugins.*"]),
    # Loaded at interpreter start-up by the .pth file scripts/setup_env.sh writes (README, "CLI start-up").
    py_modules=["fairseq_distill_startup"],
    python_requires=">=3.10",
    # torch is deliberately not listed: a bare `torch` requirement pulls a multi-GB CUDA build.
    # scripts/setup_env.sh installs the pinned CPU wheel (or keeps an existing torch) first.
    install_requires=["ve-fairseq==0.12.3", "sentencepiece>=0.2", "rapidfuzz>=3.0", "rouge-score>=0.1.2", "pyyaml"],
    extras_require={
        "hf": ["transformers==5.23.0", "huggingface_hub==2.4.0", "tokenizers==0.23.3", "safetensors==0.8.0"],
        "plot": ["matplotlib"],
        "test": ["pytest"],
        # --ddp-backend fully_sharded (GPU only; docs/distributed.md). Optional: fairseq needs it for
        # nothing else, and it cannot shard on CPU. Install it after torch (it requires torch>=1.8).
        "fsdp": ["fairscale==0.4.13"],
    },
    entry_points={
        "console_scripts": [
            "distill-prepare=distill_plugins.cli.prepare:main",
            "distill-score=distill_plugins.cli.score:main",
            "distill-seqkd=distill_plugins.cli.seqkd:main",
            "distill-chain=distill_plugins.cli.chain:main",
            "distill-evaluate=distill_plugins.cli.evaluate:main",
            "distill-compare=distill_plugins.cli.compare:main",
            "distill-export-hf=distill_plugins.cli.export_hf:main",
            "distill-train=distill_plugins.cli.train:main",
            "distill-launch=distill_plugins.cli.launch:main",
            "distill-cache-teacher=distill_plugins.cli.cache_teacher:main",
            "distill-miniplm=distill_plugins.cli.miniplm:main",
        ]
    },
)
