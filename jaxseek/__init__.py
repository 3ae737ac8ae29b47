"""jaxseek: DeepSeek's open-source infrastructure rebuilt natively for JAX."""

__version__ = "0.1.0"
