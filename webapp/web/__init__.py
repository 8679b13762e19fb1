"""The HTTP edge: the authentication gate, login pages, error translation, the ASGI app factory."""
