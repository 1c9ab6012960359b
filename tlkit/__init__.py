"""tlkit: run, track and compare transfer-learning experiments as an MLflow Project."""

__version__ = "0.1.0"
