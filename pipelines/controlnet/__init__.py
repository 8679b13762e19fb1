"""ControlNet: preprocessors (annotators) that make control maps, and the ControlNet models that use them."""
