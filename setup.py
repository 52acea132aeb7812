"""ctlake: CT imaging at scale on Apache Spark and Delta Lake."""
from setuptools import find_namespace_packages, setup

setup(
    name="ctlake",
    version="0.1.0",
    description="Ingest, preprocess and learn from CT image sets on Apache Spark and Delta Lake",
    package_dir={"": "lib"},
    # ctlake.core and ctlake.spark have no __init__.py: namespace packages, which find_packages skips.
    packages=find_namespace_packages("lib", include=["ctlake*"]),
    python_requires=">=3.11",
    install_requires=[
        # delta-spark 4.4.x is built against Spark 4.2; Maven Central serves the
        # matching jar io.delta:delta-spark_4.2_2.13 at 4.4.0 (4.4.1 is not there).
        "pyspark>=4.2.0,<4.3",
        "delta-spark==4.4.0",
        # delta-rs: the driver commits the data files the Python workers wrote (ctlake.spark.datafiles).
        "deltalake>=1.6,<2",
        # PySpark 4.2 warns that pandas 3 is not fully supported.
        "pandas>=2.2,<3",
        "numpy>=1.26",
        "pyarrow>=15",
        "pyyaml>=6",
        "opencv-python-headless>=4.9",
        "scikit-learn>=1.4",
        "scipy>=1.11",
        "pydicom>=3.0,<4",
        "pylibjpeg>=2.0",
        "pylibjpeg-libjpeg>=2.1",
        "pylibjpeg-openjpeg>=2.3",
        "pylibjpeg-rle>=2.0",
        "matplotlib>=3.8",
        # The 3D CNN (ctlake.core.cnn3d): Keras 3 on JAX, 151 MB from PyPI and no GPU packages (PyTorch's
        # Linux wheels bring 2.4 GB of CUDA); docs/cnn.md. Pinned: a seed gives the same weights only on the same
        # versions.
        "keras==3.15.1",
        "jax==0.10.2",
        "jaxlib==0.10.2",
    ],
    extras_require={
        "test": ["pytest>=8", "pydicom-data>=1.0", "ruff>=0.5", "venv-pack>=0.2"],
    },
)
