"""REST APIs: the studio's own ``/api/v1`` and the A1111-compatible ``/sdapi/v1``. Thin routers over services."""
