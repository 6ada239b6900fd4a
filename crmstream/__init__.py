"""crmstream: a real-time CRM trigger engine on Bytewax, Kafka, Redis and Numba."""

__version__ = "0.1.0"
