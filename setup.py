"""Barlow Twins self-supervised image representations in the Hugging Face stack."""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildWithModelCard(build_py):
    """Ship the top-level model_card.md, the template barlow-publish renders, inside the hub package:
    the checkout keeps one copy at the top, where people look for it (package_data only takes files
    inside a package)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install imports hub from the checkout, which reads the top-level file
        target = Path(self.build_lib) / "hub" / "model_card.md"
        self.mkpath(str(target.parent))
        self.copy_file(str(Path(__file__).with_name("model_card.md")), str(target))


setup(
    name="barlow-twins-hf",
    version="0.1.0",
    description="Barlow Twins (Zbontar et al., 2021) as transformers models on timm backbones, trained with Accelerate",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_barlow", "modeling_barlow.*", "training", "training.*", "hub", "hub.*", "barlow_cli"]),
    cmdclass={"build_py": BuildWithModelCard},
    # Ranges up to the next major release of each; constraints.txt pins the set `make test` passed with.
    install_requires=[
        "torch>=2.4,<3",
        "torchvision>=0.19,<1",
        # 5.25: _init_weights covers every tensor, activation_checkpointing_enable (see README).
        "transformers>=5.25,<6",
        "timm>=1.0,<2",
        "accelerate>=1.0,<2",
        "datasets>=3.0,<6",
        "huggingface_hub>=1.0,<3",
        "safetensors>=0.4,<1",
        "scikit-learn>=1.3,<2",
        "pyyaml>=6.0,<7",
        "tqdm>=4.60,<5",
        "matplotlib>=3.7,<4",
        "jinja2>=3.0,<4",
    ],
    extras_require={
        # parameterized: transformers' common model tests (from its sdist, see tests/fetch_transformers_tests.py) import it.
        # sybil: tests/test_docs_examples.py reads the fenced blocks of README.md and docs/ and runs each.
        "dev": ["pytest>=8.0,<10", "torchmetrics>=1.4,<2", "pycocotools>=2.0.7,<3", "parameterized>=0.9,<1", "pytest-xdist>=3.5,<4",
                "sybil>=10.0,<11"],
        # The documentation site (mkdocs.yml): `make docs` serves it, `make test` builds it with --strict.
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.6,<10", "mkdocstrings[python]>=1.0,<2", "mkdocstrings-python>=2.0,<3"],
        # Dense fine-tuning (barlow-finetune --task object-detection / semantic-segmentation):
        # mAP (COCO protocol, pycocotools backend) and mIoU from torchmetrics.
        "dense": ["torchmetrics>=1.4,<2", "pycocotools>=2.0.7,<3"],
        "tracking": ["tensorboard>=2.14,<3"],
        # The peer library the benchmarks compare against (benchmarks/train_step_cpu.py, benchmarks/loss.py);
        # RESULTS.md's numbers are lightly 1.6.0's, the version constraints.txt pins.
        "bench": ["lightly>=1.6,<2"],
        # barlow-search --backend faiss (training/embedding/index.py); exact search needs nothing more.
        "index": ["faiss-cpu>=1.8,<2"],
        # barlow-search --serve, and the browser test that drives it (with Debian's chromium and chromedriver).
        "demo": ["gradio>=5.0,<7", "selenium>=4.20,<5"],
        # make mutate: mutation testing of the fast in-process tests (benchmarks/mutation.py).
        "mutation": ["mutmut>=3.8,<4"],
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
