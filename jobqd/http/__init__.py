"""The http child: /metrics, /healthz, /readyz and the JSON API, on its own database pool."""
