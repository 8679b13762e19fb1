"""The Gradio UI: one module per tab, each with ``build(ctx)`` creating widgets and wiring events."""
