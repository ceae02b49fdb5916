from setuptools import find_packages, setup

setup(
    name="llava-next",
    version="0.1.0",
    description="LLaVA-NeXT (LLaVA-1.6) in plain PyTorch with hand-written Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llava_next", "llava_next.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "sentencepiece>=0.1.99",
        "pillow>=9.0",
        "numpy>=1.23",
        "huggingface_hub>=0.23",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        # transformers is the test oracle only; never imported by the package.
        # On CPU the tests run the kernels in Triton's interpreter, which needs triton >= 3.7 when
        # numpy >= 2.4 (llava_next.kernels says so if not). Not pinned here: CUDA torch wheels pin
        # their own triton (torch 2.11: 3.6.0, fine compiled on a GPU).
        "test": ["pytest>=7", "transformers==5.24.0", "protobuf>=4"],
    },
    entry_points={"console_scripts": ["llava-next=llava_next.cli:main"]},
)
