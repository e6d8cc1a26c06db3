"""HellaSwag inference microservice: embedded SmolLM2-135M, batched /generate and /score."""

__version__ = "0.1.0"
