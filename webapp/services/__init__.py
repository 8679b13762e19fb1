"""Domain services: validate, authorise and record. One module per domain; no web types in here."""
