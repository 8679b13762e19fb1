"""The studio's own REST API (``/api/v1``): one router module per resource, thin over the services."""
