"""Barlow Twins self-supervised image representations in the Hugging Face stack."""

from pathlib import Path

from setuptools import find_packages, setup


setup(
    name="barlow-twins-hf",
    version="0.1.0",
    description="Barlow Twins (Zbontar et al., 2021) as transformers models on timm backbones, trained with Accelerate",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_barlow", "modeling_barlow.*", "training", "training.*", "hub", "hub.*", "barlow_cli"]),
    # The model card template that barlow-publish renders ships inside the package.
    package_data={"hub": ["model_card.md"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=5.0",
        "timm>=1.0",
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "scikit-learn>=1.3",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "jinja2>=3.0",
    ],
    extras_require={
        "dev": ["pytest>=8.0", "torchmetrics>=1.4", "pycocotools>=2.0.7"],
        # Dense fine-tuning (barlow-finetune --task object-detection / semantic-segmentation):
        # mAP (COCO protocol, pycocotools backend) and mIoU from torchmetrics.
        "dense": ["torchmetrics>=1.4", "pycocotools>=2.0.7"],
        "tracking": ["tensorboard>=2.14"],
        # The peer library the benchmarks compare against (benchmarks/train_step_cpu.py, benchmarks/loss.py).
        "bench": ["lightly==1.6.0"],
        # barlow-search --backend faiss (training/embedding/index.py); exact search needs nothing more.
        "index": ["faiss-cpu>=1.8"],
        # barlow-search --serve, and the browser test that drives it (with Debian's chromium and chromedriver).
        "demo": ["gradio>=5.0", "selenium>=4.20"],
    },
    entry_points={
        "console_scripts": [
            "barlow-pretrain=training.pretrain:main",
            "barlow-eval=training.evaluate:main",
            "barlow-finetune=training.finetune:main",
            "barlow-publish=hub.publish:main",
            "barlow-convert=hub.convert_official:main",
            "barlow-embed=training.embedding.embed:main",
            "barlow-search=training.embedding.search:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
