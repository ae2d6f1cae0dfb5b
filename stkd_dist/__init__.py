"""stkd-dist: distributed knowledge distillation for spatiotemporal forecasting."""

__version__ = "0.1.0"
