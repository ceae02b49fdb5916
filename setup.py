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
        # The tests run the kernels in Triton's interpreter on CPU, which needs triton >= 3.7
        # with numpy >= 2.4 (compiled on a GPU, triton 3.6 was checked too).
        "test": ["pytest>=7", "transformers==5.24.0", "protobuf>=4", "triton>=3.7; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["llava-next=llava_next.cli:main"]},
)
