"""Observability: logging, sd_notify, process titles and metrics."""
