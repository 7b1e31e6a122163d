"""The web console for merchandisers and operators (``mercato console``)."""
